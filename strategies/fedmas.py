"""Fed-MAS (arXiv 2307.14959): aggregation weighted by divergence from a shared frozen prior.

Every hospital holds the same frozen self-supervised encoder ``f`` (the *prior*). Its model is
a backbone ``g`` with a task head ``fc``, a projector ``p_free`` (Linear(d, d) → BatchNorm1d →
ReLU → Linear(d, dim f)) and an auxiliary head ``fc_free`` on the projection. Local loss:
``BSM(fc(h), y) + BSM(fc_free(p), y) + λ · mean(2 − 2 cos(p, f(x)))`` with the hospital's
class prior in the balanced softmax. Each round the hospital

1. measures, with the received global model (eval mode, no gradient, one pass over its
   training split), the class-wise divergence ``w_c`` of the projection from the prior;
2. trains, accumulating the same class-wise divergence ``ŵ_c`` before every step;
3. sends its full state, ``RF = Σ_{c: w_c≠0} (w_c/Σw)(ŵ_c/Σŵ)``, ``n_k`` and ``w``, ``ŵ``.

The coordinator averages every state entry (BatchNorm running statistics included) with
weights ``RF_k / Σ RF`` (``mas``). Options: ``mas_inv`` (``ŵ`` → ``1/ŵ`` in RF), ``mas_drw``
(FedAvg weights, then effective-number re-weighting from round ``int(0.8 R)``), ``avg``
(FedAvg weights: the "without MAS" ablation). Per-class divergences, RF and weights are
written as ``kind = "aggregation"`` rows and in ``summary.json`` under ``fedmas``.

Backbone: the run's ``model`` (``resnet18`` as in the reference: 512 → 512 → 2048 with the
MoCo ResNet-50 prior; ``cnn`` for tests and CPU demos: 64 → 64 → prior dim; ``resnet101``
and ``densenet121`` also work; ``logreg`` for tabular data: the rows are the features, the
task head is a logistic regression with one logit per class, and the prior is a tabular
encoder, ``prior-arch = "mlp"``). The backbone starts from the run's seeded random
initialisation; the reference loads ImageNet-1K ResNet-18 weights into it
(``--pre_trained_tv``), which this module does not.

Design decisions (IDs defined in docs/fedmas.md#decisions):

- **MAS-1** — the prior is a :class:`~fedclinic.prior.FrozenPrior`: gradients off, pinned to
  eval mode (its ``train()`` is a no-op) and never a sub-module of the trained model, so the
  measurement pass and training use its frozen BatchNorm statistics and it never leaves the
  site. The reference may still have ``f`` in train mode during its first measurement.
- **MAS-2** — every hospital must run a bit-identical prior: the run config carries the file's
  SHA-256 (``fedmas.prior-sha256``) and a hospital whose file differs refuses to train
  (IntegrityError); the coordinator also refuses replies whose prior weights hash differently.
  Substitutes in order of fidelity: the official MoCo-v2 checkpoint as a local file
  (``module.encoder_q.*`` keys, fc dropped); another frozen encoder file (torchvision state
  dict, e.g. ImageNet ResNet-50/18); ``fedclinic prior train`` (MoCo-v2 once on public or
  synthetic images, :mod:`fedclinic.prior`); ``prior-source = "random"`` (a seeded random
  frozen encoder, marked degraded in the summary). The reference downloads the checkpoint.
- **MAS-3** — nothing here reads test data: measurement and training use the training
  split; the shared base selects the round on validation metrics only. The reference selects
  on the FLamby test split (its "val" loader is the test split).
- **MAS-4** — the aggregation is named ``mas`` (lowercase) as the server code matches; the
  reference README's ``MAS`` would fail there.

Differential privacy (``dp = "dp-sgd"``, docs/privacy.md): step 2 is DP-SGD (every term of
the local loss reads one sample, so the whole loss is clipped per sample and noised; the
per-sample clipping replaces ``grad-clip-norm``) on Poisson batches, and the model is built
with GroupNorm for the projector's BatchNorm1d (``privacy-fix-model = true`` is required).
``w``, ``ŵ`` and RF are still measured on the training split and sent without DP.

Other differences from the reference: the local optimizer is the run's (``optimizer``,
``learning-rate``; the reference hard-codes Adam 3e-4), its state persists at the site
across rounds as in the reference; ``n_k`` is the training-set size (the reference uses
batches × batch size); the measurement pass keeps the last partial batch (the reference drops
it), so ``w_c`` is exactly the class mean of ``L_f``.
"""

