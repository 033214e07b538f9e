"""FedHelp end to end: 2 rounds through the round engine and the real ClientApp handler (an
in-process grid: FedHelp has FedAvg's exchange pattern, one exchange a round, whose
real-process runs are the tests/test_e2e_*.py files).

One large hospital and two small ones (roles from their hospital TOML files). The public set
comes from the synthetic generator under another seed (``fedclinic knowledge
synthetic-public``); the knowledge file from ``fedclinic knowledge build --train-teacher``
(the FH-2 substitute). Checks: roles recorded, the large hospital evaluates its private large
model (kept in its state directory) and uploads the proxy, the small hospitals evaluate the
global model, the server takes the unweighted mean of all three uploads. Decision IDs:
docs/fedhelp.md#decisions.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest
from harness import ScriptedGrid, run

from fedclinic.knowledge import add_parser


def knowledge_command(*argv: str) -> None:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["knowledge", *argv])
    assert args.handler(args) == 0


def hospital(tmp_path: Path, name: str, role: str, samples: int, seed: int) -> dict[str, Any]:
    node: dict[str, Any] = {
        "hospital": name,
        "data-source": "synthetic",
        "num-samples": samples,
        "data-seed": seed,
        "device": "cpu",
        "state-dir": str(tmp_path / "state" / name),
        "role": role,
    }
    if role == "small":
        node["public-data-path"] = str(tmp_path / "public.npz")
        node["knowledge-path"] = str(tmp_path / "knowledge.npz")
    return node


@pytest.mark.usefixtures("task_identity")
def test_fedhelp_two_rounds_large_and_small_hospitals(tmp_path: Path) -> None:
    public, knowledge = tmp_path / "public.npz", tmp_path / "knowledge.npz"
    knowledge_command(
        "synthetic-public", "--output", str(public), "--num-samples", "64", "--seed", "1000"
    )
    knowledge_command(
        "build", "--public-data", str(public), "--output", str(knowledge),
        "--train-teacher", "cnn", "--epochs", "2", "--batch-size", "16", "--device", "cpu",
    )  # fmt: skip
    digest = (tmp_path / "knowledge.npz.sha256").read_text().split()[0]
    nodes = {
        100: hospital(tmp_path, "hospital-a", "large", 200, 1),
        101: hospital(tmp_path, "hospital-b", "small", 80, 2),
        102: hospital(tmp_path, "hospital-c", "small", 80, 3),
    }
    flat = {
        "algorithm": "fedhelp", "run-name": "fedhelp-rounds", "rounds": 2, "model": "cnn",
        "batch-size": 16, "optimizer": "adam", "learning-rate": 0.001, "weight-decay": 0.0001,
        "min-hospitals": 3, "fedhelp.large-model": "wide-cnn",
        "fedhelp.knowledge-sha256": digest,
    }  # fmt: skip
    out = tmp_path / "out"
    run(flat, ScriptedGrid(nodes, flat), out)

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert not [r for r in rows if r["kind"] == "error"]
    roles = {
        r["hospital"]: (r["role"], r["role_source"]) for r in rows if r["kind"] == "fedhelp-role"
    }
    assert roles == {
        "hospital-a": ("large", "config"),
        "hospital-b": ("small", "config"),
        "hospital-c": ("small", "config"),
    }
    for server_round in (1, 2):
        entries = [
            r for r in rows if r["kind"] == "fedhelp-aggregate" and r["round"] == server_round
        ]
        assert {r["hospital"]: r["uploaded"] for r in entries} == {
            "hospital-a": "proxy",
            "hospital-b": "surrogate",
            "hospital-c": "surrogate",
        }
        assert all(r["weight"] == pytest.approx(1 / 3) for r in entries)  # FH-10 default

    evaluated = [r for r in rows if r["kind"] == "evaluate"]
    for name, model in (
        ("hospital-a", "large"),
        ("hospital-b", "global"),
        ("hospital-c", "global"),
    ):
        mine = [r for r in evaluated if r["hospital"] == name]
        assert {r["model_round"] for r in mine} == {0, 1, 2}
        assert {r["model"] for r in mine} == {model}
        assert all("val_balanced_accuracy" in r for r in mine)
    trained = {r["hospital"]: r for r in rows if r["kind"] == "train" and r["round"] == 2}
    assert (
        "train_rank_loss" in trained["hospital-a"] and "train_forward_kl" in trained["hospital-a"]
    )
    assert (
        trained["hospital-b"]["train_public_kl"] >= 0
        and "train_private_loss" in trained["hospital-b"]
    )

    # FH-9: the large model lives (only) in the large hospital's own state directory
    assert list((tmp_path / "state" / "hospital-a").rglob("fedhelp_large_model.round-*.pt"))
    assert not list((tmp_path / "state" / "hospital-b").rglob("fedhelp_large_model.round-*.pt"))

    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["algorithm"] == "fedhelp"
    assert summary["fedhelp"]["roles"] == {
        "hospital-a": "large",
        "hospital-b": "small",
        "hospital-c": "small",
    }
    assert summary["fedhelp"]["knowledge_sha256"] == digest
    assert summary["hospitals"]["hospital-a"]["model"] == "large"
    assert summary["hospitals"]["hospital-b"]["model"] == "global"
    assert {"final", "selected"} <= set(summary["hospitals"]["hospital-a"])
