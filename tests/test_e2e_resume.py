"""Resume on real processes: the coordinator (SuperLink, SuperExec and ServerApp, the whole
process group) is SIGKILLed once round 1's checkpoint is on disk, while round 2 is under way.
It is restarted on the same ports and state database (so the hospitals' registered keys stay
valid and the SuperNodes reconnect by themselves), the run is resubmitted with
``resume = true``, and it finishes round 2 and the final evaluation.

Its final model must equal the model of the same run computed without a crash (the same
ServerApp strategy and ClientApp code, driven in this process) to within 1e-6: the reference
is computed in another process than the hospitals' ClientApps, and CPU kernels may round the
last float32 bit differently across processes (seen here: up to 3e-8). With both runs in one
process the equality is exact, bit for bit: tests/test_resume.py, for every algorithm.

A third, deliberately corrupt hospital rides along (issue #9: update validation on real
processes). It runs the same FAB as the others; only its processes' environment differs:
``tests/corrupt_hospital`` first on its ``PYTHONPATH`` (``HospitalSpec.env``), whose
``sitecustomize`` makes its ClientApp upload a NaN in round 1 (before the crash) and its weights
x 1000 in round 2 (after the resume). The coordinator must refuse it both times with the reason
in ``metrics.jsonl``, the audit log and the ServerApp log, and the final model must still equal
the reference run of the two honest hospitals alone: it was never aggregated.
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

# the local federation of the dropout test, the in-process run of the shared harness
from harness import ScriptedGrid, run
from test_e2e_dropout import local_federation, start_and_submit

from fedclinic import checkpoint
from fedclinic.audit import AuditLog
from fedclinic.config import parse_hospital_config
from fedclinic.local.configs import HospitalSpec, synthetic_hospitals, write_flat_toml
from fedclinic.local.federation import LocalFederation, log_name
from fedclinic.local.supervisor import pids_with_cmdline
from fedclinic.pki import fingerprint
from fedclinic.serialization import record_to_numpy

RUN = {"rounds": 2, "min-hospitals": 2, "local-steps": 3, "batch-size": 16, "seed": 7}
CORRUPT_SITE = Path(__file__).resolve().parent / "corrupt_hospital"  # its sitecustomize.py


def corrupt_hospital(state_root: Path, plan: str, name: str = "hospital-corrupt") -> HospitalSpec:
    """A small synthetic hospital whose processes load ``tests/corrupt_hospital/sitecustomize.py``
    and upload the corrupted updates of ``plan`` (``ROUND=nan|scale|shape,...``)."""
    flat = {
        "hospital": name,
        "data-source": "synthetic",
        "num-samples": 120,
        "data-seed": 11,
        "device": "auto",
        "state-dir": str((state_root / name).resolve()),
    }
    path = os.pathsep.join(p for p in (str(CORRUPT_SITE), os.environ.get("PYTHONPATH")) if p)
    env = {"PYTHONPATH": path, "FEDCLINIC_CORRUPTION": plan}
    return HospitalSpec(parse_hospital_config(flat), flat, env=env)


def reference_model(tmp_path: Path, hospitals: list[Any]) -> dict[str, np.ndarray]:
    """The uninterrupted run, in process, with hospitals of the same configs."""
    flat = {**RUN, "output-dir": str(tmp_path / "reference")}
    nodes = {
        100 + i: {**spec.flat, "state-dir": str(tmp_path / "reference-state" / spec.name)}
        for i, spec in enumerate(hospitals)
    }
    _, result = run(flat, ScriptedGrid(nodes, flat), tmp_path / "reference")
    return record_to_numpy(result.arrays)


def assert_corrupt_hospital_refused(
    federation: LocalFederation, corrupt: HospitalSpec, honest: list[str], serverapp: str
) -> None:
    """Refused in both rounds, before and after the resume, and why: in the metric rows, the
    audit log and the ServerApp log; and the corruption really happened at that site."""
    out = federation.options.output_dir
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    reasons = {1: "NaN/Inf value(s)", 2: "more than max-update-norm-ratio = 10 x the round's"}
    refused = [(r["round"], r["hospital"], r["reason"]) for r in rows if r["kind"] == "rejected"]
    assert [(n, h) for n, h, _ in refused] == [(1, corrupt.name), (2, corrupt.name)], refused
    assert all(reasons[n] in reason for n, _, reason in refused), refused
    assert not [r for r in rows if r["kind"] == "error"]
    assert not [r for r in rows if r["kind"] == "train" and r["hospital"] == corrupt.name]
    audited = {e["round"]: e for e in AuditLog(out).read() if e["event"] == "round"}
    assert sorted(audited) == [1, 2]
    for n, event in audited.items():
        assert event["asked"] == sorted([*honest, corrupt.name]), event
        assert event["accepted"] == sorted(honest), event
        assert list(event["rejected"]) == [corrupt.name] and not event["failed"], event
        assert reasons[n] in event["rejected"][corrupt.name], event
    line = f"round 2: update of {corrupt.name} REJECTED: update norm "
    logged = [x for x in serverapp.splitlines() if line in x and reasons[2] in x]
    assert len(logged) == 1 and logged[0].startswith("WARNING"), serverapp
    site_log = "".join(  # its SuperNode's and its site worker's (which answered)
        path.read_text(errors="replace")
        for path in (federation.work / log_name(corrupt.name, suffix) for suffix in ("", "-worker"))
        if path.exists()
    )
    for n, kind in ((1, "nan"), (2, "scale")):  # written by the process that answered
        assert f"corrupt hospital: {corrupt.name} round {n}: {kind} update uploaded" in site_log


@pytest.mark.e2e
@pytest.mark.long
@pytest.mark.usefixtures("task_identity")
def test_a_killed_coordinator_resumes_to_the_uninterrupted_model(tmp_path: Path) -> None:
    out = tmp_path / "out"
    hospitals = synthetic_hospitals(2, tmp_path / "state")  # the honest ones
    corrupt = corrupt_hospital(tmp_path / "state", "1=nan,2=scale")
    federation = local_federation(tmp_path, [*hospitals, corrupt], RUN)
    options = federation.options
    with federation.supervisor:
        start_and_submit(federation)
        deadline = time.monotonic() + 300
        while not (out / checkpoint.CHECKPOINT_FILE).exists():
            assert time.monotonic() < deadline, "no checkpoint after round 1"
            time.sleep(0.2)
        # power cut at the coordinator: the SuperLink, its SuperExec and the ServerApp (each
        # in its own process group; all carry the SuperLink's FLWR_HOME)
        coordinator = pids_with_cmdline(str(federation.paths()["homes"] / "superlink"), True)
        assert len(coordinator) >= 3, coordinator
        for pid in coordinator:
            os.kill(pid, signal.SIGKILL)
        assert checkpoint.load(out).round == 1

        federation.start_superlink(same_ports=True)
        federation.options = replace(options, run_config={**options.run_config, "resume": True})
        write_flat_toml(federation.paths()["run_config"], federation.options.run_config)
        resumed = federation.submit()
        outcome = federation.report(federation.follow(resumed))
        assert outcome.exit_code == 0, outcome.details
        # the ServerApp's log as `flwr log` shows it to the operator: the resumed run's only,
        # since the killed ServerApp's last lines (round 1's) may die with it unsent (Flower
        # uploads them in batches); round 1 is checked in the fsynced metrics and audit log
        serverapp = federation.cli.logs(resumed)

    assert_corrupt_hospital_refused(federation, corrupt, [h.name for h in hospitals], serverapp)
    final = torch.load(out / "model_final.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in final.values() if v.is_floating_point())
    reference = reference_model(tmp_path, hospitals)  # the honest hospitals alone
    assert final.keys() == reference.keys()
    for key, value in reference.items():  # float32 round-off between processes: < 1e-6
        np.testing.assert_allclose(final[key].numpy(), value, rtol=0, atol=1e-6, err_msg=key)

    events = AuditLog(out).read()
    kinds = [e["event"] for e in events]
    assert kinds.count("run_start") == 1 and kinds.count("run_resumed") == 1
    assert federation.pki is not None  # the run_start event names the served certificates
    assert set(events[0]["certificates"].values()) == {
        fingerprint(federation.pki.ca_cert),
        fingerprint(federation.pki.server_cert),
    }
    resumed_at = kinds.index("run_resumed")
    assert events[resumed_at]["from_round"] == 2
    assert [e["round"] for e in events[resumed_at:] if e["event"] == "round"] == [2]
    assert events[-1]["event"] == "run_end" and events[-1]["status"] == "completed"
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    trained = sorted((r["round"], r["hospital"]) for r in rows if r["kind"] == "train")
    assert trained == sorted((n, h.name) for n in (1, 2) for h in hospitals)
