"""Differential privacy at the sites (docs/privacy.md): the accountant against Opacus's own
numbers, DP-SGD really clipping per sample and adding noise, each hospital's ledger and its
refusal at the ceiling through the real ClientApp handler, and bad settings refused."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from harness import FakeClock, ScriptedGrid, rows_of, run, synthetic_nodes
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from torch import nn

from fedclinic.cli import main
from fedclinic.config import parse_hospital_config
from fedclinic.data.base import HospitalData, Split
from fedclinic.errors import ConfigError, FedClinicError
from fedclinic.models import build_model
from fedclinic.privacy import (
    LEDGER,
    PRIOR_EXCHANGE,
    PRIOR_STATE,
    PrivacyLedger,
    epsilon,
    optimizer_warning,
    release_class_counts,
)
from fedclinic.serialization import load_checkpoint
from fedclinic.site import SiteState
from fedclinic.training import PrivateUpdater
from strategies import balanced_loss, load_run_config
from strategies.base import ClientContext

DELTA = 1e-5


# ---------------------------------------------------------------------------- accountant


@pytest.mark.parametrize(
    ("target", "rate", "steps"), [(1.0, 0.01, 1000), (3.0, 0.004, 2500), (8.0, 0.1, 200)]
)
def test_epsilon_matches_opacus_noise_calibration(target: float, rate: float, steps: int) -> None:
    """Opacus calibrates σ for (ε, δ, q, T); composing that history gives back that ε."""
    sigma = get_noise_multiplier(
        target_epsilon=target, target_delta=DELTA, sample_rate=rate, steps=steps,
        accountant="rdp", epsilon_tolerance=0.005,
    )  # fmt: skip
    assert epsilon([(sigma, rate, steps)], DELTA) == pytest.approx(target, abs=0.01)


def test_epsilon_composes_rounds_as_opacus_steps_them() -> None:
    """Rounds of different settings composed from the ledger equal Opacus's accountant stepped
    one step at a time, and are below the naive sum of each round's ε."""
    rounds = [(1.1, 0.05, 40), (0.9, 0.02, 100), (1.1, 0.05, 40)]
    accountant = RDPAccountant()
    for sigma, rate, steps in rounds:
        for _ in range(steps):
            accountant.step(noise_multiplier=sigma, sample_rate=rate)
    total = epsilon(rounds, DELTA)
    assert total == pytest.approx(accountant.get_epsilon(DELTA), rel=1e-9)
    assert total < sum(epsilon([r], DELTA) for r in rounds)
    assert epsilon([], DELTA) == 0.0


# ---------------------------------------------------------------------------- DP-SGD


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(8, 5, generator=generator) * 3
    return inputs, torch.randint(0, 3, (8,), generator=generator)


def _private_step(
    noise: float, clip: float, seed: int, model: nn.Module | None = None
) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    model = model or nn.Linear(5, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    inputs, labels = _batch()
    updater = PrivateUpdater(
        model, optimizer, noise, clip, len(labels), torch.Generator().manual_seed(seed)
    )
    updater.step(nn.functional.cross_entropy(model(inputs), labels))
    updater.close()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_dp_sgd_clips_each_sample_gradient() -> None:
    """Without noise and with a clip far below the gradients' norms, one SGD step (lr 1) moves
    the weights by minus the mean of the per-sample gradients each clipped to the norm,
    computed here one sample at a time."""
    clip = 0.01
    torch.manual_seed(1)
    reference = nn.Linear(5, 3)
    start = {k: v.detach().clone() for k, v in reference.state_dict().items()}
    inputs, labels = _batch()
    clipped = {k: torch.zeros_like(v) for k, v in start.items()}
    for i in range(len(labels)):
        reference.zero_grad()
        loss = nn.functional.cross_entropy(reference(inputs[i : i + 1]), labels[i : i + 1])
        loss.backward()
        grads = {k: p.grad.detach().clone() for k, p in reference.named_parameters()}
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads.values()))
        assert norm > 10 * clip  # every sample is clipped
        for k, g in grads.items():
            clipped[k] += g * min(1.0, clip / float(norm + 1e-6)) / len(labels)
    after = _private_step(noise=0.0, clip=clip, seed=0)
    for k in start:
        torch.testing.assert_close(after[k], start[k] - clipped[k], rtol=1e-5, atol=1e-7)


