"""Ingestion into the dataset store on S3 against the same store on a local folder.

The same topic, the same `ingest_ranges` (Ray tasks once the ranges hold `ray.distributed_min_rows`
records, else in the caller), only the root differs: a local folder (the peer), or
`s3://bucket/prefix` on moto's S3 server on loopback (`cluster.services.S3Server`; pyarrow's
S3FileSystem finds it through `AWS_ENDPOINT_URL`, which the Ray workers inherit). Each round
ingests all records into a fresh root on each side (the sides alternate which goes first), then
reads the version back whole (`DatasetStore.read_table`). moto keeps objects in memory in one
Python process: a real S3 differs (latency per request, bandwidth), so this measures the store's
own cost of speaking S3, not a production S3.
ratio = S3 rows per second / local rows per second (ingest).

    python benchmarks/ingest_s3.py --quick --json runs/bench/ingest_s3.json
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import common  # noqa: E402
import ray  # noqa: E402
from ingest import produce  # noqa: E402

from cluster.broker import EmbeddedBroker  # noqa: E402
from cluster.services import S3Server  # noqa: E402
from streams.config import PipelineConfig, load_config  # noqa: E402
from streams.datasets import DatasetStore  # noqa: E402
from streams.ingest import ingest_ranges  # noqa: E402
from streams.kafka import ensure_topics  # noqa: E402
from streams.kafka_source import high_watermarks  # noqa: E402
from streams.topics import Topics  # noqa: E402


def ingest_into(config: PipelineConfig, topic: str, root: str) -> tuple[int, float, int, float]:
    """Ingest the whole topic into a store at `root`, then read it back: (rows, s, rows read, s)."""
    store = DatasetStore(root, config.name)
    started = time.perf_counter()
    result = ingest_ranges(config, store, store.next_ranges(topic, high_watermarks(config.kafka, topic)))
    ingest_s = time.perf_counter() - started
    assert result.manifest is not None
    started = time.perf_counter()
    table = store.read_table(store.window(), config.schema.event_time)
    return result.manifest.rows, ingest_s, table.num_rows, time.perf_counter() - started


def main() -> int:
    parser = common.parser(__doc__)
    parser.add_argument("--records", type=int, default=None, help="records (default 50k quick, 1M full)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per side (default 1 quick, 3 full)")
    args = parser.parse_args()
    count = args.records or (50_000 if args.quick else 1_000_000)
    rounds = args.rounds or (1 if args.quick else 3)

    base = load_config(ROOT / "configs" / "demo.yaml", env={})
    work = Path(tempfile.mkdtemp(prefix="driftloop-bench-ingest-s3-"))
    s3 = S3Server(work / "moto.log")
    try:
        s3.start()
        os.environ.update(s3.env())  # before ray.init: its workers inherit it, and pyarrow reads it
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        with EmbeddedBroker() as broker:
            kafka = dataclasses.replace(base.kafka, bootstrap_servers=broker.bootstrap)
            datasets = dataclasses.replace(base.datasets, root=str(work), max_records_per_task=250_000)
            config = dataclasses.replace(base, name="bench", kafka=kafka, datasets=datasets)
            topic = Topics.of(config).records
            ensure_topics(kafka, Topics.of(config).all())
            total = produce(config, topic, count)
            ingest: dict[str, list[float]] = {"s3": [], "local": []}
            read: dict[str, list[float]] = {"s3": [], "local": []}
            for i in range(rounds):
                sides = ["s3", "local"] if i % 2 == 0 else ["local", "s3"]
                for side in sides:
                    root = s3.uri(f"round{i}") if side == "s3" else str(work / f"local{i}")
                    rows, ingest_s, rows_read, read_s = ingest_into(config, topic, root)
                    if rows != total or rows_read != total:
                        raise SystemExit(f"{side}: ingested {rows}, read {rows_read} rows, expected {total}")
                    ingest[side].append(rows / ingest_s)
                    read[side].append(rows / read_s)
                    print(f"round {i + 1}/{rounds}: {side} ingest {rows / ingest_s:,.0f} rows/s, "
                          f"read {rows / read_s:,.0f} rows/s", file=sys.stderr)  # fmt: skip
            stored = sum(1 for _ in s3.keys("round0/"))
    finally:
        ray.shutdown()
        s3.stop()
        shutil.rmtree(work, ignore_errors=True)

    ours, peer = statistics.median(ingest["s3"]), statistics.median(ingest["local"])
    result = {
        "benchmark": "ingest_s3",
        "ours": round(ours),
        "peer": round(peer),
        "ratio": round(ours / peer, 3),
        "unit": "rows/s",
        "read": {side: round(statistics.median(values)) for side, values in read.items()},
        "read_ratio": round(statistics.median(read["s3"]) / statistics.median(read["local"]), 3),
        "runs": {side: [round(v) for v in values] for side, values in ingest.items()},
        "conditions": {
            "what": (
                "Kafka -> decoded, validated Parquet with ingest_ranges, then read_table of the version; "
                "ours: the store on S3 (moto_server on loopback, pyarrow S3FileSystem); peer: a local folder"
            ),
            "records": total,
            "objects_per_version": stored,
            "partitions": base.kafka.partitions,
            "distributed": config.ray.distributed(total),
            "rounds": rounds,
            "statistic": "median of rounds",
            "broker": "embedded Tansu (memory://)",
            "ray": ray.__version__,
            "machine": common.machine(),
        },
    }
    return common.emit(result, args.json)


if __name__ == "__main__":
    sys.exit(main())
