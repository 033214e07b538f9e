"""The site worker on real processes (TLS + node auth on loopback): in ``fedclinic local``,
a hospital's worker killed by PID mid-run is restarted by the keeper the hospital supervisors
share (fedclinic.worker.keeper); the message it was answering gets a one-line error naming
the site worker (or, when the kill came between messages, nothing is lost), later rounds
train, the run completes.

(Every message of a plain ``fedclinic local`` run answered by the worker: test_e2e_local.py;
``fedclinic hospital`` starting its worker, SIGTERM stopping both with exit 0 and no socket
left, and ``--no-worker``: test_e2e_deploy.py.)
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
from harness import text, wait_for
from rich.console import Console

from fedclinic.local.configs import synthetic_hospitals
from fedclinic.local.federation import FederationOptions, LocalFederation, log_name
from fedclinic.local.supervisor import pids_with_cmdline
from fedclinic.worker.protocol import SOCKET_NAME

ROOT = Path(__file__).resolve().parents[1]


def rows_of(out: Path) -> list[dict[str, Any]]:
    path = out / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def federation_for(tmp_path: Path, count: int, run_config: dict[str, Any]) -> LocalFederation:
    out = tmp_path / "out"
    options = FederationOptions(
        app_dir=ROOT,
        output_dir=out,
        run_config={**run_config, "output-dir": str(out)},
        hospitals=synthetic_hospitals(count, tmp_path / "state"),
        work_dir=tmp_path / "w",
        timeout=900,
    )
    return LocalFederation(options, Console(quiet=True))


@pytest.mark.e2e
def test_a_worker_killed_mid_run_is_restarted_and_the_run_completes(tmp_path: Path) -> None:
    run_config = {"algorithm": "fedavg", "rounds": 3, "min-hospitals": 1, "round-timeout": 300.0}
    federation = federation_for(tmp_path, 2, run_config)
    out = federation.options.output_dir
    with federation.supervisor:
        federation.prepare()
        federation.start_superlink()
        federation.start_hospitals()
        run_id = federation.submit()
        worker = federation.keeper.workers["hospital-a"]
        assert worker.process is not None
        killed = worker.process.pid
        # kill it while it answers round 2's training: mid-round, mid-message
        wait_for(
            "hospital-a's worker answers round 2",
            lambda: "answering train (group 2" in text(worker.log_path),
            600, [worker.log_path, federation.work / log_name("hospital-a")],
        )  # fmt: skip
        os.kill(killed, signal.SIGKILL)
        outcome = federation.report(federation.follow(run_id))
        assert outcome.exit_code == 0, outcome.details
        assert worker.process.pid != killed  # restarted by the keeper
    worker_log = text(worker.log_path)
    assert worker_log.count(": serving ") == 2, worker_log[-3000:]
    restarted = worker_log.split(f"(pid {worker.process.pid})", 1)[1]
    assert "fedclinic worker hospital-a: answered " in restarted  # it served later messages
    rows = rows_of(out)
    errors = [r for r in rows if r["kind"] == "error"]
    for row in errors:  # the killed message's reply: one clear line, not a hang
        assert row["hospital"] == "hospital-a" and row["round"] == 2, row
        assert f"the site worker (pid {killed}) stopped before replying" in row["reason"], row
    trained = {(r["round"], r["hospital"]) for r in rows if r["kind"] == "train"}
    assert {(n, "hospital-b") for n in (1, 2, 3)} <= trained
    assert {(1, "hospital-a"), (3, "hospital-a")} <= trained  # later rounds succeed
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"
    assert not (worker.root / SOCKET_NAME).exists()
    assert pids_with_cmdline(str(tmp_path), environ=True) == []
