"""Mutation check of the algorithm tests: each listed slip in the training code must fail a test.

Why (issue 16): mutations of the client training code once left every algorithm test green
(FedHelp with the forward KL reversed, with stale pre-step proxy logits in the backward
step, with the ranking loss cut off from the large model, with the public-data KL reversed;
Fed-MAS without its alignment term, or with w_hat replaced by w; pFedNet averaging the shared
layers without sample weights). This runner keeps the evidence that the suite now catches
them, and similar slips, re-runnable: docs/testing.md has the table it produces. The
formulas the slips break are those of docs/fedhelp.md, docs/fedmas.md and docs/pfednet.md
(where the decision IDs FH-n and PF-n named below are defined).

Each mutant is one realistic slip: a file, an exact ``old`` snippet (it must occur exactly
once, so that a refactor makes the runner fail loudly instead of silently testing nothing)
and its ``new`` replacement, and the pytest node ids expected to catch it. The runner copies
the repository's files (tracked and untracked-but-not-ignored, as in the working tree) to a
temporary directory, runs every named test once on the unmutated copy (they must pass,
otherwise a failure would mean nothing), then for each mutant applies its change to the
copy, runs its tests there (cwd and ``PYTHONPATH`` = the copy; a probe plugin checks that
the mutated module was imported from the copy) and restores the file. A mutant is CAUGHT
when one of its tests fails, MISSED when all pass. ``--gate`` also runs the accuracy gate
(``tests/test_accuracy_gate.py``, minutes per run) on the unmutated copy and on each
mutant; it needs the shared data (``FEDCLINIC_SHARED_DATA``, else ``shared/data`` beside the
checkout or beside the main checkout of a git worktree). Exit status 1 when a mutant is
MISSED or a run went wrong, 2 when the unmutated copy fails.

    python tests/mutants.py                    # every mutant, its unit tests (about 10 min)
    python tests/mutants.py --only fedmas-w-hat-is-w
    python tests/mutants.py --issue --gate     # issue 16's seven, with the accuracy gate
    python tests/mutants.py --list             # check every snippet, run nothing
    python tests/mutants.py --markdown         # also the table of docs/testing.md
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fedclinic.bench.quality import SHARED_DATA

ROOT = Path(__file__).resolve().parents[1]
GATE = "tests/test_accuracy_gate.py::test_accuracy_gate"

# the tests each mutant names (function-level node ids: every parametrisation runs)
FH_LARGE = (
    "tests/test_fedhelp_replay.py::test_large_hospital_steps_match_the_dual_distillation_by_hand"
)
FH_SMALL = (
    "tests/test_fedhelp_replay.py::test_small_hospital_steps_match_the_surrogate_training_by_hand"
)
FH_MATH = "tests/test_fedhelp_math.py"
FH_AGGREGATION = "tests/test_fedhelp.py::test_aggregation_mean_or_weighted"
MAS_REPLAY = "tests/test_fedmas_replay.py::test_fedmas_round_matches_the_formulas_by_hand"
MAS_MOMENTUM = "tests/test_fedmas_replay.py::test_optimizer_state_carries_over_to_the_next_round"
MAS_UNIT = "tests/test_fedmas.py"
PF_PHASES = "tests/test_pfednet_replay.py::test_each_phase_trains_only_its_layers_and_uploads_before_minus_after"  # noqa: E501
PF_SHARED = "tests/test_pfednet_replay.py::test_shared_layers_move_by_the_sample_weighted_mean_of_the_updates"  # noqa: E501
PF_BUFFERS = "tests/test_pfednet_replay.py::test_shared_buffers_are_the_sample_weighted_mean_of_the_hospitals_buffers"  # noqa: E501
PF_MATH = "tests/test_pfednet_math.py"
PF_GRAPH = "tests/test_pfednet.py::test_covariance_graph_uses_the_full_matrix_l1_distance"
PF_STEP = (
    "tests/test_pfednet_replay.py::test_without_fusion_each_column_takes_its_own_full_local_step"
)
BSM = "tests/test_balanced_loss.py"
REPLAY_LOOP = "tests/test_training_replay.py::test_local_steps_match_the_objective_by_hand"
AGGREGATION = "tests/test_aggregation.py"
ENGINE_MESSAGES = (
    "tests/test_engine.py::test_every_hospital_gets_its_own_record_and_a_common_one_is_cast_once"
)
PF_PERSONAL_STATE = (
    "tests/test_pfednet.py::test_personal_state_persists_and_is_used_without_a_column"
)


@dataclass(frozen=True)
class Mutant:
    """One slip: ``edits`` (old, new) applied in order to ``path``, each old snippet exactly
    once; ``tests`` are expected to catch it; ``issue`` marks the seven issue 16 lists."""

    name: str
    wording: str
    path: str
    edits: tuple[tuple[str, str], ...]
    tests: tuple[str, ...]
    issue: bool = False

    @property
    def module(self) -> str:
        return self.path.removesuffix(".py").replace("/", ".")

    def apply(self, source: str) -> str:
        for old, new in self.edits:
            count = source.count(old)
            if count != 1:
                raise SystemExit(
                    f"mutant {self.name}: the snippet occurs {count} times in {self.path} "
                    f"(expected once; the code changed, update tests/mutants.py):\n{old}"
                )
            source = source.replace(old, new)
        return source


def one(old: str, new: str) -> tuple[tuple[str, str], ...]:
    """A single (old, new) edit."""
    return ((old, new),)


FEDHELP = "strategies/fedhelp.py"
FEDMAS = "strategies/fedmas.py"
PFEDNET = "strategies/pfednet.py"

MUTANTS: tuple[Mutant, ...] = (
    # ------------------------------------------------------------------ issue 16's seven
    Mutant(
        "fedhelp-forward-kl-reversed",
        "FedHelp with the forward KL reversed: KL(proxy || F) instead of KL(F || proxy)",
        FEDHELP,
        one(
            "kl_divergence(\n"
            "                    teacher, class_log_probs(proxy_logits, temperature), opts.kl_reduction\n"  # noqa: E501
            "                )",
            "kl_divergence(\n"
            "                    class_log_probs(proxy_logits, temperature), teacher, opts.kl_reduction\n"  # noqa: E501
            "                )",
        ),
        (FH_LARGE,),
        issue=True,
    ),
    Mutant(
        "fedhelp-stale-proxy-logits",
        "FedHelp with stale pre-step proxy logits in the backward step",
        FEDHELP,
        (
            (
                "        def forward_kd(x: Tensor, y: Tensor) -> dict[str, Tensor]:",
                "        stale: dict[str, Tensor] = {}\n\n"
                "        def forward_kd(x: Tensor, y: Tensor) -> dict[str, Tensor]:",
            ),
            (
                "                proxy_logits = proxy(x)\n                proxy_ce = task_loss(",
                "                proxy_logits = proxy(x)\n"
                '                stale["proxy"] = proxy_logits.detach()\n'
                "                proxy_ce = task_loss(",
            ),
            (
                "            with torch.no_grad(), loop.autocast():\n"
                "                proxy_logits = proxy(x)\n",
                "            with torch.no_grad(), loop.autocast():\n"
                '                proxy_logits = stale["proxy"]\n',
            ),
        ),
        (FH_LARGE,),
        issue=True,
    ),
    Mutant(
        "fedhelp-rank-detached",
        "FedHelp with the ranking loss cut off from the large model",
        FEDHELP,
        one(
            "rank = ranking_loss(\n                    large_logits, proxy_logits,",
            "rank = ranking_loss(\n                    large_logits.detach(), proxy_logits,",
        ),
        (FH_LARGE,),
        issue=True,
    ),
    Mutant(
        "fedhelp-public-kl-reversed",
        "FedHelp with the public-data KL reversed: KL(student || stored) on the public head",
        FEDHELP,
        one(
            "                        target_log[index].to(device),\n"
            "                        class_log_probs(public_logits, opts.temperature),\n",
            "                        class_log_probs(public_logits, opts.temperature),\n"
            "                        target_log[index].to(device),\n",
        ),
        (FH_SMALL,),
        issue=True,
    ),
    Mutant(
        "fedmas-no-alignment",
        "Fed-MAS with the alignment term removed from the loss",
        FEDMAS,
        one(
            "loss = task + aux + options.align_weight * divergence.mean()",
            "loss = task + aux",
        ),
        (MAS_REPLAY, MAS_MOMENTUM),
        issue=True,
    ),
    Mutant(
        "fedmas-w-hat-is-w",
        "Fed-MAS with w_hat replaced by w in the robust factor",
        FEDMAS,
        one("rf = robust_factor(w, w_hat.values(),", "rf = robust_factor(w, w,"),
        (MAS_REPLAY,),
        issue=True,
    ),
    Mutant(
        "pfednet-shared-unweighted",
        "pFedNet averaging the shared layers without sample weights",
        PFEDNET,
        one(
            "weights = np.array([r.num_train for r, _, _ in decoded])",
            "weights = np.ones(len(decoded))",
        ),
        (PF_SHARED,),
        issue=True,
    ),
    # ------------------------------------------------------------------ FedHelp, similar
    Mutant(
        "fedhelp-backward-kl-reversed",
        "backward KL with its arguments swapped: KL(proxy || F)",
        FEDHELP,
        one(
            "                    class_log_probs(large_logits, temperature),\n"
            "                    class_log_probs(proxy_logits, temperature),\n",
            "                    class_log_probs(proxy_logits, temperature),\n"
            "                    class_log_probs(large_logits, temperature),\n",
        ),
        (FH_LARGE,),
    ),
    Mutant(
        "fedhelp-backward-kl-detached",
        "backward KL detached from the large model (its gradient reaches F through the "
        "teacher side)",
        FEDHELP,
        one(
            "                    class_log_probs(large_logits, temperature),\n",
            "                    class_log_probs(large_logits.detach(), temperature),\n",
        ),
        (FH_LARGE,),
    ),
    Mutant(
        "fedhelp-forward-kl-detached",
        "forward KL detached from the proxy (the distillation term sends no gradient)",
        FEDHELP,
        one(
            "teacher, class_log_probs(proxy_logits, temperature)",
            "teacher, class_log_probs(proxy_logits.detach(), temperature)",
        ),
        (FH_LARGE,),
    ),
    Mutant(
        "fedhelp-temperature-not-applied",
        "the KD temperature not applied to the logits (log softmax of z, not z / T)",
        "strategies/fedhelp_math.py",
        one(
            "F.log_softmax(as_class_logits(logits).float() / temperature, dim=1)",
            "F.log_softmax(as_class_logits(logits).float(), dim=1)",
        ),
        (FH_LARGE, FH_SMALL),
    ),
    Mutant(
        "fedhelp-teacher-temperature-twice",
        "the large model's logits divided by T twice in the forward KD",
        FEDHELP,
        one(
            "teacher = class_log_probs(large(x), temperature)",
            "teacher = class_log_probs(large(x) / temperature, temperature)",
        ),
        (FH_LARGE,),
    ),
    Mutant(
        "fedhelp-public-target-untempered",
        "the stored public probabilities used at T = 1 while the student is at T",
        FEDHELP,
        one(
            "targets = temper_probabilities(shared.knowledge.probabilities, opts.temperature)",
            "targets = shared.knowledge.probabilities",
        ),
        (FH_SMALL,),
    ),
    Mutant(
        "fedhelp-kd-weights-swapped",
        "the proxy's KL weighted by the backward weight",
        FEDHELP,
        one(
            "proxy_loss = proxy_ce + opts.forward_kd_weight * forward_kl",
            "proxy_loss = proxy_ce + opts.backward_kd_weight * forward_kl",
        ),
        (FH_LARGE,),
    ),
    Mutant(
        "fedhelp-public-weight-on-kl-only",
        "the public weight applied to the KL only, not to the public CE",
        FEDHELP,
        one(
            "public_loss = opts.public_weight * (public_kl + public_ce)",
            "public_loss = opts.public_weight * public_kl + public_ce",
        ),
        (FH_SMALL,),
    ),
    Mutant(
        "fedhelp-rank-hinge-reversed",
        "the reference's ranking hinge max(0, zL_a - zL_b), which lowers the top-k (FH-8)",
        "strategies/fedhelp_math.py",
        one(
            "hinge = F.relu(margin - gaps)",
            "hinge = F.relu(gaps - margin)",
        ),
        (FH_MATH, FH_LARGE),
    ),
    Mutant(
        "fedhelp-aggregation-mode-inverted",
        "FedHelp's server weights by size under 'mean' and equally under 'weighted'",
        FEDHELP,
        one(
            'if self.options.aggregation == "weighted":',
            'if self.options.aggregation != "weighted":',
        ),
        (FH_AGGREGATION,),
    ),
    Mutant(
        "fedhelp-uploads-public-head",
        "the surrogate uploaded with its public head in the classifier slot (FH-6)",
        FEDHELP,
        one("set_module(phi, head_name, private)", "set_module(phi, head_name, public)"),
        (FH_SMALL,),
    ),
    Mutant(
        "fedhelp-rank-own-topk",
        "the ranking loss on the large model's own top-k instead of the proxy's",
        "strategies/fedhelp_math.py",
        one("top = proxy.topk(k, dim=1).indices", "top = large.topk(k, dim=1).indices"),
        (FH_MATH, FH_LARGE),
    ),
    Mutant(
        "fedhelp-roles-smallest-large",
        "the smallest hospitals ranked large",
        "strategies/fedhelp_math.py",
        one(
            "key=lambda e: (-e.num_train, e.hospital)",
            "key=lambda e: (e.num_train, e.hospital)",
        ),
        (FH_MATH,),
    ),
    # ------------------------------------------------------------------ balanced softmax
    Mutant(
        "bsm-prior-sign",
        "balanced softmax with the prior's sign wrong: z - log pi",
        "strategies/balanced_loss.py",
        one(
            "    return logits.float() + log_prior\n",
            "    return logits.float() - log_prior\n",
        ),
        (BSM, FH_LARGE, PF_PHASES),
    ),
    Mutant(
        "bsm-binary-logit-sign",
        "balanced softmax on one binary logit shifted by log pi_0 - log pi_1",
        "strategies/balanced_loss.py",
        one(
            "logits.float() + (log_prior[1] - log_prior[0])",
            "logits.float() + (log_prior[0] - log_prior[1])",
        ),
        (BSM,),
    ),
    Mutant(
        "fedmas-bsm-sign",
        "Fed-MAS's balanced softmax with the prior's sign wrong",
        "strategies/fedmas_math.py",
        one(
            "F.cross_entropy(logits.float() + log_prior.to(logits.device), labels)",
            "F.cross_entropy(logits.float() - log_prior.to(logits.device), labels)",
        ),
        (MAS_UNIT, MAS_REPLAY),
    ),
    # ------------------------------------------------------------------ Fed-MAS, similar
    Mutant(
        "fedmas-rf-inverse-flag-flipped",
        "the robust factor inverted (1/w_hat) under 'mas' and plain under 'mas_inv'",
        FEDMAS,
        one(
            'inverse=options.aggregation == "mas_inv"',
            'inverse=options.aggregation != "mas_inv"',
        ),
        (MAS_REPLAY,),
    ),
    Mutant(
        "fedmas-rf-unnormalised",
        "the robust factor of the raw divergences, not of their shares",
        "strategies/fedmas_math.py",
        one(
            "np.sum((global_w[measured] / total_global) * (local_w[measured] / total_local))",
            "np.sum(global_w[measured] * local_w[measured])",
        ),
        (MAS_UNIT, MAS_REPLAY),
    ),
    Mutant(
        "fedmas-aux-head-dropped",
        "Fed-MAS without the auxiliary head's loss",
        FEDMAS,
        one(
            "loss = task + aux + options.align_weight",
            "loss = task + options.align_weight",
        ),
        (MAS_REPLAY, MAS_MOMENTUM),
    ),
    Mutant(
        "fedmas-measure-in-train-mode",
        "w measured with the received model in train mode (BatchNorm batch statistics)",
        FEDMAS,
        one(
            "    model.eval()\n    prior.eval()\n",
            "    model.train()\n    prior.eval()\n",
        ),
        (MAS_UNIT, MAS_REPLAY),
    ),
    Mutant(
        "fedmas-divergence-not-class-mean",
        "w_c summed over a class instead of averaged (no division by n_c)",
        "strategies/fedmas_math.py",
        one(
            "self.total[present] += sums[present] / self.counts[present]",
            "self.total[present] += sums[present]",
        ),
        (MAS_UNIT, MAS_REPLAY),
    ),
    Mutant(
        "fedmas-server-fedavg-weights",
        "the server's 'mas' rule returning FedAvg weights instead of RF_k / sum RF",
        "strategies/fedmas_math.py",
        one(
            "return [r / total for r in rf], method",
            "return fedavg_weights(num_samples), method",
        ),
        (MAS_UNIT,),
    ),
    Mutant(
        "fedmas-no-grad-clip",
        "Fed-MAS's gradient clipping (grad-clip-norm) not passed to the optimiser step",
        FEDMAS,
        one(
            "else loop.updater(model.parameters(), settings, options.grad_clip_norm)",
            "else loop.updater(model.parameters(), settings)",
        ),
        (MAS_REPLAY,),
    ),
    Mutant(
        "fedmas-optimizer-not-restored",
        "the optimiser state kept at the site reported restored but never loaded",
        FEDMAS,
        one("and updater.restore(site.load(state_name))", "and site.has(state_name)"),
        (MAS_MOMENTUM,),
    ),
    Mutant(
        "fedmas-alignment-prior-unnormalised",
        "the alignment term with the prior's features not l2-normalised",
        "strategies/fedmas_math.py",
        one(
            "f = F.normalize(prior_features.float(), dim=-1, p=2)",
            "f = prior_features.float()",
        ),
        (MAS_UNIT, MAS_REPLAY),
    ),
    # ------------------------------------------------------------------ pFedNet, similar
    Mutant(
        "pfednet-shared-step-sign",
        "the shared layers moved up the averaged pseudo-gradient: x + step",
        PFEDNET,
        one(
            "x = self.split.flatten(self.state, self.split.shared) - step",
            "x = self.split.flatten(self.state, self.split.shared) + step",
        ),
        (PF_SHARED,),
    ),
    Mutant(
        "pfednet-personal-delta-reversed",
        "the personal upload after - before instead of G = z(before) - z(after)",
        PFEDNET,
        one(
            "delta = split.flatten(state, split.personal) - split.flatten(after, split.personal)",
            "delta = split.flatten(after, split.personal) - split.flatten(state, split.personal)",
        ),
        (PF_PHASES,),
    ),
    Mutant(
        "pfednet-admm-gradient-unscaled",
        "the server's ADMM anchor Z_t - eta G instead of Z_t - eta G / N",
        "strategies/pfednet_math.py",
        one(
            "anchor = z_t - eta * g / n",
            "anchor = z_t - eta * g",
        ),
        (PF_MATH,),
    ),
    Mutant(
        "pfednet-knn-mutual",
        "the similarity graph of mutual nearest neighbours (and) instead of symmetrised (or)",
        "strategies/pfednet_math.py",
        one(
            "symmetric = adjacency | adjacency.T",
            "symmetric = adjacency & adjacency.T",
        ),
        (PF_MATH,),
    ),
    Mutant(
        "pfednet-covariance-unweighted",
        "the similarity distance on covariance triangles without the off-diagonal weights",
        PFEDNET,
        one(
            'pm.pairwise_distances(matrix, "l1", pm.triangle_weights(matrix.shape[1]))',
            'pm.pairwise_distances(matrix, "l1")',
        ),
        (PF_GRAPH,),
    ),
    Mutant(
        "pfednet-step-size-default",
        "PF-2's default eta = 1 instead of N (keeps 1/N of the local step)",
        PFEDNET,
        one(
            "return self.options.server_step_size or float(n)",
            "return self.options.server_step_size or 1.0",
        ),
        (PF_STEP,),
    ),
    Mutant(
        "pfednet-buffers-unweighted",
        "pFedNet averaging the shared buffers (BatchNorm statistics) without sample weights",
        PFEDNET,
        one(
            "self.state.update(weighted_average(buffers, list(weights)))",
            "self.state.update(weighted_average(buffers, [1.0] * len(buffers)))",
        ),
        (PF_BUFFERS, PF_SHARED),
    ),
    Mutant(
        "pfednet-personal-phase-trains-shared",
        "the personal phase training the shared layers",
        PFEDNET,
        one(
            'self._train(state, split.personal, "personal")',
            'self._train(state, split.shared, "personal")',
        ),
        (PF_PHASES,),
    ),
    # ------------------------------------------------------------------ FedAvg, FedProx
    Mutant(
        "fedavg-unweighted",
        "FedAvg's server averaging without sample weights",
        "strategies/fedavg.py",
        one(
            "weights = [r.num_train for r in replies]",
            "weights = [1.0 for r in replies]",
        ),
        (AGGREGATION,),
    ),
    Mutant(
        "weighted-average-ignores-weights",
        "the shared weighted average dividing by the number of states",
        "strategies/fedavg.py",
        one(
            "accumulator += (weight / total) * state[key]",
            "accumulator += (1 / len(states)) * state[key]",
        ),
        (AGGREGATION,),
    ),
    Mutant(
        "fedprox-no-proximal-term",
        "FedProx with the proximal term dropped",
        "strategies/fedprox.py",
        one(
            "return proximal_term(model, self.anchor, mu)",
            "return None",
        ),
        (REPLAY_LOOP,),
    ),
    Mutant(
        "fedprox-wrong-sign",
        "FedProx pushing away from the global model: -(mu/2)||w - w_t||^2",
        "strategies/fedprox.py",
        one(
            "return 0.5 * mu * torch.stack(squared).sum()",
            "return -0.5 * mu * torch.stack(squared).sum()",
        ),
        (AGGREGATION, REPLAY_LOOP),
    ),
    Mutant(
        "fedprox-mu-not-halved",
        "FedProx's term mu ||w - w_t||^2 (the 1/2 lost)",
        "strategies/fedprox.py",
        one(
            "return 0.5 * mu * torch.stack(squared).sum()",
            "return mu * torch.stack(squared).sum()",
        ),
        (AGGREGATION, REPLAY_LOOP),
    ),
    Mutant(
        "weighted-average-truncates-integers",
        "integer buffers (num_batches_tracked) truncated instead of rounded in the average",
        "strategies/fedavg.py",
        one(
            "averaged[key] = np.rint(accumulator).astype(first.dtype)",
            "averaged[key] = accumulator.astype(first.dtype)",
        ),
        (AGGREGATION,),
    ),
    Mutant(
        "loop-no-zero-grad",
        "the shared local step without zero_grad: gradients accumulate across steps",
        "fedclinic/training.py",
        one(
            "        self.optimizer.zero_grad(set_to_none=True)\n"
            "        self.scaler.scale(loss).backward()\n",
            "        self.scaler.scale(loss).backward()\n",
        ),
        (REPLAY_LOOP, FH_SMALL),
    ),
    Mutant(
        "engine-messages-by-id",
        "the round engine casting one wire record per id(record): a freed per-hospital record's"
        " id is handed on, and a hospital gets another's message (the accuracy gate's flake)",
        "fedclinic/engine/rounds.py",
        one(
            "            if record is not arrays:\n"
            "                wire = packed(to_wire(record, self.run.wire_dtype))\n"
            "            elif common is not None:\n"
            "                wire = common\n"
            "            else:\n"
            "                wire = common = packed(to_wire(arrays, self.run.wire_dtype))\n",
            "            if id(record) not in by_id:\n"
            "                by_id[id(record)] = packed(to_wire(record, self.run.wire_dtype))\n"
            "            wire = by_id[id(record)]\n",
        )
        + one(
            "        common: ArrayRecord | None = None\n",
            "        common: ArrayRecord | None = None\n"
            "        by_id: dict[int, ArrayRecord] = {}\n",
        ),
        (ENGINE_MESSAGES,),
    ),
    Mutant(
        "pfednet-takes-another-column",
        "a pFedNet hospital handed another hospital's column falling back to its stored one"
        " instead of refusing the message",
        PFEDNET,
        one(
            "        if column_of is not None and column_of != name:",
            "        if False:",
        ),
        (PF_PERSONAL_STATE,),
    ),
)


# ------------------------------------------------------------------------------ running

#: a pytest plugin loaded in the copy: records failing and skipped node ids, and where the
#: mutated modules were imported from (the check that the mutant is what ran)
PROBE = """
import json, os, sys

