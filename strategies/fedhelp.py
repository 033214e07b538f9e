"""FedHelp (arXiv 2412.19654): asymmetrical reciprocity between large and small hospitals.

Roles. Each hospital is ``large`` (plenty of data and compute) or ``small``: the ``role`` key
of its hospital config when set, otherwise by training-set size, the ``fedhelp.num-large``
largest being large (the reference ranks clients by data size, ``top_n``). The coordinator
learns sizes and configured roles with a one-time QUERY before round 1 and sends each
hospital its own role in its round config (``fedhelp-role``, through the per-hospital
:meth:`~fedclinic.engine.ServerAlgorithm.config_for` hook). Roles are logged, written as
``kind = "fedhelp-role"`` rows and in ``summary.json`` under ``fedhelp``.

Small hospital, per round (arXiv 2412.19654 §3.3): the surrogate is the received global
model's feature extractor phi with a private head (``Linear(d, C)``) and an auxiliary public head
(``Linear(d, C_pub)``). For each private batch (x, y), with one public batch (x_p, s_p) drawn
alongside: (i) one step of ``CE(h_priv(phi(x)), y)`` on (phi, h_priv); (ii) one step of
``w_pub * [KL(temper(s_p, T) || softmax(h_pub(phi(x_p)) / T)) + CE(h_pub(phi(x_p)), y_p)]``
on (phi, h_pub), with two separate optimisers that share phi. The upload is the global
architecture with the private head as its classifier; the public head never leaves the site.

Large hospital, per round (§3.4): a private large model F (``fedhelp.large-model``) that
persists in the site state (``fedhelp_large_model.pt``) and never leaves the site, and a proxy
initialised from the global model. Per batch, in the reference's order: (3a, F frozen, eval
mode) ``CE(proxy(x), y) + w_f * KL(softmax(F(x)/T) || softmax(proxy(x)/T))``, one step on the
proxy; (3b, proxy frozen, eval mode, logits recomputed after its step)
``CE(F(x), y) + w_b * KL(softmax(F(x)/T) || softmax(proxy(x)/T)) + beta * L_rank``, one step on
F; the backward KL's gradient reaches F through its first argument, as in the reference
(which passes F's probabilities as the KL target), pulling F's distribution towards the
proxy's. The large hospital uploads the proxy.

Server (§3.5): the mean of the uploaded global-architecture states (surrogates and
proxies). Evaluation: each hospital reports the model it deploys, its large model at a large
hospital (``deployed = "large"``), the global model at a small one (``"global"``).

Design decisions (IDs defined in docs/fedhelp.md#decisions) implemented here, with what the
reference draft (JackqqWang/medfed_code@1443df74) does instead:

- FH-1: a large hospital uploads its proxy; the reference returns the large model's
  state dict, which cannot be averaged with the small architecture.
- FH-2: the knowledge file may come from a substitute (a teacher trained once on labelled
  public data, ``fedclinic knowledge build --train-teacher``); its meta says so and the
  small hospitals log it. Contract kept: computed once, never updated, outputs only.
- FH-2, no public data at all (a project option beyond the paper): ``fedhelp.knowledge =
  "none"`` drops the one-time knowledge and the public step; small hospitals train phi and
  the private head on their own data only, large hospitals and the server are unchanged.
  For consortia without a shareable public set (tabular clinical data); results are the dual
  distillation alone and must be reported so.
- FH-3: by default (``fedhelp.head-init = "global"``) the private head starts from the
  received global classifier and the public head is kept at the site; ``"fresh"``
  re-initialises both every round, as the reference does, ``"kept"`` keeps both in the site
  state. Under label skew fresh heads make the averaged classifier near random in some
  rounds (docs/fedhelp.md, "Label skew").
- FH-4: targets are stored as probabilities (softmax of raw logits when the knowledge file
  is built); temperature is applied as ``p^(1/T)`` renormalised, which equals
  ``softmax(s/T)``. The reference passes stored vectors to ``KLDivLoss`` as they are.
- FH-5: when the public data carry labels, CE on the public head is added
  (``fedhelp.public-ce``, default true); the reference has the KL term only.
- FH-6: the private head is put back at the model's own classifier (found from the model
  registry's ``head_prefix``: ``classifier`` for cnn, ``fc`` for resnet18,
  ``class_layers.out`` for densenet121); the reference always writes ``.outconv``.
- FH-7: the large model's CE is computed on the recomputed, gradient-carrying logits;
  the reference uses logits from a ``no_grad`` pass, so the term has no gradient.
- FH-8: ranking hinge ``max(0, m - (zL_a - zL_b))`` (m = ``fedhelp.rank-margin``, 0), which
  raises the large model's logits on the proxy's top-k; the reference's
  ``max(0, zL_a - zL_b)`` lowers them.
- FH-9: every large hospital has its own persistent large model in its own site state;
  the reference trains one shared object for all large clients.
- FH-10: unweighted mean as in the reference by default; ``fedhelp.aggregation =
  "weighted"`` weights by training-set size.
- FH-11: segmentation (``task = "segmentation"``) distils per pixel: one-channel (binary)
  outputs as the Bernoulli KL between ``sigmoid(z^L/T)`` and ``sigmoid(z/T)`` (a logit z is
  the two classes ``[0, z]``), multi-class outputs as the softmax KL per pixel; KL and
  ranking are averaged over each image's pixels. The reference's softmax over one channel
  is identically 1, so its KL is zero and its top-1 ranking over one channel empty.
- FH-12: every KL here takes the teacher as log-probabilities and computes
  ``sum p (log p - log q)`` itself, so the target is never misread (the reference's 3-D
  code passes log-probabilities to ``KLDivLoss`` without ``log_target=True``). Segmentation
  here is 2-D.
- FH-13 (baselines) is a matter for experiments; FedAvg/FedProx/local-only are registered.

Differential privacy (``dp = "dp-sgd"``, docs/privacy.md): every step on a hospital's own
data is DP-SGD through the loop's private updaters: the small hospital's private step (phi and
the private head; its public step reads public data only and runs with the per-sample hooks
paused), and at a large hospital both the proxy's (3a) and the large model's (3b) steps, each
on its own Poisson batches, so that its ledger is charged twice the round's steps
(:attr:`FedHelpObjective.private_models`). The large model is then built as Opacus needs it
(GroupNorm with ``privacy-fix-model``).

Segmentation: small = ``unet``, large = ``unet-large`` (``fedhelp.large-model``; the
reference's ``largeUnet`` of 128..2048 channels is not CPU-sized); the task loss is Dice + CE
(the reference: BCE + soft Dice); the surrogate's private head is the UNet's final 1x1
convolution (the reference's ``outconv``) and its public head a 1x1 convolution with one
channel per public class (one for two classes); the knowledge file holds per-pixel
probabilities ``(N_pub, C_pub, H, W)`` and the public labels, when present, are masks.

FH-14: every supervised term on a hospital's own data (the private
step, the proxy's and the large model's CE) is the balanced softmax ``CE(z + log pi, y)`` with
the hospital's class prior (``fedhelp.local-loss = "bsm"``; the reference's plain CE is
``"ce"``), so that models of hospitals with different label mixes fit the same
prior-free target before they are averaged or distilled (:mod:`strategies.balanced_loss`).
FH-15: the ranking loss is averaged over the batch (``fedhelp.rank-reduction = "mean"``; the
reference sums). Project choices beyond the IDs: KL is the per-sample KL
(``fedhelp.kl-reduction = "batchmean"``; ``"mean"`` reproduces the reference's B*C
division); no T^2 factor (T = 1 in
the reference); optimisers are the run's (``optimizer``, ``learning-rate``, ``weight-decay``:
set adam / 0.001 / 0.0001 for the reference's values) and are created afresh every round;
the frozen model of each KD step is in eval mode.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from logging import INFO, WARNING
from typing import Any, Literal

import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.common import log
from pydantic import Field
from torch import Tensor, nn

from fedclinic import messages as keys
from fedclinic.config import RunConfig, Schema
from fedclinic.data.base import Split
from fedclinic.engine import TRAIN, Exchange, Hospital, Reply, ServerAlgorithm, replies_to_numpy
from fedclinic.errors import ConfigError, DataError
from fedclinic.knowledge import (
    NETWORKS,
    SEGMENTATION_NETWORKS,
    SharedKnowledge,
    build_network,
    load_shared_knowledge,
)
from fedclinic.models import MODELS, head_prefix, private_variant
from fedclinic.privacy import check_network
from fedclinic.results import ResultsWriter
from fedclinic.rows import FedHelpAggregateRow, FedHelpRoleRow
from fedclinic.segmentation import output_channels
from fedclinic.serialization import State, numpy_to_record
from fedclinic.tasks import task_of
from fedclinic.training import (
    LocalLoop,
    OptimizerSettings,
    PrivateUpdater,
    StepResult,
    Updater,
    seeded_generator,
    train_local,
)
from strategies.balanced_loss import LocalLoss, Loss, local_loss, uses_prior
from strategies.base import Algorithm, ClientContext, ClientObjective, LocalUpdate
from strategies.fedavg import weighted_average
from strategies.fedhelp_math import (
    RoleEntry,
    assign_roles,
    class_log_probs,
    find_head,
    get_module,
    head_outputs,
    kl_divergence,
    new_head,
    probabilities_log,
    ranking_loss,
    set_module,
    temper_probabilities,
)

ROLE_KEY = keys.FEDHELP_ROLE
LARGE_MODEL = "fedhelp_large_model"
HEADS = "fedhelp_heads"


class FedHelpOptions(Schema):
    num_large: int = Field(
        1, ge=0, description="large hospitals when configs set no role: the N largest by size"
    )
    large_model: Literal[
        "resnet18", "resnet101", "densenet121", "wide-cnn", "cnn", "mlp", "unet", "unet-large"
    ] = Field("resnet18", description="architecture of each large hospital's private model")
    aggregation: Literal["mean", "weighted"] = Field(
        "mean", description="FH-10: unweighted mean (reference) or weighted by training size"
    )
    temperature: float = Field(1.0, gt=0, description="distillation temperature T")
    public_weight: float = Field(1.0, ge=0, description="weight of the public-head loss")
    public_ce: bool = Field(True, description="FH-5: add CE on the public head when labelled")
    public_batch_size: int = Field(0, ge=0, description="public batch; 0 = batch-size")
    head_init: Literal["fresh", "kept", "global"] = Field(
        "global",
        description="FH-3: private head from the global classifier, public head kept (default); "
        "fresh heads each round (reference); or both kept at the site",
    )
    forward_kd_weight: float = Field(1.0, ge=0, description="KL weight, large -> proxy")
    backward_kd_weight: float = Field(1.0, ge=0, description="KL weight, proxy -> large")
    rank_weight: float = Field(0.2, ge=0, description="beta, weight of the ranking loss")
    rank_k: int = Field(1, ge=1, description="top-k classes of the proxy in the ranking loss")
    rank_margin: float = Field(0.0, ge=0, description="hinge margin m (FH-8)")
    rank_reduction: Literal["sum", "mean"] = Field(
        "mean", description="ranking loss averaged over the batch (default) or summed (reference)"
    )
    kl_reduction: Literal["batchmean", "mean"] = Field(
        "batchmean", description="per-sample KL, or divided by B*C like nn.KLDivLoss()"
    )
    knowledge_sha256: str = Field(
        "", pattern=r"^([0-9a-fA-F]{64})?$", description="SHA-256 of the agreed knowledge file"
    )
    local_loss: LocalLoss = Field(
        "bsm",
        description="supervised loss of every local step on a hospital's own data: balanced "
        "softmax with the hospital's class prior (bsm) or plain cross-entropy (ce, reference)",
    )
    knowledge: Literal["file", "none"] = Field(
        "file",
        description="file: small hospitals distil from the knowledge file on public data; "
        "none: no public data exists, small hospitals train the surrogate on their own data only",
    )


def check_options(run: RunConfig, options: FedHelpOptions) -> None:
    """Refuse option combinations that cannot work with the run's model and classes."""
    if options.rank_k >= run.num_classes:
        raise ConfigError(
            f"run config: key 'fedhelp.rank-k' = {options.rank_k} is not allowed: expected "
            f"1..{run.num_classes - 1} (num-classes = {run.num_classes})"
        )
    if MODELS[run.model].tabular and options.large_model != "mlp":
        raise ConfigError(
            f"run config: key 'fedhelp.large-model' = {options.large_model!r} is not allowed "
            f"with model = {run.model!r} (tabular inputs): expected 'mlp'"
        )
    segmentation = run.task == "segmentation"
    if segmentation != (options.large_model in SEGMENTATION_NETWORKS):
        expected = (
            " or ".join(repr(n) for n in SEGMENTATION_NETWORKS)
            if segmentation
            else "a classification network"
        )
        raise ConfigError(
            f"run config: key 'fedhelp.large-model' = {options.large_model!r} is not allowed "
            f"with task = {run.task!r}: expected {expected}"
        )


