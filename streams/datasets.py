"""The dataset store: versioned Parquet datasets, each traceable to exact Kafka offsets.

Layout under the root (a local path or any filesystem URI pyarrow or fsspec understands):

```
<root>/<pipeline>/versions/<version_id>/manifest.json        written last: the version exists
<root>/<pipeline>/versions/<version_id>/<attempt>/p<partition>-<start>-<end>.parquet
```

A version is named by its offset ranges (`version_id` is a hash of them), so ingesting the same
ranges twice finds the first copy instead of writing a second. Data files go into a fresh
attempt folder; the manifest, which lists them, is written last and atomically. Readers trust
manifests only, so a crash before the manifest leaves nothing visible, and a rerun writes a
new attempt and commits it (the abandoned attempt is removed then).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import posixpath
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from streams.errors import DriftloopError
from streams.events import OffsetRange, utcnow

__all__ = ["DataFile", "DatasetStore", "Manifest", "Window", "ranges_id"]

MANIFEST = "manifest.json"


class DataFile(msgspec.Struct, frozen=True, kw_only=True):
    """One Parquet file of a version: the offsets it holds and what it contains."""

    path: str  # relative to the version folder
    range: OffsetRange
    rows: int
    invalid: dict[str, int] = {}
    sha256: str
    bytes: int
    min_event_time: datetime | None = None
    max_event_time: datetime | None = None


class Manifest(msgspec.Struct, frozen=True, kw_only=True):
    """What a dataset version is: its offset ranges, files, counts, schema and digest."""

    format_version: int = 1
    version_id: str
    pipeline: str
    ranges: tuple[OffsetRange, ...]
    files: tuple[DataFile, ...]
    rows: int
    invalid_rows: int
    invalid_by_kind: dict[str, int]
    schema: str  # the Arrow schema, as pyarrow prints it
    columns: tuple[tuple[str, str], ...]
    digest: str
    created_at: datetime
    parent: str | None
    min_event_time: datetime | None
    max_event_time: datetime | None
    topic_ids: dict[str, str] = {}  # topic -> the broker's topic id when it was ingested

    def rows_by_partition(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for f in self.files:
            out[f.range.partition] = out.get(f.range.partition, 0) + f.rows
        return out

    def source_uri(self) -> str:
        """The Kafka ranges as one URI-like string: `kafka://topic?p0=0-100&p1=0-98`."""
        by_topic: dict[str, list[str]] = {}
        for r in sorted(self.ranges, key=lambda r: (r.topic, r.partition)):
            by_topic.setdefault(r.topic, []).append(f"p{r.partition}={r.start}-{r.end}")
        return ";".join(f"kafka://{t}?{'&'.join(parts)}" for t, parts in by_topic.items())


def ranges_id(ranges: Sequence[OffsetRange]) -> str:
    """The version id of a set of ranges: the same ranges always give the same id."""
    canonical = sorted((r.topic, r.partition, r.start, r.end) for r in ranges)
    return "v-" + hashlib.sha256(json.dumps(canonical).encode()).hexdigest()[:20]


def content_digest(files: Sequence[DataFile]) -> str:
    """A digest of a version's content: the files' digests in offset order.

    128 bits of SHA-256 (32 hex characters), which fits MLflow's dataset digest field.
    """
    h = hashlib.sha256()
    for f in sorted(files, key=lambda f: (f.range.topic, f.range.partition, f.range.start)):
        h.update(f"{f.range.topic}/{f.range.partition}/{f.range.start}-{f.range.end}:{f.sha256}\n".encode())
    return h.hexdigest()[:32]


def filesystem(root: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and path for a root: a local path, a pyarrow URI, or an fsspec URI."""
    if "://" not in root:
        return pafs.LocalFileSystem(), str(Path(root).resolve())
    try:
        return pafs.FileSystem.from_uri(root)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        import fsspec

        fs, path = fsspec.core.url_to_fs(root)
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


