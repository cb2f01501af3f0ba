"""The per-worker training loop in plain PyTorch: no Ray in here.

Ray Train's workers call `run_epoch` and `evaluate` on their shard of the data; the same
functions train a model standalone on a CPU or a GPU (`train_standalone`), which is how the
GPU path (device placement, bf16 autocast) is checked on a machine without Ray.
Checkpoints are safetensors too: the model's weights and the optimizer's tensors, with the
optimizer's scalar settings as JSON metadata.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

__all__ = [
    "EpochResult",
    "load_checkpoint",
    "pick_device",
    "run_epoch",
    "save_checkpoint",
    "train_standalone",
    "train_with_settings",
    "validate",
]

CHECKPOINT = "checkpoint.safetensors"


def pick_device(use_gpu: bool | None = None) -> torch.device:
    """CUDA when asked for (or when available and not refused), else CPU."""
    if use_gpu is None:
        use_gpu = torch.cuda.is_available()
    if use_gpu and not torch.cuda.is_available():
        raise RuntimeError("a GPU was asked for but torch sees no CUDA device")
    return torch.device("cuda" if use_gpu else "cpu")


def _autocast(device: torch.device, bf16: bool) -> Any:
    enabled = bf16 and (device.type == "cpu" or torch.cuda.is_bf16_supported())
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


@dataclass
class EpochResult:
    epoch: int
    train_loss: float
    samples: int
    metrics: dict[str, float] = field(default_factory=dict)


def run_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    bf16: bool = False,
) -> tuple[float, int]:
    """One pass over `batches`; returns (mean loss, samples seen)."""
    model.train()
    loss_fn = nn.CrossEntropyLoss()
    total, samples = 0.0, 0
    for x, y in batches:
        x = x.to(device, dtype=torch.float32, non_blocking=True)
        y = y.to(device, dtype=torch.long, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device, bf16):
            loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        total += float(loss.detach()) * len(y)
        samples += len(y)
    return total / max(samples, 1), samples


def validate(
    model: nn.Module, x: np.ndarray, y: np.ndarray, device: torch.device, bf16: bool = False
) -> dict[str, float]:
    """Loss and accuracy on a held-out set."""
    model.eval()
    with torch.no_grad(), _autocast(device, bf16):
        logits = model(torch.as_tensor(x, dtype=torch.float32, device=device)).float()
    target = torch.as_tensor(y, dtype=torch.long, device=device)
    loss = nn.functional.cross_entropy(logits, target)
    accuracy = (logits.argmax(dim=1) == target).float().mean()
    return {"val_loss": float(loss), "val_accuracy": float(accuracy)}


def save_checkpoint(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int) -> Path:
    """Weights and optimizer state as one safetensors file (no pickle)."""
    module = getattr(model, "module", model)
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    state = optimizer.state_dict()
    scalars: dict[str, Any] = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"optim.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    metadata = {"epoch": str(epoch), "param_groups": json.dumps(state["param_groups"]), "scalars": json.dumps(scalars)}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CHECKPOINT
    save_file(tensors, str(path), metadata=metadata)
    return path


def load_checkpoint(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Restore a checkpoint written by `save_checkpoint`; returns the epoch it ended."""
    from safetensors import safe_open

    path = folder / CHECKPOINT
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    module = getattr(model, "module", model)
    module.load_state_dict({k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    for name, value in json.loads(metadata["scalars"]).items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(metadata["param_groups"])})
    return int(metadata["epoch"])


def make_optimizer(model: nn.Module, learning_rate: float, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=weight_decay)


def train_with_settings(
    model: nn.Module,
    arrays: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    settings: Any,
    device: torch.device | None = None,
    on_epoch: Callable[[EpochResult], None] | None = None,
) -> list[EpochResult]:
    """`train_standalone` on (x_train, y_train, x_val, y_val) with a ModelSettings' knobs."""
    x_train, y_train, x_val, y_val = arrays
    return train_standalone(
        model, x_train, y_train, x_val, y_val,
        epochs=settings.epochs, batch_size=settings.batch_size, learning_rate=settings.learning_rate,
        weight_decay=settings.weight_decay, bf16=settings.bf16, device=device, seed=settings.seed, on_epoch=on_epoch,
    )  # fmt: skip


def train_standalone(
    model: nn.Module,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    weight_decay: float = 0.0,
    bf16: bool = False,
    device: torch.device | None = None,
    seed: int = 0,
    on_epoch: Callable[[EpochResult], None] | None = None,
) -> list[EpochResult]:
    """Train on in-memory arrays in one process (the reference path and the GPU check)."""
    device = device or pick_device(None)
    torch.manual_seed(seed)
    model.to(device)
    optimizer = make_optimizer(model, learning_rate, weight_decay)
    generator = torch.Generator().manual_seed(seed)
    x = torch.as_tensor(x_train, dtype=torch.float32)
    y = torch.as_tensor(y_train, dtype=torch.long)
    history = []
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        batches = ((x[i], y[i]) for i in (order[s : s + batch_size] for s in range(0, len(x), batch_size)))
        loss, samples = run_epoch(model, optimizer, batches, device, bf16)
        result = EpochResult(epoch, loss, samples, validate(model, x_val, y_val, device, bf16))
        history.append(result)
        if on_epoch is not None:
            on_epoch(result)
    return history