from __future__ import annotations

import math
import time
from logging import WARNING
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord
from flwr.common import log
from pydantic import Field
from torch import nn

from fedclinic import models
from fedclinic.config import HospitalConfig, RunConfig, Schema
from fedclinic.data.base import Split
from fedclinic.engine import TRAIN, Exchange, Reply, ServerAlgorithm, replies_to_numpy
from fedclinic.errors import ConfigError, DataError, FedClinicError, IntegrityError
from fedclinic.models import MODELS, dims_of, private_variant
from fedclinic.prior import (
    IMAGE_PRIORS,
    PRIOR_DIMS,
    TABULAR_PRIORS,
    FrozenPrior,
    load_prior,
    prior_content_sha256,
    random_prior,
)
from fedclinic.privacy import check_network, input_shape
from fedclinic.rows import FedMASAggregationRow
from fedclinic.serialization import State, file_sha256, numpy_to_record
from fedclinic.training import (
    LocalLoop,
    OptimizerSettings,
    PrivateUpdater,
    StepResult,
    Updater,
    make_loader,
)
from strategies.base import Algorithm, ClientObjective, LocalUpdate
from strategies.fedavg import weighted_average
from strategies.fedmas_math import (
    ClassDivergence,
    aggregation_weights,
    alignment_loss,
    balanced_softmax_loss,
    class_log_prior,
    fedavg_weights,
    robust_factor,
)

OPTIMIZER_STATE = "fedmas_optimizer"
#: what summary.json keeps per hospital and round (a subset of the aggregation row)
HISTORY_FIELDS = {"rf", "weight", "fedavg_weight", "num_train", "w", "w_hat"}


class FedMASOptions(Schema):
    aggregation: Literal["mas", "mas_inv", "mas_drw", "avg"] = Field(
        "mas", description="server weights: RF (mas, mas_inv), delayed re-weighting, or FedAvg"
    )
    align_weight: float = Field(3.0, ge=0, description="lambda (free_u) of the 2-2cos alignment")
    local_loss: Literal["bsm", "ce"] = Field("bsm", description="loss on both heads")
    prior_source: Literal["file", "random"] = Field(
        "file", description="file: a shared prior file; random: seeded random encoder (degraded)"
    )
    prior_arch: Literal["resnet50", "resnet18", "cnn", "mlp"] = Field(
        "resnet50",
        description="prior encoder architecture (MoCo-v2 release: resnet50; mlp for tables)",
    )
    prior_path: str = Field("", description="prior file when a hospital config has no prior-path")
    prior_sha256: str = Field(
        "", pattern=r"^([0-9a-fA-F]{64})?$", description="SHA-256 every hospital's prior must have"
    )
    prior_seed: int = Field(0, ge=0, description="seed of the random prior")
    prior_image_size: int = Field(0, ge=0, le=1024, description="resize for the prior; 0 = none")
    prior_normalize: Literal["none", "imagenet"] = Field(
        "none", description="imagenet: ImageNet mean/std before the prior (MoCo's training input)"
    )
    grad_clip_norm: float = Field(5.0, ge=0, description="max gradient norm; 0 = no clipping")
    persist_optimizer: bool = Field(True, description="keep the optimizer state at the site")
    drw_start: float = Field(0.8, gt=0, le=1, description="mas_drw: fraction of rounds before")
    drw_beta: float = Field(0.9999, gt=0, lt=1, description="mas_drw: effective-number beta")


def options_of(run: RunConfig) -> FedMASOptions:
    options: FedMASOptions = run.options.get("fedmas") or FedMASOptions()
    return options


