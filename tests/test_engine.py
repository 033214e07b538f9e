"""The round engine's transport and bookkeeping: polling, retries, deadlines, asking a hospital
again when its message was lost, discarding late duplicates, acceptance, rows and summary.

Whole runs go through the real ClientApp handler on the in-process grid with scripted faults
(tests/harness.py) and a clock that does not wait; the engine uses the same push/pull path as
under a SuperLink.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from harness import FakeClock, ScriptedGrid, rows_of, run, synthetic_nodes

from fedclinic import messages as keys
from fedclinic.audit import AuditLog
from fedclinic.bench.grid import task_identity as in_process_identity
from fedclinic.config import HospitalConfig, RunConfig
from fedclinic.engine import TRAIN, Exchange, Hospital, Reply, RoundEngine
from fedclinic.engine.acceptance import UpdateChecks, accept
from fedclinic.engine.exchange import Delivery, ResendPolicy, Transport
from fedclinic.engine.records import Selection, evaluate_row, hospital_summaries, train_row
from fedclinic.errors import FedClinicError
from fedclinic.results import ResultsWriter
from fedclinic.rows import as_row
from fedclinic.serialization import numpy_to_record, record_to_numpy, unpacked
from fedclinic.site import SiteState, run_site_key
from fedclinic.validation import spec_of
from strategies import load_run_config
from strategies.fedavg import FedAvgStrategy

TIMEOUT = 20.0  # fake seconds: a lost message is asked again after half of it


def fedavg(rounds: int = 2, **extra: Any) -> dict[str, Any]:
    return {
        "algorithm": "fedavg",
        "model": "cnn",
        "rounds": rounds,
        "local-steps": 1,
        "batch-size": 16,
        "seed": 3,
        "min-hospitals": 2,
        "round-timeout": TIMEOUT,
        **extra,
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    """The final model of 3 hospitals x 2 FedAvg rounds without any fault."""
    folder = tmp_path_factory.mktemp("reference")
    flat = fedavg()
    with in_process_identity():
        _, result = run(flat, ScriptedGrid(synthetic_nodes(folder, 3), flat), clock=FakeClock())
    return record_to_numpy(result.arrays)


def assert_same_model(arrays: Any, reference: dict[str, np.ndarray]) -> None:
    ours = record_to_numpy(arrays)
    assert ours.keys() == reference.keys()
    for key, value in reference.items():
        np.testing.assert_array_equal(ours[key], value, err_msg=key)


def audit_rounds(out: Path) -> dict[int, dict[str, Any]]:
    return {e["round"]: e for e in AuditLog(out).read() if e["event"] == "round"}


# ----------------------------------------------------------------------- the re-send policy


def test_resend_bound_by_hand() -> None:
    policy = ResendPolicy(factor=3.0, floor=30.0, max_asks=3)
    assert policy.wait(600.0, None) == 300.0  # never heard from: half the deadline
    assert policy.wait(600.0, 5.0) == 30.0  # 3 x 5 s is below the floor
    assert policy.wait(600.0, 40.0) == 120.0  # 3 x its slowest reply so far
    assert policy.wait(600.0, 150.0) == 300.0  # never later than half the deadline


# ----------------------------------------------------------------------- whole runs, faults


@pytest.mark.usefixtures("task_identity")
def test_a_lost_message_is_asked_again_within_the_deadline(
    tmp_path: Path, clock: FakeClock, reference: dict[str, np.ndarray]
) -> None:
    """Round 2's message to hospital-b vanishes at its SuperNode (as when the answer to its
    pull is lost after Flower marked it delivered). Instead of failing hospital-b after the
    deadline, the engine asks it again after half the deadline; the run equals the one
    without the loss, bit for bit."""
    flat, out = fedavg(), tmp_path / "out"
    grid = ScriptedGrid(synthetic_nodes(tmp_path, 3), flat, lose=[(2, "train", 101, 1)])
    _, result = run(flat, grid, out, clock=clock)
    assert_same_model(result.arrays, reference)
    assert TIMEOUT / 2 <= clock.time < TIMEOUT  # asked again at 10 s, answered at once
    to_b = [k for k, node in grid.log if node == 101 and k == MessageType.TRAIN]
    assert len(to_b) == 2 + 1  # round 1, round 2 twice
    rows = rows_of(out)
    assert not [r for r in rows if r["kind"] in ("error", "rejected")]
    trained = sorted((r["round"], r["hospital"]) for r in rows if r["kind"] == "train")
    assert trained == [(n, f"hospital-{h}") for n in (1, 2) for h in "abc"]
    audited = audit_rounds(out)
    assert audited[1]["resent"] == {} and audited[2]["resent"] == {"hospital-b": 1}
    assert audited[2]["duplicates"] == {} and audited[2]["failed"] == {}
    assert audited[2]["accepted"] == ["hospital-a", "hospital-b", "hospital-c"]


@pytest.mark.usefixtures("task_identity")
def test_a_late_duplicate_reply_is_discarded_and_audited(
    tmp_path: Path, clock: FakeClock, reference: dict[str, np.ndarray]
) -> None:
    """Hospital-b's round-1 reply is slow: it is asked again, and both replies then arrive
    together. The first is its answer, the second is discarded and counted; the hospital
    computed the same update both times (round-versioned site state, seeds per round), so
    the run still equals the one without the delay."""
    flat, out = fedavg(), tmp_path / "out"
    grid = ScriptedGrid(synthetic_nodes(tmp_path, 3), flat, hold=[(1, "train", 101, 1)])
    _, result = run(flat, grid, out, clock=clock)
    assert_same_model(result.arrays, reference)
    first, second = grid.answers[(1, "train", 101, 1)], grid.answers[(1, "train", 101, 2)]
    a = record_to_numpy(unpacked(first.content.array_records["arrays"]))
    b = record_to_numpy(unpacked(second.content.array_records["arrays"]))
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    audited = audit_rounds(out)
    assert audited[1]["resent"] == {"hospital-b": 1}
    assert audited[1]["duplicates"] == {"hospital-b": 1}
    assert audited[1]["exchanges"][0]["duplicates"] == {"hospital-b": 1}
    trained = [(r["round"], r["hospital"]) for r in rows_of(out) if r["kind"] == "train"]
    assert len(trained) == len(set(trained)) == 6  # one train row each, never two


@pytest.mark.usefixtures("task_identity")
def test_silent_and_departed_hospitals_fail_alone_at_the_deadline(
    tmp_path: Path, clock: FakeClock
) -> None:
    """Every message to node 102 is lost: it is asked again once (at 10 s; the next would
    be due at the deadline) and then reported as not replying. Node 103 leaves the grid
    (disconnected): a departed node is not asked again. The round goes on with two."""
    flat, out = fedavg(rounds=1), tmp_path / "out"
    lost = [(1, "train", 102, attempt) for attempt in (1, 2, 3)]
    grid = ScriptedGrid(synthetic_nodes(tmp_path, 4), flat, lose=lost, leave=[103])
    run(flat, grid, out, clock=clock)
    first = audit_rounds(out)[1]
    reason = f"no reply within round-timeout = {TIMEOUT:g} s"
    assert first["failed"] == {"node-102": reason, "node-103": reason}
    assert first["resent"] == {"node-102": 1}
    assert first["accepted"] == ["hospital-a", "hospital-b"]
    errors = [(r["node_id"], r["reason"]) for r in rows_of(out) if r["kind"] == "error"]
    assert sorted(errors) == [(102, reason), (103, reason)]
    assert clock.time >= TIMEOUT  # the round waited for its deadline, not longer
    assert clock.time < 2 * TIMEOUT + 1  # round and final evaluation, each at most once


@pytest.mark.usefixtures("task_identity")
def test_failing_pulls_are_retried_and_the_data_identity_is_recorded(
    tmp_path: Path, clock: FakeClock
) -> None:
    """The SuperLink refuses two pulls (HTTP 500 'database is locked' under load): the
    engine retries with backoff. Every reply carries the hospital's data source and
    fingerprint, which end up in its train rows and under summary.json's hospitals."""

    def identify(reply: Message) -> None:
        if not reply.has_error() and "info" in reply.content.config_records:
            info = reply.content.config_records["info"]
            name = str(info["hospital"])
            info["data_source"] = f"synthetic:{name}"
            info["data_fingerprint"] = f"sha256:{name[-1] * 8}"

    flat, out = fedavg(rounds=1), tmp_path / "out"
    grid = ScriptedGrid(synthetic_nodes(tmp_path, 2), flat, fail_pulls=2, edit=identify)
    run(flat, grid, out, clock=clock)
    assert clock.slept == 2.0 + 4.0  # two backoffs, then every reply at once
    trained = [r for r in rows_of(out) if r["kind"] == "train"]
    assert {(r["hospital"], r["data_source"], r["data_fingerprint"]) for r in trained} == {
        ("hospital-a", "synthetic:hospital-a", "sha256:aaaaaaaa"),
        ("hospital-b", "synthetic:hospital-b", "sha256:bbbbbbbb"),
    }
    hospitals = json.loads((out / "summary.json").read_text())["hospitals"]
    assert hospitals["hospital-b"]["data_source"] == "synthetic:hospital-b"
    assert hospitals["hospital-b"]["data_fingerprint"] == "sha256:bbbbbbbb"


