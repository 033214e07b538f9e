"""pFedNet end to end: 2-round federations on real processes via ``fedclinic local``.

Three synthetic hospitals with the cnn model and compressed uploads (shared + personal
phases: two exchanges a round, covariance-sketch graph). The one-exchange pattern (logistic
regression on two heart-disease centres) runs in process: tests/test_pfednet_heart.py.
Decision IDs: docs/pfednet.md#decisions.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fedclinic.site import SiteState

ROOT = Path(__file__).resolve().parents[1]


def hospital_file(tmp_path: Path, name: str, lines: list[str]) -> Path:
    path = tmp_path / f"{name}.toml"
    state = tmp_path / "state" / name
    path.write_text(
        "\n".join([f'hospital = "{name}"', 'device = "cpu"', f'state-dir = "{state}"', *lines])
        + "\n"
    )
    return path


def run_local(
    tmp_path: Path, hospitals: list[Path], settings: list[str]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    out = tmp_path / "out"
    command = [sys.executable, "-m", "fedclinic.cli", "local"]
    for path in hospitals:
        command += ["--hospital", str(path)]
    for setting in ["algorithm=pfednet", "rounds=2", "run-name=e2e", *settings]:
        command += ["--set", setting]
    command += ["--output-dir", str(out), "--timeout", "600"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return rows, json.loads((out / "summary.json").read_text())


def check_common(rows: list[dict[str, Any]], summary: dict[str, Any], names: list[str]) -> None:
    evaluated = [r for r in rows if r["kind"] == "evaluate"]
    assert {(r["hospital"], r["model_round"]) for r in evaluated} == {
        (name, model_round) for name in names for model_round in (0, 1, 2)
    }
    assert {r["model"] for r in evaluated} == {"personal"}
    assert not [r for r in rows if r["kind"] == "error"]
    admm = [r for r in rows if r["kind"] == "pfednet-admm"]
    assert [r["round"] for r in admm] == [1, 2]
    assert all(r["eta"] == float(len(names)) for r in admm)  # PF-2 default eta = N
    traffic = [r for r in rows if r["kind"] == "communication" and 1 <= r["round"] <= 2]
    assert sorted((r["round"], r["hospital"]) for r in traffic) == sorted(
        (server_round, name) for server_round in (1, 2) for name in names
    )
    assert all(r["upload_bytes"] > 0 and r["fedavg_upload_bytes"] > 0 for r in traffic)
    assert summary["status"] == "completed" and summary["algorithm"] == "pfednet"
    assert set(summary["hospitals"]) == set(names)
    assert set(summary["pfednet"]["communication"]) == set(names)


@pytest.mark.e2e
def test_pfednet_cnn_synthetic_on_real_processes(tmp_path: Path) -> None:
    names = ["hospital-a", "hospital-b", "hospital-c"]
    priors = ["0.8,0.2", "0.5,0.5", "0.2,0.8"]
    hospitals = [
        hospital_file(
            tmp_path,
            name,
            [
                'data-source = "synthetic"',
                "num-samples = 80",
                f'class-priors = "{prior}"',
                f"data-seed = {i}",
                f"acquisition-shift = {0.3 * i}",
            ],
        )
        for i, (name, prior) in enumerate(zip(names, priors, strict=True))
    ]
    rows, summary = run_local(
        tmp_path,
        hospitals,
        [
            "model=cnn",
            "batch-size=16",
            "min-hospitals=3",
            'pfednet.compression="stc"',
            "pfednet.allow-rank-deficient-sketch=true",  # 56 images of 784 pixels each
        ],
    )
    check_common(rows, summary, names)
    graph = next(r for r in rows if r["kind"] == "pfednet-graph")
    assert graph["sketch"] == "covariance" and graph["hospitals"] == names
    assert len(graph["edges"]) == 3  # k = 3 capped at N - 1: the complete graph
    phases = [r["phase"] for r in rows if r["kind"] == "train"]
    assert sorted(phases) == ["personal"] * 6 + ["shared"] * 6
    for row in (r for r in rows if r["kind"] == "communication" and 1 <= r["round"] <= 2):
        assert row["upload_bytes"] == row["shared_upload_bytes"] + row["personal_upload_bytes"]
        assert row["upload_bytes"] < row["fedavg_upload_bytes"] / 4  # ternary codes + DEFLATE
    for name in names:  # each hospital kept its personalised head and its final model
        site = tmp_path / "state" / name / "e2e"
        personal = SiteState(site).load("pfednet_personal")  # the newest version
        assert set(personal) == {"classifier.weight", "classifier.bias"}
        assert SiteState(site).has("pfednet_model")
