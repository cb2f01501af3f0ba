"""Training one model of any family from a dataset window, here or with Ray Train.

`train_model` splits the window by event time (the most recent `holdout_fraction` is the
holdout), fits the feature transform on the training part, trains the model's family
(`jobs.families`: in this process for small windows, else with Ray Train: a `TorchTrainer`
with DDP, checkpointed every epoch and restarted from the last checkpoint when a worker dies,
or an `XGBoostTrainer`), evaluates the model on the holdout and writes the artifact (spec,
feature statistics, weights, report, the monitor's profile, a few example records).

As a Ray job entrypoint: `python -m jobs.train --config configs/demo.yaml [--out DIR]`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jobs.evaluate import evaluate
from jobs.families import family
from jobs.features import FeaturePipeline, fit_pipeline, numpy_batch
from jobs.models import ModelSpec, save_artifact
from jobs.profile import reference_profile
from streams.config import ModelSettings, PipelineConfig
from streams.datasets import DatasetStore, Window
from streams.drift import Reference
from streams.errors import DriftloopError

__all__ = ["TrainResult", "join_ray", "model_inputs", "read_window", "split_by_time", "train_model"]


@dataclass(frozen=True)
class TrainResult:
    """A trained model: where its artifact is, how it did, and how it got there."""

    artifact: Path
    spec: ModelSpec
    report: dict[str, Any]
    history: list[dict[str, Any]]
    params: dict[str, Any]
    train_rows: int
    holdout_rows: int
    seconds: float
    holdout: Any = None  # the holdout's raw rows (a materialized Ray Dataset), to judge other models on


def join_ray(config: PipelineConfig) -> None:
    """For job entrypoints: the cluster at `ray.address` / `RAY_ADDRESS` (as a Ray job has it), else a local one."""
    import ray

    if not ray.is_initialized():
        ray.init(address=config.ray.address or os.environ.get("RAY_ADDRESS") or None, log_to_driver=False)


def read_window(store: DatasetStore, window: Window, event_time: str, config: PipelineConfig) -> Any:
    """The window's rows, read once for every stage: an Arrow table when the job works on it in
    its own process (`ray.distributed_min_rows`), else a materialized Ray Dataset."""
    if in_process(None, window, config):
        return store.read_table(window, event_time)
    data: Any = store.read(window, event_time)
    return data.materialize()


def model_inputs(data: Any, to_inputs: Any) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of raw rows (an Arrow table or a Ray Dataset) through a feature transform."""
    if isinstance(data, pa.Table):
        out = to_inputs(numpy_batch(data))
        return out["x"], out.get("y", np.zeros(0, np.int64))
    return _to_numpy(data.map_batches(to_inputs, batch_format="numpy"))


def window_rows(window: Window) -> int:
    """The most rows a window can hold (before its offset and time bounds are applied)."""
    return window.rows if window.last_rows is None else min(window.rows, window.last_rows)


def in_process(data: Any, window: Window, config: PipelineConfig) -> bool:
    """Whether the job works on this window in its own process: `data` as read, else its size
    (a GPU is on a Ray worker: with `training.use_gpu`, never)."""
    if data is not None:
        return isinstance(data, pa.Table)
    return not (config.training.use_gpu or config.ray.distributed(window_rows(window)))


def numpy_batches(data: Any) -> Any:
    """Raw rows (an Arrow table or a Ray Dataset) as numpy batches."""
    if isinstance(data, pa.Table):
        return iter([numpy_batch(data)])
    return data.iter_batches(batch_format="numpy")


def split_by_time(dataset: Any, event_time: str, holdout_fraction: float) -> tuple[Any, Any, str]:
    """(train, holdout, holdout id): the holdout is the most recent fraction by event time.

    `dataset` is an Arrow table (split here) or a Ray Dataset (split lazily, block by block).
    """
    if isinstance(dataset, pa.Table):
        column = dataset.column(event_time).combine_chunks()
    else:
        import ray

        times = dataset.select_columns([event_time]).to_arrow_refs()
        column = pa.concat_arrays([t.column(event_time).combine_chunks() for t in ray.get(times)])
    values = np.sort(column.cast(pa.int64()).to_numpy(zero_copy_only=False))
    if len(values) < 10:
        raise ValueError(f"the window holds {len(values)} rows; at least 10 are needed to train and evaluate")
    cutoff_value = int(values[min(int(len(values) * (1 - holdout_fraction)), len(values) - 1)])
    cutoff = pa.scalar(cutoff_value, pa.int64()).cast(column.type)

    def before(batch: pa.Table) -> pa.Table:
        return batch.filter(pc.less(batch[event_time], cutoff))

    def after(batch: pa.Table) -> pa.Table:
        return batch.filter(pc.greater_equal(batch[event_time], cutoff))

    holdout_id = f"{event_time}>={cutoff.as_py().isoformat()}"
    if isinstance(dataset, pa.Table):
        return before(dataset), after(dataset), holdout_id
    return (
        dataset.map_batches(before, batch_format="pyarrow"),
        dataset.map_batches(after, batch_format="pyarrow"),
        holdout_id,
    )


