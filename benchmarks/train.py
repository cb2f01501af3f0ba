"""Training: our Ray Train path (2 workers, DDP) against a plain single-process PyTorch loop.

Both train the same model (the config's MLP) on the same transformed rows for the same
epochs and batch size; samples/s counts training samples processed per second of the
training phase only (Ray Train: `trainer.fit()`, which includes starting the worker group
and DDP; plain: the epochs). The tuned-or-default model's holdout F1 is set beside
scikit-learn's HistGradientBoostingClassifier with default settings on the same split.
ratio = ours / plain samples per second.

    python benchmarks/train.py --quick --json runs/bench/train.json
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import common  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import ray  # noqa: E402

from jobs.evaluate import evaluate  # noqa: E402
from jobs.features import fit_pipeline  # noqa: E402
from jobs.models import ModelSpec, build_model, predict_proba  # noqa: E402
from jobs.torch_family import train_loop_per_worker  # noqa: E402
from jobs.train import _to_numpy, split_by_time  # noqa: E402
from jobs.worker_loop import pick_device, train_with_settings  # noqa: E402
from streams.config import PipelineConfig, load_config  # noqa: E402
from streams.generator import StreamGenerator  # noqa: E402
from streams.kafka_source import arrow_schema  # noqa: E402
from streams.serde import RecordCodec  # noqa: E402


def prepared(config: PipelineConfig, rows: int) -> tuple[Any, ...]:
    """Generated records -> a Ray Dataset -> time split -> fitted features -> arrays."""
    codec = RecordCodec(config.schema)
    records = [codec.to_dict(codec.validate(r.record)) for r in StreamGenerator(config, seed=5).records(rows)]
    schema = arrow_schema(config.schema)
    names = [f.name for f in schema][:-4]
    table = pa.Table.from_pylist(records, schema=pa.schema([schema.field(n) for n in names]))
    ds = ray.data.from_arrow(table)
    train_raw, holdout_raw, _ = split_by_time(ds, config.schema.event_time, config.model.holdout_fraction)
    train_raw = train_raw.materialize()
    features = fit_pipeline(train_raw, config.schema, config.features)
    to_inputs = features.batch_fn()
    train_ds = train_raw.map_batches(to_inputs, batch_format="numpy").materialize()
    x_train, y_train = _to_numpy(train_ds)
    x_val, y_val = _to_numpy(holdout_raw.map_batches(to_inputs, batch_format="numpy"))
    spec = ModelSpec.from_settings(config.model, features.output_names, list(config.schema.label.classes))
    return spec, train_ds, x_train, y_train, x_val, y_val


def run_ours(
    config: PipelineConfig, spec: ModelSpec, train_ds: Any, x_val: np.ndarray, y_val: np.ndarray, workers: int
) -> tuple[float, float, dict[str, float]]:
    import ray.train
    from ray.train.torch import TorchTrainer

    from jobs.worker_loop import load_checkpoint, make_optimizer

    m = config.model
    with tempfile.TemporaryDirectory() as storage:
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={
                "spec": spec.to_json(),
                "seed": m.seed,
                "epochs": m.epochs,
                "batch_size": m.batch_size,
                "learning_rate": m.learning_rate,
                "weight_decay": m.weight_decay,
                "bf16": False,
                "x_val": x_val,
                "y_val": y_val,
                "kill_once": None,
            },
            scaling_config=ray.train.ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 1}),
            run_config=ray.train.RunConfig(name=f"bench-{time.time_ns()}", storage_path=storage),
            datasets={"train": train_ds},
        )
        started = time.perf_counter()
        result = trainer.fit()
        elapsed = time.perf_counter() - started
        epochs = result.metrics_dataframe
        epoch_seconds = [float(s) for s in epochs["seconds"]] if epochs is not None and "seconds" in epochs else []
        rows = train_ds.count()
        breakdown = {
            "fit_seconds": round(elapsed, 2),
            "epoch_seconds_rank0": [round(s, 2) for s in epoch_seconds],
            "outside_epochs_seconds": round(elapsed - sum(epoch_seconds), 2),
            "samples_per_s_within_epochs": round(rows * len(epoch_seconds) / max(sum(epoch_seconds), 1e-9)),
        }
        model = build_model(spec)
        assert result.checkpoint is not None
        with result.checkpoint.as_directory() as folder:
            load_checkpoint(Path(folder), model, make_optimizer(model, m.learning_rate, 0.0))
    model.eval()
    f1 = evaluate(y_val, predict_proba(model, x_val).numpy(), list(spec.classes))["f1_macro"]
    return rows * m.epochs / elapsed, f1, breakdown


def run_plain(
    config: PipelineConfig,
    spec: ModelSpec,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
) -> tuple[float, float]:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    m = config.model
    model = build_model(spec)
    started = time.perf_counter()
    train_with_settings(model, (x_train, y_train, x_val, y_val), m, pick_device(False))
    elapsed = time.perf_counter() - started
    model.eval()
    f1 = evaluate(y_val, predict_proba(model, x_val).numpy(), list(spec.classes))["f1_macro"]
    return len(x_train) * m.epochs / elapsed, f1


def run_hgb(
    x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, classes: list[Any]
) -> tuple[float, float]:
    from sklearn.ensemble import HistGradientBoostingClassifier

    started = time.perf_counter()
    model = HistGradientBoostingClassifier(random_state=0).fit(x_train, y_train)
    elapsed = time.perf_counter() - started
    return evaluate(y_val, model.predict_proba(x_val), classes)["f1_macro"], elapsed


def main() -> int:
    parser = common.parser(__doc__)
    parser.add_argument("--rows", type=int, default=None, help="generated records (default 20k quick, 200k full)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs (default 3 quick, 8 full)")
    args = parser.parse_args()
    rows = args.rows or (20_000 if args.quick else 200_000)
    base = load_config(ROOT / "configs" / "demo.yaml", env={})
    config = dataclasses.replace(
        base, model=dataclasses.replace(base.model, epochs=args.epochs or (3 if args.quick else 8))
    )
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        spec, train_ds, x_train, y_train, x_val, y_val = prepared(config, rows)
        ours, ours_f1, breakdown = run_ours(config, spec, train_ds, x_val, y_val, workers=2)
        plain, plain_f1 = run_plain(config, spec, x_train, y_train, x_val, y_val)
        hgb_f1, hgb_seconds = run_hgb(x_train, y_train, x_val, y_val, list(spec.classes))
    finally:
        ray.shutdown()
    result = {
        "benchmark": "train",
        "ours": round(ours),
        "peer": round(plain),
        "ratio": round(ours / plain, 3),
        "unit": "training samples/s",
        "f1_macro": {
            "ours_ray_train": round(ours_f1, 4),
            "plain_torch": round(plain_f1, 4),
            "sklearn_hist_gradient_boosting": round(hgb_f1, 4),
        },
        "hgb_fit_seconds": round(hgb_seconds, 2),
        "ours_breakdown": breakdown,
        "conditions": {
            "what": "ours: TorchTrainer, 2 CPU workers (DDP, gloo), Ray Data shards; peer: one process, same loop",
            "train_rows": len(x_train),
            "holdout_rows": len(x_val),
            "epochs": config.model.epochs,
            "batch_size": config.model.batch_size,
            "model": {"kind": spec.kind, "hidden": list(spec.hidden), "inputs": spec.input_dim},
            "timed": "ours: trainer.fit() (worker start-up, DDP, data iteration, checkpoints); peer: the epochs",
            "machine": common.machine(),
        },
    }
    return common.emit(result, args.json)


if __name__ == "__main__":
    sys.exit(main())
