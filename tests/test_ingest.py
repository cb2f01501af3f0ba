"""Kafka -> versioned Parquet datasets, against the real broker and a real local Ray."""

from __future__ import annotations

import dataclasses
import json
from datetime import timedelta
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray

from jobs.features import fit_pipeline, numpy_batch
from jobs.train import model_inputs
from streams.config import PipelineConfig
from streams.datasets import DatasetStore
from streams.errors import DriftloopError, IncompleteRead
from streams.events import OffsetRange
from streams.generator import StreamGenerator, corrupt
from streams.ingest import ingest, ingest_ranges
from streams.kafka import Producer
from streams.kafka_datasource import KafkaRangeDatasource
from streams.kafka_source import high_watermarks
from streams.serde import RecordCodec
from streams.topics import Topics
from tests.test_kafka import read_all

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_session")]
PER_PARTITION = 400
BAD_EVERY = 37  # offsets 0, 37, 74, ... of every partition hold a malformed record


def fill(config: PipelineConfig, topics: Topics, per_partition: int = PER_PARTITION) -> dict[int, set[int]]:
    """Put `per_partition` records on each partition, some malformed; returns the valid offsets."""
    codec = RecordCodec(config.schema)
    rng = np.random.default_rng(0)
    rows = StreamGenerator(config, seed=6).records(per_partition * config.kafka.partitions)
    valid: dict[int, set[int]] = {p: set() for p in range(config.kafka.partitions)}
    with Producer(config.kafka) as producer:
        for p in range(config.kafka.partitions):
            for offset in range(per_partition):
                record = next(rows).record
                if offset % BAD_EVERY == 0:
                    payload, _ = corrupt(record, config.schema, rng)
                else:
                    payload = codec.encode(record)
                    valid[p].add(offset)
                producer.send(topics.records, payload, key=record["customer_id"], partition=p)
    return valid


def rows_of(store: DatasetStore, manifest_id: str) -> list[tuple[int, int]]:
    manifest = store.get(manifest_id)
    out: list[tuple[int, int]] = []
    for path in store.files(manifest):
        table = pq.read_table(path, columns=["partition", "offset"])
        out += list(zip(table["partition"].to_pylist(), table["offset"].to_pylist(), strict=True))
    return out


@pytest.mark.parametrize("distributed_min_rows", [0, 100_000], ids=["ray-tasks", "in-process"])
def test_exact_ranges_across_partitions_and_read_tasks(
    config: PipelineConfig, topics: Topics, distributed_min_rows: int
) -> None:
    valid = fill(config, topics)
    config = dataclasses.replace(
        config,
        datasets=dataclasses.replace(config.datasets, max_records_per_task=60),
        ray=dataclasses.replace(config.ray, distributed_min_rows=distributed_min_rows),
    )
    store = DatasetStore(config.datasets.root, config.name)
    ranges = [
        OffsetRange(topic=topics.records, partition=0, start=10, end=300),
        OffsetRange(topic=topics.records, partition=1, start=0, end=PER_PARTITION),
        OffsetRange(topic=topics.records, partition=2, start=50, end=61),
    ]
    result = ingest_ranges(config, store, ranges)
    manifest = result.manifest
    assert result.created and manifest is not None
    expected = {(r.partition, o) for r in ranges for o in range(r.start, r.end) if o in valid[r.partition]}
    got = rows_of(store, manifest.version_id)
    assert len(got) == len(set(got)) and set(got) == expected
    assert len(manifest.files) == 5 + 7 + 1  # pieces of at most 60 offsets
    assert manifest.rows == len(expected)
    bad = sum(r.count for r in ranges) - len(expected)
    assert manifest.invalid_rows == bad and sum(manifest.invalid_by_kind.values()) == bad
    assert manifest.rows_by_partition() == {p: len([k for k in expected if k[0] == p]) for p in (0, 1, 2)}
    assert "kafka://" in manifest.source_uri() and "p0=10-300" in manifest.source_uri()
    columns = [name for name, _ in manifest.columns]
    assert columns[-4:] == ["topic", "partition", "offset", "timestamp"]
    assert set(config.schema.columns) <= set(columns)


