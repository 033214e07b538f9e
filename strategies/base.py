"""The one interface every algorithm implements: a server strategy and a client objective.

An :class:`Algorithm` pairs

- a :class:`FedClinicStrategy` (a Flower ``Strategy``) that runs at the coordinator: what each
  hospital receives, how replies are aggregated, and what is recorded; and
- a :class:`ClientObjective` that runs at each hospital: which model the hospital deploys
  (and evaluates), and how it trains locally on its own data.

One round is one message exchange per hospital: the hospital first evaluates the model it
received on its validation and test splits, then trains, and sends both back in one reply
(a Flower round trip costs seconds, so the usual train-then-evaluate pattern would double
the wall time). After the last round, one evaluate-only exchange scores the final model.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any, ClassVar

import numpy as np
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from torch import nn

from fedclinic import checkpoint
from fedclinic.audit import AuditLog, certificate_fingerprints, code_version, config_sha256
from fedclinic.config import HospitalConfig, NoOptions, RunConfig, Schema
from fedclinic.data.base import HospitalData
from fedclinic.errors import FedClinicError
from fedclinic.models import build_model
from fedclinic.results import ResultsWriter
from fedclinic.serialization import (
    State,
    content_sha256,
    file_sha256,
    numpy_to_record,
    record_to_numpy,
    record_to_state,
    state_to_record,
)
from fedclinic.site import SiteState
from fedclinic.tasks import task_of
from fedclinic.training import evaluate, mean_or_nan, seeded_generator, train_local
from fedclinic.validation import UpdateSpec, norm_outliers, spec_of, structure_problem, update_norm

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

    def loss(
        self, model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor
    ) -> torch.Tensor:
        """The local objective; by default the task loss."""
        return task_of(self.run).loss(logits, labels)

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
        metrics.update({"num_val": len(data.val), "num_test": len(data.test)})
        return metrics

    def describe(self, content: RecordDict) -> dict[str, float | list[float]]:
        """Answer to the coordinator's one-time setup query (before round 1).

        By default the training-set size and class counts; algorithms add what their setup
        needs (pFedNet's data sketch). Only aggregate statistics, never records.
        """
        data = self.context.data
        return {
            "num_train": len(data.train),
            "class_counts": [float(c) for c in data.train.class_counts(self.run.num_classes)],
        }

    def query(self, content: RecordDict) -> RecordDict:
        """Reply to a QUERY message with :meth:`describe`."""
        info = {"hospital": self.context.hospital.hospital, "role": self.context.hospital.role}
        return RecordDict(
            {"metrics": MetricRecord(self.describe(content)), "info": ConfigRecord(info)}  # type: ignore[arg-type]
        )

    def respond(self, content: RecordDict, train: bool) -> RecordDict:
        """Evaluate the received model, then (when asked) train; one reply carries both."""
        received = record_to_state(content["arrays"])
        started = time.perf_counter()
        metrics = self.evaluate_model(self.deployed_model(received))
        metrics["eval_seconds"] = time.perf_counter() - started  # for round-overhead benchmarks
        info = {
            "hospital": self.context.hospital.hospital,
            "device": str(self.context.device),
            "deployed": self.deployed_kind,
        }
        records: dict[str, Any] = {}
        if train:
            torch.manual_seed(int(self.generator().initial_seed() % (2**31)))
            update = self.fit(received)
            metrics.update(
                {
                    "train_loss": update.loss,
                    "num-examples": update.num_examples,
                    "num_train": len(self.context.data.train),
                    "train_seconds": update.seconds,
                    "train_steps": update.steps,
                    **update.metrics,
                }
            )
            info.update(update.info)
            records["arrays"] = state_to_record(update.state)
        records["metrics"] = MetricRecord(metrics)  # type: ignore[arg-type]
        records["info"] = ConfigRecord(info)
        return RecordDict(records)


# ------------------------------------------------------------------------------------ server


@dataclass
class Reply:
    """A successful hospital reply, unpacked."""

    node_id: int
    hospital: str
    arrays: ArrayRecord | None
    metrics: dict[str, Any]
    info: dict[str, Any]

    @property
    def num_examples(self) -> int:
        return int(self.metrics.get("num-examples", 0))


EVAL_KEYS = ("loss", "accuracy", "balanced_accuracy", "auc", "recall")


class FedClinicStrategy(Strategy):
    """Server half of an algorithm: a Flower strategy with a one-exchange-per-round loop.

    Subclasses override :meth:`aggregate` (and :meth:`arrays_for` when hospitals receive
    different models); everything else — waiting for hospitals, failed replies, metric rows,
    model selection on validation data, checkpoints, the summary — is shared.
    """

    #: whether the algorithm produces one global model worth saving
    has_global_model: ClassVar[bool] = True
    #: whether updates are compared by norm (off where nothing is averaged: local-only)
    checks_update_norms: ClassVar[bool] = True
    #: the algorithm's own attributes that carry state from round to round; the coordinator
    #: checkpoints them after every round (with the model and model selection) for resume
    state_attributes: ClassVar[tuple[str, ...]] = ()

    def __init__(self, run: RunConfig, results: ResultsWriter | None = None) -> None:
        self.run = run
        self.results = results
        self.hospital_names: dict[int, str] = {}
        self.evaluations: dict[int, dict[str, dict[str, Any]]] = {}  # model_round -> hospital
        self.sent_arrays: dict[int, ArrayRecord] = {}
        self.best: tuple[int, float] | None = None
        self.best_arrays: ArrayRecord | None = None
        self.model_spec: UpdateSpec | None = None
        self.outcome: dict[str, Any] = {}
        self.destinations: dict[str, int] = {}  # message ID -> node it was sent to
        self.audit = AuditLog(results.directory) if results else None
        #: the key hospitals file their site state under; the ServerApp sets it from the
        #: run name or the Flower run id, and a resumed run takes it from the checkpoint
        self.site_key = run.run_name
        self.grid: Grid | None = None

    # ---------------------------------------------------------------- Flower Strategy API
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self._messages(server_round, arrays, config, grid, MessageType.TRAIN)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self._messages(server_round, arrays, config, grid, MessageType.EVALUATE)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        good = self.accept(server_round, replies, trained=True)
        arrays = self.aggregate(server_round, good)
        return arrays, MetricRecord(self._mean_metrics(good, "train_loss"))

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord:
        good = self.accept(server_round, replies, trained=False)
        return MetricRecord(self._mean_metrics(good, "val_loss", "test_loss"))

    def summary(self) -> None:
        log(INFO, "\t└──> %s(algorithm=%s)", type(self).__name__, self.run.algorithm)

    # ---------------------------------------------------------------- hooks
    def initial_state(self) -> State:
        """The model every hospital starts from, reproducible from the run seed."""
        return build_model(self.run, seed=self.run.seed).state_dict()

    def round_config(self, server_round: int) -> dict[str, Any]:
        """Values sent to every hospital with the model in this round."""
        return {"server-round": server_round}

    def arrays_for(self, node_id: int, arrays: ArrayRecord) -> ArrayRecord:
        """What one hospital receives; the global model unless the algorithm personalises."""
        return arrays

    def config_for(self, node_id: int, config: ConfigRecord) -> ConfigRecord:
        """The round config one hospital receives; the shared one unless the algorithm adds
        per-hospital values (FedHelp's role)."""
        return config

    def aggregate(self, server_round: int, replies: list[Reply]) -> ArrayRecord | None:
        """New global model from the accepted replies; ``None`` keeps the previous one."""
        raise NotImplementedError

    def setup(self, grid: Grid, initial_arrays: ArrayRecord) -> None:
        """One-time exchange before round 1 (roles, similarity graph); none by default.

        Use :meth:`query_hospitals` to ask every hospital for its :meth:`ClientObjective.describe`.
        """

    def query_hospitals(self, grid: Grid, config: dict[str, Any] | None = None) -> list[Reply]:
        """Send a QUERY to every connected hospital and return the accepted replies."""
        content = RecordDict(
            {"config": ConfigRecord({"server-round": 0, **self.site_config(), **(config or {})})}
        )
        messages = [
            Message(content=content, message_type=MessageType.QUERY, dst_node_id=node)
            for node in self.wait_for_hospitals(grid)
        ]
        replies = self.exchange(grid, messages, self.run.round_timeout)
        return self.accept(0, replies, trained=False, record=False)

    def site_config(self) -> dict[str, str]:
        """Config entries every message carries: where the hospital keeps its site state."""
        return {"site-key": self.site_key} if self.site_key else {}

    # ---------------------------------------------------------------- checkpoint / resume
    def state_dict(self) -> dict[str, Any]:
        """Round-to-round state besides the model: model selection plus the algorithm's
        :attr:`state_attributes` (all picklable)."""
        state = {name: getattr(self, name) for name in self.state_attributes}
        state["fedclinic.base"] = {
            "hospital_names": self.hospital_names,
            "evaluations": self.evaluations,
            "best": self.best,
            "best_arrays": None
            if self.best_arrays is None
            else record_to_numpy(self.best_arrays),
        }
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        base = state.get("fedclinic.base", {})
        self.hospital_names = dict(base.get("hospital_names", {}))
        self.evaluations = dict(base.get("evaluations", {}))
        self.best = base.get("best")
        best = base.get("best_arrays")
        self.best_arrays = None if best is None else numpy_to_record(best)
        for name in self.state_attributes:
            if name in state:
                setattr(self, name, state[name])

    def reconnect(self, grid: Grid) -> None:
        """After a resume: ask every hospital its name, since a restarted coordinator (or
        SuperNode) may know a hospital under a new node ID, and re-key what is kept by node."""
        replies = self.query_hospitals(grid)
        now = {r.hospital: r.node_id for r in replies}
        moved = {
            old: now[name]
            for old, name in self.hospital_names.items()
            if name in now and now[name] != old
        }
        for old in moved:
            self.hospital_names.pop(old, None)
        self.hospital_names.update({node: name for name, node in now.items()})
        if moved:
            log(INFO, "resume: %d hospital(s) reconnected under new node IDs", len(moved))
            self.nodes_moved(moved)

    def nodes_moved(self, moved: dict[int, int]) -> None:
        """Re-key state kept by node ID (old -> new); nothing by default."""

    def save_checkpoint(self, server_round: int, arrays: ArrayRecord) -> dict[str, str]:
        """After round ``server_round``: everything :meth:`resume` needs, atomically; returns
        the file's name and SHA-256 for the audit log."""
        if not self.results:
            return {}
        saved = checkpoint.Checkpoint(
            round=server_round,
            arrays=record_to_numpy(arrays),
            config=self.run.to_flat(),
            site_key=self.site_key,
            rows=len(self.results.rows),
            strategy=self.state_dict(),
            rng=checkpoint.rng_states(),
        )
        path = checkpoint.save(self.results.directory, saved)
        return {"checkpoint": path.name, "checkpoint_sha256": file_sha256(path)}

    def resume(self) -> tuple[int, ArrayRecord]:
        """Load the output directory's checkpoint: (last completed round, global model)."""
        if not self.results:
            raise FedClinicError("resume needs the run's output directory")
        saved = checkpoint.load(self.results.directory)
        checkpoint.check_same_run(saved.config, self.run.to_flat())
        self.load_state_dict(saved.strategy)
        checkpoint.restore_rng(saved.rng)
        self.site_key = saved.site_key
        discarded = self.results.keep_rows(saved.rows)
        log(INFO, "resuming after round %d from %s (%d rows of the unfinished round set "
            "aside)", saved.round, self.results.directory / checkpoint.CHECKPOINT_FILE,
            discarded)
        return saved.round, numpy_to_record(saved.arrays)

    # ---------------------------------------------------------------- the round loop
    def start(  # type: ignore[override]
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int | None = None,
        timeout: float | None = None,
        **_: Any,
    ) -> Result:
        """Run ``rounds`` exchanges plus a final evaluation, recording as replies arrive."""
        rounds = num_rounds or self.run.rounds
        timeout = timeout or self.run.round_timeout
        self.summary()
        result = Result(arrays=initial_arrays)
        arrays = initial_arrays
        self.model_spec = spec_of(record_to_numpy(initial_arrays))
        self.grid = grid
        flat = self.run.to_flat()
        completed = 0
        if self.run.resume:
            completed, arrays = self.resume()
            result.arrays = arrays
        self._audit(
            "run_resumed" if self.run.resume else "run_start",
            from_round=completed + 1,
            algorithm=self.run.algorithm,
            config=flat,
            config_sha256=config_sha256(flat),
            code=code_version(),
            certificates=certificate_fingerprints(),
            initial_model_sha256=content_sha256(record_to_numpy(arrays)),
        )
        try:
            if self.run.resume:  # setup's decisions were restored; node IDs may be new
                self.reconnect(grid)
            else:
                self.setup(grid, initial_arrays)
            for server_round in range(completed + 1, rounds + 1):
                log(INFO, "[ROUND %d/%d]", server_round, rounds)
                self.sent_arrays = {server_round - 1: arrays}
                config = ConfigRecord({**self.round_config(server_round), **self.site_config()})
                messages = list(self.configure_train(server_round, arrays, config, grid))
                replies = self.exchange(grid, messages, timeout)
                self.outcome = {}
                new_arrays, train_metrics = self.aggregate_train(server_round, replies)
                if new_arrays is not None:
                    arrays = new_arrays
                if train_metrics is not None:
                    result.train_metrics_clientapp[server_round] = train_metrics
                self.after_round(server_round, arrays)
                saved = self.save_checkpoint(server_round, arrays)
                self._audit_round("round", server_round, messages, arrays, **saved)
            self.sent_arrays = {rounds: arrays}
            config = ConfigRecord(
                {**self.round_config(rounds + 1), **self.site_config(), "final": True}
            )
            messages = list(self.configure_evaluate(rounds + 1, arrays, config, grid))
            replies = self.exchange(grid, messages, timeout)
            self.outcome = {}
            result.evaluate_metrics_clientapp[rounds] = self.aggregate_evaluate(rounds + 1, replies)
            self._audit_round("final_evaluation", rounds + 1, messages, arrays)
            result.arrays = arrays
            self.finish(rounds, arrays)
        except BaseException as error:
            self._audit("run_end", status="failed", reason=f"{type(error).__name__}: {error}")
            raise
        self._audit("run_end", status="completed", rounds=rounds)
        return result

    def exchange(self, grid: Grid, messages: list[Message], timeout: float) -> list[Message]:
        """Send and wait; remember who each message went to, because Flower's error reply for
        a hospital that went silent comes from the SuperLink, not from that hospital."""
        if isinstance(grid, Grid):
            replies = poll_replies(grid, messages, timeout)
        else:  # an in-process grid (tests, benchmarks) answers at once
            replies = list(grid.send_and_receive(messages, timeout=timeout))
        self.destinations.update(
            {
                m.metadata.message_id: m.metadata.dst_node_id
                for m in messages
                if m.metadata.message_id
            }
        )
        return replies

    def _sender(self, message: Message) -> int:
        """The hospital a reply is about (for a SuperLink error: the one asked)."""
        if message.has_error():
            return self.destinations.get(
                message.metadata.reply_to_message_id, message.metadata.src_node_id
            )
        return message.metadata.src_node_id

    def _audit(self, event: str, **fields: Any) -> None:
        if self.audit is not None:
            self.audit.record(event, **fields)

    def _audit_round(
        self,
        event: str,
        server_round: int,
        messages: list[Message],
        arrays: ArrayRecord,
        **extra: str,
    ) -> None:
        """Who was asked, who answered, who was accepted or refused (and why), which model."""
        self._audit(
            event,
            round=server_round,
            asked=sorted(self.hospital_of(m.metadata.dst_node_id) for m in messages),
            **self.outcome,
            model_sha256=content_sha256(record_to_numpy(arrays)),
            **extra,
        )

    def after_round(self, server_round: int, arrays: ArrayRecord) -> None:
        """Hook after aggregation (checkpoints, strategy state)."""

    # ---------------------------------------------------------------- helpers
    def wait_for_hospitals(self, grid: Grid) -> list[int]:
        """All connected hospitals, once at least ``min-hospitals`` are connected."""
        deadline = time.monotonic() + self.run.round_timeout
        while True:
            nodes = sorted(grid.get_node_ids())
            if len(nodes) >= self.run.min_hospitals:
                return nodes
            if time.monotonic() > deadline:
                raise FedClinicError(
                    f"only {len(nodes)} hospital(s) connected after "
                    f"{self.run.round_timeout:.0f} s; the run needs "
                    f"min-hospitals = {self.run.min_hospitals}"
                )
            log(INFO, "waiting for hospitals: %d/%d connected", len(nodes), self.run.min_hospitals)
            time.sleep(1.0)

    def _messages(
        self,
        server_round: int,
        arrays: ArrayRecord,
        config: ConfigRecord,
        grid: Grid,
        message_type: str,
    ) -> list[Message]:
        return [
            Message(
                content=RecordDict(
                    {
                        "arrays": self.arrays_for(node, arrays),
                        "config": self.config_for(node, config),
                    }
                ),
                message_type=message_type,
                dst_node_id=node,
            )
            for node in self.wait_for_hospitals(grid)
        ]

    def hospital_of(self, node_id: int) -> str:
        return self.hospital_names.get(node_id, f"node-{node_id}")

    def accept(
        self, server_round: int, replies: Iterable[Message], trained: bool, record: bool = True
    ) -> list[Reply]:
        """Unpack replies, refuse bad updates, record rows, and keep the good ones (enough or fail).

        A trained reply whose update fails :mod:`fedclinic.validation` (layout, NaN/Inf, norm
        outlier) is written as a ``rejected`` row and never aggregated. ``record=False`` (setup
        queries) logs failures but writes no evaluation rows.
        """
        candidates: list[Reply] = []
        failures: dict[str, str] = {}
        rejected: dict[str, str] = {}
        rows: list[dict[str, Any]] = []
        replies = list(replies)
        spec = self.update_spec() if trained else None
        for message in replies:
            node = self._sender(message)
            if message.has_error():
                reason = f"{message.error.reason} (code {message.error.code})"
                failures[self.hospital_of(node)] = reason
                rows.append(self._error_row(server_round, node, reason))
                continue
            content = message.content
            info = dict(content["info"]) if "info" in content.config_records else {}
            if "error" in info:
                self.hospital_names.setdefault(node, str(info.get("hospital") or node))
                failures[self.hospital_of(node)] = str(info["error"])
                rows.append(self._error_row(server_round, node, str(info["error"])))
                continue
            self.hospital_names[node] = str(info.get("hospital", node))
            reply = Reply(
                node_id=node,
                hospital=self.hospital_of(node),
                arrays=content.array_records.get("arrays") if trained else None,
                metrics=dict(content["metrics"]),
                info=info,
            )
            if trained and reply.arrays is None:
                failures[reply.hospital] = "the reply carries no model update"
                rows.append(self._error_row(server_round, node, "no model update in reply"))
                continue
            if trained and reply.arrays is not None:
                problem = structure_problem(record_to_numpy(reply.arrays), spec)
                if problem:
                    rejected[reply.hospital] = problem
                    rows.append(self._error_row(server_round, node, problem, kind="rejected"))
                    continue
            candidates.append(reply)
        good = candidates
        if trained and spec is not None and self.checks_update_norms:
            outliers = self._norm_outliers(server_round, candidates)
            for reply in candidates:
                if reply.hospital in outliers:
                    rejected[reply.hospital] = outliers[reply.hospital]
                    rows.append(
                        self._error_row(
                            server_round, reply.node_id, outliers[reply.hospital], kind="rejected"
                        )
                    )
            good = [r for r in candidates if r.hospital not in outliers]
        if record:
            for reply in good:
                rows.extend(self._rows(server_round, reply, trained))
        for name, failure in failures.items():
            log(WARNING, "round %d: hospital reply failed: %s: %s", server_round, name, failure)
        for name, reason in rejected.items():
            log(WARNING, "round %d: update of %s REJECTED: %s", server_round, name, reason)
        if self.results and rows:
            self.results.append(rows)
        self.outcome = {
            "answered": sorted(
                self.hospital_of(self._sender(m)) for m in replies if not m.has_error()
            ),
            "accepted": sorted(r.hospital for r in good),
            "rejected": rejected,
            "failed": failures,
        }
        if record:
            self._select(server_round - 1, good)
        if len(good) < self.run.min_hospitals:
            problems = [f"{n}: {r}" for n, r in {**failures, **rejected}.items()]
            raise FedClinicError(
                f"round {server_round}: {len(good)} of {len(replies)} hospitals replied "
                f"successfully, fewer than min-hospitals = {self.run.min_hospitals}. "
                + ("Failures: " + "; ".join(problems) if problems else "No replies arrived.")
            )
        return good

    def update_spec(self) -> UpdateSpec | None:
        """Keys, shapes and dtypes every trained reply must carry: the model's, by default.

        Algorithms whose uploads have another layout (compressed, partial) return ``None``:
        their updates are then checked for NaN/Inf only.
        """
        return self.model_spec

    def _norm_outliers(self, server_round: int, replies: list[Reply]) -> dict[str, str]:
        sent = self.sent_arrays.get(server_round - 1)
        if sent is None:
            return {}
        reference = record_to_numpy(sent)
        norms = {
            r.hospital: update_norm(record_to_numpy(r.arrays), reference)
            for r in replies
            if r.arrays is not None
        }
        return norm_outliers(norms, self.run.max_update_norm_ratio)

    def _error_row(
        self, server_round: int, node: int, reason: str, kind: str = "error"
    ) -> dict[str, Any]:
        return {
            "round": server_round,
            "hospital": self.hospital_of(node),
            "node_id": node,
            "kind": kind,
            "reason": reason,
        }

    def _rows(self, server_round: int, reply: Reply, trained: bool) -> list[dict[str, Any]]:
        base = {"round": server_round, "hospital": reply.hospital, "node_id": reply.node_id}
        evaluated = {
            k: v
            for k, v in reply.metrics.items()
            if k.startswith(("val_", "test_")) or k in ("num_val", "num_test", "eval_seconds")
        }
        rows = [
            {
                **base,
                "kind": "evaluate",
                "model_round": server_round - 1,
                "model": reply.info.get("deployed", "global"),
                **evaluated,
            }
        ]
        self.evaluations.setdefault(server_round - 1, {})[reply.hospital] = rows[0]
        if trained:
            rows.append(
                {
                    **base,
                    "kind": "train",
                    "train_loss": reply.metrics.get("train_loss"),
                    "num_examples": reply.num_examples,
                    "num_train": reply.metrics.get("num_train"),
                    "seconds": reply.metrics.get("train_seconds"),
                    "steps": reply.metrics.get("train_steps"),
                    "device": reply.info.get("device"),
                    # hashes of models kept at the site (local-only, personalised, large)
                    **{k: v for k, v in reply.info.items() if k.endswith("sha256")},
                    **{
                        k: v
                        for k, v in reply.metrics.items()
                        if k.startswith("train_")
                        and k not in ("train_loss", "train_seconds", "train_steps")
                    },
                }
            )
        return rows

    def _select(self, model_round: int, good: list[Reply]) -> None:
        """Track the round whose model scores best on the hospitals' VALIDATION splits."""
        metric = self.run.selection_key
        score = mean_or_nan([float(r.metrics.get(metric, float("nan"))) for r in good])
        if not np.isfinite(score):
            return
        value = -score if metric == "val_loss" else score
        if self.best is None or value > self.best[1]:
            self.best = (model_round, value)
            self.best_arrays = self.sent_arrays.get(model_round)

    @staticmethod
    def _mean_metrics(replies: list[Reply], *keys: str) -> dict[str, float]:
        """Sample-weighted means of scalar metrics, for Flower's logs."""
        out: dict[str, float] = {"num-hospitals": float(len(replies))}
        for key in keys:
            values = [(r.metrics.get(key), max(r.num_examples, 1)) for r in replies]
            pairs = [
                (float(v), w) for v, w in values if isinstance(v, int | float) and np.isfinite(v)
            ]
            if pairs:
                out[key] = sum(v * w for v, w in pairs) / sum(w for _, w in pairs)
        return out

    def finish(self, rounds: int, arrays: ArrayRecord) -> None:
        """Write the final and selected models and the summary."""
        if not self.results:
            return
        model_info = selected_info = None
        if self.has_global_model:
            model_info = self.results.save_model("model_final", record_to_state(arrays))
            if self.best_arrays is not None:
                selected_info = self.results.save_model(
                    "model_selected", record_to_state(self.best_arrays)
                )
        selected_round = self.best[0] if self.best else rounds
        hospitals: dict[str, Any] = {}
        for name in sorted({h for e in self.evaluations.values() for h in e}):
            final = self.evaluations.get(rounds, {}).get(name, {})
            selected = self.evaluations.get(selected_round, {}).get(name, {})
            trained = self._last_train_row(name)
            hospitals[name] = {
                "final": _metric_view(final),
                "selected": _metric_view(selected),
                "num_train": trained.get("num_train"),
                "model": final.get("model"),
                # models that stay at the site: where and which (hash), never the weights
                "site_models": {k: v for k, v in trained.items() if k.endswith("sha256")},
            }
        self.results.write_summary(
            {
                "status": "completed",
                "algorithm": self.run.algorithm,
                "task": self.run.task,
                "rounds": rounds,
                "selection_metric": self.run.selection_key,
                "selected_round": selected_round,
                "selection_note": (
                    "chosen on validation data"
                    if self.best
                    else "no validation data: the final round is reported"
                ),
                "hospitals": hospitals,
                "model": model_info,
                "selected_model": selected_info,
                **self.summary_extra(),
            }
        )

    def summary_extra(self) -> dict[str, Any]:
        """Algorithm-specific entries for ``summary.json``."""
        return {}

    def _last_train_row(self, hospital: str) -> dict[str, Any]:
        if self.results:
            for row in reversed(self.results.rows):
                if row.get("hospital") == hospital and row.get("kind") == "train":
                    return row
        return {}


#: seconds between asks for replies (Flower's own send_and_receive waits 3 s between asks,
#: which adds 1.5 s to every exchange on average)
REPLY_POLL_SECONDS = 0.5


#: consecutive failed calls to the SuperLink a round survives (its state database can refuse
#: a request under load: Flower 1.39 answers "database is locked" with an HTTP 500)
SUPERLINK_RETRIES = 5


def with_retries(what: str, call: Callable[[], Any]) -> Any:
    """``call()``, retried with backoff when the SuperLink fails a request transiently; for
    idempotent requests only (asking for replies)."""
    for attempt in range(1, SUPERLINK_RETRIES + 1):
        try:
            return call()
        except Exception as err:  # httpx/grpc raise many types for a failed request
            if attempt == SUPERLINK_RETRIES:
                raise
            log(WARNING, "%s failed (%s: %s); retry %d of %d", what, type(err).__name__,
                (str(err).splitlines() or [""])[0][:200], attempt, SUPERLINK_RETRIES - 1)
            time.sleep(min(2.0**attempt, 15.0))
    raise AssertionError("unreachable")


def poll_replies(grid: Grid, messages: list[Message], timeout: float) -> list[Message]:
    """Push, then pull every :data:`REPLY_POLL_SECONDS` until all replied or ``timeout``."""
    waiting = set(grid.push_messages(messages))  # not retried: a retry could send twice
    deadline = time.monotonic() + timeout
    replies: list[Message] = []
    while waiting:
        arrived = list(with_retries("asking for replies", lambda: grid.pull_messages(waiting)))
        replies.extend(arrived)
        waiting.difference_update(m.metadata.reply_to_message_id for m in arrived)
        if not waiting or time.monotonic() >= deadline:
            break
        time.sleep(REPLY_POLL_SECONDS)
    return replies


def _metric_view(row: dict[str, Any]) -> dict[str, Any]:
    return {
        k: v
        for k, v in row.items()
        if k.startswith(("val_", "test_")) or k in ("num_val", "num_test")
    }


def replies_to_numpy(replies: list[Reply]) -> list[dict[str, np.ndarray]]:
    return [record_to_numpy(r.arrays) for r in replies if r.arrays is not None]


# ------------------------------------------------------------------------------------ pairing


@dataclass(frozen=True)
class Algorithm:
    """One registry entry: the two halves of an algorithm and its options schema."""

    name: str
    strategy: type[FedClinicStrategy]
    objective: type[ClientObjective]
    options: type[Schema] = NoOptions
    description: str = ""
    #: tasks the algorithm implements (fedclinic.tasks); others are refused at validation
    tasks: tuple[str, ...] = ("classification",)
    #: run settings the algorithm cannot work with: one-line ConfigError, called by
    #: strategies.load_run_config (so before anything starts, as well as in each app)
    check: Callable[[RunConfig], None] = lambda run: None
