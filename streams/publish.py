"""Publishing the generated stream: records at a rate, delayed labels, optional bad records.

A thin adapter between the pure `StreamGenerator` and a `Producer`; the clock is injected.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

import numpy as np

from streams.events import LabelObserved, deterministic_id
from streams.generator import StreamGenerator, corrupt
from streams.kafka import Producer
from streams.serde import RecordCodec
from streams.topics import Topics

__all__ = ["PublishStats", "publish_stream"]


@dataclass
class PublishStats:
    records: int = 0
    labels: int = 0
    malformed: int = 0
    malformed_kinds: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def publish_stream(
    generator: StreamGenerator,
    producer: Producer,
    topics: Topics,
    pipeline: str,
    count: int,
    *,
    rate: float | None = None,
    label_delay: int | None = None,
    bad_fraction: float = 0.0,
    progress: Callable[[int], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> PublishStats:
    """Send `count` records (at most `rate` per second); labels follow `label_delay` records later.

    Returns once everything is acknowledged by the broker (`Producer.flush`).
    """
    codec = RecordCodec(generator.schema)
    schema = generator.schema
    stats = PublishStats()
    pending: deque[tuple[str, str | int, int]] = deque()
    bad_rng = np.random.default_rng(generator.seed + 1)
    started = clock()

    def send_label(request_id: str, label: str | int, index: int) -> None:
        event = LabelObserved(
            event_id=deterministic_id(pipeline, "label", request_id),
            occurred_at=generator.start_time + generator.interval * (index + (label_delay or 0)),
            request_id=request_id,
            pipeline=pipeline,
            label=label,
        )
        producer.send_event(topics.labels, event)
        stats.labels += 1

    for row in generator.records(count):
        if rate:
            ahead = row.index / rate - (clock() - started)
            if ahead > 0:
                sleep(ahead)
        key = str(row.record[schema.entity_id])
        if bad_fraction and bad_rng.random() < bad_fraction:
            payload, kind = corrupt(row.record, schema, bad_rng)
            stats.malformed += 1
            stats.malformed_kinds[kind] = stats.malformed_kinds.get(kind, 0) + 1
        else:
            payload = codec.encode(row.record)
        producer.send(topics.records, payload, key=key)
        stats.records += 1
        if label_delay is not None:
            pending.append((str(row.record[schema.record_id]), row.label, row.index))
            while pending and pending[0][2] <= row.index - label_delay:
                send_label(*pending.popleft())
        if progress is not None and stats.records % 100 == 0:
            progress(stats.records)
    while pending:
        send_label(*pending.popleft())
    producer.flush()
    if progress is not None:
        progress(stats.records)
    stats.seconds = clock() - started
    return stats


def interval_for(rate: float | None) -> timedelta:
    """Event-time spacing that matches a send rate (10 ms when unthrottled)."""
    return timedelta(seconds=1 / rate) if rate else timedelta(milliseconds=10)
