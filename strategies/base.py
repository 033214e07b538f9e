"""The two halves every algorithm implements, and the registry entry that pairs them.

An :class:`Algorithm` pairs

- a server half, a :class:`fedclinic.engine.ServerAlgorithm` subclass that runs at the
  coordinator under the round engine (:mod:`fedclinic.engine`): which exchanges a round has,
  what each hospital receives, how replies are aggregated; and
- a :class:`ClientObjective` that runs at each hospital: which model the hospital deploys
  (and evaluates), and how it trains locally on its own data.

A round's usual exchange evaluates the received model on the hospital's validation and test
splits, then trains, and sends both back in one reply (a Flower round trip costs seconds, so
the usual train-then-evaluate pattern would double the wall time). An exchange may also only
train (``evaluate`` false in its config: pFedNet's personal phase) or only evaluate (the
final evaluation). Every exchange goes through :meth:`ClientObjective.respond`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict
from torch import nn

from fedclinic import messages as keys
from fedclinic.config import HospitalConfig, NoOptions, RunConfig, Schema
from fedclinic.data.base import HospitalData
from fedclinic.engine import ServerAlgorithm
from fedclinic.errors import FedClinicError
from fedclinic.models import build_model
from fedclinic.serialization import State, file_sha256, record_to_state, state_to_record
from fedclinic.site import SiteState
from fedclinic.tasks import task_of
from fedclinic.training import evaluate, seeded_generator, train_local

# ------------------------------------------------------------------------------------ client


@dataclass
class ClientContext:
    """Everything a hospital-side objective may use; built by the ClientApp per message."""

    run: RunConfig
    hospital: HospitalConfig
    data: HospitalData
    device: torch.device
    site: SiteState
    server_round: int
    server_config: dict[str, Any] = field(default_factory=dict)
    #: under DP, the training class counts released for the balanced-softmax prior
    #: (:func:`fedclinic.privacy.release_class_counts`, set by the ClientApp before training)
    released_counts: list[float] | None = None

    def prior_counts(self) -> list[float]:
        """The class counts a class-prior loss may read: the exact training counts without
        DP, the site's DP release under DP (the exact ones would be outside the guarantee)."""
        if self.run.dp == "off":
            return [float(c) for c in self.data.train.class_counts(self.run.num_classes)]
        if self.released_counts is None:
            raise FedClinicError(
                f"hospital {self.hospital.hospital}: under dp = {self.run.dp!r} the class "
                "prior must come from the site's DP release (fedclinic.privacy."
                "release_class_counts), and none was made for this exchange"
            )
        return list(self.released_counts)


@dataclass
class LocalUpdate:
    """What local training produced: the state to upload and what to report about it."""

    state: State
    loss: float
    num_examples: int
    seconds: float
    steps: int = 0
    metrics: dict[str, float | list[float]] = field(default_factory=dict)
    info: dict[str, str] = field(default_factory=dict)


