"""The whole loop, wired top to bottom: what `driftloop run` (and `make run`) does.

Today the loop covers its first stages: the embedded broker, the stream generator with drift
and delayed labels, a consumer that validates records, dead-letters the bad ones and watches
the stream's distribution window by window, ingestion into a versioned Parquet dataset with
Ray, and the feature transform fitted on it. Training, serving and the monitor/controller
that close the loop are the next issues; the summary says so.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from cluster.broker import EmbeddedBroker
from streams.config import PipelineConfig
from streams.datasets import Manifest
from streams.events import LabelObserved
from streams.generator import Scenario, StreamGenerator
from streams.kafka import Batch, Producer, StreamConsumer, ensure_topics
from streams.publish import publish_stream
from streams.serde import RecordCodec, decode_events
from streams.topics import Topics

NOT_YET = (
    "training, tuning and the gate exist (driftloop tune) but this run does not call them yet",
    "serving exists (driftloop deploy) but this run does not start it yet",
    "drift monitoring, retraining jobs and the closed loop (issue: monitoring and the closed loop)",
)


@dataclass
class _Window:
    """Running numbers for one window of records."""

    size: int = 0
    numeric: dict[str, list[float]] = field(default_factory=dict)
    categories: dict[str, Counter[str]] = field(default_factory=dict)
    labels: Counter[str] = field(default_factory=Counter)


@contextlib.contextmanager
def kafka_for(config: PipelineConfig, run_dir: Path) -> Iterator[PipelineConfig]:
    """The config with a reachable broker: the given one, or an embedded Tansu for the run."""
    if not config.kafka.embedded:
        yield config
        return
    with EmbeddedBroker(log_file=run_dir / "broker.log") as broker:
        print(f"[broker] embedded Tansu at {broker.bootstrap} (log: {run_dir / 'broker.log'})")
        yield dataclasses.replace(config, kafka=dataclasses.replace(config.kafka, bootstrap_servers=broker.bootstrap))


def run_pipeline(config: PipelineConfig, run_dir: Path, records: int, scenario: Scenario, seed: int) -> int:
    run_dir.mkdir(parents=True, exist_ok=True)
    drift_at = records // 2
    window = max(records // 10, 1)
    started = time.monotonic()
    embedded = config.kafka.embedded
    with kafka_for(config, run_dir) as config:
        topics = Topics(config.name)
        created = ensure_topics(config.kafka, topics.all())
        print(f"[topics] {len(created)} created, namespace {config.name!r}: {', '.join(topics.all())}")

        generator = StreamGenerator(
            config, seed=seed, scenario=scenario, drift_at=drift_at, start_time=datetime.now(timezone.utc)
        )
        with Producer(config.kafka, client_id=f"{config.name}.generator") as producer:
            sent = publish_stream(
                generator, producer, topics, config.name, records, label_delay=window // 4, bad_fraction=0.002
            )
        print(
            f"[produce] {sent.records} records ({scenario} drift from record {drift_at}), "
            f"{sent.labels} delayed labels, "
            f"{sent.malformed} malformed on purpose {dict(sent.malformed_kinds)} in {sent.seconds:.1f}s"
        )

        codec = RecordCodec(config.schema, config.kafka.max_record_bytes)
        windows = _consume_windows(config, topics, codec, records, window)
        print(f"[consume] {sum(w.size for w in windows)} valid records in {len(windows)} windows of {window}:")
        _print_windows(config, generator, windows)

        dlq = _count_dlq(config, topics)
        labels = _count_labels(config, topics)
        print(f"[dlq] {sum(dlq.values())} records dead-lettered with their reasons: {dict(dlq)}")
        print(f"[labels] {labels} delayed labels on {topics.labels}")

        manifest = _ingest_and_fit(config, run_dir, embedded)

    print(
        f"\nStream, ingestion and feature stages done in {time.monotonic() - started:.1f}s. Not part of this run yet:"
    )
    for item in NOT_YET:
        print(f"  - {item}")
    lost = records - sent.malformed - sum(w.size for w in windows)
    if manifest.rows + manifest.invalid_rows != records:
        print(
            f"[error] the dataset holds {manifest.rows} + {manifest.invalid_rows} of {records} records", file=sys.stderr
        )
        return 1
    if lost or sum(dlq.values()) != sent.malformed:
        print(f"[error] {lost} records unaccounted for", file=sys.stderr)
        return 1
    return 0


def _ingest_and_fit(config: PipelineConfig, run_dir: Path, embedded: bool) -> Manifest:
    """Kafka -> a versioned Parquet dataset (Ray), then the feature transform fitted on it."""
    from cluster.ray_runtime import connect
    from jobs.features import fit_pipeline
    from streams.datasets import DatasetStore
    from streams.ingest import ingest

    # The embedded broker starts empty each run, so its offsets need a store of their own.
    root = str(run_dir / "datasets") if embedded else config.datasets.root
    config = dataclasses.replace(config, datasets=dataclasses.replace(config.datasets, root=root))
    started = time.monotonic()
    connect(config)
    where = config.ray.address or "local Ray (token auth on)"
    print(f"[ray] {where} in {time.monotonic() - started:.1f}s")
    store = DatasetStore(root, config.name)
    started = time.monotonic()
    result = ingest(config, store)
    manifest = result.manifest
    assert manifest is not None, "ingestion found no records"
    rows = manifest.rows_by_partition()
    print(
        f"[ingest] version {manifest.version_id} in {time.monotonic() - started:.1f}s: {manifest.rows} rows, "
        f"{manifest.invalid_rows} invalid, digest {manifest.digest}"
    )
    for r in manifest.ranges:
        print(f"           {r.topic}/{r.partition} offsets [{r.start}, {r.end}) -> {rows.get(r.partition, 0)} rows")
    started = time.monotonic()
    dataset = store.read(store.window(version_ids=[manifest.version_id]), config.schema.timestamp)
    features = fit_pipeline(dataset, config.schema, config.features)
    stats_file = Path(root) / f"{manifest.version_id}.features.json"
    stats_file.parent.mkdir(parents=True, exist_ok=True)
    stats_file.write_text(features.to_json())
    shown = ", ".join(features.output_names[:6])
    print(
        f"[features] fitted on {manifest.rows} rows in {time.monotonic() - started:.1f}s: "
        f"{features.width} model inputs ({shown}, ...); statistics in {stats_file}"
    )
    return manifest


def _consume_windows(
    config: PipelineConfig, topics: Topics, codec: RecordCodec, records: int, size: int
) -> list[_Window]:
    schema = config.schema
    windows: list[_Window] = []

    def handle(batch: Batch) -> None:
        for chunk in batch.chunks:
            for value in chunk.values:
                index = int(getattr(value, schema.record_id).rsplit("-", 1)[1])
                while len(windows) <= index // size:
                    windows.append(_Window())
                w = windows[index // size]
                w.size += 1
                for feature in schema.features:
                    x = getattr(value, feature.name)
                    if feature.numeric:
                        w.numeric.setdefault(feature.name, []).append(float(x))
                    else:
                        w.categories.setdefault(feature.name, Counter())[str(x)] += 1
                w.labels[str(getattr(value, schema.label.name))] += 1

    consumer = StreamConsumer(
        config.kafka, [topics.records], codec.decode_batch, handle, group_id=f"{config.name}.run", dlq_topic=topics.dlq
    )
    consumer.run(max_records=records, idle_timeout_s=20)
    return windows


def _print_windows(config: PipelineConfig, generator: StreamGenerator, windows: list[_Window]) -> None:
    numeric = [n for n in generator.drift_features if config.schema.feature(n).numeric]
    categorical = [n for n in generator.drift_features if not config.schema.feature(n).numeric]
    positive = str(config.schema.label.classes[-1])
    header = (
        ["window", "records"] + [f"mean({n})" for n in numeric] + [f"top {n}" for n in categorical] + [f"P({positive})"]
    )
    print("  " + " | ".join(f"{h:>18}" for h in header))
    for i, w in enumerate(windows):
        cells = [str(i), str(w.size)]
        cells += [f"{np.mean(w.numeric[n]):.2f}" for n in numeric]
        cells += [f"{w.categories[n].most_common(1)[0][0]}" for n in categorical]
        cells += [f"{w.labels[positive] / max(w.size, 1):.3f}"]
        print("  " + " | ".join(f"{c:>18}" for c in cells))


def _count_dlq(config: PipelineConfig, topics: Topics) -> Counter[str]:
    kinds: Counter[str] = Counter()

    def handle(batch: Batch) -> None:
        for chunk in batch.chunks:
            for record in chunk.records:
                kinds[dict(record.headers).get("driftloop.error", b"?").decode()] += 1

    consumer = StreamConsumer(config.kafka, [topics.dlq], lambda vs: list(vs), handle, group_id=None, dlq_topic=None)
    consumer.run(idle_timeout_s=2)
    return kinds


def _count_labels(config: PipelineConfig, topics: Topics) -> int:
    seen = 0

    def handle(batch: Batch) -> None:
        nonlocal seen
        seen += sum(isinstance(v, LabelObserved) for v in batch.values)

    consumer = StreamConsumer(config.kafka, [topics.labels], decode_events, handle, group_id=None, dlq_topic=topics.dlq)
    consumer.run(idle_timeout_s=2)
    return seen
