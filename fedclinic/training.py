"""Local training and evaluation on one hospital's device (CUDA when present, else the CPU).

One loop, :meth:`LocalLoop.run`, trains every model fedclinic trains: each algorithm's local
round (FedAvg, FedProx, local-only and pFedNet's phases through :func:`train_local`, FedHelp's
alternating proxy/large and private/public steps, Fed-MAS's clipped steps with an optimiser
state kept at the site), FedHelp's substitute teacher and Fed-MAS's MoCo prior. A caller says
what one step does (its models, loss terms and optimisers) in a step function; the loop owns
what must be the same everywhere: the step budget, batches cycling over passes of the data
and moved to the device, mixed precision on CUDA (autocast plus one gradient scaler per
optimiser, :class:`Updater`), gradient clipping, sample-weighted running means of named
losses, and timing.

Under ``dp = "dp-sgd"`` (docs/privacy.md) every step on private data is DP-SGD (Abadi et
al., arXiv 1607.00133, section 3.1) through Opacus: Poisson-sampled batches
(:func:`poisson_batches`, :meth:`LocalLoop.private_batches`), per-sample gradients clipped
to ``dp-max-grad-norm`` and Gaussian noise (:class:`PrivateUpdater`,
:meth:`LocalLoop.private_updater`), both drawn from secretly seeded generators, so that
nobody who knows the run's seed can undo them: :func:`train_local` and FedHelp's and
Fed-MAS's own steps use them.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedclinic import opacus_backend
from fedclinic.config import RunConfig
from fedclinic.data.base import Split
from fedclinic.errors import ConfigError, DataError
from fedclinic.serialization import State
from fedclinic.tasks import get_task, task_of

# (model, inputs, labels, logits) -> scalar loss. The default is the plain task loss.
Objective = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
#: model -> a loss term that reads no data (FedProx's proximal pull), or None
Regularizer = Callable[[nn.Module], torch.Tensor | None]
Batch = TypeVar("Batch")
#: what one step reports: its number of samples and its named losses (``"loss"`` the main one)
StepResult = tuple[int, Mapping[str, torch.Tensor | float]]


def select_device(name: str) -> torch.device:
    """Resolve a hospital's ``device`` setting; ``auto`` takes the site's GPU when it has one."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
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
    split: Split,
    batch_size: int,
    shuffle: bool,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
) -> DataLoader[tuple[torch.Tensor, ...]]:
    dataset = TensorDataset(split.inputs, split.labels)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, drop_last=drop_last
    )


# ------------------------------------------------------------------------------ optimisers


@dataclass(frozen=True)
class OptimizerSettings:
    """Which optimiser to build: a run's ``optimizer``, ``learning-rate``, ``momentum`` (SGD)
    and ``weight-decay``, or a tool's own values."""

    kind: str = "adam"
    learning_rate: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0

    @classmethod
    def of(cls, run: RunConfig) -> OptimizerSettings:
        return cls(run.optimizer, run.learning_rate, run.momentum, run.weight_decay)

    def build(self, parameters: Iterable[torch.Tensor]) -> torch.optim.Optimizer:
        params = list(parameters)
        if self.kind == "sgd":
            return torch.optim.SGD(
                params,
                lr=self.learning_rate,
                momentum=self.momentum,
                weight_decay=self.weight_decay,
            )
        if self.kind == "adam":
            return torch.optim.Adam(params, lr=self.learning_rate, weight_decay=self.weight_decay)
        if self.kind == "adamw":
            return torch.optim.AdamW(params, lr=self.learning_rate, weight_decay=self.weight_decay)
        raise ConfigError(f"optimizer {self.kind!r} is unknown: expected sgd, adam or adamw")


class Updater:
    """One optimiser with its gradient scaler (mixed precision on CUDA) and optional clipping.

    :meth:`step` is the whole update for one loss: zero the gradients, backward through the
    scaled loss, unscale and clip the gradients' global 2-norm to ``clip_norm`` (0 = no
    clipping), step, update the scale. Several updaters may share parameters (FedHelp's
    feature extractor under two heads); each step moves only its own optimiser's.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        use_amp: bool = False,
        clip_norm: float = 0.0,
        device_type: str = "cuda",
    ) -> None:
        self.optimizer = optimizer
        self.scaler = torch.amp.GradScaler(device_type, enabled=use_amp)
        self.clip_norm = clip_norm

    @property
    def parameters(self) -> list[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.clip_norm > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.parameters, self.clip_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def state(self) -> State:
        """The optimiser's per-parameter state as a flat tensor dict (for a site state)."""
        return optimizer_to_state(self.optimizer)

    def restore(self, flat: State) -> bool:
        """Load a state saved by :meth:`state`; False (nothing loaded) if it does not fit."""
        return restore_optimizer(self.optimizer, flat)