_seen = {"failed": [], "skipped": [], "passed": 0}


def pytest_runtest_logreport(report):
    if report.failed and report.nodeid not in _seen["failed"]:
        _seen["failed"].append(report.nodeid)
    elif report.skipped:
        _seen["skipped"].append(report.nodeid)
    elif report.passed and report.when == "call":
        _seen["passed"] += 1


def pytest_sessionfinish(session, exitstatus):
    names = [n for n in os.environ.get("MUTANT_MODULES", "").split(",") if n]
    _seen["modules"] = {n: getattr(sys.modules.get(n), "__file__", None) for n in names}
    with open(os.environ["MUTANT_PROBE_OUT"], "w", encoding="utf-8") as handle:
        json.dump(_seen, handle)
"""


@dataclass
class Outcome:
    """One pytest run: exit code, failing and skipped node ids, the output's tail."""

    returncode: int
    failed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    passed: int = 0
    modules: dict[str, str | None] = field(default_factory=dict)
    output: str = ""
    seconds: float = 0.0


def shared_data() -> Path | None:
    """The gate's data: the project's own lookup (``FEDCLINIC_SHARED_DATA``, else
    ``shared/data`` beside this checkout), else beside the main checkout of this git worktree;
    the temporary copy is handed it explicitly (it has no ``shared/data`` beside it)."""
    candidates = [SHARED_DATA]
    common = subprocess.run(
        ["git", "rev-parse", "--path-format=absolute", "--git-common-dir"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if common.returncode == 0:
        candidates.append(Path(common.stdout.strip()).parent.parent / "shared" / "data")
    return next((c for c in candidates if c.is_dir()), None)


def copy_repository(target: Path) -> None:
    """The working tree's tracked and untracked-but-not-ignored files, as they are now."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in sorted(set(filter(None, listed.split("\0")))):
        source = ROOT / name
        if source.is_file():  # deleted but still tracked: skipped
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)


def run_pytest(
    copy: Path, probe: Path, tests: Sequence[str], modules: Sequence[str], timeout: float
) -> Outcome:
    """``python -m pytest TESTS`` in the copy (one process, no xdist, no bytecode written, so
    that a restored file is never shadowed by a mutant's cached bytecode)."""
    report = probe / "report.json"
    report.unlink(missing_ok=True)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(copy), str(probe)]),
        "PYTHONDONTWRITEBYTECODE": "1",
        "MUTANT_PROBE_OUT": str(report),
        "MUTANT_MODULES": ",".join(modules),
    }
    data = shared_data()
    if data is not None:
        env["FEDCLINIC_SHARED_DATA"] = str(data)
    command = [
        sys.executable, "-m", "pytest", "-p", "no:xdist", "-p", "no:cacheprovider",
        "-p", "_mutant_probe", "-q", "--tb=line", "-rfE", *tests,
    ]  # fmt: skip
    started = time.perf_counter()
    try:
        done = subprocess.run(
            command, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout
        )
        returncode, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as err:
        returncode, output = -1, f"timed out after {timeout:.0f} s: {err}"
    outcome = Outcome(returncode, output=output, seconds=time.perf_counter() - started)
    if report.is_file():
        seen = json.loads(report.read_text(encoding="utf-8"))
        outcome.failed, outcome.skipped = seen["failed"], seen["skipped"]
        outcome.passed, outcome.modules = seen["passed"], seen["modules"]
    return outcome


