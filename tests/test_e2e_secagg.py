"""Secure aggregation on real processes (TLS + node auth, site workers): three hospitals run
SecAgg+ with DP-SGD at the sites; one drops every round after sharing its keys (its privacy
ceiling is below one round's ε, so it refuses to train). The coordinator rebuilds its
pairwise masks from the two others' shares (threshold 2), the run completes, and the
summary says which hospitals were summed and which recovered (docs/privacy.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from fedclinic.audit import AuditLog
from fedclinic.config import parse_hospital_config
from fedclinic.local.configs import HospitalSpec, synthetic_hospitals
from fedclinic.local.federation import FederationOptions, LocalFederation

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.e2e
def test_secure_aggregation_with_a_dropout_completes(tmp_path: Path) -> None:
    out = tmp_path / "out"
    hospitals = synthetic_hospitals(3, tmp_path / "state")
    for index, extra in enumerate(({}, {}, {"privacy-epsilon": 0.01})):
        flat = {**hospitals[index].flat, **extra, "device": "cpu"}
        hospitals[index] = HospitalSpec(parse_hospital_config(flat), flat)
    run_config = {
        "rounds": 2, "local-steps": 2, "min-hospitals": 2, "round-timeout": 200.0,
        "dp": "dp-sgd", "dp-noise-multiplier": 1.5, "secure-aggregation": True,
        "output-dir": str(out),
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

    names = [spec.name for spec in hospitals]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["privacy"]["secure_aggregation"] is True
    assert summary["privacy"]["dp"] == "dp-sgd"
    assert [
        (e["round"], e["summed"], e["recovered"]) for e in summary["secure_aggregation_rounds"]
    ] == [(n, sorted(names[:2]), [names[2]]) for n in (1, 2)]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    refused = [r for r in rows if r["kind"] == "error"]
    assert [r["round"] for r in refused] == [1, 2]
    assert all(r["reason"].startswith("privacy budget:") for r in refused)
    trained = sorted((r["round"], r["hospital"]) for r in rows if r["kind"] == "train")
    assert trained == [(n, h) for n in (1, 2) for h in sorted(names[:2])]
    audit = AuditLog(out).read()
    round_one = next(e for e in audit if e["event"] == "round" and e["round"] == 1)
    assert [x["exchange"] for x in round_one["exchanges"]] == [
        "secagg-setup", "secagg-share-keys", "train", "secagg-unmask",
    ]  # fmt: skip
    assert round_one["accepted"] == sorted(names[:2])
    # what the hospitals kept of their secrets: nothing usable after the unmask
    for name in names[:2]:
        (state,) = (tmp_path / "state" / name).rglob("secagg/round-2.json")
        kept = json.loads(state.read_text())
        assert kept["sk1"] == kept["sk2"] == kept["seed"] == ""
