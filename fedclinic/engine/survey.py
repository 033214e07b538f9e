"""Statistics exchanges through the round engine: a QUERY to every connected hospital with a
statistics request, sent, polled, re-sent and accepted like every other exchange
(:meth:`RoundEngine.query`), answers validated, pooled by :mod:`fedclinic.stats.pool`, and
recorded in the audit log.

Two uses:

- a statistics run (``run-kind = stats``, ``fedclinic stats``): :func:`run_statistics`, two
  exchanges (moments, then histograms on bins derived from the pooled moments);
- federated normalisation (``normalisation = federated``): :func:`federated_normalisation`,
  once before round 1; the engine sends the pooled train mean/std in every later message
  and keeps them in its checkpoint, so a resumed run normalises with the same numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from logging import INFO, WARNING
from typing import Any, Protocol

from flwr.common import log

from fedclinic import messages as keys
from fedclinic.audit import certificate_fingerprints, code_version, config_sha256
from fedclinic.config import RunConfig
from fedclinic.engine.algorithm import Reply
from fedclinic.engine.exchange import Clock, GridLike, ResendPolicy, Transport
from fedclinic.errors import FedClinicError
from fedclinic.rows import ErrorRow, Row
from fedclinic.stats import pool
from fedclinic.stats.protocol import SiteAnswer, StatsRequest, parse_answer


class RoundEngine(Protocol):
    """What a statistics exchange uses of :class:`fedclinic.engine.rounds.RoundEngine` (which
    runs it before round 1 and so imports this module, not the other way round)."""

    run: RunConfig
    site_key: str
    clock: Clock
    resend: ResendPolicy

    def query(self, transport: Transport, config: dict[str, Any]) -> list[Reply]: ...

    def record(self, rows: Sequence[Row]) -> None: ...

    def audit_event(self, event: str, **fields: Any) -> None: ...


def ask(engine: RoundEngine, transport: Transport, request: StatsRequest) -> dict[str, SiteAnswer]:
    """One statistics exchange: every connected hospital's validated answer, by name.

    A hospital that refuses the request (one line, e.g. an unknown feature) or does not
    answer is an ``error`` row; a malformed answer a ``rejected`` row. Fewer than
    ``min-hospitals`` answers fail the run with every reason.
    """
    replies = engine.query(
        transport, {keys.SITE_KEY: engine.site_key, keys.STATS_REQUEST: request.to_json()}
    )
    answers: dict[str, SiteAnswer] = {}
    rejected: list[ErrorRow] = []
    for reply in replies:
        try:
            answer = parse_answer(reply.info.get(keys.STATS))
        except FedClinicError as err:
            log(WARNING, "statistics of %s REJECTED: %s", reply.hospital, err)
            rejected.append(ErrorRow(round=0, hospital=reply.hospital, node_id=reply.node_id,
                                     kind="rejected", reason=str(err)))  # fmt: skip
            continue
        answers[reply.hospital] = answer
    engine.record(rejected)
    if len(answers) < engine.run.min_hospitals:
        reasons = "; ".join(f"{r.hospital}: {r.reason}" for r in rejected)
        raise FedClinicError(
            f"statistics: {len(answers)} hospital(s) answered, fewer than min-hospitals = "
            f"{engine.run.min_hospitals}" + (f". Rejected: {reasons}" if reasons else "")
        )
    return answers


def federated_normalisation(engine: RoundEngine, transport: Transport) -> dict[str, Any]:
    """The pooled train mean/std of the model's inputs, asked once before round 1.

    Returns the record the engine keeps (and checkpoints): ``config``, the entries every
    later message carries, and ``summary``, what ``summary.json`` and the audit log say.
    """
    request = StatsRequest(splits=("train",), inputs_only=True, moments=True)
    answers = ask(engine, transport, request)
    try:
        summary = pool.normalisation(answers)
    except ValueError as err:
        raise FedClinicError(f"normalisation = federated: {err}") from None
    excluded = {n: sorted(d["excluded"]) for n, d in summary["contributions"].items()
                if d["excluded"]}  # fmt: skip
    log(
        INFO,
        "federated normalisation: pooled train statistics of %d inputs from %s%s",
        len(summary["variables"]),
        ", ".join(sorted(answers)),
        f" (withheld at the site: {excluded})" if excluded else "",
    )
    engine.audit_event("normalisation", hospitals=sorted(answers), mean=summary["mean"],
                  std=summary["std"], variables=summary["variables"],
                  excluded=excluded)  # fmt: skip
    config = {keys.NORMALISATION_MEAN: summary["mean"], keys.NORMALISATION_STD: summary["std"]}
    return {"config": config, "summary": summary}


def run_statistics(engine: RoundEngine, grid: GridLike) -> dict[str, Any]:
    """A statistics run: moments, then histograms, pooled; returns what ``stats.json``
    holds. The audit log records the start, each exchange's request hash, and the end."""
    run = engine.run
    transport = Transport(grid, engine.clock, engine.resend)
    flat = run.to_flat()
    engine.audit_event(
        "run_start", run_kind="stats", config=flat, config_sha256=config_sha256(flat),
        code=code_version(), certificates=certificate_fingerprints(),
    )  # fmt: skip
    try:
        names = tuple(n.strip() for n in run.stats_features.split(",") if n.strip())
        first = StatsRequest(variables=names, moments=True)
        answers = ask(engine, transport, first)
        _audit_exchange(engine, "moments", first, answers)
        second, skipped = pool.histogram_request(pool.pool(answers), first, run.stats_bins)
        if second is not None:
            histograms = ask(engine, transport, second)
            _audit_exchange(engine, "histograms", second, histograms)
            # a hospital that answered only the first exchange keeps its moments
            answers = {h: _merge(a, histograms[h]) if h in histograms else a
                       for h, a in answers.items()}  # fmt: skip
        sites = pool.per_site(answers)
        pooled = pool.pool(answers)
        result = {
            "kind": "fedclinic-statistics",
            "config": flat,
            "hospitals": sites,
            "pooled": pooled,
            "flags": pool.flags(sites, pooled),
            "no_histogram": skipped,
            "requests": [first.model_dump()] + ([second.model_dump()] if second else []),
        }
    except BaseException as error:
        engine.audit_event("run_end", status="failed", reason=f"{type(error).__name__}: {error}")
        raise
    engine.audit_event("run_end", status="completed", run_kind="stats", hospitals=sorted(answers))
    return result


def _merge(moments: SiteAnswer, histograms: SiteAnswer) -> SiteAnswer:
    """The first exchange's answer with the second's histograms added, split by split."""
    splits = {
        name: part.model_copy(update={"histograms": histograms.splits[name].histograms})
        if name in histograms.splits
        else part
        for name, part in moments.splits.items()
    }
    return moments.model_copy(update={"splits": splits})


def _audit_exchange(
    engine: RoundEngine, name: str, request: StatsRequest, answers: dict[str, SiteAnswer]
) -> None:
    engine.audit_event("statistics", exchange=name, request=request.model_dump(),
                  answered=sorted(answers))  # fmt: skip
