"""Segmentation end to end: ``fedclinic local`` runs two FedAvg rounds of a UNet on two
synthetic hospitals (lesion masks, different scanners) on real processes (TLS + node auth).

Checks what an operator relies on: exit 0, per-hospital Dice rows for every round, model
selection on validation Dice, the summary, a model that beats the initial one, the final
table with Dice columns, and no process left behind. (pFedNet, FedProx, local-only and
FedHelp on segmentation run in process: tests/test_segmentation_rounds.py and
tests/test_segmentation_fedhelp.py.)
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedclinic.local.supervisor import pids_with_cmdline

ROOT = Path(__file__).resolve().parents[1]


def hospital_file(tmp_path: Path, name: str, samples: int, shift: float, seed: int) -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(
        f'hospital = "{name}"\n'
        'data-source = "synthetic"\n'
        f"num-samples = {samples}\n"
        f"acquisition-shift = {shift}\n"
        f"data-seed = {seed}\n"
        'device = "cpu"\n'
    )
    return path


@pytest.mark.e2e
def test_fedavg_segmentation_two_rounds_on_real_processes(tmp_path: Path) -> None:
    out = tmp_path / "out"
    command = [sys.executable, "-m", "fedclinic.cli", "local"]
    command += ["--hospital", str(hospital_file(tmp_path, "hospital-a", 80, 0.0, 1))]
    command += ["--hospital", str(hospital_file(tmp_path, "hospital-b", 48, 0.4, 2))]
    for setting in (
        "algorithm=fedavg",
        "task=segmentation",
        "model=unet",
        "image-size=32",
        "rounds=2",
        "batch-size=16",
        "learning-rate=0.003",
    ):
        command += ["--set", setting]
    command += ["--output-dir", str(out), "--timeout", "600"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert not [r for r in rows if r["kind"] == "error"]
    for name in ("hospital-a", "hospital-b"):
        trained = {r["round"] for r in rows if r["kind"] == "train" and r["hospital"] == name}
        assert trained == {1, 2}, (name, trained)
        evaluated = {
            r["model_round"]: r for r in rows if r["kind"] == "evaluate" and r["hospital"] == name
        }
        assert set(evaluated) == {0, 1, 2}
        for row in evaluated.values():
            assert {"val_dice", "val_iou", "val_dice_c1", "test_dice", "test_loss"} <= set(row)
        # two rounds of Dice + CE already beat the initial random UNet on unseen test images
        assert evaluated[2]["test_dice"] > evaluated[0]["test_dice"] + 0.1, (name, evaluated)

    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["task"] == "segmentation"
    assert summary["selection_metric"] == "val_dice"
    for name in ("hospital-a", "hospital-b"):
        final = summary["hospitals"][name]["final"]
        assert 0 < final["test_dice"] <= 1 and "test_dice_c1" in final
    assert (out / "model_selected.pt").is_file()

    # the runner's final table reports Dice for a segmentation run
    assert "Dice" in done.stdout and "bacc" not in done.stdout
    assert pids_with_cmdline(str(out), environ=True) == []