def check_run(run: RunConfig) -> None:
    """Refuse run settings Fed-MAS cannot work with (at the coordinator and at the hospital)."""
    options = options_of(run)
    if run.model not in BACKBONES:
        raise ConfigError(
            f"run config: key 'model' = {run.model!r} is not allowed for fedmas: expected one "
            f"of {', '.join(BACKBONES)}"
        )
    tabular = MODELS[run.model].tabular
    if tabular != (options.prior_arch in TABULAR_PRIORS):
        expected = (
            "'mlp' (tabular rows)" if tabular else f"an image encoder ({', '.join(IMAGE_PRIORS)})"
        )
        raise ConfigError(
            f"run config: key 'fedmas.prior-arch' = {options.prior_arch!r} is not allowed with "
            f"model = {run.model!r}: expected {expected}"
        )
    if run.batch_size < 2:
        raise ConfigError(
            f"run config: key 'batch-size' = {run.batch_size} is not allowed for fedmas: expected "
            ">= 2 (the projector has BatchNorm)"
        )
    if options.prior_source == "file" and not options.prior_sha256:
        raise ConfigError(
            "run config: key 'fedmas.prior-sha256' is empty: Fed-MAS needs the SHA-256 of the "
            "shared prior file (printed by 'fedclinic prior train' / 'fedclinic prior hash')"
        )
    # under DP the model with its projector (BatchNorm1d) must be one Opacus can train
    check_network(run, "algorithm = 'fedmas'", lambda: build_fedmas_model(run), input_shape(run))


# ------------------------------------------------------------------------------ the model

#: run models with a backbone to cut out (the registry's ``backbone``)
BACKBONES = tuple(name for name, spec in MODELS.items() if spec.backbone is not None)


def build_backbone(run: RunConfig) -> tuple[nn.Module, int]:
    """The run's architecture without its classification layer, and its feature size
    (the logistic regression's is the identity: the rows are the features)."""
    if run.model not in BACKBONES:
        raise ConfigError(
            f"run config: key 'model' = {run.model!r} is not allowed for fedmas: expected one "
            f"of {', '.join(BACKBONES)}"
        )
    return models.build_backbone(run.model, dims_of(run))


class FedMASNet(nn.Module):
    """Backbone ``g``, task head ``fc``, projector ``p_free`` and auxiliary head ``fc_free``.

    ``forward`` returns the task logits (what hospitals evaluate and deploy); :meth:`heads`
    returns task logits, projection and auxiliary logits for training.
    """

    def __init__(self, backbone: nn.Module, feature_dim: int, prior_dim: int, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.fc = nn.Linear(feature_dim, num_classes)
        self.p_free = nn.Sequential(
            nn.Linear(feature_dim, feature_dim),
            nn.BatchNorm1d(feature_dim),
            nn.ReLU(inplace=True),
            nn.Linear(feature_dim, prior_dim),
        )
        self.fc_free = nn.Linear(prior_dim, num_classes)

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        features = self.backbone(x).flatten(1)
        projection = self.p_free(features)
        return self.fc(features), projection, self.fc_free(projection)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.backbone(x).flatten(1))


def build_fedmas_model(run: RunConfig, seed: int | None = None) -> FedMASNet:
    """The Fed-MAS client model; with ``seed`` the initial weights are reproducible."""
    if seed is not None:
        torch.manual_seed(seed)
    backbone, feature_dim = build_backbone(run)
    prior_dim = PRIOR_DIMS[options_of(run).prior_arch]
    model = FedMASNet(backbone, feature_dim, prior_dim, run.num_classes)
    if run.dp == "off":
        return model
    # DP-SGD: the projector's BatchNorm1d (and the backbone's) become GroupNorm with
    # privacy-fix-model = true; check_run refuses the run otherwise (docs/privacy.md)
    return cast(FedMASNet, private_variant(model, run.privacy_fix_model))


# ------------------------------------------------------------------------------ the prior


