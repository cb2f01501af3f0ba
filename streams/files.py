"""A user's own data file: read it (CSV, Parquet, JSON Lines), infer a pipeline config from it,
and turn its rows into records.

`read_table` is the only I/O; `infer_config` and `file_records` are pure functions of the table,
so what `driftloop init --from` writes and what `driftloop produce --from` sends can be tested
without a broker.

Inference, column by column (the label, the record id, the entity id and the time column are the
ones the user names):

- booleans are `bool`; integers `int`; other numbers `float`; with a range of the values seen
  widened by half its width on each side (never below 0 for a column that never is), so that
  new data a little outside the file's is still accepted and out-of-range data is refused;
- text with few distinct values (`MAX_CATEGORIES`) is a category; text that is all numbers is a
  number; other text (free text, ids) is left out, and then `unknown_fields: ignore` lets
  records keep it;
- a column with missing values (or empty text) is `nullable`;
- the label's distinct values are its classes (integers stay integers).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from streams.coerce import coerce_record
from streams.config import RESERVED_COLUMNS, PipelineConfig, RecordSchema, parse_config
from streams.errors import ConfigError, DriftloopError
from streams.events import request_id_of

__all__ = [
    "MAX_CATEGORIES",
    "MAX_CLASSES",
    "FileStream",
    "Inferred",
    "file_records",
    "infer_config",
    "read_table",
]

MAX_CATEGORIES = 50  # distinct text values above which a column is not a category
MAX_CLASSES = 100  # distinct label values above which the label is not a classification target
FORMATS = {".csv": "csv", ".tsv": "tsv", ".parquet": "parquet", ".pq": "parquet", ".jsonl": "json", ".ndjson": "json",
           ".json": "json"}  # fmt: skip


def read_table(path: str | Path) -> pa.Table:
    """The whole file as one Arrow table; a `DriftloopError` naming the file when it cannot be read."""
    path = Path(path)
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise DriftloopError(f"{path}: unknown file type {path.suffix!r}; use .csv, .tsv, .parquet or .jsonl")
    if not path.is_file():
        raise DriftloopError(f"{path}: no such file")
    try:
        if kind == "parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
        elif kind == "json":
            import pyarrow.json as pj

            table = pj.read_json(path)
        else:
            import pyarrow.csv as pcsv

            parse = pcsv.ParseOptions(delimiter="\t" if kind == "tsv" else ",")
            table = pcsv.read_csv(path, parse_options=parse)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError, UnicodeDecodeError) as err:
        raise DriftloopError(f"{path}: not a readable {kind} file: {str(err).splitlines()[0]}") from None
    if table.num_rows == 0:
        raise DriftloopError(f"{path}: the file has no rows")
    return table


@dataclass
class Inferred:
    """What `infer_config` made of a table: the config's YAML, the config, and what to tell the user."""

    text: str
    config: PipelineConfig
    notes: list[str] = field(default_factory=list)
    columns: list[tuple[str, str]] = field(default_factory=list)  # (column, what it became)


