"""The operator path of a real deployment, and the hospital command, on real processes (TLS +
node auth on loopback), in one federation:

- a coordinator (SuperLink) is up; ``fedclinic register`` registers the hospitals' public keys
  (twice: idempotent); they join, and ``fedclinic submit`` runs a federation and exits with
  the run's real status, also when the run fails;
- hospital-a runs as ``fedclinic hospital``: it starts its site worker before its SuperNode
  joins, every message of a run is answered by the worker, SIGTERM stops node and worker with
  exit 0 and leaves no socket; restarted with ``--no-worker`` it answers in the ClientApp
  process. Hospital-b is a bare SuperNode beside it (no worker: its ClientApp answers each
  message in process, the path ``flwr run`` against any SuperNode takes).

(Hospitals refused for an unregistered key or the wrong CA: tests/test_docker_hospital.py; a
worker killed mid-run: tests/test_e2e_worker.py.)
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from harness import text, wait_for
from rich.console import Console

from fedclinic.local.configs import synthetic_hospitals
from fedclinic.local.federation import FederationOptions, LocalFederation, flower_environment
from fedclinic.local.ports import pick_free_ports
from fedclinic.local.supervisor import ManagedProcess, pids_with_cmdline
from fedclinic.worker.protocol import SOCKET_NAME

ROOT = Path(__file__).resolve().parents[1]


def fedclinic(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedclinic.cli", *args]


def answer_lines(log: str, name: str) -> list[str]:
    """The forwarder's line per message: which path answered it."""
    found = re.compile(rf"fedclinic hospital {re.escape(name)}: (train|evaluate|query) answered ")
    return [line for line in log.splitlines() if found.search(line)]


def sigterm(process: ManagedProcess, seconds: float) -> tuple[int, float]:
    """What ``docker stop`` does: SIGTERM to the process alone; its status, time taken."""
    started = time.monotonic()
    process.popen.send_signal(signal.SIGTERM)
    return process.popen.wait(timeout=seconds), time.monotonic() - started


