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
- with `workers=N`, N Ray worker nodes on this machine (`ray start --address`, custom resource
  `worker_node`; the head has `head_node`), as `cluster.netns` lays out a multi-node cluster:
  the head's token auth and loopback, ports of their own, the machine's CPUs split between the
  nodes (`split_cpus`); see `worker_node_argv`,
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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from cluster.pipeline import NAMESPACE
from cluster.processes import spawn, wait_ready
from cluster.ray_runtime import LOOPBACK_IP
from streams.config import API_KEY_ENV, DATASETS_ROOT_ENV, MLFLOW_PASSWORD_FILE_ENV, PipelineConfig
from streams.errors import DriftloopError

__all__ = ["MAX_WORKERS", "Stack", "down", "load_state", "split_cpus", "up", "worker_node_argv"]

STATE = "state.json"
MAX_WORKERS = 8  # worker nodes on one machine: each is a raylet, agents and an object store of its own
HEAD_RESOURCE = "head_node"  # the custom resources `cluster.netns` gives its nodes: pin work with them
WORKER_RESOURCE = "worker_node"
WORKER_PID_PREFIX = "ray-worker-"  # Stack.pids: ray-worker-1, ray-worker-2, ...


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


HEAD_PIN = 0.001  # of the head's one `head_node`: any number of services and replicas fit


def on_the_head(config: PipelineConfig) -> PipelineConfig:
    """`config` with its service actors and Serve replicas pinned to the stack's head (its custom
    resource `head_node`) where the config names no resources of its own: started before the worker
    nodes they land there, and this keeps them there when Ray restarts one, so the workers' CPUs stay
    the pinned jobs'. Pure."""
    pin = {HEAD_RESOURCE: HEAD_PIN}
    ray, serving = config.ray, config.serving
    return replace(
        config,
        ray=ray if ray.service_resources else replace(ray, service_resources=pin),
        serving=serving if serving.resources else replace(serving, resources=pin),
    )


def split_cpus(total: int, workers: int) -> tuple[int, int]:
    """The logical CPUs of the head and of each worker node when one machine's `total` are shared
    out over the head and `workers` worker nodes: evenly, the head keeping what is left. Pure.

    So that the nodes together offer what the machine has, not that many times over (each node
    would otherwise offer every core, and Ray would run that many tasks at once).

    >>> split_cpus(8, 0), split_cpus(8, 3), split_cpus(7, 2)
    ((8, 0), (2, 2), (3, 2))
    """
    if not 0 <= workers <= MAX_WORKERS:
        raise DriftloopError(f"--workers: expected 0 to {MAX_WORKERS} worker nodes, found {workers}")
    if total < workers + 1:
        raise DriftloopError(
            f"--num-cpus {total} cannot be split over the head and {workers} worker node(s): each needs at least 1"
        )
    each = total // (workers + 1) if workers else 0
    return total - workers * each, each


def worker_node_argv(python: str, gcs_address: str, temp_dir: str, num_cpus: int, agent_port: int) -> list[str]:
    """The command line of a worker node that joins the head at `gcs_address` on this machine. Pure.

    `ray start --address ...` run by `_ray_worker_node` (see there for why not `ray` itself), with
    the custom resource `worker_node` to pin work to it, on 127.0.0.1 as the head. No secret: the
    token reaches it in the environment, as it reaches the head. Its temp dir is its own (sockets,
    the runtime env agent's folder), but for its logs (`_share_logs`); the head's log monitor
    reads them there, so the node runs none (each line would come twice).

    Its ports: Ray picks free ones for the node manager, object manager, agents' gRPC, runtime
    env agent, metrics export and workers; the dashboard agent's HTTP port alone has a fixed
    default (52365), on which two nodes would collide, so it is given.

    >>> argv = worker_node_argv("/v/bin/python", "127.0.0.1:6379", "/tmp/dl-ray-x/w1", 2, 40001)
    >>> argv[:5]
    ['/v/bin/python', '-m', 'cluster.stack', 'start', '--block']
    >>> argv[5:]  # doctest: +NORMALIZE_WHITESPACE
    ['--address=127.0.0.1:6379', '--node-ip-address=127.0.0.1', '--num-cpus=2', '--resources={"worker_node": 1}',
     '--temp-dir=/tmp/dl-ray-x/w1', '--include-log-monitor=false', '--dashboard-agent-listen-port=40001',
     '--disable-usage-stats']
    """
    return [
        python,
        "-m",
        "cluster.stack",
        "start",
        "--block",
        f"--address={gcs_address}",
        f"--node-ip-address={LOOPBACK_IP}",
        f"--num-cpus={num_cpus}",
        f"--resources={json.dumps({WORKER_RESOURCE: 1})}",
        f"--temp-dir={temp_dir}",
        "--include-log-monitor=false",
        f"--dashboard-agent-listen-port={agent_port}",
        "--disable-usage-stats",
    ]


