"""The operator path of a real deployment, on real processes (TLS + node auth, loopback):

a coordinator (SuperLink) is up; ``fedclinic register`` registers the hospitals' public
keys; their SuperNodes join; ``fedclinic submit`` runs a federation and exits with the
run's real status, also when the run fails. (Hospitals refused for an unregistered key or
the wrong CA: tests/test_docker_hospital.py.)
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from fedclinic.local.configs import synthetic_hospitals
from fedclinic.local.federation import FederationOptions, LocalFederation, flower_environment
from fedclinic.local.ports import pick_free_ports

ROOT = Path(__file__).resolve().parents[1]


def fedclinic(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedclinic.cli", *args]


@pytest.mark.e2e
def test_register_submit_and_a_failed_run(tmp_path: Path) -> None:
    out = tmp_path / "out"
    hospitals = synthetic_hospitals(2, tmp_path / "state")
    names = [h.name for h in hospitals]
    options = FederationOptions(
        app_dir=ROOT, output_dir=out, run_config={}, hospitals=hospitals, work_dir=tmp_path / "w"
    )
    federation = LocalFederation(options, Console(quiet=True))
    supervisor = federation.supervisor
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

        # 2. the registered hospitals join, and the operator submits a run
        env = flower_environment(federation.bin_dir)
        for spec, port in zip(hospitals, pick_free_ports(len(hospitals)), strict=True):
            supervisor.start(
                spec.name, federation.supernode_command(spec, port), tmp_path / f"{spec.name}.log",
                env={**env, "FLWR_HOME": str(tmp_path / f"home-{spec.name}")},
            )  # fmt: skip
        done = subprocess.run(
            fedclinic(
                "submit", f"--superlink={control}", f"--ca={pki.ca_cert}",
                "--set", "rounds=1", "--set", f"output-dir={out}", "--timeout", "600",
            ),
            cwd=ROOT, capture_output=True, text=True, timeout=700,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        summary = json.loads((out / "summary.json").read_text())
        assert summary["status"] == "completed" and set(names) <= set(summary["hospitals"])

        # 3. a run that fails is reported as failed (flwr run itself would exit 0)
        done = subprocess.run(
            fedclinic(
                "submit", f"--superlink={control}", f"--ca={pki.ca_cert}",
                "--set", "rounds=1", "--set", "min-hospitals=3", "--set", "round-timeout=5",
                "--set", f"output-dir={out / 'failing'}", "--timeout", "300",
            ),
            cwd=ROOT, capture_output=True, text=True, timeout=400,
        )  # fmt: skip
        assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
        assert "min-hospitals = 3" in done.stdout + done.stderr
