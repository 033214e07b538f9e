"""Federated statistics, the maths and the privacy rules, checked by hand and by brute force.

- the minimum cell size and its protection against differencing (:func:`protect`): every
  table consistent with what a hospital released must leave each "<k" cell free to be any of
  1..k-1 (enumerated, not trusted);
- the sums rule (few distinct values), extremes, a hospital with 3 cases of a class on every
  path (per site, pooled, histograms, class counts);
- pooled values against numpy on the concatenated data; requests refused with one line;
- a one-class hospital flagged in the report.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from fedclinic.cli import main
from fedclinic.config import HospitalConfig, RunConfig, parse_hospital_config
from fedclinic.data import DataRequest, load_hospital_data
from fedclinic.data.base import HospitalData, Split, Standardise
from fedclinic.errors import ConfigError, DataError, FedClinicError
from fedclinic.stats import pool
from fedclinic.stats.protocol import (
    HIDDEN,
    WITHHELD,
    HistogramSpec,
    SiteAnswer,
    StatsRequest,
    normalisation_of,
    parse_answer,
    parse_request,
)
from fedclinic.stats.report import load_statistics, write_statistics
from fedclinic.stats.site import describe, histogram, moments, protect
from strategies import load_run_config

K = 5


# ------------------------------------------------------------------------------ protect


def consistent_values(cells: list[Any], total: int | None, k: int) -> list[set[int]]:
    """Every value each cell can take in some table consistent with the release (brute force):
    released cells are exact, "<k" cells 1..k-1, hidden cells >= k, and the cells add up to
    ``total`` when it is released."""
    ranges = []
    for cell in cells:
        if isinstance(cell, int):
            ranges.append(range(cell, cell + 1))
        elif cell.startswith("<"):
            ranges.append(range(1, k))
        else:  # hidden (>= k) or withheld (anything)
            ranges.append(range(k if cell == HIDDEN else 0, (total or 40) + 1))
    seen: list[set[int]] = [set() for _ in cells]
    for table in itertools.product(*ranges):
        if total is None or sum(table) == total:
            for i, value in enumerate(table):
                seen[i].add(value)
    return seen


@pytest.mark.parametrize(
    ("counts", "expected"),
    [
        ([3, 196], ["<5", HIDDEN]),  # 3 = 199 - 196 otherwise
        ([196, 3, 0], [HIDDEN, "<5", 0]),  # a zero is no one: released
        ([3, 4], [WITHHELD, WITHHELD]),  # total 7: both would be pinned to 3..4
        ([3, 4, 10], ["<5", "<5", HIDDEN]),
        ([1, 5, 100], ["<5", HIDDEN, HIDDEN]),  # hiding 5 alone leaves 1 in 1..1
        ([0, 30], [0, 30]),  # one class only: shown (and flagged)
        ([7, 9, 12], [7, 9, 12]),
    ],
)
def test_protect_by_hand(counts: list[int], expected: list[Any]) -> None:
    assert protect(counts, [0 < c < K for c in counts], K, total_known=True) == expected


def test_protect_without_a_released_total_suppresses_only_the_small_cells() -> None:
    assert protect([3, 196], [True, False], K, total_known=False) == ["<5", 196]


def test_no_small_cell_can_be_narrowed_from_the_released_total() -> None:
    rng = np.random.default_rng(0)
    for _ in range(300):
        width = int(rng.integers(2, 5))
        counts = [int(v) for v in rng.choice([0, 1, 2, 3, 4, 5, 6, 8, 13], size=width)]
        cells = protect(counts, [0 < c < K for c in counts], K, total_known=True)
        assert all(not (isinstance(c, int) and 0 < c < K) for c in cells), (counts, cells)
        seen = consistent_values(cells, sum(counts), K)
        for cell, values, true in zip(cells, seen, counts, strict=True):
            assert true in values, (counts, cells)
            if isinstance(cell, str) and cell.startswith("<"):
                assert values == set(range(1, K)), (counts, cells, values)


# ------------------------------------------------------------------------------ rules


def test_sums_of_a_few_valued_variable_are_withheld_when_one_value_is_rare() -> None:
    binary = np.array([[0.0]] * 10 + [[1.0]] * 3)  # sum = 3 would be the count of ones
    answer = moments(binary, per_case=True, k=K, extremes=True)
    assert answer.count == 13 and answer.sum is None and answer.min is None
    assert "one held by fewer than 5" in answer.withheld
    fine = moments(np.array([[0.0]] * 10 + [[1.0]] * 5), per_case=True, k=K, extremes=False)
    assert (fine.sum, fine.sum_sq, fine.min, fine.max) == (5.0, 5.0, None, None)
    four = np.array([[0.0]] * 10 + [[1.0]] * 5 + [[2.0]] * 5 + [[3.0]])  # 4 values: free
    assert moments(four, per_case=True, k=K, extremes=True).sum == 18.0
    assert moments(four, per_case=True, k=K, extremes=True).max == 3.0  # allowed here
    small = moments(np.arange(4.0)[:, None], per_case=True, k=K, extremes=True)
    assert small.count == "<5" and small.sum is None


def test_histogram_cells_below_above_and_the_right_edge() -> None:
    spec = HistogramSpec(low=0.0, high=10.0, bins=2)
    values = np.array([[-1.0]] * 5 + [[0.0]] * 5 + [[5.0]] * 6 + [[10.0]] * 5 + [[11.0]] * 7)
    answer = histogram(values, True, spec, K)
    # [-inf, 0): 5; [0, 5): 5; [5, 10]: 6 + 5 (10 is in the last bin); (10, inf): 7
    assert answer.counts == [5, 5, 11, 7]


def test_image_histogram_counts_pixels_but_protects_images() -> None:
    spec = HistogramSpec(low=0.0, high=1.0, bins=2)
    images = np.full((10, 4), 0.2)
    images[:2, 0] = 0.9  # 2 images have one bright pixel each: a bin of 2 images
    answer = histogram(images, False, spec, K)
    assert answer.counts[2] == "<5"  # only 2 pixels, and only 2 images
    assert answer.counts[1] == HIDDEN  # else 40 - 38 gives the bright bin


def tabular(labels: list[int], columns: list[list[float]]) -> Split:
    inputs = torch.tensor(columns, dtype=torch.float32).reshape(len(columns), -1).T.contiguous()
    return Split(inputs, torch.tensor(labels, dtype=torch.int64))


def three_of_a_class() -> HospitalData:
    """23 train cases, 3 of class 1; an age-like column and a 0/1 column with 4 ones."""
    rng = np.random.default_rng(1)
    age = rng.normal(50, 10, 23).round().tolist()
    flag = [1.0] * 4 + [0.0] * 19
    train = tabular([0] * 20 + [1] * 3, [age, flag])
    test = tabular([0] * 6, [age[:6], flag[:6]])
    empty = tabular([], [[], []])
    return HospitalData(train, empty, test, extra={"features": ["age", "flag"]})


RUN = RunConfig(model="logreg", num_features=2, data_source="heart-disease")


def walk_cells(answer: SiteAnswer) -> list[Any]:
    """Every count the answer discloses."""
    found: list[Any] = []
    for part in answer.splits.values():
        found += [part.cases, *part.classes]
        found += [v.count for v in part.variables.values()]
        found += [c for h in part.histograms.values() for c in h.counts]
        if part.foreground is not None:
            found += part.foreground.images
    return found


def test_a_hospital_with_three_cases_of_a_class_on_every_path() -> None:
    hospital = HospitalConfig(hospital="small", data_source="heart-disease")
    spec = {
        "age": HistogramSpec(low=20, high=80, bins=6),
        "flag": HistogramSpec(low=0, high=1, bins=2),
    }
    request = StatsRequest(histograms=spec)
    answer = describe(three_of_a_class(), RUN, hospital, request)
    train = answer.splits["train"]
    assert train.cases == 23 and train.classes == [HIDDEN, "<5"]
    assert answer.splits["test"].classes == [6, 0]
    assert answer.splits["val"].cases == 0
    assert train.variables["flag"].sum is None  # 4 ones: the sum would say so
    assert train.variables["age"].sum is not None
    assert train.histograms["flag"].counts[1] == HIDDEN and train.histograms["flag"].counts[2] == (
        "<5"
    )
    for cell in walk_cells(answer):  # nothing between 1 and k - 1 leaves the site
        assert not (isinstance(cell, int) and 0 < cell < K), cell
    # pooled: the other hospital's numbers only, and who is missing; pooled minus the other
    # hospital's released count gives back 0, never the suppressed 3
    other = describe(
        HospitalData(tabular([0] * 10 + [1] * 10, [list(range(20)), [0.0, 1.0] * 10]),
                     tabular([], [[], []]), tabular([], [[], []]),
                     extra={"features": ["age", "flag"]}),
        RUN, HospitalConfig(hospital="big", data_source="heart-disease"), request,
    )  # fmt: skip
    pooled = pool.pool({"small": answer, "big": other})["train"]
    assert pooled["classes"][1] == {"value": 10, "incomplete": ["small"]}
    assert pooled["classes"][1]["value"] - other.splits["train"].classes[1] == 0
    assert pooled["variables"]["flag"]["hospitals"] == ["big"]
    assert "small" in pooled["variables"]["flag"]["excluded"]
    assert pooled["histograms"]["flag"]["counts"][2] == {"value": 10, "incomplete": ["small"]}


def test_hospital_minimum_cell_size_is_its_own() -> None:
    data = three_of_a_class()
    strict = HospitalConfig(hospital="h", data_source="heart-disease", stats_min_count=30)
    answer = describe(data, RUN, strict, StatsRequest())
    assert answer.min_count == 30 and answer.splits["train"].cases == "<30"
    assert answer.splits["train"].variables["age"].sum is None
    with pytest.raises(ConfigError, match="stats-min-count"):
        parse_hospital_config({"hospital": "h", "data-source": "synthetic", "stats-min-count": 0})


def test_extremes_only_when_the_hospital_allows_them() -> None:
    data = three_of_a_class()
    closed = describe(data, RUN, HospitalConfig(hospital="h"), StatsRequest())
    assert closed.splits["train"].variables["age"].min is None
    opened = describe(
        data, RUN, HospitalConfig(hospital="h", stats_allow_extremes=True), StatsRequest()
    )
    age = data.train.inputs[:, 0].numpy()
    assert opened.splits["train"].variables["age"].min == float(age.min())
    assert opened.splits["train"].variables["age"].max == float(age.max())


# ------------------------------------------------------------------------------ pooling


def test_pooled_mean_and_std_equal_numpy_on_the_concatenated_data() -> None:
    rng = np.random.default_rng(3)
    sites = {}
    raw = []
    for index, size in enumerate((40, 17, 90)):
        column = rng.normal(100 + 40 * index, 5 + 10 * index, size)  # unequal means and spreads
        raw.append(column)
        data = HospitalData(
            tabular([0, 1] * (size // 2) + [0] * (size % 2), [column.tolist()]),
            tabular([], [[]]),
            tabular([], [[]]),
            extra={"features": ["x"]},
        )
        run = RunConfig(model="logreg", num_features=1, data_source="heart-disease")
        sites[f"h{index}"] = describe(data, run, HospitalConfig(hospital=f"h{index}"),
                                      StatsRequest(splits=("train",)))  # fmt: skip
    pooled = pool.pool(sites)["train"]["variables"]["x"]
    everything = np.concatenate(raw).astype(np.float32).astype(np.float64)
    assert pooled["count"] == len(everything)
    assert pooled["mean"] == pytest.approx(everything.mean(), rel=1e-12)
    assert pooled["std"] == pytest.approx(everything.std(ddof=1), rel=1e-10)
    naive = np.mean([c.astype(np.float32).mean() for c in raw])  # the mean of site means
    assert abs(pooled["mean"] - naive) > 1.0  # which is not what is pooled


def test_federated_normalisation_refuses_inputs_nobody_released() -> None:
    data = three_of_a_class()
    answer = describe(data, RUN, HospitalConfig(hospital="h"), StatsRequest(inputs_only=True))
    with pytest.raises(ValueError, match="no hospital released the train statistics of 'flag'"):
        pool.normalisation({"h": answer})
    other = describe(data, RunConfig(model="logreg", num_features=2), HospitalConfig(hospital="o"),
                     StatsRequest(inputs_only=True))  # fmt: skip
    renamed = other.model_copy(update={"inputs": ["age", "sex"]})
    with pytest.raises(ValueError, match="model inputs differ"):
        pool.normalisation({"h": answer, "o": renamed})


# ------------------------------------------------------------------------------ requests


@pytest.mark.parametrize(
    ("request_json", "fragment"),
    [
        ({"histograms": {"age": {"low": 0, "high": 1, "bins": 0}}},
         "histograms.age.bins: bins = 0 is not allowed: expected 1..200"),
        ({"histograms": {"age": {"low": 0, "high": 1, "bins": -3}}}, "bins = -3"),
        ({"histograms": {"age": {"low": 0, "high": 1, "bins": 201}}}, "bins = 201"),
        ({"histograms": {"age": {"low": math.nan, "high": 1, "bins": 5}}},
         "histograms.age.low: nan is not a finite number"),
        ({"histograms": {"age": {"low": 0, "high": math.inf, "bins": 5}}},
         "histograms.age.high: inf is not a finite number"),
        ({"histograms": {"age": {"low": 2, "high": 2, "bins": 5}}}, "range [2, 2] is empty"),
        ({"splits": ["training"]}, "splits.0"),
        ({"splits": []}, "expected one or more of train, val, test"),
        ({"bins": 5}, "bins: Extra inputs are not permitted"),
    ],
)  # fmt: skip
def test_bad_requests_are_refused_with_one_line(
    request_json: dict[str, Any], fragment: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_request(json.dumps(request_json))
    message = str(caught.value)
    assert message.startswith("statistics request: ") and "\n" not in message
    assert fragment in message


def test_an_unknown_feature_is_refused_naming_the_features_there_are() -> None:
    data, hospital = three_of_a_class(), HospitalConfig(hospital="h")
    for request in (
        StatsRequest(variables=("weight",)),
        StatsRequest(histograms={"weight": HistogramSpec(low=0, high=1, bins=2)}),
    ):
        with pytest.raises(ConfigError) as caught:
            describe(data, RUN, hospital, request)
        assert str(caught.value) == (
            "statistics request: unknown feature 'weight'; this hospital has age, flag"
        )


def test_run_config_keys_of_statistics_are_checked_at_the_edge() -> None:
    with pytest.raises(ConfigError, match=r"'stats-bins' = 0 is not allowed"):
        load_run_config({"stats-bins": 0})
    with pytest.raises(ConfigError, match=r"'stats-bins' = 201 is not allowed"):
        load_run_config({"stats-bins": 201})
    with pytest.raises(ConfigError, match=r"'normalisation' = 'global' is not allowed"):
        load_run_config({"normalisation": "global"})
    with pytest.raises(ConfigError, match="run-kind = 'stats': a statistics run has no rounds"):
        load_run_config({"run-kind": "stats", "resume": True, "output-dir": "x"})


def test_a_malformed_answer_is_refused() -> None:
    with pytest.raises(FedClinicError, match="carries no statistics"):
        parse_answer(None)
    with pytest.raises(FedClinicError, match="malformed statistics"):
        parse_answer('{"hospital": "h"}')
    answer = describe(three_of_a_class(), RUN, HospitalConfig(hospital="h"), StatsRequest())
    text = answer.model_dump_json().replace('"cases":23', '"cases":-4')
    with pytest.raises(FedClinicError, match="cannot be negative"):
        parse_answer(text)


# ------------------------------------------------------------------------------ normalisation


def test_standardise_applies_the_pooled_statistics_per_feature_and_channel() -> None:
    split = tabular([0, 1], [[1.0, 3.0], [10.0, 30.0]])
    data = HospitalData(split, split, split)
    out = Standardise((2.0, 20.0), (1.0, 10.0)).apply(data, "here")
    expected = torch.tensor([[-1.0, -1.0], [1.0, 1.0]])
    assert torch.allclose(out.test.inputs, expected, atol=1e-6)
    images = torch.stack([torch.full((2, 3, 3), 0.5), torch.full((2, 3, 3), 1.0)])
    image_data = HospitalData(*(Split(images, torch.tensor([0, 1])),) * 3)
    scaled = Standardise((0.5, 1.0), (0.25, 0.5)).apply(image_data, "here")
    assert torch.allclose(scaled.train.inputs[1, 0], torch.full((3, 3), 2.0), atol=1e-6)
    assert torch.allclose(scaled.train.inputs[0, 1], torch.full((3, 3), -1.0), atol=1e-6)
    with pytest.raises(DataError, match="2 means and 2 stds, but the inputs have 3"):
        Standardise((0.0, 0.0), (1.0, 1.0)).apply(
            HospitalData(*(tabular([0], [[1.0], [2.0], [3.0]]),) * 3), "here"
        )


def test_a_federated_run_without_pooled_statistics_in_the_message_is_refused() -> None:
    run = RunConfig(normalisation="federated")
    with pytest.raises(FedClinicError, match="normalisation = federated, but the message"):
        normalisation_of(run, {})
    assert normalisation_of(RunConfig(), {}) == "site"
    given = normalisation_of(run, {"normalisation-mean": [1.0], "normalisation-std": [2.0]})
    assert given == Standardise((1.0,), (2.0,))


# ------------------------------------------------------------------------------ report


def one_class_answers() -> dict[str, SiteAnswer]:
    rng = np.random.default_rng(2)
    answers = {}
    for name, labels in (("even", [0, 1] * 15), ("onesided", [1] * 30)):
        column = rng.normal(0, 1, 30).tolist()
        data = HospitalData(tabular(labels, [column]), tabular([], [[]]), tabular([], [[]]),
                            extra={"features": ["x"]})  # fmt: skip
        run = RunConfig(model="logreg", num_features=1)
        request = StatsRequest(histograms={"x": HistogramSpec(low=-3, high=3, bins=6)})
        answers[name] = describe(data, run, HospitalConfig(hospital=name), request)
    return answers


def test_a_one_class_hospital_is_flagged_in_the_report(tmp_path: Path) -> None:
    answers = one_class_answers()
    sites, pooled = pool.per_site(answers), pool.pool(answers)
    found = pool.flags(sites, pooled)
    assert {"hospital": "onesided", "split": "train", "flag": "one class",
            "detail": "all 30 train cases are class 1"} in found  # fmt: skip
    assert not [f for f in found if f["hospital"] == "even"]
    result = {"kind": "fedclinic-statistics", "config": {}, "hospitals": sites, "pooled": pooled,
              "flags": found, "no_histogram": {}, "requests": []}  # fmt: skip
    written = write_statistics(tmp_path, result)
    assert [p.name for p in written] == ["stats.json", "summary.json", "report.html"]
    page = (tmp_path / "report.html").read_text()
    assert "<span class='flag'>onesided</span>" in page and "one class" in page
    for image in ("cases.png", "means.png", "hist-x.png"):
        assert (tmp_path / "plots" / image).read_bytes()[:4] == b"\x89PNG"
        assert f"plots/{image}" in page
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["flags"][0]["hospital"] == "onesided" and summary["run_kind"] == "stats"
    assert load_statistics(tmp_path / "stats.json")["hospitals"].keys() == {"even", "onesided"}
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"not a stats\.json written by fedclinic stats"):
        load_statistics(tmp_path / "other.json")


def test_a_shifted_scanner_is_flagged() -> None:
    rng = np.random.default_rng(4)
    answers = {}
    run = RunConfig(in_channels=1, image_size=8)
    for index, offset in enumerate((0.0, 0.0, 0.0, 0.35)):  # the last site's scanner is bright
        images = (rng.normal(0.3 + offset, 0.05, (20, 1, 8, 8))).clip(0, 1)
        split = Split(torch.tensor(images, dtype=torch.float32), torch.tensor([0, 1] * 10))
        empty = Split(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.int64))
        data = HospitalData(split, empty, empty)
        request = StatsRequest(splits=("train",), histograms={
            "channel-0": HistogramSpec(low=0, high=1, bins=10)})  # fmt: skip
        answers[f"h{index}"] = describe(data, run, HospitalConfig(hospital=f"h{index}"), request)
    sites = pool.per_site(answers)
    found = {(f["hospital"], f["flag"]) for f in pool.flags(sites, pool.pool(answers))}
    assert ("h3", "shifted") in found and ("h3", "distribution") in found
    assert not [h for h, _ in found if h != "h3"]
    assert answers["h3"].splits["train"].variables["stored-height"].sum == 20 * 8.0


def test_stats_report_command_renders_a_stats_json_and_refuses_others(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    answers = one_class_answers()
    sites, pooled = pool.per_site(answers), pool.pool(answers)
    result = {"kind": "fedclinic-statistics", "config": {}, "hospitals": sites, "pooled": pooled,
              "flags": pool.flags(sites, pooled), "no_histogram": {}, "requests": []}  # fmt: skip
    write_statistics(tmp_path / "run", result)
    assert main(["stats", "report", "--stats", str(tmp_path / "run" / "stats.json"),
                 "--out", str(tmp_path / "again")]) == 0  # fmt: skip
    assert (tmp_path / "again" / "report.html").is_file()
    assert (tmp_path / "again" / "plots" / "hist-x.png").is_file()
    capsys.readouterr()
    assert main(["stats", "report", "--stats", str(tmp_path / "missing.json")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and "missing.json' is not a readable stats.json" in error
    assert main(["stats", "local", "--resume", "--output-dir", str(tmp_path / "x")]) == 2
    assert "a statistics run has no rounds to resume" in capsys.readouterr().err


def test_stored_image_sizes_come_from_the_file_headers(tmp_path: Path) -> None:
    for name, (height, width) in (("a", (10, 12)), ("b", (20, 16))):
        (tmp_path / name).mkdir()
        for i in range(20):
            image = Image.new("L", (width, height), color=40 * (name == "b"))
            image.save(tmp_path / name / f"{i}.png")
    run = RunConfig(in_channels=1, image_size=8)
    hospital = HospitalConfig(hospital="h", data_source="image-folder", data_path=str(tmp_path))
    data = load_hospital_data(DataRequest(run, hospital, "raw"))
    answer = describe(data, run, hospital, StatsRequest(splits=("train",)))
    train = answer.splits["train"]
    per_class = np.bincount(data.train.labels.numpy(), minlength=2)  # a: 10 x 12, b: 20 x 16
    assert train.variables["stored-height"].sum == 10.0 * per_class[0] + 20.0 * per_class[1]
    assert train.variables["stored-width"].sum == 12.0 * per_class[0] + 16.0 * per_class[1]
    assert answer.shape == [1, 8, 8]  # what the model sees
