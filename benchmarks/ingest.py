"""Ingestion: Kafka -> decoded, validated Parquet dataset; ours against `ray.data.read_kafka`.

Ours: `ingest_ranges` (exact per-partition ranges, one Ray task per piece: fetch with
kafka-python, decode and validate with the record codec, write one Parquet file, then the
manifest). Peer: `ray.data.read_kafka(...).map_batches(same decode).write_parquet(...)`.
Ceiling: a bare kafka-python consumer fetching the same records without decoding.
All three read the same topic in one run; the topic ends with a one-record batch per
partition so that `read_kafka`'s ListOffsets-based end is exact on Tansu (DESIGN.md), and
the row counts are checked. Peak memory is the peak of the summed RSS of the driver and
every Ray worker process while a side runs, minus the idle baseline.
ratio = ours / read_kafka rows per second.

    python benchmarks/ingest.py --quick --json runs/bench/ingest.json
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import namedtuple
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import common  # noqa: E402
import psutil  # noqa: E402
import pyarrow as pa  # noqa: E402
import ray  # noqa: E402
from kafka import KafkaConsumer, TopicPartition  # noqa: E402

from cluster.broker import EmbeddedBroker  # noqa: E402
from streams.config import PipelineConfig, load_config  # noqa: E402
from streams.datasets import DatasetStore  # noqa: E402
from streams.errors import DecodeError  # noqa: E402
from streams.generator import StreamGenerator  # noqa: E402
from streams.ingest import ingest_ranges  # noqa: E402
from streams.kafka import Producer, client_options, ensure_topics  # noqa: E402
from streams.kafka_source import arrow_schema, high_watermarks, to_table  # noqa: E402
from streams.serde import RecordCodec  # noqa: E402
from streams.topics import Topics  # noqa: E402

_Record = namedtuple("_Record", "offset timestamp")


class PeakMemory:
    """Samples the summed RSS of this process and all Ray worker processes every 50 ms."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def total() -> int:
        total = psutil.Process().memory_info().rss
        for proc in psutil.process_iter(["name", "cmdline"]):
            try:
                name = proc.info["name"] or ""
                cmd = " ".join(proc.info["cmdline"] or [])
                if name.startswith("ray::") or "default_worker.py" in cmd:
                    total += proc.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return total

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self.total())

    def __enter__(self) -> PeakMemory:
        self.baseline = self.total()
        self.peak = self.baseline
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def produce(config: PipelineConfig, topic: str, count: int) -> int:
    codec = RecordCodec(config.schema)
    with Producer(config.kafka, client_id="bench") as producer:
        for row in StreamGenerator(config, seed=1).records(count):
            producer.send(topic, codec.encode(row.record), key=row.key(config.schema))
        producer.flush()
        tail = StreamGenerator(config, seed=2, id_prefix="tail").records(config.kafka.partitions)
        for p in range(config.kafka.partitions):  # a final one-record batch per partition
            producer.send(topic, codec.encode(next(tail).record), partition=p)
            producer.flush()
    return count + config.kafka.partitions


def run_ours(config: PipelineConfig, topic: str, out: str) -> tuple[int, float]:
    store = DatasetStore(out, config.name)
    started = time.perf_counter()
    hw = high_watermarks(config.kafka, topic)  # read_kafka's end-offset lookup is timed too
    result = ingest_ranges(config, store, store.next_ranges(topic, hw))
    elapsed = time.perf_counter() - started
    assert result.manifest is not None
    return result.manifest.rows, elapsed


def run_peer(config: PipelineConfig, topic: str, out: str) -> tuple[int, float]:
    schema = config.schema
    arrow = arrow_schema(schema)
    max_bytes = config.kafka.max_record_bytes

    def decode(batch: pa.Table) -> pa.Table:
        codec = RecordCodec(schema, max_bytes)
        results = codec.decode_batch(batch["value"].to_pylist())
        partitions = batch["partition"].to_pylist()
        offsets = batch["offset"].to_pylist()
        stamps = batch["timestamp"].to_pylist()
        tables = []
        for p in sorted(set(partitions)):
            keep = [i for i, q in enumerate(partitions) if q == p and not isinstance(results[i], DecodeError)]
            records = [_Record(offsets[i], stamps[i]) for i in keep]
            tables.append(to_table(schema, arrow, topic, p, records, [results[i] for i in keep]))
        return pa.concat_tables(tables) if tables else arrow.empty_table()

    started = time.perf_counter()
    ds = ray.data.read_kafka(
        topic, bootstrap_servers=config.kafka.bootstrap_servers, start_offset="earliest", end_offset="latest"
    )
    ds.map_batches(decode, batch_format="pyarrow").write_parquet(out)
    elapsed = time.perf_counter() - started
    rows = ray.data.read_parquet(out).count()
    return rows, elapsed