@dataclass(frozen=True)
class Window:
    """The versions a training window selects, and the bounds to keep within them.

    `records_from` (partition -> first offset) keeps the records from those offsets of the
    records topic on; `last_rows` the newest rows by offset (per partition, in proportion to
    what each holds): both by Kafka's order, never by a clock. `since`/`until` bound event time,
    for users who ask for time windows.
    """

    manifests: tuple[Manifest, ...]
    since: datetime | None = None
    until: datetime | None = None
    last_rows: int | None = None
    records_from: Mapping[int, int] | None = None

    @property
    def rows(self) -> int:
        return sum(m.rows for m in self.manifests)


def _shares(rows: int, counts: Any) -> list[int]:
    """`rows` split in proportion to `counts`, whole numbers that add up to `rows` (largest remainders)."""
    quotas = rows * counts / counts.sum()
    shares = np.floor(quotas).astype(int)
    for i in np.argsort(-(quotas - shares), kind="stable")[: rows - int(shares.sum())]:
        shares[i] += 1
    return [int(x) for x in shares]


def _mask(
    table: pa.Table,
    floors: Mapping[int, int] | None,
    since: datetime | None,
    until: datetime | None,
    event_time: str,
) -> Any:
    """The rows of `table` at or past their partition's floor offset and within [since, until); None: all."""
    masks = []
    if floors is not None:
        partitions, offsets = table["partition"], table["offset"]
        ours = [pc.and_(pc.equal(partitions, p), pc.greater_equal(offsets, floor)) for p, floor in floors.items()]
        mask = ours[0] if ours else pa.array([False] * len(table))
        for more in ours[1:]:
            mask = pc.or_(mask, more)
        masks.append(mask)
    times = table[event_time]
    if since is not None:
        masks.append(pc.greater_equal(times, pa.scalar(since, times.type)))
    if until is not None:
        masks.append(pc.less(times, pa.scalar(until, times.type)))
    if not masks:
        return None
    mask = masks[0]
    for more in masks[1:]:
        mask = pc.and_(mask, more)
    return mask


