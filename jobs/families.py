"""Model families behind one small interface: what model selection chooses among.

A family builds a model from a `ModelSpec`, fits it on the compiled feature matrix (in this
process, or on Ray: `TorchTrainer`, `XGBoostTrainer`), saves and loads it in its library's own
non-pickle format (safetensors, XGBoost's UBJSON), and answers `predict_proba`. Serving, the
evaluation, the gate and the monitor hold a `Model` and never ask which family it is.

The contract of `ModelFamily.fit`: train on `(x_train, y_train, x_val, y_val)` with the
settings' knobs and call `on_step(Step)` `settings.epochs` times, each time with the holdout's
`val_loss` (mean log loss) and `val_accuracy`, after an equal share of the family's budget
(an epoch, or 1/epochs of the boosting rounds; a random forest grows in one round and reports
once, at the last step). `on_step` may raise to stop the fit (a pruned trial); the search
compares families by these numbers, so every family computes them the same way.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np

from jobs.models import ModelSpec
from streams.config import FAMILIES, FAMILY_KNOBS, ModelSettings, PipelineConfig

__all__ = ["Model", "ModelFamily", "Step", "family", "holdout_metrics"]

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


class Model(Protocol):
    """A fitted model of any family."""

    @property
    def spec(self) -> ModelSpec: ...

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities (rows sum to 1) for a float32 feature matrix."""
        ...


@dataclass(frozen=True)
class Step:
    """One report of a fit: after `step` of `steps` equal shares of the family's budget."""

    step: int
    steps: int
    metrics: dict[str, float]
    train_loss: float = float("nan")
    extra: dict[str, Any] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        """The step as a history row (`epoch` is the step, for every family)."""
        return {"epoch": self.step, "train_loss": self.train_loss, **self.metrics, **self.extra}


OnStep = Callable[[Step], None]


def holdout_metrics(proba: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """`val_loss` (mean natural-log loss) and `val_accuracy`, as every family reports them."""
    if len(y) == 0:
        return {"val_loss": float("nan"), "val_accuracy": float("nan")}
    picked = np.clip(proba[np.arange(len(y)), y], 1e-15, 1.0)
    return {"val_loss": float(-np.mean(np.log(picked))), "val_accuracy": float(np.mean(proba.argmax(axis=1) == y))}


class ModelFamily(ABC):
    """One kind of model. Subclasses set `name`, `budget_unit` and `weights_file`."""

    name: ClassVar[str]
    budget_unit: ClassVar[str]
    weights_file: ClassVar[str]

    @property
    def knobs(self) -> tuple[str, ...]:
        """The settings this family reads: its hyperparameters, and so its search space."""
        return FAMILY_KNOBS[self.name]

    def spec(self, settings: ModelSettings, input_names: list[str], classes: list[Any]) -> ModelSpec:
        return ModelSpec(self.name, tuple(input_names), tuple(classes))

    def params(self, settings: ModelSettings) -> dict[str, Any]:
        """What a run logs as its parameters."""
        values = {k: getattr(settings, k) for k in self.knobs}
        return {"kind": self.name, **{k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}}

    @abstractmethod
    def fit(
        self, spec: ModelSpec, settings: ModelSettings, arrays: Arrays, *, on_step: OnStep | None = None
    ) -> tuple[Model, list[dict[str, Any]]]:
        """Train in this process on the CPU (see the module docstring): (model, history rows)."""

    @abstractmethod
    def fit_on_ray(
        self,
        config: PipelineConfig,
        spec: ModelSpec,
        settings: ModelSettings,
        train: Any,
        val: tuple[np.ndarray, np.ndarray],
        out: Path,
        kill_once: dict[str, Any] | None = None,
    ) -> tuple[Model, list[dict[str, Any]], int]:
        """Train with Ray Train on `train` (a Ray Dataset of {x, y}): (model, history, rows)."""

    @abstractmethod
    def save(self, model: Model, folder: Path) -> None:
        """Write the model's `weights_file` into `folder` (no pickle)."""

    @abstractmethod
    def load(self, spec: ModelSpec, folder: Path) -> Model:
        """Read `weights_file` back (its digest is checked before this is called)."""


def family(name: str) -> ModelFamily:
    """The family of a model kind; a `ValueError` names the known ones."""
    if name in ("mlp", "logreg"):
        from jobs.torch_family import TorchFamily

        return TorchFamily(name)
    if name in ("xgboost", "random_forest"):
        from jobs.trees import TreeFamily

        return TreeFamily(name)
    raise ValueError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}")