@pytest.mark.usefixtures("task_identity")
def test_pfednet_personal_exchange_has_the_same_retries_and_validation(
    tmp_path: Path, clock: FakeClock
) -> None:
    """pFedNet's second exchange of a round goes through the engine: hospital-a's personal
    message is lost and asked again; hospital-c's personal upload carries a NaN and is
    refused and audited like any bad update."""

    def poison(reply: Message) -> None:
        arrays = reply.content.array_records.get("arrays")
        if reply.metadata.src_node_id == 102 and arrays is not None and "personal.delta" in arrays:
            bad = record_to_numpy(arrays)
            bad["personal.delta"] = bad["personal.delta"].copy()
            bad["personal.delta"].flat[0] = np.nan
            reply.content["arrays"] = numpy_to_record(bad)

    flat = {
        **fedavg(rounds=1),
        "algorithm": "pfednet",
        "pfednet.admm-iterations": 10,
        "pfednet.allow-rank-deficient-sketch": True,  # 28 synthetic images of 784 pixels
    }
    out = tmp_path / "out"
    grid = ScriptedGrid(
        synthetic_nodes(tmp_path, 3), flat, lose=[(1, "personal", 100, 1)], edit=poison
    )
    run(flat, grid, out, clock=clock)
    shared, personal = audit_rounds(out)[1]["exchanges"]
    assert shared["exchange"] == "shared" and shared["resent"] == {}
    assert personal["exchange"] == "personal"
    assert personal["asked"] == ["hospital-a", "hospital-b", "hospital-c"]
    assert personal["resent"] == {"hospital-a": 1}
    assert list(personal["rejected"]) == ["hospital-c"]
    assert "NaN/Inf" in personal["rejected"]["hospital-c"]
    assert personal["accepted"] == ["hospital-a", "hospital-b"]
    rows = rows_of(out)
    rejected = [(r["round"], r["hospital"]) for r in rows if r["kind"] == "rejected"]
    assert rejected == [(1, "hospital-c")]
    admm = next(r for r in rows if r["kind"] == "pfednet-admm")
    assert admm["hospitals_updated"] == ["hospital-a", "hospital-b"]  # never hospital-c's G