def _to_numpy(dataset: Any) -> tuple[np.ndarray, np.ndarray]:
    parts = list(dataset.iter_batches(batch_size=None, batch_format="numpy"))
    if not parts:
        return np.zeros((0, 0), np.float32), np.zeros(0, np.int64)
    return np.concatenate([p["x"] for p in parts]), np.concatenate([p["y"] for p in parts])


def check_resources(cpus: float, gpus: float, what: str) -> None:
    """Fail at once, clearly, when the Ray cluster can never give what a job asks for."""
    import ray

    have = ray.cluster_resources()
    if cpus > have.get("CPU", 0) or gpus > have.get("GPU", 0):
        raise DriftloopError(
            f"{what} needs {cpus:g} CPUs and {gpus:g} GPUs, but the Ray cluster has "
            f"{have.get('CPU', 0):g} CPUs and {have.get('GPU', 0):g} GPUs: lower training.workers, "
            "training.cpus_per_worker or search.cpus_per_trial, or use a bigger cluster"
        )


def train_model(
    config: PipelineConfig,
    window: Window,
    out: Path,
    *,
    model: ModelSettings | None = None,
    store: DatasetStore | None = None,
    kill_once: dict[str, Any] | None = None,
    data: Any = None,
) -> TrainResult:
    """Train, evaluate and write one model artifact under `out` (see the module docstring).

    `data`: the window already read (`read_window`); an Arrow table trains in this process,
    a Ray Dataset with Ray Train over `training.workers`.
    """
    settings = model or config.model
    training = config.training
    store = store or DatasetStore(config.datasets.root, config.name)
    started = time.monotonic()
    event_time = config.schema.event_time
    here = in_process(data, window, config)
    if kill_once and here:
        raise ValueError("kill_once kills a Ray Train worker: set ray.distributed_min_rows to 0")
    if not here:
        check_resources(
            training.workers * training.cpus_per_worker, training.workers if training.use_gpu else 0, "training"
        )
    if data is None:
        data = read_window(store, window, event_time, config)
    train_raw, holdout_raw, holdout_id = split_by_time(data, event_time, settings.holdout_fraction)
    if not here:
        train_raw, holdout_raw = train_raw.materialize(), holdout_raw.materialize()
    features = fit_pipeline(train_raw, config.schema, config.features)
    to_inputs = features.batch_fn()
    x_val, y_val = model_inputs(holdout_raw, to_inputs)
    owner = family(settings.kind)
    spec = owner.spec(settings, features.output_names, list(config.schema.label.classes))
    params = {
        **owner.params(settings),
        "workers": 0 if here else config.training.workers,
        "trained_in": "the job's process" if here else "Ray Train",
        "use_gpu": config.training.use_gpu,
    }
    if here:
        trained, history = owner.fit(spec, settings, (*model_inputs(train_raw, to_inputs), x_val, y_val))
        train_rows = int(train_raw.num_rows)
    else:
        trained, history, train_rows = owner.fit_on_ray(
            config, spec, settings, train_raw.map_batches(to_inputs, batch_format="numpy").materialize(),
            (x_val, y_val), out, kill_once,
        )  # fmt: skip
    proba = trained.predict_proba(x_val)
    report = evaluate(y_val, proba, list(config.schema.label.classes))
    report["holdout"] = holdout_id
    report["datasets"] = [m.version_id for m in window.manifests]
    profile = reference_profile(numpy_batches(train_raw), config.schema)
    profile["reference"] = drift_reference(train_raw, proba, config).to_json()
    artifact = out / "model"
    save_artifact(
        artifact,
        spec,
        trained,
        features.to_json(),
        extra={
            "report.json": json.dumps(report, indent=2, sort_keys=True),
            "profile.json": json.dumps(profile),
            "example.json": json.dumps(example_records(holdout_raw, config)),
        },
    )
    return TrainResult(
        artifact=artifact,
        spec=spec,
        report=report,
        history=history,
        params=params,
        train_rows=train_rows,
        holdout_rows=len(y_val),
        seconds=time.monotonic() - started,
        holdout=holdout_raw,
    )