def input_shape(run: RunConfig) -> tuple[int, ...]:
    if MODELS[run.model].tabular:
        return (run.num_features,)
    return (run.in_channels, run.image_size, run.image_size)


# ------------------------------------------------------------------------------ server


class FedHelpStrategy(ServerAlgorithm):
    """Roles once before round 1, each hospital's role in its round config, mean aggregation."""

    state_attributes = ("roles", "role_table")
    #: the mean of surrogates and proxies (global architecture) is a sum: SecAgg can take it
    secure_aggregation_refusal = None

    def __init__(self, run: RunConfig, results: ResultsWriter | None = None) -> None:
        super().__init__(run, results)
        self.options: FedHelpOptions = run.algorithm_options()
        check_options(run, self.options)
        self.roles: dict[int, str] = {}
        self.role_table: dict[str, dict[str, Any]] = {}

    def setup_query(self) -> dict[str, Any]:
        """Every hospital's size and configured role (``describe``)."""
        return {}

    def setup(self, replies: list[Reply], initial_arrays: ArrayRecord) -> None:
        """Assign roles from the hospitals' sizes and configured roles."""
        entries = [
            RoleEntry(
                key=r.node_id,
                hospital=r.hospital,
                configured=str(r.info.get(keys.ROLE, "") or ""),
                num_train=int(r.metrics.get(keys.NUM_TRAIN, 0)),
            )
            for r in replies
        ]
        assigned = assign_roles(entries, self.options.num_large)
        rows, unequipped = [], []
        for reply, entry in zip(replies, entries, strict=True):
            assignment = assigned[entry.key]
            self.roles[entry.key] = assignment.role
            self.role_table[entry.hospital] = {
                "role": assignment.role,
                "source": assignment.source,
                "num_train": entry.num_train,
            }
            log(
                INFO,
                "fedhelp: %s is %s (%s, %d training samples)",
                entry.hospital,
                assignment.role,
                "hospital config" if assignment.source == "config" else "ranked by size",
                entry.num_train,
            )
            rows.append(
                FedHelpRoleRow(
                    round=0,
                    hospital=entry.hospital,
                    node_id=entry.key,
                    role=assignment.role,
                    role_source=assignment.source,
                    num_train=entry.num_train,
                )
            )
            needs_knowledge = self.options.knowledge == "file" and assignment.role == "small"
            if needs_knowledge and not reply.metrics.get("fedhelp_has_knowledge"):
                unequipped.append(entry.hospital)
        self.record(rows)
        if unequipped:
            raise ConfigError(
                f"FedHelp small hospital(s) {', '.join(unequipped)}: the hospital config lacks "
                "'knowledge-path' or 'public-data-path' (the knowledge file and public data from "
                "'fedclinic knowledge build')"
            )
        small = "small" in self.roles.values()
        if small and self.options.knowledge == "file" and not self.options.knowledge_sha256:
            raise ConfigError(
                "run config: key 'fedhelp.knowledge-sha256' is empty; small hospitals need the "
                "SHA-256 of the knowledge file printed by 'fedclinic knowledge build'"
            )

    def nodes_moved(self, moved: dict[int, int]) -> None:
        """A resumed run: the roles follow the hospitals to their new node IDs."""
        self.roles = {moved.get(node, node): role for node, role in self.roles.items()}

    def config_for(self, hospital: Hospital, config: ConfigRecord) -> ConfigRecord:
        """Each hospital's round config carries its own role."""
        role = self.roles.get(hospital.node_id)
        if role is None:  # joined after the setup query: no size known, so small
            role = "small"
            self.roles[hospital.node_id] = role
            log(WARNING, "fedhelp: %s joined after the role query; it is small", hospital.name)
            self.role_table[hospital.name] = {
                "role": role,
                "source": "late-join",
                "num_train": None,
            }
            self.record(
                [
                    FedHelpRoleRow(
                        round=0,
                        hospital=hospital.name,
                        node_id=hospital.node_id,
                        role=role,
                        role_source="late-join",
                    )
                ]
            )
        return ConfigRecord({**dict(config), ROLE_KEY: role})

    def aggregate(
        self, server_round: int, replies: list[Reply], exchange: Exchange = TRAIN
    ) -> ArrayRecord | None:
        """FH-10: unweighted mean (reference) or weighted by training-set size."""
        weights = self._weights(server_round, replies)
        return numpy_to_record(weighted_average(replies_to_numpy(replies), weights))

    def secure_weighting(self) -> str:
        return "num-train" if self.options.aggregation == "weighted" else "equal"

    def securely_aggregated(self, server_round: int, replies: list[Reply]) -> None:
        self._weights(server_round, replies)

    def _weights(self, server_round: int, replies: list[Reply]) -> list[float]:
        """Each upload's weight, recorded per hospital with its role."""
        if self.options.aggregation == "weighted":
            weights = [r.num_train for r in replies]
        else:
            weights = [1.0] * len(replies)
        total = sum(weights)
        self.record(
            [
                FedHelpAggregateRow(
                    round=server_round,
                    hospital=r.hospital,
                    node_id=r.node_id,
                    role=self.roles.get(r.node_id, "small"),
                    uploaded="proxy" if self.roles.get(r.node_id) == "large" else "surrogate",
                    weight=w / total,
                )
                for r, w in zip(replies, weights, strict=True)
            ]
        )
        return weights

    def summary_extra(self) -> dict[str, Any]:
        return {
            "fedhelp": {
                "roles": {name: entry["role"] for name, entry in self.role_table.items()},
                "role_sources": {name: e["source"] for name, e in self.role_table.items()},
                "num_large_option": self.options.num_large,
                "large_model": self.options.large_model,
                "aggregation": self.options.aggregation,
                "knowledge": self.options.knowledge,
                "knowledge_sha256": self.options.knowledge_sha256,
                "deployed": {"large": "private large model", "small": "global model"},
            }
        }