def secret_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from the operating system's randomness: DP noise and Poisson
    sampling must not be predictable from the run's seed (the coordinator knows it)."""
    return torch.Generator(device).manual_seed(secrets.randbits(63))


class PrivateUpdater:
    """DP-SGD for one model: Opacus computes each sample's gradient (GradSampleModule hooks
    on the model's layers), :class:`~opacus.optimizers.DPOptimizer` clips each to
    ``max_grad_norm``, sums, adds N(0, (noise * max_grad_norm)^2) and divides by the
    expected batch size, then the wrapped optimiser steps.

    The model itself is not wrapped (callers keep its parameter names); :meth:`close`
    removes the hooks. A data-free loss term (``regularizer``) is not part of the per-sample
    gradients: its exact gradient is added after the noise, which costs no privacy.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: int,
        noise_generator: torch.Generator | None = None,
    ) -> None:
        self.hooks = opacus_backend.GradSampleModule(model, loss_reduction="mean")
        self.optimizer = opacus_backend.DPOptimizer(
            optimizer,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch_size,
            loss_reduction="mean",
            generator=noise_generator,
        )

    @property
    def parameters(self) -> list[torch.Tensor]:
        return [p for p in self.optimizer.params if p.requires_grad]

    def step(self, loss: torch.Tensor | None, regularizer: torch.Tensor | None = None) -> None:
        """One private step; ``loss`` None is an empty Poisson batch: a noise-only step (skipping
        it would tell whether the batch was empty)."""
        self.optimizer.zero_grad(set_to_none=True)
        if loss is None:
            for p in self.parameters:
                # Opacus's per-sample gradient attribute, which torch's Tensor does not declare
                p.grad_sample = torch.zeros(  # type: ignore[attr-defined]
                    (0, *p.shape), device=p.device, dtype=p.dtype
                )
        else:
            loss.backward()
        if not self.optimizer.pre_step():  # clip, sum, noise, scale into p.grad
            return
        if regularizer is not None and regularizer.requires_grad:
            grads = torch.autograd.grad(regularizer, self.parameters, allow_unused=True)
            for p, g in zip(self.parameters, grads, strict=True):
                if g is not None:
                    p.grad = p.grad + g if p.grad is not None else g
        self.optimizer.original_optimizer.step()

    @contextmanager
    def paused(self) -> Iterator[None]:
        """No per-sample hooks inside: a step on *public* data through layers this updater
        also trains (FedHelp's shared feature extractor) is an ordinary step, and leaves no
        per-sample gradient behind for the next private step."""
        self.hooks.disable_hooks()
        try:
            yield
        finally:
            self.hooks.enable_hooks()

    def state(self) -> State:
        """The wrapped optimiser's state (Fed-MAS keeps it at the site): post-processing of
        the noised gradients, so it costs no privacy."""
        return optimizer_to_state(self.optimizer.original_optimizer)

    def restore(self, flat: State) -> bool:
        return restore_optimizer(self.optimizer.original_optimizer, flat)

    def close(self) -> None:
        """Remove the per-sample hooks: the model is an ordinary module again."""
        self.hooks._close()


def poisson_plan(
    batch_size: int, num_samples: int, local_steps: int, local_epochs: int
) -> tuple[float, int]:
    """DP-SGD's sample rate ``q = batch-size / n`` and a round's steps (``local-steps``, else
    ``local-epochs`` passes of ``1/q`` Poisson batches): what the accountant composes."""
    rate = min(1.0, batch_size / max(num_samples, 1))
    return rate, step_budget(local_steps, local_epochs, max(1, math.floor(1 / rate)))


def poisson_batches(
    split: Split, batch_size: int, device: torch.device, generator: torch.Generator | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches where each sample is in with probability ``q`` independently (Poisson
    sampling: what the RDP accountant's subsampled Gaussian assumes), pass after pass; an
    empty batch is yielded as it is."""
    rate = min(1.0, batch_size / max(len(split), 1))
    loader = opacus_backend.DPDataLoader(
        TensorDataset(split.inputs, split.labels),
        sample_rate=rate,
        generator=generator or secret_generator(),
    )
    while True:
        for inputs, labels in loader:
            yield inputs.to(device), labels.to(device)


def optimizer_to_state(optimizer: torch.optim.Optimizer) -> State:
    """The optimizer's per-parameter state as a flat tensor dict (for :class:`SiteState`)."""
    saved = optimizer.state_dict()
    flat: State = {
        "meta.num_params": torch.tensor(sum(len(g["params"]) for g in saved["param_groups"]))
    }
    for index, values in saved["state"].items():
        for name, value in values.items():
            if value is None:
                continue
            tensor = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            flat[f"state.{index}.{name}"] = tensor.detach().cpu()
    return flat


def restore_optimizer(optimizer: torch.optim.Optimizer, flat: State) -> bool:
    """Load a state saved by :func:`optimizer_to_state`; False (nothing loaded) if it does not
    fit this optimizer (another model or optimizer)."""
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    if int(flat.get("meta.num_params", torch.tensor(-1))) != len(parameters):
        return False
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        if not key.startswith("state."):
            continue
        _, index, name = key.split(".", 2)
        position = int(index)
        if position >= len(parameters):
            return False
        if value.ndim > 0 and value.shape != parameters[position].shape:
            return False
        state.setdefault(position, {})[name] = value
    optimizer.load_state_dict(
        {"state": state, "param_groups": optimizer.state_dict()["param_groups"]}
    )
    return True


# ------------------------------------------------------------------------------ the loop


@dataclass(frozen=True)
class TrainStats:
    """What a loop did: the mean main loss, samples seen, steps, seconds, and the
    sample-weighted mean of every named loss the steps reported."""

    loss: float
    num_examples: int
    steps: int
    seconds: float
    means: dict[str, float] = field(default_factory=dict)


def step_budget(local_steps: int, local_epochs: int, batches_per_epoch: int) -> int:
    """``local-steps`` batches when set, else ``local-epochs`` passes over the data."""
    return local_steps or local_epochs * batches_per_epoch


class LocalLoop:
    """The training loop of one hospital (or one tool) on one device.

    ``amp`` asks for mixed precision, used on CUDA only (autocast in :meth:`autocast`, a
    gradient scaler in every :meth:`updater`). :meth:`run` calls a step function ``budget``
    times on successive batches and keeps the running means of the losses it reports.
    """

    def __init__(self, device: torch.device, amp: bool = False) -> None:
        self.device = device
        self.use_amp = amp and device.type == "cuda"

    @classmethod
    def for_run(cls, run: RunConfig, device: torch.device) -> LocalLoop:
        return cls(device, run.amp)

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, enabled=self.use_amp)

    def updater(
        self,
        parameters: Iterable[torch.Tensor],
        settings: OptimizerSettings,
        clip_norm: float = 0.0,
    ) -> Updater:
        return Updater(settings.build(parameters), self.use_amp, clip_norm, self.device.type)

    def private_updater(
        self,
        model: nn.Module,
        settings: OptimizerSettings,
        run: RunConfig,
        parameters: Iterable[torch.Tensor] | None = None,
    ) -> PrivateUpdater:
        """DP-SGD (the run's ``dp-noise-multiplier``, ``dp-max-grad-norm``) for ``parameters``
        (default: all of ``model``'s), per-sample gradients from hooks on ``model``'s layers,
        noise from a secretly seeded generator. Every step on private data under ``dp`` goes
        through one of these; :meth:`PrivateUpdater.close` when done."""
        return PrivateUpdater(
            model,
            settings.build(model.parameters() if parameters is None else parameters),
            run.dp_noise_multiplier,
            run.dp_max_grad_norm,
            run.batch_size,
            secret_generator(self.device),
        )

    def private_batches(
        self, split: Split, run: RunConfig
    ) -> tuple[Iterator[tuple[torch.Tensor, torch.Tensor]], int]:
        """A DP round's Poisson batches of ``split`` (secret sampling, may be empty) and its
        step budget (:func:`poisson_plan`: what the hospital's ledger is charged per model)."""
        _, budget = poisson_plan(run.batch_size, len(split), run.local_steps, run.local_epochs)
        return poisson_batches(split, run.batch_size, self.device), budget

    def batches(
        self,
        split: Split,
        batch_size: int,
        generator: torch.Generator | None,
        drop_last: bool = False,
    ) -> tuple[Iterator[tuple[torch.Tensor, torch.Tensor]], int]:
        """Shuffled ``(inputs, labels)`` batches on the device, pass after pass without end,
        and the number of batches in one pass."""
        loader = make_loader(split, batch_size, True, generator, drop_last)
        return self.cycle(loader), len(loader)

    def round_batches(
        self, split: Split, run: RunConfig, generator: torch.Generator, drop_last: bool = False
    ) -> tuple[Iterator[tuple[torch.Tensor, torch.Tensor]], int]:
        """A local round's batches of ``split`` (``batch-size``) and its step budget."""
        batches, per_epoch = self.batches(split, run.batch_size, generator, drop_last)
        return batches, step_budget(run.local_steps, run.local_epochs, per_epoch)

    def cycle(
        self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Pass after pass over ``batches`` (re-iterated, so a loader reshuffles), on the device."""
        while True:
            empty = True
            for inputs, labels in batches:
                empty = False
                yield inputs.to(self.device), labels.to(self.device)
            if empty:
                raise DataError("the training split yields no batch (is it empty?)")

    def run(
        self, budget: int, batches: Iterator[Batch], step: Callable[[Batch], StepResult]
    ) -> TrainStats:
        """``budget`` calls of ``step`` on successive batches; the means of what they report."""
        means = RunningMeans()
        started = time.perf_counter()
        for _ in range(budget):
            size, losses = step(next(batches))
            means.add(size, losses)
        return TrainStats(
            means.mean("loss"), means.count, budget, time.perf_counter() - started, means.means()
        )


class RunningMeans:
    """Sample-weighted running means of named losses."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.count = 0

    def add(self, size: int, values: Mapping[str, torch.Tensor | float]) -> None:
        self.count += size
        for name, value in values.items():
            number = float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
            self.sums[name] = self.sums.get(name, 0.0) + number * size

    def mean(self, name: str) -> float:
        return self.sums.get(name, 0.0) / max(self.count, 1)

    def means(self) -> dict[str, float]:
        return {name: self.mean(name) for name in self.sums}


def train_local(
    model: nn.Module,
    split: Split,
    run: RunConfig,
    device: torch.device,
    generator: torch.Generator,
    objective: Objective | None = None,
    parameters: list[nn.Parameter] | None = None,
    regularizer: Regularizer | None = None,
) -> TrainStats:
    """Train ``model`` in place for ``local-epochs`` (or ``local-steps`` batches) on ``split``.

    The one-model case of :class:`LocalLoop`: ``objective`` adds loss terms that read the
    batch, ``regularizer`` terms that read no data (FedProx's proximal term), ``parameters``
    restricts what the optimiser updates (pFedNet's phases). Under ``dp = "dp-sgd"`` the
    steps are DP-SGD on Poisson batches (:class:`PrivateUpdater`); ``generator`` then orders
    nothing (the sampling is secret).
    """
    task_loss = task_of(run).loss
    loss_of = objective or (lambda _m, _x, y, logits: task_loss(logits, y))
    loop = LocalLoop.for_run(run, device)
    model.to(device).train()
    if run.dp == "dp-sgd":
        trainable = parameters or [p for p in model.parameters() if p.requires_grad]
        return _train_private(model, split, run, loop, trainable, loss_of, regularizer)
    updater = loop.updater(parameters or list(model.parameters()), OptimizerSettings.of(run))
    batches, budget = loop.round_batches(split, run, generator)

    def step(batch: tuple[torch.Tensor, torch.Tensor]) -> StepResult:
        inputs, labels = batch
        with loop.autocast():
            logits = model(inputs)
            loss = loss_of(model, inputs, labels, logits)
            extra = regularizer(model) if regularizer is not None else None
            if extra is not None:
                loss = loss + extra
        updater.step(loss)
        return len(labels), {"loss": loss}

    return loop.run(budget, batches, step)


def _train_private(
    model: nn.Module,
    split: Split,
    run: RunConfig,
    loop: LocalLoop,
    trainable: list[nn.Parameter],
    loss_of: Objective,
    regularizer: Regularizer | None,
) -> TrainStats:
    """:func:`train_local` under DP-SGD: ``poisson_plan`` steps of :class:`PrivateUpdater`."""
    for parameter in model.parameters():  # Opacus computes per-sample grads of these only
        parameter.requires_grad_(any(parameter is p for p in trainable))
    updater = loop.private_updater(model, OptimizerSettings.of(run), run, trainable)
    batches, budget = loop.private_batches(split, run)

    def step(batch: tuple[torch.Tensor, torch.Tensor]) -> StepResult:
        inputs, labels = batch
        extra = regularizer(model) if regularizer is not None else None
        if len(labels) == 0:
            updater.step(None, extra)
            return 0, {}
        logits = model(inputs)
        loss = loss_of(model, inputs, labels, logits)
        updater.step(loss, extra)
        total = loss.detach() + (extra.detach() if extra is not None else 0.0)
        return len(labels), {"loss": total}

    try:
        return loop.run(budget, batches, step)
    finally:
        updater.close()


# ------------------------------------------------------------------------------ evaluation


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
