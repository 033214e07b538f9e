"""FedHelp's local steps replayed by hand (docs/fedhelp.md; arXiv 2412.19654, modules 3.3-3.4).

Each test trains one hospital with the code, then repeats the same full-batch SGD steps from
the formulas (``tests/by_hand.py``) and compares every weight. Three classes and a
temperature other than 1 make every KL asymmetric and every temperature visible, so a
reversed KL, a KL whose teacher is computed before the proxy's step, a detached ranking
loss, a dropped CE, a missing ``T`` or another KL reduction each move the weights elsewhere.
Imbalanced classes (0.6, 0.3, 0.1) make the balanced softmax (the default ``local-loss``)
differ from plain CE, so a missing or misapplied prior shift (on the public CE, say) shows too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from by_hand import (
    assert_same_update,
    clone_state,
    full_batch_run,
    hospital_context,
    kl,
    kl_to_probabilities,
    ranking,
    sgd_step,
    supervised,
)
from torch import nn

from fedclinic.config import RunConfig
from fedclinic.knowledge import build_knowledge, write_synthetic_public
from fedclinic.models import SmallCNN, build_model
from strategies.fedhelp import HEADS, LARGE_MODEL, ROLE_KEY, FedHelpObjective

torch.set_num_threads(1)

LR = 0.2
CLASSES = 3


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Labelled public data (3 classes) and a knowledge file from known logits."""
    folder = tmp_path_factory.mktemp("replay")
    public = write_synthetic_public(folder / "public.npz", 24, CLASSES, seed=1000)
    logits = np.random.default_rng(1).normal(scale=2.0, size=(24, CLASSES))
    np.save(folder / "api.npy", logits)
    digest, _ = build_knowledge(public, folder / "knowledge.npz", logits_file=folder / "api.npy")
    with np.load(public) as archive:
        labels = torch.from_numpy(archive["train_labels"][:, 0].astype(np.int64))
        images = torch.from_numpy(archive["train_images"].astype(np.float32) / 255.0)[:, None]
    return {
        "public": public,
        "knowledge": folder / "knowledge.npz",
        "sha": digest,
        "logits": torch.from_numpy(logits).float(),
        "labels": labels,
        "images": images,
    }


def make_run(shared: dict[str, Any], **options: Any) -> RunConfig:
    extra = {f"fedhelp.{k}": v for k, v in options.items()}
    return full_batch_run(
        "fedhelp",
        LR,
        **{
            "local-steps": 2,
            "fedhelp.large-model": "wide-cnn",
            "fedhelp.knowledge-sha256": shared["sha"],
            **extra,
        },
    )


def make_objective(
    run: RunConfig, shared: dict[str, Any], tmp_path: Path, role: str
) -> FedHelpObjective:
    context = hospital_context(
        run,
        tmp_path,
        {"server-round": 1, ROLE_KEY: role},
        state_dir=str(tmp_path),
        public_data_path=str(shared["public"]),
        knowledge_path=str(shared["knowledge"]),
    )
    return FedHelpObjective(context)


def received_model(run: RunConfig) -> nn.Module:
    return build_model(run, seed=5)


# ------------------------------------------------------------------------------ large hospital

LARGE_CASES = {
    "T=2, batchmean KL, summed ranking with a margin": {
        "temperature": 2.0,
        "rank-margin": 1.0,
        "rank-weight": 0.5,
        "local-loss": "ce",
    },
    "T=0.5, KL over B*C, mean ranking, top-2": {
        "temperature": 0.5,
        "kl-reduction": "mean",
        "rank-reduction": "mean",
        "rank-k": 2,
        "rank-margin": 2.0,
        "forward-kd-weight": 2.0,
        "backward-kd-weight": 3.0,
        "local-loss": "bsm",
    },
}


@pytest.mark.parametrize("case", list(LARGE_CASES))
def test_large_hospital_steps_match_the_dual_distillation_by_hand(
    case: str, shared: dict[str, Any], tmp_path: Path
) -> None:
    """3a: CE + w_f KL(F || proxy) on the proxy, F frozen; 3b: CE + w_b KL(F || proxy') +
    beta L_rank on F, with the proxy's logits recomputed after its step (proxy')."""
    options = LARGE_CASES[case]
    run = make_run(shared, **options)
    opts = run.algorithm_options()
    objective = make_objective(run, shared, tmp_path, "large")
    proxy = received_model(run)
    large = objective.large_model()  # the seeded initial large model (no site state yet)
    proxy_before, large_before = clone_state(proxy), clone_state(large)

    update = objective.fit(proxy_before)

    x, y = objective.context.data.train.inputs, objective.context.data.train.labels
    t = opts.temperature
    sums = {"proxy_ce": 0.0, "forward_kl": 0.0, "large_ce": 0.0, "backward_kl": 0.0, "rank": 0.0}
    for _ in range(run.local_steps):
        with torch.no_grad():
            teacher = large(x)
        student = proxy(x)
        proxy_ce = supervised(opts.local_loss, student, y)
        forward = kl(teacher, student, t, opts.kl_reduction)
        sgd_step(proxy.parameters(), proxy_ce + opts.forward_kd_weight * forward, LR)
        with torch.no_grad():
            after_step = proxy(x)  # recomputed: the proxy has just moved
        logits = large(x)
        large_ce = supervised(opts.local_loss, logits, y)
        backward = kl(logits, after_step, t, opts.kl_reduction)  # gradient through F's side
        rank = ranking(logits, after_step, opts.rank_k, opts.rank_margin, opts.rank_reduction)
        loss = large_ce + opts.backward_kd_weight * backward + opts.rank_weight * rank
        sgd_step(large.parameters(), loss, LR)
        for name, value in zip(sums, (proxy_ce, forward, large_ce, backward, rank), strict=True):
            sums[name] += float(value.detach()) / run.local_steps

    assert_same_update(proxy_before, update.state, clone_state(proxy))
    stored = objective.context.site.load(LARGE_MODEL)
    assert_same_update(large_before, stored, clone_state(large))
    reported = {
        "proxy_ce": update.metrics["train_proxy_ce"],
        "forward_kl": update.metrics["train_forward_kl"],
        "large_ce": update.metrics["train_large_ce"],
        "backward_kl": update.metrics["train_backward_kl"],
        "rank": update.metrics["train_rank_loss"],
    }
    assert reported == pytest.approx(sums, rel=1e-4)
    assert sums["rank"] > 0 and sums["forward_kl"] > 0  # every term was active