# ----------------------------------------------------------------------- pieces, by hand


class FixedGrid:
    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return self.nodes

    def push_messages(self, messages: Any) -> list[str]:
        raise AssertionError("nothing is sent")

    def pull_messages(self, message_ids: Any) -> list[Message]:
        raise AssertionError("nothing is asked")


def test_waiting_for_hospitals_has_a_deadline() -> None:
    clock = FakeClock()
    transport = Transport(FixedGrid([7]), clock)
    with pytest.raises(FedClinicError, match=r"only 1 hospital\(s\) connected after 5 s"):
        transport.wait_for_hospitals(2, 5.0)
    assert 5.0 < clock.time <= 7.0
    assert transport.wait_for_hospitals(1, 5.0) == [7]


@pytest.mark.usefixtures("task_identity")
def test_acceptance_sorts_replies_by_hand() -> None:
    """One reply of each kind: a SuperLink error, a hospital's own error, a NaN update, a
    wrong layout, a good one, and a hospital that never replied."""
    model = {"w": np.zeros(2, np.float32)}

    def sent(node: int) -> Message:
        return Message(RecordDict({}), dst_node_id=node, message_type=MessageType.TRAIN)

    def good(node: int, name: str, arrays: dict[str, np.ndarray]) -> Message:
        content = RecordDict(
            {
                "arrays": numpy_to_record(arrays),
                "metrics": MetricRecord({"num-examples": 4, "val_loss": 0.5}),
                "info": ConfigRecord({"hospital": name}),
            }
        )
        return Message(content, reply_to=sent(node))

    nan = {"w": np.array([np.nan, 0.0], np.float32)}
    replies = {
        1: Message(Error(code=2, reason="node offline"), reply_to=sent(1)),
        2: Message(
            RecordDict({"info": ConfigRecord({"hospital": "b", "error": "no data"})}),
            reply_to=sent(2),
        ),
        3: good(3, "c", nan),
        4: good(4, "d", {"v": np.zeros(2, np.float32)}),
        5: good(5, "e", model),
    }
    delivery = Delivery(asked=[1, 2, 3, 4, 5, 6], replies=replies, missing=[6], resent={6: 2})
    checks = UpdateChecks(spec=spec_of(model))
    outcome = accept(3, TRAIN, delivery, {1: "a"}, checks, 60.0)
    assert outcome.asked == ["a", "b", "c", "d", "e", "node-6"]
    assert outcome.answered == ["b", "c", "d", "e"]  # a's error came from the SuperLink
    assert [r.hospital for r in outcome.accepted] == ["e"]
    assert outcome.failed == {
        "a": "node offline (code 2)",
        "b": "no data",
        "node-6": "no reply within round-timeout = 60 s",
    }
    assert outcome.rejected == {
        "c": "update 'w' has 1 NaN/Inf value(s)",
        "d": "update missing keys 'w' and unexpected keys 'v'",
    }
    assert outcome.resent == {"node-6": 2}
    assert outcome.names == {2: "b", 3: "c", 4: "d", 5: "e"}
    kinds = sorted((r.hospital, r.kind) for r in outcome.rows)
    assert kinds == [("a", "error"), ("b", "error"), ("c", "rejected"), ("d", "rejected"),
                     ("node-6", "error")]  # fmt: skip
    assert outcome.shortfall(1) is None
    assert "1 of 6 hospitals replied successfully, fewer than min-hospitals = 2" in str(
        outcome.shortfall(2)
    )


