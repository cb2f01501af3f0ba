"""Stream throughput: our consumer and producer paths against a hand-written kafka-python peer.

Consuming: records/s through `StreamConsumer` (fetch + decode + validate against the schema +
DLQ split + batch hand-off) vs a bare `KafkaConsumer` loop calling `json.loads` per record
(no validation). Producing: records/s through `Producer` + `RecordCodec.encode` (validates each
record) vs a bare `KafkaProducer` with `json.dumps` per record. Both sides use the same broker,
the same records, and the same client settings (acks=all, idempotence, linger, fetch sizes);
rounds alternate ours/peer and the median of each is reported. ratio = ours / peer.

    python benchmarks/stream_throughput.py --quick --json runs/bench/stream_throughput.json
"""

from __future__ import annotations

import dataclasses
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import common  # noqa: E402
from kafka import KafkaConsumer, KafkaProducer, TopicPartition  # noqa: E402

from cluster.broker import EmbeddedBroker  # noqa: E402
from streams.config import PipelineConfig, load_config  # noqa: E402
from streams.generator import StreamGenerator  # noqa: E402
from streams.kafka import Batch, Producer, StreamConsumer, client_options, ensure_topics  # noqa: E402
from streams.serde import RecordCodec  # noqa: E402


def produce_ours(config: PipelineConfig, topic: str, records: list[dict[str, Any]], codec: RecordCodec) -> float:
    key = config.schema.entity_id or config.schema.record_id or ""  # the demo has both
    started = time.perf_counter()
    with Producer(config.kafka, client_id="bench-ours") as producer:
        for record in records:
            producer.send(topic, codec.encode(record), key=record[key])
    return len(records) / (time.perf_counter() - started)


def produce_peer(config: PipelineConfig, topic: str, records: list[dict[str, Any]]) -> float:
    key = config.schema.entity_id or config.schema.record_id or ""  # the demo has both
    settings = config.kafka.producer
    started = time.perf_counter()
    producer = KafkaProducer(
        bootstrap_servers=config.kafka.bootstrap_servers,
        client_id="bench-peer",
        acks="all",
        enable_idempotence=True,
        linger_ms=settings.linger_ms,
        batch_size=settings.batch_size,
    )
    for record in records:
        producer.send(topic, json.dumps(record).encode(), key=record[key].encode())
    producer.flush()
    producer.close()
    return len(records) / (time.perf_counter() - started)


def consume_ours(config: PipelineConfig, topic: str, count: int, codec: RecordCodec) -> float:
    seen = 0

    def handle(batch: Batch) -> None:
        nonlocal seen
        seen += len(batch)

    consumer = StreamConsumer(config.kafka, [topic], codec.decode_batch, handle, group_id=None, dlq_topic=None)
    started = time.perf_counter()
    stats = consumer.run(max_records=count, idle_timeout_s=30)
    elapsed = time.perf_counter() - started
    if seen != count or stats.polled != count:
        raise SystemExit(f"ours consumed {seen} valid of {stats.polled} polled, expected {count}")
    return count / elapsed


def consume_peer(config: PipelineConfig, topic: str, count: int) -> float:
    settings = config.kafka.consumer
    consumer = KafkaConsumer(
        **client_options(config.kafka),
        enable_auto_commit=False,
        max_poll_records=settings.max_poll_records,
        fetch_max_bytes=64 * 1024 * 1024,
        max_partition_fetch_bytes=max(config.kafka.max_record_bytes * 2, 4 * 1024 * 1024),
    )
    parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
    consumer.assign(parts)
    consumer.seek_to_beginning(*parts)
    started = time.perf_counter()
    seen = 0
    deadline = time.monotonic() + 60
    while seen < count and time.monotonic() < deadline:
        for records in consumer.poll(timeout_ms=500, max_records=settings.max_poll_records).values():
            for record in records:
                json.loads(record.value)
                seen += 1
    elapsed = time.perf_counter() - started
    consumer.close()
    if seen != count:
        raise SystemExit(f"peer consumed {seen}, expected {count}")
    return count / elapsed


def main() -> int:
    parser = common.parser(__doc__)
    parser.add_argument("--records", type=int, default=None, help="records per round (default 50k quick, 500k full)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per side (default 3 quick, 5 full)")
    args = parser.parse_args()
    count = args.records or (50_000 if args.quick else 500_000)
    rounds = args.rounds or (3 if args.quick else 5)

    base = load_config(ROOT / "configs" / "demo.yaml", env={})
    codec = RecordCodec(base.schema)
    records = [r.record for r in StreamGenerator(base, seed=1, drift_at=count // 2).records(count)]
    size = statistics.mean(len(codec.encode(r)) for r in records[:1000])

    with EmbeddedBroker() as broker:
        kafka = dataclasses.replace(base.kafka, bootstrap_servers=broker.bootstrap)
        config = dataclasses.replace(base, kafka=kafka)
        produce: dict[str, list[float]] = {"ours": [], "peer": []}
        consume: dict[str, list[float]] = {"ours": [], "peer": []}
        for i in range(rounds):
            ours_topic, peer_topic = f"bench.ours{i}", f"bench.peer{i}"
            ensure_topics(kafka, [ours_topic, peer_topic])
            produce["ours"].append(produce_ours(config, ours_topic, records, codec))
            produce["peer"].append(produce_peer(config, peer_topic, records))
            # both consumers read the same topic (the one our producer wrote)
            consume["ours"].append(consume_ours(config, ours_topic, count, codec))
            consume["peer"].append(consume_peer(config, ours_topic, count))
            print(
                f"round {i + 1}/{rounds}: consume ours {consume['ours'][-1]:,.0f}/s peer {consume['peer'][-1]:,.0f}/s; "
                f"produce ours {produce['ours'][-1]:,.0f}/s peer {produce['peer'][-1]:,.0f}/s",
                file=sys.stderr,
            )

    def summary(runs: dict[str, list[float]]) -> dict[str, Any]:
        ours, peer = statistics.median(runs["ours"]), statistics.median(runs["peer"])
        return {
            "ours": round(ours),
            "peer": round(peer),
            "ratio": round(ours / peer, 3),
            "unit": "records/s",
            "runs": {k: [round(v) for v in vs] for k, vs in runs.items()},
        }

    consumed, produced = summary(consume), summary(produce)
    result = {
        "benchmark": "stream_throughput",
        "ours": consumed["ours"],
        "peer": consumed["peer"],
        "ratio": consumed["ratio"],
        "unit": "records/s",
        "conditions": {
            "what": "consume: fetch+decode+validate (ours: StreamConsumer+RecordCodec; peer: KafkaConsumer+json.loads)",
            "records": count,
            "rounds": rounds,
            "statistic": "median of rounds",
            "record_bytes_mean": round(size),
            "partitions": base.kafka.partitions,
            "broker": "embedded Tansu (memory://)",
            "python": platform.python_version(),
            "machine": common.machine(),
        },
        "consume": consumed,
        "produce": produced,
    }
    return common.emit(result, args.json)


if __name__ == "__main__":
    sys.exit(main())
