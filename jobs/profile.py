"""The reference profile of a model's training data: what drift monitoring compares against.

Per feature: for numbers, count, nulls, mean, standard deviation, min, max, the deciles and
the counts between them (the bins PSI uses); for categories and booleans, the frequency of
each value. Plain JSON, stored in every model artifact.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from streams.config import RecordSchema

__all__ = ["reference_profile"]

DECILES = [i / 10 for i in range(1, 10)]


def reference_profile(batches: Iterable[Mapping[str, Any]], schema: RecordSchema) -> dict[str, Any]:
    """Profile the schema's features (and the label) over column batches."""
    columns: dict[str, list[np.ndarray]] = {f.name: [] for f in schema.features}
    columns[schema.label.name] = []
    for batch in batches:
        for name in columns:
            if name in batch:
                columns[name].append(np.asarray(batch[name]))
    kinds = {f.name: f.type for f in schema.features}
    kinds[schema.label.name] = "category"
    profile: dict[str, Any] = {"format_version": 1, "features": {}}
    for name, parts in columns.items():
        values = np.concatenate(parts) if parts else np.array([])
        if kinds[name] in ("int", "float"):
            numbers = (
                np.array([np.nan if v is None else v for v in values], dtype=np.float64)
                if values.dtype == object
                else values.astype(np.float64)
            )
            present = numbers[~np.isnan(numbers)]
            edges = np.quantile(present, DECILES).tolist() if len(present) else []
            counts = (
                np.bincount(np.searchsorted(edges, present, side="right"), minlength=len(edges) + 1).tolist()
                if edges
                else []
            )
            profile["features"][name] = {
                "type": "numeric",
                "count": len(present),
                "nulls": int(len(numbers) - len(present)),
                "mean": float(present.mean()) if len(present) else None,
                "std": float(present.std()) if len(present) else None,
                "min": float(present.min()) if len(present) else None,
                "max": float(present.max()) if len(present) else None,
                "deciles": edges,
                "bin_counts": counts,
            }
        else:
            labels, counts = np.unique(
                np.array(["<null>" if v is None else str(v) for v in values], dtype=object), return_counts=True
            )
            total = int(counts.sum())
            profile["features"][name] = {
                "type": "categorical",
                "count": total,
                "frequencies": {str(k): int(c) for k, c in zip(labels, counts, strict=True)},
            }
    profile["rows"] = int(sum(len(p) for p in columns[schema.label.name]))
    return profile
