"""Whole segmentation rounds of FedAvg, pFedNet, FedProx, local-only and FedHelp through the
round engine and the real ClientApp handler with an in-process grid (segmentation uses the
same exchanges as classification, whose real-process runs are the tests/test_e2e_*.py files;
FedHelp's per-pixel terms: tests/test_segmentation_fedhelp.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from harness import ScriptedGrid, rows_of, run
from rich.console import Console

from fedclinic.local.progress import summary_table
from strategies.pfednet import PFedNetStrategy

SEGMENTATION = {"task": "segmentation", "model": "unet", "image-size": 32}


# ------------------------------------------------------------------------------ whole rounds


def segmentation_nodes(tmp_path: Path, count: int = 2) -> dict[int, dict[str, Any]]:
    return {
        100 + i: {
            "hospital": f"hospital-{'ab'[i]}",
            "data-source": "synthetic",
            "num-samples": 24 + 8 * i,
            "acquisition-shift": 0.5 * i,
            "data-seed": i,
            "device": "cpu",
            "state-dir": str(tmp_path / "state" / f"hospital-{'ab'[i]}"),
        }
        for i in range(count)
    }


def run_in_process(tmp_path: Path, flat: dict[str, Any]) -> tuple[Any, list[dict[str, Any]]]:
    engine, _ = run(flat, ScriptedGrid(segmentation_nodes(tmp_path), flat), tmp_path / "out")
    return engine.algorithm, rows_of(tmp_path / "out")


def common(**extra: Any) -> dict[str, Any]:
    return {**SEGMENTATION, "rounds": 1, "local-steps": 1, "batch-size": 8, "seed": 1, **extra}


@pytest.mark.usefixtures("task_identity")
def test_fedavg_segmentation_two_rounds_learn_and_report_dice(tmp_path: Path) -> None:
    """What an operator relies on: Dice rows every round, selection on validation Dice, the
    summary and the selected model, a model that beats the initial one, a final table in Dice."""
    nodes = {
        100: {**segmentation_nodes(tmp_path)[100], "num-samples": 80, "data-seed": 1},
        101: {**segmentation_nodes(tmp_path)[101], "num-samples": 48, "acquisition-shift": 0.4,
              "data-seed": 2},
    }  # fmt: skip
    flat = {
        **SEGMENTATION, "algorithm": "fedavg", "run-name": "seg-fedavg", "rounds": 2,
        "batch-size": 16, "learning-rate": 0.003, "seed": 1,
    }  # fmt: skip
    out = tmp_path / "out"
    run(flat, ScriptedGrid(nodes, flat), out)
    rows = rows_of(out)
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
    # the runner's final table (fedclinic local prints it from summary.json) speaks Dice
    console = Console(record=True, width=200)
    console.print(summary_table(summary))
    text = console.export_text()
    assert "Dice" in text and "bacc" not in text


@pytest.mark.usefixtures("task_identity")
def test_pfednet_personalises_the_decoder_on_a_mean_image_graph(tmp_path: Path) -> None:
    flat = common(
        **{"algorithm": "pfednet", "run-name": "seg-pfednet", "pfednet.admm-iterations": 20}
    )
    strategy, rows = run_in_process(tmp_path, flat)
    assert isinstance(strategy, PFedNetStrategy)
    assert strategy.split.personal and all(
        name.startswith(("upcat_", "final_conv.")) for name in strategy.split.personal
    )
    assert any(name.startswith("down_") for name in strategy.split.shared)
    graph = next(r for r in rows if r["kind"] == "pfednet-graph")
    assert graph["sketch"] == "feature-mean"
    evaluations = [r for r in rows if r["kind"] == "evaluate"]
    assert {r["model"] for r in evaluations} == {"personal"}
    assert all(math.isfinite(r["val_dice"]) for r in evaluations)
    assert not np.allclose(strategy.columns[:, 0], strategy.columns[:, 1])  # personalised
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["task"] == "segmentation" and summary["selection_metric"] == "val_dice"
    assert all("test_dice" in h["final"] for h in summary["hospitals"].values())


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("algorithm", ["fedprox", "local-only"])
def test_fedprox_and_local_only_run_segmentation_rounds(tmp_path: Path, algorithm: str) -> None:
    flat = common(**{"algorithm": algorithm, "run-name": f"seg-{algorithm}"})
    _, rows = run_in_process(tmp_path, flat)
    trained = [r for r in rows if r["kind"] == "train"]
    assert len(trained) == 2 and all(math.isfinite(r["train_loss"]) for r in trained)
    evaluations = [r for r in rows if r["kind"] == "evaluate"]
    assert {r["model_round"] for r in evaluations} == {0, 1}
    assert all({"val_dice", "val_iou", "test_dice", "test_dice_c1"} <= set(r) for r in evaluations)
    assert not [r for r in rows if r["kind"] == "error"]


@pytest.mark.usefixtures("task_identity")
def test_fedhelp_runs_segmentation_rounds_with_a_large_and_a_small_hospital(
    tmp_path: Path,
) -> None:
    from fedclinic.knowledge import build_knowledge, write_synthetic_public

    public = write_synthetic_public(
        tmp_path / "public.npz", 12, 2, image_size=32, seed=1000, task="segmentation"
    )
    logits = np.random.default_rng(0).normal(size=(12, 1, 32, 32)).astype(np.float32)
    np.save(tmp_path / "api.npy", logits)
    digest, _ = build_knowledge(public, tmp_path / "k.npz", logits_file=tmp_path / "api.npy")
    flat = common(
        **{
            "algorithm": "fedhelp",
            "run-name": "seg-fedhelp",
            "rounds": 2,
            "fedhelp.large-model": "unet-large",
            "fedhelp.knowledge-sha256": digest,
        }
    )
    nodes = segmentation_nodes(tmp_path)
    for node, role in zip(nodes.values(), ("large", "small"), strict=True):
        node.update(
            {
                "role": role,
                "public-data-path": str(public),
                "knowledge-path": str(tmp_path / "k.npz"),
            }
        )
    run(flat, ScriptedGrid(nodes, flat), tmp_path / "out")
    rows = rows_of(tmp_path / "out")
    assert not [r for r in rows if r["kind"] == "error"]
    trained = [r for r in rows if r["kind"] == "train"]
    assert sorted((r["round"], r["hospital"]) for r in trained) == [
        (1, "hospital-a"),
        (1, "hospital-b"),
        (2, "hospital-a"),
        (2, "hospital-b"),
    ]
    evaluations = [r for r in rows if r["kind"] == "evaluate"]
    assert {r["model_round"] for r in evaluations} == {0, 1, 2}
    assert all(math.isfinite(r["test_dice_c1"]) for r in evaluations)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["hospitals"]["hospital-a"]["model"] == "large"  # the large site deploys it
    assert summary["hospitals"]["hospital-b"]["model"] == "global"
    assert all("test_dice" in h["final"] for h in summary["hospitals"].values())
