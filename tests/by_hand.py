"""Independent re-computations for the replay tests of the local training loops.

The replay tests train a hospital's model with the code under test, then repeat the same
steps here from the papers' formulas (softmax KL written out, the ranking hinge as loops,
plain SGD as ``p <- p - lr * g``) and compare the resulting weights. Nothing here calls
the algorithms' own loss functions, optimisers or loops, so a test fails when the code
computes another loss than the formula (a reversed KL, a missing temperature, a detached
term, a dropped weight), which a test comparing the code with itself cannot see.

Full-batch steps (``batch-size`` at least the training split) make the batch order
irrelevant: every loss is a mean or sum over the batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedclinic.config import HospitalConfig, RunConfig
from fedclinic.data import DataRequest, load_hospital_data
from fedclinic.site import SiteState
from strategies import load_run_config
from strategies.base import ClientContext


def kl(
    teacher_logits: torch.Tensor,
    student_logits: torch.Tensor,
    temperature: float,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """``KL(softmax(t/T) || softmax(s/T))``: summed over classes, averaged over the batch
    (``batchmean``) or divided by every element (``mean``, as ``nn.KLDivLoss()``)."""
    p = F.softmax(teacher_logits / temperature, dim=1)
    log_p = F.log_softmax(teacher_logits / temperature, dim=1)
    log_q = F.log_softmax(student_logits / temperature, dim=1)
    terms = p * (log_p - log_q)
    if reduction == "batchmean":
        return terms.sum() / terms.shape[0]
    return terms.sum() / terms.numel()


def kl_to_probabilities(target: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """``KL(target || softmax(s))`` per sample, averaged over the batch (target given as
    probabilities already at the right temperature)."""
    log_q = F.log_softmax(student_logits, dim=1)
    terms = torch.where(target > 0, target * (torch.log(target) - log_q), torch.zeros_like(log_q))
    return terms.sum() / target.shape[0]


def ranking(
    large: torch.Tensor, proxy: torch.Tensor, k: int, margin: float, reduction: str
) -> torch.Tensor:
    """``1/(2k) sum_n sum_{a in top-k(proxy_n)} sum_{b not in it} max(0, m - (zL_a - zL_b))``,
    by loops; ``mean`` divides by the batch size. The proxy enters only through its ranking."""
    total = large.new_zeros(())
    for n in range(large.shape[0]):
        order = sorted(range(proxy.shape[1]), key=lambda c: -float(proxy[n, c]))
        top = order[:k]
        for a in top:
            for b in range(large.shape[1]):
                if b not in top:
                    total = total + torch.clamp(margin - (large[n, a] - large[n, b]), min=0)
    total = total / (2 * k)
    return total / large.shape[0] if reduction == "mean" else total


def sgd_step(
    parameters: Iterable[torch.Tensor], loss: torch.Tensor, lr: float, clip: float = 0.0
) -> float:
    """``p <- p - lr * g`` for every parameter that the loss reaches (none other moves);
    ``clip`` > 0 first scales all gradients together to at most that 2-norm. Returns the
    gradients' 2-norm before clipping."""
    parameters = list(parameters)
    grads = torch.autograd.grad(loss, parameters, allow_unused=True)
    norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads if g is not None))
    if clip > 0:
        factor = clip / (norm + 1e-6)
        if factor < 1:
            grads = tuple(None if g is None else g * factor for g in grads)
    with torch.no_grad():
        for parameter, grad in zip(parameters, grads, strict=True):
            if grad is not None:
                parameter -= lr * grad
    return norm


def grads_reach(loss: torch.Tensor, module: nn.Module) -> bool:
    """Whether any gradient of ``loss`` reaches a parameter of ``module``."""
    grads = torch.autograd.grad(
        loss, list(module.parameters()), allow_unused=True, retain_graph=True
    )
    return any(g is not None and bool(g.abs().sum() > 0) for g in grads)


def clone_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same_update(
    before: Mapping[str, torch.Tensor],
    code: Mapping[str, torch.Tensor],
    by_hand: Mapping[str, torch.Tensor],
    rel: float = 1e-4,
) -> None:
    """The code moved every entry as the replay did: ``|code - hand|`` within ``rel`` of the
    replay's own step ``|hand - before|`` (per entry, plus a float32 floor), and it moved."""
    assert set(code) == set(by_hand), sorted(set(code) ^ set(by_hand))
    moved = 0.0
    for key, expected in by_hand.items():
        got = code[key].to(expected.dtype)
        step = float((expected.double() - before[key].double()).norm())
        error = float((got.double() - expected.double()).norm())
        moved += step
        scale = float(expected.double().norm())
        assert error <= rel * step + 1e-5 * max(scale, 1.0), (
            f"{key}: the code's weights differ from the replay by {error:.3g} "
            f"(the replayed step moved them by {step:.3g})"
        )
    assert moved > 0, "the replay did not move any weight: the test would prove nothing"


# ------------------------------------------------------------------------------ set-up


def supervised(kind: str, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The local supervised loss by hand: plain CE, or balanced softmax ``CE(z + log pi, y)``
    with ``pi`` the class frequencies of ``y`` (the full training split: one batch)."""
    if kind == "ce":
        return F.cross_entropy(logits, y)
    assert kind == "bsm", kind
    counts = torch.bincount(y, minlength=logits.shape[1]).double()
    return F.cross_entropy(logits + torch.log(counts / counts.sum()).float(), y)


def full_batch_run(algorithm: str, lr: float, **extra: Any) -> RunConfig:
    """Plain SGD (no momentum, no weight decay) on three classes, one batch per pass."""
    return load_run_config(
        {
            "algorithm": algorithm,
            "run-name": "replay",
            "num-classes": 3,
            "batch-size": 256,  # one batch is the whole training split
            "optimizer": "sgd",
            "momentum": 0.0,
            "learning-rate": lr,
            **extra,
        }
    )


def hospital_context(
    run: RunConfig, tmp_path: Path, server_config: dict[str, Any] | None = None, **hospital: Any
) -> ClientContext:
    """A synthetic hospital of 40 samples with imbalanced classes (0.6, 0.3, 0.1)."""
    config = HospitalConfig(
        hospital="h-1",
        data_source="synthetic",
        num_samples=40,
        class_priors="0.6,0.3,0.1",
        **hospital,
    )
    return ClientContext(
        run=run,
        hospital=config,
        data=load_hospital_data(DataRequest(run, config)),
        device=torch.device("cpu"),
        site=SiteState(tmp_path / "site"),
        server_round=1,
        server_config=server_config or {},
    )
