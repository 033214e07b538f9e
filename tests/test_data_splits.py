"""Shared split helpers: counts add up, classes stay stratified, partitions are disjoint."""

from __future__ import annotations

import numpy as np
import pytest

from fedclinic.config import HospitalConfig
from fedclinic.data.splits import (
    allocate,
    label_skew_proportions,
    partition_by_proportions,
    partition_fractions,
    resolve_val_fraction,
    stratified_split,
    train_val_test_split,
)
from fedclinic.errors import ConfigError


@pytest.mark.parametrize(
    ("total", "weights", "expected"),
    [
        (10, [0.7, 0.15, 0.15], [7, 2, 1]),  # ties go to the earlier part
        (3, [0.7, 0.15, 0.15], [2, 1, 0]),
        (100, [0.7, 0.15, 0.15], [70, 15, 15]),
        (3, [0.5, 0.5], [2, 1]),
        (7, [1, 0], [7, 0]),
        (0, [0.2, 0.8], [0, 0]),
    ],
)
def test_allocate_adds_up(total: int, weights: list[float], expected: list[int]) -> None:
    counts = allocate(total, weights)
    assert counts.tolist() == expected
    assert counts.sum() == total


def test_stratified_split_is_exhaustive_disjoint_stratified_and_seeded() -> None:
    labels = np.repeat([0, 1, 2], [100, 40, 10])
    parts = stratified_split(labels, [0.7, 0.15, 0.15], seed=5)
    joined = np.concatenate(parts)
    assert sorted(joined.tolist()) == list(range(len(labels)))
    assert [np.bincount(labels[p], minlength=3).tolist() for p in parts] == [
        [70, 28, 7],
        [15, 6, 2],
        [15, 6, 1],
    ]
    again = stratified_split(labels, [0.7, 0.15, 0.15], seed=5)
    other = stratified_split(labels, [0.7, 0.15, 0.15], seed=6)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    assert not np.array_equal(parts[1], other[1])


def test_train_val_test_split_refuses_no_training_share() -> None:
    with pytest.raises(ConfigError, match=r"'val-fraction' = 0\.85"):
        train_val_test_split(np.zeros(20, dtype=int), 0.85, 0.15, seed=0)


def test_val_fraction_default_and_override() -> None:
    assert resolve_val_fraction(HospitalConfig(hospital="a"), 0.1) == 0.1
    assert resolve_val_fraction(HospitalConfig(hospital="a", val_fraction=0.0), 0.1) == 0.0
    assert resolve_val_fraction(HospitalConfig(hospital="a", val_fraction=0.3), 0.1) == 0.3


def test_partition_fractions() -> None:
    equal = partition_fractions(HospitalConfig(hospital="a", num_partitions=4))
    assert equal.tolist() == [0.25] * 4
    given = HospitalConfig(hospital="a", num_partitions=2, partition_fractions="0.7,0.3")
    assert partition_fractions(given).tolist() == [0.7, 0.3]
    wrong = HospitalConfig(hospital="a", num_partitions=3, partition_fractions="0.7,0.3")
    with pytest.raises(ConfigError, match="'partition-fractions'"):
        partition_fractions(wrong)


@pytest.mark.parametrize("alpha", [0.0, 0.1, 1.0, 100.0])
def test_partitions_are_disjoint_and_cover(alpha: float) -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, size=1000)
    fractions = np.array([0.5, 0.3, 0.2])
    proportions = label_skew_proportions(np.bincount(labels), fractions, alpha, seed=1)
    assert proportions.shape == (4, 3)
    np.testing.assert_allclose(proportions.sum(axis=1), 1.0)
    parts = partition_by_proportions(labels, proportions, seed=2)
    joined = np.concatenate(parts)
    assert len(joined) == len(labels)
    assert sorted(joined.tolist()) == list(range(len(labels)))


def test_no_skew_keeps_sizes_and_class_shares() -> None:
    labels = np.repeat([0, 1], [600, 400])
    proportions = label_skew_proportions([600, 400], np.array([0.5, 0.3, 0.2]), 0.0, seed=0)
    parts = partition_by_proportions(labels, proportions, seed=0)
    assert [len(p) for p in parts] == [500, 300, 200]
    assert [np.bincount(labels[p]).tolist() for p in parts] == [[300, 200], [180, 120], [120, 80]]


def test_small_alpha_skews_labels() -> None:
    labels = np.repeat(np.arange(4), 250)
    fractions = np.full(4, 0.25)
    counts = np.bincount(labels)
    skewed = partition_by_proportions(labels, label_skew_proportions(counts, fractions, 0.1, 3), 3)
    flat = partition_by_proportions(labels, label_skew_proportions(counts, fractions, 0.0, 3), 3)

    def majority_share(parts: list[np.ndarray]) -> float:
        shares = [np.bincount(labels[p], minlength=4).max() / max(len(p), 1) for p in parts]
        return float(np.mean(shares))

    assert majority_share(flat) == pytest.approx(0.25)
    assert majority_share(skewed) > 0.6


@pytest.mark.parametrize("alpha", [0.1, 0.5, 1.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_skewed_partitions_keep_the_size_fractions(alpha: float, seed: int) -> None:
    # Two very unequal classes (PneumoniaMNIST's train split: 1214 normal, 3494 pneumonia)
    # and very unequal hospitals: every hospital still gets its fraction of the samples
    # (within one sample per class), every sample is used, and the class mixes differ.
    labels = np.repeat([0, 1], [1214, 3494])
    fractions = np.array([0.40, 0.30, 0.12, 0.08, 0.06, 0.04])
    proportions = label_skew_proportions(np.bincount(labels), fractions, alpha, seed=seed)
    parts = partition_by_proportions(labels, proportions, seed=seed)
    sizes = np.array([len(p) for p in parts])
    assert np.abs(sizes - fractions * len(labels)).max() <= 2
    assert sizes.sum() == len(labels)
    normal_share = [float((labels[p] == 0).mean()) for p in parts]
    assert max(normal_share) - min(normal_share) > 0.2


def test_skew_fit_matches_a_hand_computed_table(monkeypatch: pytest.MonkeyPatch) -> None:
    # Iterative proportional fitting of a 2 x 2 draw to margins (rows 60/40, columns 50/50)
    # keeps the draw's odds ratio: here the draw is symmetric, so the fitted table is
    # [[a, 60 - a], [50 - a, a - 10]] with a / (60 - a) * (a - 10) / (50 - a) = 9 (the odds
    # ratio 0.9 * 0.9 / (0.1 * 0.1) = 81 of the draw [[0.9, 0.1], [0.1, 0.9]] is kept as
    # (a (a - 10)) / ((60 - a)(50 - a)) = 81): a = 40.43...
    rng_draw = np.array([[0.9, 0.1], [0.1, 0.9]])
    a = np.roots([1 - 81, -10 + 81 * 110, -81 * 3000])
    a = float(a[(a > 10) & (a < 50)][0])

    class FixedDraw:
        def dirichlet(self, alpha: np.ndarray, size: int) -> np.ndarray:
            return rng_draw

    monkeypatch.setattr(np.random, "default_rng", lambda seed: FixedDraw())
    shares = label_skew_proportions([50, 50], np.array([0.6, 0.4]), 1.0, seed=0)
    table = shares.T * 50  # hospitals x classes
    np.testing.assert_allclose(table, [[a, 60 - a], [50 - a, a - 10]], atol=1e-4)