def test_dp_sgd_adds_noise_from_its_generator() -> None:
    """With noise, the update depends on the noise generator's seed (and only on it)."""
    first, again, other = (_private_step(1.0, 1.0, seed) for seed in (1, 1, 2))
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.allclose(first["weight"], other["weight"])
    quiet = _private_step(0.0, 1.0, 1)
    # the noise's scale: σ·C / batch = 1/8 per entry; far larger than float error
    assert (first["weight"] - quiet["weight"]).std() > 0.05


# ---------------------------------------------------------------------------- bad settings


def _run(**extra: Any) -> dict[str, Any]:
    return {"algorithm": "fedavg", "model": "cnn", "dp": "dp-sgd", **extra}


@pytest.mark.parametrize(
    ("flat", "needle"),
    [
        (_run(**{"dp-noise-multiplier": -1.0}), "dp-noise-multiplier"),
        (_run(**{"dp-max-grad-norm": 0.0}), "dp-max-grad-norm"),
        (_run(dp="laplace"), "'dp'"),
        (_run(amp=True), "amp = true is not allowed with dp"),
        (_run(model="resnet18"), "privacy-fix-model = true"),
        (_run(algorithm="fedhelp"), "fedhelp.large-model = 'resnet18' is not allowed with dp"),
    ],
)
def test_bad_run_settings_are_refused_in_one_line(flat: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_run_config(flat)
    assert needle in str(caught.value) and "\n" not in str(caught.value)


def test_batchnorm_model_is_converted_when_the_run_says_so() -> None:
    run = load_run_config(_run(model="densenet121", **{"privacy-fix-model": True}))
    layers = {type(m) for m in build_model(run).modules()}
    assert nn.GroupNorm in layers and not layers & {nn.BatchNorm1d, nn.BatchNorm2d}
    assert nn.BatchNorm2d in {
        type(m) for m in build_model(run.model_copy(update={"dp": "off"})).modules()
    }


@pytest.mark.parametrize(
    ("key", "value", "needle"),
    [
        ("privacy-epsilon", -1.0, "greater than or equal to 0"),
        ("privacy-delta", 1.0, "less than 1"),
        ("privacy-delta", 0.0, "greater than 0"),
        ("privacy-required", "yes", "valid boolean"),
    ],
)
def test_bad_hospital_privacy_settings_are_refused(key: str, value: Any, needle: str) -> None:
    flat = {"hospital": "h", "data-source": "synthetic", key: value}
    with pytest.raises(ConfigError) as caught:
        parse_hospital_config(flat)
    assert f"'{key}'" in str(caught.value) and needle in str(caught.value)


# ---------------------------------------------------------------------------- the ledger


def dp_run(rounds: int = 2, **extra: Any) -> dict[str, Any]:
    return {
        "algorithm": "fedavg",
        "model": "cnn",
        "rounds": rounds,
        "local-steps": 2,
        "batch-size": 8,
        "min-hospitals": 2,
        "round-timeout": 20.0,
        "dp": "dp-sgd",
        "dp-noise-multiplier": 1.5,
        **extra,
    }


def ledger_of(tmp_path: Path, hospital: str) -> list[dict[str, Any]]:
    path = tmp_path / "state" / hospital / LEDGER
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.usefixtures("task_identity")
def test_a_hospital_refuses_at_its_ceiling_and_the_run_goes_on(tmp_path: Path) -> None:
    """Hospital-b's ceiling lets it train round 1 but not round 2: it refuses round 2 with one
    line naming ε spent, its ceiling and the round's cost; the others train both rounds. The
    ledger holds ε composed over all steps of the data set (not a sum)."""
    nodes = synthetic_nodes(tmp_path, 3)
    flat = dp_run()
    for node in nodes.values():
        node["privacy-delta"] = DELTA
    _, result = run(flat, ScriptedGrid(nodes, flat), tmp_path / "out", clock=FakeClock())
    for name in ("hospital-a", "hospital-c"):
        entries = ledger_of(tmp_path, name)
        assert [e["round"] for e in entries] == [1, 2]
        history = [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in entries]
        assert entries[1]["epsilon_total"] == pytest.approx(epsilon(history, DELTA))
        assert entries[1]["epsilon_total"] < 2 * entries[0]["epsilon_round"]
    assert result.arrays is not None
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["privacy"]["dp"] == "dp-sgd" and summary["privacy"]["noise_multiplier"] == 1.5
    spent = summary["hospitals"]["hospital-a"]["privacy"]
    assert spent == {
        "epsilon": ledger_of(tmp_path, "hospital-a")[-1]["epsilon_total"],
        "delta": DELTA,
    }

    # the same data in a second run, now with a ceiling between one and two rounds' ε
    first = ledger_of(tmp_path, "hospital-b")
    spent = first[-1]["epsilon_total"]
    history = [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in first]
    next_total = epsilon([*history, history[0]], DELTA)
    ceiling = (spent + next_total) / 2
    nodes[101]["privacy-epsilon"] = ceiling
    second = {**dp_run(rounds=1), "run-name": "second"}
    run(second, ScriptedGrid(nodes, second), tmp_path / "out2", clock=FakeClock())
    errors = [r for r in rows_of(tmp_path / "out2") if r["kind"] == "error"]
    assert [r["hospital"] for r in errors] == ["hospital-b"]
    reason = errors[0]["reason"]
    assert reason.startswith(f"privacy budget: ε {spent:.2f} of {ceiling:g} spent on data set ")
    assert f"this round would spend {next_total - spent:.2f}" in reason
    assert "\n" not in reason
    assert len(ledger_of(tmp_path, "hospital-b")) == 2  # nothing recorded for the refusal
    trained = [r["hospital"] for r in rows_of(tmp_path / "out2") if r["kind"] == "train"]
    assert sorted(trained) == ["hospital-a", "hospital-c"]
    # hospital-a's data set accumulated across both runs
    entries = ledger_of(tmp_path, "hospital-a")
    assert [e["run_name"] for e in entries] == ["", "", "second"]
    assert entries[2]["epsilon_total"] > entries[1]["epsilon_total"]

    # the report prints every line and the composed ε per data set
    assert main(["privacy", "report", "--state-dir", str(tmp_path / "state" / "hospital-a")]) == 0
    ledger = PrivacyLedger(tmp_path / "state" / "hospital-a")
    assert len(ledger.entries()) == 3


@pytest.mark.usefixtures("task_identity")
def test_a_hospital_that_requires_dp_refuses_a_run_without_it(tmp_path: Path) -> None:
    nodes = synthetic_nodes(tmp_path, 3)
    nodes[102]["privacy-required"] = True
    flat = {**dp_run(rounds=1), "dp": "off"}
    run(flat, ScriptedGrid(nodes, flat), tmp_path / "out", clock=FakeClock())
    errors = [r for r in rows_of(tmp_path / "out") if r["kind"] == "error"]
    assert [r["hospital"] for r in errors] == ["hospital-c"]
    assert "requires differential privacy" in errors[0]["reason"]
    assert ledger_of(tmp_path, "hospital-a") == []


def test_report_prints_the_ledger(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["privacy", "report", "--state-dir", str(tmp_path)]) == 0
    assert "no privacy ledger entries" in capsys.readouterr().out


def test_opacus_leaves_the_root_logger_alone() -> None:
    """Opacus calls logging.basicConfig on import: every Flower line would be logged twice in
    each node, app and worker log (fedclinic.opacus_backend removes that handler)."""
    code = (
        "import logging, sys, fedclinic.training, fedclinic.privacy, client.app\n"
        "from fedclinic import opacus_backend\n"
        "used = [getattr(opacus_backend, name) for name in opacus_backend.__all__]\n"
        "assert 'opacus.utils.module_utils' in sys.modules\n"
        "assert logging.getLogger().handlers == [], logging.getLogger().handlers"
    )
    _passes_in_a_fresh_interpreter(code)


def _passes_in_a_fresh_interpreter(code: str) -> None:
    """``code`` run by a new Python in the repository root (imports start from nothing)."""
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_processes_without_dp_import_neither_opacus_nor_sklearn() -> None:
    """The site worker, the ServerApp and the CLI's runner import Opacus only when a run uses
    DP and scikit-learn only when a split is scored (each about a CPU-second per process)."""
    code = (
        "import sys, fedclinic.worker.server, server.app, fedclinic.local.command\n"
        "loaded = [m for m in ('opacus', 'sklearn') if m in sys.modules]\n"
        "assert not loaded, loaded"
    )
    _passes_in_a_fresh_interpreter(code)


# ---------------------------------------------------------------------------- DP learns


def _client_average(out: Path, model: str, key: str) -> float:
    summary = json.loads((out / "summary.json").read_text())
    values = [h[model][key] for h in summary["hospitals"].values()]
    return sum(values) / len(values)


@pytest.mark.usefixtures("task_identity")
def test_a_dp_federation_at_a_generous_budget_learns(tmp_path: Path) -> None:
    """DP-SGD must still learn: FedAvg with per-sample clipping and noise 0.8 (ε about 13 per
    hospital after 6 rounds) on imbalanced synthetic hospitals ends far above chance on
    their test splits: AUC 0.996-1.0 in five repeats, against 0.68-0.82 for the initial
    model. AUC, not balanced accuracy: DP noise moves the bias too, so the operating point of
    one round may still swing to one class (the selected model's balanced accuracy was
    0.58-0.91 in those repeats; the benchmark reports it, docs/privacy.md, section 9). A DP
    path whose noise is not divided by the batch size, or whose steps do not reach the
    model, stays near the initial AUC (the clipping and noise tests above check the maths
    step by step)."""
    nodes = synthetic_nodes(tmp_path, 3)
    for node in nodes.values():
        node["num-samples"] = 240
    flat = dp_run(rounds=6, **{"local-steps": 0, "local-epochs": 1, "batch-size": 32,
                               "dp-noise-multiplier": 0.8, "optimizer": "sgd",
                               "learning-rate": 0.1})  # fmt: skip
    run(flat, ScriptedGrid(nodes, flat), tmp_path / "out", clock=FakeClock())
    assert _client_average(tmp_path / "out", "final", "test_auc") > 0.95
    for name in ("hospital-a", "hospital-b", "hospital-c"):
        assert len(ledger_of(tmp_path, name)) == 6


def test_adam_under_dp_is_warned_about() -> None:
    """Adam's second moment under DP-SGD is the noise's variance: the coordinator's log says
    so at the start of the run (docs/privacy.md, section 9); SGD and runs without DP are not
    warned about."""
    adam = optimizer_warning(load_run_config(dp_run()))
    assert adam is not None and "optimizer = 'adam' under dp = 'dp-sgd'" in adam
    assert "\n" not in adam
    assert optimizer_warning(load_run_config(dp_run(optimizer="sgd"))) is None
    assert optimizer_warning(load_run_config({**dp_run(), "dp": "off"})) is None


# ------------------------------------------------------------- the class prior under DP


def released_files(tmp_path: Path, hospital: str) -> list[Path]:
    return sorted((tmp_path / "state" / hospital).glob(f"*/{PRIOR_STATE}_*.round-*.pt"))


def test_the_class_prior_release_adds_gaussian_noise_of_the_run_sigma(tmp_path: Path) -> None:
    """The Gaussian mechanism on the class histogram: each released count is the exact count
    plus N(0, dp-prior-noise^2) (2000 draws: mean within 4.5 and std within 5 standard
    errors; a release without noise, with the DP-SGD noise multiplier or with sigma^2 fails),
    floored at 1; released once per run and data set (another exchange, of the same round
    too, reads the site state and charges nothing), again in another run."""
    run = load_run_config(dp_run(**{"dp-prior-noise": 10.0}))
    hospital = parse_hospital_config(
        {"hospital": "h", "data-source": "synthetic", "state-dir": str(tmp_path / "h")}
    )
    exact = [1000] * 50
    noise = []
    for release in range(40):
        site = SiteState(tmp_path / "h" / f"run-{release}", server_round=1)
        got = release_class_counts(run, hospital, site, "d" * 64, exact, release)
        noise += [c - 1000 for c in got]
        # another exchange of the same round (pFedNet's personal phase, a re-asked round)
        again = SiteState(site.directory, server_round=1)
        assert release_class_counts(run, hospital, again, "d" * 64, exact, release) == got
    assert abs(float(np.mean(noise))) < 1.0
    assert 9.2 < float(np.std(noise)) < 10.8
    entries = PrivacyLedger(tmp_path / "h").entries()
    assert len(entries) == 40 and {e.exchange for e in entries} == {PRIOR_EXCHANGE}
    assert {(e.noise_multiplier, e.sample_rate, e.steps) for e in entries} == {(10.0, 1.0, 1)}
    floored = release_class_counts(run, hospital, SiteState(tmp_path / "f"), "e" * 64, [0, 0], 1)
    assert min(floored) >= 1.0


def test_under_dp_a_prior_loss_without_a_release_is_refused(tmp_path: Path) -> None:
    run = load_run_config(dp_run(**{"fedavg.local-loss": "bsm"}))
    hospital = parse_hospital_config(
        {"hospital": "h", "data-source": "synthetic", "state-dir": str(tmp_path)}
    )
    split = Split(torch.zeros(4, 1, 28, 28), torch.tensor([0, 1, 1, 1]))
    context = ClientContext(
        run, hospital, HospitalData(split, split, split), torch.device("cpu"),
        SiteState(tmp_path), server_round=1,
    )  # fmt: skip
    with pytest.raises(FedClinicError, match="must come from the site's DP release"):
        context.prior_counts()
    plain = replace(context, run=run.model_copy(update={"dp": "off"}))
    assert plain.prior_counts() == [1.0, 3.0]


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize(
    ("algorithm", "exchanges"),
    [("fedavg", ["train"]), ("pfednet", ["shared", "personal"])],
)
def test_under_dp_the_balanced_softmax_reads_the_release_not_the_exact_counts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, algorithm: str, exchanges: list[str]
) -> None:
    """Through the ClientApp handler, FedAvg with ``local-loss = bsm`` and pFedNet (its
    default; two training exchanges a round) under DP: each hospital releases its counts once
    (round 1, the ledger's first line, before the round's steps; pFedNet's personal phase
    reads the release of the same round's shared phase), and every exchange's loss reads that
    release, never the exact counts (a loss reading them is outside DP-SGD's guarantee).
    Without DP the loss reads the exact counts."""
    seen: list[list[float]] = []
    real = balanced_loss.local_loss

    def spy(run: Any, kind: Any, counts: Any) -> Any:
        seen.append([float(c) for c in counts])
        return real(run, kind, counts)

    monkeypatch.setattr(balanced_loss, "local_loss", spy)
    nodes = synthetic_nodes(tmp_path, 2)
    flat = {**dp_run(**{"fedavg.local-loss": "bsm", "pfednet.sketch": "label-ratio"}),
            "algorithm": algorithm}  # fmt: skip
    run(flat, ScriptedGrid(nodes, flat), tmp_path / "out", clock=FakeClock())
    released = []
    for name in ("hospital-a", "hospital-b"):
        entries = ledger_of(tmp_path, name)
        rounds = [(n, exchange) for n in (1, 2) for exchange in exchanges]
        assert [(e["round"], e["exchange"]) for e in entries] == [(1, PRIOR_EXCHANGE), *rounds]
        [file] = released_files(tmp_path, name)
        released.append([float(c) for c in load_checkpoint(file)["counts"].tolist()])
    assert len(seen) >= 4 and {tuple(c) for c in seen} == {tuple(c) for c in released}
    private = list(seen)

    seen.clear()
    plain = {**flat, "dp": "off", "run-name": "plain"}
    run(plain, ScriptedGrid(nodes, plain), tmp_path / "out-plain", clock=FakeClock())
    exact = {tuple(c) for c in seen}
    assert len(exact) == 2 and all(x == round(x) for c in exact for x in c)
    assert not exact & {tuple(c) for c in private}
    assert len(released_files(tmp_path, "hospital-a")) == 1  # nothing released without DP


