"""The dataset store's bookkeeping, without Kafka or Ray: ids, splits, manifests, next ranges."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa

from streams.datasets import DataFile, DatasetStore, ranges_id
from streams.events import OffsetRange
from streams.kafka_source import split_ranges

T = "p.records"


def span(partition: int, start: int, end: int) -> OffsetRange:
    return OffsetRange(topic=T, partition=partition, start=start, end=end)


def test_split_ranges_covers_every_offset_once() -> None:
    pieces = split_ranges([span(0, 5, 27), span(1, 0, 10), span(2, 3, 3)], 10)
    assert [(p.partition, p.start, p.end) for p in pieces] == [(0, 5, 15), (0, 15, 25), (0, 25, 27), (1, 0, 10)]


def test_version_ids_depend_on_the_ranges_only() -> None:
    assert ranges_id([span(0, 0, 10), span(1, 0, 5)]) == ranges_id([span(1, 0, 5), span(0, 0, 10)])
    assert ranges_id([span(0, 0, 10)]) != ranges_id([span(0, 0, 11)])


def commit(store: DatasetStore, ranges: list[OffsetRange], when: datetime) -> str:
    attempt = store.new_attempt(ranges)
    files = []
    for r in ranges:
        name = f"p{r.partition}-{r.start}-{r.end}.parquet"
        Path(attempt, name).write_bytes(b"data")
        files.append(DataFile(path=name, range=r, rows=r.count, sha256="0" * 64, bytes=4))
    return store.commit(ranges, attempt, files, pa.schema([("x", pa.int64())]), now=when).version_id


def test_only_committed_versions_are_visible_and_next_ranges_continue_them(tmp_path: Path) -> None:
    store = DatasetStore(str(tmp_path), "p")
    assert store.versions() == []
    store.new_attempt([span(0, 0, 10)])  # an attempt that never commits
    assert store.versions() == []
    first = commit(store, [span(0, 0, 10), span(1, 0, 4)], datetime(2026, 1, 1, tzinfo=timezone.utc))
    second = commit(store, [span(0, 10, 12)], datetime(2026, 1, 2, tzinfo=timezone.utc))
    assert [m.version_id for m in store.versions()] == [first, second]
    assert store.get(second).parent == first
    assert store.next_ranges(T, {0: 12, 1: 9, 2: 3}) == [span(1, 4, 9), span(2, 0, 3)]
    assert store.find([span(1, 0, 4), span(0, 0, 10)]) == store.get(first)
    assert [m.version_id for m in store.window(last_rows=2).manifests] == [second]
    assert [m.version_id for m in store.window(last_rows=3).manifests] == [first, second]


def test_the_same_digest_for_the_same_content(tmp_path: Path) -> None:
    a = DatasetStore(str(tmp_path / "a"), "p")
    b = DatasetStore(str(tmp_path / "b"), "p")
    when = datetime(2026, 1, 1, tzinfo=timezone.utc)
    va, vb = commit(a, [span(0, 0, 10)], when), commit(b, [span(0, 0, 10)], when)
    assert va == vb and a.get(va).digest == b.get(vb).digest and len(a.get(va).digest) == 32
