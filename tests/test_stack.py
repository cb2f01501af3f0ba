"""`driftloop up` → `status` → `submit` → `status` → `down`, with real processes; nothing is left behind."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import requests

from cluster.broker import free_port
from cluster.ray_runtime import LOOPBACK_ENV
from cluster.stack import alive
from streams.config import PipelineConfig
from streams.files import infer_config, read_table
from tests.test_cli import config_file, driftloop
from tests.test_own_data import cancer_csv

pytestmark = [pytest.mark.integration, pytest.mark.heavy]


def processes_mentioning(text: str) -> list[str]:
    # -ww: whole command lines. Without it ps cuts them at $COLUMNS, and HAProxy's config path
    # (which names the Ray head's temp dir) came after the cut: a leaked HAProxy went unseen.
    out = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines()[1:] if text in line and "ps -ww" not in line]


def listening(pids: Any, naming: str | None = None) -> dict[tuple[str, int], tuple[str, int]]:
    """The (address, port) pairs that these processes and their descendants listen on (TCP), with
    the name and pid of the process that listens; with `naming`, also every process whose command
    line names it (and its descendants): Serve's HAProxy, which need not stay below the Ray head."""
    import psutil

    tops = [p for p in (_process(pid) for pid in pids) if p is not None]
    if naming:
        tops += [p for p in psutil.process_iter(["cmdline"]) if any(naming in a for a in p.info["cmdline"] or ())]
    found = {}
    for top in tops:
        try:
            family = [top, *top.children(recursive=True)]
        except psutil.Error:
            continue
        for process in family:
            try:
                for c in process.net_connections("tcp"):
                    if c.status == "LISTEN":
                        found[(c.laddr.ip, c.laddr.port)] = (process.name(), process.pid)
            except psutil.Error:
                continue
    return found


def _process(pid: int) -> Any:
    import psutil

    try:
        return psutil.Process(pid)
    except psutil.Error:
        return None


