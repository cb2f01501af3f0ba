"""Feature engineering: declared once in the config, fitted with Ray Data, applied everywhere.

`FeaturePipeline` is the compiled transform. It holds the plan (which step applies to which
input, from the config) and the fitted statistics (means, quantiles, vocabularies), and maps
a batch of columns to one float32 matrix. Training calls it on Ray Data batches
(`map_batches`), serving on single records or lists of records (`transform_records`); both go
through the same `transform` function, so they cannot disagree.

The statistics are plain JSON (`to_json` / `from_json`) and are saved with each model.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from streams.config import Derived, FeatureSettings, RecordSchema, Step

__all__ = ["FeaturePipeline", "InputPlan", "fit_pipeline", "merge_summaries", "plan_inputs", "summarise_batch"]

FORMAT_VERSION = 1
OTHER = "__other__"


@dataclass(frozen=True)
class InputPlan:
    """How one model input is made: its source, its stateless steps, and its fitted step."""

    name: str
    kind: str  # float, int, bool, category
    derived: Derived | None
    pre: tuple[Step, ...]
    fitted: Step | None


def plan_inputs(schema: RecordSchema, settings: FeatureSettings) -> list[InputPlan]:
    """The config's transforms, with defaults for inputs it does not name."""
    declared = {t.name: t.steps for t in settings.transforms}
    inputs: list[tuple[str, str, Derived | None]] = [(f.name, f.type, None) for f in schema.features]
    inputs += [(d.name, "float", d) for d in settings.derived]
    plans = []
    for name, kind, derived in inputs:
        steps = declared.get(name)
        if steps is None:
            steps = {"category": (Step(op="one_hot"),), "bool": ()}.get(kind, (Step(op="standardize"),))
        if any(s.op == "drop" for s in steps):
            continue
        fitted = (
            steps[-1] if steps and steps[-1].op in ("standardize", "minmax", "bucketize", "one_hot", "hash") else None
        )
        pre = steps[:-1] if fitted is not None else steps
        plans.append(InputPlan(name, kind, derived, tuple(pre), fitted))
    return plans


def _numeric(values: Any) -> np.ndarray:
    """A float64 array; None becomes NaN."""
    array = np.asarray(values)
    if array.dtype == object:
        try:
            return array.astype(np.float64)
        except TypeError:  # None among the values
            return np.array([np.nan if v is None else v for v in array], dtype=np.float64)
    return array.astype(np.float64, copy=False)


def _strings(values: Any) -> np.ndarray:
    array = np.asarray(values, dtype=object)
    return (
        np.array(["" if v is None else str(v) for v in array], dtype=object)
        if array.dtype == object
        else array.astype(str).astype(object)
    )


def _apply_pre(plan: InputPlan, columns: Mapping[str, Any]) -> np.ndarray:
    """The input's values after derivation and the stateless steps."""
    if plan.derived is not None:
        a, b = (_numeric(columns[n]) for n in plan.derived.inputs)
        op = plan.derived.op
        if op == "ratio":
            x = np.divide(a, b, out=np.zeros_like(a), where=b != 0)
        elif op == "product":
            x = a * b
        elif op == "difference":
            x = a - b
        else:
            x = a + b
    elif plan.kind in ("float", "int", "bool"):
        x = _numeric(columns[plan.name])
    else:
        return _strings(columns[plan.name])
    for step in plan.pre:
        if step.op == "clip":
            x = np.clip(x, -np.inf if step.min is None else step.min, np.inf if step.max is None else step.max)
        elif step.op == "log1p":
            x = np.log1p(np.maximum(x, 0.0))
    return x


def _codes(values: np.ndarray, code_of: Any) -> np.ndarray:
    """Map each value through `code_of`, computing it once per distinct value."""
    seen: dict[Any, int] = {}
    out = np.empty(len(values), dtype=np.int64)
    for i, v in enumerate(values.tolist()):
        code = seen.get(v)
        if code is None:
            code = seen[v] = code_of(v)
        out[i] = code
    return out


def _hash_bucket(values: np.ndarray, buckets: int) -> np.ndarray:
    return _codes(values, lambda v: zlib.crc32(str(v).encode()) % buckets)