def _share_logs(head_temp_dir: str, worker_temp_dir: str) -> None:
    """Make a worker node's log folder the head's, before the node starts (it keeps what exists).

    On one machine every process that joins the cluster does so through the head's raylet (Ray
    prefers the head among the nodes of one host), the worker's dashboard agent too: asked for the
    logs of a job whose entrypoint ran on the worker, it reads the head's log folder, and a worker
    with a log folder of its own gave empty job logs (and `driftloop submit` printed nothing). Ray
    numbers the files of several nodes in one folder (raylet.1.out, ...). The rest of the temp dir
    stays the node's: with all of it shared, the nodes' sockets collided, and the head's runtime
    env agent deleted a job's `working_dir` under its entrypoint on the worker, when the head no
    longer used it ("FileNotFoundError" from the job's first `Path.resolve()`).
    """
    session = Path(head_temp_dir, "session_latest").resolve()  # the cluster's session: the worker joins it
    (Path(worker_temp_dir) / session.name).mkdir(parents=True, exist_ok=True)
    (Path(worker_temp_dir) / session.name / "logs").symlink_to(session / "logs", target_is_directory=True)


def _ray_worker_node(argv: list[str]) -> None:
    """`ray ARGV` (`start --address 127.0.0.1:PORT ...`): a worker node of a head on loopback.

    `ray start --address` itself cannot add one (Ray 2.60, both checked): with `LOOPBACK_ENV` set,
    Ray's switch for single-node clusters, it refuses to add a node; without it, it turns
    127.0.0.1, in the head's address and in the node's own, into the machine's IP, where the
    head does not listen, and waits for the GCS for ever. Here the switch is on for this process
    only, and the machine's IP it would look up is 127.0.0.1. The node's processes (raylet,
    agents, workers) inherit `LOOPBACK_ENV` from the environment and listen on 127.0.0.1 only,
    as the head's do.
    """
    import ray._private.ray_constants as constants
    import ray._private.services as services
    from ray.scripts.scripts import main

    constants.ENABLE_RAY_CLUSTER = True
    services.node_ip_address_from_perspective = lambda address=None: LOOPBACK_IP
    sys.argv = ["ray", *argv]
    main()


def _worker_nodes_alive(jobs_url: str) -> int:
    """How many nodes with the `worker_node` resource the head sees alive (its state API, with the token)."""
    from ray.util.state import list_nodes

    nodes = list_nodes(address=jobs_url, limit=1000, raise_on_missing_output=False)
    return sum(1 for n in nodes if n.state == "ALIVE" and WORKER_RESOURCE in (n.resources_total or {}))


def _wait_workers(processes: dict[str, tuple[subprocess.Popen[bytes], Path]], jobs_url: str, timeout_s: float) -> None:
    """Until the head sees as many worker nodes alive as `processes` holds; an error naming the log of
    one of them that exits first."""
    deadline = time.monotonic() + timeout_s
    seen = 0
    while time.monotonic() < deadline:
        for name, (process, log) in processes.items():
            if process.poll() is not None:
                raise DriftloopError(f"Ray worker node {name} exited while starting (status {process.returncode}); "
                                     f"see {log}")  # fmt: skip
        with contextlib.suppress(Exception):  # the state API not answering for a moment
            seen = _worker_nodes_alive(jobs_url)
        if seen >= len(processes):
            return
        time.sleep(0.5)
    raise DriftloopError(f"{len(processes) - seen} of {len(processes)} Ray worker node(s) not alive within "
                         f"{timeout_s:.0f}s; see {', '.join(str(log) for _, log in processes.values())}")  # fmt: skip


