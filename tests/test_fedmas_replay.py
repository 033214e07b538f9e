"""Fed-MAS's hospital round replayed by hand (docs/fedmas.md; Elbatel et al., MICCAI 2023).

The code measures ``w`` with the received model, trains on ``BSM + BSM + lambda (2 - 2 cos)``
while accumulating ``w_hat``, clips gradients and reports ``RF``. The test recomputes each of
them from the formulas, on three imbalanced classes (so that ``w`` and ``w_hat`` differ in
proportion and the class prior shifts the logits), with full-batch SGD steps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from by_hand import assert_same_update, clone_state, sgd_step

from fedclinic.config import HospitalConfig
from fedclinic.data.base import HospitalData, Split
from fedclinic.prior import random_prior
from fedclinic.site import SiteState
from strategies import load_run_config
from strategies.base import ClientContext
from strategies.fedmas import FedMASObjective, build_fedmas_model

torch.set_num_threads(1)

LR = 0.1
COUNTS = (22, 12, 6)


def fedmas_run(**overrides: Any) -> Any:
    flat = {
        "algorithm": "fedmas",
        "model": "cnn",
        "num-classes": len(COUNTS),
        "batch-size": 64,  # one batch is the whole training split
        "local-steps": 2,
        "optimizer": "sgd",
        "momentum": 0.0,
        "learning-rate": LR,
        "fedmas.prior-source": "random",
        "fedmas.prior-arch": "cnn",
        **overrides,
    }
    return load_run_config(flat)


def training_split() -> Split:
    generator = torch.Generator().manual_seed(11)
    labels = torch.repeat_interleave(torch.arange(len(COUNTS)), torch.tensor(COUNTS))
    inputs = torch.rand(len(labels), 1, 28, 28, generator=generator)
    inputs = inputs + 0.3 * labels[:, None, None, None]
    return Split(inputs, labels)


def context(run: Any, tmp_path: Path, server_round: int = 1) -> ClientContext:
    train = training_split()
    return ClientContext(
        run=run,
        hospital=HospitalConfig(hospital="hospital-a", state_dir=str(tmp_path)),
        data=HospitalData(train=train, val=train, test=train),
        device=torch.device("cpu"),
        site=SiteState(tmp_path / "state"),
        server_round=server_round,
    )


def divergence(projection: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """``2 - 2 cos(p, f(x))`` per sample."""
    cosine = (projection * features).sum(1) / (projection.norm(dim=1) * features.norm(dim=1))
    return 2 - 2 * cosine


def robust_factor_by_hand(w: list[float], w_hat: list[float], inverse: bool) -> float:
    measured = [c for c in range(len(w)) if w[c] != 0]
    local = [1 / w_hat[c] if inverse and c in measured else w_hat[c] for c in range(len(w))]
    return sum((w[c] / sum(w)) * (local[c] / sum(local)) for c in measured)


CASES = {
    "balanced softmax, clipped gradients, mas": {
        "fedmas.grad-clip-norm": 0.05,
        "fedmas.align-weight": 3.0,
    },
    "cross-entropy, no clipping, mas_inv": {
        "fedmas.grad-clip-norm": 0.0,
        "fedmas.align-weight": 1.5,
        "fedmas.local-loss": "ce",
        "fedmas.aggregation": "mas_inv",
    },
}


@pytest.mark.parametrize("case", list(CASES))
def test_fedmas_round_matches_the_formulas_by_hand(case: str, tmp_path: Path) -> None:
    run = fedmas_run(**CASES[case])
    options = run.algorithm_options()
    net = build_fedmas_model(run, seed=0)
    received = clone_state(net)
    update = FedMASObjective(context(run, tmp_path)).fit(received)

    prior = random_prior("cnn", 1, 0)  # the run's random prior (seed 0)
    train = training_split()
    x, y = train.inputs, train.labels
    counts = torch.tensor(COUNTS, dtype=torch.float64)
    with torch.no_grad():
        features = prior(x)
        net.eval()  # step 1: the received model, eval mode, no gradient
        _, projection, _ = net.heads(x)
        losses = divergence(projection, features).double()
    w = [float(losses[y == c].mean()) for c in range(len(COUNTS))]

    net.train()
    log_prior = torch.log(counts / counts.sum() + 1e-12).float()
    w_hat = [0.0] * len(COUNTS)
    clipped = []
    for _ in range(run.local_steps):
        logits, projection, aux = net.heads(x)
        per_sample = divergence(projection, features)
        if options.local_loss == "bsm":  # balanced softmax: CE(z + log pi, y)
            task = F.cross_entropy(logits + log_prior, y)
            auxiliary = F.cross_entropy(aux + log_prior, y)
        else:
            task, auxiliary = F.cross_entropy(logits, y), F.cross_entropy(aux, y)
        loss = task + auxiliary + options.align_weight * per_sample.mean()
        for c in range(len(COUNTS)):  # w_hat_c += sum_{y_i = c} L_f(x_i) / n_c, before the step
            w_hat[c] += float(per_sample[y == c].detach().double().sum()) / COUNTS[c]
        norm = sgd_step(net.parameters(), loss, LR, options.grad_clip_norm)
        clipped.append(0 < options.grad_clip_norm < norm)

    assert_same_update(received, update.state, clone_state(net))
    assert update.metrics["mas_w"] == pytest.approx(w, rel=1e-5)
    assert update.metrics["mas_w_hat"] == pytest.approx(w_hat, rel=1e-5)
    rf = robust_factor_by_hand(w, w_hat, inverse=options.aggregation == "mas_inv")
    assert update.metrics["mas_rf"] == pytest.approx(rf, rel=1e-5)
    # the case is informative: w and w_hat differ in proportion, and clipping was active
    assert not np.allclose(np.array(w) / sum(w), np.array(w_hat) / sum(w_hat), rtol=1e-3)
    assert all(clipped) == (options.grad_clip_norm > 0)


def test_optimizer_state_carries_over_to_the_next_round(tmp_path: Path) -> None:
    """With SGD momentum the second round's first step is ``mu * g_1 + g_2``: the momentum
    buffer of round 1, kept at the site (``persist-optimizer``), not a fresh one."""
    momentum = 0.9
    run = fedmas_run(**{"local-steps": 1, "momentum": momentum, "fedmas.grad-clip-norm": 0.0})
    net = build_fedmas_model(run, seed=0)
    received = clone_state(net)
    first = FedMASObjective(context(run, tmp_path, 1)).fit(received)
    second = FedMASObjective(context(run, tmp_path, 2)).fit(first.state)
    assert second.metrics["train_optimizer_restored"] == 1.0

    prior = random_prior("cnn", 1, 0)
    train = training_split()
    x, y = train.inputs, train.labels
    counts = torch.tensor(COUNTS, dtype=torch.float64)
    log_prior = torch.log(counts / counts.sum() + 1e-12).float()
    features = prior(x)
    options = run.algorithm_options()
    net.train()
    buffers: list[torch.Tensor | None] = [None] * len(list(net.parameters()))
    states = []
    for start in (received, first.state):  # one step per round, from what the hospital got
        net.load_state_dict(start)
        logits, projection, aux = net.heads(x)
        loss = (
            F.cross_entropy(logits + log_prior, y)
            + F.cross_entropy(aux + log_prior, y)
            + options.align_weight * divergence(projection, features).mean()
        )
        grads = torch.autograd.grad(loss, list(net.parameters()))
        with torch.no_grad():
            for index, (parameter, grad) in enumerate(zip(net.parameters(), grads, strict=True)):
                previous = buffers[index]
                buffers[index] = grad.clone() if previous is None else momentum * previous + grad
                parameter -= LR * buffers[index]
        states.append(clone_state(net))
    assert_same_update(received, first.state, states[0])
    assert_same_update(first.state, second.state, states[1])
