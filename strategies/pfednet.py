"""pFedNet (arXiv 2306.14483): shared + personalised components coupled by a data graph.

Each hospital's model is ``w_n = M x + N z_n``: the shared part ``x`` (the feature layers)
is averaged FedAvg-style; the personalised parts ``Z = [z_1 .. z_N]`` (by default the
classifier; every parameter of logistic regression; for segmentation the UNet's decoder, its
up-sampling blocks and final convolution, the reference's commented UNet option) stay
different per hospital but are pulled together along a similarity graph by the server's
coupled proximal step
``min_Z (1/N)<G, Z> + lambda sum_(i,j) ||z_i - z_j||_2 + (1/2 eta)||Z - Z_t||^2``.

Protocol (the reference's deep version; docs/pfednet.md#the-algorithm), one fedclinic round =
two exchanges:

0. Once, before round 1: the server asks every hospital for a data sketch
   (:meth:`PFedNetObjective.describe`) and builds the symmetric k-NN graph and Q.
1. *Shared phase* (the round's regular message): the hospital evaluates its personalised
   model ``x + z_n``, then trains the shared layers with the personal ones frozen and uploads
   the shared pseudo-gradient; the server averages by training-set size.
2. *Personal phase* (the round's second exchange, declared by
   :meth:`PFedNetStrategy.exchanges`; train only, to the hospitals whose shared update was
   accepted): the hospital loads the new ``x`` and its ``z_n``, trains the personal layers
   with the shared ones frozen and uploads ``G_n = z_n(before) - z_n(after)``; the server
   runs the ADMM and keeps ``Z``. The message carries only the entries the shared average
   changed: the hospital holds ``z_n`` and the rest in the model it saved in phase 1
   (:meth:`PFedNetStrategy.personal_delta`, :meth:`PFedNetObjective.held_model`). With no
   shared parameter (logistic regression) the round's only exchange is this phase, and it
   evaluates first.

Both exchanges go through the round engine (retries, re-sends, validation, audit); an
update the decoder cannot read is ``rejected`` like any other bad update.

Each hospital receives its own column ``z_n``, keyed by hospital name (node ids change when
a SuperNode restarts); the hospital keeps it in its :class:`~fedclinic.site.SiteState`.

Design decisions (IDs defined in docs/pfednet.md#decisions):

- PF-1: the sketch is sent once, in the setup query, and only then. Label-ratio sketch
  (class counts; the server divides by the federation's total as the convex code does) for
  tabular models, the deep code's pixel covariance for images (pooled to at most
  ``sketch-image-size`` per side; upper triangle only, distances unchanged), the mean
  training image for segmentation (the deep code's segmentation sketch, pooled alike). Optional
  DP-noised sketch: ``sketch-epsilon`` > 0 adds Laplace(2/epsilon) noise to the class
  counts (epsilon-DP per record; label-ratio sketch only). The reference sends exact
  sketches and has no noise option.
- PF-2: the server step size eta is ``server-step-size``; 0 (default) means eta = N, which
  keeps the full local step. The deep code fixes eta = 0.01 (keeps ~0.2% of the local update
  for N = 5). The fusion threshold per round is eta * lambda, so ``fusion-lambda`` defaults
  to 0.144: eta * lambda = 0.72 at N = 5, the deep code's 0.01 * 72.
- PF-3: the "differentially sparse regularizer" is the fused-lasso term gamma ||D(.)||_1 of
  the client-side compression; ||ZQ||_{1,2} is the personalisation regularizer. The
  compression (``compression = fused-stc``) solves the proximal step to near convergence in
  the equivalent variables v = (w - y)/eta (w and eta cancel), with gamma relative to the
  update's RMS; the reference runs 20 ADMM iterations in y from y = 0 with an absolute
  gamma = 50, whose exact solution would zero most updates.
- PF-4: ``(I + eta rho QQ^T)^-1`` from one eigendecomposition of QQ^T at graph build;
  ``(I + rho D^T D)^-1`` from the closed-form eigendecomposition of D^T D. The reference
  calls ``torch.inverse`` every ADMM iteration and ``eigh`` for D^T D.

Project choice beyond the IDs: both phases train with the balanced softmax ``CE(z + log pi,
y)`` of the hospital's own class prior (``pfednet.local-loss = "bsm"``; the reference's plain
CE is ``"ce"``): personal heads trained with CE carry their hospital's label prior, which the
fusion term mixes between hospitals (docs/pfednet.md, "Label skew").
"""

from __future__ import annotations

import fnmatch
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Any, Literal

import numpy as np
import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict
from flwr.common import log
from pydantic import Field
from torch import nn

