"""The neural families: an MLP and logistic regression in PyTorch, weights in safetensors.

In this process they train with the plain-torch loop (`jobs.worker_loop`); on Ray with a
`TorchTrainer` (DDP over `training.workers`, CPU or GPU), checkpointed every epoch and
restarted from the last checkpoint when a worker dies (`FailureConfig`).
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from jobs.families import Arrays, Model, ModelFamily, OnStep, Step
from jobs.models import ArtifactError, ModelSpec, build_model
from jobs.worker_loop import (
    load_checkpoint,
    make_optimizer,
    pick_device,
    run_epoch,
    save_checkpoint,
    train_with_settings,
    validate,
)
from streams.config import ModelSettings, PipelineConfig

__all__ = ["TorchFamily", "TorchModel", "train_loop_per_worker"]


@dataclass(frozen=True)
class TorchModel:
    """A torch module in eval mode and its spec."""

    spec: ModelSpec
    module: torch.nn.Module

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return torch.softmax(self.module(torch.as_tensor(x, dtype=torch.float32)).float(), dim=1).numpy()


@dataclass(frozen=True)
class TorchFamily(ModelFamily):
    """`mlp` (hidden layers, ReLU, dropout) or `logreg` (one linear layer); budget: epochs."""

    name: str  # type: ignore[misc]
    budget_unit: ClassVar[str] = "epochs"
    weights_file: ClassVar[str] = "weights.safetensors"

    def spec(self, settings: ModelSettings, input_names: list[str], classes: list[Any]) -> ModelSpec:
        return ModelSpec.from_settings(settings, input_names, classes, kind=self.name)

    def params(self, settings: ModelSettings) -> dict[str, Any]:
        return {**super().params(settings), "epochs": settings.epochs, "bf16": settings.bf16}

    def fit(
        self, spec: ModelSpec, settings: ModelSettings, arrays: Arrays, *, on_step: OnStep | None = None
    ) -> tuple[Model, list[dict[str, Any]]]:
        module = build_model(spec)
        history: list[dict[str, Any]] = []

        def report(result: Any) -> None:
            step = Step(result.epoch + 1, settings.epochs, result.metrics, result.train_loss)
            history.append({**step.row(), "samples": result.samples})
            if on_step is not None:
                on_step(step)

        train_with_settings(module, arrays, settings, pick_device(False), on_epoch=report)
        module.eval()
        return TorchModel(spec, module), history

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
        """A TorchTrainer (DDP over `training.workers`, checkpointed, restarted on a worker's death)."""
        import ray.train
        from ray.train.torch import TorchTrainer

        storage = config.ray.train_storage(out)
        if kill_once and "://" in storage:
            raise ValueError("kill_once reads Ray Train's checkpoint state from a local storage_path")
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
            "kill_once": kill_once and {**kill_once, "run_dir": str(Path(storage) / run_name)},
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
                storage_path=storage,
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
        trained.eval()
        history = [
            dict(m)
            for m in (result.metrics_dataframe.to_dict("records") if result.metrics_dataframe is not None else [])
        ]
        return TorchModel(spec, trained), history, train.count()

    def save(self, model: Model, folder: Path) -> None:
        module: Any = getattr(model, "module", model)
        module = getattr(module, "module", module)  # unwrap DDP
        state = {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}
        save_file(state, str(folder / self.weights_file), metadata={"format": "driftloop", "kind": self.name})

    def load(self, spec: ModelSpec, folder: Path) -> Model:
        try:
            state = load_file(str(folder / self.weights_file))
        except (SafetensorError, OSError, ValueError) as err:
            raise ArtifactError(f"{self.weights_file} is not a safetensors file: {err}") from None
        module = build_model(spec)
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise ArtifactError(f"{self.weights_file} does not fit the architecture in spec.json: {err}") from None
        module.eval()
        return TorchModel(spec, module)


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
