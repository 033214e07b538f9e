"""What pFedNet's hospitals let the coordinator learn about their data (PF-1, docs/pfednet.md).

- With a noised sketch (``pfednet.sketch-epsilon`` > 0) no exact class count of a hospital
  reaches the coordinator on any path: the setup query, the name-only queries (a SuperNode
  renumbered mid-run, every hospital after a resume), and every train and evaluate reply.
- The covariance sketch of fewer image rows than pixels is rank-deficient and reveals the
  span of the hospital's images: the hospital refuses it unless the run opts in.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, RecordDict
from harness import CoordinatorCrash, ScriptedGrid, rows_of, run, synthetic_nodes

from fedclinic import messages as keys
from fedclinic.config import parse_hospital_config
from fedclinic.data import DataRequest, load_hospital_data
from fedclinic.errors import ConfigError
from fedclinic.site import SiteState
from strategies import load_run_config
from strategies import pfednet_math as pm
from strategies.base import ClientContext
from strategies.pfednet import SKETCH_KEY, PFedNetObjective

# ------------------------------------------------------------- no exact count under the noise


def train_counts(flat: dict[str, Any], node: dict[str, Any]) -> list[float]:
    """The hospital's exact training class counts, as the hospital itself loads its data."""
    data = load_hospital_data(DataRequest(load_run_config(flat), parse_hospital_config(node)))
    return [float(c) for c in data.train.class_counts(2)]


def exact_counts_in(reply: Message, counts: list[float]) -> list[str]:
    """Where a reply carries class counts: a ``class_counts`` metric, any list equal to the
    exact training counts, or per-class counts inside a JSON text (the data fingerprint)."""
    found: list[str] = []
    for record in reply.content.metric_records.values():
        for key, value in record.items():
            if key == keys.CLASS_COUNTS:
                found.append(f"metric {key}")
            elif isinstance(value, list) and [float(v) for v in value] == counts:
                found.append(f"metric {key} = the exact counts")
    for record in reply.content.config_records.values():
        for key, value in record.items():
            if isinstance(value, str) and value.startswith("{"):
                found += [f"info {key}: {where}" for where in _counts_in_json(json.loads(value))]
    return found


def _counts_in_json(value: Any, path: str = "") -> list[str]:
    if isinstance(value, dict):
        found = [f"{path}/{k}" for k in value if "counts" in str(k)]
        for k, v in value.items():
            found += _counts_in_json(v, f"{path}/{k}")
        return found
    if isinstance(value, list):
        numbers = value and all(isinstance(v, int | float) for v in value)
        return [f"{path} (list)"] if numbers else []
    return []


@pytest.mark.usefixtures("task_identity")
def test_no_exact_class_count_reaches_the_coordinator_on_any_path(tmp_path: Path) -> None:
    """Setup query; hospital-b's SuperNode restarts after round 1 (a name-only query to its
    new node); the coordinator crashes in round 2 and resumes (a name-only query to every
    hospital); every train and evaluate reply of both runs."""
    flat = {
        "algorithm": "pfednet",
        "model": "cnn",
        "rounds": 3,
        "local-steps": 1,
        "batch-size": 16,
        "seed": 3,
        "min-hospitals": 3,
        "run-name": "noised",
        "output-dir": str(tmp_path / "out"),
        "pfednet.sketch": "label-ratio",
        "pfednet.sketch-epsilon": 1.0,
    }
    nodes = synthetic_nodes(tmp_path, 3)
    counts = {node["hospital"]: train_counts(flat, node) for node in nodes.values()}
    # pushes: 1 setup query, 2-3 round 1 (shared, personal); node 101 comes back as 901
    # after push 3, so push 4 asks it its name; push 5 is round 2's shared exchange, whose
    # replies never reach the coordinator
    first = ScriptedGrid(nodes, flat, renumber=(3, 101, 901), crash_at=5)
    with pytest.raises(CoordinatorCrash):
        run(flat, first, tmp_path / "out")
    resumed_nodes = {901 if n == 101 else n: node for n, node in nodes.items()}
    resumed_flat = {**flat, "resume": True}
    second = ScriptedGrid(resumed_nodes, resumed_flat)
    run(resumed_flat, second, tmp_path / "out")

    def answers(grid: ScriptedGrid, exchange: str) -> dict[int, list[Message]]:
        found: dict[int, list[Message]] = {}
        for (_, name, node, _), reply in grid.answers.items():
            if name == exchange:
                found.setdefault(node, []).append(reply)
        return found

    # every path was taken: setup and renumbered-node queries, the resume's queries, rounds
    assert set(answers(first, "query")) == {100, 101, 102, 901}
    assert set(answers(second, "query")) == {100, 901, 102}
    for grid in (first, second):
        assert answers(grid, "shared") and answers(grid, "personal")
    assert answers(second, "evaluate")  # the final evaluation
    sketches = [
        r.content.metric_records[keys.METRICS]["sketch"]
        for r in answers(first, "query")[100] + answers(first, "query")[102]
        if "sketch" in r.content.metric_records[keys.METRICS]
    ]
    assert len(sketches) == 2  # the setup answers of a and c (b's first node answered too)

    leaks = []
    for grid in (first, second):
        for key, reply in grid.answers.items():
            hospital = str(reply.content.config_records[keys.INFO][keys.HOSPITAL])
            leaks += [f"{key} {hospital}: {w}" for w in exact_counts_in(reply, counts[hospital])]
    assert not leaks, "\n".join(leaks)

    # what may still leave: the training-set size (the shared layers' averaging weight)
    trained = [r for r in rows_of(tmp_path / "out") if r["kind"] == "train"]
    assert trained and all(r["num_train"] == sum(counts[r["hospital"]]) for r in trained)