def imported_from_copy(outcome: Outcome, copy: Path, mutant: Mutant) -> str | None:
    """None when the run imported the mutated module from the copy, else what went wrong."""
    where = outcome.modules.get(mutant.module)
    if where is None:
        return f"the tests never imported {mutant.module}"
    if Path(where).resolve() != (copy / mutant.path).resolve():
        return f"{mutant.module} was imported from {where}, not from the copy"
    return None


#: a row of the gate's table: ``case method client-avg metric value floor pass|FAIL``
GATE_ROW = re.compile(
    r"^(\S+)\s+(\S+)\s+client-avg (.+?)\s+(\S+)\s+(\S+)\s+(pass|FAIL)\s*$", re.MULTILINE
)


def gate_scores(output: str) -> dict[str, tuple[float, bool]]:
    """The gate's rows as ``{"case method metric": (value, passed)}``."""
    return {
        f"{case} {method} {metric}": (float(value), verdict == "pass")
        for case, method, metric, value, _, verdict in GATE_ROW.findall(output)
    }


def gate_verdict(scores: dict[str, tuple[float, bool]], baseline: dict[str, float]) -> str:
    """CAUGHT with the rows below their floor, else MISSED; either way the scores that moved
    from the unmutated copy's (by 0.001 or more)."""
    moved = [
        f"{row} {baseline[row]:.3f} -> {value:.3f}"
        for row, (value, _) in scores.items()
        if row in baseline and not abs(value - baseline[row]) < 0.001
    ]
    failed = [row for row, (_, passed) in scores.items() if not passed]
    head = f"CAUGHT (below the floor: {'; '.join(failed)})" if failed else "MISSED"
    return f"{head}; moved: {'; '.join(moved)}" if moved else f"{head}; no score moved"


