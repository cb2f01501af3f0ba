"""The stream layer against the real broker: topics, producer, consumer loop, DLQ, retries, commits."""

from __future__ import annotations

import dataclasses
import json

import pytest
from kafka import KafkaConsumer, TopicPartition

from cluster.broker import EmbeddedBroker
from streams.config import PipelineConfig
from streams.errors import BrokerError, ErrorKind, HandlerFailed, RetryableError
from streams.events import Event
from streams.generator import StreamGenerator
from streams.kafka import Batch, Producer, StreamConsumer, client_options, ensure_topics
from streams.serde import RecordCodec, decode_events
from streams.topics import Topics
from tests.test_serde import GOOD, sample_events

pytestmark = pytest.mark.integration


def committed(config: PipelineConfig, topic: str, group: str) -> dict[int, int | None]:
    """The group's committed offset per partition, read back from the broker."""
    consumer = KafkaConsumer(**client_options(config.kafka), group_id=group, enable_auto_commit=False)
    try:
        return {p: consumer.committed(TopicPartition(topic, p)) for p in range(config.kafka.partitions)}
    finally:
        consumer.close()


def read_all(config: PipelineConfig, topic: str, expected: int) -> list[object]:
    """Every raw ConsumerRecord on `topic` (no decoding), waiting until `expected` arrived."""
    records: list[object] = []

    def keep(batch: Batch) -> None:
        records.extend(r for c in batch.chunks for r in c.records)

    consumer = StreamConsumer(config.kafka, [topic], list, keep, group_id=None, dlq_topic=None)
    consumer.run(max_records=expected, idle_timeout_s=10)
    return records


def produce(config: PipelineConfig, topic: str, payloads: list[bytes], partition_key: bool = True) -> None:
    with Producer(config.kafka) as producer:
        for i, payload in enumerate(payloads):
            producer.send(topic, payload, key=f"k{i % 7}" if partition_key else None)


def test_ensure_topics_is_idempotent(config: PipelineConfig) -> None:
    topics = Topics(config.name)
    first = ensure_topics(config.kafka, topics.all())
    second = ensure_topics(config.kafka, topics.all())
    assert sorted(first) == sorted(topics.all())
    assert second == []
    consumer = KafkaConsumer(**client_options(config.kafka))
    try:
        assert consumer.partitions_for_topic(topics.records) == set(range(config.kafka.partitions))
    finally:
        consumer.close()


def test_an_existing_topic_with_other_partitions_is_reported(
    config: PipelineConfig, caplog: pytest.LogCaptureFixture
) -> None:
    name = f"{config.name}.odd"
    assert ensure_topics(config.kafka, [name], partitions=2) == [name]
    with caplog.at_level("WARNING", logger="streams.kafka"):
        assert ensure_topics(config.kafka, [name]) == []
    assert f"topic {name} has 2 partitions, the config asks for 4" in caplog.text


def test_every_event_type_round_trips_through_the_broker(config: PipelineConfig, topics: Topics) -> None:
    events = sample_events()
    with Producer(config.kafka) as producer:
        for event in events:
            producer.send_event(topics.models, event)
    got: list[Event] = []
    consumer = StreamConsumer(
        config.kafka,
        [topics.models],
        decode_events,
        lambda batch: got.extend(batch.values),
        group_id=None,
        dlq_topic=topics.dlq,
    )
    consumer.run(max_records=len(events), idle_timeout_s=10)
    assert sorted(got, key=lambda e: e.event_id) == sorted(events, key=lambda e: e.event_id)


