"""Balanced softmax (``<algo>.local-loss = "bsm"``) against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from fedclinic.tasks import task_of
from strategies import load_run_config
from strategies.balanced_loss import local_loss, shift_logits


def run(**extra: object) -> object:
    return load_run_config({"algorithm": "fedavg", "model": "cnn", **extra})


def test_bsm_is_cross_entropy_of_logits_shifted_by_the_log_prior() -> None:
    # counts 1 : 3 -> pi = (0.25, 0.75). Logits (0, 0), label 0: softmax of (log .25, log .75)
    # gives p_0 = 0.25, so the loss is -log 0.25; label 1: -log 0.75.
    loss = local_loss(run(), "bsm", [1, 3])
    logits = torch.zeros(2, 2)
    value = loss(logits, torch.tensor([0, 1]))
    assert float(value) == pytest.approx((-math.log(0.25) - math.log(0.75)) / 2, rel=1e-6)
    # a confident correct logit for the minority class costs more than under plain CE
    z = torch.tensor([[2.0, 0.0]])
    ce = local_loss(run(), "ce", [1, 3])(z, torch.tensor([0]))
    bsm = loss(z, torch.tensor([0]))
    p0 = 0.25 * math.exp(2) / (0.25 * math.exp(2) + 0.75)
    assert float(bsm) == pytest.approx(-math.log(p0), rel=1e-6)
    assert float(ce) == pytest.approx(-math.log(math.exp(2) / (math.exp(2) + 1)), rel=1e-6)


def test_bsm_with_one_binary_logit_shifts_by_the_log_odds_of_the_prior() -> None:
    # logreg has one logit z for the classes [0, z]: BCE(sigmoid(z + log(pi_1 / pi_0)), y)
    loss = local_loss(run(model="logreg", **{"data-source": "heart-disease"}), "bsm", [1, 3])
    value = loss(torch.zeros(1, 1), torch.tensor([1]))
    assert float(value) == pytest.approx(-math.log(0.75), rel=1e-6)
    shifted = shift_logits(torch.zeros(1, 1), torch.log(torch.tensor([0.25, 0.75])))
    assert float(shifted) == pytest.approx(math.log(3.0), rel=1e-6)


def test_the_gradient_pushes_the_minority_class_harder_than_plain_ce() -> None:
    # At z = 0 the CE gradient on the true class's logit is p - 1 = -0.5; with the prior
    # (0.1, 0.9) and a class-0 label it is 0.1 - 1 = -0.9: the rare class is learnt harder.
    z = torch.zeros(1, 2, requires_grad=True)
    local_loss(run(), "bsm", [1, 9])(z, torch.tensor([0])).backward()
    assert z.grad is not None
    assert z.grad[0, 0].item() == pytest.approx(-0.9, abs=1e-6)
    assert z.grad[0, 1].item() == pytest.approx(0.9, abs=1e-6)


def test_an_absent_class_does_not_break_the_loss() -> None:
    loss = local_loss(run(), "bsm", [0, 5])
    z = torch.zeros(3, 2, requires_grad=True)
    value = loss(z, torch.tensor([1, 1, 1]))
    value.backward()
    assert math.isfinite(value.item()) and z.grad is not None and torch.isfinite(z.grad).all()


def test_segmentation_keeps_its_task_loss() -> None:
    seg = load_run_config(
        {"algorithm": "fedavg", "task": "segmentation", "model": "unet", "image-size": 32}
    )
    logits, masks = torch.randn(2, 1, 8, 8), torch.randint(0, 2, (2, 8, 8))
    expected = task_of(seg).loss(logits, masks)
    assert float(local_loss(seg, "bsm", [10, 1])(logits, masks)) == pytest.approx(float(expected))


@pytest.mark.parametrize(
    ("algorithm", "default"),
    [("fedhelp", "bsm"), ("pfednet", "bsm"), ("fedavg", "ce"), ("local-only", "ce")],
)
def test_local_loss_defaults(algorithm: str, default: str) -> None:
    options = load_run_config({"algorithm": algorithm}).algorithm_options()
    assert options.local_loss == default
    with pytest.raises(Exception, match="local-loss"):
        load_run_config({"algorithm": algorithm, f"{algorithm}.local-loss": "focal"})
