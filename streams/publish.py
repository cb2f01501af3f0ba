"""Publishing a stream: the generated one (records at a rate, delayed labels, optional bad
records), or a user's file (`publish_file`).

Thin adapters between the pure sources (`StreamGenerator`, `streams.files.file_records`) and a
`Producer`; the clock is injected.
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import numpy as np

from streams.coerce import coerce_record
from streams.config import RecordSchema
from streams.errors import BrokerError, DecodeError
from streams.events import LabelObserved, deterministic_id, request_id_of, utcnow
from streams.generator import StreamGenerator, corrupt
from streams.kafka import Producer, dead_letter
from streams.rdkafka import BulkProducer
from streams.serde import RecordCodec
from streams.topics import Topics

__all__ = ["FileRow", "PublishStats", "publish_file", "publish_stream"]


@dataclass
class PublishStats:
    records: int = 0
    labels: int = 0
    malformed: int = 0
    malformed_kinds: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    rejected: list[tuple[int, DecodeError]] = field(default_factory=list)  # (row, why): file rows sent to the DLQ


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
    pending: deque[tuple[str, Any, int]] = deque()
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
        key = row.key(schema)
        if bad_fraction and bad_rng.random() < bad_fraction:
            payload, kind = corrupt(row.record, schema, bad_rng)
            stats.malformed += 1
            stats.malformed_kinds[kind] = stats.malformed_kinds.get(kind, 0) + 1
        else:
            payload = codec.encode(row.record)
        producer.send(topics.records, payload, key=key)
        stats.records += 1
        if label_delay is not None:
            pending.append((row.id, row.label, row.index))
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


@dataclass(frozen=True)
class FileRow:
    """A file's row as the DLQ writes it: where it came from (the file and row) and its JSON."""

    topic: str  # "file:<path>": the DLQ's source header names the file and the row
    offset: int
    value: bytes
    partition: int = 0
    key: bytes | None = None
    headers: tuple[tuple[str, bytes], ...] = ()


def publish_file(
    rows: Iterable[tuple[int, dict[str, Any]]],
    schema: RecordSchema,
    producer: Producer,
    topics: Topics,
    pipeline: str,
    source: str,
    *,
    rate: float | None = None,
    label_delay: int | None = None,
    limit: int | None = None,
    progress: Callable[[int], None] | None = None,
    bulk: BulkProducer | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> PublishStats:
    """Send a file's rows as records (at most `rate` per second; labels `label_delay` rows later).

    A label names its row by the row's record id, or, where the file has none (or one that is not a
    valid request id), by `streams.events.row_id`: `<file name>:<row>`, as `run --from` names its
    requests.

    A row the codec refuses as it is is converted losslessly (`streams.coerce.coerce_record`)
    and tried again.

    A row its schema refuses goes to the DLQ as JSON, with the reason and `file:<path>/0/<row>` as
    its source, and is counted in `stats.rejected`: nothing is lost, and one bad row does not stop
    the rest. With `bulk` (librdkafka, several times kafka-python's rate) the records go through it,
    waiting while its queue is full; labels and DLQ copies go through `producer`. Returns once
    everything is acknowledged, or raises `BrokerError` saying how many records were not.
    """
    codec = RecordCodec(schema)
    stats = PublishStats()
    pending: deque[tuple[str, Any, int]] = deque()
    dead: list[tuple[FileRow, DecodeError]] = []
    block_s = producer.max_block_s
    started = clock()
    label_name = schema.label.name

    def send_labels(upto: int) -> None:
        while pending and pending[0][2] <= upto:
            request_id, label, _ = pending.popleft()
            event = LabelObserved(
                event_id=deterministic_id(pipeline, "label", request_id),
                occurred_at=utcnow(),
                request_id=request_id,
                pipeline=pipeline,
                label=label,
            )
            producer.send_event(topics.labels, event)
            stats.labels += 1

    for index, record in rows:
        if limit is not None and stats.records + len(stats.rejected) >= limit:
            break
        if rate:
            ahead = (stats.records + len(stats.rejected)) / rate - (clock() - started)
            if ahead > 0:
                sleep(ahead)
        try:
            try:
                payload = codec.encode(record)  # the fast path: the row has the schema's types already
            except DecodeError:
                record = coerce_record(schema, record)
                payload = codec.encode(record)
        except DecodeError as err:
            text = json.dumps(record, default=str, ensure_ascii=False).encode()
            dead.append((FileRow(topic=f"file:{source}", offset=index, value=text), err))
            stats.rejected.append((index, err))
            if len(dead) >= 500:
                dead_letter(producer, topics.dlq, dead)
                dead.clear()
            continue
        ident = str(record[schema.record_id]) if schema.record_id and schema.record_id in record else None
        entity = record.get(schema.entity_id) if schema.entity_id else None
        key = str(entity) if entity is not None else ident
        if bulk is not None:
            bulk.send(topics.records, payload, key.encode() if key is not None else None, max_block_s=block_s)
        else:
            producer.send(topics.records, payload, key=key)
        stats.records += 1
        if label_delay is not None and record.get(label_name) is not None:
            pending.append((request_id_of(ident, source, index), record[label_name], index))
            send_labels(index - label_delay)
        if progress is not None and stats.records % 100 == 0:
            progress(stats.records)
    if dead:
        dead_letter(producer, topics.dlq, dead)
    send_labels(1 << 62)
    producer.flush()
    if bulk is not None:
        left = bulk.flush(producer.delivery_timeout_s)
        if left or bulk.failed:
            raise BrokerError(
                f"{left + bulk.failed} of {stats.records} records to {topics.records} were not acknowledged "
                "(the broker's log says why)"
            )
    if progress is not None:
        progress(stats.records)
    stats.seconds = clock() - started
    return stats