def up(
    config_paths: list[Path],
    configs: list[PipelineConfig],
    state_dir: Path,
    *,
    num_cpus: int | None = None,
    serve_port: int | None = None,
    workers: int = 0,
    say: Callable[[str], None] = print,
) -> Stack:
    """Start the stack (see the module docstring); on any failure, stop what was started.

    `num_cpus` (default: the machine's, and at least what Serve and a retraining job hold at once)
    are the whole cluster's: with `workers`, split between the head and them (`split_cpus`).
    """
    from cluster.broker import free_port
    from cluster.pipeline import route_prefix
    from cluster.ray_runtime import (
        LOOPBACK_ENV,
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
    needed = cpus_needed(*configs)
    if num_cpus is None:  # logical CPUs: a laptop may offer more than it has
        num_cpus = max(os.cpu_count() or 1, needed, workers + 1)
    elif num_cpus < needed:
        say(f"[up] warning: {num_cpus} CPUs < the {needed} that Serve and a retraining job hold at once; "
            "retraining will wait for CPUs")  # fmt: skip
    head_cpus, worker_cpus = split_cpus(num_cpus, workers)
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
        broker = spawn([sys.executable, "-m", "cluster", "broker", "--port", str(port), "--log-file",
                                   str(state_dir / "tansu.log")], log, env)  # fmt: skip
        stack.pids["broker"] = broker.pid
        stack.kafka = f"127.0.0.1:{port}"
        wait_ready("the broker", lambda: _kafka_answers(stack.kafka), broker, log, 60)
        say(f"[up] broker      {stack.kafka}")

        # MLflow: SQLite backend, local artifacts, the UI on its port, every request authenticated.
        port = free_port()
        log = state_dir / "mlflow.log"
        password_file = state_dir / "mlflow_password"
        mlflow = spawn([str(bin_dir / "mlflow"), "server", "--backend-store-uri",
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
        wait_ready("the MLflow server", lambda: _http_ok(f"{stack.mlflow}/health"), mlflow, log, 300)
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
            f"--num-cpus={head_cpus}",
            f"--resources={json.dumps({HEAD_RESOURCE: 1})}",
        ]
        head = spawn(command, log, ray_env)
        stack.pids["ray"] = head.pid
        stack.ray_gcs = f"127.0.0.1:{gcs_port}"
        stack.ray_jobs = f"http://127.0.0.1:{dashboard_port}"
        stack.metrics = f"http://127.0.0.1:{metrics_port}/metrics"
        wait_ready("the Ray head", lambda: _jobs_api_answers(stack.ray_jobs), head, log, 180)
        say(f"[up] ray         {stack.ray_jobs} (Jobs API and dashboard; GCS {stack.ray_gcs}; {head_cpus} CPUs, "
            f"resource {HEAD_RESOURCE})")  # fmt: skip

        _write(state_dir, stack)
        key, stack.api_key_file = _api_key(state_dir)
        stack.serve = f"http://127.0.0.1:{serve_port}"
        stack.actors = _start_services(stack, configs, key, serve_port)
        _write(state_dir, stack)
        say(f"[up] services    {', '.join(stack.actors)} (detached Ray actors)")

        # Worker nodes, once the services run: started while the head was the only node, Serve (its
        # replicas and HAProxy) and the services are on the head, and the workers' CPUs are left to
        # the jobs pinned to them. (Started first, Serve once put its replica on a worker: it took the
        # worker's one CPU, a pinned job's tasks waited for ever, and Serve started a second HAProxy
        # manager there.) Each with the head's environment (token, loopback) and log folder, ports of its own.
        # One after the other: a node names its log files in the shared log folder by the first free
        # number, and two nodes starting at once can take the same one.
        nodes: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
        for i in range(1, workers + 1):
            name, log = f"{WORKER_PID_PREFIX}{i}", state_dir / f"{WORKER_PID_PREFIX}{i}.log"
            node_temp_dir = os.path.join(os.path.dirname(temp_dir), f"w{i}")  # beside the head's, in the 0700 folder
            _share_logs(temp_dir, node_temp_dir)
            argv = worker_node_argv(sys.executable, stack.ray_gcs, node_temp_dir, worker_cpus, free_port())
            nodes[name] = (spawn(argv, log, ray_env), log)
            stack.pids[name] = nodes[name][0].pid
            _write(state_dir, stack)
            _wait_workers(nodes, stack.ray_jobs, 180)
        if nodes:
            say(f"[up] ray workers {workers} node(s) of {worker_cpus} CPUs, resource {WORKER_RESOURCE} "
                f"(`driftloop submit --resource {WORKER_RESOURCE}=1 -- ...` runs there)")  # fmt: skip

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
    import ray

    from cluster.pipeline import Pipeline
    from cluster.ray_runtime import bind_to_loopback

    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # `up` prints its own lines
    bind_to_loopback()  # without it this process joins 127.0.0.1:PORT at the machine's IP, and hangs
    ray.init(address=stack.ray_gcs, namespace=NAMESPACE, log_to_driver=False, logging_level=logging.WARNING)
    root = stack.env()[DATASETS_ROOT_ENV]
    pipelines = [
        Pipeline(replace(on_the_head(c).connected_to(stack.kafka, stack.mlflow), datasets=replace(
            c.datasets, root=root)), stack.mlflow, stack.ray_jobs, Path(stack.state_dir) / "jobs", detached=True)
        for c in configs
    ]  # fmt: skip
    started: list[str] = []
    try:
        for pipeline in pipelines:
            started += pipeline.start_services()
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
    workers = sorted((n for n in stack.pids if n.startswith(WORKER_PID_PREFIX)), key=lambda n: int(n.rsplit("-", 1)[1]))
    # The worker nodes first: on SIGTERM a node drains through the head, and with the head gone it
    # waits for it. The broker last: the head's actors consume from it.
    for name in (*workers, "ray", "mlflow", "broker"):
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
            strays = _stop_strays(_ray_dirs(stack.ray_temp_dir), timeout_s=5.0)
            if strays:
                say(f"[down] ray: {strays} process(es) outside its group stopped (Serve's HAProxy)")
    return stopped


def _ray_dirs(temp_dir: str) -> str:
    """What holds every Ray node's temp dir of a stack: the private `dl-ray-*` folder around the head's
    (its worker nodes' are beside it), or the head's temp dir alone for a stack from before it had one."""
    parent = os.path.dirname(temp_dir.rstrip("/"))
    return parent if os.path.basename(parent).startswith("dl-ray-") else temp_dir


def _stop_strays(temp_dir: str, timeout_s: float) -> int:
    """Stop what still runs from the Ray nodes' temp dirs (under `temp_dir`) once their process groups are gone.

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


if __name__ == "__main__":  # a worker node of `up` (`worker_node_argv`)
    _ray_worker_node(sys.argv[1:])
