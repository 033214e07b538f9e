"""FedHelp's loss terms against hand computations and independent implementations.

Decision IDs (FH-n): docs/fedhelp.md#decisions.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict

import numpy as np
import pytest
import torch
from scipy.special import softmax
from scipy.stats import entropy
from torch import nn

from fedclinic.config import RunConfig
from fedclinic.errors import ConfigError
from fedclinic.models import build_model, head_prefix
from strategies.fedhelp_math import (
    RoleEntry,
    as_class_logits,
    assign_roles,
    class_log_probs,
    find_head,
    kl_divergence,
    probabilities_log,
    ranking_loss,
    set_module,
    temper_probabilities,
)

# ------------------------------------------------------------------------------ ranking (FH-8)


def test_ranking_loss_top1_by_hand() -> None:
    # proxy top-1 = class 0; others {1, 2}: max(0, 0-(1-3)) + max(0, 0-(1-2)) = 2 + 1 -> / (2k)
    large = torch.tensor([[1.0, 3.0, 2.0]])
    proxy = torch.tensor([[5.0, 0.0, 1.0]])
    assert ranking_loss(large, proxy, k=1).item() == pytest.approx(3.0 / 2.0)


def test_ranking_loss_top2_with_and_without_margin_by_hand() -> None:
    large = torch.tensor([[0.5, -1.0, 2.0, 0.0]])
    proxy = torch.tensor([[3.0, 2.0, -1.0, 0.0]])  # top-2 = {0, 1}, others {2, 3}
    # pairs (a, b): (0,2) 1.5, (0,3) 0, (1,2) 3, (1,3) 1 -> 5.5 / 4
    assert ranking_loss(large, proxy, k=2).item() == pytest.approx(5.5 / 4)
    # margin 1: 2.5 + 0.5 + 4 + 2 = 9 -> 9 / 4
    assert ranking_loss(large, proxy, k=2, margin=1.0).item() == pytest.approx(9.0 / 4)


def test_ranking_loss_sums_over_the_batch_or_averages() -> None:
    large = torch.tensor([[1.0, 3.0, 2.0], [0.0, 0.0, 4.0]])
    proxy = torch.tensor([[5.0, 0.0, 1.0], [0.0, 9.0, 1.0]])
    # row 2: top-1 = class 1: max(0, -(0-0)) + max(0, -(0-4)) = 0 + 4 -> 4/2 = 2
    assert ranking_loss(large, proxy, 1, reduction="sum").item() == pytest.approx(1.5 + 2.0)
    assert ranking_loss(large, proxy, 1, reduction="mean").item() == pytest.approx(3.5 / 2)


def _ranking_reference(large: np.ndarray, proxy: np.ndarray, k: int, margin: float) -> float:
    """Loop implementation of 1/(2k) sum_n sum_{a in topk} sum_{b not in topk} hinge."""
    total = 0.0
    for zl, zp in zip(large, proxy, strict=True):
        top = set(np.argsort(-zp, kind="stable")[:k].tolist())
        for a, b in itertools.product(top, set(range(len(zl))) - top):
            total += max(0.0, margin - (zl[a] - zl[b]))
    return total / (2 * k)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_ranking_loss_matches_a_loop_implementation(k: int) -> None:
    rng = np.random.default_rng(k)
    large, proxy = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
    got = ranking_loss(torch.tensor(large), torch.tensor(proxy), k, margin=0.3).item()
    assert got == pytest.approx(_ranking_reference(large, proxy, k, 0.3), rel=1e-6)


def test_minimising_the_ranking_loss_raises_the_proxys_top_classes() -> None:
    """FH-8 sign: the gradient step must raise the large model's logit on the proxy's top-k."""
    large = torch.tensor([[2.0, 0.5, 1.0]], requires_grad=True)
    proxy = torch.tensor([[0.0, 3.0, 1.0]])  # proxy's top-1 = class 1, where large is lowest
    loss = ranking_loss(large, proxy, k=1)
    loss.backward()
    assert large.grad is not None
    assert large.grad[0, 1] < 0  # descent increases z_1
    assert large.grad[0, 0] > 0 and large.grad[0, 2] > 0  # and lowers the classes above it
    with torch.no_grad():
        stepped = large - 0.1 * large.grad
    assert stepped[0, 1] > large[0, 1]
    assert ranking_loss(stepped, proxy, k=1) < loss
    # the reference's literal max(0, zL_a - zL_b) would push z_1 down: not what we compute
    literal = torch.relu(large[0, 1] - large[0, [0, 2]]).sum() / 2
    assert literal.item() == 0.0 and loss.item() > 0


def test_ranking_loss_sends_no_gradient_to_the_proxy() -> None:
    large = torch.randn(4, 3, requires_grad=True)
    proxy = torch.randn(4, 3, requires_grad=True)
    ranking_loss(large, proxy, 1, margin=1.0).backward()
    assert proxy.grad is None


def test_ranking_loss_refuses_k_without_other_classes() -> None:
    with pytest.raises(ConfigError, match=r"fedhelp\.rank-k"):
        ranking_loss(torch.zeros(2, 3), torch.zeros(2, 3), k=3)


def test_single_binary_logit_is_two_classes() -> None:
    z = torch.tensor([[0.7], [-2.0]])
    assert torch.equal(as_class_logits(z), torch.tensor([[0.0, 0.7], [0.0, -2.0]]))
    sig = torch.sigmoid(z[:, 0])
    expected = torch.log(torch.stack([1 - sig, sig], dim=1))
    assert torch.allclose(class_log_probs(z), expected, atol=1e-6)


# ------------------------------------------------------------------------------ KL terms


def test_kl_matches_scipy_entropy_with_both_reductions() -> None:
    rng = np.random.default_rng(0)
    teacher, student = rng.normal(size=(5, 4)), rng.normal(size=(5, 4))
    p, q = softmax(teacher / 2.0, axis=1), softmax(student / 2.0, axis=1)
    per_sample = np.array([entropy(pi, qi) for pi, qi in zip(p, q, strict=True)])
    log_p = class_log_probs(torch.tensor(teacher), 2.0)
    log_q = class_log_probs(torch.tensor(student), 2.0)
    assert kl_divergence(log_p, log_q, "batchmean").item() == pytest.approx(per_sample.mean())
    assert kl_divergence(log_p, log_q, "mean").item() == pytest.approx(per_sample.sum() / 20)
    # the reference's nn.KLDivLoss() (reduction 'mean') divides by B*C
    reference = nn.KLDivLoss()(log_q.float(), log_p.exp().float()).item()
    assert kl_divergence(log_p, log_q, "mean").item() == pytest.approx(reference, rel=1e-5)


def test_kl_by_hand_for_two_classes() -> None:
    p, q = torch.tensor([[0.75, 0.25]]), torch.tensor([[0.5, 0.5]])
    expected = 0.75 * np.log(0.75 / 0.5) + 0.25 * np.log(0.25 / 0.5)
    assert kl_divergence(torch.log(p), torch.log(q)).item() == pytest.approx(expected)


def test_forward_kd_gradient_moves_the_student_towards_the_teacher() -> None:
    teacher = class_log_probs(torch.tensor([[2.0, -1.0, 0.0]]))
    student = torch.zeros(1, 3, requires_grad=True)
    loss = kl_divergence(teacher, class_log_probs(student))
    loss.backward()
    assert student.grad is not None
    # d KL / d z_q = q - p: negative where the teacher puts more mass than the student
    expected = torch.softmax(torch.zeros(1, 3), 1) - teacher.exp()
    assert torch.allclose(student.grad, expected, atol=1e-6)


def test_backward_kd_gradient_flows_through_the_first_argument() -> None:
    """KL(softmax(zL) || q) with q fixed: d/dzL = p * (log p - log q - KL) (softmax Jacobian)."""
    large = torch.tensor([[1.0, 0.0, -1.0]], requires_grad=True)
    q = torch.tensor([[0.2, 0.5, 0.3]])
    loss = kl_divergence(class_log_probs(large), torch.log(q))
    loss.backward()
    p = torch.softmax(large.detach(), 1)
    expected = p * (torch.log(p) - torch.log(q) - loss.detach())
    assert large.grad is not None
    assert torch.allclose(large.grad, expected, atol=1e-6)


def test_stored_probabilities_with_zeros_give_finite_kl() -> None:
    p = torch.tensor([[1.0, 0.0, 0.0]])
    student = torch.tensor([[0.0, 1.0, 2.0]], requires_grad=True)
    loss = kl_divergence(probabilities_log(p), class_log_probs(student))
    loss.backward()
    assert torch.isfinite(loss)
    assert student.grad is not None and torch.isfinite(student.grad).all()
    assert loss.item() == pytest.approx(-np.log(softmax([0.0, 1.0, 2.0])[0]), rel=1e-5)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_tempering_stored_probabilities_equals_softmax_of_logits_over_t(temperature: float) -> None:
    logits = torch.tensor([[3.0, -1.0, 0.5, 8.0], [0.0, 0.0, 1.0, -4.0]], dtype=torch.float64)
    tempered = temper_probabilities(torch.softmax(logits, 1), temperature)
    assert torch.allclose(tempered, torch.softmax(logits / temperature, 1), atol=1e-12)


# ------------------------------------------------------------------------------ roles


def test_roles_rank_by_training_size_when_not_configured() -> None:
    entries = [
        RoleEntry(1, "a", "", 100),
        RoleEntry(2, "b", "", 500),
        RoleEntry(3, "c", "", 300),
        RoleEntry(4, "d", "", 300),
    ]
    roles = assign_roles(entries, num_large=2)
    assert {k: a.role for k, a in roles.items()} == {1: "small", 2: "large", 3: "large", 4: "small"}
    assert {a.source for a in roles.values()} == {"size-rank"}  # c beats d on the name tie


def test_configured_roles_are_kept_and_count_towards_num_large() -> None:
    entries = [
        RoleEntry(1, "a", "large", 10),  # small by size but configured large
        RoleEntry(2, "b", "small", 900),  # largest but configured small
        RoleEntry(3, "c", "", 500),
        RoleEntry(4, "d", "", 50),
    ]
    roles = assign_roles(entries, num_large=2)
    assert roles[1].role == "large" and roles[1].source == "config"
    assert roles[2].role == "small" and roles[2].source == "config"
    assert roles[3].role == "large" and roles[3].source == "size-rank"  # the one open slot
    assert roles[4].role == "small"
    assert assign_roles(entries, num_large=1)[3].role == "small"  # slot taken by 'a'
    assert all(a.role == "small" for a in assign_roles(entries[2:], num_large=0).values())


# ------------------------------------------------------------------------------ heads (FH-6)


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("cnn", "classifier"),
        ("logreg", "linear"),
        ("resnet18", "fc"),
    ],
)
def test_the_surrogate_head_is_the_models_own_classifier(model: str, expected: str) -> None:
    run = RunConfig(model=model)
    network = build_model(run)
    name = find_head(network, head_prefix(run))
    assert name == expected
    replacement = nn.Linear(network.get_submodule(name).in_features, 2)
    set_module(network, name, replacement)
    assert network.get_submodule(name) is replacement


def test_a_nested_head_is_found_by_its_last_linear() -> None:
    """MONAI's DenseNet-121 head is ``class_layers`` = (relu, pool, flatten, ``out``); building
    the real network costs seconds, so this stand-in has the same names."""
    network = nn.Sequential()
    network.add_module("features", nn.Sequential(nn.Conv2d(1, 4, 3), nn.Linear(4, 4)))
    network.add_module(
        "class_layers",
        nn.Sequential(OrderedDict(relu=nn.ReLU(), flatten=nn.Flatten(), out=nn.Linear(4, 2))),
    )
    assert find_head(network, "class_layers.") == "class_layers.out"
    with pytest.raises(ConfigError, match="no Linear classification head"):
        find_head(network, "head.")
