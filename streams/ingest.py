"""Ingestion: Kafka offset ranges -> a validated, versioned Parquet dataset, with Ray.

`ingest` reads from the end of the last version to the current high watermarks. Each piece
of at most `datasets.max_records_per_task` offsets is a Ray task that reads it exactly
(`read_range`), dead-letters invalid records, and writes one Parquet file named by its
offsets, so a rerun of the same ranges writes the same bytes. The manifest is committed last.
Fewer records than `ray.distributed_min_rows` in all are read the same way, piece by piece,
in the calling process: starting the task workers would cost more than the read.
"""

from __future__ import annotations

import hashlib
import posixpath
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from streams.config import PipelineConfig
from streams.datasets import DataFile, DatasetStore, Manifest
from streams.events import OffsetRange
from streams.kafka import topic_id
from streams.kafka_source import arrow_schema, high_watermarks, read_range, split_ranges
from streams.topics import Topics

__all__ = ["IngestResult", "ingest", "ingest_ranges"]


@dataclass(frozen=True)
class IngestResult:
    """What one ingestion did: the version (new or found), and whether it was new."""

    manifest: Manifest | None
    created: bool
    ranges: tuple[OffsetRange, ...] = ()


def _write_piece(config: PipelineConfig, piece: OffsetRange, root: str, folder: str) -> DataFile:
    """Read one piece and write it as one Parquet file (a Ray task, or in the caller for small ingests)."""
    topics = Topics.of(config)
    settings = config.datasets
    read = read_range(config.kafka, piece, config.schema, dlq_topic=topics.dlq, timeout_s=settings.read_timeout_s)
    sink = pa.BufferOutputStream()
    pq.write_table(read.table, sink, compression="zstd")
    data = sink.getvalue().to_pybytes()
    name = f"p{piece.partition}-{piece.start}-{piece.end}.parquet"
    store = DatasetStore(root, config.name)
    with store.fs.open_output_stream(posixpath.join(folder, name)) as out:
        out.write(data)
    times = read.table[config.schema.event_time]
    bounds: dict[str, Any] = pc.min_max(times).as_py() if len(times) else {"min": None, "max": None}
    return DataFile(
        path=name,
        range=piece,
        rows=read.table.num_rows,
        invalid=read.invalid,
        sha256=hashlib.sha256(data).hexdigest(),
        bytes=len(data),
        min_event_time=bounds["min"],
        max_event_time=bounds["max"],
    )


_write_piece_task = ray.remote(num_cpus=1, max_retries=2)(_write_piece)


def ingest_ranges(
    config: PipelineConfig,
    store: DatasetStore,
    ranges: list[OffsetRange],
    before_commit: Callable[[str], None] | None = None,
    topic_ids: dict[str, str] | None = None,
) -> IngestResult:
    """Ingest exactly these ranges as one version (or return the version that has them)."""
    ranges = [r for r in ranges if r.count > 0]
    if not ranges:
        return IngestResult(None, False)
    existing = store.find(ranges)
    if existing is not None:
        return IngestResult(existing, False, tuple(ranges))
    attempt = store.new_attempt(ranges)
    pieces = split_ranges(ranges, config.datasets.max_records_per_task)
    if config.ray.distributed(sum(r.count for r in ranges)):
        files = ray.get([_write_piece_task.remote(config, piece, store.root, attempt) for piece in pieces])
    else:  # fewer records than ray.distributed_min_rows: piece by piece here, no task worker to start
        files = [_write_piece(config, piece, store.root, attempt) for piece in pieces]
    if before_commit is not None:
        before_commit(attempt)
    manifest = store.commit(ranges, attempt, files, arrow_schema(config.schema), topic_ids=topic_ids)
    ours = posixpath.basename(attempt.rstrip("/"))
    created = all(f.path.startswith(ours + "/") for f in manifest.files)
    return IngestResult(manifest, created, tuple(ranges))


def ingest(config: PipelineConfig, store: DatasetStore | None = None) -> IngestResult:
    """Ingest from the end of the last version up to the current high watermarks."""
    store = store or DatasetStore(config.datasets.root, config.name)
    topic = Topics.of(config).records
    incarnation = topic_id(config.kafka, topic)
    ranges = store.next_ranges(topic, high_watermarks(config.kafka, topic), incarnation)
    return ingest_ranges(config, store, ranges, topic_ids={topic: incarnation} if incarnation else None)
