"""Statistics exchanges through the real round engine and ClientApp handler, in process.

- a statistics run on Heart's four centres: pooled values against numpy on the concatenated
  raw data, exclusions as the sums rule says, no count between 1 and k - 1 anywhere;
- a hospital's refusal (unknown feature) fails the run with its line;
- images (channel intensities, stored sizes) and segmentation (foreground share);
- ``normalisation = federated``: what each hospital trains on is its raw features z-scored
  with the pooled train statistics, computed here by hand; a resumed run reuses the
  checkpointed statistics instead of asking again.
The real-process run is tests/test_e2e_stats.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from harness import CoordinatorCrash, ScriptedGrid, rows_of, run, synthetic_nodes

import client.app
from fedclinic import messages as keys
from fedclinic.bench.grid import InProcessGrid
from fedclinic.config import parse_hospital_config
from fedclinic.data import DataRequest, load_hospital_data
from fedclinic.data.base import Standardise
from fedclinic.data.heart_disease import FEATURES, read_centre
from fedclinic.datasets import SHARED
from fedclinic.engine import RoundEngine
from fedclinic.engine.survey import run_statistics
from fedclinic.errors import FedClinicError
from fedclinic.results import ResultsWriter
from strategies import get_algorithm, load_run_config

HEART = SHARED / "heart_disease"
CENTRES = ("cleveland", "hungarian", "switzerland", "va")
needs_heart = pytest.mark.skipif(
    not (HEART / "processed.cleveland.data").is_file() and os.environ.get("CI") != "true",
    reason=f"reference data {HEART} is not on this machine",
)
HEART_RUN = {"model": "logreg", "data-source": "heart-disease", "num-features": 13,
             "num-classes": 2, "min-hospitals": 4}  # fmt: skip
K = 5


def heart_nodes(tmp_path: Path, **extra: Any) -> dict[int, dict[str, Any]]:
    return {
        1000 + i: {
            "hospital": c,
            "data-source": "heart-disease",
            "device": "cpu",
            "data-path": str(HEART / f"processed.{c}.data"),
            "state-dir": str(tmp_path / "state" / c),
            **extra,
        }
        for i, c in enumerate(CENTRES)
    }


def statistics(flat: dict[str, Any], grid: InProcessGrid, out: Path) -> dict[str, Any]:
    run_config = load_run_config({**flat, "run-kind": "stats"})
    results = ResultsWriter(out)
    algorithm = get_algorithm(run_config.algorithm).strategy(run_config, results)
    engine = RoundEngine(run_config, algorithm, results, "stats-test")
    return run_statistics(engine, grid)


def raw_train(centre: str) -> np.ndarray:
    data = read_centre(HEART / f"processed.{centre}.data")
    return data.features[data.train].astype(np.float64)


def disclosed_counts(value: Any) -> list[int]:
    """Every integer under a count-like key of a stats.json hospital entry."""
    found: list[int] = []
    if isinstance(value, dict):
        for key, inner in value.items():
            if key in ("cases", "classes", "counts", "images", "count"):
                found += [v for v in (inner if isinstance(inner, list) else [inner])
                          if isinstance(v, int)]  # fmt: skip
            else:
                found += disclosed_counts(inner)
    elif isinstance(value, list):
        for inner in value:
            found += disclosed_counts(inner)
    return found


@needs_heart
@pytest.mark.usefixtures("task_identity")
def test_heart_statistics_pool_exactly_and_disclose_no_small_count(tmp_path: Path) -> None:
    nodes = heart_nodes(tmp_path)
    result = statistics(HEART_RUN, InProcessGrid(nodes, HEART_RUN), tmp_path / "out")
    raw = {c: raw_train(c) for c in CENTRES}
    pooled = result["pooled"]["train"]["variables"]
    for j, name in enumerate(FEATURES):
        # the sums rule by hand: at most 3 values and one held by fewer than k cases
        expected_out = []
        for centre in CENTRES:
            _, held = np.unique(raw[centre][:, j], return_counts=True)
            if len(held) <= 3 and held.min() < K:
                expected_out.append(centre)
        entry = pooled[name]
        assert sorted(entry["excluded"]) == expected_out, name
        values = np.concatenate([raw[c][:, j] for c in CENTRES if c not in expected_out])
        assert entry["count"] == len(values)
        assert entry["mean"] == pytest.approx(values.mean(), rel=1e-10, abs=1e-12), name
        assert entry["std"] == pytest.approx(values.std(ddof=1), rel=1e-9), name
        for centre in CENTRES:
            site = result["hospitals"][centre]["splits"]["train"]["variables"][name]
            if centre not in expected_out:
                assert site["mean"] == pytest.approx(raw[centre][:, j].mean(), rel=1e-10, abs=1e-12)
    assert "sex" in pooled and pooled["sex"]["excluded"].keys() == {"switzerland", "va"}
    counts = disclosed_counts(result["hospitals"])
    assert counts and all(c == 0 or c >= K for c in counts)
    assert result["hospitals"]["switzerland"]["splits"]["test"]["classes"] == ["<5", "hidden"]
    assert {"hospital": "switzerland", "split": "train", "flag": "one class",
            "detail": "all 30 train cases are class 1"} in result["flags"]  # fmt: skip
    # histograms: the same coordinator-given bins everywhere, pooled = sum of released cells
    chol = result["pooled"]["train"]["histograms"]["chol"]
    for i, cell in enumerate(chol["counts"]):
        sites = [result["hospitals"][c]["splits"]["train"]["histograms"]["chol"]["counts"][i]
                 for c in CENTRES]  # fmt: skip
        assert cell["value"] == sum(s for s in sites if isinstance(s, int))
    events = [json.loads(x) for x in (tmp_path / "out" / "audit.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["run_start", "statistics", "statistics", "run_end"]
    assert events[-1]["status"] == "completed" and events[0]["run_kind"] == "stats"


@pytest.mark.usefixtures("task_identity")
def test_a_refused_request_fails_the_run_with_the_hospitals_line(tmp_path: Path) -> None:
    nodes = synthetic_nodes(tmp_path, 2)
    flat = {"stats-features": "channel-0,nope", "min-hospitals": 2}
    with pytest.raises(FedClinicError) as caught:
        statistics(flat, InProcessGrid(nodes, flat), tmp_path / "out")
    assert "unknown feature 'nope'; this hospital has channel-0, stored-height, stored-width" in (
        str(caught.value)
    )
    errors = [r for r in rows_of(tmp_path / "out") if r["kind"] == "error"]
    assert {r["hospital"] for r in errors} == {"hospital-a", "hospital-b"}


class SilentForHistograms(InProcessGrid):
    """Node 102 answers the first statistics exchange, then nothing."""

    def deliver(self, message: Any) -> Any:
        config = dict(message.content.config_records.get(keys.CONFIG, {}))
        asked = json.loads(str(config.get(keys.STATS_REQUEST, "{}")))
        if message.metadata.dst_node_id == 102 and asked.get("histograms"):
            return None
        return super().deliver(message)


def test_a_hospital_lost_in_the_second_exchange_keeps_its_moments(
    tmp_path: Path, task_identity: None, clock: Any
) -> None:
    nodes = synthetic_nodes(tmp_path, 3)
    flat = {"min-hospitals": 2, "round-timeout": 30.0}
    run_config = load_run_config({**flat, "run-kind": "stats"})
    results = ResultsWriter(tmp_path / "out")
    algorithm = get_algorithm("fedavg").strategy(run_config, results)
    engine = RoundEngine(run_config, algorithm, results, "lost", clock=clock)
    result = run_statistics(engine, SilentForHistograms(nodes, flat))
    late = result["hospitals"]["hospital-c"]["splits"]["train"]
    assert late["variables"]["channel-0"]["mean"] is not None and late["histograms"] == {}
    pooled = result["pooled"]["train"]
    assert pooled["variables"]["channel-0"]["hospitals"] == ["hospital-a", "hospital-b",
                                                             "hospital-c"]  # fmt: skip
    for i, cell in enumerate(pooled["histograms"]["channel-0"]["counts"]):
        sites = [result["hospitals"][h]["splits"]["train"]["histograms"]["channel-0"]["counts"][i]
                 for h in ("hospital-a", "hospital-b")]  # fmt: skip
        assert cell["value"] == sum(c for c in sites if isinstance(c, int))
        assert "hospital-c" not in cell["incomplete"]
    errors = [r for r in rows_of(tmp_path / "out") if r["kind"] == "error"]
    assert [r["hospital"] for r in errors] == ["hospital-c"]
    assert "no reply within round-timeout" in errors[0]["reason"]


def raw_split(node: dict[str, Any], flat: dict[str, Any]) -> Any:
    request = DataRequest(load_run_config(flat), parse_hospital_config(node), "raw")
    return load_hospital_data(request).train


@pytest.mark.usefixtures("task_identity")
def test_image_channels_sizes_and_segmentation_foreground(tmp_path: Path) -> None:
    nodes = synthetic_nodes(tmp_path, 3)
    flat = {"in-channels": 2, "image-size": 16, "min-hospitals": 3}
    result = statistics(flat, InProcessGrid(nodes, flat), tmp_path / "images")
    trains = [raw_split(n, flat) for n in nodes.values()]
    for c in range(2):
        pixels = np.concatenate([t.inputs[:, c].reshape(-1).numpy() for t in trains])
        entry = result["pooled"]["train"]["variables"][f"channel-{c}"]
        assert entry["count"] == pixels.size
        assert entry["mean"] == pytest.approx(pixels.astype(np.float64).mean(), rel=1e-9)
        assert entry["std"] == pytest.approx(pixels.astype(np.float64).std(ddof=1), rel=1e-7)
    assert result["pooled"]["train"]["variables"]["stored-height"]["mean"] == 16.0
    assert result["pooled"]["train"]["histograms"]["channel-0"]["low"] == 0.0

    segmentation = {"task": "segmentation", "model": "unet", "image-size": 32, "num-classes": 2,
                    "min-hospitals": 3}  # fmt: skip
    for node in nodes.values():
        node.pop("class-priors")  # lesion-type shares differ for segmentation
    result = statistics(segmentation, InProcessGrid(nodes, segmentation), tmp_path / "masks")
    masks = [raw_split(n, segmentation).labels for n in nodes.values()]
    share = sum(int((m > 0).sum()) for m in masks) / sum(m.numel() for m in masks)
    assert result["pooled"]["train"]["foreground"]["share"] == pytest.approx(share, rel=1e-12)
    with_fg = sum(int((m.reshape(len(m), -1) > 0).any(1).sum()) for m in masks)
    assert result["pooled"]["train"]["foreground"]["images"][0]["value"] == with_fg


class Spy:
    """Records the data every ClientApp message loads: (hospital, normalisation, data)."""

    def __init__(self) -> None:
        self.loads: list[tuple[str, Any, Any]] = []

    def __call__(self, request: DataRequest) -> Any:
        data = load_hospital_data(request)
        self.loads.append((request.hospital.hospital, request.normalisation, data))
        return data


def federated(tmp_path: Path, rounds: int = 1) -> dict[str, Any]:
    return {**HEART_RUN, "algorithm": "fedavg", "normalisation": "federated", "rounds": rounds,
            "local-steps": 2, "batch-size": 4, "optimizer": "sgd", "momentum": 0.0,
            "output-dir": str(tmp_path / "out"), "run-name": "normalised"}  # fmt: skip


@needs_heart
@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("min_count", [1, K])
def test_federated_normalisation_trains_on_the_pooled_statistics(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, min_count: int
) -> None:
    spy = Spy()
    monkeypatch.setattr(client.app, "load_hospital_data", spy)
    flat = federated(tmp_path)
    nodes = heart_nodes(tmp_path, **{"stats-min-count": min_count})
    run(flat, ScriptedGrid(nodes, flat), tmp_path / "out")
    raw = {c: raw_train(c) for c in CENTRES}
    # by hand: per feature, the centres whose sums may leave (all of them with k = 1)
    mean, std = np.zeros(13), np.zeros(13)
    for j in range(13):
        kept = [c for c in CENTRES
                if not (len(u := np.unique(raw[c][:, j], return_counts=True)[1]) <= 3
                        and u.min() < min_count)]  # fmt: skip
        values = np.concatenate([raw[c][:, j] for c in kept])
        mean[j], std[j] = values.mean(), values.std(ddof=1)
    if min_count == K:  # sex: Switzerland has 3 women, VA 2: from Cleveland + Hungary only
        both = np.concatenate([raw["cleveland"][:, 1], raw["hungarian"][:, 1]])
        assert mean[1] == pytest.approx(both.mean())
    trained = [(h, n, d) for h, n, d in spy.loads if isinstance(n, Standardise)]
    assert {h for h, _, _ in trained} == set(CENTRES)
    raws = [h for h, n, _ in spy.loads if n == "raw"]
    assert sorted(raws) == sorted(CENTRES)  # the one statistics exchange
    for hospital, normalisation, data in trained:
        np.testing.assert_allclose(normalisation.mean, mean, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(normalisation.std, std, rtol=1e-12)
        expected = (raw[hospital] - mean) / (std + 1e-9)
        np.testing.assert_allclose(data.train.inputs.numpy(), expected, rtol=1e-5, atol=1e-5)
        centre = read_centre(HEART / f"processed.{hospital}.data")
        test = (centre.features[centre.test].astype(np.float64) - mean) / (std + 1e-9)
        np.testing.assert_allclose(data.test.inputs.numpy(), test, rtol=1e-5, atol=1e-5)
    out = tmp_path / "out"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["normalisation"]["kind"] == "federated"
    assert summary["normalisation"]["variables"] == list(FEATURES)
    np.testing.assert_allclose(summary["normalisation"]["mean"], mean, rtol=1e-12)
    assert json.loads((out / "config.json").read_text())["normalisation"] == "federated"


class Recording(ScriptedGrid):
    """Keeps every message's config as it was sent."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sent: list[dict[str, Any]] = []

    def push_messages(self, messages: Any) -> list[str]:
        messages = list(messages)
        for message in messages:
            self.sent.append(dict(message.content.config_records.get(keys.CONFIG, {})))
        return super().push_messages(messages)


