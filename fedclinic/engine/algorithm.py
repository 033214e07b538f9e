"""What an algorithm's server half declares; the round engine (:mod:`fedclinic.engine.rounds`)
does everything else.

A subclass of :class:`ServerAlgorithm` overrides only what differs from FedAvg's pattern, as
Flower's strategies do: which exchanges a round has (:meth:`~ServerAlgorithm.exchanges`),
what each hospital receives (:meth:`~ServerAlgorithm.arrays_for`,
:meth:`~ServerAlgorithm.config_for`), how accepted replies are aggregated
(:meth:`~ServerAlgorithm.aggregate`), an optional one-time setup query
(:meth:`~ServerAlgorithm.setup_query`, :meth:`~ServerAlgorithm.setup`), extra checks on an
update (:meth:`~ServerAlgorithm.check_update`), its own rows and summary entries, and the
attributes to checkpoint. Sending, waiting, retries, re-sends, deadlines, acceptance, rows,
model selection, checkpoints and the audit log belong to the engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, MessageType

from fedclinic import messages as keys
from fedclinic.config import RunConfig
from fedclinic.models import build_model
from fedclinic.results import ResultsWriter
from fedclinic.rows import Row
from fedclinic.serialization import State, record_to_numpy


@dataclass(frozen=True)
class Exchange:
    """One message exchange of a round: every hospital asked gets one message, and the
    engine waits (within ``round-timeout``) for one reply from each.

    ``evaluate``: the hospital scores the model before training (evaluate rows, model
    selection); ``train``: it trains and uploads an update (validated, train rows). A later
    exchange of a round goes to the hospitals accepted in the one before.
    """

    name: str
    message_type: str = MessageType.TRAIN
    evaluate: bool = True
    train: bool = True


#: the usual round: evaluate the received model, train, upload (one exchange)
TRAIN = Exchange("train")
#: after the last round: score the final model, no training
FINAL_EVALUATION = Exchange("evaluate", MessageType.EVALUATE, evaluate=True, train=False)
#: the one-time setup query, and name queries (no model travels)
QUERY = Exchange("query", MessageType.QUERY, evaluate=False, train=False)


@dataclass(frozen=True)
class Hospital:
    """A connected hospital: its Flower node ID and its name (``node-<id>`` until it has
    told the coordinator)."""

    node_id: int
    name: str


@dataclass
class Reply:
    """A hospital's successful reply, unpacked."""

    node_id: int
    hospital: str
    arrays: ArrayRecord | None
    metrics: dict[str, Any]
    info: dict[str, Any]
    #: the upload in its wire precision, unpacked (``arrays`` widened from it; the same
    #: record with ``wire-dtype = float32``): what payload byte counts measure
    received: ArrayRecord | None = None

    @property
    def num_examples(self) -> int:
        return int(self.metrics.get(keys.NUM_EXAMPLES, 0))

    @property
    def num_train(self) -> float:
        """Training-set size, the usual aggregation weight."""
        return float(self.metrics.get(keys.NUM_TRAIN, self.num_examples))


def replies_to_numpy(replies: Sequence[Reply]) -> list[dict[str, np.ndarray]]:
    return [record_to_numpy(r.arrays) for r in replies if r.arrays is not None]


