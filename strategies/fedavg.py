"""FedAvg (McMahan et al., arXiv 1602.05629): local SGD from the global model, mean weighted by n_k.

``w <- sum_k (n_k / n) w_k`` over every state entry, BatchNorm running statistics included
(FLamby averages parameters only; averaging buffers too keeps every hospital's copy of the
global model identical). Integer buffers (``num_batches_tracked``) are averaged and rounded.
``n_k`` is the hospital's number of training samples.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from flwr.app import ArrayRecord

from fedclinic.engine import TRAIN, Exchange, Reply, ServerAlgorithm, replies_to_numpy
from fedclinic.serialization import numpy_to_record
from strategies.balanced_loss import BalancedLossObjective, LocalLossOptions
from strategies.base import Algorithm, ClientObjective


def weighted_average(
    states: Sequence[dict[str, np.ndarray]], weights: Sequence[float]
) -> dict[str, np.ndarray]:
    """``sum_k w_k * state_k / sum_k w_k`` per entry, keeping each entry's dtype."""
    if not states:
        raise ValueError("nothing to average")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("weights must sum to a positive number")
    averaged: dict[str, np.ndarray] = {}
    for key, first in states[0].items():
        accumulator = np.zeros(first.shape, dtype=np.float64)
        for state, weight in zip(states, weights, strict=True):
            accumulator += (weight / total) * state[key].astype(np.float64)
        if np.issubdtype(first.dtype, np.integer):
            averaged[key] = np.rint(accumulator).astype(first.dtype)
        else:
            averaged[key] = accumulator.astype(first.dtype)
    return averaged


class FedAvgStrategy(ServerAlgorithm):
    """Sample-weighted mean of the hospitals' full model states."""

    #: the mean is a sum: the engine can take it under SecAgg+ (fedclinic.engine.secagg)
    secure_aggregation_refusal = None

    def aggregate(
        self, server_round: int, replies: list[Reply], exchange: Exchange = TRAIN
    ) -> ArrayRecord | None:
        weights = [r.num_train for r in replies]
        return numpy_to_record(weighted_average(replies_to_numpy(replies), weights))


class FedAvgObjective(BalancedLossObjective, ClientObjective):
    """Plain task loss (cross-entropy, or Dice + CE for segmentation) from the global model."""


ALGORITHM = Algorithm(
    name="fedavg",
    strategy=FedAvgStrategy,
    objective=FedAvgObjective,
    options=LocalLossOptions,
    description="FedAvg: sample-weighted averaging of local SGD updates",
    tasks=("classification", "segmentation"),
)
