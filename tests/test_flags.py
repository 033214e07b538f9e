"""Evaluations whose scores mean little are flagged (issue 16): a model that predicts one class
for every sample of a split, and a split that holds one class. The hospital reports counts
of classes only; the engine flags the evaluate row, logs one line per flagged hospital and
round, and the summary and the final table carry the flags."""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np
import pytest
import torch
from harness import FakeClock, ScriptedGrid, rows_of, synthetic_nodes
from rich.console import Console

from fedclinic.bench.grid import task_identity
from fedclinic.engine import RoundEngine
from fedclinic.engine.records import evaluation_flags
from fedclinic.local.progress import format_row, summary_table
from fedclinic.metrics import classification_metrics
from fedclinic.results import ResultsWriter
from fedclinic.segmentation import SegmentationScores
from fedclinic.serialization import state_to_record
from strategies import get_algorithm, load_run_config

# ------------------------------------------------------------------------ what is counted


def test_classification_counts_classes_by_hand() -> None:
    labels = np.array([0, 0, 1, 1, 1])
    one_class = np.array([[0.9, 0.1]] * 5)  # class 0 for every sample
    metrics = classification_metrics(one_class, labels, 2, loss=0.0)
    assert (metrics["classes_present"], metrics["classes_predicted"]) == (2, 1)
    mixed = np.array([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7], [0.6, 0.4], [0.1, 0.9]])
    metrics = classification_metrics(mixed, labels, 2, loss=0.0)
    assert (metrics["classes_present"], metrics["classes_predicted"]) == (2, 2)
    metrics = classification_metrics(mixed, np.array([2, 2, 2, 2, 2]), 3, loss=0.0)
    assert metrics["classes_present"] == 1


def test_segmentation_one_class_means_no_foreground_anywhere() -> None:
    """Binary masks with foreground; a model whose foreground logit is negative everywhere
    predicts one class (background) on the split, however the pixels are batched."""
    masks = torch.zeros(4, 8, 8, dtype=torch.long)
    masks[0, 2:5, 2:5] = 1
    masks[3, 0:2, 0:3] = 1
    scores = SegmentationScores(2)
    for batch in (slice(0, 2), slice(2, 4)):
        scores.add(torch.full((2, 1, 8, 8), -3.0), masks[batch])
    result = scores.result()
    assert (result["classes_present"], result["classes_predicted"]) == (2, 1)
    assert result["dice"] == 0.0
    # one foreground pixel predicted in the second batch only: two classes predicted
    scores = SegmentationScores(2)
    logits = torch.full((2, 1, 8, 8), -3.0)
    scores.add(logits, masks[:2])
    logits[1, 0, 7, 7] = 3.0
    scores.add(logits, masks[2:])
    assert scores.result()["classes_predicted"] == 2
    # masks without foreground: a one-class split, Dice undefined
    empty = SegmentationScores(2)
    empty.add(torch.full((2, 1, 8, 8), 3.0), torch.zeros(2, 8, 8, dtype=torch.long))
    result = empty.result()
    assert (result["classes_present"], result["classes_predicted"]) == (1, 1)
    assert np.isnan(result["dice"])


@pytest.mark.parametrize(
    ("counts", "expected"),
    [
        ({"val": (2, 2), "test": (2, 2)}, []),
        ({"val": (2, 1), "test": (2, 2)}, ["predicts-one-class-on-val"]),
        ({"val": (2, 1), "test": (1, 1)}, ["predicts-one-class-on-val", "test-split-one-class"]),
        ({"val": (1, 1), "test": (2, 1)}, ["predicts-one-class-on-test", "val-split-one-class"]),
        ({"val": (3, 2), "test": (3, 1)}, ["predicts-one-class-on-test"]),  # 2 of 3: not one
        ({"val": (1, 2), "test": (1, 1)}, ["val-split-one-class", "test-split-one-class"]),
        ({}, []),  # a hospital that reports no counts (an empty split, an older version)
    ],
)
def test_flags_by_hand(counts: dict[str, tuple[int, int]], expected: list[str]) -> None:
    metrics: dict[str, Any] = {"val_balanced_accuracy": 0.5}
    for split, (present, predicted) in counts.items():
        metrics.update(
            {f"{split}_classes_present": present, f"{split}_classes_predicted": predicted}
        )
    assert evaluation_flags(metrics) == expected


# ------------------------------------------------------------------------ a whole run


