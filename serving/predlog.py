"""Prediction logging: every served prediction to the `predictions` topic, without slowing serving.

Requests append to a bounded buffer and return; a background thread builds the events and
hands them to a librdkafka producer (`streams.rdkafka.BulkProducer`), which batches and sends
in its own threads. When the broker is unreachable the buffers fill: the oldest entries are
dropped, records not delivered within `timeout_s` are dropped, and every drop is counted.
Serving never waits: the counts show in health.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from streams.config import KafkaSettings
from streams.errors import DriftloopError
from streams.events import PredictionLogged, utcnow
from streams.rdkafka import BulkProducer
from streams.serde import encode_event

__all__ = ["PredictionLog"]

log = logging.getLogger(__name__)


class PredictionLog:
    def __init__(
        self,
        kafka: KafkaSettings | None,
        topic: str,
        capacity: int = 100_000,
        timeout_s: float = 30.0,
        batch: int = 2000,
        producer_factory: Callable[[KafkaSettings], BulkProducer] | None = None,
    ) -> None:
        self.kafka = kafka
        self.topic = topic
        self.batch = batch
        self._dropped = 0  # buffer overflow and events that could not be handed over
        self._buffer: deque[tuple[str, str, str, list[dict[str, Any]], list[dict[str, Any]], Any, Any]] = deque()
        self._rows = 0
        self.capacity = capacity
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._factory = producer_factory or (
            lambda k: BulkProducer(k, client_id=f"{topic}.serve", max_messages=capacity, timeout_s=timeout_s)
        )
        self._producer: BulkProducer | None = None
        self._retired_sent = 0  # counts of producers replaced after a fatal error
        self._retired_dropped = 0
        self.replaced = 0
        self._thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)
        if kafka is not None:
            self._thread.start()

    def append(
        self,
        pipeline: str,
        model_name: str,
        version: str,
        rows: list[dict[str, Any]],
        predictions: list[dict[str, Any]],
        variant: str = "champion",
    ) -> None:
        """Queue one request's predictions; the events are built off the request path."""
        if self.kafka is None:
            return
        with self._lock:
            self._buffer.append((pipeline, model_name, version, rows, predictions, utcnow(), variant))
            self._rows += len(rows)
            while self._rows > self.capacity and self._buffer:
                dropped = self._buffer.popleft()
                self._rows -= len(dropped[3])
                self._dropped += len(dropped[3])

    @property
    def buffered(self) -> int:
        """Predictions not yet acknowledged by the broker (ours and the producer's queue)."""
        producer = self._producer
        return self._rows + (producer.in_flight if producer is not None else 0)

    @property
    def sent(self) -> int:
        """Predictions the broker acknowledged."""
        producer = self._producer
        return self._retired_sent + (producer.delivered if producer is not None else 0)

    @property
    def dropped(self) -> int:
        producer = self._producer
        current = producer.rejected + producer.failed if producer is not None else 0
        return self._dropped + self._retired_dropped + current

    @property
    def alive(self) -> bool:
        """The log thread runs (health reports it: a dead thread logs nothing)."""
        return self.kafka is None or self._thread.is_alive()

    def _take(self) -> list[PredictionLogged]:
        with self._lock:
            chunks = []
            taken = 0
            while self._buffer and taken < self.batch:
                chunk = self._buffer.popleft()
                self._rows -= len(chunk[3])
                taken += len(chunk[3])
                chunks.append(chunk)
        return [
            PredictionLogged(
                request_id=p["request_id"], occurred_at=when, pipeline=pipeline, model_name=name,
                model_version=version, features=row, prediction=p["prediction"], probabilities=p["probabilities"],
                variant=variant,
            )
            for pipeline, name, version, rows, predictions, when, variant in chunks
            for row, p in zip(rows, predictions, strict=True)
        ]  # fmt: skip

    def _run(self) -> None:
        """Hand buffered predictions to the producer. Nothing ends this loop but `close`: a record
        that cannot be sent is dropped and counted; a producer in librdkafka's fatal state (after
        an outage longer than `timeout_s`) is replaced, what it still held counted as dropped."""
        assert self.kafka is not None
        while not self._stop.is_set():
            if self._producer is None:
                try:
                    self._producer = self._factory(self.kafka)
                except DriftloopError as err:
                    log.warning("prediction log: no producer (%s); retrying in 1s", err)
                    self._stop.wait(1.0)
                    continue
            producer = self._producer
            try:
                if producer.fatal is not None:
                    self._replace(producer)
                    continue
                items = self._take()
                if not items:
                    producer.serve(0.05)
                    continue
                for i, event in enumerate(items):
                    try:
                        producer.produce(self.topic, encode_event(event), event.request_id.encode())
                    except DriftloopError:
                        self._dropped += len(items) - i
                        raise
                    except Exception:  # this event alone (it could not be encoded)
                        log.exception("prediction log: event %s dropped", event.request_id[:64])
                        self._dropped += 1
                producer.serve(0)
            except Exception as err:  # what it dropped is counted above
                log.warning("prediction log: %s; going on", err)
                self._stop.wait(0.2)

    def _replace(self, producer: BulkProducer) -> None:
        log.warning("prediction log: replacing the producer after a fatal error (%s)", producer.fatal)
        with contextlib.suppress(Exception):
            producer.close(0)
        self._retired_sent += producer.delivered
        self._retired_dropped += producer.rejected + producer.failed + producer.in_flight
        self.replaced += 1
        self._producer = None

    def close(self, timeout_s: float = 10.0) -> None:
        """Send what is buffered (within `timeout_s`), then stop."""
        deadline = time.monotonic() + timeout_s
        while self._rows and time.monotonic() < deadline and self._thread.is_alive():
            time.sleep(0.05)
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        if self._producer is not None:
            with contextlib.suppress(DriftloopError):
                self._producer.close(max(0.0, deadline - time.monotonic()))
