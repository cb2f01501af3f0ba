"""Shared fixtures: one real Tansu broker per test session, one topic namespace per test."""

from __future__ import annotations

import dataclasses
import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cluster.broker import EmbeddedBroker, wait_for_kafka
from streams.config import PipelineConfig, load_config
from streams.kafka import ensure_topics
from streams.topics import Topics

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "configs" / "demo.yaml"


@pytest.fixture(scope="session")
def demo_config() -> PipelineConfig:
    """The demo pipeline as shipped (no environment overrides)."""
    return load_config(DEMO, env={})


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Bootstrap address of a real broker: KAFKA_BOOTSTRAP_SERVERS if set, else an embedded Tansu."""
    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if external:
        wait_for_kafka(external)
        yield external
        return
    log_file = tmp_path_factory.mktemp("broker") / "tansu.log"
    with EmbeddedBroker(log_file=log_file) as running:
        yield running.bootstrap


SHARED_RAY = "DRIFTLOOP_TEST_RAY_ADDRESS"  # not RAY_ADDRESS: the CLI subprocesses under test must not inherit it
TEST_CPUS = 4  # logical CPUs of the test Ray: a Serve replica, two trials and two training workers fit at once


def _start_test_ray() -> object:
    """A local Ray head (token auth on, as Ray 2.60 sets it) with the dashboard: the Jobs API."""
    from cluster.broker import free_port
    from cluster.ray_runtime import start_local

    return start_local(num_cpus=TEST_CPUS, include_dashboard=True, dashboard_host="127.0.0.1",
                       dashboard_port=free_port(), log_to_driver=False)  # fmt: skip


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist, the controlling process starts one Ray for all workers.

    An idle Ray head with its dashboard costs ~0.4 of a core here; one per worker was a fifth
    of a 2-core machine. Workers find it through `SHARED_RAY` in the environment they inherit.
    """
    import ray

    from cluster.broker import PICK_PORTS_FROM, PORT_RANGE_ENV

    worker = getattr(config, "workerinput", None)
    if worker is not None:  # each worker (and what it starts) picks ports from a slice of its own
        index, count = int(worker["workerid"].removeprefix("gw")), int(worker["workercount"])
        low, high = PICK_PORTS_FROM
        size = (high - low + 1) // count
        os.environ[PORT_RANGE_ENV] = f"{low + index * size}-{low + (index + 1) * size - 1}"
    if worker is not None or not getattr(config.option, "numprocesses", None):
        return
    if os.environ.get("RAY_ADDRESS") or os.environ.get(SHARED_RAY):
        return
    context: Any = _start_test_ray()
    os.environ[SHARED_RAY] = context.address_info["gcs_address"]
    config.add_cleanup(ray.shutdown)


MULTINODE_FILES = ("tests/test_multinode.py", "tests/test_cluster_loop.py", "tests/test_services.py")
"""The tests of the session's multi-node cluster and its services: one pytest-xdist worker runs them
all, so that the cluster (a head and a worker node) and the services start once, not on each worker."""


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """`--dist loadfile`, with the `MULTINODE_FILES` one unit of work."""
    if config.getoption("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class Scheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return "multinode" if path in MULTINODE_FILES else path

    return Scheduling(config, log)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked `heavy` first: under pytest-xdist they then run beside the rest, not after it."""
    items.sort(key=lambda item: item.get_closest_marker("heavy") is None)


@pytest.fixture(scope="session")
def ray_session() -> Iterator[str]:
    """The session's Ray: RAY_ADDRESS, the one pytest-xdist's controller started, or a new local one."""
    import ray

    address = os.environ.get("RAY_ADDRESS") or os.environ.get(SHARED_RAY)
    context: Any = ray.init(address=address, log_to_driver=False) if address else _start_test_ray()
    yield str(context.dashboard_url)
    ray.shutdown()


@pytest.fixture(scope="session")
def jobs_address(ray_session: str) -> str:
    """The Ray Jobs API of the session's Ray."""
    return f"http://{ray_session}"


@pytest.fixture
def config(demo_config: PipelineConfig, broker: str, request: pytest.FixtureRequest, tmp_path: Path) -> PipelineConfig:
    """The demo config pointed at the session broker, in a namespace of this test's own."""
    name = re.sub(r"[^A-Za-z0-9_-]", "-", request.node.name)[:60]
    kafka = dataclasses.replace(demo_config.kafka, bootstrap_servers=broker)
    datasets = dataclasses.replace(demo_config.datasets, root=str(tmp_path / "datasets"), read_timeout_s=10.0)
    return dataclasses.replace(demo_config, name=f"t-{name}-{uuid.uuid4().hex[:8]}", kafka=kafka, datasets=datasets)


@pytest.fixture
def topics(config: PipelineConfig) -> Topics:
    """This test's topics, created on the broker."""
    names = Topics(config.name)
    ensure_topics(config.kafka, names.all())
    return names


@pytest.fixture(scope="session")
def multinode_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real multi-node Ray cluster: a head and a worker node in namespaces of their own, token auth
    on (a `cluster.netns.NetnsCluster`; how to use it: tests/multinode.py). Root only, else skipped."""
    from tests.multinode import multinode

    with multinode(tmp_path_factory.mktemp("multinode")) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def shared_services(multinode_cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """moto's S3 server, PostgreSQL and an MLflow server on both (a `cluster.services.Services`), listening
    on the multi-node cluster's bridge (`multinode_cluster.host_ip`), so that its nodes reach them: a
    job gets `services.client_env()` (MLflow's URI, the S3 endpoint and keys, the datasets root).
    Root only, as the cluster it sits beside; once per session."""
    from cluster.services import Services

    with Services(tmp_path_factory.mktemp("services"), host=multinode_cluster.host_ip) as services:
        yield services
