"""Fed-MAS mathematics (docs/fedmas.md): losses, class-wise divergence, robust factor, weights.

Kept apart from the Flower plumbing so that each formula can be checked against a hand
computation:

- ``L_f(x) = || p/||p|| - f(x)/||f(x)|| ||^2 = 2 - 2 cos(p, f(x))`` per sample;
- ``BSM(z, y) = CE(z + log pi, y)`` with the hospital's class prior ``pi_c = n_c/n (+1e-12)``;
- the class-wise divergence ``w_c = sum_b (n_{b,c}/n_c) * mean_{i in b, y_i = c} L_f(x_i)``;
- ``RF = sum_{c: w_c != 0} (w_c / sum w) (w_hat_c / sum w_hat)`` (``mas_inv``: ``w_hat_c`` ->
  ``1/w_hat_c`` on the classes with ``w_c != 0`` first);
- the server's weights ``a_k``: ``mas``/``mas_inv`` ``RF_k / sum RF``, ``avg`` ``n_k / sum n``,
  ``mas_drw`` FedAvg until the switch round, then ``n_k e_k`` with the effective-number factor
  ``e_k = (1 - beta) / (1 - beta^{u_k})``, ``u_k = (1/RF_k) / sum_j (1/RF_j)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

AGGREGATIONS = ("mas", "mas_inv", "mas_drw", "avg")


def alignment_loss(projection: torch.Tensor, prior_features: torch.Tensor) -> torch.Tensor:
    """Per-sample ``2 - 2 cos(p, f(x))`` (the squared distance of the l2-normalised vectors)."""
    p = F.normalize(projection.float(), dim=-1, p=2)
    f = F.normalize(prior_features.float(), dim=-1, p=2)
    return 2 - 2 * (p * f).sum(dim=-1)


def class_log_prior(class_counts: torch.Tensor) -> torch.Tensor:
    """``log(n_c / n + 1e-12)``: the balanced-softmax adjustment of one hospital."""
    counts = class_counts.double()
    return torch.log(counts / counts.sum() + 1e-12).float()


def balanced_softmax_loss(
    logits: torch.Tensor, labels: torch.Tensor, log_prior: torch.Tensor
) -> torch.Tensor:
    """Balanced softmax: cross-entropy of the logits shifted by the local log class prior."""
    return F.cross_entropy(logits.float() + log_prior.to(logits.device), labels)


class ClassDivergence:
    """Accumulates ``w_c += (n_{b,c}/n_c) * mean_{i in b, y_i=c} L_f(x_i)`` batch by batch.

    ``(n_{b,c}/n_c) * mean_{b,c}`` equals ``sum_{i in b, y_i=c} L_f(x_i) / n_c``, which is how it
    is computed; over one full pass this is the class mean of ``L_f``, over E epochs E times it.
    Classes absent from the hospital stay 0.
    """

    def __init__(self, class_counts: Sequence[int] | torch.Tensor) -> None:
        self.counts = torch.as_tensor(class_counts, dtype=torch.float64)
        self.total = torch.zeros_like(self.counts)

    def add(self, losses: torch.Tensor, labels: torch.Tensor) -> None:
        sums = torch.bincount(
            labels.detach().cpu(),
            weights=losses.detach().cpu().double(),
            minlength=len(self.counts),
        )
        present = self.counts > 0
        self.total[present] += sums[present] / self.counts[present]

    def values(self) -> list[float]:
        return [float(v) for v in self.total]


def robust_factor(
    w: Sequence[float] | np.ndarray, w_hat: Sequence[float] | np.ndarray, inverse: bool = False
) -> float:
    """``RF = sum_{c: w_c != 0} (w_c / sum_j w_j) * (w_hat_c / sum_j w_hat_j)``.

    ``inverse`` (``mas_inv``): ``w_hat_c`` is replaced by ``1/w_hat_c`` on the classes with
    ``w_c != 0`` before normalising (the reference's order). Returns 0 when either vector
    sums to zero (nothing measured), and ``nan`` for a non-finite result.
    """
    global_w = np.asarray(w, dtype=np.float64)
    local_w = np.asarray(w_hat, dtype=np.float64).copy()
    measured = global_w != 0
    if inverse:
        with np.errstate(divide="ignore"):
            local_w[measured] = 1.0 / local_w[measured]
    total_global, total_local = global_w.sum(), local_w.sum()
    if total_global == 0 or total_local == 0:
        return 0.0
    value = float(np.sum((global_w[measured] / total_global) * (local_w[measured] / total_local)))
    return value if math.isfinite(value) else math.nan


def fedavg_weights(num_samples: Sequence[float]) -> list[float]:
    total = float(sum(num_samples))
    return [float(n) / total for n in num_samples]


def drw_factors(robust_factors: Sequence[float], beta: float) -> list[float]:
    """Effective-number factors ``e_k = (1-beta)/(1-beta^{u_k})``, ``u_k ∝ 1/RF_k``, scaled to
    sum to the number of hospitals (the reference's normalisation; it cancels in ``a_k``)."""
    inverse = np.array([1.0 / r for r in robust_factors], dtype=np.float64)
    u = inverse / inverse.sum()
    factors = (1.0 - beta) / (1.0 - np.power(beta, u))
    factors = factors / factors.sum() * len(factors)
    return [float(f) for f in factors]


def drw_active(server_round: int, rounds: int, start: float) -> bool:
    """Delayed re-weighting starts at 0-based round ``int(rounds * start)`` (reference: 0.8 R)."""
    return server_round - 1 >= int(rounds * start)


def aggregation_weights(
    method: str,
    robust_factors: Sequence[float],
    num_samples: Sequence[float],
    server_round: int = 1,
    rounds: int = 1,
    drw_start: float = 0.8,
    drw_beta: float = 0.9999,
) -> tuple[list[float], str]:
    """The weights ``a_k`` (summing to 1) and the rule actually applied.

    A MAS rule whose robust factors are unusable (zero sum, non-finite, a zero factor under
    DRW) falls back to FedAvg weights and says so (``"avg (fallback)"``) instead of failing.
    """
    if method not in AGGREGATIONS:
        raise ValueError(
            f"unknown aggregation {method!r}: expected one of {', '.join(AGGREGATIONS)}"
        )
    if len(robust_factors) != len(num_samples) or not num_samples:
        raise ValueError("need one robust factor and one sample count per hospital")
    if sum(num_samples) <= 0:
        raise ValueError("the hospitals' sample counts must sum to a positive number")
    rf = [float(r) for r in robust_factors]
    usable = all(math.isfinite(r) and r >= 0 for r in rf) and sum(rf) > 0
    if method == "avg":
        return fedavg_weights(num_samples), "avg"
    if method in ("mas", "mas_inv"):
        if not usable:
            return fedavg_weights(num_samples), "avg (fallback)"
        total = sum(rf)
        return [r / total for r in rf], method
    if not drw_active(server_round, rounds, drw_start):
        return fedavg_weights(num_samples), "mas_drw (avg phase)"
    if not usable or any(r == 0 for r in rf):
        return fedavg_weights(num_samples), "avg (fallback)"
    factors = drw_factors(rf, drw_beta)
    scaled = [float(n) * e for n, e in zip(num_samples, factors, strict=True)]
    total = sum(scaled)
    return [s / total for s in scaled], "mas_drw (re-weighted)"