def test_the_datasource_reads_the_same_exact_ranges_with_several_read_tasks(
    config: PipelineConfig, topics: Topics
) -> None:
    valid = fill(config, topics)
    ranges = [OffsetRange(topic=topics.records, partition=p, start=5, end=PER_PARTITION - 5) for p in range(4)]
    source = KafkaRangeDatasource(config.kafka, ranges, config.schema, dlq_topic=topics.dlq, max_records_per_task=100)
    assert len(source.get_read_tasks(8)) == 16
    ds = ray.data.read_datasource(source, override_num_blocks=8)
    rows = ds.select_columns(["partition", "offset", "record_id"]).take_all()
    got = {(r["partition"], r["offset"]) for r in rows}
    assert len(rows) == len(got)
    assert got == {(p, o) for p in range(4) for o in range(5, PER_PARTITION - 5) if o in valid[p]}


def test_a_range_that_cannot_be_read_in_full_is_an_error_naming_it(config: PipelineConfig, topics: Topics) -> None:
    fill(config, topics, per_partition=50)
    config = dataclasses.replace(config, datasets=dataclasses.replace(config.datasets, read_timeout_s=2.0))
    store = DatasetStore(config.datasets.root, config.name)
    short = [OffsetRange(topic=topics.records, partition=3, start=0, end=80)]
    with pytest.raises(IncompleteRead, match=r"partition 3: read offsets \[0, 50\) of \[0, 80\).*50\.\.79"):
        ingest_ranges(config, store, short)
    assert store.versions() == []
    source = KafkaRangeDatasource(config.kafka, short, config.schema, dlq_topic=topics.dlq, timeout_s=2.0)
    # The datasource reads the range in pieces; whichever piece fails first names its own offsets.
    missing = r"IncompleteRead: .* partition 3: read offsets \[\d+, \d+\) of \[\d+, \d+\).*high watermark 50"
    with pytest.raises(Exception, match=missing):
        ray.data.read_datasource(source).count()


def test_reingesting_the_same_ranges_makes_no_second_copy(config: PipelineConfig, topics: Topics) -> None:
    fill(config, topics, per_partition=100)
    store = DatasetStore(config.datasets.root, config.name)
    first = ingest(config, store)
    assert first.created and first.manifest is not None
    assert first.manifest.ranges == tuple(
        OffsetRange(topic=topics.records, partition=p, start=0, end=100) for p in range(4)
    )
    assert ingest(config, store).manifest is None  # nothing new since
    again = ingest_ranges(config, store, list(first.manifest.ranges))
    assert not again.created and again.manifest == first.manifest
    folder = Path(store.base) / first.manifest.version_id
    assert len([p for p in folder.iterdir() if p.is_dir()]) == 1

    fill(config, topics, per_partition=20)  # more records: the next version starts where this one ended
    second = ingest(config, store)
    assert second.manifest is not None and second.manifest.parent == first.manifest.version_id
    assert [(r.start, r.end) for r in second.manifest.ranges] == [(100, 120)] * 4
    assert [m.version_id for m in store.versions()] == [first.manifest.version_id, second.manifest.version_id]


def test_a_recreated_topic_is_refused_instead_of_skipping_its_records(config: PipelineConfig, topics: Topics) -> None:
    from kafka import KafkaAdminClient

    from streams.kafka import client_options, ensure_topics, topic_id

    fill(config, topics, per_partition=30)
    store = DatasetStore(config.datasets.root, config.name)
    first = ingest(config, store).manifest
    assert first is not None and first.topic_ids == {topics.records: topic_id(config.kafka, topics.records)}
    admin = KafkaAdminClient(**client_options(config.kafka))
    try:
        admin.delete_topics([topics.records])
    finally:
        admin.close()
    ensure_topics(config.kafka, [topics.records])
    fill(config, topics, per_partition=40)
    with pytest.raises(DriftloopError, match=r"another incarnation of .*use a new datasets\.root"):
        ingest(config, store)