# ------------------------------------------------------------------------------ client


class FedHelpObjective(ClientObjective):
    """Small hospital: surrogate with two heads; large hospital: asymmetric dual KD."""

    def __init__(self, context: ClientContext) -> None:
        super().__init__(context)
        self.options: FedHelpOptions = self.run.algorithm_options()
        role = context.server_config.get(ROLE_KEY) or context.hospital.role or "small"
        self.role = str(role)

    @property
    def deployed_kind(self) -> str:  # type: ignore[override]
        """Large hospitals deploy their private large model, small ones the global model."""
        return "large" if self.role == "large" else "global"

    def describe(self, content: Any) -> dict[str, float | list[float]]:
        hospital = self.context.hospital
        has_knowledge = bool(hospital.knowledge_path and hospital.public_data_path)
        return {**super().describe(content), "fedhelp_has_knowledge": float(has_knowledge)}

    def deployed_model(self, received: State) -> nn.Module:
        if self.role == "large":
            self.deploy_from_site(LARGE_MODEL)
            return self.large_model()
        return self.build(received)

    def fit(self, received: State) -> LocalUpdate:
        check_options(self.run, self.options)
        if self.role == "large":
            return self.fit_large(received)
        return self.fit_small(received)

    # ------------------------------------------------------------------ helpers
    def large_model(self) -> nn.Module:
        """This hospital's private large model (FH-9): from the site state, else a seeded init."""
        name, site = self.options.large_model, self.context.site
        with torch.random.fork_rng(devices=[]):
            seed = seeded_generator(self.run.seed, "fedhelp-large", self.context.hospital.hospital)
            torch.manual_seed(seed.initial_seed())
            model = build_large_model(self.run, name)
        if site.has(LARGE_MODEL):
            model.load_state_dict(site.load(LARGE_MODEL))
        return model

    def loop(self) -> tuple[LocalLoop, OptimizerSettings]:
        """The hospital's training loop and the run's optimiser, created afresh every round."""
        return LocalLoop.for_run(self.run, self.context.device), OptimizerSettings.of(self.run)

    @property
    def private_models(self) -> int:
        """A large hospital trains two models on its private data (proxy and large model),
        each on its own Poisson batches under DP; a small one one (its surrogate)."""
        return 2 if self.role == "large" else 1

    @property
    def uses_class_prior(self) -> bool:
        return uses_prior(self.run, self.options.local_loss)

    def private_loss(self) -> Loss:
        """The supervised loss on this hospital's own data (``fedhelp.local-loss``); its
        class prior under DP is the site's DP release (``ClientContext.prior_counts``)."""
        counts = self.context.prior_counts() if self.uses_class_prior else []
        return local_loss(self.run, self.options.local_loss, counts)

    # ------------------------------------------------------------------ large hospitals
    def fit_large(self, received: State) -> LocalUpdate:
        """Asymmetric dual KD (3a forward KL, 3b CE + KL + beta * ranking); upload the proxy."""
        opts, device = self.options, self.context.device
        task_loss = self.private_loss()
        temperature = opts.temperature
        loop, settings = self.loop()
        proxy = self.build(received).to(device)
        large = self.large_model().to(device)
        train, run = self.context.data.train, self.run
        proxy_step: Updater | PrivateUpdater
        large_step: Updater | PrivateUpdater
        batches: Iterator[tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]]
        if run.dp == "dp-sgd":
            # Both models learn from the private data, so both take DP-SGD steps, each on its
            # own Poisson batches: the ledger counts 2 x the round's steps (private_models).
            proxy_step = loop.private_updater(proxy, settings, run)
            large_step = loop.private_updater(large, settings, run)
            proxy_batches, budget = loop.private_batches(train, run)
            large_batches, _ = loop.private_batches(train, run)
            batches = zip(proxy_batches, large_batches, strict=False)
        else:
            proxy_step = loop.updater(proxy.parameters(), settings)
            large_step = loop.updater(large.parameters(), settings)
            shared, budget = loop.round_batches(train, run, self.generator())
            batches = ((batch, batch) for batch in shared)

        def forward_kd(x: Tensor, y: Tensor) -> dict[str, Tensor]:
            """3a: forward KD, large -> proxy, with the large model frozen."""
            large.eval()
            proxy.train()
            with torch.no_grad(), loop.autocast():
                teacher = class_log_probs(large(x), temperature)
            with loop.autocast():
                proxy_logits = proxy(x)
                proxy_ce = task_loss(proxy_logits, y)
                forward_kl = kl_divergence(
                    teacher, class_log_probs(proxy_logits, temperature), opts.kl_reduction
                )
                proxy_loss = proxy_ce + opts.forward_kd_weight * forward_kl
            proxy_step.step(proxy_loss)
            return {"loss": proxy_loss, "proxy_ce": proxy_ce, "forward_kl": forward_kl}

        def backward_kd(x: Tensor, y: Tensor) -> dict[str, Tensor]:
            """3b: backward KD, proxy -> large, with the (updated) proxy frozen; the large
            model's logits are recomputed with gradients and its CE uses them (FH-7)."""
            proxy.eval()
            large.train()
            with torch.no_grad(), loop.autocast():
                proxy_logits = proxy(x)
            with loop.autocast():
                large_logits = large(x)
                large_ce = task_loss(large_logits, y)
                backward_kl = kl_divergence(
                    class_log_probs(large_logits, temperature),
                    class_log_probs(proxy_logits, temperature),
                    opts.kl_reduction,
                )
                rank = ranking_loss(
                    large_logits, proxy_logits, opts.rank_k, opts.rank_margin, opts.rank_reduction
                )
                large_loss = (
                    large_ce + opts.backward_kd_weight * backward_kl + opts.rank_weight * rank
                )
            large_step.step(large_loss)
            return {
                "large_loss": large_loss,
                "large_ce": large_ce,
                "backward_kl": backward_kl,
                "rank": rank,
            }

        def step(batch: tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]) -> StepResult:
            (x, y), (x_large, y_large) = batch
            losses: dict[str, Tensor] = {}
            for updater, (inputs, labels), kd in (
                (proxy_step, (x, y), forward_kd),
                (large_step, (x_large, y_large), backward_kd),
            ):
                if len(labels) == 0:  # an empty Poisson batch: a noise-only DP step
                    noise_only(updater)
                else:
                    losses.update(kd(inputs, labels))
            return len(y), losses

        try:
            stats = loop.run(budget, batches, step)
        finally:
            close_private(proxy_step, large_step)
        saved = self.context.site.save(LARGE_MODEL, _cpu_state(large))  # FH-9: stays here
        means = stats.means
        return LocalUpdate(
            _cpu_state(proxy),  # FH-1: the proxy is uploaded, never the large model
            stats.loss,
            stats.num_examples,
            stats.seconds,
            stats.steps,
            metrics={
                f"train_{name}": means.get(key, 0.0)
                for name, key in (
                    ("proxy_ce", "proxy_ce"),
                    ("forward_kl", "forward_kl"),
                    ("large_loss", "large_loss"),
                    ("large_ce", "large_ce"),
                    ("backward_kl", "backward_kl"),
                    ("rank_loss", "rank"),
                )
            },
            info={
                "fedhelp_role": "large",
                "uploaded": "proxy",
                "large_model": opts.large_model,
                "large_model_sha256": saved["sha256"],
            },
        )

    # ------------------------------------------------------------------ small hospitals
    def shared_knowledge(self) -> SharedKnowledge:
        """The verified public data and probabilities (IntegrityError on any mismatch)."""
        hospital, run = self.context.hospital, self.run
        for key, value in (
            ("knowledge-path", hospital.knowledge_path),
            ("public-data-path", hospital.public_data_path),
        ):
            if not value:
                raise ConfigError(
                    f"hospital config: key '{key}' is empty; a FedHelp small hospital needs the "
                    "knowledge file and the public data from 'fedclinic knowledge build'"
                )
        if not self.options.knowledge_sha256:
            raise ConfigError(
                "run config: key 'fedhelp.knowledge-sha256' is empty; small hospitals refuse an "
                "unpinned knowledge file"
            )
        tabular = MODELS[run.model].tabular
        shared = load_shared_knowledge(
            hospital.knowledge_path,
            hospital.public_data_path,
            self.options.knowledge_sha256,
            None if tabular else run.in_channels,
            None if tabular else run.image_size,
            run.num_features if tabular else None,
        )
        dense = shared.knowledge.probabilities.ndim == 4
        if dense != (run.task == "segmentation"):
            raise DataError(
                f"knowledge file '{hospital.knowledge_path}' holds "
                f"{'per-pixel' if dense else 'per-image'} probabilities; a {run.task} run "
                f"needs {'per-pixel' if not dense else 'per-image'} ones (build it from public "
                f"data with {'masks' if run.task == 'segmentation' else 'class labels'})"
            )
        if shared.note:
            log(WARNING, "fedhelp %s: %s", hospital.hospital, shared.note)
        if shared.knowledge.meta.get("substitute"):
            log(
                INFO,
                "fedhelp %s: the knowledge file comes from a substitute (%s), not a foundation "
                "model (FH-2)",
                hospital.hospital,
                shared.knowledge.meta.get("source"),
            )
        return shared

    def heads(self, global_head: nn.Module, public_classes: int) -> tuple[nn.Module, nn.Module]:
        """The private and public heads this round (FH-3, ``fedhelp.head-init``).

        ``fresh``: both newly initialised, as in the reference; ``kept``: both as this
        hospital left them last round (site state); ``global``: the private head starts from
        the received global classifier (the mean of last round's private heads and proxy
        heads), the public head is kept. Round 1, or stored heads of another shape: fresh.
        """
        public_outputs = (  # segmentation: one channel for two public classes (FH-11)
            output_channels(public_classes) if self.run.task == "segmentation" else public_classes
        )
        private = new_head(global_head, head_outputs(global_head))
        public = new_head(global_head, public_outputs)
        mode, site = self.options.head_init, self.context.site
        if mode == "global":
            private.load_state_dict(global_head.state_dict())
        if mode != "fresh" and site.has(HEADS):
            stored = site.load(HEADS)
            kept = (
                {"public": public} if mode == "global" else {"private": private, "public": public}
            )
            for name, head in kept.items():
                state = {
                    k.partition(".")[2]: v for k, v in stored.items() if k.startswith(name + ".")
                }
                if not state:  # never stored (knowledge = "none" keeps no public head)
                    continue
                if {k: v.shape for k, v in state.items()} == {
                    k: v.shape for k, v in head.state_dict().items()
                }:
                    head.load_state_dict(state)
                else:
                    log(WARNING, "fedhelp: the stored %s head does not fit; a fresh one", name)
        return private, public

    def fit_small(self, received: State) -> LocalUpdate:
        """Surrogate training: alternating private CE and public KD steps on a shared phi."""
        if self.options.knowledge == "none":
            return self.fit_small_private(received)
        opts, run, device = self.options, self.run, self.context.device
        task_loss = task_of(run).loss  # the public head's CE: the public labels' own mix
        private_loss_of = self.private_loss()
        shared = self.shared_knowledge()
        model = self.build(received)
        head_name = find_head(model, head_prefix(run))
        private, public = self.heads(get_module(model, head_name), shared.knowledge.num_classes)
        set_module(model, head_name, nn.Identity())  # model is now the feature extractor phi
        phi = model.to(device).train()
        private.to(device).train()
        public.to(device).train()
        loop, settings = self.loop()
        private_step: Updater | PrivateUpdater
        if run.dp == "dp-sgd":  # the private step is DP-SGD; the public step reads no record
            private_step = loop.private_updater(nn.Sequential(phi, private), settings, run)
            private_batches, budget = loop.private_batches(self.context.data.train, run)
        else:
            private_step = loop.updater([*phi.parameters(), *private.parameters()], settings)
            private_batches, budget = loop.round_batches(
                self.context.data.train, run, self.generator()
            )
        public_step = loop.updater([*phi.parameters(), *public.parameters()], settings)
        labels = shared.labels
        use_public_ce = opts.public_ce and labels is not None
        targets = temper_probabilities(shared.knowledge.probabilities, opts.temperature)
        target_log = probabilities_log(targets)
        # Public batches carry their row numbers, which index targets and labels.
        rows = Split(shared.inputs, torch.arange(len(shared.inputs)))
        hospital = self.context.hospital.hospital
        public_batches, _ = loop.batches(
            rows,
            opts.public_batch_size or run.batch_size,
            seeded_generator(run.seed, self.context.server_round, "fedhelp-public", hospital),
        )

        def step(batch: tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]) -> StepResult:
            (x, y), (x_public, index) = batch
            index = index.cpu()
            # (i) private step on (phi, private head); under DP an empty Poisson batch is a
            # noise-only step.
            if len(y) == 0:
                noise_only(private_step)
                private_loss = torch.zeros((), device=device)
            else:
                with loop.autocast():
                    private_loss = private_loss_of(private(phi(x)), y)
                private_step.step(private_loss)
            # (ii) public step on (phi, public head): KL to the stored probabilities (+ CE, FH-5);
            # public data, so an ordinary step (no per-sample hooks under DP).
            with public_only(private_step):
                with loop.autocast():
                    public_logits = public(phi(x_public))
                    public_kl = kl_divergence(
                        target_log[index].to(device),
                        class_log_probs(public_logits, opts.temperature),
                        opts.kl_reduction,
                    )
                    public_ce = (
                        task_loss(public_logits.float(), labels[index].to(device))
                        if use_public_ce and labels is not None
                        else torch.zeros((), device=device)
                    )
                    public_loss = opts.public_weight * (public_kl + public_ce)
                public_step.step(public_loss)
            return len(y), {
                "loss": private_loss.detach() + public_loss.detach(),
                "private": private_loss,
                "public_kl": public_kl,
                "public_ce": public_ce,
            }

        try:
            stats = loop.run(budget, zip(private_batches, public_batches, strict=False), step)
        finally:
            close_private(private_step)
        if opts.head_init != "fresh":
            self.context.site.save(
                HEADS,
                {
                    **{f"private.{k}": v for k, v in _cpu_state(private).items()},
                    **{f"public.{k}": v for k, v in _cpu_state(public).items()},
                },
            )
        set_module(phi, head_name, private)  # FH-6: the private head becomes the classifier
        return LocalUpdate(
            _cpu_state(phi),  # the public head never leaves the site
            stats.loss,
            stats.num_examples,
            stats.seconds,
            stats.steps,
            metrics={
                "train_private_loss": stats.means["private"],
                "train_public_kl": stats.means["public_kl"],
                "train_public_ce": stats.means["public_ce"],
            },
            info={
                "fedhelp_role": "small",
                "uploaded": "surrogate",
                "knowledge_sha256": shared.knowledge.sha256,
                "knowledge_source": str(shared.knowledge.meta.get("source", "")),
            },
        )

    def fit_small_private(self, received: State) -> LocalUpdate:
        """``knowledge = "none"``: the surrogate's private step alone, no public head.

        phi and the private head (FH-3 as for the public variant) train on the hospital's
        own data with the local loss (``fedhelp.local-loss``); nothing else changes: the
        upload is the surrogate in the global architecture, the large hospitals still run the
        dual distillation.
        """
        run, device = self.run, self.context.device
        task_loss = self.private_loss()
        model = self.build(received)
        head_name = find_head(model, head_prefix(run))
        private, _ = self.heads(get_module(model, head_name), run.num_classes)
        set_module(model, head_name, private)
        stats = train_local(
            model,
            self.context.data.train,
            run,
            device,
            self.generator(),
            objective=lambda _model, _inputs, labels, logits: task_loss(logits, labels),
        )
        if self.options.head_init != "fresh":
            self.context.site.save(
                HEADS, {f"private.{k}": v for k, v in _cpu_state(private).items()}
            )
        return LocalUpdate(
            _cpu_state(model),
            stats.loss,
            stats.num_examples,
            stats.seconds,
            stats.steps,
            metrics={"train_private_loss": stats.loss},
            info={"fedhelp_role": "small", "uploaded": "surrogate", "knowledge_source": "none"},
        )