def on_loopback(ip: str) -> bool:
    """127.0.0.0/8 or ::1, also as an IPv4-mapped IPv6 address (gRPC's `[::ffff:127.0.0.1]`)."""
    import ipaddress

    address = ipaddress.ip_address(ip)
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def haproxy_open_ports(ray_pid: int) -> set[int]:
    """HAProxy's stats and Prometheus ports, from the environment the stack gave the Ray head:
    Ray's HAProxy template binds them to every interface (`bind *:PORT`), which no setting changes."""
    import psutil

    env = psutil.Process(ray_pid).environ()
    return {int(env[k]) for k in ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT") if k in env}


def raylet_node_id(pid: int) -> str:
    """Ray's id of the node whose `ray start` is `pid`: its raylet's `--node_id`."""
    import psutil

    raylets = [p for p in psutil.Process(pid).children(recursive=True) if p.name() == "raylet"]
    assert len(raylets) == 1, raylets
    return next(a.split("=", 1)[1] for a in raylets[0].cmdline() if a.startswith("--node_id="))


# Prints the node its own process runs on: the raylet above it. (`get_node_id()` in the entrypoint
# would name the head: on one machine Ray joins a job's driver to the head's raylet, wherever it runs.)
WHERE = """import psutil
p = psutil.Process()
while p.name() != "raylet":
    p = p.parent()
print("ran on node", next(a.split("=", 1)[1] for a in p.cmdline() if a.startswith("--node_id=")))
"""


def test_up_status_submit_down_leaves_no_process_behind(
    demo_config: PipelineConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As from a user's shell: the variable that keeps Ray on loopback comes from driftloop, not from
    # this process (where a cluster `start_local` started has set it).
    for name in LOOPBACK_ENV:
        monkeypatch.delenv(name, raising=False)
    config = config_file(tmp_path, demo_config)
    # A second pipeline on the same stack, with a schema of its own (inferred from a file as `init` does)
    other = tmp_path / "cancer.yaml"
    other.write_text(infer_config(read_table(cancer_csv(tmp_path / "cancer.csv")), label="diagnosis",
                                  name="cancer", timestamp="seen at", source="cancer.csv").text)  # fmt: skip
    state = tmp_path / "stack"
    where = ["--config", str(config), "--state-dir", str(state)]
    serve_port = free_port()
    upped = driftloop("up", *where, "--config", str(other), "--num-cpus", "3", "--serve-port", str(serve_port),
                      "--workers", "1", timeout=400)  # fmt: skip
    recorded: dict[str, int] = {}
    ray_dir = "<none>"
    try:
        assert upped.returncode == 0, upped.stdout[-3000:] + upped.stderr[-3000:]
        saved = json.loads((state / "state.json").read_text())
        recorded, ray_dir = saved["pids"], saved["ray_temp_dir"]
        assert set(recorded) == {"broker", "mlflow", "ray", "ray-worker-1"} and all(alive(p) for p in recorded.values())
        assert "[up] ray workers 1 node(s) of 1 CPUs" in upped.stdout, upped.stdout  # 3 CPUs: the head keeps 2
        # Every port the stack's processes, their descendants and Serve's HAProxy listen on is on
        # loopback: the broker, MLflow, the Jobs API, Serve, and Ray's own, the worker node's too (GCS, raylet, object
        # manager, workers' and actors' gRPC, dashboard agent, runtime env agent, metrics export,
        # Ray client server), which Ray 2.60 puts on every interface unless LOOPBACK_ENV is set.
        # Except what Ray hard-codes to every interface (README: ports to keep private): HAProxy's
        # stats and Prometheus ports (its config template), and each Serve replica's
        # inter-deployment gRPC server (`[::]:0` in serve/_private/replica.py): one port per replica.
        ours = {int(str(saved[k]).rsplit(":", 1)[1].strip("/")) for k in ("kafka", "mlflow", "ray_jobs")} | {serve_port}
        bound = listening(recorded.values(), naming=ray_dir)
        table = "\n".join(f"{ip:>20} {port:>5} {name}" for (ip, port), (name, _) in sorted(bound.items()))
        assert ours <= {port for _, port in bound}, (ours, table)
        assert {ip for ip, port in bound if port in ours} == {"127.0.0.1"}, table
        assert len(bound) > len(ours) + 5, f"Ray's own ports are among them:\n{table}"
        haproxy = haproxy_open_ports(recorded["ray"])
        beyond = {k: who for k, who in bound.items() if not on_loopback(k[0]) and k[1] not in haproxy}
        replicas = Counter(pid for name, pid in beyond.values() if name.startswith("ray::ServeReplica"))
        open_to_all = sorted(k for k, (name, pid) in beyond.items() if replicas.get(pid) != 1)
        assert not open_to_all, f"listening beyond loopback: {open_to_all}\n{table}"
        exports = dict(line[len("export ") :].split("=", 1) for line in upped.stdout.splitlines() if "export " in line)
        assert set(exports) == {"KAFKA_BOOTSTRAP_SERVERS", "RAY_ADDRESS", "MLFLOW_TRACKING_URI", "DRIFTLOOP_API_KEY",
                                "DRIFTLOOP_DATASETS_ROOT", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                                "DRIFTLOOP_MLFLOW_PASSWORD_FILE"}  # fmt: skip
        key_file = state / "api_key"
        assert exports["DRIFTLOOP_API_KEY"] == f"$(cat {key_file.resolve()})", "the key is not printed"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        key = key_file.read_text()

        # MLflow answers only with the stack's credentials (its basic-auth app); the password is in
        # a 0600 file, printed as $(cat FILE), and on no process's command line.
        password_file = state / "mlflow_password"
        assert exports["MLFLOW_TRACKING_PASSWORD"] == f"$(cat {password_file.resolve()})"
        assert exports["DRIFTLOOP_MLFLOW_PASSWORD_FILE"] == str(password_file.resolve())
        assert stat.S_IMODE(password_file.stat().st_mode) == 0o600
        password = password_file.read_text()
        search = f"{saved['mlflow']}/api/2.0/mlflow/experiments/search?max_results=5"
        assert requests.get(search, timeout=30).status_code == 401
        assert requests.get(search, auth=("driftloop", "wrong"), timeout=30).status_code == 401
        assert requests.get(search, auth=(exports["MLFLOW_TRACKING_USERNAME"], password), timeout=30).ok
        assert requests.get(f"{saved['mlflow']}/health", timeout=30).ok, "health stays open, for probes"
        assert not processes_mentioning(password)

        # Serve is up before any model: 503 no_model (with Retry-After), 401 without the key.
        serve = f"http://127.0.0.1:{serve_port}"
        assert saved["serve"] == serve
        health = requests.get(f"{serve}/v1/health", timeout=30).json()
        assert health["status"] == "no_model" and health["model_version"] is None
        record = {"tenure_months": 3, "monthly_charges": 50.0, "support_calls": 1, "data_usage_gb": 2.0,
                  "autopay": True, "plan": "basic", "region": "north"}  # fmt: skip
        waiting = requests.post(f"{serve}/v1/predict", json=record, headers={"x-api-key": key}, timeout=30)
        assert waiting.status_code == 503 and waiting.json()["detail"]["kind"] == "no_model", waiting.text
        assert waiting.headers["retry-after"] == "5"
        assert requests.post(f"{serve}/v1/predict", json=record, timeout=30).status_code == 401

        # Two pipelines, nothing crossing: the first keeps `/`, the other has its prefix, and each
        # app also answers under its own name, with its own schema; another name is a clear 404.
        assert saved["routes"] == {demo_config.name: "/", "cancer": "/cancer"}, saved
        assert saved["actors"] == [f"{demo_config.name}-controller", f"{demo_config.name}-monitor-0",
                                   "cancer-controller", "cancer-monitor-0", f"serve:{demo_config.name}",
                                   "serve:cancer"]  # fmt: skip
        for name in (demo_config.name, "cancer"):
            assert requests.get(f"{serve}/{name}/v1/health", timeout=30).json()["status"] == "no_model"
        mine = requests.post(f"{serve}/{demo_config.name}/v1/predict", json=record, headers={"x-api-key": key},
                             timeout=30)  # fmt: skip
        assert mine.status_code == 503 and mine.json()["detail"]["kind"] == "no_model", mine.text
        crossed = requests.post(f"{serve}/cancer/v1/predict", json=record, headers={"x-api-key": key}, timeout=30)
        assert crossed.status_code == 422 and crossed.json()["detail"]["kind"] == "unknown_field", crossed.text
        nobody = requests.post(f"{serve}/nobody/v1/predict", json=record, headers={"x-api-key": key}, timeout=30)
        assert nobody.status_code == 404 and nobody.json()["detail"]["kind"] == "unknown_pipeline", nobody.text

        again = driftloop("up", *where)
        assert again.returncode == 1 and "already up" in again.stderr and "Traceback" not in again.stderr

        deadline = time.monotonic() + 90  # the monitor's and controller's first heartbeats
        while True:
            before = json.loads(driftloop("status", *where, "--json").stdout)
            if before["parts"]["services"]["ok"] or time.monotonic() > deadline:
                break
            time.sleep(2)
        services = before["parts"]["services"]
        states = {name: s["state"] for name, s in services["services"].items()}
        assert services["ok"] and states == {"monitor": "waiting", "controller": "up"}, services  # no champion yet
        parts = before["parts"]
        down_parts = {p: parts[p] for p in ("kafka", "mlflow", "ray", "processes") if not parts[p]["ok"]}
        assert not down_parts, down_parts
        assert parts["processes"]["alive"]["ray-worker-1"], parts["processes"]
        assert parts["mlflow"]["champion"] is None
        assert parts["serve"]["ok"] and parts["serve"]["status"] == "no_model", parts["serve"]
        theirs = json.loads(driftloop("status", "--config", str(other), "--state-dir", str(state), "--json").stdout)
        services = theirs["parts"]["services"]["services"]
        assert {n: s["state"] for n, s in services.items()} == {"monitor": "waiting", "controller": "up"}, services
        assert theirs["parts"]["serve"]["url"] == f"{serve}/cancer", theirs["parts"]["serve"]
        stranger = tmp_path / "stranger.yaml"
        stranger.write_text(config.read_text().replace(f"name: {demo_config.name}", "name: stranger"))
        refused = driftloop("status", "--config", str(stranger), "--state-dir", str(state))
        assert refused.returncode == 1 and "not 'stranger'" in refused.stderr, refused.stderr

        # As the README writes it: no --python, RAY_ADDRESS exported, the venv not on PATH. The job
        # runs the interpreter `up` recorded (the system `python` has none of our dependencies).
        assert saved["python"] == sys.executable
        bare_path = os.pathsep.join(d for d in os.environ.get("PATH", "").split(os.pathsep)
                                    if Path(d).resolve() != Path(sys.executable).parent.resolve())  # fmt: skip
        submitted = driftloop(
            "submit", "--state-dir", str(state), "--", "python", "-m", "tests.job_echo", "--trigger-event-id",
            "stack-1", env={"RAY_ADDRESS": exports["RAY_ADDRESS"], "PATH": bare_path}, timeout=300,
        )  # fmt: skip
        assert submitted.returncode == 0, submitted.stderr[-3000:]
        # A job pinned to the worker node (its custom resource) runs there, not on the head.
        head_node, worker_node = raylet_node_id(recorded["ray"]), raylet_node_id(recorded["ray-worker-1"])
        pinned = driftloop("submit", "--state-dir", str(state), "--resource", "worker_node=1", "--", "python", "-c",
                           WHERE, env={"RAY_ADDRESS": exports["RAY_ADDRESS"]}, timeout=300)  # fmt: skip
        assert pinned.returncode == 0, pinned.stderr[-3000:]
        assert f"ran on node {worker_node}" in pinned.stdout and worker_node != head_node, pinned.stdout[-3000:]
        after = json.loads(driftloop("status", *where, "--json").stdout)
        jobs = after["parts"]["ray"]["recent"] + after["parts"]["ray"]["running"]
        assert any("tests.job_echo" in j["entrypoint"] and j["status"] == "SUCCEEDED" for j in jobs), jobs
        # Every replica's counts, at the Ray metrics endpoint `up` chose: the two refused requests above
        metrics = after["parts"]["metrics"]
        assert metrics["ok"] and metrics["metrics_url"] == saved["metrics"], metrics
        codes = {k for r in metrics["replicas"].values() for k in r if k.startswith("requests_total:")}
        assert {"requests_total:401", "requests_total:503"} <= codes, metrics
        # A worker node that dies is no silent failure: status names it and says the stack is not healthy.
        os.killpg(recorded["ray-worker-1"], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while alive(recorded["ray-worker-1"]) and time.monotonic() < deadline:
            time.sleep(0.2)
        lost = driftloop("status", *where)
        text = lost.stdout
        assert "ray     up" in text and "no model promoted yet" in text, text
        assert lost.returncode == 1 and "processes DOWN  ray-worker-1 exited" in text, text
        # The key reached no log (the worker node's neither): Ray writes each replica's runtime_env
        # (which once held it) there.
        leaks = [str(p) for base in (Path(ray_dir).parent, state) for p in base.rglob("*") if p.is_file()
                 and p.name not in ("api_key", "mlflow_password")
                 and (key.encode() in p.read_bytes() or password.encode() in p.read_bytes())]  # fmt: skip
        assert not leaks, leaks
    finally:
        downed = driftloop("down", "--state-dir", str(state), timeout=120)
    assert downed.returncode == 0, downed.stderr
    assert not [p for p in recorded.values() if alive(p)], "every recorded process is gone"
    ray_dirs = str(Path(ray_dir).parent)  # the head's temp dir and the worker node's beside it
    assert not processes_mentioning(str(state)) and not processes_mentioning(ray_dirs), "nothing of it runs on"
    gone = driftloop("down", "--state-dir", str(state))
    assert gone.returncode == 1 and "nothing was started" in gone.stderr
    assert os.path.exists(state / "ray.log"), "the logs stay for a post-mortem"
    assert not os.path.exists(ray_dirs), "down removed Ray's temp dirs"


def test_up_refuses_bad_input_and_starts_nothing(demo_config: PipelineConfig, tmp_path: Path) -> None:
    config = config_file(tmp_path, demo_config)
    state = tmp_path / "stack"
    missing = driftloop("up", "--config", str(tmp_path / "nope.yaml"), "--state-dir", str(state))
    assert missing.returncode == 2 and "nope.yaml" in missing.stderr and "Traceback" not in missing.stderr
    for flag, value in (("--num-cpus", "0"), ("--serve-port", "70000"), ("--serve-port", "http"), ("--workers", "-1"),
                        ("--workers", "9"), ("--workers", "two")):  # fmt: skip
        bad = driftloop("up", "--config", str(config), "--state-dir", str(state), flag, value)
        assert bad.returncode == 2 and flag in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = driftloop("up", "--config", str(config), "--state-dir", str(state), "--serve-port", str(port))
    assert busy.returncode == 1 and f"port {port}" in busy.stderr and "Traceback" not in busy.stderr
    crowded = driftloop("up", "--config", str(config), "--state-dir", str(state), "--num-cpus", "2", "--workers", "2")
    assert crowded.returncode == 1 and "--num-cpus 2 cannot be split over the head and 2 worker" in crowded.stderr
    switch = driftloop("up", "--config", str(config), "--state-dir", str(state), env={"DRIFTLOOP_SERVE_HAPROXY": "on"})
    assert switch.returncode == 1 and "DRIFTLOOP_SERVE_HAPROXY: expected 0" in switch.stderr, switch.stderr
    assert "Traceback" not in switch.stderr
    assert not (state / "state.json").exists(), "nothing was started"
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "state.json").write_text("{not json")
    garbled = driftloop("up", "--config", str(config), "--state-dir", str(broken))
    assert garbled.returncode == 1 and "not a driftloop stack state" in garbled.stderr


def test_down_stops_what_outlives_the_ray_heads_process_group(tmp_path: Path) -> None:
    """Serve's HAProxy runs in its manager worker's process group, not the head's: found by its temp dir."""
    from cluster.stack import _stop_strays

    temp_dir = tmp_path / "dl-ray-x"
    config = temp_dir / "hp" / "haproxy.cfg"
    stray = subprocess.Popen(  # a process of its own group whose command line names a file in the temp dir
        [sys.executable, "-c", "import time; time.sleep(120)", str(config)], start_new_session=True
    )
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", str(tmp_path / "other")])
    try:
        assert _stop_strays(str(temp_dir), timeout_s=5.0) == 1
        assert stray.wait(timeout=10) is not None
        assert bystander.poll() is None, "what does not name the temp dir runs on"
        assert _stop_strays(str(temp_dir), timeout_s=5.0) == 0
    finally:
        for process in (stray, bystander):
            process.kill()
            process.wait()


def test_split_cpus_and_worker_node_argv() -> None:
    from cluster.stack import MAX_WORKERS, split_cpus, worker_node_argv
    from streams.errors import DriftloopError

    assert [split_cpus(total, 2) for total in (3, 4, 5, 6)] == [(1, 1), (2, 1), (3, 1), (2, 2)]
    for total, workers in ((2, 2), (8, MAX_WORKERS + 1), (8, -1)):
        with pytest.raises(DriftloopError):
            split_cpus(total, workers)
    argv = worker_node_argv("/v/bin/python", "127.0.0.1:6379", "/tmp/dl-ray-x/w1", 1, 40001)
    assert argv[:3] == ["/v/bin/python", "-m", "cluster.stack"] and "--head" not in argv
    assert {"--address=127.0.0.1:6379", "--node-ip-address=127.0.0.1", "--temp-dir=/tmp/dl-ray-x/w1",
            '--resources={"worker_node": 1}', "--dashboard-agent-listen-port=40001"} <= set(argv)  # fmt: skip
    assert not [a for a in argv if "token" in a.lower()], "the token travels in the environment only"


def test_a_worker_node_writes_its_logs_where_the_head_reads_them(tmp_path: Path) -> None:
    from cluster.stack import _ray_dirs, _share_logs

    head, worker = tmp_path / "dl-ray-x" / "r", tmp_path / "dl-ray-x" / "w1"
    (head / "session_1" / "logs").mkdir(parents=True)
    (head / "session_latest").symlink_to(head / "session_1")
    _share_logs(str(head), str(worker))
    assert (worker / "session_1" / "logs").resolve() == (head / "session_1" / "logs").resolve()
    assert not (worker / "session_1" / "sockets").exists(), "only the logs are shared"
    assert _ray_dirs(str(head)) == str(tmp_path / "dl-ray-x") and _ray_dirs("/tmp/ray-old") == "/tmp/ray-old"


@pytest.mark.filterwarnings("ignore:starlette.middleware.wsgi is deprecated")  # MLflow's auth app imports it
def test_up_starts_mlflows_users_afresh(tmp_path: Path) -> None:
    """A users' store left by an earlier `up` in the state dir kept that run's admin password (401 for this one)."""
    from cluster.stack import _mlflow_auth

    stale = tmp_path / "mlflow-auth.db"
    stale.write_bytes(b"an earlier up's admin")
    env = _mlflow_auth(tmp_path, tmp_path / "mlflow_password")
    assert not stale.exists() and env["MLFLOW_AUTH_ADMIN_PASSWORD"] == (tmp_path / "mlflow_password").read_text()


def test_up_pins_the_services_and_replicas_to_the_head_unless_a_config_says_where(demo_config: PipelineConfig) -> None:
    from cluster.stack import HEAD_RESOURCE, on_the_head

    pinned = on_the_head(demo_config)
    assert pinned.ray.service_resources == {HEAD_RESOURCE: 0.001} and pinned.serving.resources == {HEAD_RESOURCE: 0.001}
    assert pinned.kafka == demo_config.kafka and pinned.training == demo_config.training  # nothing else
    theirs = replace(demo_config, ray=replace(demo_config.ray, service_resources={"gpu_node": 1}),
                     serving=replace(demo_config.serving, resources={"edge": 0.5}))  # fmt: skip
    kept = on_the_head(theirs)
    assert kept.ray.service_resources == {"gpu_node": 1} and kept.serving.resources == {"edge": 0.5}