def malformed_payloads() -> dict[str, bytes]:
    """One payload for each way a record can be bad, keyed by the ErrorKind it must get."""

    def changed(**kw: object) -> bytes:
        return json.dumps({**GOOD, **kw}).encode()

    return {
        "wrong_type": changed(tenure_months="twelve"),
        "missing_field": json.dumps({k: v for k, v in GOOD.items() if k != "plan"}).encode(),
        "unknown_field": changed(colour="red"),
        "out_of_range": changed(monthly_charges=10_000),
        "non_finite": changed(monthly_charges=float("nan")),
        "unknown_category": changed(plan="platinum"),
        "invalid_json": b'{"record_id": ',
        "invalid_utf8": changed(region="XX").replace(b"XX", b"\xff\xfe"),
        "oversized": changed(record_id="r" * 2_000_000),
    }


def test_malformed_records_go_to_the_dlq_and_the_good_ones_around_them_are_processed(
    config: PipelineConfig, topics: Topics
) -> None:
    codec = RecordCodec(config.schema, config.kafka.max_record_bytes)
    bad = malformed_payloads()
    payloads: list[bytes] = []
    for i, kind_payload in enumerate(bad.values()):
        payloads += [codec.encode({**GOOD, "record_id": f"good-{i}-{j}"}) for j in range(5)]
        payloads.append(kind_payload)
    produce(config, topics.records, payloads, partition_key=False)
    seen: list[str] = []
    consumer = StreamConsumer(
        config.kafka,
        [topics.records],
        codec.decode_batch,
        lambda batch: seen.extend(v.record_id for v in batch.values),
        group_id=f"{config.name}.g",
        dlq_topic=topics.dlq,
    )
    stats = consumer.run(max_records=len(payloads), idle_timeout_s=10)

    assert sorted(seen) == sorted(f"good-{i}-{j}" for i in range(len(bad)) for j in range(5))
    assert (stats.processed, stats.dead_lettered) == (len(payloads) - len(bad), len(bad))
    dead = read_all(config, topics.dlq, len(bad))
    by_kind = {dict(r.headers)["driftloop.error"].decode(): r for r in dead}  # type: ignore[attr-defined]
    assert set(by_kind) == set(bad)
    for kind, payload in bad.items():
        record = by_kind[kind]
        headers = dict(record.headers)  # type: ignore[attr-defined]
        assert record.value == payload, kind  # type: ignore[attr-defined]
        assert ErrorKind(kind).value in headers["driftloop.error"].decode()
        assert headers["driftloop.reason"]
        topic, partition, offset = headers["driftloop.source"].decode().rsplit("/", 2)
        assert topic == topics.records and int(partition) >= 0 and int(offset) >= 0
    # every record, good or bad, is accounted for, and the group committed to the end
    ends = committed(config, topics.records, f"{config.name}.g")
    assert sum(o or 0 for o in ends.values()) == len(payloads)


def test_transient_handler_errors_are_retried_then_committed(config: PipelineConfig, topics: Topics) -> None:
    codec = RecordCodec(config.schema)
    produce(config, topics.records, [codec.encode({**GOOD, "record_id": f"r{i}"}) for i in range(50)])
    failures = iter([RetryableError("db busy"), ConnectionError("reset")])
    handled: list[str] = []

    def flaky(batch: Batch) -> None:
        error = next(failures, None)
        if error is not None:
            raise error
        handled.extend(v.record_id for v in batch.values)

    kafka = dataclasses.replace(config.kafka, consumer=dataclasses.replace(config.kafka.consumer, retry_backoff_ms=1))
    consumer = StreamConsumer(
        kafka, [topics.records], codec.decode_batch, flaky, group_id=f"{config.name}.g", dlq_topic=topics.dlq
    )
    stats = consumer.run(max_records=50, idle_timeout_s=10)
    assert stats.retries == 2
    assert sorted(handled) == sorted(f"r{i}" for i in range(50))
    assert sum(o or 0 for o in committed(config, topics.records, f"{config.name}.g").values()) == 50