@pytest.mark.usefixtures("task_identity")
def test_the_ceiling_check_counts_the_class_prior_release(tmp_path: Path) -> None:
    """A ceiling that one round's DP-SGD steps fit under but not with the class prior's
    release: the hospital refuses before it spends anything (no release, no ledger line)."""
    nodes = synthetic_nodes(tmp_path, 2)
    flat = dp_run(rounds=1, **{"fedavg.local-loss": "bsm", "min-hospitals": 1})
    for node in nodes.values():
        node["privacy-delta"] = DELTA
    run(flat, ScriptedGrid(nodes, flat), tmp_path / "out", clock=FakeClock())
    prior, steps = (
        (e["noise_multiplier"], e["sample_rate"], e["steps"])
        for e in ledger_of(tmp_path, "hospital-b")
    )
    alone, both = epsilon([steps], DELTA), epsilon([prior, steps], DELTA)
    assert both > alone
    nodes[101]["state-dir"] = str(tmp_path / "state" / "fresh-b")  # same data, no ledger yet
    nodes[101]["privacy-epsilon"] = (alone + both) / 2
    second = {**flat, "run-name": "second"}
    run(second, ScriptedGrid(nodes, second), tmp_path / "out2", clock=FakeClock())
    errors = [r for r in rows_of(tmp_path / "out2") if r["kind"] == "error"]
    assert [r["hospital"] for r in errors] == ["hospital-b"]
    assert f"this round would spend {both:.2f}" in errors[0]["reason"]
    assert ledger_of(tmp_path, "fresh-b") == [] and released_files(tmp_path, "fresh-b") == []
