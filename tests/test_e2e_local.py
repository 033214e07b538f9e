"""``fedclinic local`` end to end: a real SuperLink and two SuperNodes (TLS + node
authentication on loopback) run two FedAvg rounds of the real app on synthetic hospitals.

Checks what an operator relies on: exit 0, per-hospital metric rows for every round, the
summary and the model file it names (hash included), a better-than-chance model, and no
process left behind.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedclinic.local.supervisor import pids_with_cmdline

ROOT = Path(__file__).resolve().parents[1]
HOSPITALS = ("hospital-a", "hospital-b")


@pytest.mark.e2e
def test_local_federation_two_hospitals_two_rounds(tmp_path: Path) -> None:
    out = tmp_path / "out"
    command = [sys.executable, "-m", "fedclinic.cli", "local", "--hospitals", "2"]
    command += ["--set", "rounds=2", "--set", "algorithm=fedavg"]
    # Two short rounds must already beat chance: Adam with two local epochs is above 0.85
    # for every seed tried.
    command += ["--set", "optimizer=adam", "--set", "learning-rate=0.003"]
    command += ["--set", "local-epochs=2"]
    command += ["--output-dir", str(out), "--timeout", "600"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for name in HOSPITALS:
        trained = {r["round"] for r in rows if r["kind"] == "train" and r["hospital"] == name}
        assert {1, 2} <= trained, (name, trained)
        evaluated = [r for r in rows if r["kind"] == "evaluate" and r["hospital"] == name]
        assert {1, 2} <= {r["round"] for r in evaluated}, name
        assert {0, 1, 2} <= {r["model_round"] for r in evaluated}, name
    assert not [r for r in rows if r["kind"] == "error"]

    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["rounds"] == 2 and summary["algorithm"] == "fedavg"
    assert set(HOSPITALS) <= set(summary["hospitals"])
    for name in HOSPITALS:
        final = summary["hospitals"][name]["final"]
        assert final["test_accuracy"] > 0.6, (name, final)  # 2 classes: chance is 0.5

    model = summary["model"]
    assert model is not None
    path = Path(model["path"])
    path = path if path.is_absolute() else out / path
    assert hashlib.sha256(path.read_bytes()).hexdigest() == model["sha256"]

    # the runner stopped everything it started (SuperExecs and app processes included)
    assert pids_with_cmdline(str(out), environ=True) == []
    assert "completed" in done.stdout