@pytest.mark.e2e
@pytest.mark.long
def test_register_submit_a_failed_run_and_the_hospital_command(tmp_path: Path) -> None:
    out = tmp_path / "out"
    hospitals = synthetic_hospitals(2, tmp_path / "state")
    names = [h.name for h in hospitals]
    first, second = hospitals
    state = Path(str(first.flat["state-dir"]))
    home = tmp_path / "home-a"
    options = FederationOptions(
        app_dir=ROOT, output_dir=out, run_config={}, hospitals=hospitals, work_dir=tmp_path / "w"
    )
    federation = LocalFederation(options, Console(quiet=True))
    supervisor = federation.supervisor

    def submit(out: Path, *settings: str, timeout: float = 600) -> subprocess.CompletedProcess:
        sets = [x for s in (*settings, f"output-dir={out}") for x in ("--set", s)]
        return subprocess.run(
            fedclinic("submit", f"--superlink={control}", f"--ca={pki.ca_cert}", *sets,
                      "--timeout", str(int(timeout))),
            cwd=ROOT, capture_output=True, text=True, timeout=timeout + 100,
        )  # fmt: skip

    def hospital(log: Path, *extra: str) -> ManagedProcess:
        """``fedclinic hospital`` for hospital-a (its key is registered)."""
        runtime, health = pick_free_ports(2)
        command = fedclinic(
            "hospital", f"--superlink=127.0.0.1:{federation.fleet_port}",
            f"--ca={pki.ca_cert}", f"--key={pki.hospitals[first.name].private_key}",
            f"--config={federation.paths()['hospital_configs'] / f'{first.name}.toml'}",
            f"--runtime-port={runtime}", f"--health-server-address=127.0.0.1:{health}",
            # what is checked is a clean stop, not its speed: on a loaded CI box (four e2e
            # tests on 2 cores) the SuperNode once took longer than the default 7 s to leave
            "--stop-timeout=60", *extra,
        )  # fmt: skip
        env = {**os.environ, "FLWR_HOME": str(home), "PYTHONUNBUFFERED": "1"}
        node = supervisor.start(first.name, command, log, env=env, tier=1)
        wait_for("hospital-a joins", lambda: "joined the coordinator" in text(log), 300, [log])
        return node

    with supervisor:
        federation.prepare()  # CA, coordinator certificate, hospital keys, hospital TOMLs
        federation.start_superlink()
        pki = federation.pki
        assert pki is not None
        control = f"127.0.0.1:{federation.control_port}"
        keys = [f"--key={n}={pki.hospitals[n].public_key}" for n in names]

        # 1. the coordinator operator registers the hospitals' public keys (twice: idempotent)
        for _ in range(2):
            done = subprocess.run(
                fedclinic("register", f"--superlink={control}", f"--ca={pki.ca_cert}", *keys),
                cwd=ROOT, capture_output=True, text=True, timeout=300,
            )  # fmt: skip
            assert done.returncode == 0, done.stdout + done.stderr
        assert "already registered" in done.stdout

        # 2. the registered hospitals join: hospital-a with `fedclinic hospital`, whose worker
        # serves before the node joins; hospital-b as a plain SuperNode (Flower's SuperExec,
        # no worker). The operator submits a run.
        port = pick_free_ports(1)[0]
        supervisor.start(
            second.name, federation.supernode_command(second, port, site_worker=False),
            tmp_path / f"{second.name}.log",
            env={**flower_environment(federation.bin_dir),
                 "FLWR_HOME": str(tmp_path / f"home-{second.name}")},
        )  # fmt: skip
        log = tmp_path / "hospital.log"
        node = hospital(log)
        said = text(log)
        assert said.index(": serving ") < said.index("joined the coordinator")
        assert (state / SOCKET_NAME).exists()
        done = submit(out, "rounds=1")
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        summary = json.loads((out / "summary.json").read_text())
        assert summary["status"] == "completed" and set(names) <= set(summary["hospitals"])
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        assert {r["kind"] for r in rows} >= {"train", "evaluate"}
        assert "error" not in {r["kind"] for r in rows}
        said = text(log)
        assert answer_lines(said, first.name) == []  # no forwarder: taken from the node
        assert said.count(f"fedclinic worker {first.name}: answered ") >= 2

        # 3. a run that fails is reported as failed (flwr run itself would exit 0)
        done = submit(out / "failing", "rounds=1", "min-hospitals=3", "round-timeout=5",
                      timeout=300)  # fmt: skip
        assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
        assert "min-hospitals = 3" in done.stdout + done.stderr

        # 4. docker stop: node and worker stop, exit 0 (both left within --stop-timeout: a
        # forced stop exits 128 + 15), no socket. Not a timed test: --stop-timeout is 60 s
        # here (the default is 7 s, under docker's 10 s; the compose file gives 25 s)
        code, took = sigterm(node, 90)
        said = text(log)
        assert code == 0, (code, took, said[-3000:])
        assert "killed after --stop-timeout" not in said
        assert "stopped (SIGTERM)" in said and f"fedclinic worker {first.name}: stopped" in said
        assert not (state / SOCKET_NAME).exists()
        assert pids_with_cmdline(str(home), environ=True) == []

        # 5. --no-worker: no worker, each message answered in the ClientApp process
        log = tmp_path / "hospital-no-worker.log"
        node = hospital(log, "--no-worker")
        assert "no site worker (--no-worker" in text(log)
        done = submit(tmp_path / "out-in-process", "rounds=1")
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        said = text(log)
        answers = answer_lines(said, first.name)
        assert answers and all("answered in process (FEDCLINIC_WORKER=off)" in x for x in answers)
        assert ": serving " not in said and not (state / SOCKET_NAME).exists()
        code, took = sigterm(node, 90)
        assert code == 0, (code, took, text(log)[-3000:])
    assert pids_with_cmdline(str(tmp_path), environ=True) == []
