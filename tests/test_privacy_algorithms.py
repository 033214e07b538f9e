"""DP-SGD in FedHelp's and Fed-MAS's private steps and for ResNets (docs/privacy.md).

The bound tests: with no noise, plain SGD (lr, no momentum, no weight decay), a batch size at
least the training split (sample rate 1, so every Poisson batch is the whole split and the
clipped sum is divided by at least its size) and a clipping norm C far below the gradients'
norms, one DP-SGD step moves a model's parameters by at most ``lr * C`` in L2 norm, and a
round of ``steps`` steps by at most ``lr * C * steps`` (triangle inequality), computed here by
hand. A private step that bypassed the private optimiser (the plain optimiser on the raw
gradient) moves them far more, which each test also checks on the same setting without DP.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, RecordDict
from harness import FakeClock, ScriptedGrid, run, synthetic_nodes
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from test_fedhelp import make_objective
from torch import nn

from fedclinic.config import HospitalConfig, RunConfig
from fedclinic.data.base import HospitalData, Split
from fedclinic.errors import ConfigError
from fedclinic.knowledge import build_knowledge, write_synthetic_public
from fedclinic.models import build_model
from fedclinic.privacy import IN_PLACE, LEDGER, network_problems
from fedclinic.serialization import state_to_record
from fedclinic.site import SiteState
from fedclinic.training import PrivateUpdater, train_local
from strategies import fedmas, load_run_config
from strategies.base import ClientContext
from strategies.fedhelp import LARGE_MODEL
from strategies.fedmas import FedMASObjective, build_fedmas_model

LR = 0.5
CLIP = 1e-4
STEPS = 3
DELTA = 1e-5


def distance(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> float:
    """The L2 norm of the change of every floating-point entry (parameters; GroupNorm has
    no running statistics)."""
    total = sum(
        float((after[k].double() - before[k].double()).pow(2).sum())
        for k in before
        if before[k].is_floating_point()
    )
    return math.sqrt(total)


def bound(steps: int = STEPS) -> float:
    return LR * CLIP * steps * (1 + 1e-4)


def quiet(run: RunConfig) -> RunConfig:
    """The run without noise (the config refuses σ = 0; the bound tests need it)."""
    return run.model_copy(update={"dp_noise_multiplier": 0.0})


def counting(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count every DP-SGD step (each goes through PrivateUpdater.step)."""
    calls: list[int] = []
    real = PrivateUpdater.step

    def step(self: PrivateUpdater, *args: Any, **kwargs: Any) -> None:
        calls.append(1)
        real(self, *args, **kwargs)

    monkeypatch.setattr(PrivateUpdater, "step", step)
    return calls


# ------------------------------------------------------------------------------ FedHelp


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("shared")
    public = write_synthetic_public(folder / "public.npz", 32, 2, seed=1000)
    np.save(folder / "api.npy", np.random.default_rng(0).normal(scale=2.0, size=(32, 2)))
    digest, _ = build_knowledge(public, folder / "knowledge.npz", logits_file=folder / "api.npy")
    return {"public": public, "knowledge": folder / "knowledge.npz", "sha": digest}


def fedhelp_run(shared: dict[str, Any], dp: bool = True, **options: Any) -> RunConfig:
    flat: dict[str, Any] = {
        "algorithm": "fedhelp",
        "local-steps": STEPS,
        "batch-size": 256,  # >= the training split: sample rate 1
        "optimizer": "sgd",
        "momentum": 0.0,
        "learning-rate": LR,
        "fedhelp.large-model": "wide-cnn",
        "fedhelp.knowledge-sha256": shared["sha"],
        "fedhelp.public-weight": 0.0,  # the public step moves nothing: the bound is the private one
        "fedhelp.head-init": "global",
        **({"dp": "dp-sgd", "dp-max-grad-norm": CLIP} if dp else {}),
    }
    flat.update({k if "." in k else f"fedhelp.{k}": v for k, v in options.items()})
    run = load_run_config(flat)
    return quiet(run) if dp else run


def received(run: RunConfig) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in build_model(run, seed=1).state_dict().items()}


