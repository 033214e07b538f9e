"""Each hospital's privacy budget: the RDP accountant, the site's ledger, the refusal.

DP-SGD itself runs in :mod:`fedclinic.training`; this module decides whether a hospital may
train a round and records what it spent (docs/privacy.md). The coordinator proposes the
noise and clipping (run config ``dp``, ``dp-noise-multiplier``, ``dp-max-grad-norm``); the
hospital's own config holds its ceiling (``privacy-epsilon`` at ``privacy-delta``) and
whether it trains at all without DP (``privacy-required``). No run config key reaches them.

The ledger, ``privacy-ledger.jsonl`` in the hospital's state dir, is append-only: one line
per exchange trained with DP, naming the run, the round, the data set's content hash
(``HospitalData.fingerprint``) and the steps' DP-SGD parameters. ε for a data set is computed
by composing *every* recorded step of every run on it with Opacus's RDP accountant (Mironov,
arXiv 1702.07476; the subsampled Gaussian of Mironov et al., arXiv 1908.10530), which is
tighter than summing each round's ε and never looser. The accountant assumes Poisson
sampling, which is what the DP-SGD batches are (:func:`fedclinic.training.poisson_batches`).
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedclinic import opacus_backend
from fedclinic.config import HospitalConfig, RunConfig
from fedclinic.errors import ConfigError, FedClinicError
from fedclinic.models import MODELS, build_model
from fedclinic.site import SiteState, effective_state_dir
from fedclinic.training import poisson_plan, secret_generator

LEDGER = "privacy-ledger.jsonl"
#: the ledger's ``exchange`` of the class-prior release (:func:`release_class_counts`)
PRIOR_EXCHANGE = "class-prior"
#: the site-state entry holding a data set's released counts (+ its hash's first 16 digits)
PRIOR_STATE = "dp_class_counts"
#: (noise multiplier, sample rate, steps): one entry of the accountant's history
Steps = tuple[float, float, int]
#: one input's shape: ``(C, H, W)`` or ``(F,)``
Shape = tuple[int, ...]
IN_PLACE = (
    "its forward changes a layer's output in place (such as out += identity), which Opacus's "
    "per-sample hooks forbid"
)
_MODEL_PROBLEMS: dict[tuple[Any, ...], list[str]] = {}


class PrivacyBudgetError(FedClinicError):
    """A hospital refuses to train: DP is required, or its budget would be exceeded."""


def epsilon(history: list[Steps], delta: float) -> float:
    """ε at ``delta`` of every step in ``history`` composed (RDP accountant); 0 for none.

    RDP adds up over steps, so entries of the same noise and sample rate are one entry of
    their summed steps (exact): a ledger of many rounds costs one RDP evaluation per
    setting, not one per round (each is ~0.1 s: Opacus's fractional orders)."""
    if not history:
        return 0.0
    merged: dict[tuple[float, float], int] = {}
    for sigma, rate, steps in history:
        key = (float(sigma), float(rate))
        merged[key] = merged.get(key, 0) + int(steps)
    return _epsilon(tuple(sorted((s, q, n) for (s, q), n in merged.items())), float(delta))


@functools.lru_cache(maxsize=4096)
def _epsilon(history: tuple[Steps, ...], delta: float) -> float:
    accountant = opacus_backend.RDPAccountant()
    accountant.history = list(history)
    return float(accountant.get_epsilon(delta))


def optimizer_warning(run: RunConfig) -> str | None:
    """A line for the coordinator's log when DP-SGD's noise drives an adaptive optimiser.

    Adam divides each step by the root of its second-moment estimate, which under DP-SGD
    is dominated by the noise's variance ``(noise * clip / batch)^2``, not by the gradient's:
    its steps shrink to about ``lr * signal / noise`` and the model barely moves (Tang et al.,
    "DP-AdamBC", arXiv:2312.14334, section 3). Measured on the PneumoniaMNIST hospitals
    (docs/privacy.md, section 9): Adam 1e-3 left the validation AUC at 0.50 after 4 epochs
    at noise 1.48, SGD 0.1 with momentum reached 0.90 after one.
    """
    if run.dp == "off" or run.optimizer == "sgd":
        return None
    noise = run.dp_noise_multiplier * run.dp_max_grad_norm / run.batch_size
    return (
        f"optimizer = {run.optimizer!r} under dp = 'dp-sgd': its second moment is dominated "
        f"by the DP noise (std {noise:.3g} per coordinate of the mean gradient), so its steps "
        "shrink towards zero; optimizer = 'sgd' with momentum learns (docs/privacy.md, section 9)"
    )


def check_model(run: RunConfig) -> None:
    """Under DP, a model Opacus cannot train privately is refused before anything starts
    (BatchNorm mixes samples: ``privacy-fix-model = true`` builds it with GroupNorm)."""
    check_network(run, f"model = {run.model!r}", lambda: build_model(run), input_shape(run))


def input_shape(run: RunConfig) -> Shape:
    """One input of the run: ``(num-features,)`` for a tabular model, else ``(C, H, W)``."""
    if MODELS[run.model].tabular:
        return (run.num_features,)
    return (run.in_channels, run.image_size, run.image_size)


def check_network(run: RunConfig, what: str, build: Callable[[], nn.Module], shape: Shape) -> None:
    """Under DP, refuse (one line) another network an algorithm trains on private data
    (FedHelp's large model, Fed-MAS's model with its projector), built by ``build`` as the
    algorithm builds it under the run's ``privacy-fix-model``."""
    if run.dp == "off":
        return
    key = (what, run.task, shape, run.num_classes, run.privacy_fix_model)
    if key not in _MODEL_PROBLEMS:  # each app validates per message: build each model once
        _MODEL_PROBLEMS[key] = network_problems(build(), shape)
    errors = _MODEL_PROBLEMS[key]
    if errors:
        hint = (
            " (set privacy-fix-model = true to build it with GroupNorm instead of BatchNorm)"
            if not run.privacy_fix_model
            else ""
        )
        raise ConfigError(
            f"run config: {what} is not allowed with dp = {run.dp!r}: Opacus cannot compute "
            f"its per-sample gradients: {errors[0]}{hint}"
        )


def network_problems(model: nn.Module, shape: Shape) -> list[str]:
    """Why Opacus cannot train ``model`` privately: its validator's findings, else what one
    per-sample backward pass on two random inputs of ``shape`` raises (a forward that changes
    a layer's output in place breaks Opacus's hooks)."""
    found = [str(e) for e in opacus_backend.ModuleValidator.validate(model)]
    if found:
        return found
    hooks = opacus_backend.GradSampleModule(model, loss_reduction="mean")
    try:
        hooks(torch.randn((2, *shape))).float().mean().backward()
    except RuntimeError as err:
        if "modified inplace" in str(err):
            return [IN_PLACE]
        return [str(err).splitlines()[0]]
    finally:
        hooks._close()
    return []


@dataclass(frozen=True)
class LedgerEntry:
    """One exchange trained with DP at one hospital."""

    run_id: int
    run_name: str
    round: int
    exchange: str
    dataset: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    epsilon_round: float
    epsilon_total: float
    time: float

    @property
    def history(self) -> Steps:
        return (self.noise_multiplier, self.sample_rate, self.steps)


class PrivacyLedger:
    """The append-only ``privacy-ledger.jsonl`` of one hospital's state dir."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / LEDGER

    @classmethod
    def of(cls, hospital: HospitalConfig) -> PrivacyLedger:
        return cls(effective_state_dir(hospital))

    def entries(self) -> list[LedgerEntry]:
        if not self.path.is_file():
            return []
        found = []
        for number, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                found.append(LedgerEntry(**json.loads(line)))
            except (ValueError, TypeError) as err:
                raise FedClinicError(
                    f"privacy ledger {self.path} line {number} is unreadable ({err}); the "
                    "hospital refuses DP training until it is repaired"
                ) from None
        return found

    def history(self, dataset: str) -> list[Steps]:
        return [e.history for e in self.entries() if e.dataset == dataset]

    def append(self, entry: LedgerEntry) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as file:
            file.write(json.dumps(asdict(entry), separators=(",", ":")) + "\n")
            file.flush()


@dataclass(frozen=True)
class RoundCharge:
    """What one exchange will spend, checked against the ceiling before it trains."""

    ledger: PrivacyLedger
    dataset: str
    delta: float
    noise_multiplier: float
    sample_rate: float
    steps: int
    spent: float
    after: float

    def record(
        self, run_id: int, run_name: str, server_round: int, exchange: str, steps: int
    ) -> LedgerEntry:
        """Append the exchange's line, with the steps it really took."""
        history = self.ledger.history(self.dataset)
        step: Steps = (self.noise_multiplier, self.sample_rate, steps)
        total = epsilon([*history, step], self.delta)
        entry = LedgerEntry(
            run_id=run_id,
            run_name=run_name,
            round=server_round,
            exchange=exchange,
            dataset=self.dataset,
            noise_multiplier=self.noise_multiplier,
            sample_rate=self.sample_rate,
            steps=steps,
            delta=self.delta,
            epsilon_round=epsilon([step], self.delta),
            epsilon_total=total,
            time=time.time(),
        )
        self.ledger.append(entry)
        return entry


def plan_round(
    run: RunConfig,
    hospital: HospitalConfig,
    dataset: str,
    num_train: int,
    models: int = 1,
    pending: tuple[Steps, ...] = (),
) -> RoundCharge | None:
    """Before a training exchange: None without DP (refused if this hospital requires DP),
    else what the exchange will spend; refused when it would pass the ceiling.

    ``models``: how many models the exchange trains on the private data, each with its own
    Poisson batches (a FedHelp large hospital trains its proxy and its large model): every
    model's steps are steps of the subsampled Gaussian on this data set, so the charge is
    ``models`` x the round's steps (docs/privacy.md, section 2). ``pending``: releases the
    exchange makes before it trains (the class prior, :func:`prior_step`), so that the check
    covers them and the round is refused before any of it is spent."""
    name = hospital.hospital
    if run.dp == "off":
        if hospital.privacy_required:
            raise PrivacyBudgetError(
                f"privacy: hospital {name} requires differential privacy and this run has "
                "dp = 'off'; it does not train (run with dp = 'dp-sgd')"
            )
        return None
    ledger = PrivacyLedger.of(hospital)
    rate, per_model = poisson_plan(run.batch_size, num_train, run.local_steps, run.local_epochs)
    steps = per_model * models
    history = ledger.history(dataset)
    step: Steps = (run.dp_noise_multiplier, rate, steps)
    spent = epsilon(history, hospital.privacy_delta)
    after = epsilon([*history, *pending, step], hospital.privacy_delta)
    ceiling = hospital.privacy_epsilon
    if ceiling > 0 and after > ceiling:
        raise PrivacyBudgetError(
            f"privacy budget: ε {spent:.2f} of {ceiling:g} spent on data set {dataset[:12]}; "
            f"this round would spend {after - spent:.2f} (to ε {after:.2f} at δ "
            f"{hospital.privacy_delta:g}); hospital {name} does not train"
        )
    return RoundCharge(
        ledger, dataset, hospital.privacy_delta, run.dp_noise_multiplier, rate, steps, spent, after
    )


def prior_step(run: RunConfig) -> Steps:
    """The class-prior release as one accountant entry: the Gaussian mechanism is the
    subsampled Gaussian at sample rate 1 and one step (RDP ``alpha / (2 sigma^2)``, the
    histogram's L2 sensitivity being 1: adding or removing one patient moves one count by 1)."""
    return (run.dp_prior_noise, 1.0, 1)


def released_class_counts(site: SiteState, dataset: str) -> list[float] | None:
    """The counts this run already released for ``dataset`` at this site, if any: whichever
    exchange or round made the release (the same round's earlier exchange included, such as
    pFedNet's shared phase before its personal one; a re-asked round reads it too)."""
    name = prior_state_name(dataset)
    newest = SiteState(site.directory)  # round 0: the newest version, whichever round wrote it
    if not newest.has(name):
        return None
    return [float(c) for c in newest.load(name)["counts"].tolist()]


def prior_state_name(dataset: str) -> str:
    """The site-state entry of ``dataset``'s class-prior release."""
    return f"{PRIOR_STATE}_{dataset[:16]}"


def release_class_counts(
    run: RunConfig,
    hospital: HospitalConfig,
    site: SiteState,
    dataset: str,
    counts: list[int],
    run_id: int,
) -> list[float]:
    """The training split's class counts for the balanced-softmax prior under DP: released
    once per run and data set through the Gaussian mechanism (``counts + N(0, sigma^2)``,
    ``sigma`` = the run's ``dp-prior-noise``, noise from the operating system's randomness),
    floored at 1 (post-processing: a prior needs positive counts), charged to the ledger
    (exchange ``class-prior``) and kept in the run's site state, so that every later round
    reads the same release at no further cost. The loss that reads them is then
    post-processing of a DP release (docs/privacy.md, section 6).

    Refused, like a round (:func:`plan_round`), when the release alone would pass the
    hospital's ceiling; a round's own check counts it too (``plan_round(..., pending=)``).
    """
    found = released_class_counts(site, dataset)
    if found is not None:
        return found
    ledger, delta = PrivacyLedger.of(hospital), hospital.privacy_delta
    history = ledger.history(dataset)
    step = prior_step(run)
    spent, after = epsilon(history, delta), epsilon([*history, step], delta)
    if hospital.privacy_epsilon > 0 and after > hospital.privacy_epsilon:
        raise PrivacyBudgetError(
            f"privacy budget: ε {spent:.2f} of {hospital.privacy_epsilon:g} spent on data set "
            f"{dataset[:12]}; releasing the class prior would spend {after - spent:.2f}; "
            f"hospital {hospital.hospital} does not train"
        )
    exact = torch.tensor([float(c) for c in counts], dtype=torch.float64)
    noise = torch.normal(0.0, run.dp_prior_noise, exact.shape, generator=secret_generator())
    noisy = torch.clamp(exact + noise.double(), min=1.0)
    ledger.append(
        LedgerEntry(
            run_id=run_id,
            run_name=run.run_name,
            round=site.server_round,
            exchange=PRIOR_EXCHANGE,
            dataset=dataset,
            noise_multiplier=step[0],
            sample_rate=step[1],
            steps=step[2],
            delta=delta,
            epsilon_round=epsilon([step], delta),
            epsilon_total=after,
            time=time.time(),
        )
    )
    site.save(prior_state_name(dataset), {"counts": noisy})
    return [float(c) for c in noisy.tolist()]


def dataset_hash(fingerprint: str) -> str:
    """The content hash in a ``HospitalData.fingerprint`` (train, val and test splits)."""
    return str(json.loads(fingerprint)["sha256"])


# ---------------------------------------------------------------------------- the command


def report_lines(state_dir: Path) -> list[str]:
    """The ledger as a table, then ε per data set (all runs composed)."""
    ledger = PrivacyLedger(state_dir)
    entries = ledger.entries()
    if not entries:
        return [f"no privacy ledger entries in {ledger.path}"]
    lines = [
        f"{'run':>20} {'name':<16} {'round':>5} {'exchange':<10} {'data set':<12} "
        f"{'sigma':>6} {'q':>8} {'steps':>6} {'eps round':>9} {'eps total':>9}"
    ]
    for e in entries:
        lines.append(
            f"{e.run_id:>20} {e.run_name[:16]:<16} {e.round:>5} {e.exchange[:10]:<10} "
            f"{e.dataset[:12]:<12} {e.noise_multiplier:>6.3g} {e.sample_rate:>8.4g} "
            f"{e.steps:>6} {e.epsilon_round:>9.3f} {e.epsilon_total:>9.3f}"
        )
    datasets = dict.fromkeys(e.dataset for e in entries)
    for dataset in datasets:
        delta = next(e.delta for e in reversed(entries) if e.dataset == dataset)
        runs = len({e.run_id for e in entries if e.dataset == dataset})
        total = epsilon(ledger.history(dataset), delta)
        lines.append(f"data set {dataset[:12]}: ε {total:.3f} at δ {delta:g} over {runs} run(s)")
    return lines


def privacy_report(args: argparse.Namespace) -> int:
    for line in report_lines(args.state_dir):
        print(line)
    return 0


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``fedclinic privacy report``."""
    privacy = subparsers.add_parser("privacy", help="a hospital's differential-privacy ledger")
    commands = privacy.add_subparsers(dest="privacy_command", required=True, metavar="COMMAND")
    report = commands.add_parser("report", help="print the ledger and ε spent per data set")
    report.add_argument(
        "--state-dir", type=Path, required=True, metavar="DIR",
        help="the hospital's state dir (its config's state-dir), where privacy-ledger.jsonl is",
    )  # fmt: skip
    report.set_defaults(handler=privacy_report)