class ServerAlgorithm:
    """Server half of an algorithm. Override :meth:`aggregate`; the rest only where the
    algorithm differs from one evaluate-and-train exchange per round."""

    #: whether the algorithm produces one global model worth saving
    has_global_model: ClassVar[bool] = True
    #: whether uploads must have the model's keys, shapes and dtypes (off where uploads are
    #: compressed or absent); NaN/Inf are refused either way
    checks_update_layout: ClassVar[bool] = True
    #: whether updates are compared by norm (needs the layout check)
    checks_update_norms: ClassVar[bool] = True
    #: whether :meth:`arrays_for` / :meth:`config_for` need every hospital's name: the engine
    #: then asks a node it has never heard from (a restarted SuperNode) before sending
    needs_names: ClassVar[bool] = False
    #: why ``secure-aggregation = true`` cannot work with this algorithm (one line), or
    #: ``None`` where its aggregation is a weighted mean of the uploaded models (weights
    #: per :meth:`secure_weighting`) and its round one training exchange: the engine then
    #: aggregates it under SecAgg+ (:mod:`fedclinic.engine.secagg`)
    secure_aggregation_refusal: ClassVar[str | None] = (
        "its aggregation is not a weighted mean of the hospitals' models"
    )
    #: attributes that carry state from round to round; checkpointed after every round
    state_attributes: ClassVar[tuple[str, ...]] = ()

    def __init__(self, run: RunConfig, results: ResultsWriter | None = None) -> None:
        self.run = run
        self.results = results

    # ------------------------------------------------------------------ declarations
    def initial_state(self) -> State:
        """The model every hospital starts from, reproducible from the run seed."""
        return build_model(self.run, seed=self.run.seed).state_dict()

    def exchanges(self, server_round: int) -> tuple[Exchange, ...]:
        """The exchanges of a training round, in order."""
        return (TRAIN,)

    def setup_query(self) -> dict[str, Any] | None:
        """Config of a one-time QUERY to every hospital before round 1 (answered by
        ``ClientObjective.describe``); ``None``: no setup query."""
        return None

    def setup(self, replies: list[Reply], initial_arrays: ArrayRecord) -> None:
        """Decide from the setup query's accepted replies (roles, a similarity graph)."""

    def round_config(self, server_round: int, exchange: Exchange) -> dict[str, Any]:
        """Algorithm values every hospital receives in this exchange's config."""
        return {}

    def arrays_for(
        self, hospital: Hospital, arrays: ArrayRecord, exchange: Exchange
    ) -> ArrayRecord:
        """What one hospital receives; the global model unless the algorithm personalises."""
        return arrays

    def config_for(self, hospital: Hospital, config: ConfigRecord) -> ConfigRecord:
        """One hospital's config; the shared one unless the algorithm adds per-hospital
        values (FedHelp's role)."""
        return config

    def check_update(self, reply: Reply, exchange: Exchange) -> str | None:
        """Why this upload cannot be aggregated (beyond the engine's layout/NaN/norm
        checks), or ``None``; a reason makes it a ``rejected`` row in the audit log."""
        return None

    def aggregate(
        self, server_round: int, replies: list[Reply], exchange: Exchange = TRAIN
    ) -> ArrayRecord | None:
        """New global model from an exchange's accepted replies; ``None`` keeps the current."""
        raise NotImplementedError

    def secure_weighting(self) -> str:
        """Under secure aggregation: each hospital's weight in the masked sum,
        ``"num-train"`` (its training-set size) or ``"equal"`` (1)."""
        return "num-train"

    def securely_aggregated(self, server_round: int, replies: list[Reply]) -> None:
        """Under secure aggregation, after a round was unmasked: the replies summed (their
        metrics and info; no arrays), for the algorithm's own rows."""

    def after_round(self, server_round: int, arrays: ArrayRecord) -> None:
        """After a round's exchanges (also after the final evaluation, ``rounds + 1``)."""

    def nodes_moved(self, moved: dict[int, int]) -> None:
        """After a resume: re-key state kept by node ID (old -> new)."""

    def summary_extra(self) -> dict[str, Any]:
        """Algorithm-specific entries for ``summary.json``."""
        return {}

    # ------------------------------------------------------------------ services
    def record(self, rows: Sequence[Row]) -> None:
        """Append the algorithm's own rows to ``metrics.jsonl``."""
        if self.results is not None and rows:
            self.results.append(rows)

    def state_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.state_attributes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in self.state_attributes:
            if name in state:
                setattr(self, name, state[name])
