"""The round engine: one federated run, whatever the algorithm.

:class:`RoundEngine` drives an algorithm's server half (:class:`ServerAlgorithm`): with
``normalisation = federated`` a statistics exchange (:mod:`fedclinic.engine.survey`), an optional
setup query, ``rounds`` rounds of the algorithm's exchanges, and one final evaluation. For
every exchange it waits for hospitals, sends, polls with retries and re-sends within the
deadline (:mod:`fedclinic.engine.exchange`), accepts or refuses each reply
(:mod:`fedclinic.engine.acceptance`), writes the rows and selects the model on validation
data (:mod:`fedclinic.engine.records`). After every round it checkpoints (resume) and writes
the audit log; at the end the models and ``summary.json``.

The ServerApp (``server/app.py``) builds one per run; tests and benchmarks run the same code
against the in-process grid (``fedclinic.bench.grid``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common import log

from fedclinic import checkpoint
from fedclinic import messages as keys
from fedclinic.audit import AuditLog, certificate_fingerprints, code_version, config_sha256
from fedclinic.config import RunConfig
from fedclinic.engine.acceptance import Acceptance, UpdateChecks, accept
from fedclinic.engine.algorithm import (
    FINAL_EVALUATION,
    QUERY,
    Exchange,
    Hospital,
    Reply,
    ServerAlgorithm,
)
from fedclinic.engine.exchange import Clock, GridLike, ResendPolicy, Transport
from fedclinic.engine.records import (
    Selection,
    evaluate_row,
    flag_line,
    flagged,
    hospital_summaries,
    train_row,
)
from fedclinic.engine.secagg import SecureAggregation
from fedclinic.engine.survey import federated_normalisation
from fedclinic.errors import FedClinicError
from fedclinic.privacy import optimizer_warning
from fedclinic.results import ResultsWriter
from fedclinic.rows import Row
from fedclinic.serialization import (
    content_sha256,
    file_sha256,
    numpy_to_record,
    packed,
    record_to_numpy,
    record_to_state,
    state_to_record,
    to_wire,
    wire_round_trip,
)
from fedclinic.validation import UpdateSpec, spec_of


@dataclass
class RunResult:
    """The global model after the last round, and how many rounds the run has."""

    arrays: ArrayRecord
    rounds: int


class RoundEngine:
    """Runs one algorithm's rounds against a grid; see the module docstring."""

    def __init__(
        self,
        run: RunConfig,
        algorithm: ServerAlgorithm,
        results: ResultsWriter | None,
        site_key: str,
        clock: Clock | None = None,
        resend: ResendPolicy | None = None,
    ) -> None:
        self.run = run
        if run.secure_aggregation and not isinstance(algorithm, SecureAggregation):
            algorithm = SecureAggregation(algorithm)  # the algorithm stays unaware of it
        self.algorithm = algorithm
        self.results = results
        #: where hospitals file their site state; a resumed run takes the checkpoint's
        self.site_key = site_key
        self.clock = clock or Clock()
        self.resend = resend or ResendPolicy()
        self.names: dict[int, str] = {}
        self.selection = Selection(run.selection_key)
        self.audit = AuditLog(results.directory) if results else None
        self.model_spec: UpdateSpec | None = None
        #: normalisation = federated: the pooled statistics (``config``: what every message
        #: carries; ``summary``) from the statistics exchange before round 1; checkpointed
        self.normalisation: dict[str, Any] = {}

    # ------------------------------------------------------------------ the run
    def start(self, grid: GridLike, initial_arrays: ArrayRecord | None = None) -> RunResult:
        """Setup (or reconnect after a resume), the rounds, the final evaluation, the summary."""
        run, algorithm = self.run, self.algorithm
        if initial_arrays is None:
            initial_arrays = state_to_record(algorithm.initial_state())
        arrays = initial_arrays
        self.model_spec = spec_of(record_to_numpy(arrays))
        transport = Transport(grid, self.clock, self.resend)
        completed = 0
        if run.resume:
            completed, arrays = self.resume()
        flat = run.to_flat()
        self.audit_event(
            "run_resumed" if run.resume else "run_start",
            from_round=completed + 1,
            algorithm=run.algorithm,
            config=flat,
            config_sha256=config_sha256(flat),
            code=code_version(),
            certificates=certificate_fingerprints(),
            initial_model_sha256=content_sha256(record_to_numpy(arrays)),
            **self.wire_hash("initial_wire_model_sha256", arrays),
        )
        if warning := optimizer_warning(run):
            log(WARNING, "%s", warning)
        try:
            if run.resume:  # setup's decisions were restored; node IDs may be new
                self.reconnect(transport)
            else:
                self.setup(transport, arrays)
            for server_round in range(completed + 1, run.rounds + 1):
                log(INFO, "[ROUND %d/%d]", server_round, run.rounds)
                arrays, outcomes = self.round(transport, server_round, arrays)
                algorithm.after_round(server_round, arrays)
                saved = self.save_checkpoint(server_round, arrays)
                self._audit_round("round", server_round, outcomes, arrays, **saved)
            final = keys.final_round(run.rounds)
            outcome = self.exchange(transport, final, FINAL_EVALUATION, arrays, sent=arrays)
            algorithm.after_round(final, arrays)
            self._audit_round("final_evaluation", final, [outcome], arrays)
            self.finish(arrays)
        except BaseException as error:
            self.audit_event("run_end", status="failed", reason=f"{type(error).__name__}: {error}")
            raise
        self.audit_event("run_end", status="completed", rounds=run.rounds)
        return RunResult(arrays, run.rounds)

    def round(
        self, transport: Transport, server_round: int, arrays: ArrayRecord
    ) -> tuple[ArrayRecord, list[Acceptance]]:
        """The algorithm's exchanges of one round; a later exchange goes to the hospitals
        accepted in the one before. Returns the new global model and each exchange's outcome."""
        sent = arrays  # the model of this round, what every hospital's update starts from
        nodes: list[int] | None = None
        outcomes = []
        for exchange in self.algorithm.exchanges(server_round):
            outcome = self.exchange(transport, server_round, exchange, arrays, sent, nodes)
            new = self.algorithm.aggregate(server_round, outcome.accepted, exchange)
            if new is not None:
                arrays = new
            nodes = [r.node_id for r in outcome.accepted]
            outcomes.append(outcome)
        return arrays, outcomes

    def exchange(
        self,
        transport: Transport,
        server_round: int,
        exchange: Exchange,
        arrays: ArrayRecord,
        sent: ArrayRecord,
        nodes: list[int] | None = None,
    ) -> Acceptance:
        """Send ``exchange`` to ``nodes`` (default: every connected hospital), accept the
        replies, write their rows; fewer than ``min-hospitals`` accepted fails the run."""
        run, algorithm = self.run, self.algorithm
        if nodes is None:
            nodes = transport.wait_for_hospitals(run.min_hospitals, run.round_timeout)
        if algorithm.needs_names:
            self.learn_names(transport, [n for n in nodes if n not in self.names])
        config = {
            keys.SERVER_ROUND: server_round,
            keys.EXCHANGE: exchange.name,
            keys.EVALUATE: exchange.evaluate,
            keys.SITE_KEY: self.site_key,
            **self.normalisation.get("config", {}),
            **({keys.FINAL: True} if exchange is FINAL_EVALUATION else {}),
            **({keys.SELECTED_ROUND: self.selection.best[0]} if self.selection.best else {}),
            **algorithm.round_config(server_round, exchange),
        }
        messages = self.messages_for(nodes, server_round, exchange, arrays, config)
        delivery = transport.exchange(messages, run.round_timeout)
        checks = UpdateChecks()
        if exchange.train and algorithm.checks_update_layout:
            checks = UpdateChecks(
                spec=self.model_spec,
                reference=record_to_numpy(sent) if algorithm.checks_update_norms else None,
                max_norm_ratio=run.max_update_norm_ratio,
            )
        checks = UpdateChecks(
            checks.spec,
            checks.reference,
            checks.max_norm_ratio,
            extra=lambda reply: algorithm.check_update(reply, exchange),
            wire_dtype=run.wire_dtype,
        )
        outcome = accept(server_round, exchange, delivery, self.names, checks, run.round_timeout)
        self.names.update(outcome.names)
        rows: list[Row] = list(outcome.rows)
        if exchange.evaluate:
            evaluated = [evaluate_row(server_round, r) for r in outcome.accepted]
            rows.extend(evaluated)
            for row in evaluated:  # a one-class model or split: scores that mean little
                if row.flags:
                    log(WARNING, "%s", flag_line(row, final=exchange is FINAL_EVALUATION))
            self.selection.observe(keys.model_round(server_round), evaluated, sent)
        if exchange.train:
            rows.extend(train_row(server_round, r) for r in outcome.accepted)
        self.record(rows)
        self._log(outcome)
        problem = outcome.shortfall(run.min_hospitals)
        if problem:
            raise FedClinicError(problem)
        return outcome

    def messages_for(
        self,
        nodes: list[int],
        server_round: int,
        exchange: Exchange,
        arrays: ArrayRecord,
        config: dict[str, Any],
    ) -> dict[int, Message]:
        """One message per node: what the algorithm sends that hospital, in wire form.

        The round's record, when the algorithm sends it as it is (every algorithm but
        pFedNet), is cast and packed once for all. A hospital's own record gets its own:
        records are never told apart by ``id()``, which a freed record hands on to the next
        one (a hospital then got another's pFedNet column: docs/reliability.md).
        """
        common: ArrayRecord | None = None
        messages = {}
        for node in nodes:
            hospital = Hospital(node, self.hospital_of(node))
            record = self.algorithm.arrays_for(hospital, arrays, exchange)
            if record is not arrays:
                wire = packed(to_wire(record, self.run.wire_dtype))
            elif common is not None:
                wire = common
            else:
                wire = common = packed(to_wire(arrays, self.run.wire_dtype))
            content = RecordDict(
                {
                    keys.ARRAYS: wire,
                    keys.CONFIG: self.algorithm.config_for(hospital, ConfigRecord(config)),
                }
            )
            messages[node] = Message(
                content=content,
                message_type=exchange.message_type,
                dst_node_id=node,
                group_id=str(server_round),
            )
        return messages

    def query(self, transport: Transport, config: dict[str, Any]) -> list[Reply]:
        """Ask every connected hospital (setup query, names after a resume)."""
        nodes = transport.wait_for_hospitals(self.run.min_hospitals, self.run.round_timeout)
        outcome = self._ask(transport, nodes, config)
        self.record(outcome.rows)
        self._log(outcome)
        problem = outcome.shortfall(self.run.min_hospitals)
        if problem:
            raise FedClinicError(problem)
        return outcome.accepted

    def setup(self, transport: Transport, arrays: ArrayRecord) -> None:
        if self.run.normalisation == "federated":  # first: the setup query uses the data too
            self.normalisation = federated_normalisation(self, transport)
        config = self.algorithm.setup_query()
        if config is not None:
            replies = self.query(transport, {keys.SITE_KEY: self.site_key, **config})
            self.algorithm.setup(replies, arrays)

    def learn_names(self, transport: Transport, nodes: list[int]) -> None:
        """Ask nodes never heard from (a restarted SuperNode) their hospital's name; one
        that does not say stays ``node-<id>``."""
        if nodes:
            self._ask(transport, nodes, {})

    def _ask(self, transport: Transport, nodes: list[int], config: dict[str, Any]) -> Acceptance:
        """A QUERY exchange: the replies' names are learned, the rest is the caller's."""
        config = {keys.SERVER_ROUND: 0, **self.normalisation.get("config", {}), **config}
        content = RecordDict({keys.CONFIG: ConfigRecord(config)})
        messages = {
            n: Message(content=content, message_type=QUERY.message_type, dst_node_id=n)
            for n in nodes
        }
        delivery = transport.exchange(messages, self.run.round_timeout)
        outcome = accept(0, QUERY, delivery, self.names, UpdateChecks(), self.run.round_timeout)
        self.names.update(outcome.names)
        return outcome

    def reconnect(self, transport: Transport) -> None:
        """After a resume: a restarted coordinator (or SuperNode) may know a hospital under
        a new node ID; ask every hospital its name and re-key what is kept by node."""
        previous = dict(self.names)
        replies = self.query(transport, {keys.SITE_KEY: self.site_key})
        now = {r.hospital: r.node_id for r in replies}
        moved = {
            old: now[name] for old, name in previous.items() if name in now and now[name] != old
        }
        for old in moved:
            if self.names.get(old) == previous[old]:
                self.names.pop(old, None)
        if moved:
            log(INFO, "resume: %d hospital(s) reconnected under new node IDs", len(moved))
            self.algorithm.nodes_moved(moved)

    def hospital_of(self, node: int) -> str:
        return self.names.get(node, f"node-{node}")

    # ------------------------------------------------------------------ checkpoint / resume
    def state_dict(self) -> dict[str, Any]:
        """Round-to-round state besides the model: names, model selection, the algorithm's."""
        return {
            "engine": {
                "names": dict(self.names),
                "selection": self.selection.state_dict(),
                "normalisation": self.normalisation,
            },
            "algorithm": self.algorithm.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        engine = state.get("engine", {})
        self.names = dict(engine.get("names", {}))
        self.selection.load_state_dict(engine.get("selection", {}))
        self.normalisation = dict(engine.get("normalisation", {}))
        self.algorithm.load_state_dict(state.get("algorithm", {}))

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
        log(
            INFO,
            "resuming after round %d from %s (%d rows of the unfinished round set aside)",
            saved.round,
            self.results.directory / checkpoint.CHECKPOINT_FILE,
            discarded,
        )
        return saved.round, numpy_to_record(saved.arrays)

    # ------------------------------------------------------------------ results
    def finish(self, arrays: ArrayRecord) -> None:
        """Write the final and selected models and the summary."""
        if not self.results:
            return
        run, selection = self.run, self.selection
        rounds = run.rounds
        model_info = selected_info = None
        if self.algorithm.has_global_model:
            model_info = self.results.save_model("model_final", record_to_state(arrays))
            if selection.best_arrays is not None:
                selected_info = self.results.save_model(
                    "model_selected", record_to_state(selection.best_arrays)
                )
        final_model = keys.model_round(keys.final_round(rounds))
        selected_round = selection.best[0] if selection.best else final_model
        hospitals = hospital_summaries(selection, final_model, selected_round, self.results.rows)
        self.results.write_summary(
            {
                "status": "completed",
                "algorithm": run.algorithm,
                "task": run.task,
                "rounds": rounds,
                "selection_metric": run.selection_key,
                "selected_round": selected_round,
                "selection_note": (
                    "chosen on validation data"
                    if selection.best
                    else "no validation data: the final round is reported"
                ),
                "hospitals": hospitals,
                "flags": flagged(hospitals),
                "model": model_info,
                "selected_model": selected_info,
                "normalisation": self.normalisation.get("summary", {"kind": "site"}),
                "privacy": {  # what the coordinator proposed; each site's ε is in hospitals
                    "dp": run.dp,
                    "noise_multiplier": run.dp_noise_multiplier if run.dp != "off" else None,
                    "max_grad_norm": run.dp_max_grad_norm if run.dp != "off" else None,
                    "model_converted": run.dp != "off" and run.privacy_fix_model,
                    "secure_aggregation": run.secure_aggregation,
                    **(
                        {
                            "secagg_num_shares": run.secagg_num_shares,
                            "secagg_reconstruction_threshold": (
                                run.secagg_reconstruction_threshold
                            ),
                            "secagg_clipping_range": run.secagg_clipping_range,
                            "secagg_quantization_range": run.secagg_quantization_range,
                        }
                        if run.secure_aggregation
                        else {}
                    ),
                },
                **self.algorithm.summary_extra(),
            }
        )

    def record(self, rows: Sequence[Row]) -> None:
        if self.results is not None and rows:
            self.results.append(rows)

    def _log(self, outcome: Acceptance) -> None:
        r = outcome.server_round
        for name, failure in outcome.failed.items():
            log(WARNING, "round %d: hospital reply failed: %s: %s", r, name, failure)
        for name, reason in outcome.rejected.items():
            log(WARNING, "round %d: update of %s REJECTED: %s", r, name, reason)
        for name, count in outcome.duplicates.items():
            log(WARNING, "round %d: %d late duplicate reply(ies) of %s discarded", r, count, name)

    def audit_event(self, event: str, **fields: Any) -> None:
        if self.audit is not None:
            self.audit.record(event, **fields)

    def _audit_round(
        self,
        event: str,
        server_round: int,
        outcomes: list[Acceptance],
        arrays: ArrayRecord,
        **extra: str,
    ) -> None:
        """Who was asked, who answered, who was accepted or refused (and why), who was asked
        again, which model; one entry per exchange under ``exchanges``."""
        first, last = outcomes[0], outcomes[-1]
        merged: dict[str, Any] = {
            "asked": first.asked,
            "answered": first.answered,
            "accepted": sorted(r.hospital for r in last.accepted),
            "rejected": {k: v for o in outcomes for k, v in o.rejected.items()},
            "failed": {k: v for o in outcomes for k, v in o.failed.items()},
            "resent": _sum_counts(o.resent for o in outcomes),
            "duplicates": _sum_counts(o.duplicates for o in outcomes),
        }
        self.audit_event(
            event,
            round=server_round,
            **merged,
            exchanges=[{"exchange": o.exchange, **o.audit()} for o in outcomes],
            model_sha256=content_sha256(record_to_numpy(arrays)),
            **self.wire_hash("wire_model_sha256", arrays),
            **extra,
        )

    def wire_hash(self, field: str, arrays: ArrayRecord) -> dict[str, str]:
        """With a narrow ``wire-dtype``: the content hash of the model as a hospital holds it
        after receipt (widened back to float32), beside the coordinator's own float32 one."""
        if self.run.wire_dtype == "float32":
            return {}
        held = wire_round_trip(arrays, self.run.wire_dtype)
        return {field: content_sha256(record_to_numpy(held))}


def _sum_counts(counts: Any) -> dict[str, int]:
    total: dict[str, int] = {}
    for mapping in counts:
        for name, count in mapping.items():
            total[name] = total.get(name, 0) + count
    return total
