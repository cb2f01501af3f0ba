"""Distributed training with Ray Train: one model from a dataset window.

`train_model` splits the window by event time (the most recent `holdout_fraction` is the
holdout), fits the feature transform on the training part with Ray Data, trains with a
`TorchTrainer` (DDP over `training.workers`, CPU or GPU), checkpoints every epoch, restarts
from the last checkpoint when a worker dies (`FailureConfig`), evaluates the final model on
the holdout and writes the artifact (spec, feature statistics, safetensors weights, report).

As a Ray job entrypoint: `python -m jobs.train --config configs/demo.yaml [--out DIR]`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jobs.evaluate import evaluate
from jobs.features import FeaturePipeline, fit_pipeline, numpy_batch
from jobs.loop import (
    load_checkpoint,
    make_optimizer,
    pick_device,
    run_epoch,
    save_checkpoint,
    train_with_settings,
    validate,
)
from jobs.models import ModelSpec, build_model, predict_proba, save_artifact
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


def _await_registered_checkpoint(run_dir: Path, epoch: int, timeout_s: float = 120.0) -> None:
    """Wait until Ray Train has registered the checkpoint of `epoch` (tests: kill_once).

    A report reaches Ray Train's controller some time after `ray.train.report` returns; a worker
    killed in between loses that checkpoint, and one killed before any was registered restarts
    from scratch, which is not what the kill test is about.
    """
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result") or {}
            if latest.get("metrics", {}).get("epoch", 0) >= epoch:
                return
        except (OSError, ValueError):
            pass  # not written yet, or caught mid-write
        time.sleep(0.2)
    raise RuntimeError(f"no checkpoint of epoch {epoch} registered in {run_dir} within {timeout_s:.0f} s")


def train_loop_per_worker(cfg: dict[str, Any]) -> None:
    """What every Ray Train worker runs: the plain-torch loop on its shard, checkpointed per epoch."""
    import ray.train
    import ray.train.torch
    import torch

    context = ray.train.get_context()
    rank = context.get_world_rank()
    torch.manual_seed(cfg["seed"] + rank)
    spec = ModelSpec.from_json(cfg["spec"])
    device = ray.train.torch.get_device()
    model = ray.train.torch.prepare_model(build_model(spec))
    optimizer = make_optimizer(model, cfg["learning_rate"], cfg["weight_decay"])
    start = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            start = load_checkpoint(Path(folder), model, optimizer)
    shard = ray.train.get_dataset_shard("train")
    x_val, y_val = cfg["x_val"], cfg["y_val"]
    for epoch in range(start, cfg["epochs"]):
        kill = cfg.get("kill_once")
        if kill and rank == 0 and epoch == kill["epoch"] and not Path(kill["marker"]).exists():
            _await_registered_checkpoint(Path(kill["run_dir"]), epoch)
            Path(kill["marker"]).touch()
            os.kill(os.getpid(), signal.SIGKILL)  # a worker dies mid-training (tests)
        started = time.perf_counter()
        batches = (
            (b["x"], b["y"])
            for b in shard.iter_torch_batches(
                batch_size=cfg["batch_size"], dtypes={"x": torch.float32, "y": torch.long}
            )
        )
        loss, samples = run_epoch(model, optimizer, batches, device, cfg["bf16"])
        metrics: dict[str, Any] = validate(model, x_val, y_val, device, cfg["bf16"])
        metrics.update(
            epoch=epoch + 1, train_loss=loss, samples=samples, seconds=time.perf_counter() - started, resumed_from=start
        )
        with tempfile.TemporaryDirectory() as folder:
            if rank == 0:
                save_checkpoint(Path(folder), model, optimizer, epoch + 1)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
            else:
                ray.train.report(metrics)


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

    `data`: the window already read (`read_window`); an Arrow table trains in this process
    with the plain-torch loop, a Ray Dataset with a TorchTrainer over `training.workers`.
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
    spec = ModelSpec.from_settings(settings, features.output_names, list(config.schema.label.classes))
    params = {
        "kind": settings.kind,
        "hidden": list(spec.hidden),
        "dropout": spec.dropout,
        "epochs": settings.epochs,
        "batch_size": settings.batch_size,
        "learning_rate": settings.learning_rate,
        "weight_decay": settings.weight_decay,
        "workers": 0 if here else config.training.workers,
        "trained_in": "the job's process" if here else "Ray Train",
        "use_gpu": config.training.use_gpu,
    }
    if here:
        trained, history, train_rows = _train_here(spec, settings, model_inputs(train_raw, to_inputs), (x_val, y_val))
    else:
        trained, history, train_rows = _train_with_ray(
            config, spec, settings, train_raw.map_batches(to_inputs, batch_format="numpy").materialize(),
            (x_val, y_val), out, kill_once,
        )  # fmt: skip
    trained.eval()
    proba = predict_proba(trained, x_val).numpy()
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
        extra={"report.json": json.dumps(report, indent=2, sort_keys=True), "profile.json": json.dumps(profile)},
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


def _train_here(
    spec: ModelSpec, settings: ModelSettings, train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray]
) -> tuple[Any, list[dict[str, Any]], int]:
    """The plain-torch loop in this process, on the CPU: (model, per-epoch history, rows)."""
    trained = build_model(spec)
    epochs = train_with_settings(trained, (*train, *val), settings, pick_device(False))
    history = [{"epoch": e.epoch + 1, "train_loss": e.train_loss, "samples": e.samples, **e.metrics} for e in epochs]
    return trained, history, len(train[1])


def _train_with_ray(
    config: PipelineConfig,
    spec: ModelSpec,
    settings: ModelSettings,
    train: Any,
    val: tuple[np.ndarray, np.ndarray],
    out: Path,
    kill_once: dict[str, Any] | None,
) -> tuple[Any, list[dict[str, Any]], int]:
    """A TorchTrainer (DDP over `training.workers`, checkpointed, restarted on a worker's death)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    run_name = f"{config.name}-train-{int(time.time() * 1000)}"
    loop_config: dict[str, Any] = {
        "spec": spec.to_json(),
        "seed": settings.seed,
        "epochs": settings.epochs,
        "batch_size": settings.batch_size,
        "learning_rate": settings.learning_rate,
        "weight_decay": settings.weight_decay,
        "bf16": settings.bf16,
        "x_val": val[0],
        "y_val": val[1],
        "kill_once": kill_once and {**kill_once, "run_dir": str((out / "ray" / run_name).resolve())},
    }
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=config.training.workers,
            use_gpu=config.training.use_gpu,
            resources_per_worker={
                "CPU": config.training.cpus_per_worker,
                **({"GPU": 1} if config.training.use_gpu else {}),
            },
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=str((out / "ray").resolve()),
            failure_config=ray.train.FailureConfig(max_failures=config.training.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
        datasets={"train": train},
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training ended without a checkpoint: {result.error!r}")
    trained = build_model(spec)
    with result.checkpoint.as_directory() as folder:
        load_checkpoint(Path(folder), trained, make_optimizer(trained, settings.learning_rate, 0.0))
    history = [
        dict(m) for m in (result.metrics_dataframe.to_dict("records") if result.metrics_dataframe is not None else [])
    ]
    return trained, history, train.count()


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


def evaluate_artifact(artifact: Path, config: PipelineConfig, holdout: Any, holdout_id: str) -> dict[str, Any]:
    """A model artifact's report on a holdout (raw rows): how the champion is judged on new data.

    The artifact brings its own feature statistics, so the champion sees the holdout exactly
    as it would in serving.
    """
    from jobs.models import load_artifact

    spec, model, features_json = load_artifact(artifact)
    features = FeaturePipeline.from_json(features_json, config.schema, config.features)
    x, y = model_inputs(holdout, features.batch_fn())
    report = evaluate(y, predict_proba(model, x).numpy(), list(spec.classes))
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