def hospital_prior(run: RunConfig, hospital: HospitalConfig) -> tuple[FrozenPrior, dict[str, str]]:
    """This hospital's frozen prior, after checking it is the run's bit-identical one (MAS-2)."""
    options = options_of(run)
    expected = options.prior_sha256.lower()
    if options.prior_source == "random":
        prior = random_prior(
            options.prior_arch,
            run.num_features if options.prior_arch in TABULAR_PRIORS else run.in_channels,
            options.prior_seed,
            options.prior_image_size,
            options.prior_normalize == "imagenet",
        )
        content = prior_content_sha256(prior)
        if expected and content != expected:
            raise IntegrityError(
                f"hospital {hospital.hospital}: the random prior (seed {options.prior_seed}) has "
                f"weights SHA-256 {content}; the run expects fedmas.prior-sha256 = {expected}"
            )
        info = {"prior_sha256": "", "prior_content_sha256": content, "prior_origin": "random"}
        return prior, info
    if not expected:
        check_run(run)  # raises the missing-hash error
    path = hospital.prior_path or options.prior_path
    if not path:
        raise ConfigError(
            f"hospital config: key 'prior-path' is empty (hospital {hospital.hospital}) and run "
            "config 'fedmas.prior-path' is not set: Fed-MAS needs the shared prior file"
        )
    try:
        actual = file_sha256(path)
    except OSError:
        raise DataError(
            f"Fed-MAS prior file '{path}' (hospital {hospital.hospital}) does not exist or "
            "cannot be read"
        ) from None
    if actual != expected:
        raise IntegrityError(
            f"hospital {hospital.hospital}: prior file '{path}' has SHA-256 {actual}; the run "
            f"expects fedmas.prior-sha256 = {expected}: every hospital must use the "
            "bit-identical prior file"
        )
    prior, prior_file = load_prior(
        path, options.prior_arch, options.prior_image_size, options.prior_normalize == "imagenet"
    )
    info = {
        "prior_sha256": actual,
        "prior_content_sha256": prior_content_sha256(prior),
        "prior_origin": prior_file.origin,
    }
    return prior, info


# ------------------------------------------------------------------------------ the client


@torch.no_grad()
def measure_divergence(
    model: FedMASNet,
    prior: FrozenPrior,
    split: Split,
    device: torch.device,
    batch_size: int,
    class_counts: list[int],
) -> list[float]:
    """Step 1: class-wise ``L_f`` of ``model`` (eval mode, no gradient), one pass over ``split``."""
    model.eval()
    prior.eval()
    divergence = ClassDivergence(class_counts)
    for inputs, labels in make_loader(split, batch_size, shuffle=False):
        inputs = inputs.to(device)
        _, projection, _ = model.heads(inputs)
        divergence.add(alignment_loss(projection, prior(inputs)), labels)
    return divergence.values()