def test_rows_and_summary_carry_what_the_hospital_reported() -> None:
    reply = Reply(
        node_id=9,
        hospital="st-mary",
        arrays=None,
        metrics={
            "num-examples": 32, "num_train": 40, "train_loss": 0.25, "train_seconds": 1.5,
            "train_steps": 2, "train_kl": 0.125, "val_loss": 0.5, "val_accuracy": 0.75,
            "test_accuracy": 0.5, "num_val": 8, "num_test": 8, "eval_seconds": 0.1,
        },
        info={
            "hospital": "st-mary", "device": "cpu", "deployed": "local",
            "model_sha256": "ab" * 32, "data_source": "heart-disease",
            "data_fingerprint": "cd" * 32,
        },
    )  # fmt: skip
    trained = train_row(2, reply).dump()
    assert trained == {
        "round": 2, "kind": "train", "hospital": "st-mary", "node_id": 9, "train_loss": 0.25,
        "num_examples": 32, "num_train": 40, "seconds": 1.5, "steps": 2, "device": "cpu",
        "data_source": "heart-disease", "data_fingerprint": "cd" * 32,
        "model_sha256": "ab" * 32, "train_kl": 0.125,
    }  # fmt: skip
    evaluated = evaluate_row(2, reply)
    assert evaluated.dump() == {
        "round": 2, "kind": "evaluate", "hospital": "st-mary", "node_id": 9, "model_round": 1,
        "model": "local", "val_loss": 0.5, "val_accuracy": 0.75, "test_accuracy": 0.5,
        "num_val": 8, "num_test": 8, "eval_seconds": 0.1,
    }  # fmt: skip
    selection = Selection("val_loss")
    selection.observe(1, [evaluated], None)
    summary = hospital_summaries(selection, 1, 1, [trained])["st-mary"]
    assert summary["data_source"] == "heart-disease"
    assert summary["data_fingerprint"] == "cd" * 32
    assert summary["site_models"] == {"model_sha256": "ab" * 32}
    assert summary["final"]["val_accuracy"] == 0.75 and "eval_seconds" not in summary["final"]


def test_model_selection_keeps_the_best_validation_round() -> None:
    def row(model_round: int, name: str, value: float) -> Any:
        reply = Reply(1, name, None, {"val_loss": value}, {})
        return evaluate_row(model_round + 1, reply)

    selection = Selection("val_loss")
    first, second = numpy_to_record({"x": np.zeros(1)}), numpy_to_record({"x": np.ones(1)})
    selection.observe(0, [row(0, "a", 0.9), row(0, "b", 0.7)], first)  # mean 0.8
    selection.observe(1, [row(1, "a", 0.5), row(1, "b", 0.9)], second)  # mean 0.7: better
    selection.observe(2, [row(2, "a", float("nan"))], first)  # no finite score: ignored
    assert selection.best is not None and selection.best[0] == 1
    assert selection.best[1] == pytest.approx(-0.7)
    assert selection.best_arrays is second
    restored = Selection("val_loss")
    restored.load_state_dict(selection.state_dict())
    assert restored.best == selection.best and restored.evaluations == selection.evaluations