def test_a_handler_that_keeps_failing_stops_the_consumer_without_committing(
    config: PipelineConfig, topics: Topics
) -> None:
    codec = RecordCodec(config.schema)
    produce(config, topics.records, [codec.encode({**GOOD, "record_id": f"r{i}"}) for i in range(20)])
    calls = 0

    def broken(batch: Batch) -> None:
        nonlocal calls
        calls += 1
        raise RetryableError("still down")

    kafka = dataclasses.replace(
        config.kafka, consumer=dataclasses.replace(config.kafka.consumer, retry_backoff_ms=1, handler_retries=2)
    )
    consumer = StreamConsumer(
        kafka, [topics.records], codec.decode_batch, broken, group_id=f"{config.name}.g", dlq_topic=topics.dlq
    )
    with pytest.raises(HandlerFailed, match="failed 3 times"):
        consumer.run(idle_timeout_s=10)
    assert calls == 3
    assert set(committed(config, topics.records, f"{config.name}.g").values()) == {None}


def test_a_bug_in_the_handler_is_not_retried_and_nothing_past_it_is_committed(
    config: PipelineConfig, topics: Topics
) -> None:
    codec = RecordCodec(config.schema)
    kafka = dataclasses.replace(config.kafka, consumer=dataclasses.replace(config.kafka.consumer, max_poll_records=10))
    config = dataclasses.replace(config, kafka=kafka)
    with Producer(config.kafka) as producer:  # one partition, so batches are predictable
        for i in range(40):
            producer.send(topics.records, codec.encode({**GOOD, "record_id": f"r{i}"}), key="same")
    batches = 0

    def second_batch_fails(batch: Batch) -> None:
        nonlocal batches
        batches += 1
        if batches == 2:
            raise KeyError("bug")

    consumer = StreamConsumer(
        kafka, [topics.records], codec.decode_batch, second_batch_fails, group_id=f"{config.name}.g", dlq_topic=None
    )
    with pytest.raises(KeyError):
        consumer.run(idle_timeout_s=10)
    assert batches == 2
    offsets = committed(config, topics.records, f"{config.name}.g")
    assert sorted(o for o in offsets.values() if o is not None) == [10]  # the first batch, not the failed one


def test_consumer_without_dlq_refuses_to_skip_bad_records(config: PipelineConfig, topics: Topics) -> None:
    codec = RecordCodec(config.schema)
    produce(config, topics.records, [b"garbage"])
    consumer = StreamConsumer(
        config.kafka, [topics.records], codec.decode_batch, lambda b: None, group_id=f"{config.name}.g", dlq_topic=None
    )
    with pytest.raises(BrokerError, match="no DLQ topic"):
        consumer.run(idle_timeout_s=10)
    assert set(committed(config, topics.records, f"{config.name}.g").values()) == {None}


def test_producer_buffer_is_bounded_when_the_broker_is_gone(config: PipelineConfig, tmp_path: object) -> None:
    with EmbeddedBroker() as own:
        kafka = dataclasses.replace(
            config.kafka,
            bootstrap_servers=own.bootstrap,
            producer=dataclasses.replace(config.kafka.producer, buffer_bytes=20_000, max_block_ms=1000),
        )
        ensure_topics(kafka, ["t.records"])
        producer = Producer(kafka)
        producer.send("t.records", b"x" * 100)
        producer.flush()
        own.stop()
        with pytest.raises(BrokerError, match="producer buffer full"):
            for _ in range(1000):
                producer.send("t.records", b"x" * 1000)
        assert producer.sent < 30  # it stopped accepting near the 20 kB bound, not after 1000 sends
        with pytest.raises(BrokerError):
            producer.close(timeout_s=2)


def test_generated_stream_survives_a_trip_through_kafka(config: PipelineConfig, topics: Topics) -> None:
    codec = RecordCodec(config.schema)
    rows = list(StreamGenerator(config, seed=4, drift_at=100).records(300))
    produce(config, topics.records, [codec.encode(r.record) for r in rows])
    got: dict[str, object] = {}
    consumer = StreamConsumer(
        config.kafka,
        [topics.records],
        codec.decode_batch,
        lambda b: got.update({v.record_id: codec.to_dict(v) for v in b.values}),
        group_id=None,
        dlq_topic=topics.dlq,
    )
    consumer.run(max_records=300, idle_timeout_s=10)
    assert len(got) == 300
    first = codec.decode(codec.encode(rows[0].record))
    assert got[rows[0].record["record_id"]] == codec.to_dict(first)


