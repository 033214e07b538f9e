"""Whole segmentation rounds of pFedNet, FedProx, local-only and FedHelp through the round
engine and the real ClientApp handler with an in-process grid (FedAvg's real-process run:
tests/test_e2e_segmentation.py; FedHelp's per-pixel terms: tests/test_segmentation_fedhelp.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from harness import ScriptedGrid, rows_of, run

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