@pytest.mark.parametrize("knowledge", ["file", "none"])
def test_fedhelp_small_hospitals_private_steps_are_clipped(
    shared: dict[str, Any], tmp_path: Path, knowledge: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = fedhelp_run(shared, knowledge=knowledge)
    start = received(run)
    calls = counting(monkeypatch)
    update = make_objective(run, shared, tmp_path / "dp", "small").fit(start)
    assert update.steps == STEPS and len(calls) == STEPS
    assert 0 < distance(start, update.state) <= bound()
    plain = fedhelp_run(shared, dp=False, knowledge=knowledge)
    moved = make_objective(plain, shared, tmp_path / "plain", "small").fit(received(plain))
    assert distance(received(plain), moved.state) > 100 * bound()


def test_fedhelp_large_hospital_clips_both_models_steps(
    shared: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The proxy (uploaded) and the large model (kept at the site) both learn from the
    private data: each moves by at most lr * C * steps, and 2 x steps private steps ran."""
    run = fedhelp_run(shared)
    objective = make_objective(run, shared, tmp_path / "dp", "large")
    assert objective.private_models == 2
    large_before = {k: v.clone() for k, v in objective.large_model().state_dict().items()}
    assert not any(isinstance(m, nn.BatchNorm2d) for m in objective.large_model().modules())
    start = received(run)
    calls = counting(monkeypatch)
    update = objective.fit(start)
    assert update.info["uploaded"] == "proxy" and len(calls) == 2 * STEPS
    assert 0 < distance(start, update.state) <= bound()
    large_after = objective.context.site.load(LARGE_MODEL)
    assert 0 < distance(large_before, large_after) <= bound()

    plain = fedhelp_run(shared, dp=False)
    plain_objective = make_objective(plain, shared, tmp_path / "plain", "large")
    plain_large = {k: v.clone() for k, v in plain_objective.large_model().state_dict().items()}
    moved = plain_objective.fit(received(plain))
    assert distance(received(plain), moved.state) > 100 * bound()
    assert distance(plain_large, plain_objective.context.site.load(LARGE_MODEL)) > 100 * bound()


# ------------------------------------------------------------------------------ Fed-MAS


def fedmas_run(dp: bool = True, **extra: Any) -> RunConfig:
    flat: dict[str, Any] = {
        "algorithm": "fedmas",
        "model": "cnn",
        "local-steps": STEPS,
        "batch-size": 256,
        "optimizer": "sgd",
        "momentum": 0.0,
        "learning-rate": LR,
        "fedmas.prior-source": "random",
        "fedmas.prior-arch": "cnn",
        **({"dp": "dp-sgd", "dp-max-grad-norm": CLIP, "privacy-fix-model": True} if dp else {}),
        **extra,
    }
    run = load_run_config(flat)
    return quiet(run) if dp else run


def fedmas_context(run: RunConfig, tmp_path: Path) -> ClientContext:
    generator = torch.Generator().manual_seed(1)
    labels = (torch.rand(40, generator=generator) < 0.3).long()
    inputs = torch.rand(40, 1, 28, 28, generator=generator) + labels[:, None, None, None] * 0.5
    split = Split(inputs, labels)
    return ClientContext(
        run=run,
        hospital=HospitalConfig(hospital="hospital-a", state_dir=str(tmp_path)),
        data=HospitalData(train=split, val=split, test=split),
        device=torch.device("cpu"),
        site=SiteState(tmp_path / "state"),
        server_round=1,
        # what the ClientApp's DP release hands over (tested in test_privacy)
        released_counts=[float(c) for c in split.class_counts(2)],
    )


def test_fedmas_local_steps_are_clipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Balanced softmax on both heads and the alignment to the prior: every step DP-SGD."""
    run = fedmas_run()
    model = build_fedmas_model(run, seed=0)
    layers = {type(m) for m in model.modules()}
    assert nn.GroupNorm in layers and nn.BatchNorm1d not in layers  # the projector converted
    start = {k: v.clone() for k, v in model.state_dict().items()}
    calls = counting(monkeypatch)
    update = FedMASObjective(fedmas_context(run, tmp_path / "dp")).fit(start)
    assert len(calls) == STEPS and update.steps == STEPS
    assert 0 < distance(start, update.state) <= bound()
    assert update.metrics["mas_rf"] > 0  # the robust factor is still computed

    plain = fedmas_run(dp=False)
    plain_start = build_fedmas_model(plain, seed=0).state_dict()
    moved = FedMASObjective(fedmas_context(plain, tmp_path / "plain")).fit(plain_start)
    assert distance(plain_start, moved.state) > 100 * bound()


def test_fedhelp_and_fedmas_balanced_softmax_read_the_dp_release(
    shared: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under DP, FedHelp's private loss and Fed-MAS's two heads shift the logits by the log
    prior of the site's DP release of the class counts (``ClientContext.released_counts``),
    computed here by hand; without DP by the exact training counts."""
    z, y = (
        torch.randn(5, 2, generator=torch.Generator().manual_seed(3)),
        torch.tensor([0, 1, 1, 0, 1]),
    )

    def by_hand(counts: list[float]) -> float:
        prior = torch.tensor(counts, dtype=torch.float64) / sum(counts)
        return float(torch.nn.functional.cross_entropy(z + prior.log().float(), y))

    objective = make_objective(fedhelp_run(shared), shared, tmp_path / "dp", "small")
    objective.context.released_counts = [3.0, 70.0]
    assert float(objective.private_loss()(z, y)) == pytest.approx(by_hand([3.0, 70.0]))
    plain = make_objective(fedhelp_run(shared, dp=False), shared, tmp_path / "plain", "small")
    exact = [float(c) for c in plain.context.data.train.class_counts(2)]
    assert exact != [3.0, 70.0]
    assert float(plain.private_loss()(z, y)) == pytest.approx(by_hand(exact))

    priors: list[list[float]] = []
    real = fedmas.class_log_prior
    monkeypatch.setattr(
        fedmas, "class_log_prior", lambda counts: priors.append(counts.tolist()) or real(counts)
    )
    context = fedmas_context(fedmas_run(), tmp_path / "mas")
    context.released_counts = [2.0, 50.0]
    FedMASObjective(context).fit(build_fedmas_model(context.run, seed=0).state_dict())
    assert priors == [[2.0, 50.0]]
    context = fedmas_context(fedmas_run(dp=False), tmp_path / "mas-plain")
    FedMASObjective(context).fit(build_fedmas_model(context.run, seed=0).state_dict())
    assert priors[1] == [float(c) for c in context.data.train.class_counts(2)]


# ------------------------------------------------------------------------------ the ledger


def opacus_epsilon(
    sigma: float, rate: float, steps: int, delta: float, prior_sigma: float | None = None
) -> float:
    """ε of ``steps`` Poisson-subsampled Gaussian steps from Opacus's RDP analysis functions
    directly (the orders of its accountant), not through fedclinic.privacy; with
    ``prior_sigma``, composed with one Gaussian mechanism of L2 sensitivity 1 at that noise
    (the class-prior release), whose RDP is ``alpha / (2 sigma^2)`` (Mironov, arXiv
    1702.07476, proposition 7), written out here by hand."""
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    rdp = compute_rdp(q=rate, noise_multiplier=sigma, steps=steps, orders=orders)
    if prior_sigma is not None:
        rdp = rdp + np.array(orders) / (2 * prior_sigma**2)
    eps, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    return float(eps)


@pytest.mark.usefixtures("task_identity")
def test_fedhelp_ledger_counts_both_models_steps(tmp_path: Path) -> None:
    """Through the real ClientApp handler: the large hospital's ledger is charged the proxy's
    and the large model's steps (2 x local-steps per round), a small hospital its surrogate's,
    and once per run the balanced softmax's class-prior release (FedHelp's default loss);
    ε equals Opacus's RDP analysis for the same (σ, q, steps) composed with that release."""
    nodes = synthetic_nodes(tmp_path, 3)
    flat = {
        "algorithm": "fedhelp",
        "model": "cnn",
        "rounds": 2,
        "local-steps": 2,
        "batch-size": 8,
        "min-hospitals": 3,
        "round-timeout": 20.0,
        "dp": "dp-sgd",
        "dp-noise-multiplier": 1.3,
        "fedhelp.knowledge": "none",
        "fedhelp.num-large": 1,
        "fedhelp.large-model": "wide-cnn",
    }
    _, result = run(flat, ScriptedGrid(nodes, flat), tmp_path / "out", clock=FakeClock())
    assert result.arrays is not None
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    roles = summary["fedhelp"]["roles"]
    assert sorted(roles.values()) == ["large", "small", "small"]
    for name, role in roles.items():
        path = tmp_path / "state" / name / LEDGER
        entries = [json.loads(line) for line in path.read_text().splitlines()]
        assert [(e["round"], e["exchange"]) for e in entries] == [
            (1, "class-prior"), (1, "train"), (2, "train")
        ]  # fmt: skip
        prior, rounds = entries[0], entries[1:]
        assert (prior["noise_multiplier"], prior["sample_rate"], prior["steps"]) == (10.0, 1, 1)
        assert prior["epsilon_total"] == pytest.approx(
            opacus_epsilon(1.3, 0.5, 0, DELTA, prior_sigma=10.0), rel=1e-6
        )
        per_round = 2 * 2 if role == "large" else 2
        assert [e["steps"] for e in rounds] == [per_round, per_round]
        rate = rounds[0]["sample_rate"]
        assert rate == pytest.approx(8 / 28)  # batch / the 28 training rows of 40 samples
        assert entries[-1]["epsilon_total"] == pytest.approx(
            opacus_epsilon(1.3, rate, 2 * per_round, DELTA, prior_sigma=10.0), rel=1e-6
        )
        assert entries[-1]["epsilon_total"] > opacus_epsilon(1.3, rate, 2 * per_round, DELTA)
        assert summary["hospitals"][name]["privacy"]["epsilon"] == entries[-1]["epsilon_total"]


# ------------------------------------------------------------------------------ ResNets


@pytest.mark.parametrize("name", ["resnet18", "resnet101"])
def test_resnets_are_converted_and_train_under_dp(name: str, tmp_path: Path) -> None:
    """privacy-fix-model = true: BatchNorm -> GroupNorm, residual additions out of place;
    the run is accepted, records the conversion, and a DP-SGD step trains the model."""
    run = load_run_config(
        {
            "algorithm": "fedavg",
            "model": name,
            "dp": "dp-sgd",
            "privacy-fix-model": True,
            "local-steps": 1,
            "batch-size": 4,
        }
    )
    model = build_model(run, seed=0)
    layers = {type(m) for m in model.modules()}
    assert nn.GroupNorm in layers and nn.BatchNorm2d not in layers
    plain = build_model(run.model_copy(update={"dp": "off"}), seed=0)
    assert nn.BatchNorm2d in {type(m) for m in plain.modules()}
    if name == "resnet101":
        return  # the registry's check already ran one per-sample backward pass on it
    generator = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 1, 0, 1, 1, 0])
    split = Split(torch.randn(6, 1, 28, 28, generator=generator), labels)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = train_local(model, split, run, torch.device("cpu"), generator)
    assert stats.steps == 1
    assert distance(before, model.state_dict()) > 0


