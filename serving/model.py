"""The model a replica serves: loaded from the registry by alias or version, verified, compiled.

A `ServedModel` is immutable; a hot swap builds a new one next to the old and replaces the
reference in one assignment, so a request sees either the old model or the new one, whole.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from jobs.families import Model
from jobs.features import FeaturePipeline
from jobs.models import ModelSpec, load_artifact
from jobs.registry import ModelRegistry
from streams.config import PipelineConfig

__all__ = ["ServedModel", "load_served_model"]


@dataclass(frozen=True)
class ServedModel:
    name: str
    version: str
    alias: str | None
    spec: ModelSpec
    model: Model  # any family's
    features: FeaturePipeline
    lineage: dict[str, str]
    labels: tuple[Any, ...] = field(init=False)  # the classes as answered: ints stay ints, others are str
    keys: tuple[str, ...] = field(init=False)  # the classes as keys of `probabilities`

    def __post_init__(self) -> None:
        labels = tuple(c if isinstance(c, int) else str(c) for c in self.spec.classes)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "keys", tuple(str(c) for c in labels))

    def predict(self, records: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """Class probabilities, one row per record, through the training-time feature transform."""
        return self.model.predict_proba(self.features.transform_records(records))


def load_served_model(
    config: PipelineConfig, registry: ModelRegistry, version: str | None = None, alias: str = "champion"
) -> ServedModel:
    """The registry's `version`, or the version `alias` points at, ready to serve."""
    chosen = version or registry.alias(alias)
    if chosen is None:
        raise LookupError(f"model {registry.name!r} has no {alias!r} alias yet: train and promote a model first")
    with tempfile.TemporaryDirectory() as folder:
        spec, model, features_json = load_artifact(registry.download(chosen, Path(folder)))
    features = FeaturePipeline.from_json(features_json, config.schema, config.features)
    tags = registry.client.get_model_version(registry.name, chosen).tags
    lineage = {
        k.removeprefix("driftloop."): v
        for k, v in tags.items()
        if k in ("driftloop.datasets", "driftloop.kafka", "driftloop.run_id")
    }
    import torch

    torch.set_num_threads(1)
    return ServedModel(registry.name, chosen, alias if version is None else None, spec, model, features, lineage)
