"""Fed-MAS mathematics and client/server halves against hand computations (docs/fedmas.md).

Decision IDs (MAS-n): docs/fedmas.md#decisions.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from fedclinic.config import HospitalConfig
from fedclinic.data.base import HospitalData, Split
from fedclinic.engine import Reply
from fedclinic.errors import ConfigError, IntegrityError
from fedclinic.prior import random_prior
from fedclinic.serialization import record_to_numpy, state_to_record
from fedclinic.site import SiteState
from fedclinic.training import optimizer_to_state, restore_optimizer
from strategies import load_run_config
from strategies.base import ClientContext
from strategies.fedmas import (
    FedMASNet,
    FedMASObjective,
    FedMASStrategy,
    build_fedmas_model,
    check_run,
)
from strategies.fedmas_math import (
    ClassDivergence,
    aggregation_weights,
    alignment_loss,
    balanced_softmax_loss,
    class_log_prior,
    drw_active,
    robust_factor,
)

torch.set_num_threads(1)


# ------------------------------------------------------------------ formulas


def test_robust_factor_matches_hand_computation() -> None:
    # w / sum w = [2/3, 0, 1/3]; w_hat / sum w_hat = [1/4, 0, 3/4]
    # RF = 2/3 * 1/4 + 1/3 * 3/4 = 1/6 + 1/4 = 5/12
    assert robust_factor([2.0, 0.0, 1.0], [1.0, 0.0, 3.0]) == pytest.approx(5 / 12)
    # mas_inv: w_hat -> [1, 0, 1/3], normalised [3/4, 0, 1/4]; RF = 2/3*3/4 + 1/3*1/4 = 7/12
    assert robust_factor([2.0, 0.0, 1.0], [1.0, 0.0, 3.0], inverse=True) == pytest.approx(7 / 12)


def test_robust_factor_skips_classes_without_global_divergence() -> None:
    # class 1 has w = 0: excluded from the sum, but its w_hat still counts in sum w_hat
    assert robust_factor([1.0, 0.0], [1.0, 1.0]) == pytest.approx(0.5)
    assert robust_factor([0.0, 0.0], [1.0, 1.0]) == 0.0  # nothing measured


def test_class_divergence_matches_the_reference_batch_formula() -> None:
    generator = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 0, 1, 2, 0, 1, 0, 0, 2, 0])
    losses = torch.rand(10, generator=generator)
    counts = np.bincount(labels.numpy(), minlength=4)  # class 3 absent
    divergence = ClassDivergence(counts.tolist())
    expected = np.zeros(4)
    for batch in (slice(0, 4), slice(4, 7), slice(7, 10)):
        y, loss = labels[batch].numpy(), losses[batch].numpy().astype(np.float64)
        divergence.add(losses[batch], labels[batch])
        for c in np.unique(y):  # (n_bc / n_c) * mean over the batch's class-c samples
            expected[c] += (np.sum(y == c) / counts[c]) * loss[y == c].mean()
    np.testing.assert_allclose(divergence.values(), expected, rtol=1e-12)
    # one full pass = the class mean of the per-sample losses
    for c in range(3):
        assert divergence.values()[c] == pytest.approx(float(losses[labels == c].mean()))
    assert divergence.values()[3] == 0.0


def test_balanced_softmax_matches_its_definition() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.3, -0.2]])
    labels = torch.tensor([1, 2])
    counts = torch.tensor([90, 10, 0])
    log_prior = class_log_prior(counts)
    pi = np.array([0.9, 0.1, 0.0]) + 1e-12
    z = logits.numpy().astype(np.float64) + np.log(pi)
    expected = np.mean(
        [-(z[i, y] - np.log(np.exp(z[i]).sum())) for i, y in enumerate(labels.numpy())]
    )
    loss = balanced_softmax_loss(logits, labels, log_prior)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    # uniform prior: the shift is a constant per row, so BSM equals cross-entropy
    uniform = class_log_prior(torch.tensor([5, 5, 5]))
    ce = torch.nn.functional.cross_entropy(logits, labels)
    assert float(balanced_softmax_loss(logits, labels, uniform)) == pytest.approx(float(ce))


def test_alignment_loss_is_two_minus_two_cosine() -> None:
    p = torch.tensor([[3.0, 4.0], [1.0, 0.0], [1.0, 1.0]])
    f = torch.tensor([[6.0, 8.0], [0.0, 2.0], [-1.0, -1.0]])
    # cosines 1, 0, -1 -> 0, 2, 4; also the squared distance of the unit vectors
    np.testing.assert_allclose(alignment_loss(p, f).numpy(), [0.0, 2.0, 4.0], atol=1e-6)
    unit_p = p / p.norm(dim=1, keepdim=True)
    unit_f = f / f.norm(dim=1, keepdim=True)
    np.testing.assert_allclose(
        alignment_loss(p, f).numpy(), ((unit_p - unit_f) ** 2).sum(1).numpy(), atol=1e-6
    )


def test_aggregation_weights_for_every_rule() -> None:
    rf, n = [0.2, 0.6], [300.0, 100.0]
    weights, rule = aggregation_weights("mas", rf, n)
    assert rule == "mas" and weights == pytest.approx([0.25, 0.75])
    weights, _ = aggregation_weights("mas_inv", rf, n)
    assert weights == pytest.approx([0.25, 0.75])
    weights, rule = aggregation_weights("avg", rf, n)
    assert rule == "avg" and weights == pytest.approx([0.75, 0.25])
    # mas_drw, 10 rounds: 0-based round int(0.8 * 10) = 8, i.e. server round 9, switches
    assert not drw_active(8, 10, 0.8) and drw_active(9, 10, 0.8)
    weights, rule = aggregation_weights("mas_drw", rf, n, server_round=8, rounds=10)
    assert rule.startswith("mas_drw (avg") and weights == pytest.approx([0.75, 0.25])
    weights, rule = aggregation_weights("mas_drw", rf, n, server_round=9, rounds=10)
    # u = (1/RF)/sum(1/RF) = [0.75, 0.25]; e = (1-b)/(1-b^u); a ∝ n * e
    beta = 0.9999
    e = [(1 - beta) / (1 - beta**u) for u in (0.75, 0.25)]
    expected = np.array([300 * e[0], 100 * e[1]])
    assert weights == pytest.approx(list(expected / expected.sum()))
    assert weights == pytest.approx([0.5, 0.5], abs=1e-3)  # ≈ n_k RF_k normalised


def test_unusable_robust_factors_fall_back_to_fedavg() -> None:
    weights, rule = aggregation_weights("mas", [0.0, 0.0], [1.0, 3.0])
    assert rule == "avg (fallback)" and weights == pytest.approx([0.25, 0.75])
    weights, rule = aggregation_weights("mas", [math.nan, 0.5], [1.0, 3.0])
    assert rule == "avg (fallback)"


# ------------------------------------------------------------------ model and client


def fedmas_run(**overrides: Any) -> Any:
    flat = {
        "algorithm": "fedmas",
        "model": "cnn",
        "batch-size": 8,
        "local-steps": 3,
        "optimizer": "adam",
        "learning-rate": 0.001,
        "fedmas.prior-source": "random",
        "fedmas.prior-arch": "cnn",
        **overrides,
    }
    return load_run_config(flat)


def test_model_parts_and_shapes() -> None:
    model = build_fedmas_model(fedmas_run(), seed=0)
    assert isinstance(model, FedMASNet)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    logits, projection, aux = model.heads(torch.zeros(4, 1, 28, 28))
    assert logits.shape == (4, 2) and projection.shape == (4, 64) and aux.shape == (4, 2)
    assert torch.equal(model(torch.zeros(4, 1, 28, 28)), logits)
    keys = set(model.state_dict())
    assert "p_free.1.running_mean" in keys and "fc_free.weight" in keys and "fc.weight" in keys
    # per spec with a ResNet-18 backbone and the MoCo ResNet-50 prior: 512 -> 512 -> 2048
    big = build_fedmas_model(fedmas_run(model="resnet18", **{"fedmas.prior-arch": "resnet50"}))
    assert big.p_free[0].weight.shape == (512, 512)
    assert big.p_free[3].weight.shape == (2048, 512)
    assert big.fc_free.weight.shape == (2, 2048)
    # same seed, same initial model
    again = build_fedmas_model(fedmas_run(), seed=0)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in initial.items())


def test_resnet101_backbone_feeds_its_2048_features_to_the_heads() -> None:
    model = build_fedmas_model(fedmas_run(model="resnet101"), seed=0)
    assert model.fc.weight.shape == (2, 2048) and model.p_free[0].weight.shape == (2048, 2048)
    assert not any(k.startswith("backbone.fc.") for k in model.state_dict())


def test_prior_must_fit_the_inputs_and_missing_hash_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"'fedmas\.prior-arch' = 'cnn' is not allowed with"):
        check_run(fedmas_run(model="logreg"))  # an image prior cannot read table rows
    with pytest.raises(ConfigError, match=r"'fedmas\.prior-arch' = 'mlp' .* image encoder"):
        check_run(fedmas_run(**{"fedmas.prior-arch": "mlp"}))
    with pytest.raises(ConfigError, match=r"fedmas\.prior-sha256"):
        check_run(fedmas_run(**{"fedmas.prior-source": "file"}))
    with pytest.raises(ConfigError, match=r"fedmas\.aggregation"):
        fedmas_run(**{"fedmas.aggregation": "MAS"})  # MAS-4: the lowercase name only


def test_tabular_fedmas_is_a_logistic_regression_with_a_tabular_prior(tmp_path: Path) -> None:
    # model = logreg: the 13 features are the backbone's output, the deployed head is a
    # Linear(13, 2) (logistic regression with one logit per class), the projector maps the
    # rows to the 64-d output of the frozen tabular prior.
    run = fedmas_run(
        model="logreg", **{"fedmas.prior-arch": "mlp", "num-features": 13, "batch-size": 4}
    )
    check_run(run)
    model = build_fedmas_model(run, seed=0)
    rows = torch.randn(5, 13)
    logits, projection, aux = model.heads(rows)
    assert logits.shape == (5, 2) and projection.shape == (5, 64) and aux.shape == (5, 2)
    torch.testing.assert_close(model(rows), rows @ model.fc.weight.T + model.fc.bias)
    generator = torch.Generator().manual_seed(3)
    labels = (torch.rand(30, generator=generator) < 0.3).long()
    table = Split(torch.randn(30, 13, generator=generator) + labels[:, None], labels)
    context = ClientContext(
        run=run,
        hospital=HospitalConfig(hospital="clinic", state_dir=str(tmp_path)),
        data=HospitalData(train=table, val=table, test=Trap()),  # type: ignore[arg-type]
        device=torch.device("cpu"),
        site=SiteState(tmp_path / "state"),
        server_round=1,
    )
    update = FedMASObjective(context).fit(model.state_dict())
    w, w_hat = update.metrics["mas_w"], update.metrics["mas_w_hat"]
    assert update.steps == 3 and all(v > 0 for v in [*w, *w_hat])  # type: ignore[union-attr]
    # RF from the reported w and w_hat by its formula (both classes measured); the values of
    # w and w_hat themselves are recomputed in tests/test_fedmas_replay.py
    rf = sum(a / sum(w) * b / sum(w_hat) for a, b in zip(w, w_hat, strict=True))  # type: ignore[arg-type]
    assert update.metrics["mas_rf"] == pytest.approx(rf)
    assert update.info["prior_origin"] == "random"


class SplitTouchedError(Exception):
    pass


class Trap:
    """A split that fails the test when anything reads it (MAS-3: no test data in fit)."""

    def __getattr__(self, name: str) -> Any:
        raise SplitTouchedError(name)

    def __len__(self) -> int:
        raise SplitTouchedError("len")


def make_split(n: int, seed: int, minority: float = 0.2) -> Split:
    generator = torch.Generator().manual_seed(seed)
    labels = (torch.rand(n, generator=generator) < minority).long()
    inputs = torch.rand(n, 1, 28, 28, generator=generator) + labels[:, None, None, None] * 0.5
    return Split(inputs, labels)


def make_context(run: Any, tmp_path: Path, **hospital: Any) -> ClientContext:
    data = HospitalData(train=make_split(40, 1), val=make_split(10, 2), test=Trap())  # type: ignore[arg-type]
    config = HospitalConfig(hospital="hospital-a", state_dir=str(tmp_path), **hospital)
    return ClientContext(
        run=run,
        hospital=config,
        data=data,
        device=torch.device("cpu"),
        site=SiteState(tmp_path / "state"),
        server_round=1,
    )


def test_fit_measures_trains_and_reports_without_touching_test_data(tmp_path: Path) -> None:
    run = fedmas_run(**{"fedmas.prior-arch": "resnet18"})  # a prior with BatchNorm
    objective = FedMASObjective(make_context(run, tmp_path))
    received = build_fedmas_model(run, seed=0).state_dict()
    update = objective.fit(received)
    assert update.steps == 3 and update.num_examples == 24
    w, w_hat = update.metrics["mas_w"], update.metrics["mas_w_hat"]
    assert isinstance(w, list) and isinstance(w_hat, list) and len(w) == len(w_hat) == 2
    assert all(v > 0 for v in w) and all(v > 0 for v in w_hat)
    rf = sum(a / sum(w) * b / sum(w_hat) for a, b in zip(w, w_hat, strict=True))
    assert update.metrics["mas_rf"] == pytest.approx(rf)  # by its formula, not the code's
    assert update.metrics["train_optimizer_restored"] == 0.0
    assert set(update.state) == set(received)
    assert not all(torch.equal(update.state[k], received[k]) for k in received)
    assert (
        update.info["prior_origin"] == "random" and len(update.info["prior_content_sha256"]) == 64
    )
    # the optimizer state persists at the site and is restored next round
    second = FedMASObjective(make_context(run, tmp_path)).fit(update.state)
    assert second.metrics["train_optimizer_restored"] == 1.0


def test_measurement_uses_the_received_model_in_eval_mode(tmp_path: Path) -> None:
    """w is the class mean of 2 - 2cos(p, f(x)) of the received model, recomputed here."""
    run = fedmas_run(**{"local-steps": 1})
    context = make_context(run, tmp_path)
    received = build_fedmas_model(run, seed=3).state_dict()
    update = FedMASObjective(context).fit(received)
    model = build_fedmas_model(run)
    model.load_state_dict(received)
    model.eval()
    prior = random_prior("cnn", 1, 0)
    train = context.data.train
    with torch.no_grad():
        _, projection, _ = model.heads(train.inputs)
        losses = alignment_loss(projection, prior(train.inputs))
    expected = [float(losses[train.labels == c].mean()) for c in (0, 1)]
    assert update.metrics["mas_w"] == pytest.approx(expected, rel=1e-5)


def test_prior_stays_frozen_during_fit(tmp_path: Path) -> None:
    """MAS-1: the prior's BatchNorm statistics and weights do not move, even under train()."""
    prior = random_prior("resnet18", 1, 0)
    before = {k: v.clone() for k, v in prior.state_dict().items()}
    prior.train()
    assert not prior.training and not prior.encoder.training
    prior(torch.rand(4, 1, 28, 28))
    assert all(torch.equal(v, prior.state_dict()[k]) for k, v in before.items())
    assert not any(p.requires_grad for p in prior.parameters())