def infer_config(
    table: pa.Table,
    *,
    label: str,
    name: str,
    record_id: str | None = None,
    timestamp: str | None = None,
    entity_id: str | None = None,
    source: str = "<file>",
) -> Inferred:
    """A pipeline config for the data in `table` (see the module docstring)."""
    present = table.column_names
    for option, column in (("--label", label), ("--id", record_id), ("--time", timestamp), ("--entity", entity_id)):
        if column is not None and column not in present:
            raise ConfigError(source, option, f"a column of the file ({', '.join(present[:20])})", column)
    for column in present:
        if column in RESERVED_COLUMNS:
            raise ConfigError(
                source, column, f"a column name other than {', '.join(RESERVED_COLUMNS)} (Kafka's metadata in every "
                "dataset): rename the column in the file", column,
            )  # fmt: skip
    notes: list[str] = []
    columns: list[tuple[str, str]] = []
    classes = _classes(table.column(label), label, source)
    columns.append((label, f"label, {len(classes)} classes: {', '.join(map(str, classes[:12]))}"))
    features: dict[str, dict[str, Any]] = {}
    transforms: dict[str, list[Any]] = {}
    skipped: list[str] = []
    for column in present:
        if column in (label, record_id, timestamp, entity_id):
            continue
        spec, transform, what = _feature(table.column(column))
        if spec is None:
            skipped.append(column)
            columns.append((column, f"left out: {what}"))
            continue
        features[column] = spec
        if transform is not None:
            transforms[column] = transform
        columns.append((column, what))
    if not features:
        raise ConfigError(source, "<columns>", "at least one column that can be a feature", present)
    for role, column in (("record id", record_id), ("entity id", entity_id), ("event time", timestamp)):
        if column is not None:
            columns.append((column, role))
    if record_id is None:
        notes.append(
            "no --id: a record is named by its Kafka offsets; `produce --from` names each row's label by the "
            "file and row (`<file name>:<row>`, e.g. `data.csv:17`), and `run --from` sends its requests with "
            "those ids: a client of your own must send them as its request ids for its labels to join"
        )
    if timestamp is None:
        notes.append("no --time: each record's Kafka timestamp is its event time")
    if skipped:
        notes.append(f"left out (not features): {', '.join(skipped)}; unknown_fields: ignore lets records keep them")
    rows = table.num_rows
    window = int(min(2000, max(200, rows // 20)))
    schema: dict[str, Any] = {
        "record_id": record_id,
        "entity_id": entity_id,
        "timestamp": timestamp,
        "label": {"name": label, "classes": classes},
        "unknown_fields": "ignore" if skipped else "reject",
        "coerce": True,
        "features": features,
    }
    data: dict[str, Any] = {
        "name": name,
        "kafka": {"bootstrap_servers": "embedded", "partitions": 4},
        "schema": schema,
        "features": {"transforms": transforms},
        "search": {  # model selection: the MLP and gradient-boosted trees, each with its own knobs
            "trials": 8,
            "families": ["mlp", "xgboost"],
            "space": {
                "learning_rate": {"low": 0.0005, "high": 0.02, "log": True},
                "hidden": {"choices": ["32", "64,32", "128,64"]},
                "eta": {"low": 0.03, "high": 0.3, "log": True},
                "max_depth": {"low": 3, "high": 8},
                "rounds": {"choices": [100, 200, 400]},
            },
        },
        "monitor": {"window_size": window, "performance_window": max(100, window // 2)},
        "retrain": {"min_window": max(100, window // 4), "train_rows": int(min(max(rows // 2, 1000), 50_000))},
    }
    import yaml

    header = (
        f"# Inferred by `driftloop init` from {source} ({rows} rows, {len(present)} columns).\n"
        "# Check the ranges and categories: a record outside them goes to the dead-letter topic.\n"
        "# Every setting not written here has its default (see configs/demo.yaml for all of them).\n"
    )
    text = header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    config = parse_config(text, source=source, env={})
    return Inferred(text, config, notes, columns)


def file_records(
    table: pa.Table, schema: RecordSchema, batch_rows: int = 4096, coerce: bool = True
) -> Iterator[tuple[int, dict[str, Any]]]:
    """(row number, record) for every row; with `coerce`, converted losslessly to the schema's types
    (`streams.coerce`; without, the caller converts the rows the codec refuses, as `publish_file` does).

    Columns the schema does not know stay in the record (the codec refuses or ignores them as
    `schema.unknown_fields` says); missing values are left out, as the record codec expects.
    """
    index = 0
    for batch in table.to_batches(max_chunksize=batch_rows):
        for row in batch.to_pylist():
            record = {k: v for k, v in row.items() if v is not None}
            yield index, coerce_record(schema, record) if coerce else record
            index += 1


def _classes(column: pa.ChunkedArray, label: str, source: str) -> list[Any]:
    values = pc.drop_null(column)
    if pa.types.is_floating(values.type):
        numbers = values.to_numpy(zero_copy_only=False)
        if not bool(np.all(np.isfinite(numbers) & (numbers == np.floor(numbers)))):
            raise ConfigError(source, "--label", "a column of classes (a regression target is not supported)", label)
        values = values.cast(pa.int64())
    if pa.types.is_boolean(values.type):
        values = values.cast(pa.string())
    distinct = pc.unique(values).to_pylist()
    if len(distinct) < 2:
        raise ConfigError(source, "--label", "a column with at least two classes", f"{label} ({distinct})")
    if len(distinct) > MAX_CLASSES:
        raise ConfigError(source, "--label", f"a column of at most {MAX_CLASSES} classes", f"{label} ({len(distinct)})")
    if pa.types.is_integer(values.type):
        return sorted(int(v) for v in distinct)
    return sorted(str(v) for v in distinct)


def _feature(column: pa.ChunkedArray) -> tuple[dict[str, Any] | None, list[Any] | None, str]:
    """The column's feature spec, its transform, and a phrase saying what it became."""
    tp = column.type
    nulls = column.null_count
    if pa.types.is_string(tp) or pa.types.is_large_string(tp):
        text = pc.utf8_trim_whitespace(column)
        empty = pc.sum(pc.equal(text, "")).as_py() or 0
        nulls += empty
        values = pc.drop_null(pc.if_else(pc.equal(text, ""), None, text))
        numbers = _as_numbers(values)
        if numbers is not None:
            column, tp = numbers, numbers.type
        else:
            counts = pc.value_counts(values).to_pylist()
            if len(counts) > MAX_CATEGORIES:
                return None, None, f"text with {len(counts)} distinct values (more than {MAX_CATEGORIES})"
            if len(counts) < 2:
                return None, None, "a constant"
            counts.sort(key=lambda c: (-c["counts"], c["values"]))
            categories = [c["values"] for c in counts]
            spec: dict[str, Any] = {"type": "category", "categories": categories}
            if nulls:
                spec["nullable"] = True
            return spec, ["one_hot"], f"category ({len(categories)} values)" + (", nullable" if nulls else "")
    if pa.types.is_boolean(tp):
        spec = {"type": "bool"}
        if nulls:
            spec["nullable"] = True
        return spec, None, "bool" + (", nullable" if nulls else "")
    if not (pa.types.is_integer(tp) or pa.types.is_floating(tp)):
        return None, None, f"a column of type {tp}"
    values = pc.drop_null(column).to_numpy(zero_copy_only=False).astype("float64")
    finite = values[np.isfinite(values)]
    if len(finite) < len(values):
        nulls += len(values) - len(finite)
    if not len(finite):
        return None, None, "no values"
    low, high = float(finite.min()), float(finite.max())
    integral = pa.types.is_integer(tp) or bool(np.all(finite == np.floor(finite)))
    margin = (high - low) / 2 or max(abs(high) / 2, 1.0)
    lo, hi = low - margin, high + margin
    if low >= 0:
        lo = max(lo, 0.0)
    if integral:
        lo, hi = float(math.floor(lo)), float(math.ceil(hi))
    spec = {"type": "int" if integral else "float", "min": _round(lo), "max": _round(hi)}
    if nulls:
        spec["nullable"] = True
    middle = len(finite) // 2
    skewed = low >= 0 and high > 0 and float(np.partition(finite, middle)[middle]) * 20 < high
    transform: list[Any] = ["log1p", "standardize"] if skewed else ["standardize"]
    what = f"{spec['type']} in [{spec['min']}, {spec['max']}]" + (", nullable" if nulls else "")
    return spec, transform, what + (", log1p" if skewed else "")


def _as_numbers(values: pa.ChunkedArray) -> pa.ChunkedArray | None:
    """Text that is all numbers, as numbers (what a CSV with quoted numbers gives)."""
    if not len(values):
        return None
    for target in (pa.int64(), pa.float64()):
        try:
            return pc.cast(values, target)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            continue
    return None


def _round(value: float) -> float | int:
    if value.is_integer() and abs(value) < 2**53:
        return int(value)
    return float(f"{value:.6g}")


class FileStream:
    """A file's rows as the loop's stream (`driftloop run --from`): the same interface as
    `StreamGenerator.records`, so the loop serves a user's file as it serves generated data.

    Rows are handed out in file order from `start`. When the file runs out, `replay` says what
    happens: the rows from `replay_from` on are served again (a "cycle"; each replayed row gets a
    request id of its own, `<id>.r<cycle>`, so its label joins its own prediction), until the
    caller stops; `cycle` counts the rounds. `drift_at` marks the rows the user knows changed.
    """

    def __init__(
        self,
        table: pa.Table,
        schema: RecordSchema,
        source: str,
        *,
        start: int = 0,
        drift_at: int | None = None,
        replay_from: int | None = None,
    ) -> None:
        self.schema = schema
        self.rows = [r for _, r in file_records(table, schema)]
        self.drift_at = drift_at
        self.position = start
        self.replay_from = replay_from if replay_from is not None else start
        self.cycle = 0
        ids = schema.record_id
        # a request id must match REQUEST_ID_PATTERN, with room for a replay's `.r<cycle>`: a row whose
        # own id does not is named by its number
        self._ids = [request_id_of(r.get(ids) if ids else None, source, i, room=27) for i, r in enumerate(self.rows)]

    def __len__(self) -> int:
        return len(self.rows)

    def records(self, n: int) -> Iterator[Any]:
        from streams.generator import GeneratedRecord

        label = self.schema.label.name
        for _ in range(n):
            if self.position >= len(self.rows):
                if self.replay_from >= len(self.rows):
                    return
                self.position, self.cycle = self.replay_from, self.cycle + 1
            i = self.position
            self.position += 1
            record = self.rows[i]
            ident = self._ids[i] if self.cycle == 0 else f"{self._ids[i]}.r{self.cycle}"
            drifted = self.drift_at is not None and i >= self.drift_at
            yield GeneratedRecord(i, record, record.get(label), drifted, ident)

    def head(self, n: int) -> list[tuple[int, dict[str, Any]]]:
        """The first `n` rows, numbered: what the first model trains on."""
        return list(enumerate(self.rows[:n]))
