"""Fed-MAS end to end: a 2-round federation through the round engine and the real ClientApp
handler (an in-process grid: Fed-MAS exchanges what FedAvg does, whose real-process runs are
the tests/test_e2e_*.py files).

Two imbalanced synthetic hospitals (class priors 0.9/0.1 and 0.3/0.7) share a prior made by
``fedclinic prior train``; a third holds a different prior file and must be refused with the
hash mismatch as its error reason, while the run completes with the other two.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest
from harness import ScriptedGrid, run

from fedclinic.prior import add_parser
from fedclinic.serialization import file_sha256


def make_prior(path: Path, seed: int) -> str:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["prior", "train", "--synthetic-samples", "64", "--output", str(path), "--steps", "2",
         "--batch-size", "8", "--seed", str(seed), "--device", "cpu"]
    )  # fmt: skip
    assert args.handler(args) == 0
    return file_sha256(path)


def hospital(tmp_path: Path, name: str, priors: str, prior: Path, seed: int) -> dict[str, Any]:
    return {
        "hospital": name,
        "data-source": "synthetic",
        "num-samples": 120,
        "class-priors": priors,
        "data-seed": seed,
        "device": "cpu",
        "state-dir": str(tmp_path / "state" / name),
        "prior-path": str(prior),
    }


@pytest.mark.usefixtures("task_identity")
def test_fedmas_two_rounds_and_a_hospital_with_another_prior(tmp_path: Path) -> None:
    shared, rogue = tmp_path / "prior.pt", tmp_path / "rogue-prior.pt"
    digest = make_prior(shared, seed=0)
    make_prior(rogue, seed=1)
    nodes = {
        100: hospital(tmp_path, "hospital-a", "0.9,0.1", shared, 1),
        101: hospital(tmp_path, "hospital-b", "0.3,0.7", shared, 2),
        102: hospital(tmp_path, "hospital-c", "0.5,0.5", rogue, 3),
    }
    out = tmp_path / "out"
    flat = {
        "algorithm": "fedmas", "run-name": "fedmas-rounds", "rounds": 2, "model": "cnn",
        "batch-size": 16, "optimizer": "adam", "learning-rate": 0.001, "min-hospitals": 2,
        "fedmas.prior-arch": "cnn", "fedmas.prior-sha256": digest,
    }  # fmt: skip
    run(flat, ScriptedGrid(nodes, flat), out)

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    aggregation = [r for r in rows if r["kind"] == "aggregation"]
    for server_round in (1, 2):
        entries = [r for r in aggregation if r["round"] == server_round]
        assert sorted(r["hospital"] for r in entries) == ["hospital-a", "hospital-b"]
        assert sum(r["weight"] for r in entries) == pytest.approx(1.0)
        total_rf = sum(r["rf"] for r in entries)
        for r in entries:
            assert r["rule"] == "mas" and r["rf"] > 0
            assert r["weight"] == pytest.approx(r["rf"] / total_rf)
            assert len(r["w"]) == len(r["w_hat"]) == 2 and min(r["w"]) > 0
    errors = [r for r in rows if r["kind"] == "error" and r["hospital"] == "hospital-c"]
    assert len(errors) == 2  # refused in both training rounds
    assert all("SHA-256" in r["reason"] and digest in r["reason"] for r in errors)
    evaluated = [r for r in rows if r["kind"] == "evaluate" and r["hospital"] == "hospital-a"]
    assert {r["model_round"] for r in evaluated} == {0, 1, 2}
    assert all("val_balanced_accuracy" in r for r in evaluated)

    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["algorithm"] == "fedmas"
    assert summary["selection_note"] == "chosen on validation data"
    fedmas = summary["fedmas"]
    assert fedmas["aggregation"] == "mas" and fedmas["prior"]["sha256"] == digest
    assert fedmas["prior"]["degraded"] is False and fedmas["prior"]["content_sha256"]
    assert set(fedmas["rounds"]) == {"1", "2"}
    assert {"final", "selected"} <= set(summary["hospitals"]["hospital-a"])