class ClientObjective:
    """Client half of an algorithm. Override :meth:`loss` for a new local objective,
    :meth:`deployed_model` / :meth:`fit` when the algorithm keeps site state."""

    #: which model the hospital evaluates and would deploy: "global", "local", "personal"
    deployed_kind: ClassVar[str] = "global"

    def __init__(self, context: ClientContext) -> None:
        self.context = context
        self.run = context.run
        #: the site file of the model evaluated, when it lives at the site (deploy_from_site)
        self.deployed_sha256: str | None = None
        selected = context.server_config.get(keys.SELECTED_ROUND)
        if selected is not None:  # the site keeps what that round deployed
            context.site.keep_selected(int(selected))

    @property
    def private_models(self) -> int:
        """How many models one training exchange trains on the hospital's private data, each
        on its own Poisson batches for the exchange's step budget: under DP the hospital's
        ledger is charged that many times the steps (:func:`fedclinic.privacy.plan_round`)."""
        return 1

    @property
    def uses_class_prior(self) -> bool:
        """Whether the local loss reads the training split's class counts (balanced softmax):
        under DP the ClientApp then releases them once per run through the Gaussian mechanism
        before the first training step (:meth:`ClientContext.prior_counts`)."""
        return False

    # -- hooks
    def build(self, state: State | None = None) -> nn.Module:
        """The run's architecture, loaded with ``state`` when given."""
        model = build_model(self.run)
        if state is not None:
            model.load_state_dict(state)
        return model

    def deployed_model(self, received: State) -> nn.Module:
        """The model this hospital would use now; by default the received global model."""
        return self.build(received)

    def deploy_from_site(self, name: str) -> None:
        """The model about to be evaluated is the site's version of ``name``: its file's
        SHA-256 goes in the reply (``deployed_sha256``), so that the summary names it."""
        site = self.context.site
        if site.has(name):
            self.deployed_sha256 = file_sha256(site.path(name))

    def loss(
        self, model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor
    ) -> torch.Tensor:
        """The local objective; by default the task loss."""
        return task_of(self.run).loss(logits, labels)

    def regularizer(self, model: nn.Module) -> torch.Tensor | None:
        """A loss term that reads no data (FedProx's proximal pull); by default none. Under
        DP-SGD its exact gradient joins after the noise (``fedclinic.training``)."""
        return None

    def fit(self, received: State) -> LocalUpdate:
        """Train from the received model on the local training split."""
        model = self.build(received)
        stats = train_local(
            model,
            self.context.data.train,
            self.run,
            self.context.device,
            self.generator(),
            objective=self.loss,
            regularizer=self.regularizer,
        )
        return LocalUpdate(
            {k: v.detach().cpu() for k, v in model.state_dict().items()},
            stats.loss,
            stats.num_examples,
            stats.seconds,
            stats.steps,
        )

    # -- driver
    def generator(self) -> torch.Generator:
        """Batch order: reproducible for (seed, round, hospital), different across them."""
        context = self.context
        return seeded_generator(self.run.seed, context.server_round, context.hospital.hospital)

    def evaluate_model(self, model: nn.Module) -> dict[str, float | list[float]]:
        data, device, classes = self.context.data, self.context.device, self.run.num_classes
        metrics = {
            **evaluate(model, data.val, device, classes, "val_", self.run.task),
            **evaluate(model, data.test, device, classes, "test_", self.run.task),
        }
        metrics.update({keys.NUM_VAL: len(data.val), keys.NUM_TEST: len(data.test)})
        return metrics

    def describe(self, content: RecordDict) -> dict[str, float | list[float]]:
        """Answer to the coordinator's one-time setup query (before round 1).

        By default the training-set size and class counts; algorithms add what their setup
        needs (pFedNet's data sketch). Only aggregate statistics, never records.
        """
        data = self.context.data
        return {
            keys.NUM_TRAIN: len(data.train),
            keys.CLASS_COUNTS: [float(c) for c in data.train.class_counts(self.run.num_classes)],
        }

    def data_fingerprint(self) -> str:
        """What the hospital trained and was tested on, sent with every reply
        (``HospitalData.fingerprint``: class counts per split and a content hash)."""
        return self.context.data.fingerprint(self.run.num_classes)

    def query(self, content: RecordDict) -> RecordDict:
        """Reply to a QUERY message with :meth:`describe`."""
        hospital = self.context.hospital
        info: dict[str, Any] = {keys.HOSPITAL: hospital.hospital, keys.ROLE: hospital.role}
        metrics = MetricRecord(self.describe(content))  # type: ignore[arg-type]
        return RecordDict({keys.METRICS: metrics, keys.INFO: ConfigRecord(info)})

    def respond(self, content: RecordDict, train: bool) -> RecordDict:
        """Evaluate the received model (unless the exchange says not to), then train when
        asked; one reply carries both."""
        received = record_to_state(content.array_records[keys.ARRAYS])
        metrics: dict[str, Any] = {}
        if self.context.server_config.get(keys.EVALUATE, True):
            started = time.perf_counter()
            metrics.update(self.evaluate_model(self.deployed_model(received)))
            metrics[keys.EVAL_SECONDS] = time.perf_counter() - started  # round overhead
        info: dict[str, Any] = {
            keys.HOSPITAL: self.context.hospital.hospital,
            keys.DEVICE: str(self.context.device),
            keys.DEPLOYED: self.deployed_kind,
        }
        if self.deployed_sha256 is not None:
            info[keys.DEPLOYED_SHA256] = self.deployed_sha256
        records: dict[str, Any] = {}
        if train:
            torch.manual_seed(int(self.generator().initial_seed() % (2**31)))
            update = self.fit(received)
            metrics.update(
                {
                    keys.TRAIN_LOSS: update.loss,
                    keys.NUM_EXAMPLES: update.num_examples,
                    keys.NUM_TRAIN: len(self.context.data.train),
                    keys.TRAIN_SECONDS: update.seconds,
                    keys.TRAIN_STEPS: update.steps,
                    **update.metrics,
                }
            )
            info.update(update.info)
            records[keys.ARRAYS] = state_to_record(update.state)
        records[keys.METRICS] = MetricRecord(metrics)
        records[keys.INFO] = ConfigRecord(info)
        return RecordDict(records)


# ------------------------------------------------------------------------------------ pairing


@dataclass(frozen=True)
class Algorithm:
    """One registry entry: the two halves of an algorithm and its options schema."""

    name: str
    strategy: type[ServerAlgorithm]
    objective: type[ClientObjective]
    options: type[Schema] = NoOptions
    description: str = ""
    #: tasks the algorithm implements (fedclinic.tasks); others are refused at validation
    tasks: tuple[str, ...] = ("classification",)
    #: run settings the algorithm cannot work with: one-line ConfigError, called by
    #: strategies.load_run_config (so before anything starts, as well as in each app)
    check: Callable[[RunConfig], None] = lambda run: None