class FedMASObjective(ClientObjective):
    """Measure (w), train with BSM + BSM + λ(2 − 2cos) while estimating ŵ, report RF."""

    @property
    def uses_class_prior(self) -> bool:
        return options_of(self.run).local_loss == "bsm"

    def build(self, state: State | None = None) -> nn.Module:
        model = build_fedmas_model(self.run)
        if state is not None:
            try:
                model.load_state_dict(state)
            except RuntimeError as err:
                detail = " ".join(str(err).split())[:300]
                raise DataError(
                    f"the received model does not fit the Fed-MAS model of this run: {detail}"
                ) from None
        return model

    def fit(self, received: State) -> LocalUpdate:
        run, options, device = self.run, options_of(self.run), self.context.device
        check_run(run)
        train = self.context.data.train
        if len(train) < 2:
            raise DataError(
                f"hospital {self.context.hospital.hospital}: Fed-MAS needs at least 2 training "
                f"samples (the projector has BatchNorm); the training split has {len(train)}"
            )
        prior, prior_info = hospital_prior(run, self.context.hospital)
        prior.to(device)
        counts = train.class_counts(run.num_classes)
        model: FedMASNet = self.build(received).to(device)  # type: ignore[assignment]
        started = time.perf_counter()

        # Step 1, global measurement with the received model.
        w = measure_divergence(model, prior, train, device, run.batch_size, counts)

        # Step 2, local training with state estimation.
        loop = LocalLoop.for_run(run, device)
        settings = OptimizerSettings.of(run)
        private = run.dp == "dp-sgd"
        updater: Updater | PrivateUpdater = (  # DP: per-sample clipping replaces grad-clip-norm
            loop.private_updater(model, settings, run)
            if private
            else loop.updater(model.parameters(), settings, options.grad_clip_norm)
        )
        site, state_name = self.context.site, f"{OPTIMIZER_STATE}_{run.optimizer}"
        restored = (  # the optimiser's state persists at the site across rounds
            options.persist_optimizer
            and site.has(state_name)
            and updater.restore(site.load(state_name))
        )
        # the balanced softmax's prior: under DP the site's DP release of the counts (w and ŵ
        # keep the exact ones, outside DP: docs/privacy.md, section 6)
        prior_counts = self.context.prior_counts() if self.uses_class_prior else counts
        log_prior = class_log_prior(torch.tensor(prior_counts)).to(device)
        w_hat = ClassDivergence(counts)

        def step(batch: tuple[torch.Tensor, torch.Tensor]) -> StepResult:
            inputs, labels = batch
            if len(labels) == 0:  # an empty Poisson batch (DP only): a noise-only step
                assert isinstance(updater, PrivateUpdater)
                updater.step(None)
                return 0, {}
            with loop.autocast():
                logits, projection, aux_logits = model.heads(inputs)
                features = prior(inputs)
            if options.local_loss == "bsm":
                task = balanced_softmax_loss(logits, labels, log_prior)
                aux = balanced_softmax_loss(aux_logits, labels, log_prior)
            else:
                task = F.cross_entropy(logits.float(), labels)
                aux = F.cross_entropy(aux_logits.float(), labels)
            divergence = alignment_loss(projection, features)
            loss = task + aux + options.align_weight * divergence.mean()
            w_hat.add(divergence, labels)  # before the step, in train mode
            updater.step(loss)
            align = divergence.mean()
            return len(labels), {"loss": loss, "task": task, "aux": aux, "align": align}

        if private:
            batches, budget = loop.private_batches(train, run)
        else:
            batches, budget = loop.round_batches(
                train,
                run,
                self.generator(),
                drop_last=len(train) > run.batch_size,  # no batch of 1 for the BatchNorm
            )
        model.train()
        try:
            stats = loop.run(budget, batches, step)
        finally:
            if isinstance(updater, PrivateUpdater):
                updater.close()
        if options.persist_optimizer:
            site.save(state_name, updater.state())

        # Step 3, the robust factor.
        rf = robust_factor(w, w_hat.values(), inverse=options.aggregation == "mas_inv")
        metrics: dict[str, float | list[float]] = {
            "mas_rf": rf,
            "mas_w": w,
            "mas_w_hat": w_hat.values(),
            "train_task_loss": stats.means.get("task", 0.0),
            "train_aux_loss": stats.means.get("aux", 0.0),
            "train_align_loss": stats.means.get("align", 0.0),
            "train_optimizer_restored": float(bool(restored)),
        }
        return LocalUpdate(
            {k: v.detach().cpu() for k, v in model.state_dict().items()},
            stats.loss,
            stats.num_examples,
            time.perf_counter() - started,
            stats.steps,
            metrics=metrics,
            info=prior_info,
        )


# ------------------------------------------------------------------------------ the server