def build_large_model(run: RunConfig, name: str) -> nn.Module:
    """A large hospital's private model ``name``; under DP the version Opacus trains
    (GroupNorm with ``privacy-fix-model``, residual additions out of place)."""
    model = build_network(name, run.num_classes, input_shape(run))
    if run.dp == "off":
        return model
    return private_variant(model, run.privacy_fix_model)


def noise_only(updater: Updater | PrivateUpdater) -> None:
    """The step of an empty Poisson batch: noise only (only DP-SGD batches are empty)."""
    if not isinstance(updater, PrivateUpdater):
        raise DataError("the training split yields an empty batch (is it empty?)")
    updater.step(None)


def public_only(updater: Updater | PrivateUpdater) -> AbstractContextManager[None]:
    """Around a step on public data through layers a private updater also trains: its
    per-sample hooks paused (nothing to clip or account), else nothing."""
    return updater.paused() if isinstance(updater, PrivateUpdater) else nullcontext()


def close_private(*updaters: Updater | PrivateUpdater) -> None:
    """Remove the per-sample hooks of the private updaters: ordinary modules again."""
    for updater in updaters:
        if isinstance(updater, PrivateUpdater):
            updater.close()


def _cpu_state(model: nn.Module) -> State:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def check_run(run: RunConfig) -> None:
    """``Algorithm.check``: :func:`check_options` on the run's own FedHelp options; under DP
    the large model must be one Opacus can train (docs/privacy.md)."""
    options: FedHelpOptions = run.algorithm_options()
    check_options(run, options)
    check_network(
        run,
        f"fedhelp.large-model = {options.large_model!r}",
        lambda: build_large_model(run, options.large_model),
        input_shape(run),
    )


ALGORITHM = Algorithm(
    check=check_run,
    name="fedhelp",
    strategy=FedHelpStrategy,
    objective=FedHelpObjective,
    options=FedHelpOptions,
    tasks=("classification", "segmentation"),
    description=(
        "FedHelp: foundation-model knowledge for small hospitals, asymmetric dual distillation "
        "with private large models at large hospitals"
    ),
)

__all__ = ["ALGORITHM", "NETWORKS", "FedHelpObjective", "FedHelpOptions", "FedHelpStrategy"]
