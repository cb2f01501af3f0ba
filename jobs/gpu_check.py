"""Check the per-worker loop's GPU path without Ray: device placement, bf16 autocast, artifacts.

    python -m jobs.gpu_check --json gpu_check.json          # on a machine with a CUDA GPU
    python -m jobs.gpu_check --device cpu                   # the same checks on the CPU

It trains the demo-sized MLP on a learnable synthetic problem in fp32 and with bf16 autocast,
checks that the weights live on the device, that autocast really computes in bf16, that both
runs learn, and that an artifact saved from the device loads on the CPU with the same
predictions. Then the same for gradient-boosted trees: XGBoost's `hist` on the device (what
`training.use_gpu` gives a tree family on Ray), a model that learns, saved as UBJSON and loaded
on the CPU with the same predictions. It needs torch, numpy, safetensors, xgboost and pyyaml only.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from jobs.models import ModelSpec, build_model, load_artifact, predict_proba, save_artifact
from jobs.worker_loop import _autocast, pick_device, train_standalone


def problem(n: int, width: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, width)).astype(np.float32)
    w = rng.normal(size=width)
    y = ((x @ w + 0.5 * np.sin(3 * x[:, 0])) > 0).astype(np.int64)
    return x, y


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    device = pick_device(args.device == "cuda")
    x, y = problem(args.rows, 22)
    cut = int(len(x) * 0.8)
    spec = ModelSpec("mlp", tuple(f"x{i}" for i in range(22)), ("no", "yes"), (256, 128), 0.1)
    result: dict[str, object] = {"device": str(device), "torch": torch.__version__}
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(0)
        result["bf16_supported"] = torch.cuda.is_bf16_supported()

    checks: dict[str, bool] = {}
    for bf16 in (False, True):
        torch.manual_seed(0)
        model = build_model(spec)
        started = time.perf_counter()
        history = train_standalone(
            model, x[:cut], y[:cut], x[cut:], y[cut:], epochs=args.epochs, batch_size=1024,
            learning_rate=0.003, bf16=bf16, device=device,
        )  # fmt: skip
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
        tag = "bf16" if bf16 else "fp32"
        checks[f"{tag}_weights_on_device"] = all(p.device.type == device.type for p in model.parameters())
        checks[f"{tag}_learns"] = (
            history[-1].metrics["val_accuracy"] > 0.85 and history[-1].train_loss < history[0].train_loss
        )
        result[f"{tag}_val_accuracy"] = round(history[-1].metrics["val_accuracy"], 4)
        result[f"{tag}_samples_per_s"] = round(sum(h.samples for h in history) / elapsed)
        if bf16:
            with torch.no_grad(), _autocast(device, True):
                logits = model(torch.as_tensor(x[:8], device=device))
            checks["bf16_autocast_computes_in_bf16"] = logits.dtype == torch.bfloat16
            with tempfile.TemporaryDirectory() as folder:
                save_artifact(Path(folder), spec, model, "{}")
                _, loaded, _ = load_artifact(Path(folder))
                model.eval()
                on_device = predict_proba(model, x[cut : cut + 2048], device)
                on_cpu = predict_proba(loaded.module, x[cut : cut + 2048], "cpu")
                difference = float((on_device - on_cpu).abs().max())
                result["artifact_max_prob_difference_device_vs_cpu"] = difference
                checks["artifact_loads_on_cpu_with_same_predictions"] = difference < 1e-4
                checks["artifact_weights_on_cpu"] = all(p.device.type == "cpu" for p in loaded.module.parameters())
    checks.update(_trees(device.type, x, y, cut, result))
    result["checks"] = checks
    result["ok"] = all(checks.values())
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["ok"] else 1


def _trees(device: str, x: np.ndarray, y: np.ndarray, cut: int, result: dict[str, object]) -> dict[str, bool]:
    """The tree family's device path: `xgboost.train` with `device` as `booster_params` sets it."""
    import dataclasses

    import xgboost

    from jobs.trees import TreeModel, booster_params
    from streams.config import ModelSettings

    settings = dataclasses.replace(ModelSettings(), kind="xgboost", rounds=100, max_depth=6)
    spec = ModelSpec("xgboost", tuple(f"x{i}" for i in range(x.shape[1])), ("no", "yes"))
    params = booster_params("xgboost", settings, 2, use_gpu=device == "cuda")
    started = time.perf_counter()
    booster = xgboost.train(params, xgboost.DMatrix(x[:cut], y[:cut]), num_boost_round=settings.rounds)
    result["xgboost_train_s"] = round(time.perf_counter() - started, 2)
    result["xgboost_device"] = json.loads(booster.save_config())["learner"]["generic_param"].get("device")
    model = TreeModel(spec, booster)
    on_device = model.predict_proba(x[cut:])
    checks = {"xgboost_learns": float(np.mean(on_device.argmax(axis=1) == y[cut:])) > 0.8}
    with tempfile.TemporaryDirectory() as folder:
        save_artifact(Path(folder), spec, model, "{}")
        _, loaded, _ = load_artifact(Path(folder))
        loaded.booster.set_param({"device": "cpu"})
        difference = float(np.abs(loaded.predict_proba(x[cut:]) - on_device).max())
    result["xgboost_max_prob_difference_device_vs_cpu"] = difference
    checks["xgboost_artifact_loads_on_cpu_with_same_predictions"] = difference < 1e-4
    return checks


if __name__ == "__main__":
    sys.exit(main())
