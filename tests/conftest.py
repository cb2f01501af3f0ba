"""Shared fixtures: one real Tansu broker per test session, one topic namespace per test."""

from __future__ import annotations

import dataclasses
import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

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


@pytest.fixture(scope="session")
def ray_session() -> Iterator[str]:
    """One local Ray instance (token auth on, as Ray 2.60 sets it) for the whole session."""
    import ray

    from cluster.broker import free_port
    from cluster.ray_runtime import start_local

    start = ray.init if os.environ.get("RAY_ADDRESS") else start_local
    context = start(
        address=os.environ.get("RAY_ADDRESS"),
        num_cpus=None if os.environ.get("RAY_ADDRESS") else 2,
        include_dashboard=True,  # the Ray Jobs API (controller tests)
        dashboard_host="127.0.0.1",
        dashboard_port=free_port(),
        log_to_driver=False,
    )
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