class InPlaceBlock(nn.Module):
    """A residual block written as torchvision's: the shortcut added in place."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        self.norm = nn.GroupNorm(1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.norm(self.conv(x))
        out += x
        return out.flatten(1)


def test_an_in_place_residual_is_found_by_the_per_sample_check() -> None:
    """What private_variant rewrites in torchvision's blocks, the check finds elsewhere."""
    assert network_problems(InPlaceBlock(), (1, 4, 4)) == [IN_PLACE]
    assert network_problems(nn.Sequential(nn.Flatten(), nn.Linear(16, 2)), (1, 4, 4)) == []


# ------------------------------------------------------------------------------ refusals


def _flat(**extra: Any) -> dict[str, Any]:
    return {"model": "cnn", "dp": "dp-sgd", **extra}


@pytest.mark.parametrize(
    ("flat", "needle"),
    [
        (
            _flat(algorithm="fedhelp", **{"fedhelp.large-model": "resnet18"}),
            "fedhelp.large-model = 'resnet18' is not allowed with dp = 'dp-sgd'",
        ),
        (
            _flat(
                algorithm="fedmas",
                **{"fedmas.prior-source": "random", "fedmas.prior-arch": "cnn"},
            ),
            "algorithm = 'fedmas' is not allowed with dp = 'dp-sgd'",
        ),
        (_flat(algorithm="fedavg", model="resnet18"), "set privacy-fix-model = true"),
        (_flat(algorithm="fedmas", amp=True), "amp = true is not allowed with dp"),
    ],
)
def test_bad_combinations_are_refused_in_one_line(flat: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_run_config(flat)
    assert needle in str(caught.value) and "\n" not in str(caught.value)
    if "privacy-fix-model" not in flat and "amp" not in flat:
        assert "privacy-fix-model = true" in str(caught.value)  # what fixes it


def test_fedhelp_and_fedmas_accept_dp_with_converted_models() -> None:
    load_run_config(_flat(algorithm="fedhelp", **{"privacy-fix-model": True}))  # resnet18 large
    load_run_config(
        _flat(
            algorithm="fedmas",
            **{
                "privacy-fix-model": True,
                "fedmas.prior-source": "random",
                "fedmas.prior-arch": "cnn",
            },
        )
    )


def test_fedhelp_public_step_leaves_no_per_sample_gradient(
    shared: dict[str, Any], tmp_path: Path
) -> None:
    """With the public step weighted, phi moves beyond the private bound (public data is not
    private), yet the private updater still sees only the private batch: a round completes
    and uploads the surrogate."""
    run = fedhelp_run(shared, **{"public-weight": 1.0})
    start = received(run)
    objective = make_objective(run, shared, tmp_path, "small")
    content = RecordDict({"arrays": state_to_record(start), "config": ConfigRecord({})})
    reply = objective.respond(content, train=True)
    assert "arrays" in reply
