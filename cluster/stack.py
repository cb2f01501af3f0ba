"""`driftloop up` / `driftloop down`: a local stack that stays up in the background.

`up` starts, each as its own process group, and records their process ids in
`<state dir>/state.json`:
- the broker (`driftloop broker`: Tansu on a free loopback port),
- a Ray head (`ray start --head --block`, token auth on, every port of it on 127.0.0.1
  (`--node-ip-address` and `LOOPBACK_ENV`, see `cluster.ray_runtime`; HAProxy's stats and
  Prometheus ports excepted), its own private temp dir so that its jobs find it and no other
  cluster; the head's logs stay there, under `ray_temp_dir` in the state, until `down` removes it),
- an MLflow server (SQLite backend and local artifacts under the state dir, its UI on a
  printed port),
then, for each pipeline (`--config`, once or more), its controller and monitors as detached Ray
actors on that head and its Serve application on 127.0.0.1 (`--serve-port`, default the first
config's `serving.port`), all built by `cluster.pipeline`. The first pipeline is served at
`/v1/...`, and every one at `/<pipeline>/v1/...`. Until a model is promoted
an endpoint answers 503 `no_model`; the first promotion (for example from
`driftloop submit -- python -m jobs.retrain ...`) reaches the replicas on the models topic.

The API key is `DRIFTLOOP_API_KEY` when set, else a new one written to `<state dir>/api_key`
(mode 0600). Ray's token file is made private (0600) too.

`down` stops exactly what `up` recorded, by process group, and nothing else: other Ray
clusters, brokers or MLflow servers on the machine are left alone.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from streams.config import API_KEY_ENV, DATASETS_ROOT_ENV, MLFLOW_PASSWORD_FILE_ENV, PipelineConfig
from streams.errors import DriftloopError

__all__ = ["Stack", "down", "load_state", "up"]

STATE = "state.json"
NAMESPACE = "driftloop"


@dataclass
class Stack:
    """What `up` started: where each part listens and the process group that runs it."""

    state_dir: str
    configs: list[str] = field(default_factory=list)  # each pipeline's config file
    routes: dict[str, str] = field(default_factory=dict)  # pipeline -> its Serve route prefix
    kafka: str = ""
    ray_gcs: str = ""
    ray_jobs: str = ""
    mlflow: str = ""
    ray_temp_dir: str = ""  # short: Ray's socket paths must fit in 107 bytes
    serve: str = ""
    metrics: str = ""  # Ray's metrics endpoint (Prometheus text): the replicas' driftloop_* series
    api_key_file: str = ""  # empty when the key came from DRIFTLOOP_API_KEY
    mlflow_user: str = ""  # the MLflow server's admin (basic auth); its password is in mlflow_password_file
    mlflow_password_file: str = ""
    python: str = ""  # the interpreter `up` ran with: the stack's jobs run with it (`driftloop submit`)
    pids: dict[str, int] = field(default_factory=dict)
    actors: list[str] = field(default_factory=list)
    started_at: float = 0.0

    def env(self) -> dict[str, str]:
        """What a client exports to use the stack (the Ray head's jobs get the same)."""
        env = {"KAFKA_BOOTSTRAP_SERVERS": self.kafka, "RAY_ADDRESS": self.ray_jobs, "MLFLOW_TRACKING_URI": self.mlflow,
               DATASETS_ROOT_ENV: str(Path(self.state_dir) / "datasets")}  # fmt: skip
        if self.mlflow_user:
            env |= {"MLFLOW_TRACKING_USERNAME": self.mlflow_user, MLFLOW_PASSWORD_FILE_ENV: self.mlflow_password_file}
        return env


def load_state(state_dir: Path) -> Stack | None:
    path = state_dir / STATE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        if isinstance(data, dict) and "config" in data:  # a state written before stacks held several pipelines
            config = data.pop("config")
            data.setdefault("configs", [config])
        return Stack(**data)
    except (ValueError, TypeError) as err:
        raise DriftloopError(f"{path} is not a driftloop stack state ({err}); remove it if nothing runs") from None


def alive(pid: int, group: bool = False) -> bool:
    """Whether the process (or, with `group`, any process of the group `pid` leads) still runs."""
    try:
        (os.killpg if group else os.kill)(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it runs, as someone else
        return True
    return True


def _spawn(command: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """`command` in a process group of its own, output to `log` (the child keeps its own copy of the file)."""
    with log.open("ab") as handle:
        return subprocess.Popen(
            command, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True
        )


def _wait(what: str, ready: Callable[[], bool], process: subprocess.Popen[bytes], log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise DriftloopError(f"{what} exited while starting (status {process.returncode}); see {log}")
        try:
            if ready():
                return
        except Exception:  # not answering yet
            pass
        time.sleep(0.5)
    raise DriftloopError(f"{what} did not answer within {timeout_s:.0f}s; see {log}")


def _kafka_answers(bootstrap: str) -> bool:
    from cluster.broker import wait_for_kafka

    wait_for_kafka(bootstrap, timeout_s=2)
    return True


def _jobs_api_answers(address: str) -> bool:
    from ray.job_submission import JobSubmissionClient

    JobSubmissionClient(address).list_jobs()  # with the token: the dashboard answers 401 without
    return True


def _http_ok(url: str) -> bool:
    import requests

    return requests.get(url, timeout=2).status_code == 200


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    import socket

    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def _secret(path: Path) -> str:
    """A new random secret in a file that only this user can read (0600 from its creation)."""
    import secrets

    path.unlink(missing_ok=True)
    value = secrets.token_urlsafe(32)
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as handle:
        handle.write(value)
    return value


def _api_key(state_dir: Path) -> tuple[str, str]:
    """The API key and the file it is in: DRIFTLOOP_API_KEY, else a new key in a private file."""
    if os.environ.get(API_KEY_ENV):
        return os.environ[API_KEY_ENV], ""
    path = state_dir / "api_key"
    return _secret(path), str(path.resolve())


MLFLOW_ADMIN = "driftloop"


def _mlflow_auth(state_dir: Path, password_file: Path) -> dict[str, str]:
    """MLflow's basic-auth app for the stack's server: its config (users in a SQLite store of its
    own; an authenticated user who is not the admin may only read), the admin's password in a 0600
    file, and the environment that hands both to the server (never its command line)."""
    import configparser
    import secrets

    import mlflow.server.auth as auth

    # MLflow adds the admin to its users' store only when missing: one left by an earlier `up` in this
    # state dir keeps that run's password, and every client of this run would get 401. It holds no
    # one else (the stack has the admin only), so each `up` starts it afresh.
    (state_dir / "mlflow-auth.db").unlink(missing_ok=True)
    shipped = configparser.ConfigParser()
    shipped.read(Path(auth.__file__).parent / "basic_auth.ini")
    shipped["mlflow"].update({"default_permission": "READ", "admin_username": MLFLOW_ADMIN,
                              "database_uri": f"sqlite:///{(state_dir / 'mlflow-auth.db').resolve()}"})  # fmt: skip
    shipped["mlflow"].pop("admin_password", None)
    ini = state_dir / "mlflow-auth.ini"
    with ini.open("w") as handle:
        shipped.write(handle)
    return {
        "MLFLOW_AUTH_CONFIG_PATH": str(ini.resolve()),
        "MLFLOW_AUTH_ADMIN_PASSWORD": _secret(password_file),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_urlsafe(32),  # CSRF protection of the UI's forms
    }


def _private_ray_token() -> None:
    """Ray writes its token file world-readable; only its owner should read it."""
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if path.exists():
        path.chmod(0o600)


def up(
    config_paths: list[Path],
    configs: list[PipelineConfig],
    state_dir: Path,
    *,
    num_cpus: int | None = None,
    serve_port: int | None = None,
    say: Callable[[str], None] = print,
) -> Stack:
    """Start the stack (see the module docstring); on any failure, stop what was started."""
    from cluster.broker import free_port
    from cluster.pipeline import route_prefix
    from cluster.ray_runtime import (
        LOOPBACK_ENV,
        LOOPBACK_IP,
        cpus_needed,
        haproxy_ingress,
        private_temp_dir,
        serve_ingress_env,
    )

    haproxy_ingress()  # a bad DRIFTLOOP_SERVE_HAPROXY fails here, before anything starts
    names = [c.name for c in configs]
    if not configs or len(set(names)) < len(names):
        raise DriftloopError(f"one config per pipeline, each with a name of its own: got {names}")
    routes = {name: route_prefix(name, root_free=i == 0) for i, name in enumerate(names)}
    config = configs[0]
    existing = load_state(state_dir)
    if existing is not None and any(alive(p) for p in existing.pids.values()):
        raise DriftloopError(f"a stack is already up from {state_dir} (pids {existing.pids}): `driftloop down` first")
    serve_port = config.serving.port if serve_port is None else serve_port
    if not port_free(serve_port):
        raise DriftloopError(f"port {serve_port} (for Serve) is in use: pass --serve-port with a free one")
    state_dir.mkdir(parents=True, exist_ok=True)
    stack = Stack(state_dir=str(state_dir.resolve()), configs=[str(p.resolve()) for p in config_paths], routes=routes,
                  started_at=time.time(), python=sys.executable)  # fmt: skip
    env = dict(os.environ)
    bin_dir = Path(sys.executable).parent
    try:
        # The broker.
        port = free_port()
        log = state_dir / "broker.log"
        broker = _spawn([sys.executable, "-m", "cluster", "broker", "--port", str(port), "--log-file",
                                   str(state_dir / "tansu.log")], log, env)  # fmt: skip
        stack.pids["broker"] = broker.pid
        stack.kafka = f"127.0.0.1:{port}"
        _wait("the broker", lambda: _kafka_answers(stack.kafka), broker, log, 60)
        say(f"[up] broker      {stack.kafka}")

        # MLflow: SQLite backend, local artifacts, the UI on its port, every request authenticated.
        port = free_port()
        log = state_dir / "mlflow.log"
        password_file = state_dir / "mlflow_password"
        mlflow = _spawn([str(bin_dir / "mlflow"), "server", "--backend-store-uri",
                                   f"sqlite:///{(state_dir / 'mlflow.db').resolve()}", "--artifacts-destination",
                                   str((state_dir / "mlartifacts").resolve()), "--host", "127.0.0.1", "--port",
                                   str(port), "--workers", "1", "--app-name", "basic-auth"], log,
                        {**env, **_mlflow_auth(state_dir, password_file)})  # fmt: skip
        stack.mlflow_user = MLFLOW_ADMIN
        stack.mlflow_password_file = str(password_file.resolve())
        # this process's own MLflow clients too (the Ray head's jobs and actors get stack.env())
        os.environ["MLFLOW_TRACKING_USERNAME"] = MLFLOW_ADMIN
        os.environ[MLFLOW_PASSWORD_FILE_ENV] = stack.mlflow_password_file
        stack.pids["mlflow"] = mlflow.pid
        stack.mlflow = f"http://127.0.0.1:{port}"
        # 300 s: beside two Ray jobs on 2 cores, importing its app took the server over 2 minutes
        _wait("the MLflow server", lambda: _http_ok(f"{stack.mlflow}/health"), mlflow, log, 300)
        say(f"[up] mlflow      {stack.mlflow} (the UI too)")

        # The Ray head: token auth, its own temp dir, every port on loopback (its own and its workers').
        subprocess.run([str(bin_dir / "ray"), "get-auth-token", "--generate"], check=True, capture_output=True)
        _private_ray_token()
        gcs_port, dashboard_port, metrics_port = free_port(), free_port(), free_port()
        ray_env = {**env, **stack.env(), "RAY_AUTH_MODE": "token"}  # its jobs and actors use the stack
        ray_env.pop("RAY_ADDRESS", None)
        log = state_dir / "ray.log"
        stack.ray_temp_dir = temp_dir = private_temp_dir()  # short (socket paths), and only ours to enter
        ray_env.update(serve_ingress_env(temp_dir))
        ray_env.update(LOOPBACK_ENV)  # else Ray swaps 127.0.0.1 for the machine's IP, on every interface
        command = [
            str(bin_dir / "ray"),
            "start",
            "--head",
            "--block",
            f"--node-ip-address={LOOPBACK_IP}",
            f"--port={gcs_port}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard_port}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--metrics-export-port={metrics_port}",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
        ]
        needed = cpus_needed(*configs)
        if num_cpus is None:
            num_cpus = max(os.cpu_count() or 1, needed)  # logical CPUs: a laptop may offer more than it has
        elif num_cpus < needed:
            say(f"[up] warning: {num_cpus} CPUs < the {needed} that Serve and a retraining job hold at once; "
                "retraining will wait for CPUs")  # fmt: skip
        command.append(f"--num-cpus={num_cpus}")
        head = _spawn(command, log, ray_env)
        stack.pids["ray"] = head.pid
        stack.ray_gcs = f"127.0.0.1:{gcs_port}"
        stack.ray_jobs = f"http://127.0.0.1:{dashboard_port}"
        stack.metrics = f"http://127.0.0.1:{metrics_port}/metrics"
        _wait("the Ray head", lambda: _jobs_api_answers(stack.ray_jobs), head, log, 180)
        say(f"[up] ray         {stack.ray_jobs} (Jobs API and dashboard; GCS {stack.ray_gcs})")

        _write(state_dir, stack)
        key, stack.api_key_file = _api_key(state_dir)
        stack.serve = f"http://127.0.0.1:{serve_port}"
        stack.actors = _start_services(stack, configs, key, serve_port)
        _write(state_dir, stack)
        say(f"[up] services    {', '.join(stack.actors)} (detached Ray actors)")
        for name, route in routes.items():
            say(f"[up] serve       {stack.serve}{route.rstrip('/')}/v1/predict ({name}; 503 no_model until a model "
                "is promoted)")  # fmt: skip
    except BaseException:
        _stop(stack, say)
        raise
    return stack


def _start_services(stack: Stack, configs: list[PipelineConfig], api_key: str, serve_port: int) -> list[str]:
    """Each pipeline's controller and monitors as detached actors on the stack's head, then its Serve app
    (`cluster.pipeline`); the names of what started."""
    import dataclasses

    import ray

    from cluster.pipeline import Pipeline
    from cluster.ray_runtime import bind_to_loopback
    from streams.kafka import ensure_topics
    from streams.topics import Topics

    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # `up` prints its own lines
    bind_to_loopback()  # without it this process joins 127.0.0.1:PORT at the machine's IP, and hangs
    ray.init(address=stack.ray_gcs, namespace=NAMESPACE, log_to_driver=False, logging_level=logging.WARNING)
    root = stack.env()[DATASETS_ROOT_ENV]
    pipelines = [
        Pipeline(dataclasses.replace(c.connected_to(stack.kafka, stack.mlflow), datasets=dataclasses.replace(
            c.datasets, root=root)), stack.mlflow, stack.ray_jobs, Path(stack.state_dir) / "jobs", detached=True)
        for c in configs
    ]  # fmt: skip
    started: list[str] = []
    try:
        for pipeline in pipelines:
            ensure_topics(pipeline.config.kafka, Topics.of(pipeline.config).all())
            actors = [pipeline.start_controller(), *pipeline.start_monitors()]
            for actor in actors:
                ray.get(actor.stats.remote(), timeout=120)  # constructed and answering
            started += [pipeline.controller_name, *pipeline.monitor_names]
        for pipeline in pipelines:  # the apps once every pipeline's services run
            pipeline.serve("127.0.0.1", serve_port, prefix=stack.routes[pipeline.config.name], api_key=api_key)
            started.append(f"serve:{pipeline.config.name}")
        return started
    finally:
        ray.shutdown()


def _write(state_dir: Path, stack: Stack) -> None:
    path = state_dir / STATE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(stack), indent=2))
    tmp.replace(path)


def _stop(stack: Stack, say: Callable[[str], None], timeout_s: float = 30.0) -> list[str]:
    """SIGTERM each recorded process group, then SIGKILL what is left; returns what stopped."""
    stopped = []
    for name in ("ray", "mlflow", "broker"):  # the head first: its actors consume from the broker
        pid = stack.pids.get(name)
        if pid is None or not alive(pid):
            continue
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and alive(pid, group=True):
            time.sleep(0.2)
        if alive(pid, group=True):
            os.killpg(pid, signal.SIGKILL)
        stopped.append(name)
        say(f"[down] {name} (process group {pid}) stopped")
        if name == "ray" and stack.ray_temp_dir:
            strays = _stop_strays(stack.ray_temp_dir, timeout_s=5.0)
            if strays:
                say(f"[down] ray: {strays} process(es) outside its group stopped (Serve's HAProxy)")
    return stopped


def _stop_strays(temp_dir: str, timeout_s: float) -> int:
    """Stop what still runs from the Ray head's temp dir once its process group is gone.

    Ray workers run in process groups of their own, and Serve's HAProxy in its manager worker's:
    when the head stops, the workers exit, but HAProxy lives on, holding Serve's port. Its command
    line names its config file in the head's temp dir, as does any other leftover of the head.
    """
    import psutil

    marker = os.path.join(temp_dir, "")
    strays = []
    for process in psutil.process_iter(["cmdline"]):
        if any(marker in arg for arg in process.info["cmdline"] or ()):
            strays.append(process)
    for process in strays:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.terminate()
    _, left = psutil.wait_procs(strays, timeout=timeout_s)
    for process in left:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    return len(strays)


def down(state_dir: Path, say: Callable[[str], None] = print) -> list[str]:
    """Stop what `up` started from `state_dir`; an error when nothing was."""
    stack = load_state(state_dir)
    if stack is None:
        raise DriftloopError(f"no stack state in {state_dir}: nothing was started with `driftloop up` there")
    stopped = _stop(stack, say)
    if stack.ray_temp_dir:  # Ray's logs and sockets: what up created (the private parent, or an older flat one)
        made = Path(stack.ray_temp_dir)
        made = made.parent if made.parent.name.startswith("dl-ray-") else made
        if made.name.startswith("dl-ray-"):
            shutil.rmtree(made, ignore_errors=True)
    (state_dir / STATE).unlink(missing_ok=True)
    return stopped
