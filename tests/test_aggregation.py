"""FedAvg and FedProx arithmetic against hand computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fedclinic import messages as keys
from fedclinic.engine import Reply
from fedclinic.serialization import numpy_to_record, record_to_numpy
from strategies import load_run_config
from strategies.fedavg import FedAvgStrategy, weighted_average
from strategies.fedprox import proximal_term


def test_weighted_average_matches_hand_computation() -> None:
    a = {"w": np.array([1.0, 2.0], dtype=np.float32), "steps": np.array(10, dtype=np.int64)}
    b = {"w": np.array([3.0, 6.0], dtype=np.float32), "steps": np.array(20, dtype=np.int64)}
    # n_a = 100, n_b = 300: w = 0.25 * a + 0.75 * b
    result = weighted_average([a, b], [100, 300])
    np.testing.assert_allclose(result["w"], [0.25 * 1 + 0.75 * 3, 0.25 * 2 + 0.75 * 6])
    assert result["w"].dtype == np.float32
    assert result["steps"].dtype == np.int64 and int(result["steps"]) == 18  # rint(17.5)


@pytest.mark.parametrize("algorithm", ["fedavg", "fedprox"])
def test_the_server_weights_each_hospital_by_its_training_samples(algorithm: str) -> None:
    """``w <- sum_k (n_k / n) w_k`` with n_k the training-set size: hospitals of 30 and 10
    training samples weigh 3:1 (their steps' example counts, 10 and 30, play no part)."""
    replies = [
        Reply(
            node_id=node,
            hospital=name,
            arrays=numpy_to_record({"w": np.array([value, -value], dtype=np.float32)}),
            metrics={keys.NUM_TRAIN: train, keys.NUM_EXAMPLES: examples},
            info={},
        )
        for node, name, value, train, examples in ((1, "a", 1.0, 30, 10), (2, "b", 4.0, 10, 30))
    ]
    merged = FedAvgStrategy(load_run_config({"algorithm": algorithm})).aggregate(1, replies)
    assert merged is not None
    np.testing.assert_allclose(record_to_numpy(merged)["w"], [1.75, -1.75])  # 0.75 * 1 + 0.25 * 4


def test_weighted_average_equal_weights_is_the_mean() -> None:
    states = [{"x": np.full((2, 2), v, dtype=np.float64)} for v in (1.0, 2.0, 6.0)]
    np.testing.assert_allclose(weighted_average(states, [1, 1, 1])["x"], np.full((2, 2), 3.0))


def test_weighted_average_refuses_empty_and_zero_weights() -> None:
    with pytest.raises(ValueError):
        weighted_average([], [])
    with pytest.raises(ValueError):
        weighted_average([{"x": np.zeros(1)}], [0])


def test_proximal_term_matches_hand_computation() -> None:
    model = nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0]]))
        model.bias.copy_(torch.tensor([0.5]))
    anchor = {"weight": torch.tensor([[0.0, 0.0]]), "bias": torch.tensor([0.0])}
    # (mu/2) * (1 + 4 + 0.25) with mu = 0.1
    value = proximal_term(model, anchor, mu=0.1)
    assert value.item() == pytest.approx(0.05 * 5.25)
    value.backward()
    # gradient of (mu/2)||w - a||^2 is mu (w - a)
    torch.testing.assert_close(model.weight.grad, torch.tensor([[0.1, 0.2]]))


def test_proximal_term_is_zero_at_the_anchor() -> None:
    model = nn.Linear(3, 2)
    anchor = {k: v.detach().clone() for k, v in model.state_dict().items()}
    assert proximal_term(model, anchor, mu=1.0).item() == 0.0