@dataclass
class Verdict:
    mutant: Mutant
    status: str  # CAUGHT, MISSED or ERROR
    caught_by: list[str]
    detail: str = ""
    gate: str = "-"  # "-" (not run), else gate_verdict's CAUGHT/MISSED line, or ERROR


def short(nodeid: str) -> str:
    return nodeid.removeprefix("tests/")


def run_mutant(
    mutant: Mutant, copy: Path, probe: Path, gate: dict[str, float] | None, timeout: float
) -> Verdict:
    """The mutant's tests (and with ``gate``, the unmutated copy's gate scores, the gate) on
    the copy with the mutant applied; the file is restored afterwards."""
    target = copy / mutant.path
    original = target.read_text(encoding="utf-8")
    target.write_text(mutant.apply(original), encoding="utf-8")
    try:
        outcome = run_pytest(copy, probe, mutant.tests, [mutant.module], timeout)
        wrong = imported_from_copy(outcome, copy, mutant)
        if outcome.returncode not in (0, 1) or wrong:
            tail = "\n".join(outcome.output.strip().splitlines()[-15:])
            verdict = Verdict(mutant, "ERROR", outcome.failed, wrong or tail)
        elif outcome.failed:
            verdict = Verdict(mutant, "CAUGHT", outcome.failed)
        else:
            detail = f"{outcome.passed} passed, {len(outcome.skipped)} skipped"
            verdict = Verdict(mutant, "MISSED", [], detail)
        print(
            f"  {verdict.status:<6} {mutant.name} ({outcome.seconds:.0f} s): "
            + (", ".join(short(n) for n in verdict.caught_by) or verdict.detail),
            flush=True,
        )
        if gate is not None:
            gated = run_pytest(copy, probe, [GATE], [mutant.module], 3 * 3600)
            wrong = imported_from_copy(gated, copy, mutant)
            scores = gate_scores(gated.output)
            if gated.returncode not in (0, 1) or wrong or gated.skipped or not scores:
                problem = wrong or f"rc {gated.returncode}, skipped {gated.skipped}"
                verdict.gate = f"ERROR {problem}"
            else:
                verdict.gate = gate_verdict(scores, gate)
            print(f"         gate ({gated.seconds:.0f} s): {verdict.gate}", flush=True)
    finally:
        target.write_text(original, encoding="utf-8")
    return verdict


