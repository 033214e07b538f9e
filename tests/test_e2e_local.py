"""``fedclinic local`` end to end: a real SuperLink and two SuperNodes (TLS + node
authentication on loopback) run two FedAvg rounds of the real app on synthetic hospitals, with
the dashboard beside them (``--dashboard``).

Checks what an operator relies on: exit 0, per-hospital metric rows for every round, the
summary and the model file it names (hash included), a better-than-chance model, every
message answered by the hospital's site worker (the default: fedclinic.worker), and no
process or worker socket left behind. The dashboard shows the run live, with each hospital's
status from the SuperLink's own node list (``flwr supernode list``), serves its page with a
content security policy, and stops with the run.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from fedclinic.local.federation import log_name
from fedclinic.local.supervisor import ANSI_ESCAPE, pids_with_cmdline

ROOT = Path(__file__).resolve().parents[1]
HOSPITALS = ("hospital-a", "hospital-b")


def watch_dashboard(process: subprocess.Popen[str], lines: list[str]) -> tuple[dict, str]:
    """Follow the runner's output to the dashboard's address, then its API until both hospitals
    are online at the SuperLink: ({hospital: run status when seen online}, the API address)."""
    found = threading.Event()

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line)
            if "dashboard: http" in line:
                found.set()

    threading.Thread(target=read, daemon=True).start()
    assert found.wait(180), "".join(lines)
    url = re.search(r"http://127\.0\.0\.1:\d+/runs/out", "".join(lines))
    assert url, "".join(lines)
    api = url.group(0).replace("/runs/out", "/api/runs/out")
    seen: dict[str, object] = {}
    deadline = time.monotonic() + 540
    with httpx.Client(timeout=10) as http:
        while time.monotonic() < deadline and process.poll() is None and len(seen) < 2:
            response = http.get(api)
            if response.status_code == 200:
                view = response.json()
                for hospital in view["hospitals"]:
                    if hospital["superlink_status"] == "online":
                        seen[hospital["name"]] = view["status"]
            time.sleep(1.0)
        page = http.get(url.group(0))
        assert page.status_code == 200 and "content-security-policy" in page.headers
    return seen, api


@pytest.mark.e2e
def test_local_federation_two_hospitals_two_rounds(tmp_path: Path) -> None:
    out = tmp_path / "out"
    command = [sys.executable, "-m", "fedclinic.cli", "local", "--hospitals", "2"]
    command += ["--set", "rounds=2", "--set", "algorithm=fedavg"]
    # Two short rounds must already beat chance: Adam with two local epochs is above 0.85
    # for every seed tried.
    command += ["--set", "optimizer=adam", "--set", "learning-rate=0.003"]
    command += ["--set", "local-epochs=2"]
    command += ["--output-dir", str(out), "--timeout", "600", "--dashboard", "0"]
    process = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: list[str] = []
    try:
        seen, api = watch_dashboard(process, lines)
        assert set(seen) == set(HOSPITALS), (seen, lines[-20:])
        assert process.wait(timeout=600) == 0, "".join(lines[-60:])
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=60)
    time.sleep(0.5)  # the reader thread drains the last lines
    stdout = "".join(lines)
    with pytest.raises(httpx.TransportError):  # the dashboard stopped with the run
        httpx.get(api, timeout=2)

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

    # each hospital's site worker answered every message itself, taken straight from its
    # node: the run's FAB carries the worker's own code, and no flwr-clientapp was started
    work = out / "federation"
    for name in HOSPITALS:
        worker_log = ANSI_ESCAPE.sub("", (work / log_name(name, "-worker")).read_text())
        assert worker_log.count(": serving ") == 1, worker_log[-3000:]  # never restarted
        answered = worker_log.count(f"fedclinic worker {name}: answered ")
        assert answered >= 3, worker_log[-3000:]  # 2 rounds' training + final evaluation
        assert worker_log.count(", the node's task ") == answered, worker_log[-3000:]
        assert "runs this worker's code: answered here" in worker_log
        assert "with the run's own code" not in worker_log
        node_log = ANSI_ESCAPE.sub("", (work / log_name(name)).read_text())
        assert f"fedclinic hospital {name}: " not in node_log  # no forwarder ran
        assert "went away" not in worker_log and "stopped (SIGTERM)" in worker_log
        assert "a task failed" not in worker_log
        assert not (out / "hospital-state" / name / "worker.sock").exists()
        assert not (out / "hospital-state" / name / "worker.task").exists()
        assert (
            "fedclinic.supernode: the empty pulls after a reply wait" in node_log
        )  # through the launcher

    # the runner stopped everything it started (SuperExecs and app processes included)
    assert pids_with_cmdline(str(out), environ=True) == []
    assert "completed" in stdout