def test_optimizer_state_round_trip() -> None:
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    flat = optimizer_to_state(optimizer)
    fresh = torch.optim.Adam(model.parameters(), lr=0.1)
    assert restore_optimizer(fresh, flat)
    for a, b in zip(optimizer.state.values(), fresh.state.values(), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    other = torch.optim.Adam(torch.nn.Linear(4, 2).parameters())
    assert not restore_optimizer(other, flat)  # shapes differ: start fresh


# ------------------------------------------------------------------ server


def reply(node: int, name: str, state: dict[str, torch.Tensor], rf: float, n: int) -> Reply:
    return Reply(
        node_id=node,
        hospital=name,
        arrays=state_to_record(state),
        metrics={"mas_rf": rf, "num_train": n, "mas_w": [1.0, 2.0], "mas_w_hat": [0.5, 0.5]},
        info={"prior_content_sha256": "ab" * 32},
    )


def test_server_weights_every_entry_by_robust_factor() -> None:
    run = fedmas_run()
    strategy = FedMASStrategy(run)
    a = {
        "w": torch.tensor([1.0, 2.0]),
        "bn.running_mean": torch.tensor([0.0, 4.0]),
        "bn.num_batches_tracked": torch.tensor(10),
    }
    b = {
        "w": torch.tensor([3.0, 6.0]),
        "bn.running_mean": torch.tensor([8.0, 0.0]),
        "bn.num_batches_tracked": torch.tensor(20),
    }
    # RF 0.1 and 0.3: a = [0.25, 0.75] (FedAvg would give [0.9, 0.1] from n = 900, 100)
    merged = record_to_numpy(
        strategy.aggregate(1, [reply(1, "a", a, 0.1, 900), reply(2, "b", b, 0.3, 100)])
    )
    np.testing.assert_allclose(merged["w"], [0.25 * 1 + 0.75 * 3, 0.25 * 2 + 0.75 * 6])
    np.testing.assert_allclose(merged["bn.running_mean"], [6.0, 1.0])
    # rint(17.5) = 18 (the wire format may turn the 0-d counter into shape (1,))
    assert merged["bn.num_batches_tracked"].reshape(-1).tolist() == [18]
    history = strategy.summary_extra()["fedmas"]["rounds"]["1"]
    assert history["rule"] == "mas"
    assert history["hospitals"]["a"]["weight"] == pytest.approx(0.25)
    assert history["hospitals"]["a"]["fedavg_weight"] == pytest.approx(0.9)
    assert history["hospitals"]["b"]["w"] == [1.0, 2.0]


def test_server_avg_ablation_uses_sample_counts() -> None:
    strategy = FedMASStrategy(fedmas_run(**{"fedmas.aggregation": "avg"}))
    a, b = {"w": torch.tensor([0.0])}, {"w": torch.tensor([10.0])}
    merged = record_to_numpy(
        strategy.aggregate(1, [reply(1, "a", a, 0.1, 900), reply(2, "b", b, 0.3, 100)])
    )
    np.testing.assert_allclose(merged["w"], [1.0])


def test_server_refuses_updates_measured_with_different_priors() -> None:
    strategy = FedMASStrategy(fedmas_run())
    state = {"w": torch.tensor([1.0])}
    other = reply(2, "b", state, 0.3, 100)
    other.info = {"prior_content_sha256": "cd" * 32}
    with pytest.raises(IntegrityError, match="different Fed-MAS priors"):
        strategy.aggregate(1, [reply(1, "a", state, 0.1, 900), other])


def test_objective_replies_carry_rf_and_class_divergences(tmp_path: Path) -> None:
    """The reply message (what the coordinator unpacks) holds RF, n_k, w and w_hat as metrics."""
    run = fedmas_run(**{"local-steps": 1})
    context = make_context(run, tmp_path)
    context.data = HospitalData(
        train=make_split(40, 1), val=make_split(10, 2), test=make_split(10, 3)
    )
    objective = FedMASObjective(context)
    content = RecordDict(
        {
            "arrays": state_to_record(build_fedmas_model(run, seed=0).state_dict()),
            "config": ConfigRecord({"server-round": 1}),
        }
    )
    answer = objective.respond(content, train=True)
    metrics = dict(answer["metrics"])
    assert isinstance(answer["metrics"], MetricRecord)
    assert metrics["num_train"] == 40 and len(metrics["mas_w"]) == 2
    assert metrics["mas_rf"] > 0
    assert dict(answer["info"])["prior_origin"] == "random"
