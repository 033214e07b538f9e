"""Which replies of an exchange count: unpack them, refuse bad updates, say why.

:func:`accept` returns an :class:`Acceptance`, the explicit record of an exchange (asked,
answered, accepted, rejected, failed, asked again, duplicates) that the engine writes to
``metrics.jsonl`` and the audit log. A trained reply whose update fails
:mod:`fedclinic.validation` (layout, NaN/Inf, norm outlier) or the algorithm's own check is
``rejected`` and never aggregated; a hospital that reported an error, or did not reply by
the deadline, ``failed``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from flwr.app import Message

from fedclinic import messages as keys
from fedclinic.engine.algorithm import Exchange, Reply
from fedclinic.engine.exchange import Delivery
from fedclinic.errors import DataError
from fedclinic.rows import ErrorRow
from fedclinic.serialization import from_wire, record_to_numpy, unpacked
from fedclinic.validation import UpdateSpec, norm_outliers, structure_problem, update_norm


@dataclass
class Acceptance:
    """What the coordinator made of one exchange."""

    server_round: int
    exchange: str
    asked: list[str]
    answered: list[str] = field(default_factory=list)
    accepted: list[Reply] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    resent: dict[str, int] = field(default_factory=dict)
    duplicates: dict[str, int] = field(default_factory=dict)
    #: node -> name, as the hospitals told it in this exchange
    names: dict[int, str] = field(default_factory=dict)
    #: ``error`` and ``rejected`` rows
    rows: list[ErrorRow] = field(default_factory=list)

    def audit(self) -> dict[str, Any]:
        return {
            "asked": self.asked,
            "answered": self.answered,
            "accepted": sorted(r.hospital for r in self.accepted),
            "rejected": self.rejected,
            "failed": self.failed,
            "resent": self.resent,
            "duplicates": self.duplicates,
        }

    def shortfall(self, minimum: int) -> str | None:
        """Why the exchange cannot go on (fewer than ``minimum`` accepted), or ``None``."""
        if len(self.accepted) >= minimum:
            return None
        problems = [f"{n}: {r}" for n, r in {**self.failed, **self.rejected}.items()]
        return (
            f"round {self.server_round}: {len(self.accepted)} of {len(self.asked)} hospitals "
            f"replied successfully, fewer than min-hospitals = {minimum}. "
            + ("Failures: " + "; ".join(problems) if problems else "No replies arrived.")
        )


@dataclass(frozen=True)
class UpdateChecks:
    """How an exchange's uploads are checked."""

    #: the model's layout (keys, shapes, dtypes); ``None``: NaN/Inf only
    spec: UpdateSpec | None = None
    #: the model the hospitals received, for update norms; ``None``: no norm check
    reference: Mapping[str, np.ndarray] | None = None
    max_norm_ratio: float = 0.0
    #: the algorithm's own check (``ServerAlgorithm.check_update``)
    extra: Callable[[Reply], str | None] | None = None
    #: the run's ``wire-dtype``: uploads are widened back to float32 before any check
    wire_dtype: str = "float32"


def accept(
    server_round: int,
    exchange: Exchange,
    delivery: Delivery,
    known: Mapping[int, str],
    checks: UpdateChecks,
    timeout: float,
) -> Acceptance:
    """Sort one exchange's replies into accepted, rejected and failed, with their rows."""
    names = dict(known)

    def name(node: int) -> str:
        return names.get(node, f"node-{node}")

    outcome = Acceptance(server_round, exchange.name, asked=[])
    candidates: list[Reply] = []

    def fail(node: int, reason: str, kind: Literal["error", "rejected"] = "error") -> None:
        (outcome.failed if kind == "error" else outcome.rejected)[name(node)] = reason
        outcome.rows.append(
            ErrorRow(
                round=server_round, hospital=name(node), node_id=node, kind=kind, reason=reason
            )
        )

    for node, message in sorted(delivery.replies.items()):
        info = _info(message)
        if not message.has_error() and isinstance(info.get(keys.HOSPITAL), str):
            names[node] = outcome.names[node] = info[keys.HOSPITAL]
        if message.has_error():  # from the SuperLink (node gone, message expired)
            fail(node, f"{message.error.reason} (code {message.error.code})")
            continue
        if keys.ERROR in info:  # the hospital's own one line (configuration, data)
            fail(node, str(info[keys.ERROR]))
            continue
        sent = message.content.array_records.get(keys.ARRAYS) if exchange.train else None
        try:  # unpacked, widened to float32 (wire-dtype), and readable at all
            received = None if sent is None else unpacked(sent)
            arrays = None if received is None else from_wire(received, checks.wire_dtype)
            values = None if arrays is None else record_to_numpy(arrays)
        except (DataError, TypeError, ValueError) as err:  # a malformed or foreign array
            fail(node, f"unreadable update: {err}", "rejected")
            continue
        reply = Reply(
            node_id=node,
            hospital=name(node),
            arrays=arrays,
            metrics=dict(message.content[keys.METRICS])
            if keys.METRICS in message.content.metric_records
            else {},
            info=info,
            received=received,
        )
        if exchange.train and reply.arrays is None:
            fail(node, "the reply carries no model update")
            continue
        if exchange.train and values is not None:
            problem = structure_problem(values, checks.spec)
            if problem is None and checks.extra is not None:
                problem = checks.extra(reply)
            if problem:
                fail(node, problem, "rejected")
                continue
        candidates.append(reply)
    for node in delivery.missing:
        fail(node, f"no reply within round-timeout = {timeout:g} s")
    outcome.asked = sorted(name(n) for n in delivery.asked)
    outcome.answered = sorted(name(n) for n, m in delivery.replies.items() if not m.has_error())
    outcome.resent = {name(n): count for n, count in delivery.resent.items()}
    outcome.duplicates = {name(n): count for n, count in delivery.duplicates.items()}
    outliers = _norm_outliers(candidates, checks) if exchange.train else {}
    for reply in candidates:
        if reply.hospital in outliers:
            fail(reply.node_id, outliers[reply.hospital], "rejected")
        else:
            outcome.accepted.append(reply)
    return outcome


def _info(message: Message) -> dict[str, Any]:
    if message.has_error() or keys.INFO not in message.content.config_records:
        return {}
    return dict(message.content[keys.INFO])


def _norm_outliers(replies: list[Reply], checks: UpdateChecks) -> dict[str, str]:
    if checks.spec is None or checks.reference is None:
        return {}
    norms = {
        r.hospital: update_norm(record_to_numpy(r.arrays), checks.reference)
        for r in replies
        if r.arrays is not None
    }
    return norm_outliers(norms, checks.max_norm_ratio)
