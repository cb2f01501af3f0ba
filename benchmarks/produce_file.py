"""Producing a file: rows/s from a Parquet file into the records topic, ours against a hand-written peer.

Ours: `driftloop produce --from`'s path (`read_table` + `file_records` + `publish_file`: every
row validated against the schema by the record codec, converted where it must be, refused rows
to the DLQ, labels none; records through librdkafka with back-pressure, idempotent, acks=all,
every one acknowledged before the end). Peer: what a user writes by hand: `pyarrow.parquet.read_table` +
`to_pylist` + `json.dumps` per row + kafka-python's `KafkaProducer.send` (no validation), with
the same client settings (acks=all, idempotence, linger, batch size). The file is the demo
schema's generated stream (1,000,000 rows full, 200,000 quick), written once; both sides read it
from disk in each round. Rounds alternate ours/peer; medians are reported. ratio = ours / peer.

    python benchmarks/produce_file.py --quick --json runs/bench/produce_file.json
"""

from __future__ import annotations

import dataclasses
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import common  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from kafka import KafkaProducer  # noqa: E402

from cluster.broker import EmbeddedBroker  # noqa: E402
from streams.config import PipelineConfig, load_config  # noqa: E402
from streams.files import file_records, read_table  # noqa: E402
from streams.generator import StreamGenerator  # noqa: E402
from streams.kafka import Producer, ensure_topics  # noqa: E402
from streams.kafka_source import high_watermarks  # noqa: E402
from streams.publish import publish_file  # noqa: E402
from streams.rdkafka import BulkProducer  # noqa: E402
from streams.topics import Topics  # noqa: E402


def write_file(config: PipelineConfig, path: Path, rows: int) -> None:
    writer = None
    generator = StreamGenerator(config, seed=1)
    left = rows
    while left:
        chunk = [r.record for r in generator.records(min(left, 100_000))]
        table = pa.Table.from_pylist(chunk)
        writer = writer or pq.ParquetWriter(path, table.schema, compression="zstd")
        writer.write_table(table)
        left -= len(chunk)
    if writer is not None:
        writer.close()


def ours(config: PipelineConfig, path: Path, topics: Topics) -> tuple[float, int]:
    started = time.perf_counter()
    table = read_table(path)
    settings = config.kafka.producer
    bulk = BulkProducer(config.kafka, client_id="bench-ours", timeout_s=settings.delivery_timeout_ms / 1000,
                        linger_ms=settings.linger_ms)  # fmt: skip
    with Producer(config.kafka, client_id="bench-ours") as producer:
        stats = publish_file(file_records(table, config.schema, coerce=False), config.schema, producer, topics,
                             config.name, str(path), bulk=bulk)  # fmt: skip
    bulk.close()
    return stats.records / (time.perf_counter() - started), len(stats.rejected)


def peer(config: PipelineConfig, path: Path, topic: str) -> float:
    settings = config.kafka.producer
    key = config.schema.entity_id or ""
    started = time.perf_counter()
    table = pq.read_table(path)
    producer = KafkaProducer(
        bootstrap_servers=config.kafka.bootstrap_servers,
        client_id="bench-peer",
        acks="all",
        enable_idempotence=True,
        linger_ms=settings.linger_ms,
        batch_size=settings.batch_size,
    )
    sent = 0
    for batch in table.to_batches(max_chunksize=4096):
        for row in batch.to_pylist():
            producer.send(topic, json.dumps(row, default=str).encode(), key=str(row[key]).encode())
            sent += 1
    producer.flush()
    producer.close()
    return sent / (time.perf_counter() - started)


def main() -> int:
    parser = common.parser(__doc__)
    parser.add_argument("--rows", type=int, default=None, help="rows in the file (default 200k quick, 1M full)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per side (default 2 quick, 3 full)")
    args = parser.parse_args()
    rows = args.rows or (200_000 if args.quick else 1_000_000)
    rounds = args.rounds or (2 if args.quick else 3)
    base = load_config(ROOT / "configs" / "demo.yaml", env={})
    runs: dict[str, list[float]] = {"ours": [], "peer": []}
    with tempfile.TemporaryDirectory() as tmp, EmbeddedBroker() as broker:
        path = Path(tmp) / "stream.parquet"
        write_file(base, path, rows)
        size = path.stat().st_size
        for i in range(rounds):
            config = dataclasses.replace(
                base, name=f"bench-file-{i}", kafka=dataclasses.replace(base.kafka, bootstrap_servers=broker.bootstrap)
            )
            topics = Topics.of(config)
            ensure_topics(config.kafka, [*topics.all(), f"bench-file-peer-{i}"])
            rate, refused = ours(config, path, topics)
            if refused:
                raise SystemExit(f"ours refused {refused} rows of a valid file")
            on_topic = sum(high_watermarks(config.kafka, topics.records).values())
            if on_topic != rows:
                raise SystemExit(f"ours left {on_topic} records on {topics.records}, not {rows}")
            runs["ours"].append(rate)
            runs["peer"].append(peer(config, path, f"bench-file-peer-{i}"))
            print(f"round {i + 1}/{rounds}: ours {runs['ours'][-1]:,.0f} rows/s, peer {runs['peer'][-1]:,.0f} rows/s",
                  file=sys.stderr)  # fmt: skip
    mine, theirs = statistics.median(runs["ours"]), statistics.median(runs["peer"])
    result = {
        "benchmark": "produce_file",
        "ours": round(mine),
        "peer": round(theirs),
        "ratio": round(mine / theirs, 3),
        "unit": "rows/s",
        "runs": {k: [round(v) for v in vs] for k, vs in runs.items()},
        "conditions": {
            "what": "Parquet file -> records topic (ours: read_table+file_records+publish_file, validated; "
            "peer: pq.read_table+to_pylist+json.dumps+KafkaProducer.send, unvalidated)",
            "rows": rows,
            "file_bytes": size,
            "rounds": rounds,
            "statistic": "median of rounds",
            "partitions": base.kafka.partitions,
            "broker": "embedded Tansu (memory://)",
            "python": platform.python_version(),
            "machine": common.machine(),
        },
    }
    return common.emit(result, args.json)


if __name__ == "__main__":
    sys.exit(main())