# ------------------------------------------------------------- the covariance sketch's rank


def objective_for(tmp_path: Path, samples: int, **options: Any) -> PFedNetObjective:
    flat = {"algorithm": "pfednet", "model": "cnn", "seed": 3, "min-hospitals": 1, **options}
    run_config = load_run_config(flat)
    node = {
        "hospital": "small",
        "data-source": "synthetic",
        "num-samples": samples,
        "device": "cpu",
        "state-dir": str(tmp_path / "state"),
    }
    hospital = parse_hospital_config(node)
    context = ClientContext(
        run=run_config,
        hospital=hospital,
        data=load_hospital_data(DataRequest(run_config, hospital)),
        device=torch.device("cpu"),
        site=SiteState(tmp_path / "state" / "run"),
        server_round=0,
    )
    return PFedNetObjective(context)


SETUP = RecordDict({keys.CONFIG: ConfigRecord({SKETCH_KEY: True})})


def test_a_rank_deficient_covariance_sketch_is_refused_in_one_line(tmp_path: Path) -> None:
    """40 images (28 training images of 28x28, one channel): 28 rows for 784 pixels."""
    objective = objective_for(tmp_path, 40)
    rows = len(objective.context.data.train)
    with pytest.raises(ConfigError) as refused:
        objective.describe(SETUP)
    message = str(refused.value)
    assert "\n" not in message
    assert f"{rows} training image rows for 784 pixels" in message
    assert "pfednet.allow-rank-deficient-sketch = true" in message
    assert "pfednet.sketch-image-size" in message and "label-ratio" in message


def test_the_opt_in_sends_it_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    objective = objective_for(tmp_path, 40, **{"pfednet.allow-rank-deficient-sketch": True})
    rows = len(objective.context.data.train)
    with caplog.at_level(logging.WARNING):
        answer = objective.describe(SETUP)
    sketch = np.asarray(answer["sketch"])
    assert len(sketch) == 784 * 785 // 2
    warnings = [r.getMessage() for r in caplog.records if "rank-deficient" in r.getMessage()]
    assert len(warnings) == 1 and f"(at most {rows} dimensions of 784)" in warnings[0]
    # what the warning says, checked: the covariance has rank <= rows, so every centred
    # training image lies in the span of its top eigenvectors
    side = int((np.sqrt(8 * len(sketch) + 1) - 1) / 2)
    full = np.zeros((side, side))
    full[np.triu_indices(side)] = sketch
    full = full + full.T - np.diag(np.diag(full))
    values, vectors = np.linalg.eigh(full)
    assert int((values > 1e-9 * values.max()).sum()) <= rows
    images = objective.context.data.train.inputs.double().reshape(rows, -1).numpy()
    centred = images - images.mean()
    span = vectors[:, -rows:]
    residual = centred - centred @ span @ span.T
    assert np.abs(residual).max() < 1e-6 * np.abs(centred).max()


def test_a_full_rank_covariance_sketch_needs_no_opt_in(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Pooled to 4x4 (16 pixels), 28 training images are enough: no refusal, no warning."""
    objective = objective_for(tmp_path, 40, **{"pfednet.sketch-image-size": 4})
    with caplog.at_level(logging.WARNING):
        answer = objective.describe(SETUP)
    expected = pm.covariance_sketch(objective.context.data.train.inputs, 4)
    np.testing.assert_allclose(answer["sketch"], expected)
    assert not [r for r in caplog.records if "rank" in r.getMessage()]


@pytest.mark.usefixtures("task_identity")
def test_the_coordinator_sees_the_refusal_and_goes_on_without_that_hospital(
    tmp_path: Path,
) -> None:
    """A hospital with too few images refuses its sketch; the others (enough images at
    sketch-image-size 8: 64 pixels) build the graph; the refusal is an error row with the
    reason, and the refusing hospital trains its own head outside the graph."""
    flat = {
        "algorithm": "pfednet",
        "model": "cnn",
        "rounds": 1,
        "local-steps": 1,
        "batch-size": 16,
        "seed": 3,
        "min-hospitals": 2,
        "pfednet.sketch-image-size": 8,
    }
    nodes = synthetic_nodes(tmp_path, 3)
    nodes[100]["num-samples"] = nodes[101]["num-samples"] = 120  # 84 training images each
    run(flat, ScriptedGrid(nodes, flat), tmp_path / "out")
    rows = rows_of(tmp_path / "out")
    refused = [r for r in rows if r["kind"] == "error" and r["round"] == 0]
    assert [r["hospital"] for r in refused] == ["hospital-c"]
    assert "28 training image rows for 64 pixels" in refused[0]["reason"]
    graph = next(r for r in rows if r["kind"] == "pfednet-graph")
    assert graph["hospitals"] == ["hospital-a", "hospital-b"]
    assert {r["hospital"] for r in rows if r["kind"] == "train"} == {
        "hospital-a", "hospital-b", "hospital-c"
    }  # fmt: skip