class FedMASStrategy(ServerAlgorithm):
    """Averages full states with the weights ``RF_k / Σ RF`` (or the configured variant)."""

    state_attributes = ("history", "prior_seen")
    secure_aggregation_refusal = (
        "Fed-MAS weights each hospital by its own robust factor, which the coordinator must "
        "see per hospital, and checks each one's prior hash (docs/fedmas.md)"
    )

    def __init__(self, run: RunConfig, results: Any = None) -> None:
        super().__init__(run, results)
        self.options = options_of(run)
        self.history: dict[str, Any] = {}
        self.prior_seen: dict[str, str] = {}

    def initial_state(self) -> State:
        """The Fed-MAS model (backbone + heads + projector) built from the run seed."""
        check_run(self.run)
        return build_fedmas_model(self.run, seed=self.run.seed).state_dict()

    def _check_priors(self, server_round: int, replies: list[Reply]) -> None:
        """Refuse to mix updates measured against different priors (MAS-2)."""
        hashes = {r.hospital: str(r.info.get("prior_content_sha256", "")) for r in replies}
        self.prior_seen.update(hashes)
        distinct = sorted(set(self.prior_seen.values()))
        if len(distinct) > 1:
            by_hash = {
                h: ", ".join(sorted(n for n, v in self.prior_seen.items() if v == h))
                for h in distinct
            }
            groups = "; ".join(f"{h[:12] or '<none>'}: {names}" for h, names in by_hash.items())
            raise IntegrityError(
                f"round {server_round}: hospitals report different Fed-MAS priors (weights "
                f"SHA-256 {groups}); every hospital must use the bit-identical prior"
            )

    def aggregate(
        self, server_round: int, replies: list[Reply], exchange: Exchange = TRAIN
    ) -> ArrayRecord | None:
        self._check_priors(server_round, replies)
        states = replies_to_numpy(replies)
        keys = set(states[0])
        for reply, state in zip(replies, states, strict=True):
            if set(state) != keys:
                raise FedClinicError(
                    f"round {server_round}: hospital {reply.hospital} sent a model with different "
                    "entries from the others (is every hospital on the same run config?)"
                )
        rf = [float(r.metrics.get("mas_rf", math.nan)) for r in replies]
        n = [r.num_train for r in replies]
        options = self.options
        weights, rule = aggregation_weights(
            options.aggregation,
            rf,
            n,
            server_round,
            self.run.rounds,
            options.drw_start,
            options.drw_beta,
        )
        if "fallback" in rule:
            log(
                WARNING,
                "round %d: robust factors %s unusable; FedAvg weights used",
                server_round,
                rf,
            )
        plain = fedavg_weights(n)
        per_hospital: dict[str, Any] = {}
        rows = []
        for reply, r, weight, fedavg_weight, count in zip(
            replies, rf, weights, plain, n, strict=True
        ):
            row = FedMASAggregationRow(
                round=server_round,
                hospital=reply.hospital,
                node_id=reply.node_id,
                method=options.aggregation,
                rule=rule,
                rf=r,
                weight=weight,
                fedavg_weight=fedavg_weight,
                num_train=int(count),
                w=[float(v) for v in reply.metrics.get("mas_w", [])],
                w_hat=[float(v) for v in reply.metrics.get("mas_w_hat", [])],
            )
            per_hospital[reply.hospital] = row.model_dump(include=HISTORY_FIELDS)
            rows.append(row)
        self.history[str(server_round)] = {"rule": rule, "hospitals": per_hospital}
        self.record(rows)
        return numpy_to_record(weighted_average(states, weights))

    def summary_extra(self) -> dict[str, Any]:
        options = self.options
        random = options.prior_source == "random"
        hashes = sorted(set(self.prior_seen.values()))
        return {
            "fedmas": {
                "aggregation": options.aggregation,
                "align_weight": options.align_weight,
                "local_loss": options.local_loss,
                "backbone": self.run.model,
                "prior": {
                    "source": options.prior_source,
                    "arch": options.prior_arch,
                    "sha256": options.prior_sha256.lower() or None,
                    "content_sha256": hashes[0] if len(hashes) == 1 else None,
                    "degraded": random,
                    "note": (
                        "randomly initialised frozen prior (MAS-2 substitute 4): results are "
                        "degraded"
                        if random
                        else "shared prior file checked by SHA-256 at every hospital"
                    ),
                },
                "rounds": self.history,
            }
        }


ALGORITHM = Algorithm(
    check=check_run,
    name="fedmas",
    strategy=FedMASStrategy,
    objective=FedMASObjective,
    options=FedMASOptions,
    description="Fed-MAS: aggregation weighted by class-wise divergence from a frozen SSL prior",
)