def test_a_crash_before_the_manifest_leaves_nothing_visible_and_a_rerun_completes(
    config: PipelineConfig, topics: Topics
) -> None:
    valid = fill(config, topics, per_partition=150)
    store = DatasetStore(config.datasets.root, config.name)
    ranges = store.next_ranges(topics.records, high_watermarks(config.kafka, topics.records))

    def crash(attempt: str) -> None:
        assert list(Path(attempt).glob("*.parquet")), "the data files are written before the manifest"
        raise KeyboardInterrupt("killed between data files and manifest")

    with pytest.raises(KeyboardInterrupt):
        ingest_ranges(config, store, ranges, before_commit=crash)
    assert store.versions() == [] and store.find(ranges) is None
    assert ingest(config, store).created
    (manifest,) = store.versions()
    got = rows_of(store, manifest.version_id)
    assert sorted(got) == sorted((p, o) for p, offsets in valid.items() for o in offsets)  # each exactly once
    folder = Path(store.base) / manifest.version_id
    assert len([p for p in folder.iterdir() if p.is_dir()]) == 1, "the abandoned attempt was removed"


def test_malformed_records_are_counted_and_sent_to_the_dlq(config: PipelineConfig, topics: Topics) -> None:
    fill(config, topics, per_partition=100)
    result = ingest(config)
    assert result.manifest is not None
    bad = 4 * len(range(0, 100, BAD_EVERY))
    assert result.manifest.invalid_rows == bad
    dead = read_all(config, topics.dlq, bad)
    assert len(dead) == bad
    kinds: dict[str, int] = {}
    for record in dead:
        kind = dict(record.headers)["driftloop.error"].decode()  # type: ignore[attr-defined]
        kinds[kind] = kinds.get(kind, 0) + 1
    assert kinds == result.manifest.invalid_by_kind


def test_windows_by_id_time_and_recent_rows(config: PipelineConfig, topics: Topics) -> None:
    fill(config, topics, per_partition=60)
    store = DatasetStore(config.datasets.root, config.name)
    first = ingest(config, store).manifest
    fill(config, topics, per_partition=40)
    second = ingest(config, store).manifest
    assert first is not None and second is not None
    ts = config.schema.timestamp

    by_id = store.window(version_ids=[first.version_id])
    assert store.read(by_id, ts).count() == first.rows  # type: ignore[attr-defined]
    assert store.window().rows == first.rows + second.rows
    recent = store.window(last_rows=50)
    assert [m.version_id for m in recent.manifests] == [second.version_id]
    assert store.read(recent, ts).count() == 50  # type: ignore[attr-defined]
    assert first.max_event_time is not None and second.min_event_time is not None
    since = first.max_event_time - timedelta(milliseconds=1)
    timed = store.window(since=since)
    rows = store.read(timed, ts).take_all()  # type: ignore[attr-defined]
    assert rows and all(r[ts] >= since for r in rows)
    assert len(timed.manifests) >= 1