@pytest.fixture(scope="module")
def flagged_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """FedAvg, 2 rounds, a CNN whose head bias sends every image to class 0 (a learning rate
    too small to undo it): hospital-a has both classes, hospital-b's data is all class 0."""
    folder = tmp_path_factory.mktemp("flags")
    nodes = synthetic_nodes(folder, 2)
    nodes[101]["class-priors"] = "0.99,0.01"  # 40 images: all class 0
    flat = {
        "algorithm": "fedavg",
        "model": "cnn",
        "rounds": 2,
        "local-steps": 1,
        "batch-size": 16,
        "learning-rate": 1e-7,
        "seed": 3,
        "min-hospitals": 2,
    }
    run = load_run_config(flat)
    out = folder / "out"
    results = ResultsWriter(out)
    algorithm = get_algorithm("fedavg").strategy(run, results)
    state = algorithm.initial_state()
    state["classifier.bias"] = torch.tensor([50.0, -50.0])
    engine = RoundEngine(run, algorithm, results, "flags", clock=FakeClock())
    logger = logging.getLogger("flwr")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger.addHandler(handler)
    try:
        with task_identity():
            engine.start(ScriptedGrid(nodes, flat), state_to_record(state))
    finally:
        logger.removeHandler(handler)
    return {
        "rows": rows_of(out),
        "summary": json.loads((out / "summary.json").read_text()),
        "log": [r.getMessage() for r in records],
    }


A_FLAGS = ["predicts-one-class-on-val", "predicts-one-class-on-test"]
B_FLAGS = ["val-split-one-class", "test-split-one-class"]


def test_rows_carry_the_counts_and_the_flags(flagged_run: dict[str, Any]) -> None:
    evaluations = [r for r in flagged_run["rows"] if r["kind"] == "evaluate"]
    assert len(evaluations) == 2 * 3  # rounds 1, 2 and the final evaluation
    for row in evaluations:
        if row["hospital"] == "hospital-a":
            assert row["flags"] == A_FLAGS
            assert (row["val_classes_present"], row["val_classes_predicted"]) == (2, 1)
            assert row["val_balanced_accuracy"] == 0.5
        else:
            assert row["flags"] == B_FLAGS
            assert row["val_classes_present"] == row["test_classes_present"] == 1
    line = format_row(evaluations[0], rounds=2)
    assert "FLAGGED: predicts-one-class-on-val, predicts-one-class-on-test" in line


def test_each_flagged_evaluation_is_one_log_line(flagged_run: dict[str, Any]) -> None:
    lines = [m for m in flagged_run["log"] if "flagged" in m]
    assert (
        "round 1: hospital-a's global model r0 flagged: predicts-one-class-on-val, "
        "predicts-one-class-on-test (balanced accuracy and AUC mean little there)"
    ) in lines
    final_b = "final evaluation: hospital-b's global model r2 flagged: val-split-one-class"
    assert any(m.startswith(final_b) for m in lines)
    assert len(lines) == 2 * 3


def test_summary_and_final_table_carry_the_flags(flagged_run: dict[str, Any]) -> None:
    summary = flagged_run["summary"]
    hospitals = summary["hospitals"]
    assert hospitals["hospital-a"]["flags"] == A_FLAGS
    assert hospitals["hospital-a"]["final"]["flags"] == A_FLAGS
    assert hospitals["hospital-a"]["selected"]["flags"] == A_FLAGS
    assert hospitals["hospital-b"]["flags"] == B_FLAGS
    assert summary["flags"] == [
        {"hospital": "hospital-a", "flags": A_FLAGS},
        {"hospital": "hospital-b", "flags": B_FLAGS},
    ]
    console = Console(record=True, width=250)
    console.print(summary_table(summary))
    text = console.export_text()
    row_a = next(line for line in text.splitlines() if "hospital-a" in line)
    assert row_a.rstrip(" │").endswith("model 1-class: val,test")
    row_b = next(line for line in text.splitlines() if "hospital-b" in line)
    assert row_b.rstrip(" │").endswith("split 1-class: val,test")
    assert "model 1-class = the final or selected model predicts one class" in " ".join(
        text.split()
    )


def test_a_table_without_flags_has_no_flags_column() -> None:
    console = Console(record=True, width=200)
    console.print(summary_table({"hospitals": {"a": {"num_train": 4, "flags": []}}}))
    assert "flags" not in console.export_text()
