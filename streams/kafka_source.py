"""Reading exact Kafka offset ranges into Arrow tables, and a Ray Data datasource built on it.

`read_range` reads `[start, end)` of one partition, decodes and validates every record with
the pipeline's codec, sends the bad ones to the DLQ, and returns the good ones as an Arrow
table with the schema's columns plus `topic`, `partition`, `offset` and `timestamp` (the
Kafka record time). It never returns short: a range it cannot read in full (records deleted,
or not there before the timeout) raises `IncompleteRead` naming the partition and offsets.

`KafkaRangeDatasource` (`streams.kafka_datasource`) splits ranges into read tasks of at most
`max_records_per_task` records and serves them to `ray.data.read_datasource`.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
from kafka import KafkaConsumer, TopicPartition
from kafka.errors import OffsetOutOfRangeError

from streams.config import KafkaSettings, RecordSchema, field_key
from streams.errors import BrokerError, DecodeError, IncompleteRead
from streams.events import OffsetRange
from streams.kafka import Producer, dead_letter, new_consumer
from streams.serde import RecordCodec

__all__ = [
    "METADATA_COLUMNS",
    "RangeRead",
    "arrow_schema",
    "fetch_high_watermarks",
    "high_watermarks",
    "poll_range",
    "read_range",
    "read_tail",
    "split_ranges",
    "to_table",
]

METADATA_COLUMNS = (
    ("topic", pa.string()),
    ("partition", pa.int32()),
    ("offset", pa.int64()),
    ("timestamp", pa.timestamp("ms", tz="UTC")),
)


def arrow_schema(schema: RecordSchema) -> pa.Schema:
    """The Arrow schema of a decoded record batch: the record's columns, then Kafka metadata."""
    label_type = pa.int64() if isinstance(schema.label.classes[0], int) else pa.string()
    fields = []
    if schema.record_id is not None:
        fields.append(pa.field(schema.record_id, pa.string(), nullable=False))
    if schema.entity_id is not None:
        fields.append(pa.field(schema.entity_id, pa.string(), nullable=False))
    if schema.timestamp is not None:
        fields.append(pa.field(schema.timestamp, pa.timestamp("us", tz="UTC"), nullable=False))
    types = {"float": pa.float64(), "int": pa.int64(), "bool": pa.bool_(), "category": pa.string()}
    fields += [pa.field(f.name, types[f.type], nullable=f.nullable) for f in schema.features]
    fields.append(pa.field(schema.label.name, label_type, nullable=True))
    fields += [pa.field(name, tp, nullable=False) for name, tp in METADATA_COLUMNS]
    return pa.schema(fields)


def to_table(
    schema: RecordSchema, arrow: pa.Schema, topic: str, partition: int, records: list[Any], values: list[Any]
) -> pa.Table:
    """Decoded records (and their Kafka records) as one Arrow table of `arrow` schema."""
    columns: list[Any] = []
    for name in schema.columns:
        key = field_key(name)
        column = [getattr(v, key) for v in values]
        if name == schema.entity_id:
            column = [str(c) for c in column]
        columns.append(column)
    columns += [
        [topic] * len(records),
        [partition] * len(records),
        [r.offset for r in records],
        [r.timestamp for r in records],
    ]
    return pa.Table.from_arrays([pa.array(c, type=f.type) for c, f in zip(columns, arrow, strict=True)], schema=arrow)


@dataclass
class RangeRead:
    """What reading one range gave: the valid rows, and how many records were rejected and why."""

    range: OffsetRange
    table: pa.Table
    invalid: dict[str, int] = field(default_factory=dict)

    @property
    def invalid_rows(self) -> int:
        return sum(self.invalid.values())


def _consumer(kafka: KafkaSettings) -> KafkaConsumer:
    # a deleted offset is an error, never a silent jump
    return new_consumer(kafka, group_id=None, auto_offset_reset="none")


def read_range(
    kafka: KafkaSettings,
    span: OffsetRange,
    schema: RecordSchema,
    *,
    dlq_topic: str | None,
    timeout_s: float,
    producer: Producer | None = None,
) -> RangeRead:
    """Read exactly `[span.start, span.end)` of one partition (see the module docstring)."""
    codec = RecordCodec(schema, kafka.max_record_bytes)
    arrow = arrow_schema(schema)
    tables: list[pa.Table] = []
    bad: list[tuple[Any, DecodeError]] = []

    def convert(records: list[Any]) -> None:
        # Decode each poll's records into Arrow at once: the Python objects are dropped early.
        results = codec.decode_batch([r.value for r in records])
        good_records, good_values = [], []
        for record, result in zip(records, results, strict=True):
            if isinstance(result, DecodeError):
                bad.append((record, result))
            else:
                good_records.append(record)
                good_values.append(result)
        tables.append(to_table(schema, arrow, span.topic, span.partition, good_records, good_values))

    for records in poll_range(kafka, span, timeout_s):
        convert(records)

    if bad:
        if dlq_topic is None:
            raise BrokerError(f"{len(bad)} records in {span} failed to decode and no DLQ topic was given")
        own = producer is None
        sink = producer or Producer(kafka, client_id="driftloop-ingest-dlq")
        try:
            dead_letter(sink, dlq_topic, bad)
        finally:
            if own:
                sink.close()
    table = pa.concat_tables(tables).combine_chunks() if tables else arrow.empty_table()
    return RangeRead(span, table, dict(Counter(err.kind.value for _, err in bad)))


