"""``fedclinic bench quality`` quick modes and ``bench report``: structure and sane values.

A smoke test (CI runs it, untimed): both suites in quick mode through the CLI, then the
report; nothing here checks a particular result.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from fedclinic.bench.quality import HEART_DIR, PNEUMONIA_FILE
from fedclinic.cli import main

pytestmark = pytest.mark.skipif(
    not (HEART_DIR.is_dir() and PNEUMONIA_FILE.is_file()), reason="shared data not present"
)


def _in_unit(value: object) -> bool:
    return isinstance(value, float) and 0.0 <= value <= 1.0


def test_quick_modes_and_report(tmp_path: Path) -> None:
    out = tmp_path / "results"
    assert main(["bench", "quality", "--suite", "all", "--mode", "quick", "--out", str(out)]) == 0

    heart = json.loads((out / "heart" / "results.json").read_text())
    assert heart["mode"] == "quick" and heart["seeds"] == [42]
    assert set(heart["algorithms"]) == {"local-only", "pooled", "fedavg"}
    assert heart["hospitals"] == ["cleveland", "hungarian", "switzerland", "va"]
    assert len(heart["runs"]) == 3 and "in process" in heart["runtime"]
    rows = heart["per_hospital"]
    assert len(rows) == 3 * 4
    assert all(_in_unit(r["test_accuracy"]) for r in rows)
    assert {r["num_test"] for r in rows} == {104, 89, 16, 45}  # FLamby's test sizes
    majority = heart["majority_rule"]["client_avg_accuracy"]
    assert majority == pytest.approx(0.721, abs=1e-3)  # REFERENCE-RESULTS.md 2.7
    for row in heart["summary"]:
        cell = row["client_avg_test_accuracy"]
        assert _in_unit(cell["mean"]) and cell["n"] == 1 and cell["low"] is None
        assert _in_unit(row["pooled_test_accuracy"]["mean"])
    for run in heart["runs"]:  # what the strategy wrote, one directory per run
        directory = out / "heart" / run["dir"]
        assert (directory / "metrics.jsonl").is_file() and (directory / "summary.json").is_file()
    curves = {(r["algorithm"], r["model_round"]) for r in heart["curves"]}
    assert ("fedavg", 0) in curves and ("fedavg", 2) in curves

    pneumonia = json.loads((out / "pneumonia" / "results.json").read_text())
    assert len(pneumonia["hospitals"]) == 6
    assert sum(pneumonia["shares"].values()) == pytest.approx(1.0)
    assert pneumonia["small_hospitals"] and set(pneumonia["small_hospitals"]) < set(
        pneumonia["hospitals"]
    )
    for row in pneumonia["per_hospital"]:
        assert _in_unit(row["test_balanced_accuracy"])
        assert math.isnan(row["test_auc"]) or _in_unit(row["test_auc"])
    summary = {r["algorithm"]: r for r in pneumonia["summary"]}
    assert summary["local-only"]["small_gain_test_balanced_accuracy"]["mean"] == 0.0
    assert "worst_test_balanced_accuracy" in summary["fedavg"]
    with (out / "pneumonia" / "per_hospital.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == 3 * 6

    report = tmp_path / "BENCHMARKS.md"
    plots = tmp_path / "plots"
    assert (
        main(
            ["bench", "report", "--results", str(out), "--out", str(report), "--plots", str(plots)]
        )
        == 0
    )
    text = report.read_text()
    assert "## Fed-Heart-Disease" in text and "## PneumoniaMNIST" in text
    assert "FLamby FedAvg (published)" in text and "Quick mode" in text
    assert "instead of over gRPC" in text
    images = sorted(p.name for p in plots.glob("*.png"))
    assert len(images) == 5
    for name in images:
        assert f"plots/{name}" in text
        assert (plots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (plots / "heart_summary.csv").is_file()


def test_report_without_results_is_a_config_error(tmp_path: Path) -> None:
    code = main(["bench", "report", "--results", str(tmp_path), "--out", str(tmp_path / "B.md")])
    assert code == 2