from fedclinic import messages as keys
from fedclinic.config import RunConfig, Schema
from fedclinic.engine import Exchange, Hospital, Reply, ServerAlgorithm
from fedclinic.errors import ConfigError, DataError, IntegrityError
from fedclinic.models import MODELS, build_model, personal_prefixes
from fedclinic.rows import CommunicationRow, PFedNetAdmmRow, PFedNetGraphRow
from fedclinic.serialization import (
    State,
    file_sha256,
    load_checkpoint,
    numpy_to_record,
    record_to_numpy,
    to_wire,
)
from fedclinic.training import seeded_generator, train_local
from strategies import pfednet_math as pm
from strategies.balanced_loss import BalancedLossObjective, LocalLoss
from strategies.base import Algorithm, ClientObjective, LocalUpdate
from strategies.fedavg import weighted_average

SKETCH_KEY = keys.PFEDNET_SKETCH  # setup query config: whether to compute the sketch
#: the round's exchanges: shared layers (evaluate first), then personal layers (train only)
SHARED = Exchange("shared")
PERSONAL = Exchange("personal", evaluate=False)
#: with no shared layer (logistic regression) the personal phase is the round's only exchange
PERSONAL_ONLY = Exchange("personal")
MARKER = "pfednet.column"  # array naming the hospital whose personalised column was sent
#: personal exchange: the SHA-256 (hex, as bytes) of the model file the hospital saved in
#: this round's shared exchange; the entries the message leaves out are taken from it
BASE = "pfednet.base"
PERSONAL_STATE = "pfednet_personal"  # site state: this hospital's personalised parameters
DEPLOYED_STATE = "pfednet_model"  # site state: the full personalised model as evaluated
SketchKind = Literal["label-ratio", "covariance", "feature-mean"]


def text_array(text: str) -> np.ndarray:
    """``text`` as a uint8 array, for a name or hash that travels among the model's arrays."""
    return np.frombuffer(text.encode(), dtype=np.uint8).copy()


def text_of(array: torch.Tensor) -> str:
    """The text :func:`text_array` carried, from the tensor the hospital received."""
    return bytes(array.numpy().astype(np.uint8)).decode()


class PFedNetOptions(Schema):
    personal_layers: str = Field(
        "",
        description="comma-separated parameter-name prefixes or globs of the personalised "
        "component; empty = the model's head (all of logreg), or a UNet's decoder",
    )
    sketch: Literal["auto", "label-ratio", "covariance", "feature-mean"] = "auto"
    sketch_image_size: int = Field(32, ge=1, le=256)
    sketch_epsilon: float = Field(0.0, ge=0, description="Laplace DP on counts; 0 = exact")
    allow_rank_deficient_sketch: bool = Field(
        False,
        description="send a covariance sketch of fewer image rows than pixels, which reveals "
        "the span of the hospital's images; refused at the hospital otherwise",
    )
    knn_k: int = Field(3, ge=1, le=1000)
    fusion_lambda: float = Field(0.144, ge=0)
    server_step_size: float = Field(0.0, ge=0, description="eta; 0 = number of graph hospitals")
    admm_rho: float = Field(1.0, gt=0)
    admm_iterations: int = Field(200, ge=1, le=100_000)
    compression: Literal["none", "stc", "fused-stc"] = "none"
    compression_gamma: float = Field(1.0, ge=0, description="relative to the update's RMS")
    compression_ratio: float = Field(0.2, gt=0, le=1)
    compression_chunk: int = Field(3000, ge=2, le=20_000)
    compression_iterations: int = Field(50, ge=1, le=10_000)
    local_loss: LocalLoss = Field(
        "bsm",
        description="supervised loss of both phases: balanced softmax with the hospital's "
        "class prior (bsm) or plain cross-entropy (ce, reference)",
    )


def options_of(run: RunConfig) -> PFedNetOptions:
    options = run.options.get("pfednet")
    return options if isinstance(options, PFedNetOptions) else PFedNetOptions()


def resolve_sketch(run: RunConfig) -> SketchKind:
    """The sketch kind: label ratios for tabular models, pixel covariance for images, the
    mean image for segmentation (the deep code's ``cov`` for segmentation; PF-1)."""
    options = options_of(run)
    kind: SketchKind
    if options.sketch == "auto" and run.task == "segmentation":
        kind = "feature-mean"
    elif options.sketch == "auto":
        kind = "label-ratio" if MODELS[run.model].tabular else "covariance"
    else:
        kind = options.sketch
    if options.sketch_epsilon > 0 and kind != "label-ratio":
        raise ConfigError(
            f"run config: key 'pfednet.sketch-epsilon' = {options.sketch_epsilon} is not allowed: "
            f"the Laplace mechanism is implemented for sketch = label-ratio only "
            f"(the sketch is '{kind}' for model '{run.model}')"
        )
    return kind


def compression_settings(run: RunConfig, device: torch.device | str) -> dict[str, Any]:
    options = options_of(run)
    return {
        "gamma": options.compression_gamma,
        "ratio": options.compression_ratio,
        "chunk": options.compression_chunk,
        "iterations": options.compression_iterations,
        "device": device,
    }


