"""The operator path of a real deployment, on real processes (TLS + node auth, loopback):

a coordinator (SuperLink) is up; ``fedclinic register`` registers the hospitals' public
keys; their SuperNodes join; ``fedclinic submit`` runs a federation and exits with the
run's real status. A hospital whose key was not registered is refused, and one that trusts
the wrong CA cannot connect — each with Flower's reason in its log.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from fedclinic.local.configs import synthetic_hospitals
from fedclinic.local.federation import FederationOptions, LocalFederation, flower_environment
from fedclinic.local.ports import pick_free_ports
from fedclinic.pki import provision

ROOT = Path(__file__).resolve().parents[1]


def fedclinic(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedclinic.cli", *args]


def wait_for_exit(process: object, seconds: float) -> int | None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        code = process.exit_code()  # type: ignore[attr-defined]
        if code is not None:
            return code
        time.sleep(0.5)
    return None


@pytest.mark.e2e
def test_register_submit_and_refusals(tmp_path: Path) -> None:
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
                cwd=ROOT, capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            assert done.returncode == 0, done.stdout + done.stderr
        assert "already registered" in done.stdout

        # 2. a hospital with an unregistered key, and one trusting another CA, are refused
        rogue_keys = provision(tmp_path / "rogue", ["rogue"])
        port_a, port_b, port_c, port_d = pick_free_ports(4)
        rogue = federation.supernode_command(hospitals[0], port_a)
        rogue[rogue.index("--auth-supernode-private-key") + 1] = str(
            rogue_keys.hospitals["rogue"].private_key
        )
        wrong_ca = federation.supernode_command(hospitals[1], port_b)
        wrong_ca[wrong_ca.index("--root-certificates") + 1] = str(rogue_keys.ca_cert)
        wrong_ca[wrong_ca.index("--max-retries") + 1] = "2"
        env = flower_environment(federation.bin_dir)
        refused = supervisor.start(
            "rogue", rogue, tmp_path / "rogue.log", env={**env, "FLWR_HOME": str(tmp_path / "h1")}
        )
        untrusted = supervisor.start(
            "wrong-ca", wrong_ca, tmp_path / "wrong-ca.log",
            env={**env, "FLWR_HOME": str(tmp_path / "h2")},
        )  # fmt: skip
        assert wait_for_exit(refused, 60) not in (None, 0)
        assert "Failed to activate SuperNode" in (tmp_path / "rogue.log").read_text()
        assert wait_for_exit(untrusted, 120) not in (None, 0)
        log = (tmp_path / "wrong-ca.log").read_text()
        assert "Failed to connect" in log or "failed to connect" in log, log[-2000:]

        # 3. the registered hospitals join, and the operator submits a run
        for spec, port in zip(hospitals, (port_c, port_d), strict=True):
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

        # 4. a run that fails is reported as failed (flwr run itself would exit 0)
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