# ------------------------------------------------------------------------------ small hospital


def spy_on_heads(objective: FedHelpObjective) -> dict[str, nn.Module]:
    """Keep a copy of the heads the objective draws this round (fresh ones are random)."""
    drawn: dict[str, nn.Module] = {}
    original = objective.heads

    def heads(global_head: nn.Module, public_classes: int) -> tuple[nn.Module, nn.Module]:
        private, public = original(global_head, public_classes)
        drawn["private"] = _copy_linear(private)
        drawn["public"] = _copy_linear(public)
        return private, public

    objective.heads = heads  # type: ignore[method-assign]
    return drawn


def _copy_linear(head: nn.Module) -> nn.Module:
    assert isinstance(head, nn.Linear)
    copy = nn.Linear(head.in_features, head.out_features)
    copy.load_state_dict(clone_state(head))
    return copy


SMALL_CASES = {
    "T=2, public CE on, weight 1.5, heads kept": {
        "temperature": 2.0,
        "public-weight": 1.5,
        "head-init": "kept",
        "local-loss": "bsm",
    },
    "T=0.5, KL over B*C, no public CE": {
        "temperature": 0.5,
        "kl-reduction": "mean",
        "public-ce": False,
        "local-loss": "ce",
    },
}


@pytest.mark.parametrize("case", list(SMALL_CASES))
def test_small_hospital_steps_match_the_surrogate_training_by_hand(
    case: str, shared: dict[str, Any], tmp_path: Path
) -> None:
    """(i) CE(h_priv(phi(x)), y) on (phi, h_priv); (ii) w_pub [KL(softmax(s/T) ||
    softmax(h_pub(phi(x_p))/T)) + CE(h_pub(phi(x_p)), y_p)] on (phi, h_pub), phi shared;
    the upload is phi with the private head as the classifier."""
    options = SMALL_CASES[case]
    run = make_run(shared, **options)
    opts = run.algorithm_options()
    objective = make_objective(run, shared, tmp_path, "small")
    drawn = spy_on_heads(objective)
    received = received_model(run)
    before = clone_state(received)

    update = objective.fit(before)
    drawn_before = {
        **{f"private.{k}": v for k, v in clone_state(drawn["private"]).items()},
        **{f"public.{k}": v for k, v in clone_state(drawn["public"]).items()},
    }

    assert isinstance(received, SmallCNN)
    phi, private, public = received.features, drawn["private"], drawn["public"]
    x, y = objective.context.data.train.inputs, objective.context.data.train.labels
    x_public, y_public = shared["images"], shared["labels"]
    target = F.softmax(shared["logits"] / opts.temperature, dim=1)  # softmax(s / T)
    t = opts.temperature
    kls = []
    for _ in range(run.local_steps):
        private_loss = supervised(opts.local_loss, private(phi(x)), y)
        sgd_step([*phi.parameters(), *private.parameters()], private_loss, LR)
        logits = public(phi(x_public))
        if opts.kl_reduction == "batchmean":
            public_kl = kl_to_probabilities(target, logits / t)
        else:
            public_kl = kl_to_probabilities(target, logits / t) / CLASSES
        public_ce = F.cross_entropy(logits, y_public) if opts.public_ce else 0.0
        public_loss = opts.public_weight * (public_kl + public_ce)
        sgd_step([*phi.parameters(), *public.parameters()], public_loss, LR)
        kls.append(float(public_kl.detach()))

    expected = {f"features.{k}": v for k, v in clone_state(phi).items()}
    expected.update({f"classifier.{k}": v for k, v in clone_state(private).items()})
    assert_same_update(before, update.state, expected)
    if opts.head_init == "kept":  # both heads are stored: the public one trained as replayed
        stored = objective.context.site.load(HEADS)
        heads = {f"private.{k}": v for k, v in clone_state(private).items()}
        heads.update({f"public.{k}": v for k, v in clone_state(public).items()})
        assert_same_update(drawn_before, stored, heads)
    assert update.metrics["train_public_kl"] == pytest.approx(np.mean(kls), rel=1e-4)
