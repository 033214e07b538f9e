"""FedHelp's mathematics, kept apart so that tests can check each term by hand.

- :func:`class_log_probs`: log-probabilities at temperature ``T`` (one binary logit z is
  the two classes ``[0, z]``, so every model speaks the same C-class language);
- :func:`temper_probabilities`: a stored probability vector at temperature ``T``:
  ``softmax(s / T) = p^(1/T) / sum p^(1/T)`` for ``p = softmax(s)``, so storing probabilities
  (FH-4) loses nothing;
- :func:`kl_divergence`: ``KL(p || q) = sum_c p_c (log p_c - log q_c)``, teacher ``p`` first;
  gradients flow into whichever argument carries them (both KD directions use it);
- :func:`ranking_loss`: the backward (proxy -> large) ranking distillation with the corrected
  hinge of FH-8;
- :func:`assign_roles`: large/small from the hospital configs, else by training-set size;
- head surgery helpers for the surrogate (FH-6).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fedclinic.errors import ConfigError


def as_class_logits(logits: torch.Tensor) -> torch.Tensor:
    """``(B, C)`` logits; a single binary logit z becomes ``[0, z]`` (same softmax as sigmoid)."""
    if logits.shape[1] == 1:
        return torch.cat([torch.zeros_like(logits), logits], dim=1)
    return logits


def class_log_probs(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``log softmax(z / T)`` over classes, in float32 (also under autocast)."""
    return F.log_softmax(as_class_logits(logits).float() / temperature, dim=1)


def temper_probabilities(probabilities: torch.Tensor, temperature: float) -> torch.Tensor:
    """``p^(1/T)`` renormalised: equals ``softmax(s / T)`` when ``p = softmax(s)``."""
    if temperature == 1.0:
        return probabilities
    # In log space, so that small probabilities do not underflow before renormalising.
    tiny = torch.finfo(probabilities.dtype).tiny
    return F.softmax(torch.log(probabilities.clamp_min(tiny)) / temperature, dim=1)


def probabilities_log(probabilities: torch.Tensor) -> torch.Tensor:
    """``log p`` with zeros kept finite (their terms vanish: p * anything = 0)."""
    return torch.log(probabilities.clamp_min(torch.finfo(probabilities.dtype).tiny))


def kl_divergence(
    teacher_log_probs: torch.Tensor, student_log_probs: torch.Tensor, reduction: str = "batchmean"
) -> torch.Tensor:
    """``KL(p || q)`` with ``p = exp(teacher_log_probs)``, ``q = exp(student_log_probs)``.

    ``batchmean``: the sum over classes, averaged over the batch (the true per-sample KL);
    ``mean``: divided by B*C, as PyTorch's default ``nn.KLDivLoss()`` in the reference code.
    """
    p = teacher_log_probs.exp()
    terms = p * (teacher_log_probs - student_log_probs)
    batch, classes = terms.shape
    if reduction == "batchmean":
        return terms.sum() / batch
    if reduction == "mean":
        return terms.sum() / (batch * classes)
    raise ValueError(f"unknown KL reduction {reduction!r}")


def ranking_loss(
    large_logits: torch.Tensor,
    proxy_logits: torch.Tensor,
    k: int,
    margin: float = 0.0,
    reduction: str = "sum",
) -> torch.Tensor:
    """Backward ranking distillation (FH-8): the large model should rank the proxy's top-k first.

    ``L = 1/(2k) * sum_n sum_{a in K_n} sum_{b not in K_n} max(0, m - (zL_a - zL_b))`` where
    ``K_n`` are the indices of the proxy's k largest logits for sample n and ``zL`` the large
    model's logits. Minimising it *raises* the large model's logits on the proxy's top-k
    classes (the reference code's ``max(0, zL_a - zL_b)`` lowers them). ``reduction="sum"``
    sums over the batch as the reference does; ``"mean"`` divides by the batch size.
    No gradient reaches the proxy.
    """
    large = as_class_logits(large_logits).float()
    proxy = as_class_logits(proxy_logits).detach()
    batch, classes = large.shape
    if not 1 <= k < classes:
        raise ConfigError(
            f"run config: key 'fedhelp.rank-k' = {k} is not allowed: expected 1..{classes - 1} "
            f"for {classes} classes"
        )
    top = proxy.topk(k, dim=1).indices  # (B, k)
    in_top = torch.zeros_like(large, dtype=torch.bool).scatter(1, top, True)
    top_logits = large.gather(1, top)  # (B, k)
    gaps = top_logits[:, :, None] - large[:, None, :]  # (B, k, C): zL_a - zL_b
    hinge = F.relu(margin - gaps) * (~in_top)[:, None, :].float()
    total = hinge.sum() / (2 * k)
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / batch
    raise ValueError(f"unknown ranking reduction {reduction!r}")


# ------------------------------------------------------------------------------ roles


@dataclass(frozen=True)
class RoleEntry:
    """One hospital as the setup query saw it."""

    key: int  # the node id
    hospital: str
    configured: str  # "", "large" or "small" (hospital config key ``role``)
    num_train: int


@dataclass(frozen=True)
class Assignment:
    role: str  # "large" or "small"
    source: str  # "config" or "size-rank"


def assign_roles(entries: Sequence[RoleEntry], num_large: int) -> dict[int, Assignment]:
    """Roles for every hospital: configured roles are kept; the others are ranked by size.

    ``num_large`` is the total number of large hospitals wanted: hospitals configured
    ``large`` count towards it, and the remaining slots go to the unconfigured hospitals with
    the most training samples (ties: hospital name), as the reference code ranks clients
    by data size (``ranking_dict(user_groups)[:top_n]``). Everyone else is small.
    """
    result: dict[int, Assignment] = {}
    for entry in entries:
        if entry.configured in ("large", "small"):
            result[entry.key] = Assignment(entry.configured, "config")
    open_slots = max(0, num_large - sum(1 for a in result.values() if a.role == "large"))
    ranked = sorted(
        (e for e in entries if e.key not in result), key=lambda e: (-e.num_train, e.hospital)
    )
    for position, entry in enumerate(ranked):
        result[entry.key] = Assignment("large" if position < open_slots else "small", "size-rank")
    return result


# ------------------------------------------------------------------------------ heads


def find_head(model: nn.Module, prefix: str) -> str:
    """Qualified name of the model's final classification ``Linear`` (under ``prefix``)."""
    stem = prefix.rstrip(".")
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and (name == stem or name.startswith(stem + "."))
    ]
    if not names:
        raise ConfigError(
            f"FedHelp: the model has no Linear classification head under '{stem}'; "
            "the surrogate needs one"
        )
    return names[-1]


def get_module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the sub-module at dotted ``name`` (e.g. ``classifier`` or ``class_layers.out``)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