def run_ceiling(config: PipelineConfig, topic: str, count: int) -> float:
    consumer = KafkaConsumer(
        **client_options(config.kafka), enable_auto_commit=False, max_poll_records=5000, fetch_max_bytes=64 << 20
    )
    parts = [TopicPartition(topic, p) for p in range(config.kafka.partitions)]
    consumer.assign(parts)
    consumer.seek_to_beginning(*parts)
    started = time.perf_counter()
    seen = 0
    while seen < count:
        seen += sum(len(v) for v in consumer.poll(timeout_ms=500).values())
    elapsed = time.perf_counter() - started
    consumer.close()
    return count / elapsed


def main() -> int:
    parser = common.parser(__doc__)
    parser.add_argument("--records", type=int, default=None, help="records (default 50k quick, 1M full)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per side (default 1 quick, 3 full)")
    args = parser.parse_args()
    count = args.records or (50_000 if args.quick else 1_000_000)
    rounds = args.rounds or (1 if args.quick else 3)

    base = load_config(ROOT / "configs" / "demo.yaml", env={})
    work = Path(tempfile.mkdtemp(prefix="driftloop-bench-ingest-"))
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        with EmbeddedBroker() as broker:
            kafka = dataclasses.replace(base.kafka, bootstrap_servers=broker.bootstrap)
            datasets = dataclasses.replace(base.datasets, root=str(work), max_records_per_task=250_000)
            config = dataclasses.replace(base, name="bench", kafka=kafka, datasets=datasets)
            topic = Topics.of(config).records
            ensure_topics(kafka, Topics.of(config).all())
            total = produce(config, topic, count)
            record_bytes = round(
                statistics.mean(
                    len(RecordCodec(base.schema).encode(r.record)) for r in StreamGenerator(base).records(500)
                )
            )
            ours: list[float] = []
            peer: list[float] = []
            memory: dict[str, int] = {"ours": 0, "peer": 0}
            for i in range(rounds):
                for side, fn, sink in (("ours", run_ours, ours), ("peer", run_peer, peer)):
                    out = str(work / f"{side}{i}")
                    with PeakMemory() as mem:
                        rows, elapsed = fn(config, topic, out)
                    if rows != total:
                        raise SystemExit(f"{side} read {rows} rows, expected {total}")
                    sink.append(rows / elapsed)
                    memory[side] = max(memory[side], mem.peak - mem.baseline)
                    shutil.rmtree(out, ignore_errors=True)
                    print(f"round {i + 1}/{rounds}: {side} {rows / elapsed:,.0f} rows/s", file=sys.stderr)
            ceiling = run_ceiling(config, topic, total)
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)

    result = {
        "benchmark": "ingest",
        "ours": round(statistics.median(ours)),
        "peer": round(statistics.median(peer)),
        "ratio": round(statistics.median(ours) / statistics.median(peer), 3),
        "unit": "rows/s",
        "ceiling_fetch_only": round(ceiling),
        "peak_memory_mb": {k: round(v / 2**20) for k, v in memory.items()},
        "runs": {"ours": [round(v) for v in ours], "peer": [round(v) for v in peer]},
        "conditions": {
            "what": (
                "Kafka -> decoded, validated Parquet; ours: ingest_ranges; "
                "peer: ray.data.read_kafka + map_batches(decode) + write_parquet"
            ),
            "records": total,
            "record_bytes_mean": record_bytes,
            "partitions": base.kafka.partitions,
            "rounds": rounds,
            "statistic": "median of rounds; peak memory: max over rounds of (peak summed RSS - baseline)",
            "broker": "embedded Tansu (memory://)",
            "ray": ray.__version__,
            "machine": common.machine(),
        },
    }
    return common.emit(result, args.json)


if __name__ == "__main__":
    sys.exit(main())
