"""FedHelp's mathematics, kept apart so that tests can check each term by hand.

Decision IDs (FH-n) are defined in docs/fedhelp.md#decisions.

- :func:`class_log_probs`: log-probabilities at temperature ``T`` (one binary logit z is
  the two classes ``[0, z]``, so every model speaks the same C-class language); per pixel for
  segmentation outputs ``(B, C, H, W)``, where ``[0, z]`` makes the KL between two one-channel
  models the Bernoulli KL between ``sigmoid(z^L / T)`` and ``sigmoid(z / T)`` (FH-11);
- :func:`temper_probabilities`: a stored probability vector at temperature ``T``:
  ``softmax(s / T) = p^(1/T) / sum p^(1/T)`` for ``p = softmax(s)``, so storing probabilities
  (FH-4) loses nothing;
- :func:`kl_divergence`: ``KL(p || q) = sum_c p_c (log p_c - log q_c)``, teacher ``p`` first;
  gradients flow into whichever argument carries them (both KD directions use it);
- :func:`ranking_loss`: the backward (proxy -> large) ranking distillation with the corrected
  hinge of FH-8;
- :func:`assign_roles`: large/small from the hospital configs, else by training-set size;
- head surgery helpers for the surrogate (FH-6): a ``Linear`` classifier, or a UNet's final
  1x1 convolution (the reference's ``outconv``).

Dense (segmentation) outputs: every per-sample term is computed per pixel and averaged over
the pixels of each image, so one image weighs as much as one classified sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fedclinic.errors import ConfigError


def as_class_logits(logits: torch.Tensor) -> torch.Tensor:
    """``(B, C, ...)`` logits; a single binary logit z becomes ``[0, z]`` (same softmax as
    sigmoid)."""
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

    ``batchmean``: the sum over classes, averaged over the batch (the true per-sample KL;
    for ``(B, C, H, W)`` the per-pixel KL averaged over pixels and batch); ``mean``: divided
    by every element (B*C, or B*C*H*W), as PyTorch's default ``nn.KLDivLoss()`` in the
    reference code.
    """
    p = teacher_log_probs.exp()
    terms = p * (teacher_log_probs - student_log_probs)
    classes = terms.shape[1]
    if reduction == "batchmean":
        return terms.sum() / (terms.numel() // classes)
    if reduction == "mean":
        return terms.sum() / terms.numel()
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
    Segmentation outputs ``(B, C, H, W)``: the hinge per pixel, averaged over each image's
    pixels (then summed or averaged over the batch as above). No gradient reaches the proxy.
    """
    batch = large_logits.shape[0]
    large = _positions(as_class_logits(large_logits).float())
    proxy = _positions(as_class_logits(proxy_logits).detach())
    classes = large.shape[1]
    per_image = large.shape[0] // batch  # pixels per image; 1 for classification
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
    total = hinge.sum() / (2 * k * per_image)
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / batch
    raise ValueError(f"unknown ranking reduction {reduction!r}")


def _positions(logits: torch.Tensor) -> torch.Tensor:
    """``(B, C)`` as it is; ``(B, C, H, W)`` as ``(B*H*W, C)``, one row per pixel."""
    if logits.ndim == 2:
        return logits
    classes = logits.shape[1]
    return logits.movedim(1, -1).reshape(-1, classes)


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


def _is_head(module: nn.Module) -> bool:
    """A ``Linear`` classifier or a 1x1 convolution (a segmentation network's ``outconv``)."""
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, nn.Conv2d) and tuple(module.kernel_size) == (1, 1)


def find_head(model: nn.Module, prefix: str) -> str:
    """Qualified name of the model's final head (``Linear`` or 1x1 conv, under ``prefix``)."""
    stem = prefix.rstrip(".")
    names = [
        name
        for name, module in model.named_modules()
        if _is_head(module) and (name == stem or name.startswith(stem + "."))
    ]
    if not names:
        raise ConfigError(
            f"FedHelp: the model has no Linear classification head (nor a 1x1-convolution "
            f"head) under '{stem}'; "
            "the surrogate needs one"
        )
    return names[-1]


def new_head(like: nn.Module, outputs: int) -> nn.Module:
    """A freshly initialised head of ``like``'s kind and inputs with ``outputs`` outputs."""
    if isinstance(like, nn.Linear):
        return nn.Linear(like.in_features, outputs)
    if isinstance(like, nn.Conv2d):
        return nn.Conv2d(like.in_channels, outputs, kernel_size=1)
    raise ConfigError(f"FedHelp: a head of type {type(like).__name__} cannot be re-created")


def head_outputs(head: nn.Module) -> int:
    """Number of outputs (classes, or channels) of a head made by :func:`new_head`."""
    if isinstance(head, nn.Linear):
        return head.out_features
    if isinstance(head, nn.Conv2d):
        return head.out_channels
    raise ConfigError(f"FedHelp: a head of type {type(head).__name__} is not supported")


def get_module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the sub-module at dotted ``name`` (e.g. ``classifier`` or ``class_layers.out``)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
