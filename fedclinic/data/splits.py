"""Index splitting shared by every source: stratified train/val/test splits and hospital partitions.

All functions work on label arrays and return *index* arrays, so that a source can apply the
same plan to its inputs, record it, and tests can check that it is disjoint and complete.
Everything is seeded explicitly (numpy ``default_rng``); nothing depends on global state.

* :func:`allocate` splits an integer count by weights with the largest-remainder rule
  (the parts always add up to the count, so no sample is ever lost to rounding).
* :func:`stratified_split` splits each class by the same fractions.
* :func:`label_skew_proportions` / :func:`partition_by_proportions` simulate hospitals from one
  pooled data set: hospital sizes that follow the size fractions, plus an optional Dirichlet
  label skew. Every hospital computes the same plan from the same ``data-seed`` and keeps its
  own part, so the parts are disjoint.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedclinic.config import HospitalConfig
from fedclinic.errors import ConfigError

Seed = int | Sequence[int]

DEFAULT_TEST_FRACTION = 0.15


def allocate(total: int, weights: Sequence[float] | np.ndarray) -> np.ndarray:
    """Split ``total`` into integer parts proportional to ``weights`` (largest remainder).

    The parts sum to ``total`` exactly; ties in the remainders go to the earlier part.
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or w.size == 0 or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"allocate: expected non-negative weights with a positive sum, got {w}")
    exact = np.round(total * w / w.sum(), 9)  # 0.7 * 10 is 7, not 6.9999...
    counts = np.floor(exact).astype(np.int64)
    rest = int(total - counts.sum())
    if rest > 0:
        order = np.argsort(-(exact - counts), kind="stable")
        counts[order[:rest]] += 1
    return counts


def stratified_split(
    labels: np.ndarray, fractions: Sequence[float], seed: Seed
) -> list[np.ndarray]:
    """Split indices ``0..len(labels)-1`` into ``len(fractions)`` groups, class by class.

    Each class is shuffled (seeded) and cut by :func:`allocate`, so every group gets its share
    of every class (within one sample). Groups are returned sorted, i.e. in the original order.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    groups: list[list[np.ndarray]] = [[] for _ in fractions]
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        bounds = np.cumsum(allocate(len(members), fractions))[:-1]
        for group, part in zip(groups, np.split(members, bounds), strict=True):
            group.append(part)
    return [
        np.sort(np.concatenate(g)).astype(np.int64) if g else np.zeros(0, dtype=np.int64)
        for g in groups
    ]


def train_val_test_split(
    labels: np.ndarray, val_fraction: float, test_fraction: float, seed: Seed
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stratified train/val/test index split with the given val and test shares."""
    train_fraction = 1.0 - val_fraction - test_fraction
    if train_fraction <= 1e-9:
        raise ConfigError(
            f"hospital config: key 'val-fraction' = {val_fraction} is not allowed: with a test "
            f"share of {test_fraction} it leaves no training data (expected < {1 - test_fraction})"
        )
    train, val, test = stratified_split(labels, [train_fraction, val_fraction, test_fraction], seed)
    return train, val, test


def resolve_val_fraction(hospital: HospitalConfig, default: float) -> float:
    """The hospital's ``val-fraction``, or the source's default when it is -1 (unset)."""
    if hospital.val_fraction < 0:
        return default
    return hospital.val_fraction


def partition_fractions(hospital: HospitalConfig) -> np.ndarray:
    """The size share of each simulated hospital (``partition-fractions``; empty = equal)."""
    fractions = hospital.floats(hospital.partition_fractions)
    if not fractions:
        return np.full(hospital.num_partitions, 1.0 / hospital.num_partitions)
    if len(fractions) != hospital.num_partitions:
        raise ConfigError(
            f"hospital config: key 'partition-fractions' = {hospital.partition_fractions!r} is "
            f"not allowed: expected {hospital.num_partitions} numbers (one per partition)"
        )
    return np.asarray(fractions, dtype=np.float64)


def label_skew_proportions(
    class_counts: Sequence[int] | np.ndarray,
    fractions: np.ndarray,
    alpha: float,
    seed: Seed,
    iterations: int = 2000,
) -> np.ndarray:
    """Per-class share of each hospital, shape ``(num_classes, num_partitions)``; rows sum to 1.

    Hospital *i* receives ``fractions[i]`` of all samples (within one sample per class) and a
    class mix drawn from ``Dirichlet(alpha * K * prior)`` (K classes, ``prior`` = the pooled
    class shares; Hsu et al. 2019's per-client label skew, whose mean is the pooled mix).
    The drawn counts ``n_i * q_i`` cannot in general also use every sample of every class,
    so they are fitted to both margins (hospital sizes and class totals) by iterative
    proportional fitting: the table closest to the draw (in KL divergence) that keeps the
    sizes and uses every sample. Drawing per class instead (each class split by its own
    Dirichlet) would let the hospital sizes drift far from the fractions when the classes are
    unequal. ``alpha == 0``: every class is split by the size fractions (no skew, stratified).
    Smaller alpha means stronger skew.
    """
    fractions = np.asarray(fractions, dtype=np.float64)
    counts = np.asarray(class_counts, dtype=np.float64)
    if counts.ndim != 1 or counts.size == 0 or (counts < 0).any() or counts.sum() <= 0:
        raise ValueError(f"label_skew_proportions: expected class counts, got {class_counts}")
    if alpha == 0:
        return np.tile(fractions / fractions.sum(), (len(counts), 1))
    rng = np.random.default_rng(seed)
    prior = counts / counts.sum()
    present = prior > 0
    sizes = counts.sum() * fractions / fractions.sum()
    mixes = np.zeros((len(fractions), len(counts)))
    mixes[:, present] = rng.dirichlet(alpha * present.sum() * prior[present], size=len(fractions))
    # A floor keeps every present cell positive, so the fit below always exists: a hospital
    # whose draw put nothing on a class may still receive a little of it.
    table = np.where(present, sizes[:, None] * mixes + 1e-9, 0.0)
    for _ in range(iterations):
        table *= (sizes / table.sum(axis=1))[:, None]
        table[:, present] *= counts[present] / table[:, present].sum(axis=0)
        if np.allclose(table.sum(axis=1), sizes, rtol=1e-9, atol=1e-6):
            break
    shares = np.zeros((len(counts), len(fractions)))
    shares[present] = (table[:, present] / counts[present]).T
    shares[~present] = fractions / fractions.sum()  # an absent class has nothing to split
    return shares / shares.sum(axis=1, keepdims=True)


def partition_by_proportions(
    labels: np.ndarray, proportions: np.ndarray, seed: Seed
) -> list[np.ndarray]:
    """Split indices into ``proportions.shape[1]`` disjoint parts that together cover them all.

    Class ``c``'s members are shuffled (seeded) and cut by ``allocate(n_c, proportions[c])``.
    Labels must lie in ``0..proportions.shape[0]-1``.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(proportions.shape[1])]
    for cls in range(proportions.shape[0]):
        members = rng.permutation(np.flatnonzero(labels == cls))
        bounds = np.cumsum(allocate(len(members), proportions[cls]))[:-1]
        for part, chunk in zip(parts, np.split(members, bounds), strict=True):
            part.append(chunk)
    return [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]
