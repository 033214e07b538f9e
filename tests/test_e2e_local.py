"""``fedclinic local`` end to end: a real SuperLink and two SuperNodes (TLS + node
authentication on loopback) run two FedAvg rounds of the real app on synthetic hospitals.

Checks what an operator relies on: exit 0, per-hospital metric rows for every round, the
summary and the model file it names (hash included), a better-than-chance model, every
message answered by the hospital's site worker (the default: fedclinic.worker), and no
process or worker socket left behind.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedclinic.local.federation import log_name
from fedclinic.local.supervisor import ANSI_ESCAPE, pids_with_cmdline

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

    # each hospital's forwarder ClientApp handed every message to its site worker
    work = out / "federation"
    for name in HOSPITALS:
        node_log = ANSI_ESCAPE.sub("", (work / log_name(name)).read_text())
        answers = [line for line in node_log.splitlines() if f"hospital {name}: " in line
                   and " answered " in line]  # fmt: skip
        assert len(answers) >= 3, node_log[-3000:]  # 2 rounds' training + final evaluation
        assert all(" answered by the site worker in " in line for line in answers), answers
        worker_log = ANSI_ESCAPE.sub("", (work / log_name(name, "-worker")).read_text())
        assert worker_log.count(": serving ") == 1, worker_log[-3000:]  # never restarted
        assert worker_log.count(f"fedclinic worker {name}: answered ") == len(answers)
        assert "went away" not in worker_log and "stopped (SIGTERM)" in worker_log
        assert not (out / "hospital-state" / name / "worker.sock").exists()

    # the runner stopped everything it started (SuperExecs and app processes included)
    assert pids_with_cmdline(str(out), environ=True) == []
    assert "completed" in done.stdout