class FeaturePipeline:
    """The compiled transform: the plan plus fitted statistics (see the module docstring)."""

    def __init__(self, schema: RecordSchema, settings: FeatureSettings, stats: Mapping[str, Mapping[str, Any]]) -> None:
        self.schema = schema
        self.settings = settings
        self.plans = plan_inputs(schema, settings)
        self.stats = {k: dict(v) for k, v in stats.items()}
        missing = [p.name for p in _needs_stats(self.plans) if p.name not in self.stats]
        if missing:
            raise ValueError(f"no fitted statistics for {', '.join(missing)}")
        self.output_names = [name for plan in self.plans for name in self._names(plan)]
        self._compiled = [self._compile(plan) for plan in self.plans]
        self.classes = list(schema.label.classes)
        self._class_index = {c: i for i, c in enumerate(self.classes)}

    def _names(self, plan: InputPlan) -> list[str]:
        step = plan.fitted
        if step is None or step.op in ("standardize", "minmax"):
            return [plan.name]
        if step.op == "bucketize":
            edges = self._boundaries(plan)
            return [f"{plan.name}[bucket {i}]" for i in range(len(edges) + 1)]
        if step.op == "hash":
            return [f"{plan.name}[hash {i}]" for i in range(step.buckets or 0)]
        return [f"{plan.name}={v}" for v in self.stats[plan.name]["vocabulary"]] + [f"{plan.name}={OTHER}"]

    def _boundaries(self, plan: InputPlan) -> list[float]:
        assert plan.fitted is not None
        if plan.fitted.boundaries:
            return list(plan.fitted.boundaries)
        return list(self.stats[plan.name]["boundaries"])

    @property
    def width(self) -> int:
        return len(self.output_names)

    def transform(self, columns: Mapping[str, Any]) -> np.ndarray:
        """A batch of columns (numpy arrays, lists, an Arrow table or a DataFrame) -> float32 (n, width).

        Each input writes its own columns of one preallocated matrix (serving calls this with a
        handful of rows, where allocating and concatenating a part per input costs more than the
        arithmetic); NaN and infinities become 0.
        """
        out: np.ndarray | None = None
        rows: np.ndarray | None = None
        at = 0
        for plan, width, op, params in self._compiled:
            x = _apply_pre(plan, columns)
            if out is None:
                out = np.zeros((len(x), self.width), dtype=np.float32)
                rows = np.arange(len(x))
            if op is None:
                out[:, at] = x
            elif op == "standardize" or op == "minmax":
                offset, scale = params
                out[:, at] = (x - offset) / scale
            elif op == "bucketize":
                out[rows, at + np.searchsorted(params, x, side="right")] = 1.0
            elif op == "hash":
                out[rows, at + _hash_bucket(x, params)] = 1.0
            else:  # one_hot: params is the vocabulary's lookup; anything else is the last column
                out[rows, at + _codes(x, lambda v, lookup=params, other=width - 1: lookup.get(v, other))] = 1.0
            at += width
        if out is None:
            return np.zeros((0, 0), dtype=np.float32)
        if not np.isfinite(out).all():
            np.nan_to_num(out, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
        return out

    def _compile(self, plan: InputPlan) -> tuple[InputPlan, int, str | None, Any]:
        """What `transform` needs of one input, worked out once: its width, op and constants."""
        step = plan.fitted
        width = len(self._names(plan))
        if step is None:
            return plan, width, None, None
        if step.op == "standardize":
            s = self.stats[plan.name]
            return plan, width, step.op, (s["mean"], s["std"] or 1.0)
        if step.op == "minmax":
            s = self.stats[plan.name]
            return plan, width, step.op, (s["min"], (s["max"] - s["min"]) or 1.0)
        if step.op == "bucketize":
            return plan, width, step.op, np.asarray(self._boundaries(plan), dtype=np.float64)
        if step.op == "hash":
            return plan, width, step.op, step.buckets or 1
        return plan, width, step.op, {v: i for i, v in enumerate(self.stats[plan.name]["vocabulary"])}

    def transform_records(self, records: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """Single records or a list of them (serving) through the very same `transform`."""
        needed = {n for p in self.plans for n in ((p.derived.inputs if p.derived else ()) or (p.name,))}
        columns = {name: np.array([r.get(name) for r in records], dtype=object) for name in needed}
        return self.transform(columns)

    def encode_labels(self, values: Any) -> np.ndarray:
        """Class labels -> indices in the config's class order; an unknown label is an error."""
        try:
            return np.array([self._class_index[v] for v in np.asarray(values).tolist()], dtype=np.int64)
        except KeyError as err:
            raise ValueError(f"unknown label {err.args[0]!r}; classes are {self.classes}") from None

    def batch_fn(self) -> Any:
        """A function for `Dataset.map_batches(batch_format="numpy")`: columns -> {x, y}."""
        label = self.schema.label.name

        def to_model_inputs(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            out = {"x": self.transform(batch)}
            if label in batch:
                out["y"] = self.encode_labels(batch[label])
            return out

        return to_model_inputs

    def to_json(self) -> str:
        return json.dumps(
            {"format_version": FORMAT_VERSION, "outputs": self.output_names, "stats": self.stats}, sort_keys=True
        )

    @classmethod
    def from_json(cls, text: str, schema: RecordSchema, settings: FeatureSettings) -> FeaturePipeline:
        data = json.loads(text)
        if data.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"feature statistics format {data.get('format_version')!r} is not {FORMAT_VERSION}")
        pipeline = cls(schema, settings, data["stats"])
        if pipeline.output_names != data["outputs"]:
            raise ValueError("the feature statistics were fitted for another feature config")
        return pipeline


def numpy_batch(table: pa.Table) -> dict[str, np.ndarray]:
    """An Arrow table as Ray Data's numpy batch format has it (what `map_batches(batch_format=
    "numpy")` hands a function; Ray converts each column the same way, and a test checks that
    both give the same arrays), without importing Ray Data."""
    return {name: table[name].combine_chunks().to_numpy(zero_copy_only=False) for name in table.column_names}


def fit_pipeline(dataset: Any, schema: RecordSchema, settings: FeatureSettings) -> FeaturePipeline:
    """Fit the statistics on a Ray Dataset (or an Arrow table) in one pass.

    Each block is summarised where it lies (`map_batches`: counts, sums of squares, minima,
    value counts, the values quantiles need) and the driver merges the summaries. A global
    `Dataset.aggregate` computes the same, but through hash-shuffle actors that cost seconds
    to start in every job; the fit is a reduction to a few numbers, which this does directly.
    """
    plans = _needs_stats(plan_inputs(schema, settings))
    if not plans:
        return FeaturePipeline(schema, settings, {})

    if isinstance(dataset, pa.Table):  # a small window, read in the job's process: one batch
        return FeaturePipeline(schema, settings, merge_summaries(plans, [summarise_batch(plans, numpy_batch(dataset))]))

    def summarise(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"summary": np.array([json.dumps(summarise_batch(plans, batch))], dtype=object)}

    rows = dataset.map_batches(summarise, batch_format="numpy", batch_size=None).take_all()
    return FeaturePipeline(schema, settings, merge_summaries(plans, [json.loads(r["summary"]) for r in rows]))


def summarise_batch(plans: Sequence[InputPlan], batch: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """One batch's share of the fitted statistics (NaN and infinities do not count)."""
    out: dict[str, dict[str, Any]] = {}
    for plan in plans:
        op = plan.fitted.op  # type: ignore[union-attr]
        x = _apply_pre(plan, batch)
        if op == "one_hot":
            values, counts = np.unique(x.astype(str), return_counts=True)
            out[plan.name] = {"counts": dict(zip(values.tolist(), counts.tolist(), strict=True))}
            continue
        x = x[np.isfinite(x)]
        if op == "standardize":
            mean = float(x.mean()) if len(x) else 0.0
            out[plan.name] = {"n": len(x), "mean": mean, "m2": float(np.sum((x - mean) ** 2))}
        elif op == "minmax":
            out[plan.name] = {"min": float(x.min()) if len(x) else None, "max": float(x.max()) if len(x) else None}
        else:  # bucketize: quantiles need the values themselves
            out[plan.name] = {"values": x.tolist()}
    return out


def merge_summaries(plans: Sequence[InputPlan], parts: Sequence[Mapping[str, Mapping[str, Any]]]) -> dict[str, Any]:
    """The fitted statistics from the batches' summaries (Chan et al.'s pairwise mean and variance)."""
    stats: dict[str, dict[str, Any]] = {}
    for plan in plans:
        op = plan.fitted.op  # type: ignore[union-attr]
        mine = [p[plan.name] for p in parts]
        if op == "standardize":
            n = sum(m["n"] for m in mine)
            mean = sum(m["n"] * m["mean"] for m in mine) / n if n else None
            m2 = sum(m["m2"] + m["n"] * (m["mean"] - mean) ** 2 for m in mine) if mean is not None else None
            stats[plan.name] = {"mean": _finite(mean), "std": _finite(math.sqrt(m2 / n) if n else None, 1.0)}
        elif op == "minmax":
            lows = [m["min"] for m in mine if m["min"] is not None]
            highs = [m["max"] for m in mine if m["max"] is not None]
            stats[plan.name] = {"min": _finite(min(lows, default=None)), "max": _finite(max(highs, default=None), 1.0)}
        elif op == "bucketize":
            k = plan.fitted.quantiles or 4  # type: ignore[union-attr]
            values = np.concatenate([np.asarray(m["values"], dtype=np.float64) for m in mine] or [np.empty(0)])
            cuts = np.quantile(values, [i / k for i in range(1, k)]).tolist() if len(values) else [None]
            stats[plan.name] = {"boundaries": sorted({_finite(c) for c in cuts})}
        else:
            counts: dict[str, int] = {}
            for m in mine:
                for value, count in m["counts"].items():
                    counts[value] = counts.get(value, 0) + count
            pairs = sorted(counts.items(), key=lambda vc: (-vc[1], vc[0]))
            limit = plan.fitted.max_categories or len(pairs)  # type: ignore[union-attr]
            stats[plan.name] = {"vocabulary": [v for v, _ in pairs[:limit]]}
    return stats


def _needs_stats(plans: Sequence[InputPlan]) -> list[InputPlan]:
    """The inputs whose last step learns something from data (fixed buckets and hashing do not)."""
    return [
        p
        for p in plans
        if p.fitted is not None and p.fitted.op != "hash" and not (p.fitted.op == "bucketize" and p.fitted.boundaries)
    ]


def _finite(value: Any, default: float = 0.0) -> float:
    return float(value) if value is not None and math.isfinite(float(value)) else default
