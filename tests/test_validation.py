"""Update validation (fedclinic.validation) against hand computations, and the round engine
refusing a corrupt hospital's update in whole FedAvg rounds (real ClientApp handler,
in-process grid that tampers with one hospital's reply) with the audit log recording it."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ArrayRecord, Message, RecordDict
from harness import FakeClock, ScriptedGrid, rows_of, run

from fedclinic.audit import AuditLog, config_sha256
from fedclinic.engine.exchange import with_retries
from fedclinic.errors import FedClinicError
from fedclinic.serialization import (
    content_sha256,
    load_checkpoint,
    numpy_to_record,
    packed,
    record_to_numpy,
    unpacked,
)
from fedclinic.validation import norm_outliers, spec_of, structure_problem, update_norm

MODEL = {"w": np.zeros((2, 3), np.float32), "b": np.zeros(2, np.float32)}


def test_a_well_formed_update_passes() -> None:
    assert structure_problem(MODEL, spec_of(MODEL)) is None


@pytest.mark.parametrize(
    ("update", "expected"),
    [
        ({"w": MODEL["w"]}, "update missing keys 'b'"),
        ({**MODEL, "x": np.zeros(1, np.float32)}, "update unexpected keys 'x'"),
        ({**MODEL, "b": np.zeros(3, np.float32)}, "update 'b' has shape (3,), expected (2,)"),
        ({**MODEL, "b": np.zeros(2, np.float64)}, "update 'b' has dtype float64, expected float32"),
        (
            {**MODEL, "w": np.array([[0, np.nan, 0], [np.inf, 0, 0]], np.float32)},
            "update 'w' has 2 NaN/Inf value(s)",
        ),
    ],
)
def test_each_kind_of_bad_update_is_named(update: dict[str, np.ndarray], expected: str) -> None:
    assert structure_problem(update, spec_of(MODEL)) == expected


def test_without_a_spec_only_finiteness_is_checked() -> None:
    assert structure_problem({"codes": np.zeros(5, np.uint8)}, None) is None
    bad = {"levels": np.array([1.0, np.nan], np.float32)}
    assert structure_problem(bad, None) == "update 'levels' has 1 NaN/Inf value(s)"


def test_update_norm_is_the_l2_norm_of_the_step() -> None:
    sent = {"w": np.ones((2, 2), np.float32), "b": np.zeros(1, np.float32)}
    got = {"w": np.array([[1, 1], [4, 1]], np.float32), "b": np.array([4.0], np.float32)}
    assert update_norm(got, sent) == pytest.approx(math.sqrt(3**2 + 4**2))  # 5


def test_norm_outliers_are_judged_against_the_median() -> None:
    norms = {"a": 1.0, "b": 2.0, "c": 3.0, "d": 25.0}  # median 2.5; bound 10 x 2.5 = 25
    assert norm_outliers(norms, 10.0) == {}  # 25 is not MORE than the bound
    norms["d"] = 25.1
    refused = norm_outliers(norms, 10.0)
    assert set(refused) == {"d"} and "median update norm 2.5" in refused["d"]
    assert norm_outliers(norms, 0) == {}  # switched off
    assert norm_outliers({"a": 1.0, "b": 1000.0}, 10.0) == {}  # two cannot name an outlier


def test_audit_config_hash_ignores_key_order(tmp_path: Path) -> None:
    assert config_sha256({"a": 1, "b": "x"}) == config_sha256({"b": "x", "a": 1})
    assert config_sha256({"a": 1}) != config_sha256({"a": 2})
    log = AuditLog(tmp_path)
    log.record("one", x=1)
    log.record("two")
    assert [e["event"] for e in log.read()] == ["one", "two"]


# ------------------------------------------------------------------- whole rounds, in process


def tampering(victim: int, tamper: Any) -> Any:
    """A reply editor that replaces one hospital's uploaded weights on the way."""

    def edit(reply: Message) -> None:
        if reply.metadata.src_node_id == victim and not reply.has_error():
            arrays = reply.content.array_records.get("arrays")
            if arrays is not None and len(arrays) > 0:
                tampered = tamper(record_to_numpy(unpacked(arrays)))
                reply.content["arrays"] = packed(numpy_to_record(tampered))  # as a hospital sends

    return edit


def synthetic_nodes(tmp_path: Path, count: int) -> dict[int, dict[str, Any]]:
    return {
        100 + i: {
            "hospital": f"hospital-{'abcd'[i]}",
            "data-source": "synthetic",
            "num-samples": 40,
            "data-seed": i,
            "device": "cpu",
            "state-dir": str(tmp_path / "state" / str(i)),
        }
        for i in range(count)
    }


