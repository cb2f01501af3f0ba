"""Prediction logging: every served prediction to the `predictions` topic, without slowing serving.

Requests append to a bounded buffer and return; a background thread sends batches through the
idempotent producer. When the broker is unreachable the buffer fills, the oldest entries are
dropped and counted, and serving never waits: the counts show in health.
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
from streams.kafka import Producer

__all__ = ["PredictionLog"]

log = logging.getLogger(__name__)


class PredictionLog:
    def __init__(
        self,
        kafka: KafkaSettings | None,
        topic: str,
        capacity: int = 50_000,
        batch: int = 500,
        producer_factory: Callable[[KafkaSettings], Producer] | None = None,
    ) -> None:
        self.kafka = kafka
        self.topic = topic
        self.batch = batch
        self.sent = 0
        self.dropped = 0
        self._buffer: deque[tuple[str, str, str, list[dict[str, Any]], list[dict[str, Any]], Any, Any]] = deque()
        self._rows = 0
        self.capacity = capacity
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._factory = producer_factory or (lambda k: Producer(k, client_id=f"{topic}.serve"))
        self._producer: Producer | None = None
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
                self.dropped += len(dropped[3])

    @property
    def buffered(self) -> int:
        return self._rows

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
        assert self.kafka is not None
        while not self._stop.is_set():
            items = self._take()
            if not items:
                self._stop.wait(0.05)
                continue
            try:
                if self._producer is None:
                    self._producer = self._factory(self.kafka)
                for event in items:
                    self._producer.send_event(self.topic, event)
                self._producer.flush(timeout_s=5)
                self.sent += len(items)
            except (DriftloopError, OSError) as err:
                with self._lock:
                    self.dropped += len(items)
                log.warning("prediction log: %d predictions not logged (%s)", len(items), err)
                self._discard_producer()
                self._stop.wait(1.0)

    def _discard_producer(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            with contextlib.suppress(DriftloopError):
                producer.close(timeout_s=1)

    def close(self, timeout_s: float = 10.0) -> None:
        """Send what is buffered (within `timeout_s`), then stop."""
        deadline = time.monotonic() + timeout_s
        while self.buffered and time.monotonic() < deadline and self._thread.is_alive():
            time.sleep(0.05)
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        self._discard_producer()