@needs_heart
@pytest.mark.usefixtures("task_identity")
def test_a_resumed_run_reuses_the_checkpointed_statistics(tmp_path: Path) -> None:
    reference_dir, crashed_dir = tmp_path / "reference", tmp_path / "crashed"
    reference_flat = federated(reference_dir, rounds=2)
    reference_grid = Recording(heart_nodes(reference_dir), reference_flat)
    _, reference = run(reference_flat, reference_grid, reference_dir / "out")

    flat = federated(crashed_dir, rounds=2)
    nodes = heart_nodes(crashed_dir)
    with pytest.raises(CoordinatorCrash):  # statistics, round 1, then dies in round 2
        run(flat, Recording(nodes, flat, crash_at=3), crashed_dir / "out")
    # Were the statistics asked again, a stricter Cleveland would now withhold everything
    # and the pooled numbers would change; a resumed run must not ask.
    nodes[1000]["stats-min-count"] = 1000
    resumed_flat = {**flat, "resume": True}
    grid = Recording(nodes, resumed_flat)
    _, resumed = run(resumed_flat, grid, crashed_dir / "out")
    assert not [c for c in grid.sent if keys.STATS_REQUEST in c]
    first = next(c for c in reference_grid.sent if keys.NORMALISATION_MEAN in c)
    for config in grid.sent:  # every message of the resumed run: the same numbers
        assert config[keys.NORMALISATION_MEAN] == first[keys.NORMALISATION_MEAN]
        assert config[keys.NORMALISATION_STD] == first[keys.NORMALISATION_STD]
    for key, value in reference.arrays.items():
        assert torch.equal(
            torch.from_numpy(value.numpy()), torch.from_numpy(resumed.arrays[key].numpy())
        ), key
    summary = json.loads((crashed_dir / "out" / "summary.json").read_text())
    assert summary["normalisation"]["mean"] == first[keys.NORMALISATION_MEAN]