class DatasetStore:
    """Versions of one pipeline's dataset (see the module docstring)."""

    def __init__(self, root: str, pipeline: str) -> None:
        self.root = root
        self.pipeline = pipeline
        self.fs, base = filesystem(root)
        self.base = posixpath.join(base, pipeline, "versions")

    # --- reading ---------------------------------------------------------------------------

    def versions(self) -> list[Manifest]:
        """Every committed version, oldest first."""
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.base, allow_not_found=True))
        except FileNotFoundError:
            return []
        manifests = []
        for info in infos:
            if info.type == pafs.FileType.Directory:
                manifest = self._read_manifest(info.path)
                if manifest is not None:
                    manifests.append(manifest)
        return sorted(manifests, key=lambda m: (m.created_at, m.version_id))

    def get(self, version_id: str) -> Manifest:
        manifest = self._read_manifest(posixpath.join(self.base, version_id))
        if manifest is None:
            raise KeyError(f"no dataset version {version_id!r} in {self.root}/{self.pipeline}")
        return manifest

    def find(self, ranges: Sequence[OffsetRange]) -> Manifest | None:
        """The committed version of exactly these ranges, if there is one."""
        return self._read_manifest(posixpath.join(self.base, ranges_id(ranges)))

    def next_ranges(
        self, topic: str, high_watermarks: dict[int, int], topic_id: str | None = None
    ) -> list[OffsetRange]:
        """From the end of what the versions hold, per partition, up to the high watermarks.

        With `topic_id`, versions ingested from another incarnation of the topic (deleted and
        recreated, so its offsets restarted) are refused: continuing from their offsets would
        silently skip records.
        """
        ends: dict[int, int] = {}
        for manifest in self.versions():
            known = manifest.topic_ids.get(topic)
            if topic_id and known and known != topic_id:
                raise DriftloopError(
                    f"the dataset store {self.root}/{self.pipeline} holds {manifest.version_id}, ingested from "
                    f"another incarnation of {topic} (topic id {known}, now {topic_id}): its offsets do not "
                    "continue there; use a new datasets.root for the new topic"
                )
            for r in manifest.ranges:
                if r.topic == topic:
                    ends[r.partition] = max(ends.get(r.partition, 0), r.end)
        return [
            OffsetRange(topic=topic, partition=p, start=ends.get(p, 0), end=hw)
            for p, hw in sorted(high_watermarks.items())
            if hw > ends.get(p, 0)
        ]

    def files(self, manifest: Manifest) -> list[str]:
        folder = posixpath.join(self.base, manifest.version_id)
        return [posixpath.join(folder, f.path) for f in manifest.files]

    def window(
        self,
        *,
        version_ids: Sequence[str] | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        last_rows: int | None = None,
        records_from: Sequence[OffsetRange] | None = None,
    ) -> Window:
        """Select versions by id, by records-topic offsets (`records_from`: from each range's start
        on), by event time (`since` <= t < `until`), and/or by the newest rows (by offset)."""
        starts = {r.partition: r.start for r in records_from} if records_from else None
        if version_ids is not None:
            return Window(tuple(self.get(v) for v in version_ids), since, until, None, starts)
        chosen = self.versions()
        if starts is not None:
            chosen = [m for m in chosen if any(r.end > starts.get(r.partition, r.end) for r in m.ranges)]
        if since is not None or until is not None:
            chosen = [
                m
                for m in chosen
                if m.max_event_time is not None
                and (since is None or m.max_event_time >= since)
                and (until is None or m.min_event_time is None or m.min_event_time < until)
            ]
        if last_rows is not None:
            picked: list[Manifest] = []
            for manifest in reversed(chosen):
                if sum(m.rows for m in picked) >= last_rows:
                    break
                picked.append(manifest)
            chosen = list(reversed(picked))
        return Window(tuple(chosen), since, until, last_rows, starts)

    def rows_in(self, window: Window, event_time: str) -> int:
        """How many rows `read(window)` gives (reads only the partition, offset and time columns)."""
        paths = [p for m in window.manifests for p in self.files(m)]
        return len(self._kept(paths, window, event_time)) if paths else 0

    def read(self, window: Window, event_time: str) -> object:
        """The window as one Ray Dataset (`event_time`: the schema's event-time column)."""
        import ray.data

        paths = self._paths(window)
        ds = ray.data.read_parquet(paths, filesystem=self.fs)
        keep = self._keep(paths, window, event_time)
        return ds if keep is None else ds.map_batches(keep, batch_format="pyarrow")

    def read_table(self, window: Window, event_time: str) -> pa.Table:
        """The same rows as `read`, as one Arrow table read in this process (for small windows,
        where Ray Data's read tasks cost more to start than the read takes)."""
        import pyarrow.parquet as pq

        paths = self._paths(window)
        tables = [pq.read_table(p, filesystem=self.fs) for p in paths]
        table = pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]
        keep = self._keep(paths, window, event_time)
        return table if keep is None else keep(table)

    def _paths(self, window: Window) -> list[str]:
        paths = [p for m in window.manifests for p in self.files(m)]
        if not paths:
            raise ValueError(f"the window selects no data in {self.root}/{self.pipeline}")
        return paths

    def _keep(self, paths: Sequence[str], window: Window, event_time: str) -> Any:
        """The filter a read applies to each block, or None when the window keeps every row."""
        if window.since is None and window.until is None and window.last_rows is None and not window.records_from:
            return None
        floors = self._floors(paths, window, event_time)
        since, until = window.since, window.until
        if floors is None and since is None and until is None:
            return None  # the window holds no more than its newest rows: all of them

        def keep(batch: pa.Table) -> pa.Table:
            mask = _mask(batch, floors, since, until, event_time)
            return batch if mask is None else batch.filter(mask)

        return keep

    def _kept(self, paths: Sequence[str], window: Window, event_time: str) -> pa.Table:
        """(partition, offset) of the rows within the window's offsets and event-time bounds."""
        import pyarrow.dataset as pads

        table = pads.dataset(list(paths), filesystem=self.fs, format="parquet").to_table(
            columns=["partition", "offset", event_time]
        )
        mask = _mask(table, window.records_from, window.since, window.until, event_time)
        return table if mask is None else table.filter(mask)

    def _floors(self, paths: Sequence[str], window: Window, event_time: str) -> dict[int, int] | None:
        """Per partition, the first offset the window keeps: from `records_from` and the newest rows."""
        floors = dict(window.records_from) if window.records_from else None
        if window.last_rows is None:
            return floors
        kept = self._kept(paths, window, event_time)
        total = len(kept)
        if total <= window.last_rows:
            return floors
        floors = {}
        partitions = kept["partition"].to_numpy()
        offsets = kept["offset"].to_numpy()
        keys = np.unique(partitions)
        counts = np.array([(partitions == p).sum() for p in keys])
        for p, share in zip(keys, _shares(window.last_rows, counts), strict=True):
            mine = np.sort(offsets[partitions == p])  # the newest `share` rows of each partition
            floors[int(p)] = int(mine[len(mine) - share]) if share else int(mine[-1]) + 1
        return floors

    # --- writing ---------------------------------------------------------------------------

    def new_attempt(self, ranges: Sequence[OffsetRange]) -> str:
        """A fresh folder for the data files of one ingestion attempt of these ranges."""
        folder = posixpath.join(self.base, ranges_id(ranges), f"attempt-{uuid.uuid4().hex[:12]}")
        self.fs.create_dir(folder, recursive=True)
        return folder

    def commit(
        self,
        ranges: Sequence[OffsetRange],
        attempt: str,
        files: Sequence[DataFile],
        schema: pa.Schema,
        now: datetime | None = None,
        topic_ids: dict[str, str] | None = None,
    ) -> Manifest:
        """Write the manifest (last, atomically), making the version visible; returns it.

        If the same ranges were committed meanwhile, that version wins and is returned.
        """
        version_id = ranges_id(ranges)
        existing = self.find(ranges)
        if existing is not None:
            self._delete(attempt)
            return existing
        versions = self.versions()
        times = [t for f in files for t in (f.min_event_time, f.max_event_time) if t is not None]
        folder = posixpath.join(self.base, version_id)
        relative = posixpath.relpath(attempt, folder)
        files = [msgspec.structs.replace(f, path=posixpath.join(relative, f.path)) for f in files]
        invalid: dict[str, int] = {}
        for f in files:
            for kind, n in f.invalid.items():
                invalid[kind] = invalid.get(kind, 0) + n
        manifest = Manifest(
            version_id=version_id,
            pipeline=self.pipeline,
            ranges=tuple(sorted(ranges, key=lambda r: (r.topic, r.partition))),
            files=tuple(sorted(files, key=lambda f: (f.range.topic, f.range.partition, f.range.start))),
            rows=sum(f.rows for f in files),
            invalid_rows=sum(invalid.values()),
            invalid_by_kind=invalid,
            schema=schema.to_string(show_schema_metadata=False),
            columns=tuple((f.name, str(f.type)) for f in schema),
            digest=content_digest(files),
            created_at=now or utcnow(),
            parent=versions[-1].version_id if versions else None,
            min_event_time=min(times) if times else None,
            max_event_time=max(times) if times else None,
            topic_ids=dict(topic_ids or {}),
        )
        temporary = posixpath.join(folder, f".{MANIFEST}.{uuid.uuid4().hex[:8]}")
        with self.fs.open_output_stream(temporary) as out:
            out.write(msgspec.json.format(msgspec.json.encode(manifest)))
        self.fs.move(temporary, posixpath.join(folder, MANIFEST))
        for info in self.fs.get_file_info(pafs.FileSelector(folder)):
            if info.type == pafs.FileType.Directory and info.path.rstrip("/") != attempt.rstrip("/"):
                self._delete(info.path)  # an abandoned attempt of these ranges
        return manifest

    def _delete(self, folder: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.delete_dir(folder)

    def _read_manifest(self, folder: str) -> Manifest | None:
        try:
            with self.fs.open_input_stream(posixpath.join(folder, MANIFEST)) as f:
                return msgspec.json.decode(f.read(), type=Manifest)
        except FileNotFoundError:
            return None
