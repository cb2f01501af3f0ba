"""Model artifacts of every family, described by a JSON spec: never pickled.

A model artifact is a folder:

```
spec.json            the family (`kind`), classes, input names, and for an MLP its widths
features.json        the fitted feature statistics (jobs.features.FeaturePipeline)
weights.safetensors  the weights of a neural family, or
model.ubj            an XGBoost family's booster (XGBoost's own UBJSON model format)
digests.json         SHA-256 of each of the files above (and of any extra JSON)
```

`load_artifact` verifies every digest before reading anything, then has the spec's family
(`jobs.families`) read its weights file with its library's non-pickle reader (safetensors: a
header plus raw tensors; XGBoost: a JSON-like tree dump): there is no code in either to run.
Nothing here calls `torch.load` or `pickle`. The torch modules of the neural families are
built here too (`build_model`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from jobs.artifacts import (
    DIGESTS,
    FEATURES,
    SPEC,
    ArtifactError,
    recorded_digests,
    sha256_file,
    verify_artifact,
)
from streams.config import FAMILIES, ModelSettings

__all__ = [
    "ArtifactError",
    "ModelSpec",
    "build_model",
    "load_artifact",
    "save_artifact",
]

FORMAT_VERSION = 1


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model's architecture."""

    kind: str
    input_names: tuple[str, ...]
    classes: tuple[str | int, ...]
    hidden: tuple[int, ...] = ()
    dropout: float = 0.0
    format_version: int = FORMAT_VERSION

    @property
    def input_dim(self) -> int:
        return len(self.input_names)

    @classmethod
    def from_settings(
        cls, settings: ModelSettings, input_names: list[str], classes: list[str | int], kind: str | None = None
    ) -> ModelSpec:
        kind = kind or settings.kind
        hidden = settings.hidden if kind == "mlp" else ()
        dropout = settings.dropout if kind == "mlp" else 0.0
        return cls(kind, tuple(input_names), tuple(classes), tuple(hidden), dropout)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelSpec:
        try:
            data = json.loads(text)
            spec = cls(
                kind=str(data["kind"]),
                input_names=tuple(data["input_names"]),
                classes=tuple(data["classes"]),
                hidden=tuple(int(h) for h in data.get("hidden", ())),
                dropout=float(data.get("dropout", 0.0)),
                format_version=int(data.get("format_version", 0)),
            )
        except (ValueError, KeyError, TypeError) as err:
            raise ArtifactError(f"{SPEC} is not a valid model spec: {err!r}") from None
        if spec.format_version != FORMAT_VERSION:
            raise ArtifactError(
                f"{SPEC} format {spec.format_version} is not supported (this build reads {FORMAT_VERSION})"
            )
        if spec.kind not in FAMILIES:
            raise ArtifactError(f"{SPEC}: unknown model kind {spec.kind!r}; known: {', '.join(FAMILIES)}")
        return spec


def build_model(spec: ModelSpec) -> nn.Module:
    """The PyTorch module a spec describes: an MLP, or logistic regression (one linear layer)."""
    layers: list[nn.Module] = []
    width = spec.input_dim
    for hidden in spec.hidden if spec.kind == "mlp" else ():
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        if spec.dropout:
            layers.append(nn.Dropout(spec.dropout))
        width = hidden
    layers.append(nn.Linear(width, len(spec.classes)))
    return nn.Sequential(*layers)


def save_artifact(
    folder: Path, spec: ModelSpec, model: Any, features_json: str, extra: dict[str, str] | None = None
) -> dict[str, str]:
    """Write a model artifact (plus `extra` JSON files, digested too); returns the digests.

    `model` is a fitted `jobs.families.Model` of the spec's family (a bare torch module is taken
    for the neural families)."""
    from jobs.families import family

    owner = family(spec.kind)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / SPEC).write_text(spec.to_json())
    (folder / FEATURES).write_text(features_json)
    owner.save(model, folder)
    for name, text in (extra or {}).items():
        (folder / name).write_text(text)
    names = (SPEC, FEATURES, owner.weights_file, *(extra or {}))
    digests = {name: sha256_file(folder / name) for name in names}
    (folder / DIGESTS).write_text(json.dumps(digests, sort_keys=True, indent=2))
    return digests


def load_artifact(folder: Path) -> tuple[ModelSpec, Any, str]:
    """Verify and load an artifact: (spec, a `jobs.families.Model`, features JSON). A registered
    version is verified against the registry's record first (`ModelRegistry.download`):
    `digests.json` beside the files only shows that they were not changed one at a time."""
    from jobs.families import family

    verify_artifact(folder, recorded_digests(folder))
    spec = ModelSpec.from_json((folder / SPEC).read_text())
    owner = family(spec.kind)
    if owner.weights_file not in recorded_digests(folder):
        raise ArtifactError(f"{DIGESTS} records no digest for {owner.weights_file}, the weights of a {spec.kind}")
    return spec, owner.load(spec, folder), (folder / FEATURES).read_text()


def predict_proba(model: nn.Module, x: Any, device: str | torch.device = "cpu") -> torch.Tensor:
    """Class probabilities for a float32 matrix (numpy or tensor), without gradients."""
    with torch.no_grad():
        inputs = torch.as_tensor(x, dtype=torch.float32, device=device)
        return torch.softmax(model(inputs).float(), dim=1).cpu()
