"""pFedNet's one-exchange pattern: logistic regression on two heart-disease centres (label-ratio
graph, only personal parameters, no shared phase), read in place by ``data-path``, through the
round engine and the real ClientApp handler (an in-process grid; the two-exchange pattern runs
on real processes in tests/test_e2e_bench_system.py, whose pFedNet checks this test shares).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from harness import ScriptedGrid, check_pfednet_run, rows_of, run

from fedclinic.datasets import SHARED

HEART = SHARED / "heart_disease"


@pytest.mark.usefixtures("task_identity")
@pytest.mark.skipif(not HEART.is_dir(), reason="heart-disease files not present")
def test_pfednet_logreg_on_two_heart_disease_centres(tmp_path: Path) -> None:
    centres = ["cleveland", "hungarian"]
    nodes = {
        100 + i: {
            "hospital": centre,
            "device": "cpu",
            "state-dir": str(tmp_path / "state" / centre),
            "data-source": "heart-disease",
            "data-path": str(HEART / f"processed.{centre}.data"),
        }
        for i, centre in enumerate(centres)
    }
    flat = {
        "algorithm": "pfednet", "rounds": 2, "run-name": "heart", "model": "logreg",
        "data-source": "heart-disease", "batch-size": 32, "learning-rate": 0.05,
        "min-hospitals": len(centres),
    }  # fmt: skip
    out = tmp_path / "out"
    run(flat, ScriptedGrid(nodes, flat), out)
    rows = rows_of(out)
    summary = json.loads((out / "summary.json").read_text())
    check_pfednet_run(rows, summary, centres)
    graph = next(r for r in rows if r["kind"] == "pfednet-graph")
    assert graph["sketch"] == "label-ratio" and graph["shared_entries"] == 0
    assert {r["phase"] for r in rows if r["kind"] == "train"} == {"personal"}
    assert summary["pfednet"]["personal_parameters"] == ["linear.weight", "linear.bias"]