def test_every_row_follows_the_schema_of_its_kind(tmp_path: Path) -> None:
    """Rows written as plain mappings (the pooled baseline's) are checked against their
    kind's schema; a kind without a schema is refused by name."""
    pooled = {"round": 1, "kind": "evaluate", "hospital": "a", "model_round": 0,
              "model": "pooled", "val_loss": 0.5}  # fmt: skip
    assert as_row(pooled).dump() == pooled  # no node: no node_id column
    with pytest.raises(ValueError, match="metrics row kind 'surprise' has no schema"):
        as_row({"round": 1, "kind": "surprise"})
    with pytest.raises(ValueError, match="num_examples"):
        as_row({"round": 1, "kind": "train", "hospital": "a", "node_id": 1})
    results = ResultsWriter(tmp_path)
    results.append([pooled])
    assert rows_of(tmp_path)[0]["val_loss"] == 0.5


def test_the_site_key_is_decided_in_one_place(tmp_path: Path) -> None:
    """The coordinator's key (sent in every message) and a hospital's fallback without one
    come from the same function: the run name, else the Flower run id."""
    assert run_site_key("study-1", 7) == "study-1"
    assert run_site_key("", 7) == "run-7"
    hospital = HospitalConfig(hospital="st-mary", state_dir=str(tmp_path))
    assert SiteState.for_run(hospital, RunConfig(), 7).directory == tmp_path / "run-7"
    sent = SiteState.for_run(hospital, RunConfig(), 7, site_key="study-1")
    assert sent.directory == tmp_path / "study-1"


@pytest.mark.usefixtures("task_identity")
def test_a_crashing_hospital_handler_stops_an_in_process_run_at_once(
    tmp_path: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug in the handler (not a reported failure) surfaces with its traceback instead of
    being retried as a failed pull and waited for until the deadline."""
    from fedclinic.bench import grid as in_process

    def broken(*args: Any) -> Message:
        raise RuntimeError("bug in the handler")

    monkeypatch.setattr(in_process, "answer", broken)
    flat = fedavg(rounds=1)
    with pytest.raises(in_process.HospitalCrash, match="node 100: RuntimeError: bug in"):
        run(flat, ScriptedGrid(synthetic_nodes(tmp_path, 2), flat), tmp_path / "out", clock=clock)
    assert clock.time == 0.0
    assert AuditLog(tmp_path / "out").read()[-1]["status"] == "failed"


class OwnRecordPerHospital(FedAvgStrategy):
    """Sends every hospital a record of its own (as pFedNet does: its column), freshly built
    and not kept: the next one may be given the freed one's memory, so the same ``id()``."""

    def arrays_for(
        self, hospital: Hospital, arrays: ArrayRecord, exchange: Exchange
    ) -> ArrayRecord:
        own = np.frombuffer(hospital.name.encode(), dtype=np.uint8).copy()
        return numpy_to_record({"weights": np.full(3, hospital.node_id, np.float32), "own": own})


@pytest.mark.usefixtures("task_identity")
def test_every_hospital_gets_its_own_record_and_a_common_one_is_cast_once() -> None:
    """The flake of a pFedNet run in the accuracy gate (a hospital handed the hash and column
    of another): messages were built with one cast per ``id(record)``, and a record freed
    after its cast handed its id on. Here 64 hospitals, each record freed after use: every
    message must carry its own hospital's record. A record sent to all as it is (FedAvg) is
    still cast once: every message holds the same wire record."""
    nodes = list(range(100, 164))
    run_config = load_run_config(fedavg(**{"wire-dtype": "float16"}))
    engine = RoundEngine(run_config, OwnRecordPerHospital(run_config), None, "key")
    engine.names = {n: f"hospital-{n}" for n in nodes}
    arrays = numpy_to_record({"weights": np.zeros(3, np.float32), "bias": np.ones(2, np.float32)})
    for _ in range(10):  # the allocation pattern differs between passes
        messages = engine.messages_for(nodes, 1, TRAIN, arrays, {keys.SERVER_ROUND: 1})
        got = {
            n: record_to_numpy(unpacked(m.content.array_records[keys.ARRAYS]))
            for n, m in messages.items()
        }
        assert {n: bytes(g["own"]).decode() for n, g in got.items()} == engine.names
        assert all((got[n]["weights"] == n).all() for n in nodes)
        assert all(m.metadata.dst_node_id == n for n, m in messages.items())

    common = RoundEngine(run_config, FedAvgStrategy(run_config), None, "key")
    common.names = engine.names
    messages = common.messages_for(nodes, 1, TRAIN, arrays, {keys.SERVER_ROUND: 1})
    wire = {id(m.content.array_records[keys.ARRAYS]) for m in messages.values()}
    assert len(wire) == 1  # one cast and pack for all (all alive here: ids are distinct)
    sent = record_to_numpy(unpacked(messages[100].content.array_records[keys.ARRAYS]))
    assert sent["weights"].dtype == np.float16 and (sent["bias"] == 1).all()