def print_table(verdicts: Sequence[Verdict], gate: bool) -> None:
    print()
    print(f"{'mutant':<36} {'issue':<5} {'verdict':<7} caught by" + ("  | gate" if gate else ""))
    for v in verdicts:
        caught = ", ".join(short(n) for n in v.caught_by) or v.detail
        line = f"{v.mutant.name:<36} {'yes' if v.mutant.issue else '':<5} {v.status:<7} {caught}"
        print(line + (f"  | gate: {v.gate}" if gate else ""))
    counts = {s: sum(v.status == s for v in verdicts) for s in ("CAUGHT", "MISSED", "ERROR")}
    print(", ".join(f"{n} {s}" for s, n in counts.items()) + f" of {len(verdicts)} mutants")


def print_markdown(verdicts: Sequence[Verdict], gate: bool) -> None:
    """The table of docs/testing.md: test functions (parametrisations merged) per mutant."""
    print()
    print("| mutant | the slip | failing tests |" + (" gate |" if gate else ""))
    print("|---|---|---|" + ("---|" if gate else ""))
    for v in verdicts:
        functions = dict.fromkeys(short(n).split("[")[0] for n in v.caught_by)
        caught = ", ".join(f"`{f}`" for f in functions) or v.status
        issue = " (issue 16)" if v.mutant.issue else ""
        wording = v.mutant.wording.replace("|", "\\|")  # a pipe would end the cell
        line = f"| `{v.mutant.name}`{issue} | {wording} | {caught} |"
        print(line + (f" {v.gate} |" if gate else ""))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    names = [m.name for m in MUTANTS]
    parser.add_argument("--only", action="append", choices=names, metavar="NAME",
                        help="run this mutant only (repeatable)")  # fmt: skip
    parser.add_argument("--issue", action="store_true", help="only issue 16's seven mutants")
    parser.add_argument("--gate", action="store_true", help="also run the accuracy gate")
    parser.add_argument("--list", action="store_true", help="check the snippets, run nothing")
    parser.add_argument("--markdown", action="store_true", help="also print a Markdown table")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per pytest run")
    args = parser.parse_args(argv)
    chosen = [
        m for m in MUTANTS if (not args.only or m.name in args.only) and (m.issue or not args.issue)
    ]
    for mutant in chosen:  # every snippet occurs exactly once, before anything runs
        mutant.apply((ROOT / mutant.path).read_text(encoding="utf-8"))
    if args.list:
        for m in chosen:
            print(f"{m.name:<36} {'issue' if m.issue else '':<5} {m.path}: {m.wording}")
            print(f"{'':<42}tests: {', '.join(short(t) for t in m.tests)}")
        return 0
    if args.gate and shared_data() is None:
        print("--gate: the shared data are not found (set FEDCLINIC_SHARED_DATA)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="fedclinic-mutants-") as scratch:
        copy, probe = Path(scratch) / "repo", Path(scratch) / "probe"
        probe.mkdir()
        (probe / "_mutant_probe.py").write_text(PROBE, encoding="utf-8")
        copy_repository(copy)
        tests = list(dict.fromkeys(t for m in chosen for t in m.tests))
        modules = sorted({m.module for m in chosen})
        print(f"unmutated copy {copy}: {len(tests)} test targets", flush=True)
        baseline = run_pytest(copy, probe, tests, modules, args.timeout)
        elsewhere = {n: f for n, f in baseline.modules.items() if not f or scratch not in f}
        if baseline.returncode != 0 or elsewhere:
            print(baseline.output[-4000:])
            print(f"the unmutated copy fails (rc {baseline.returncode}) or imports {elsewhere}")
            return 2
        print(
            f"  passed: {baseline.passed} tests in {baseline.seconds:.0f} s"
            + (f"; skipped {', '.join(baseline.skipped)}" if baseline.skipped else ""),
            flush=True,
        )
        gate: dict[str, float] | None = None
        if args.gate:
            gated = run_pytest(copy, probe, [GATE], [], 3 * 3600)
            scores = gate_scores(gated.output)
            print("\n".join(f"  gate {row}: {value:.3f}" for row, (value, _) in scores.items()))
            if gated.returncode != 0 or gated.skipped or not scores:
                print(gated.output[-2500:])
                print(f"the accuracy gate fails on the unmutated copy (rc {gated.returncode})")
                return 2
            gate = {row: value for row, (value, _) in scores.items()}
            print(f"  gate passed on the unmutated copy in {gated.seconds:.0f} s", flush=True)
        verdicts = [run_mutant(m, copy, probe, gate, args.timeout) for m in chosen]
    print_table(verdicts, args.gate)
    if args.markdown:
        print_markdown(verdicts, args.gate)
    return 0 if all(v.status == "CAUGHT" for v in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
