"""Issue 21 on real processes: ``fedclinic local`` (a real SuperLink and two SuperNodes, TLS and
node authentication on loopback) trains on two hospitals' DICOM exports with label sheets.

Checks: exit 0, both hospitals trained and were evaluated, each reply names the ``dicom``
source with a data fingerprint, the decoded-image cache was written at each site, and none
of the identifying header values reached the coordinator's output (the in-process identifier
test covers more cases; this one checks the real transport too).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from dicom_files import chest_export, identifying_values, write_sheet

from fedclinic.data.cache import CACHE_DIR
from fedclinic.local.supervisor import pids_with_cmdline

ROOT = Path(__file__).resolve().parents[1]
HOSPITALS = ("st-mary", "county")


@pytest.mark.e2e
def test_local_federation_on_dicom_exports(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "fedclinic.cli", "local"]
    studies = []
    for index, name in enumerate(HOSPITALS):
        export = tmp_path / name / "export"
        made, rows = chest_export(export, 24, first=100 * index, seed=index)
        studies += made
        write_sheet(export / "labels.csv", rows)
        config = tmp_path / f"{name}.toml"
        config.write_text(
            f'hospital = "{name}"\ndata-source = "dicom"\ndata-path = "{export}"\n'
            f'dicom-modality = "CR"\ndevice = "cpu"\nstate-dir = "{tmp_path / name / "state"}"\n'
        )
        command += ["--hospital", str(config)]
    out = tmp_path / "out"
    for setting in ("rounds=1", "image-size=16", "local-steps=3", "batch-size=8"):
        command += ["--set", setting]
    command += ["--output-dir", str(out), "--timeout", "600"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert not [r for r in rows if r["kind"] == "error"], rows
    for name in HOSPITALS:
        trained = [r for r in rows if r["kind"] == "train" and r["hospital"] == name]
        assert trained and trained[0]["data_source"] == "dicom", trained
        assert json.loads(trained[0]["data_fingerprint"])["counts"]["train"], trained
        evaluated = {r["model_round"] for r in rows if r["kind"] == "evaluate"
                     and r["hospital"] == name}  # fmt: skip
        assert {0, 1} <= evaluated, (name, evaluated)
        assert (tmp_path / name / "state" / CACHE_DIR).is_dir()  # decoded once, at the site
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"

    # (not "labels.csv": the SuperLink keeps the app's code, where that default is written)
    secrets = [*identifying_values(studies, tmp_path), "export/P1"]
    secrets += [str(tmp_path / name) for name in HOSPITALS]  # the sites' paths
    # the coordinator's side: the run's results and the SuperLink's database and log (the
    # rest of federation/ is the hospitals' side of this one-machine federation)
    work = out / "federation"
    stored = [f for f in out.rglob("*") if f.is_file() and work not in f.parents]
    stored += [work / "state.db", work / "superlink.log", work / "run.toml"]
    assert {"metrics.jsonl", "audit.jsonl", "summary.json", "state.db"} <= {f.name for f in stored}
    for file in stored:
        blob = file.read_bytes()
        for secret in secrets:
            assert secret.encode() not in blob, (file, secret)
    assert pids_with_cmdline(str(out), environ=True) == []