def test_windows_by_records_offsets_and_newest_rows_by_offset_whatever_the_event_times(
    config: PipelineConfig, topics: Topics
) -> None:
    """A retrain's data is the records from the offsets where drift began: no clock decides it."""
    valid = fill(config, topics, per_partition=60)
    store = DatasetStore(config.datasets.root, config.name)
    first = ingest(config, store).manifest
    valid_more = fill(config, topics, per_partition=40)  # offsets 60..99 of each partition
    second = ingest(config, store).manifest
    assert first is not None and second is not None
    ts = config.schema.event_time
    starts = {0: 70, 1: 30, 2: 100, 3: 0}  # partition 2: nothing from there on
    ranges = [OffsetRange(topic=topics.records, partition=p, start=o, end=o) for p, o in starts.items()]
    window = store.window(records_from=ranges)
    assert [m.version_id for m in window.manifests] == [first.version_id, second.version_id]
    every = {p: valid[p] | {o + 60 for o in valid_more[p]} for p in valid}
    expected = {(p, o) for p, offsets in every.items() for o in offsets if o >= starts[p]}
    got = {(r["partition"], r["offset"]) for r in store.read(window, ts).take_all()}  # type: ignore[attr-defined]
    assert got == expected and store.rows_in(window, ts) == len(expected)
    assert first.min_event_time is not None
    early = first.min_event_time  # every row: offsets and a time bound together keep the offsets' rows
    both = store.window(records_from=ranges, since=early)
    assert store.rows_in(both, ts) == len(expected)
    only_new = store.window(records_from=[OffsetRange(topic=topics.records, partition=0, start=60, end=60)])
    assert [m.version_id for m in only_new.manifests] == [second.version_id], "versions before the offsets: skipped"

    everything = store.window(last_rows=10_000)  # more than there is: all of it
    assert store.read(everything, ts).count() == first.rows + second.rows  # type: ignore[attr-defined]
    newest = store.window(records_from=ranges, last_rows=60)
    rows = store.read(newest, ts).take_all()  # type: ignore[attr-defined]
    assert len(rows) == 60, "each partition's share, in proportion"
    for chosen in (window, both, only_new, everything, newest):  # a small window, read in the job's process
        here = store.read_table(chosen, ts)
        there = store.read(chosen, ts).take_all()  # type: ignore[attr-defined]
        assert sorted(zip(here["partition"].to_pylist(), here["offset"].to_pylist(), strict=True)) == sorted(
            (r["partition"], r["offset"]) for r in there
        ), "read_table keeps exactly the rows Ray Data's read keeps"
    for p in (0, 1, 3):
        mine = sorted(o for q, o in expected if q == p)
        kept = sorted(r["offset"] for r in rows if r["partition"] == p)
        assert kept == mine[len(mine) - len(kept) :], "the newest rows are the highest offsets"


