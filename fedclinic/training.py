"""Local training and evaluation on one hospital's device (CUDA when present, else the CPU).

Algorithms differ in their local *objective*; the loop itself (batches, optimiser, mixed
precision, step budget) is shared here so that every algorithm trains under the same rules.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedclinic.config import RunConfig
from fedclinic.data.base import Split
from fedclinic.tasks import get_task, task_of

# (model, inputs, labels, logits) -> scalar loss. The default is the plain task loss.
Objective = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def select_device(name: str) -> torch.device:
    """Resolve a hospital's ``device`` setting; ``auto`` takes the site's GPU when it has one."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        from fedclinic.errors import ConfigError

        raise ConfigError(
            f"hospital config: key 'device' = {name!r} is not allowed: no CUDA GPU is visible "
            "on this node (use 'auto' or 'cpu')"
        )
    return device


def seeded_generator(*parts: int | str) -> torch.Generator:
    """A generator seeded from run seed, round and hospital: reproducible, distinct per site."""
    text = "/".join(str(p) for p in parts)
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    return torch.Generator().manual_seed(seed)


def make_loader(
    split: Split, batch_size: int, shuffle: bool, generator: torch.Generator | None = None
) -> DataLoader:
    dataset = TensorDataset(split.inputs, split.labels)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator)


def make_optimizer(
    params: list[nn.Parameter] | list[torch.Tensor], run: RunConfig
) -> torch.optim.Optimizer:
    if run.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=run.learning_rate, momentum=run.momentum, weight_decay=run.weight_decay
        )
    if run.optimizer == "adam":
        return torch.optim.Adam(params, lr=run.learning_rate, weight_decay=run.weight_decay)
    return torch.optim.AdamW(params, lr=run.learning_rate, weight_decay=run.weight_decay)


@dataclass(frozen=True)
class TrainStats:
    loss: float
    num_examples: int
    steps: int
    seconds: float


def train_local(
    model: nn.Module,
    split: Split,
    run: RunConfig,
    device: torch.device,
    generator: torch.Generator,
    objective: Objective | None = None,
    parameters: list[nn.Parameter] | None = None,
) -> TrainStats:
    """Train ``model`` in place for ``local-epochs`` (or ``local-steps`` batches) on ``split``.

    ``parameters`` restricts what the optimiser updates (personalised/shared phases);
    mixed precision is used on CUDA when the run asks for ``amp``.
    """
    task_loss = task_of(run).loss
    objective = objective or (lambda _m, _x, y, logits: task_loss(logits, y))
    model.to(device).train()
    optimizer = make_optimizer(parameters or list(model.parameters()), run)
    use_amp = run.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    loader = make_loader(split, run.batch_size, shuffle=True, generator=generator)
    budget = run.local_steps or run.local_epochs * len(loader)
    started = time.perf_counter()
    total_loss, seen, steps = 0.0, 0, 0
    while steps < budget:
        for inputs, labels in loader:
            inputs, labels = inputs.to(device), labels.to(device)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, enabled=use_amp):
                logits = model(inputs)
                loss = objective(model, inputs, labels, logits)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            total_loss += float(loss.detach()) * len(labels)
            seen += len(labels)
            steps += 1
            if steps >= budget:
                break
    return TrainStats(total_loss / max(seen, 1), seen, steps, time.perf_counter() - started)


@torch.no_grad()
def predict(
    model: nn.Module, split: Split, device: torch.device, batch_size: int = 256
) -> torch.Tensor:
    """Logits of ``model`` on a whole split, on the CPU."""
    return torch.cat([logits for logits, _ in predict_batches(model, split, device, batch_size)])


@torch.no_grad()
def predict_batches(
    model: nn.Module, split: Split, device: torch.device, batch_size: int = 256
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(logits on the CPU, labels)`` of ``model`` on a split, batch by batch."""
    model.to(device).eval()
    for inputs, labels in make_loader(split, batch_size, shuffle=False):
        yield model(inputs.to(device)).float().cpu(), labels


def evaluate(
    model: nn.Module,
    split: Split,
    device: torch.device,
    num_classes: int,
    prefix: str,
    task: str = "classification",
) -> dict[str, float | list[float]]:
    """Task loss and metrics of ``model`` on ``split``, keys prefixed (``val_``, ``test_``)."""
    if len(split) == 0:
        return {}
    scoring = get_task(task)
    batches = predict_batches(model, split, device, scoring.eval_batch_size)
    metrics = scoring.score(batches, num_classes)
    return {f"{prefix}{name}": value for name, value in metrics.items()}


def mean_or_nan(values: list[float]) -> float:
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")
