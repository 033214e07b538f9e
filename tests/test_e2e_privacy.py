"""A hospital's privacy budget on real processes (TLS + node auth): a site whose ceiling is
below one round's ε refuses every round with one line, the federation goes on with the two
others (min-hospitals = 2), which train with DP-SGD and keep their ledgers (docs/privacy.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from fedclinic.config import parse_hospital_config
from fedclinic.local.configs import HospitalSpec, synthetic_hospitals
from fedclinic.local.federation import FederationOptions, LocalFederation
from fedclinic.privacy import LEDGER

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.e2e
def test_a_hospital_at_its_ceiling_refuses_and_the_run_goes_on(tmp_path: Path) -> None:
    out = tmp_path / "out"
    hospitals = synthetic_hospitals(3, tmp_path / "state")
    for spec, extra in zip(
        hospitals,
        ({}, {"privacy-required": True}, {"privacy-epsilon": 0.01}),
        strict=True,
    ):
        flat = {**spec.flat, **extra, "device": "cpu"}
        hospitals[hospitals.index(spec)] = HospitalSpec(parse_hospital_config(flat), flat)
    run_config = {
        "rounds": 2, "local-steps": 2, "min-hospitals": 2, "round-timeout": 200.0,
        "dp": "dp-sgd", "dp-noise-multiplier": 1.5, "output-dir": str(out),
    }  # fmt: skip
    options = FederationOptions(
        app_dir=ROOT,
        output_dir=out,
        run_config=run_config,
        hospitals=hospitals,
        work_dir=tmp_path / "w",
        timeout=600,
    )
    outcome = LocalFederation(options, Console(quiet=True)).run()
    assert outcome.exit_code == 0, outcome.details

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    refused = [r for r in rows if r["kind"] == "error"]
    assert {r["round"] for r in refused} == {1, 2}
    assert all(r["reason"].startswith("privacy budget: ε 0.00 of 0.01 spent") for r in refused)
    trained = sorted((r["round"], r["hospital"]) for r in rows if r["kind"] == "train")
    names = [spec.name for spec in hospitals]
    assert trained == [(n, h) for n in (1, 2) for h in names[:2]]
    for name in names[:2]:
        ledger = (tmp_path / "state" / name / LEDGER).read_text().splitlines()
        assert [json.loads(line)["round"] for line in ledger] == [1, 2]
    assert not (tmp_path / "state" / names[2] / LEDGER).exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["privacy"]["dp"] == "dp-sgd"
    assert summary["hospitals"][names[0]]["privacy"]["epsilon"] > 0