def poll_range(kafka: KafkaSettings, span: OffsetRange, timeout_s: float) -> Iterator[list[Any]]:
    """The raw records of `[span.start, span.end)` of one partition, a poll's worth at a time; an
    `IncompleteRead` names the offsets that are not there (not yet written, or deleted)."""
    tp = TopicPartition(span.topic, span.partition)
    consumer = _consumer(kafka)
    try:
        consumer.assign([tp])
        consumer.seek(tp, span.start)
        deadline = time.monotonic() + timeout_s
        position = span.start
        while position < span.end:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                high = consumer.highwater(tp)
                raise IncompleteRead(
                    f"{span.topic} partition {span.partition}: read offsets [{span.start}, {position}) of "
                    f"[{span.start}, {span.end}) within {timeout_s:g}s; offsets {position}..{span.end - 1} "
                    f"are not available (high watermark {high})"
                )
            try:
                polled = consumer.poll(timeout_ms=min(500, max(int(remaining * 1000), 1)))
            except OffsetOutOfRangeError:
                raise IncompleteRead(
                    f"{span.topic} partition {span.partition}: offsets from {position} in "
                    f"[{span.start}, {span.end}) are gone (deleted by retention or never written)"
                ) from None
            for batch in polled.values():
                wanted = [r for r in batch if r.offset < span.end]
                if wanted:
                    yield wanted
            position = consumer.position(tp)
    finally:
        consumer.close()


def high_watermarks(kafka: KafkaSettings, topic: str, timeout_s: float = 10.0) -> dict[int, int]:
    """The next offset to be written, per partition, from fetch responses.

    `end_offsets` (ListOffsets) is not trusted: Tansu 0.6 answers the base offset of the last
    batch plus one there (DESIGN.md). A fetch response's high watermark is right.
    """
    consumer = _consumer(kafka)
    try:
        deadline = time.monotonic() + timeout_s
        partitions = consumer.partitions_for_topic(topic)
        while not partitions:
            if time.monotonic() > deadline:
                raise BrokerError(f"topic {topic!r} does not exist on {kafka.bootstrap_servers}")
            time.sleep(0.1)
            partitions = consumer.partitions_for_topic(topic)
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        found = fetch_high_watermarks(consumer, tps, max(deadline - time.monotonic(), 0.0))
        return {tp.partition: end for tp, end in found.items()}
    finally:
        consumer.close()


def fetch_high_watermarks(consumer: Any, tps: list[TopicPartition], timeout_s: float) -> dict[TopicPartition, int]:
    """The high watermark of each of `tps`, from fetch responses, with `consumer` (it is reassigned)."""
    consumer.assign(tps)
    starts, ends = consumer.beginning_offsets(tps), consumer.end_offsets(tps)
    for tp in tps:
        # Fetching from the (under-reported) ListOffsets end returns the true high watermark.
        consumer.seek(tp, max(ends[tp] - 1, starts[tp]))
    deadline = time.monotonic() + timeout_s
    while any(consumer.highwater(tp) is None for tp in tps):
        if time.monotonic() > deadline:
            missing = [f"{tp.topic}/{tp.partition}" for tp in tps if consumer.highwater(tp) is None]
            raise BrokerError(f"no high watermark for {', '.join(missing)} within {timeout_s:g}s")
        consumer.poll(timeout_ms=200, max_records=1)
    return {tp: int(consumer.highwater(tp)) for tp in tps}


def read_tail(kafka: KafkaSettings, topic: str, last: int, timeout_s: float = 10.0) -> list[Any]:
    """The last `last` records of each partition of `topic` (kafka-python records: `.value`,
    `.timestamp` in ms), oldest first per partition; [] when the topic does not exist.

    All of them or `IncompleteRead`: a read cut short by `timeout_s` would lack the newest
    records, and its readers want those most (status's heartbeats, the monitor's last state)."""
    consumer = _consumer(kafka)
    try:
        if topic not in consumer.topics():
            return []
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        ends = fetch_high_watermarks(consumer, tps, timeout_s)
        starts = consumer.beginning_offsets(tps)
        for tp in tps:
            consumer.seek(tp, max(starts[tp], ends[tp] - last))
        out: list[Any] = []
        deadline = time.monotonic() + timeout_s
        while any(consumer.position(tp) < ends[tp] for tp in tps) and time.monotonic() < deadline:
            for tp, records in consumer.poll(timeout_ms=200).items():
                out.extend(r for r in records if r.offset < ends[tp])
        short = {f"{tp.partition}": (consumer.position(tp), ends[tp]) for tp in tps if consumer.position(tp) < ends[tp]}
        if short:
            raise IncompleteRead(
                f"{topic}: the tail was not read within {timeout_s:g}s (at, end per partition: {short})"
            )
        return out
    finally:
        consumer.close()


def split_ranges(ranges: Iterable[OffsetRange], max_records: int) -> list[OffsetRange]:
    """Split each range into consecutive pieces of at most `max_records` offsets."""
    pieces = []
    for span in ranges:
        for start in range(span.start, span.end, max_records):
            pieces.append(
                OffsetRange(
                    topic=span.topic, partition=span.partition, start=start, end=min(start + max_records, span.end)
                )
            )
    return pieces


def __getattr__(name: str) -> Any:
    """`KafkaRangeDatasource` lives apart: it imports Ray Data, which most readers never need."""
    if name == "KafkaRangeDatasource":
        from streams.kafka_datasource import KafkaRangeDatasource

        return KafkaRangeDatasource
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
