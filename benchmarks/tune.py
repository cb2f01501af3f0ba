"""Tuning: Ray Tune + Optuna TPE + ASHA against in-process Optuna with SuccessiveHalvingPruner.

Both search the config's space with the same budget of trials and epochs on the same
transformed rows (generated, time-split, features fitted as in training), minimising the
holdout loss. Reported: wall time and best holdout loss/accuracy of each, how many epochs
each actually trained (early stopping), and the F1 of the best configuration retrained,
beside scikit-learn's HistGradientBoostingClassifier with defaults on the same split.
ratio = plain Optuna wall time / ours (higher means ours is faster).

    python benchmarks/tune.py --quick --json runs/bench/tune.json
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
import optuna  # noqa: E402
import ray  # noqa: E402
from train import prepared, run_hgb  # noqa: E402

from jobs.evaluate import evaluate  # noqa: E402
from jobs.models import ModelSpec, build_model, predict_proba  # noqa: E402
from jobs.tune import apply_params, optuna_space, tune_arrays  # noqa: E402
from jobs.worker_loop import pick_device, train_with_settings  # noqa: E402
from streams.config import PipelineConfig, load_config  # noqa: E402


def fit_f1(config: PipelineConfig, params: dict[str, Any], names: list[str], arrays: tuple[np.ndarray, ...]) -> float:
    x_val, y_val = arrays[2], arrays[3]
    settings = apply_params(config.model, params)
    spec = ModelSpec.from_settings(settings, names, list(config.schema.label.classes))
    model = build_model(spec)
    train_with_settings(model, arrays, settings, pick_device(False))  # type: ignore[arg-type]
    model.eval()
    return float(evaluate(y_val, predict_proba(model, x_val).numpy(), list(spec.classes))["f1_macro"])


def run_plain_optuna(config: PipelineConfig, names: list[str], arrays: tuple[np.ndarray, ...]) -> dict[str, Any]:
    space = optuna_space(config.search)
    epochs_run: list[int] = []

    def objective(trial: optuna.Trial) -> float:
        params = {name: trial._suggest(name, dist) for name, dist in space.items()}
        settings = apply_params(config.model, params)
        spec = ModelSpec.from_settings(settings, names, list(config.schema.label.classes))
        last: dict[str, float] = {}
        done = 0

        def on_epoch(result: Any) -> None:
            nonlocal done
            done = result.epoch + 1
            last.update(result.metrics)
            trial.report(result.metrics["val_loss"], result.epoch + 1)
            if trial.should_prune():
                raise optuna.TrialPruned()

        try:
            train_with_settings(build_model(spec), arrays, settings, pick_device(False), on_epoch)  # type: ignore[arg-type]
        finally:
            epochs_run.append(done)
            trial.set_user_attr("val_accuracy", last.get("val_accuracy"))
        return last["val_loss"]

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        direction="minimize",
        sampler=optuna.samplers.TPESampler(seed=0),
        pruner=optuna.pruners.SuccessiveHalvingPruner(),
    )
    started = time.perf_counter()
    study.optimize(objective, n_trials=config.search.trials)
    elapsed = time.perf_counter() - started
    best = study.best_trial
    return {
        "seconds": elapsed,
        "best_params": best.params,
        "val_loss": best.value,
        "val_accuracy": best.user_attrs.get("val_accuracy"),
        "epochs_trained": sum(epochs_run),
    }


def main() -> int:
    parser = common.parser(__doc__)
    parser.add_argument("--rows", type=int, default=None, help="generated records (default 10k quick, 100k full)")
    parser.add_argument("--trials", type=int, default=None, help="trial budget (default 4 quick, 16 full)")
    parser.add_argument("--epochs", type=int, default=None, help="max epochs per trial (default 3 quick, 8 full)")
    args = parser.parse_args()
    base = load_config(ROOT / "configs" / "demo.yaml", env={})
    config = dataclasses.replace(
        base,
        model=dataclasses.replace(base.model, epochs=args.epochs or (3 if args.quick else 8)),
        search=dataclasses.replace(base.search, trials=args.trials or (4 if args.quick else 16), max_concurrent=2),
    )
    rows = args.rows or (10_000 if args.quick else 100_000)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        spec, _, x_train, y_train, x_val, y_val = prepared(config, rows)
        arrays = (x_train, y_train, x_val, y_val)
        names = list(spec.input_names)
        with tempfile.TemporaryDirectory() as out:
            started = time.perf_counter()
            ours = tune_arrays(config, arrays, names, Path(out))
            ours_seconds = time.perf_counter() - started
        plain = run_plain_optuna(config, names, arrays)
        ours_f1 = fit_f1(config, ours.best_params, names, arrays)
        hgb_f1, _ = run_hgb(x_train, y_train, x_val, y_val, list(spec.classes))
    finally:
        ray.shutdown()
    result = {
        "benchmark": "tune",
        "ours": round(ours_seconds, 2),
        "peer": round(plain["seconds"], 2),
        "ratio": round(plain["seconds"] / ours_seconds, 3),
        "unit": "wall seconds for the trial budget (ratio = plain / ours)",
        "best": {
            "ours": {
                "val_loss": round(ours.best_metrics["val_loss"], 4),
                "val_accuracy": round(ours.best_metrics["val_accuracy"], 4),
            },
            "peer": {"val_loss": round(plain["val_loss"], 4), "val_accuracy": round(plain["val_accuracy"] or 0, 4)},
        },
        "epochs_trained": {
            "ours": sum(t["epochs"] for t in ours.trials),
            "peer": plain["epochs_trained"],
            "budget": config.search.trials * config.model.epochs,
        },
        "f1_macro": {
            "ours_best_config_retrained": round(ours_f1, 4),
            "sklearn_hist_gradient_boosting": round(hgb_f1, 4),
        },
        "conditions": {
            "ours": "Ray Tune, OptunaSearch (TPE), ASHA (grace 1, reduction 2), 2 concurrent trials of 1 CPU",
            "peer": "optuna.create_study(TPESampler, SuccessiveHalvingPruner), sequential, in-process",
            "trials": config.search.trials,
            "max_epochs": config.model.epochs,
            "train_rows": len(x_train),
            "holdout_rows": len(x_val),
            "machine": common.machine(),
        },
    }
    return common.emit(result, args.json)


if __name__ == "__main__":
    sys.exit(main())