# ------------------------------------------------------------------------------ layer split


def _matches(name: str, pattern: str) -> bool:
    """A glob when the pattern has wildcards, else a name prefix."""
    if any(ch in pattern for ch in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return name.startswith(pattern)


def _array(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


@dataclass(frozen=True)
class LayerSplit:
    """Which parameters are personalised (z) and which shared (x); buffers are always shared."""

    personal: tuple[str, ...]
    shared: tuple[str, ...]
    buffers: tuple[str, ...]
    shapes: Mapping[str, tuple[int, ...]]

    @classmethod
    def of(cls, model: nn.Module, run: RunConfig) -> LayerSplit:
        option = options_of(run).personal_layers
        patterns = [p.strip() for p in option.split(",") if p.strip()] or list(
            personal_prefixes(run)
        )
        parameters = [name for name, _ in model.named_parameters()]
        for pattern in patterns:
            if not any(_matches(name, pattern) for name in parameters):
                roots = sorted({name.split(".")[0] + "." for name in parameters})
                raise ConfigError(
                    f"run config: key 'pfednet.personal-layers' = {option!r} is not allowed: "
                    f"pattern {pattern!r} matches no parameter of model '{run.model}' "
                    f"(its parameters start with {', '.join(roots)})"
                )
        personal = {n for n in parameters if any(_matches(n, p) for p in patterns)}
        state = model.state_dict()
        return cls(
            personal=tuple(n for n in state if n in personal),
            shared=tuple(n for n in state if n in parameters and n not in personal),
            buffers=tuple(n for n in state if n not in parameters),
            shapes={n: tuple(v.shape) for n, v in state.items()},
        )

    def size(self, names: Sequence[str]) -> int:
        return int(sum(int(np.prod(self.shapes[n])) for n in names))

    def flatten(self, state: Mapping[str, Any], names: Sequence[str]) -> np.ndarray:
        if not names:
            return np.zeros(0)
        return np.concatenate([_array(state[n]).astype(np.float64).reshape(-1) for n in names])

    def unflatten(
        self, vector: np.ndarray, names: Sequence[str], like: Mapping[str, Any]
    ) -> dict[str, np.ndarray]:
        """Entries of ``names`` from a flat vector, in the dtype of ``like``'s entries."""
        out: dict[str, np.ndarray] = {}
        offset = 0
        for name in names:
            count = int(np.prod(self.shapes[name]))
            dtype = _array(like[name]).dtype
            out[name] = vector[offset : offset + count].reshape(self.shapes[name]).astype(dtype)
            offset += count
        return out


def split_of(run: RunConfig) -> LayerSplit:
    return LayerSplit.of(build_model(run), run)


# ------------------------------------------------------------------------------------ client


class PFedNetObjective(BalancedLossObjective, ClientObjective):
    """Hospital half: sketch once, then the shared and personal phases of every round."""

    deployed_kind = "personal"
    local_loss_options = PFedNetOptions

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        self.options = options_of(self.run)
        self._split: LayerSplit | None = None
        self._resolved: tuple[State, bool] | None = None

    @property
    def split(self) -> LayerSplit:
        if self._split is None:
            self._split = split_of(self.run)
        return self._split

    # -- setup query
    def describe(self, content: RecordDict) -> dict[str, float | list[float]]:
        """The data sketch for the similarity graph (PF-1); aggregate statistics only."""
        config = dict(content[keys.CONFIG]) if keys.CONFIG in content.config_records else {}
        answer = super().describe(content)
        if self.hides_counts:  # any query, the setup's or a name-only one
            answer.pop(keys.CLASS_COUNTS)
        if not config.get(SKETCH_KEY, False):
            return answer  # a name-only query (a hospital that reconnected)
        kind = resolve_sketch(self.run)
        train = self.context.data.train
        if kind == "label-ratio":
            counts = [float(c) for c in train.class_counts(self.run.num_classes)]
            if self.hides_counts:
                rng = np.random.default_rng()  # fresh OS entropy: the server must not know it
                noisy = pm.noisy_counts(counts, self.options.sketch_epsilon, rng)
                return {**answer, "sketch": [float(c) for c in noisy]}
            return {**answer, "sketch": counts}
        if kind == "covariance":
            self.check_sketch_rank(train.inputs)
            sketch = pm.covariance_sketch(train.inputs, self.options.sketch_image_size)
        else:
            sketch = pm.feature_mean_sketch(train.inputs, self.options.sketch_image_size)
        return {**answer, "sketch": [float(v) for v in sketch]}

    def check_sketch_rank(self, inputs: torch.Tensor) -> None:
        """A covariance of fewer rows than columns has rank at most rows: the coordinator
        would learn the span of this hospital's centred images (PF-1). Refused in one line
        unless the run opts in; with the opt-in, one warning in the hospital's log."""
        size = self.options.sketch_image_size
        rows, columns, what = pm.covariance_shape(inputs, size)
        if rows >= columns:
            return
        if not self.options.allow_rank_deficient_sketch:
            smaller = (
                f", pfednet.sketch-image-size <= {math.isqrt(rows)}" if inputs.ndim == 4 else ""
            )
            raise ConfigError(
                f"pFedNet covariance sketch refused: {rows} training image rows for {what} at "
                f"pfednet.sketch-image-size = {size} give a covariance of rank at most {rows}, "
                f"which reveals the span of this hospital's images; use pfednet.sketch = "
                f'"label-ratio"{smaller}, or set pfednet.allow-rank-deficient-sketch = true '
                "to send it anyway"
            )
        log(
            WARNING,
            "pFedNet: sending a rank-deficient covariance sketch "
            "(pfednet.allow-rank-deficient-sketch = true): %d image rows for %s; the "
            "coordinator learns the span of this hospital's centred training images (at most "
            "%d dimensions of %d): every one of them lies in it",
            rows,
            what,
            rows,
            columns,
        )

    @property
    def hides_counts(self) -> bool:
        """Under the noised sketch no exact class count leaves the site on any path (PF-1):
        not in a query's answer, not in the data fingerprint of any reply."""
        return self.options.sketch_epsilon > 0

    def data_fingerprint(self) -> str:
        data = self.context.data
        return data.fingerprint(self.run.num_classes, class_counts=not self.hides_counts)

    # -- the received model
    def resolve(self, received: State) -> tuple[State, bool]:
        """The personalised model ``x + z_n`` and whether ``z_n`` is the server's column.

        The server's column is stored at the site; without one (a hospital outside the
        graph, or one the server could not identify) the site's stored column is used.
        """
        if self._resolved is not None:
            return self._resolved
        name = self.context.hospital.hospital
        marker = received.get(MARKER)
        column_of = None if marker is None else text_of(marker)
        if column_of is not None and column_of != name:  # never trained on, never kept
            raise IntegrityError(
                f"pFedNet: this message holds the personalised column of hospital "
                f"'{column_of}', not of '{name}' (meant for another hospital); refused"
            )
        own = column_of is not None
        state = {k: v for k, v in received.items() if not k.startswith("pfednet.")}
        base = received.get(BASE)
        if base is not None:  # the personal exchange: only what changed since the shared one
            state = {**self.held_model(text_of(base)), **state}
        missing = [k for k in self.split.shapes if k not in state]
        if missing:
            raise DataError(f"the received model lacks {len(missing)} entries, e.g. '{missing[0]}'")
        site = self.context.site
        if own:
            site.save(PERSONAL_STATE, {k: state[k] for k in self.split.personal})
        elif site.has(PERSONAL_STATE):
            saved = site.load(PERSONAL_STATE)
            for key in self.split.personal:
                if key not in saved or tuple(saved[key].shape) != self.split.shapes[key]:
                    raise IntegrityError(
                        f"site state '{site.path(PERSONAL_STATE)}' does not match model "
                        f"'{self.run.model}' (entry '{key}'); remove it to start afresh"
                    )
                state[key] = saved[key]
        self._resolved = (state, own)
        return self._resolved

    def held_model(self, sha256: str) -> State:
        """The model this hospital saved when it evaluated this round's shared exchange
        (``pfednet_model``), checked against the hash the coordinator was told."""
        site, server_round = self.context.site, self.context.server_round
        path = site.versions(DEPLOYED_STATE).get(server_round)
        found = None if path is None else file_sha256(path)
        if path is None or found != sha256:
            what = (
                "is missing"
                if found is None
                else f"differs from the one it reported (SHA-256 {found[:12]}, reported "
                f"{sha256[:12]})"
            )
            raise DataError(
                f"pFedNet personal exchange of round {server_round}: the model this hospital "
                f"saved in the round's shared exchange (site state '{DEPLOYED_STATE}') {what}; "
                "the coordinator sent only the entries that changed since"
            )
        return load_checkpoint(path)

    def deployed_model(self, received: State) -> nn.Module:
        """``x + z_n``, saved at the site each time it is evaluated (the final one is the model
        to deploy, the selected round's is kept beside it: fedclinic.site)."""
        state, _ = self.resolve(received)
        self.deployed_sha256 = self.context.site.save(DEPLOYED_STATE, state)["sha256"]
        return self.build(state)

    # -- training
    def fit(self, received: State) -> LocalUpdate:
        """The shared or the personal phase, as the message's exchange says."""
        state, own = self.resolve(received)
        personal = self.context.server_config.get(keys.EXCHANGE) == PERSONAL.name
        if self.split.shared and not personal:
            return self.shared_phase(state)
        return self.personal_phase(state, own)

    def _train(self, state: State, trainable: Sequence[str], phase: str) -> tuple[nn.Module, Any]:
        model = self.build(state)
        names = set(trainable)
        parameters = []
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(name in names)
            if name in names:
                parameters.append(parameter)
        generator = seeded_generator(
            self.run.seed, self.context.server_round, self.context.hospital.hospital, phase
        )
        stats = train_local(
            model,
            self.context.data.train,
            self.run,
            self.context.device,
            generator,
            objective=self.loss,
            parameters=parameters,
        )
        return model, stats

    def _encode(self, delta: np.ndarray, prefix: str) -> tuple[dict[str, torch.Tensor], float]:
        started = time.perf_counter()
        settings = compression_settings(self.run, self.context.device)
        arrays = pm.encode_update(delta, prefix, self.options.compression, **settings)
        tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
        return tensors, time.perf_counter() - started

    def shared_phase(self, state: State) -> LocalUpdate:
        """Train x with z frozen; upload x's pseudo-gradient and the (shared) buffers."""
        split = self.split
        model, stats = self._train(state, split.shared, "shared")
        after = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        delta = split.flatten(state, split.shared) - split.flatten(after, split.shared)
        upload, seconds = self._encode(delta, "shared.")
        upload.update({f"buffer.{k}": after[k] for k in split.buffers})
        return LocalUpdate(
            upload,
            stats.loss,
            stats.num_examples,
            stats.seconds,
            stats.steps,
            metrics={"train_compress_seconds": seconds},
            info={"phase": "shared"},
        )

    def personal_phase(self, state: State, own: bool) -> LocalUpdate:
        """Train z with x frozen; upload ``G_n = z(before) - z(after)``."""
        split = self.split
        model, stats = self._train(state, split.personal, "personal")
        after = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        if not own:  # no server column comes back: keep the local result (FedPer-like)
            self.context.site.save(PERSONAL_STATE, {k: after[k] for k in split.personal})
        delta = split.flatten(state, split.personal) - split.flatten(after, split.personal)
        upload, seconds = self._encode(delta, "personal.")
        return LocalUpdate(
            upload,
            stats.loss,
            stats.num_examples,
            stats.seconds,
            stats.steps,
            metrics={"train_compress_seconds": seconds},
            info={"phase": "personal", "in_graph": str(own).lower()},
        )


# ------------------------------------------------------------------------------------ server


class PFedNetStrategy(ServerAlgorithm):
    """Server half: the graph, the shared average, the ADMM step, the per-hospital columns."""

    state_attributes = (
        "state", "graph", "columns", "round", "traffic", "fedavg_bytes", "warned", "admm_log"
    )  # fmt: skip

    has_global_model = False  # each hospital deploys its own x + z_n
    secure_aggregation_refusal = (
        "pFedNet's ADMM step needs each hospital's personal update and its graph weights "
        "per hospital (docs/pfednet.md)"
    )
    #: uploads are split into shared/personal parts and may be compressed (PF-4): their
    #: layout is checked by the decoder (check_update); the engine checks NaN/Inf only
    checks_update_layout = False
    #: each hospital receives its own column, found by hospital name
    needs_names = True

    def __init__(self, run: RunConfig, results: Any = None) -> None:
        super().__init__(run, results)
        self.options = options_of(run)
        resolve_sketch(run)  # a bad option fails before any hospital is contacted
        self.split: LayerSplit = split_of(run)
        self.state: dict[str, np.ndarray] = {}  # x and buffers (personal entries: a template)
        self.graph: pm.Graph | None = None
        self.columns = np.zeros((self.split.size(self.split.personal), 0))
        self.round = 0
        self.traffic: dict[int, dict[str, dict[str, float]]] = {}
        self.fedavg_bytes: dict[int, tuple[int, int]] = {}
        self.warned: set[str] = set()
        self.admm_log: list[dict[str, Any]] = []
        #: this round's shared exchange: x and buffers as sent (the arrays, not copies:
        #: updates replace them), and the hash of the model each accepted hospital saved
        self.sent_shared: dict[str, np.ndarray] | None = None
        self.held: dict[str, str] = {}

    # -- setup: the similarity graph (PF-1)
    def setup_query(self) -> dict[str, Any]:
        """Every hospital's data sketch."""
        return {SKETCH_KEY: True}

    def setup(self, replies: list[Reply], initial_arrays: ArrayRecord) -> None:
        self.state = record_to_numpy(initial_arrays)
        kind = resolve_sketch(self.run)
        names = [r.hospital for r in replies]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigError(
                f"hospital config: key 'hospital' = {duplicates[0]!r} is used by more than one "
                "node; every hospital needs a unique name"
            )
        replies = sorted(replies, key=lambda r: r.hospital)
        sketches = [self._sketch(r) for r in replies]
        lengths = {len(s) for s in sketches}
        if len(lengths) != 1:
            detail = ", ".join(
                f"{r.hospital}: {len(s)}" for r, s in zip(replies, sketches, strict=True)
            )
            raise ConfigError(
                f"hospital sketches differ in length ({detail}); the run config must match"
            )
        matrix = np.array(sketches, dtype=np.float64)
        if kind == "label-ratio":
            matrix = matrix / max(float(matrix.sum()), 1e-12)  # share of all samples (convex code)
            distances = pm.pairwise_distances(matrix, "l2")
        elif kind == "covariance":
            distances = pm.pairwise_distances(matrix, "l1", pm.triangle_weights(matrix.shape[1]))
        else:
            distances = pm.pairwise_distances(matrix, "l2")
        self.graph = pm.Graph.build([r.hospital for r in replies], distances, self.options.knn_k)
        z0 = self.split.flatten(self.state, self.split.personal)
        self.columns = np.repeat(z0[:, None], len(replies), axis=1)
        sketch_bytes = self._count_sketches(replies)
        log(
            INFO,
            "pFedNet graph (%s sketch, k = %d): %d hospitals, edges %s",
            kind,
            self.options.knn_k,
            len(replies),
            self.graph.named_edges(),
        )
        self.record(
            [
                PFedNetGraphRow(
                    round=0,
                    sketch=kind,
                    knn_k=self.options.knn_k,
                    hospitals=list(self.graph.hospitals),
                    edges=self.graph.named_edges(),
                    sketch_bytes=sketch_bytes,
                    personal_entries=self.split.size(self.split.personal),
                    shared_entries=self.split.size(self.split.shared),
                )
            ]
        )
        self._write_traffic(0)

    def _count_sketches(self, replies: list[Reply]) -> list[int]:
        """The sketch's bytes (its MetricRecord, as on the wire), counted as the hospital's
        upload of round 0 (the setup): FedAvg sends nothing then."""
        self.round = 0
        sizes = []
        for reply in replies:
            size, deflated = pm.record_bytes(MetricRecord(self._sketch_only(reply)))
            self._count(reply.hospital, "sketch_upload_bytes", size)
            self._count(reply.hospital, "upload_bytes", size)
            self._count(reply.hospital, "upload_deflate_bytes", deflated)
            sizes.append(size)
        return sizes

    @staticmethod
    def _sketch(reply: Reply) -> list[float]:
        sketch = reply.metrics.get("sketch")
        if not isinstance(sketch, list) or not sketch:
            raise DataError(f"hospital {reply.hospital} sent no data sketch in its setup reply")
        return [float(v) for v in sketch]

    @staticmethod
    def _sketch_only(reply: Reply) -> dict[str, int | float | list[int] | list[float]]:
        return {"sketch": [float(v) for v in reply.metrics["sketch"]]}

    # -- the round: which exchanges, what each hospital receives
    def exchanges(self, server_round: int) -> tuple[Exchange, ...]:
        return (SHARED, PERSONAL) if self.split.shared else (PERSONAL_ONLY,)

    def round_config(self, server_round: int, exchange: Exchange) -> dict[str, Any]:
        self.round = server_round  # byte counts are kept per round
        if exchange != PERSONAL:  # a round's first exchange: nothing held from it yet
            self.sent_shared, self.held = None, {}
        return {}

    def arrays_for(
        self, hospital: Hospital, arrays: ArrayRecord, exchange: Exchange
    ) -> ArrayRecord:
        """The shared x plus this hospital's personalised column, found by hospital name;
        in the personal exchange only the entries that changed since the shared one (the
        new x), on top of the model the hospital saved then (:meth:`personal_delta`)."""
        name = hospital.name
        personal = self._column(name)
        state = {**self.state, **self.split.unflatten(personal, self.split.personal, self.state)}
        if exchange == SHARED and self.sent_shared is None:
            self.sent_shared = dict(self.state)
        if exchange == PERSONAL and name in self.held:
            state = self.personal_delta(state, self.held[name])
        if self.graph is not None and name in self.graph.hospitals:
            state[MARKER] = text_array(name)
        record = to_wire(numpy_to_record(state), self.run.wire_dtype)  # counted as sent
        size, _ = pm.record_bytes(record)
        self._count(name, "download_bytes", size)
        return record

    def personal_delta(self, state: dict[str, np.ndarray], held: str) -> dict[str, np.ndarray]:
        """What a hospital lacks for the personal phase: the entries of x and the buffers
        that the shared average changed. Its column ``z_n`` is the one it received in the
        shared exchange (only the personal phase's ADMM moves columns), so it is left out,
        as is every unchanged entry; ``BASE`` names the model the rest comes from."""
        sent = self.sent_shared or {}
        changed = {
            key: state[key]
            for key in (*self.split.shared, *self.split.buffers)
            if key not in sent
            or not (sent[key] is self.state[key] or np.array_equal(sent[key], self.state[key]))
        }
        return {**changed, BASE: text_array(held)}

    def _column(self, name: str) -> np.ndarray:
        if self.graph is not None and name in self.graph.hospitals:
            return self.columns[:, self.graph.hospitals.index(name)]
        if self.graph is not None and name not in self.warned:
            self.warned.add(name)
            log(WARNING, "pFedNet: %s is not in the similarity graph; it keeps its own z", name)
        return self.columns.mean(axis=1) if self.columns.shape[1] else self._template()

    def _template(self) -> np.ndarray:
        return self.split.flatten(self.state, self.split.personal)

    # -- aggregation: shared average, then (second exchange) the ADMM
    def check_update(self, reply: Reply, exchange: Exchange) -> str | None:
        """The decoder's verdict on an upload (wrong size, missing codes or buffers)."""
        prefix = "shared." if exchange.name == SHARED.name else "personal."
        try:
            self._decode(reply, prefix)
        except DataError as err:
            return f"unusable {prefix[:-1]} update: {err}"
        return None

    def aggregate(
        self, server_round: int, replies: list[Reply], exchange: Exchange = SHARED
    ) -> ArrayRecord | None:
        if exchange.name == SHARED.name:
            self._apply_shared(server_round, replies)
            return None  # the round's model is complete after the personal phase
        self._apply_personal(server_round, replies)
        return numpy_to_record(self.global_state())

    def _decode(self, reply: Reply, prefix: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        assert reply.arrays is not None
        arrays = record_to_numpy(reply.arrays)
        names = self.split.shared if prefix == "shared." else self.split.personal
        delta = pm.decode_update(arrays, prefix, self.split.size(names))
        if prefix == "shared.":
            missing = [b for b in self.split.buffers if f"buffer.{b}" not in arrays]
            if missing:
                raise DataError(f"the shared update lacks buffer '{missing[0]}'")
        return delta, arrays

    def _uploads(
        self, replies: list[Reply], prefix: str
    ) -> list[tuple[Reply, np.ndarray, dict[str, np.ndarray]]]:
        """Decoded accepted updates (check_update decoded them once already), with their bytes
        counted."""
        decoded = []
        for reply in replies:
            assert reply.arrays is not None
            delta, arrays = self._decode(reply, prefix)
            wire = reply.received if reply.received is not None else reply.arrays
            upload, deflated = pm.record_bytes(wire)  # as it crossed the wire
            self._count(reply.hospital, f"{prefix[:-1]}_upload_bytes", upload)
            self._count(reply.hospital, "upload_bytes", upload)
            self._count(reply.hospital, "upload_deflate_bytes", deflated)
            decoded.append((reply, delta, arrays))
        return decoded

    def _apply_shared(self, server_round: int, replies: list[Reply]) -> None:
        """x <- x - sum_n (n_n / n) g_n: FedAvg of the shared layers (docs/pfednet.md, step 2)."""
        self.held = {
            r.hospital: str(r.info[keys.DEPLOYED_SHA256])
            for r in replies
            if isinstance(r.info.get(keys.DEPLOYED_SHA256), str)
        }
        decoded = self._uploads(replies, "shared.")
        weights = np.array([r.num_train for r, _, _ in decoded])
        step = sum(w * d for w, (_, d, _) in zip(weights / weights.sum(), decoded, strict=True))
        x = self.split.flatten(self.state, self.split.shared) - step
        self.state.update(self.split.unflatten(x, self.split.shared, self.state))
        if self.split.buffers:
            buffers = [
                {b: arrays[f"buffer.{b}"] for b in self.split.buffers} for _, _, arrays in decoded
            ]
            self.state.update(weighted_average(buffers, list(weights)))

    def server_step_size(self) -> float:
        """PF-2: eta; 0 means N (the number of graph hospitals): the full local step."""
        n = len(self.graph.hospitals) if self.graph else 1
        return self.options.server_step_size or float(n)

    def _apply_personal(self, server_round: int, replies: list[Reply]) -> None:
        """The coupled proximal step over every graph hospital's column (docs/pfednet.md step 4)."""
        assert self.graph is not None
        decoded = self._uploads(replies, "personal.")
        g = np.zeros_like(self.columns)
        updated = []
        for reply, delta, _ in decoded:
            if reply.hospital in self.graph.hospitals:
                g[:, self.graph.hospitals.index(reply.hospital)] = delta
                updated.append(reply.hospital)
        eta = self.server_step_size()
        previous = self.columns
        started = time.perf_counter()
        self.columns = pm.admm_personal_step(
            previous,
            g,
            self.graph.q,
            self.options.fusion_lambda,
            eta,
            self.options.admm_rho,
            self.options.admm_iterations,
            self.graph.inverse,
        )
        differences = np.linalg.norm(self.columns @ self.graph.q, axis=0)
        scale = max(float(np.abs(self.columns).max(initial=0.0)), 1.0)
        row = PFedNetAdmmRow(
            round=server_round,
            eta=eta,
            fusion_lambda=self.options.fusion_lambda,
            objective=pm.personal_objective(
                self.columns, previous, g, self.graph.q, self.options.fusion_lambda, eta
            ),
            fused_edges=int((differences <= 1e-6 * scale).sum()),
            edges=len(self.graph.edges),
            hospitals_updated=updated,
            seconds=time.perf_counter() - started,
        )
        self.admm_log.append(row.dump())
        self.record([row])

    def global_state(self) -> dict[str, np.ndarray]:
        """x with the mean personalised column: what Flower's loop carries between rounds."""
        mean = self.columns.mean(axis=1) if self.columns.shape[1] else self._template()
        return {**self.state, **self.split.unflatten(mean, self.split.personal, self.state)}

    # -- byte accounting (PF-3): rows per round per hospital, beside FedAvg's
    def _count(self, hospital: str, key: str, value: float) -> None:
        slot = self.traffic.setdefault(self.round, {}).setdefault(hospital, {})
        slot[key] = slot.get(key, 0) + value

    def after_round(self, server_round: int, arrays: ArrayRecord) -> None:
        """This round's byte counts (``rounds + 1``: the final evaluation's downloads)."""
        self._write_traffic(server_round)

    def _fedavg_bytes(self, server_round: int) -> tuple[int, int]:
        """What FedAvg sends per hospital each way: the full float model at the run's
        ``wire-dtype``, raw and DEFLATEd."""
        if server_round not in self.fedavg_bytes:
            full = to_wire(numpy_to_record(self.global_state()), self.run.wire_dtype)
            self.fedavg_bytes[server_round] = pm.record_bytes(full)
        return self.fedavg_bytes[server_round]

    def _traffic_of(self, server_round: int, counts: Mapping[str, float]) -> dict[str, int]:
        """One hospital's bytes of one round beside FedAvg's: the full model down in every
        round, up in a round the hospital trained in; nothing at the setup (round 0), where
        pFedNet sends its sketch."""
        fedavg = {"fedavg_upload_bytes": 0, "fedavg_upload_deflate_bytes": 0}
        full = 0
        if server_round > 0:
            full, deflated = self._fedavg_bytes(server_round)
            if "shared_upload_bytes" in counts or "personal_upload_bytes" in counts:
                fedavg = {"fedavg_upload_bytes": full, "fedavg_upload_deflate_bytes": deflated}
        own = ("upload_bytes", "upload_deflate_bytes", "sketch_upload_bytes",
               "shared_upload_bytes", "personal_upload_bytes", "download_bytes")  # fmt: skip
        return {
            **{key: int(counts.get(key, 0)) for key in own},
            **fedavg,
            "fedavg_download_bytes": full,
        }

    def _write_traffic(self, server_round: int) -> None:
        rows = [
            CommunicationRow.model_validate(
                {
                    "round": server_round,
                    "hospital": hospital,
                    "compression": self.options.compression,
                    **self._traffic_of(server_round, counts),
                }
            )
            for hospital, counts in sorted(self.traffic.get(server_round, {}).items())
        ]
        self.record(rows)

    def summary_extra(self) -> dict[str, Any]:
        totals: dict[str, dict[str, int]] = {}
        summed = ("upload_bytes", "upload_deflate_bytes", "sketch_upload_bytes",
                  "download_bytes", "fedavg_upload_bytes", "fedavg_upload_deflate_bytes",
                  "fedavg_download_bytes")  # fmt: skip
        for server_round, hospitals in self.traffic.items():
            for hospital, counts in hospitals.items():
                slot = totals.setdefault(hospital, {})
                traffic = self._traffic_of(server_round, counts)
                for key in summed:
                    slot[key] = slot.get(key, 0) + traffic[key]
        graph = self.graph
        return {
            "pfednet": {
                "hospitals": list(graph.hospitals) if graph else [],
                "edges": graph.named_edges() if graph else [],
                "sketch": resolve_sketch(self.run),
                "personal_parameters": list(self.split.personal),
                "server_step_size": self.server_step_size(),
                "fusion_lambda": self.options.fusion_lambda,
                "compression": self.options.compression,
                "communication": totals,
            }
        }


def check_run(run: RunConfig) -> None:
    """``Algorithm.check``: the sketch options fit the run (the personal-layer patterns need
    the built model: the strategy checks them when it starts)."""
    resolve_sketch(run)


ALGORITHM = Algorithm(
    check=check_run,
    name="pfednet",
    strategy=PFedNetStrategy,
    objective=PFedNetObjective,
    options=PFedNetOptions,
    description="pFedNet: shared layers averaged; personalised layers coupled by a data graph",
    tasks=("classification", "segmentation"),
)