def run_tampered(tmp_path: Path, tamper: Any, count: int = 3, **extra: Any) -> Path:
    flat = {
        "algorithm": "fedavg",
        "model": "cnn",
        "rounds": 2,
        "local-steps": 2,
        "batch-size": 8,
        "seed": 3,
        "min-hospitals": 2,
        **extra,
    }
    out = tmp_path / "out"
    grid = ScriptedGrid(synthetic_nodes(tmp_path, count), flat, edit=tampering(101, tamper))
    run(flat, grid, out)
    return out


def nan_update(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    first = next(k for k, v in arrays.items() if np.issubdtype(v.dtype, np.floating))
    arrays[first] = arrays[first].copy()
    arrays[first].flat[0] = np.nan
    return arrays


def huge_update(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v * 1000 if np.issubdtype(v.dtype, np.floating) else v for k, v in arrays.items()}


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize(
    ("tamper", "reason"),
    [(nan_update, "NaN/Inf value(s)"), (huge_update, "max-update-norm-ratio = 10")],
)
def test_a_corrupt_hospital_is_refused_and_never_aggregated(
    tmp_path: Path, tamper: Any, reason: str
) -> None:
    out = run_tampered(tmp_path, tamper)
    rows = rows_of(out)
    rejected = [r for r in rows if r["kind"] == "rejected"]
    assert [(r["round"], r["hospital"]) for r in rejected] == [(1, "hospital-b"), (2, "hospital-b")]
    assert all(reason in r["reason"] for r in rejected)
    trained = {(r["round"], r["hospital"]) for r in rows if r["kind"] == "train"}
    assert trained == {(n, h) for n in (1, 2) for h in ("hospital-a", "hospital-c")}
    final = json.loads((out / "summary.json").read_text())
    assert final["status"] == "completed"
    audit = AuditLog(out).read()
    assert [e["event"] for e in audit] == [
        "run_start",
        "round",
        "round",
        "final_evaluation",
        "run_end",
    ]
    start, first, *_, end = audit
    assert start["config_sha256"] == config_sha256(start["config"])
    assert start["code"]["fedclinic"] and end["status"] == "completed"
    assert first["asked"] == ["hospital-a", "hospital-b", "hospital-c"]
    assert first["accepted"] == ["hospital-a", "hospital-c"]
    assert reason in first["rejected"]["hospital-b"]
    assert first["failed"] == {} and first["resent"] == {} and first["duplicates"] == {}
    assert [e["exchange"] for e in first["exchanges"]] == ["train"]
    assert first["exchanges"][0]["rejected"] == first["rejected"]
    # the audited model of the last round is the model the coordinator saved
    saved = load_checkpoint(out / "model_final.pt")
    assert audit[2]["model_sha256"] == content_sha256(saved)
    assert all(math.isfinite(r["test_loss"]) for r in rows if r["kind"] == "evaluate")


@pytest.mark.usefixtures("task_identity")
def test_too_few_good_updates_fail_the_run_and_the_audit_says_why(tmp_path: Path) -> None:
    with pytest.raises(FedClinicError, match=r"fewer than min-hospitals = 2.*NaN/Inf"):
        run_tampered(tmp_path, nan_update, count=2)
    audit = AuditLog(tmp_path / "out").read()
    assert audit[-1]["event"] == "run_end" and audit[-1]["status"] == "failed"
    assert "hospital-b" in audit[-1]["reason"]


def test_audit_model_hash_is_the_content_hash() -> None:
    record: ArrayRecord = numpy_to_record(MODEL)
    assert content_sha256(record_to_numpy(record)) == content_sha256(MODEL)
    assert isinstance(RecordDict({"arrays": record}), RecordDict)


def test_a_transient_superlink_error_while_asking_for_replies_is_retried() -> None:
    """Flower 1.39's SuperLink answers 'database is locked' with a 500 under load: the round
    asks again instead of failing the run; a lasting failure still fails it."""
    clock = FakeClock()
    calls = {"n": 0}

    def flaky() -> str:
        calls["n"] += 1
        if calls["n"] < 3:
            raise RuntimeError("Server error '500 Internal Server Error'\nmore detail")
        return "replies"

    assert with_retries("asking for replies", flaky, clock) == "replies" and calls["n"] == 3
    assert clock.slept == 2.0 + 4.0  # backoff 2**attempt

    def broken() -> str:
        raise RuntimeError("database is locked")

    with pytest.raises(RuntimeError, match="database is locked"):
        with_retries("asking for replies", broken, clock)