def drift_reference(train_raw: Any, proba: np.ndarray, config: PipelineConfig) -> Reference:
    """What the monitor compares windows with: the training features and the model's holdout outputs.

    The prediction column watches every class: with two classes, the probability of the second
    (a number); with more, the predicted class (a category, so a shift between any classes shows).
    """
    from jobs.monitor import PREDICTION

    names = config.schema.feature_names
    columns: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for batch in numpy_batches(train_raw):
        for n in names:
            columns[n].append(np.asarray(batch[n]))
    data: dict[str, Any] = {n: np.concatenate(parts) if parts else np.array([]) for n, parts in columns.items()}
    kinds: dict[str, Any] = {f.name: "numeric" if f.numeric else "categorical" for f in config.schema.features}
    classes = [str(c) for c in config.schema.label.classes]
    if len(classes) == 2:
        data[PREDICTION], kinds[PREDICTION] = proba[:, -1], "numeric"
    else:
        data[PREDICTION] = np.array([classes[i] for i in np.argmax(proba, axis=1)], dtype=object)
        kinds[PREDICTION] = "categorical"
    return Reference.from_columns(data, kinds, sample_size=config.monitor.reference_sample, seed=config.model.seed)


def example_records(raw: Any, config: PipelineConfig, rows: int = 5) -> list[dict[str, Any]]:
    """A few raw records (feature fields only, JSON values): the MLflow model's input example."""
    names = config.schema.feature_names
    batch = (
        next(iter(numpy_batches(raw)), None)
        if isinstance(raw, pa.Table)
        else next(iter(raw.iter_batches(batch_size=rows, batch_format="numpy")), None)
    )
    if batch is None:
        return []
    out: list[dict[str, Any]] = []
    for i in range(min(rows, len(batch[names[0]]) if names else 0)):
        row: dict[str, Any] = {}
        for name in names:
            value = batch[name][i]
            value = value.item() if hasattr(value, "item") else value
            row[name] = None if isinstance(value, float) and value != value else value
        out.append(row)
    return out


def evaluate_artifact(artifact: Path, config: PipelineConfig, holdout: Any, holdout_id: str) -> dict[str, Any]:
    """A model artifact's report on a holdout (raw rows): how the champion is judged on new data.

    The artifact brings its own feature statistics, so the champion sees the holdout exactly
    as it would in serving.
    """
    from jobs.models import load_artifact

    spec, model, features_json = load_artifact(artifact)
    features = FeaturePipeline.from_json(features_json, config.schema, config.features)
    x, y = model_inputs(holdout, features.batch_fn())
    report = evaluate(y, model.predict_proba(x), list(spec.classes))
    report["holdout"] = holdout_id
    return report


def load_features(artifact: Path, config: PipelineConfig) -> FeaturePipeline:
    """The feature transform a model artifact was trained with."""
    return FeaturePipeline.from_json((artifact / "features.json").read_text(), config.schema, config.features)


def main(argv: list[str] | None = None) -> int:
    """`python -m jobs.train --config C`: train on the newest dataset window (a Ray job entrypoint)."""
    from streams.config import load_config

    parser = argparse.ArgumentParser(prog="python -m jobs.train", description="Train one model with Ray Train.")
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=None, help="where the artifact goes (default: runs/train-<time>)")
    parser.add_argument(
        "--last-rows", type=int, default=None, help="train on the newest N rows (default: all versions)"
    )
    args = parser.parse_args(argv)
    config = load_config(args.config)
    join_ray(config)
    store = DatasetStore(config.datasets.root, config.name)
    window = store.window(last_rows=args.last_rows)
    if not window.manifests:
        print(
            f"no dataset versions in {config.datasets.root}/{config.name}: run `driftloop ingest` first",
            file=sys.stderr,
        )
        return 1
    result = train_model(config, window, args.out or Path("runs") / f"train-{int(time.time())}", store=store)
    summary = {k: result.report[k] for k in ("accuracy", "f1_macro", "roc_auc", "log_loss", "baseline_accuracy")}
    print(json.dumps({"artifact": str(result.artifact), "report": summary, "seconds": round(result.seconds, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
