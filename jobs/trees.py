"""The tree families, with XGBoost: gradient-boosted trees and a random forest.

`xgboost` boosts `rounds` trees of at most `max_depth` levels with learning rate `eta`;
`random_forest` grows `trees` trees in one round (XGBoost's forest mode: `num_parallel_tree`,
rows and columns sampled per tree and per split, no shrinkage). Both use the `hist` method, on
the CPU here and on a GPU when `training.use_gpu` asks for one (`device="cuda"`). Two classes
use `binary:logistic`, more `multi:softprob`; `class_weight: balanced` weighs each row by the
inverse frequency of its class. On Ray a window trains with Ray Train's `XGBoostTrainer`, each
worker on its shard, XGBoost's collective syncing the histograms.

A model is saved in XGBoost's own UBJSON format (`model.ubj`) and read back with
`Booster.load_model`, which parses that format and nothing else (a pickle is refused).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from jobs.families import Arrays, Model, ModelFamily, OnStep, Step, holdout_metrics
from jobs.models import ArtifactError, ModelSpec
from streams.config import ModelSettings, PipelineConfig

__all__ = ["TreeFamily", "TreeModel", "booster_params", "tree_loop_per_worker"]


def booster_params(kind: str, settings: ModelSettings, classes: int, use_gpu: bool = False) -> dict[str, Any]:
    """XGBoost's parameters for a family's settings (the booster's whole configuration)."""
    params: dict[str, Any] = {
        "tree_method": "hist",
        "max_depth": settings.max_depth,
        "min_child_weight": settings.min_child_weight,
        "lambda": settings.reg_lambda,
        "seed": settings.seed,
        "device": "cuda" if use_gpu else "cpu",
        "verbosity": 0,
    }
    if classes > 2:
        params.update(objective="multi:softprob", num_class=classes, eval_metric="mlogloss")
    else:
        params.update(objective="binary:logistic", eval_metric="logloss")
    if kind == "random_forest":
        # XGBoost's random forest: one round of `trees` parallel trees, each on a bootstrap-like
        # sample of rows, columns drawn per split; no shrinkage.
        params.update(
            num_parallel_tree=settings.trees,
            subsample=min(settings.subsample, 0.9),
            colsample_bynode=settings.colsample,
            learning_rate=1.0,
        )
    else:
        params.update(eta=settings.eta, subsample=settings.subsample, colsample_bytree=settings.colsample)
    return params


def rounds_of(kind: str, settings: ModelSettings) -> int:
    return 1 if kind == "random_forest" else settings.rounds


def row_weights(y: np.ndarray, classes: int, how: str) -> np.ndarray | None:
    """Per-row weights for `class_weight: balanced` (n / (classes * count of the row's class))."""
    if how != "balanced" or len(y) == 0:
        return None
    counts = np.bincount(y, minlength=classes).astype(np.float64)
    per_class = np.where(counts > 0, len(y) / (classes * np.maximum(counts, 1)), 0.0)
    return per_class[y].astype(np.float32)


def _proba(raw: np.ndarray, classes: int) -> np.ndarray:
    raw = np.asarray(raw, dtype=np.float64)
    if classes > 2:
        proba = raw.reshape(-1, classes)
        return proba / proba.sum(axis=1, keepdims=True)  # softprob is float32: rows sum to 1 only to ~1e-7
    p = raw.reshape(-1)
    return np.column_stack([1.0 - p, p])


def _predict_proba(booster: Any, x: np.ndarray, classes: int) -> np.ndarray:
    return _proba(booster.inplace_predict(np.ascontiguousarray(x, dtype=np.float32)), classes)


@dataclass(frozen=True)
class TreeModel:
    """A fitted XGBoost booster and its spec."""

    spec: ModelSpec
    booster: Any

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return _predict_proba(self.booster, x, len(self.spec.classes))


@dataclass(frozen=True)
class TreeFamily(ModelFamily):
    """`xgboost` (budget: boosting rounds) or `random_forest` (budget: trees, grown in one round)."""

    name: str  # type: ignore[misc]
    budget_unit: ClassVar[str] = "boosting rounds"
    weights_file: ClassVar[str] = "model.ubj"

    def params(self, settings: ModelSettings) -> dict[str, Any]:
        return {**super().params(settings), "class_weight": settings.class_weight}

    def fit(
        self, spec: ModelSpec, settings: ModelSettings, arrays: Arrays, *, on_step: OnStep | None = None
    ) -> tuple[Model, list[dict[str, Any]]]:
        import xgboost

        x_train, y_train, x_val, y_val = arrays
        classes = len(spec.classes)
        # Ray gives a trial's process OMP_NUM_THREADS = its CPUs; elsewhere, every core.
        threads = int(os.environ.get("OMP_NUM_THREADS") or 0) or os.cpu_count() or 1
        params = {**booster_params(self.name, settings, classes), "nthread": threads}
        dtrain = xgboost.DMatrix(x_train, y_train, weight=row_weights(y_train, classes, settings.class_weight))
        dval = xgboost.DMatrix(x_val, y_val)
        total, steps = rounds_of(self.name, settings), settings.epochs
        marks = {math.ceil(total * (i + 1) / steps): i + 1 for i in range(steps)}  # round -> step (last wins)
        history: list[dict[str, Any]] = []

        class Report(xgboost.callback.TrainingCallback):
            def after_iteration(self, model: Any, epoch: int, evals_log: Any) -> bool:
                rounds = epoch + 1
                if rounds not in marks:
                    return False
                upto = (0, rounds)
                metrics = holdout_metrics(_proba(model.predict(dval, iteration_range=upto), classes), y_val)
                train = holdout_metrics(_proba(model.predict(dtrain, iteration_range=upto), classes), y_train)
                step = Step(marks[rounds], steps, metrics, train["val_loss"], {"rounds": rounds})
                history.append(step.row())
                if on_step is not None:
                    on_step(step)  # may raise (a pruned trial)
                return False

        # no `evals`: scoring the training set every round tripled the time; steps score it themselves
        booster = xgboost.train(params, dtrain, num_boost_round=total, callbacks=[Report()], verbose_eval=False)
        booster.set_param({"nthread": 1})
        return TreeModel(spec, booster), history

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
        import ray.train
        from ray.train.xgboost import RayTrainReportCallback, XGBoostTrainer

        if kill_once:
            raise ValueError("kill_once is a test of the neural families' checkpoints")
        classes = len(spec.classes)
        use_gpu = config.training.use_gpu
        trainer = XGBoostTrainer(
            tree_loop_per_worker,
            train_loop_config={
                "params": {
                    **booster_params(self.name, settings, classes, use_gpu),
                    "nthread": max(1, int(config.training.cpus_per_worker)),
                },
                "rounds": rounds_of(self.name, settings),
                "classes": classes,
                "class_weight": settings.class_weight,
                "x_val": val[0],
                "y_val": val[1],
            },
            scaling_config=ray.train.ScalingConfig(
                num_workers=config.training.workers,
                use_gpu=use_gpu,
                resources_per_worker={"CPU": config.training.cpus_per_worker, **({"GPU": 1} if use_gpu else {})},
            ),
            run_config=ray.train.RunConfig(
                name=f"{config.name}-train-{int(time.time() * 1000)}",
                storage_path=config.ray.train_storage(out),
                failure_config=ray.train.FailureConfig(max_failures=config.training.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
            ),
            datasets={"train": train},
        )
        result = trainer.fit()
        if result.checkpoint is None:
            raise RuntimeError(f"training ended without a checkpoint: {result.error!r}")
        booster = RayTrainReportCallback.get_model(result.checkpoint)  # Booster.load_model of model.ubj
        booster.set_param({"nthread": 1})
        frame = result.metrics_dataframe
        history = [dict(m) for m in (frame.to_dict("records") if frame is not None else [])]
        return TreeModel(spec, booster), history, train.count()

    def save(self, model: Model, folder: Path) -> None:
        model.booster.save_model(str(folder / self.weights_file))  # type: ignore[attr-defined]

    def load(self, spec: ModelSpec, folder: Path) -> Model:
        import xgboost

        raw = (folder / self.weights_file).read_bytes()
        if raw[:1] != b"{":  # a UBJSON document is an object; anything else is not a model of ours
            raise ArtifactError(f"{self.weights_file} is not an XGBoost model: it does not start as UBJSON")
        booster = xgboost.Booster()
        try:
            booster.load_model(bytearray(raw))
        except (xgboost.core.XGBoostError, UnicodeDecodeError, ValueError) as err:
            first = str(err).splitlines()[0][:200]
            raise ArtifactError(f"{self.weights_file} is not an XGBoost model: {first}") from None
        expected, outputs = 1 if len(spec.classes) <= 2 else len(spec.classes), _outputs(booster)
        if booster.num_features() != spec.input_dim or outputs != expected:
            raise ArtifactError(
                f"{self.weights_file} has {booster.num_features()} inputs and {outputs} outputs; "
                f"spec.json says {spec.input_dim} inputs and {len(spec.classes)} classes"
            )
        booster.set_param({"nthread": 1})
        return TreeModel(spec, booster)


def _outputs(booster: Any) -> int:
    import json

    learner = json.loads(booster.save_config())["learner"]
    return max(1, int(learner["learner_model_param"].get("num_class", "0")))


def tree_loop_per_worker(cfg: dict[str, Any]) -> None:
    """What every XGBoostTrainer worker runs: `xgboost.train` on its shard (XGBoost's collective
    is set up by Ray Train); then one report, the holdout's log loss, with rank 0's model
    (model.ubj, which `RayTrainReportCallback.get_model` reads back) as the checkpoint.

    No per-round callback and no `evals`: Ray's `RayTrainReportCallback` reports every boosting
    round, and Ray Train drains reports every 2 s, which made 98 % of a 200,000-row, 50-round fit
    (`benchmarks/models.py`); scoring the holdout every round doubled each round's compute.
    """
    import tempfile

    import ray.train
    import xgboost

    shard = ray.train.get_dataset_shard("train")
    parts = list(shard.iter_batches(batch_size=None, batch_format="numpy"))
    x = np.concatenate([p["x"] for p in parts]) if parts else np.zeros((0, len(cfg["x_val"][0])), np.float32)
    y = np.concatenate([p["y"] for p in parts]) if parts else np.zeros(0, np.int64)
    # class weights from this worker's shard: shards are random parts of one window
    dtrain = xgboost.DMatrix(x, y, weight=row_weights(y, cfg["classes"], cfg["class_weight"]))
    booster = xgboost.train(cfg["params"], dtrain, num_boost_round=cfg["rounds"], verbose_eval=False)
    proba = _predict_proba(booster, cfg["x_val"], cfg["classes"])
    metrics = {**holdout_metrics(proba, np.asarray(cfg["y_val"])), "rounds": booster.num_boosted_rounds()}
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if ray.train.get_context().get_world_rank() == 0:
            booster.save_model(os.path.join(folder, "model.ubj"))
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report(metrics, checkpoint=checkpoint)