def test_a_record_too_big_to_copy_goes_to_the_dlq_truncated_and_the_consumer_goes_on(
    config: PipelineConfig, topics: Topics
) -> None:
    """A poison pill (3 MB, past the DLQ producer's 2 MB request limit) must not stop the loop."""
    import hashlib

    from kafka import KafkaProducer

    codec = RecordCodec(config.schema, config.kafka.max_record_bytes)
    huge = json.dumps({**GOOD, "record_id": "x" * 3_000_000}).encode()
    big = KafkaProducer(**client_options(config.kafka), max_request_size=8 * 1024 * 1024)
    try:
        for payload in (
            codec.encode({**GOOD, "record_id": "before"}),
            huge,
            codec.encode({**GOOD, "record_id": "after"}),
        ):
            big.send(topics.records, payload, partition=0)
        big.flush()
    finally:
        big.close()
    seen: list[str] = []
    consumer = StreamConsumer(
        config.kafka, [topics.records], codec.decode_batch, lambda b: seen.extend(v.record_id for v in b.values),
        group_id=f"{config.name}.g", dlq_topic=topics.dlq,
    )  # fmt: skip
    stats = consumer.run(max_records=3, idle_timeout_s=10)
    assert seen == ["before", "after"] and stats.dead_lettered == 1
    (dead,) = read_all(config, topics.dlq, 1)
    headers = dict(dead.headers)  # type: ignore[attr-defined]
    assert headers["driftloop.error"] == b"oversized" and headers["driftloop.truncated"] == b"1"
    assert int(headers["driftloop.size"]) == len(huge)
    assert headers["driftloop.sha256"].decode() == hashlib.sha256(huge).hexdigest()
    assert headers["driftloop.source"].decode() == f"{topics.records}/0/1"
    assert huge.startswith(dead.value) and 0 < len(dead.value) < len(huge)  # type: ignore[attr-defined]
    assert committed(config, topics.records, f"{config.name}.g")[0] == 3


def test_a_tail_read_cut_short_raises_instead_of_answering_part_of_it(
    config: PipelineConfig, topics: Topics, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Status and the monitor's restart read the newest records of a topic; a read the timeout cut
    short lacked exactly those, and was taken for the whole tail."""
    import itertools
    import time
    import types

    from streams import kafka_source
    from streams.errors import IncompleteRead

    ensure_topics(config.kafka, [topics.heartbeats])
    produce(config, topics.heartbeats, [json.dumps({"n": i}).encode() for i in range(30)])
    tail = [json.loads(r.value)["n"] for r in kafka_source.read_tail(config.kafka, topics.heartbeats, 10)]
    assert 29 in tail and len(tail) <= 4 * 10  # the last 10 of each of 4 partitions, the newest among them

    found = kafka_source.fetch_high_watermarks

    def then_the_clock_runs_out(*args: object) -> dict[TopicPartition, int]:
        ends = found(*args)  # type: ignore[arg-type]
        begun = time.monotonic()
        ticks = itertools.count()  # each look at this module's clock is an hour later: every deadline passes
        clock = types.SimpleNamespace(monotonic=lambda: begun + 3600.0 * next(ticks))
        monkeypatch.setattr(kafka_source, "time", clock)
        return ends

    monkeypatch.setattr(kafka_source, "fetch_high_watermarks", then_the_clock_runs_out)
    with pytest.raises(IncompleteRead, match="not read within"):
        kafka_source.read_tail(config.kafka, topics.heartbeats, 10)