def _close(a: object, b: object) -> bool:
    """Equal JSON values, floats to 1e-9 relative."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, int | float) and isinstance(b, int | float) and a == pytest.approx(b, rel=1e-9)
    return a == b


def test_training_and_serving_transforms_give_identical_outputs(config: PipelineConfig, topics: Topics) -> None:
    fill(config, topics, per_partition=300)
    store = DatasetStore(config.datasets.root, config.name)
    manifest = ingest(config, store).manifest
    assert manifest is not None
    ds = store.read(store.window(version_ids=[manifest.version_id]), config.schema.timestamp)
    pipeline = fit_pipeline(ds, config.schema, config.features)
    assert {"plan=__other__", "support_calls[bucket 0]", "charges_per_tenure"} <= set(pipeline.output_names)

    batch_fn = pipeline.batch_fn()

    def training_side(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"record_id": batch["record_id"], **batch_fn(batch)}

    trained = {
        rid: row
        for out in ds.map_batches(training_side, batch_format="numpy").iter_batches(batch_format="numpy")  # type: ignore[attr-defined]
        for rid, row in zip(out["record_id"], out["x"], strict=True)
    }
    records = [
        {k: v for k, v in row.items() if k not in ("topic", "partition", "offset", "timestamp")}
        for row in ds.take_all()  # type: ignore[attr-defined]
    ]
    served_batch = pipeline.transform_records(records)
    served_single = np.concatenate([pipeline.transform_records([r]) for r in records[:50]])
    assert len(trained) == len(records) == manifest.rows
    expected = np.stack([trained[r["record_id"]] for r in records])
    assert np.array_equal(expected, served_batch)
    assert np.array_equal(expected[:50], served_single)
    assert np.isfinite(expected).all() and expected.dtype == np.float32

    restored = type(pipeline).from_json(pipeline.to_json(), config.schema, config.features)
    assert np.array_equal(restored.transform_records(records), served_batch)

    # A small window, worked on in the job's process: the same statistics, the same inputs.
    table = store.read_table(store.window(version_ids=[manifest.version_id]), config.schema.timestamp)
    from ray.data.block import BlockAccessor

    ours, rays = numpy_batch(table), BlockAccessor.for_block(table).to_batch_format("numpy")
    assert ours.keys() == rays.keys()
    for name in ours:
        assert ours[name].dtype == rays[name].dtype, name
        assert np.array_equal(ours[name], rays[name], equal_nan=ours[name].dtype.kind == "f"), name
    expected_here = np.stack([trained[r] for r in table["record_id"].to_pylist()])
    x, _ = model_inputs(table, pipeline.batch_fn())
    assert np.array_equal(x, expected_here), "the same statistics give exactly the same inputs"
    local = fit_pipeline(table, config.schema, config.features)
    assert local.output_names == pipeline.output_names
    # One batch against Ray's blocks: sums in another order may differ in the last bit.
    assert _close(json.loads(local.to_json()), json.loads(pipeline.to_json()))
    x, _ = model_inputs(table, local.batch_fn())
    assert np.allclose(x, expected_here, rtol=1e-6, atol=1e-6)


def test_ray_read_kafka_reads_the_same_records_as_ours(config: PipelineConfig, topics: Topics) -> None:
    valid = fill(config, topics, per_partition=120)
    codec = RecordCodec(config.schema)
    with Producer(config.kafka) as producer:  # a final one-record batch per partition: ListOffsets is exact on Tansu
        for p in range(4):
            record = next(StreamGenerator(config, seed=99, id_prefix=f"tail{p}").records(1)).record
            producer.send(topics.records, codec.encode(record), partition=p)
            producer.flush()
    ours = ingest(config).manifest
    assert ours is not None
    store = DatasetStore(config.datasets.root, config.name)
    mine = {
        (p, o, r)
        for path in store.files(ours)
        for p, o, r in zip(
            *(
                pq.read_table(path, columns=["partition", "offset", "record_id"]).column(i).to_pylist()
                for i in range(3)
            ),
            strict=True,
        )
    }
    theirs_raw = ray.data.read_kafka(
        topics.records, bootstrap_servers=config.kafka.bootstrap_servers, start_offset="earliest", end_offset="latest"
    ).take_all()
    theirs = set()
    for row in theirs_raw:
        value = codec.decode_batch([row["value"]])[0]
        if not isinstance(value, Exception):
            theirs.add((row["partition"], row["offset"], value.record_id))
    assert len(theirs_raw) == 4 * 121
    assert mine == theirs
    assert len(mine) == sum(len(v) for v in valid.values()) + 4


def test_a_dataset_version_is_logged_to_mlflow_with_its_kafka_lineage(
    config: PipelineConfig, topics: Topics, tmp_path: Path
) -> None:
    from mlflow.tracking import MlflowClient

    from jobs.dataset_inputs import log_dataset_version

    fill(config, topics, per_partition=30)
    manifest = ingest(config).manifest
    assert manifest is not None
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(config.name)
    with mlflow.start_run() as run:
        log_dataset_version(manifest, context="training")
    (logged,) = MlflowClient(uri).get_run(run.info.run_id).inputs.dataset_inputs
    assert logged.dataset.digest == manifest.digest
    assert logged.dataset.name == f"{config.name}@{manifest.version_id}"
    source = json.loads(logged.dataset.source)
    assert source["uri"] == manifest.source_uri()
    assert source["ranges"][0]["topic"] == topics.records
    assert logged.tags[0].value == "training"


def test_a_poison_pill_too_big_for_the_dlq_does_not_stop_ingestion(config: PipelineConfig, topics: Topics) -> None:
    """A 3 MB record: its DLQ copy went over the producer's limit and every ingest failed the same way."""
    from kafka import KafkaProducer

    from streams.kafka import client_options

    fill(config, topics, per_partition=20)
    huge = json.dumps({"record_id": "x" * 3_000_000}).encode()
    big = KafkaProducer(**client_options(config.kafka), max_request_size=8 * 1024 * 1024)
    try:
        big.send(topics.records, huge, partition=0).get(timeout=30)
    finally:
        big.close()
    fill(config, topics, per_partition=5)
    result = ingest(config)
    assert result.manifest is not None and result.manifest.invalid_by_kind.get("oversized") == 1
    dead = [r for r in read_all(config, topics.dlq, 1_000) if dict(r.headers).get("driftloop.truncated")]  # type: ignore[attr-defined]
    assert len(dead) == 1 and len(dead[0].value) < len(huge)  # type: ignore[attr-defined]
