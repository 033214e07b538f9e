"""FedHelp end to end: 2 rounds on real processes via ``fedclinic local``.

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
import subprocess
import sys
from pathlib import Path

import pytest

from fedclinic.knowledge import add_parser

ROOT = Path(__file__).resolve().parents[1]


def knowledge_command(*argv: str) -> None:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["knowledge", *argv])
    assert args.handler(args) == 0


def hospital_file(tmp_path: Path, name: str, role: str, samples: int, seed: int) -> Path:
    path = tmp_path / f"{name}.toml"
    text = (
        f'hospital = "{name}"\n'
        'data-source = "synthetic"\n'
        f"num-samples = {samples}\n"
        f"data-seed = {seed}\n"
        'device = "cpu"\n'
        f'state-dir = "{tmp_path / "state" / name}"\n'
        f'role = "{role}"\n'
    )
    if role == "small":
        text += (
            f'public-data-path = "{tmp_path / "public.npz"}"\n'
            f'knowledge-path = "{tmp_path / "knowledge.npz"}"\n'
        )
    path.write_text(text)
    return path


@pytest.mark.e2e
def test_fedhelp_two_rounds_on_real_processes(tmp_path: Path) -> None:
    public, knowledge = tmp_path / "public.npz", tmp_path / "knowledge.npz"
    knowledge_command(
        "synthetic-public", "--output", str(public), "--num-samples", "64", "--seed", "1000"
    )
    knowledge_command(
        "build", "--public-data", str(public), "--output", str(knowledge),
        "--train-teacher", "cnn", "--epochs", "2", "--batch-size", "16", "--device", "cpu",
    )  # fmt: skip
    digest = (tmp_path / "knowledge.npz.sha256").read_text().split()[0]
    hospitals = [
        hospital_file(tmp_path, "hospital-a", "large", 200, 1),
        hospital_file(tmp_path, "hospital-b", "small", 80, 2),
        hospital_file(tmp_path, "hospital-c", "small", 80, 3),
    ]
    out = tmp_path / "out"
    command = [sys.executable, "-m", "fedclinic.cli", "local"]
    for path in hospitals:
        command += ["--hospital", str(path)]
    for setting in (
        "algorithm=fedhelp",
        "rounds=2",
        "model=cnn",
        "batch-size=16",
        "optimizer=adam",
        "learning-rate=0.001",
        "weight-decay=0.0001",
        "min-hospitals=3",
        "fedhelp.large-model=wide-cnn",
        f'fedhelp.knowledge-sha256="{digest}"',
    ):
        command += ["--set", setting]
    command += ["--output-dir", str(out), "--timeout", "600"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

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
