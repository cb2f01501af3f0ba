"""The prediction log against a real broker: it survives what one bad event or a long outage does."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cluster.broker import EmbeddedBroker
from serving.predlog import PredictionLog
from streams.config import KafkaSettings, PipelineConfig
from streams.kafka import ensure_topics

pytestmark = pytest.mark.integration


def wait_for(condition: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def log_rows(log: PredictionLog, count: int, start: int = 0, value: str = "x") -> None:
    rows = [{"plan": value} for _ in range(count)]
    predictions = [
        {"request_id": f"r{start + i}", "prediction": "yes", "probabilities": {"yes": 1.0}} for i in range(count)
    ]
    log.append("p", "p", "1", rows, predictions)


@pytest.fixture
def own_broker(tmp_path: Path, demo_config: PipelineConfig) -> Iterator[tuple[EmbeddedBroker, KafkaSettings]]:
    """A broker of this test's own (the test pauses it)."""
    import dataclasses

    with EmbeddedBroker(log_file=tmp_path / "tansu.log") as broker:
        kafka = dataclasses.replace(demo_config.kafka, bootstrap_servers=broker.bootstrap, partitions=1)
        ensure_topics(kafka, ["p.predictions"])
        yield broker, kafka


def test_an_event_that_cannot_be_sent_is_counted_and_the_log_goes_on(
    own_broker: tuple[EmbeddedBroker, KafkaSettings],
) -> None:
    _, kafka = own_broker
    log = PredictionLog(kafka, "p.predictions", timeout_s=10)
    try:
        log_rows(log, 5)
        assert wait_for(lambda: log.sent == 5, 30), (log.sent, log.dropped)
        log_rows(log, 1, start=5, value="v" * 3_000_000)  # over the producer's 2 MB message limit
        log_rows(log, 5, start=6)
        assert wait_for(lambda: log.sent == 10, 30), (log.sent, log.dropped)
        assert log.dropped == 1 and log.alive
    finally:
        log.close()


def test_logging_resumes_after_an_outage_longer_than_the_delivery_timeout(
    own_broker: tuple[EmbeddedBroker, KafkaSettings],
) -> None:
    broker, kafka = own_broker
    assert broker.process is not None
    log = PredictionLog(kafka, "p.predictions", timeout_s=3)
    try:
        log_rows(log, 5)
        assert wait_for(lambda: log.sent == 5, 30)
        os.kill(broker.process.pid, signal.SIGSTOP)  # the broker stops answering (its data stays)
        try:
            for i in range(10):
                log_rows(log, 10, start=100 + 10 * i)
                time.sleep(1.0)  # 10 s: over three times the delivery timeout
        finally:
            os.kill(broker.process.pid, signal.SIGCONT)
        assert wait_for(lambda: log.buffered == 0, 30)
        lost = log.dropped
        assert log.sent + lost == 105  # every prediction either logged or counted as dropped
        log_rows(log, 20, start=1000)
        assert wait_for(lambda: log.sent + lost == 125 and log.buffered == 0, 30), (log.sent, log.dropped)
        assert log.dropped == lost and log.alive  # after the broker's return, nothing more is lost
    finally:
        log.close()
