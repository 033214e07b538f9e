"""``fedclinic bench quality`` quick modes and ``bench report``: structure and sane values.

A smoke test (CI runs it, untimed): both suites in quick mode through the CLI, then the
report; nothing here checks a particular result.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedclinic.bench.quality import HEART_DIR, PNEUMONIA_FILE
from fedclinic.cli import main

pytestmark = pytest.mark.skipif(
    not (HEART_DIR.is_dir() and PNEUMONIA_FILE.is_file()), reason="shared data not present"
)


def _in_unit(value: object) -> bool:
    return isinstance(value, float) and 0.0 <= value <= 1.0


@pytest.mark.long
def test_quick_modes_and_report(tmp_path: Path) -> None:
    out = tmp_path / "results"
    assert main(["bench", "quality", "--suite", "all", "--mode", "quick", "--out", str(out)]) == 0

    heart = json.loads((out / "heart" / "results.json").read_text())
    assert heart["mode"] == "quick" and heart["seeds"] == [42]
    assert set(heart["algorithms"]) == {"local-only", "pooled", "fedavg", "fedhelp", "fedmas"}
    assert heart["hospitals"] == ["cleveland", "hungarian", "switzerland", "va"]
    assert len(heart["runs"]) == 5 and "in process" in heart["runtime"]
    assert heart["settings"]["fedhelp"]["fedhelp.knowledge"] == "none"  # no public table
    assert heart["labels"]["fedhelp"] == "FedHelp, dual distillation only"
    assert "degraded" in heart["labels"]["fedmas"]
    assert heart["settings"]["fedmas"]["fedmas.prior-source"] == "random"  # degraded prior
    rows = heart["per_hospital"]
    assert len(rows) == 5 * 4
    deployed = {(r["algorithm"], r["hospital"]): r["model"] for r in rows}
    assert sorted(v for (a, _), v in deployed.items() if a == "fedhelp") == [
        "global", "global", "large", "large"
    ]  # fmt: skip
    assert all(_in_unit(r["test_accuracy"]) for r in rows)
    assert {r["num_test"] for r in rows} == {104, 89, 16, 45}  # FLamby's test sizes
    majority = heart["majority_rule"]["client_avg_accuracy"]
    assert majority == pytest.approx(0.721, abs=1e-3)  # client average on FLamby's split
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

    skew = json.loads((out / "pneumonia-skew" / "results.json").read_text())
    assert skew["algorithms"] == ["local-only", "local-only-bsm", "fedhelp", "pfednet"]
    assert skew["targets"]["h1"] == 0.6 and skew["targets"]["h6"] == 0.02
    for entry in skew["layout"].values():  # the data-seed rule: both classes everywhere
        assert min(entry["test_class_counts"]) >= 3 and min(entry["val_class_counts"]) >= 2
    assert skew["both_classes_hospitals"] == skew["hospitals"]
    assert skew["references"] == ["local-only", "local-only-bsm"]
    assert skew["settings"]["local-only-bsm"]["local-only.local-loss"] == "bsm"
    assert skew["large_model_hospitals"] == ["h1", "h2"]  # FedHelp's private models
    summary = {r["algorithm"]: r for r in skew["summary"]}
    gap = summary["local-only"]["h3:gap_local-only_test_balanced_accuracy"]
    assert gap["mean"] == 0.0  # a method against itself
    assert "client_avg_gap_local-only-bsm_test_balanced_accuracy" in summary["fedhelp"]

    # held-out variant: the same partition, test images carved from each hospital's own share
    held = json.loads((out / "pneumonia-skew-heldout" / "results.json").read_text())
    for name, entry in held["layout"].items():
        own = skew["layout"][name]["development_class_counts"]
        test = entry["test_class_counts"]
        dev = entry["development_class_counts"]
        assert [a + b for a, b in zip(dev, test, strict=True)] == own
        assert sum(test) >= 0.19 * sum(own)  # 20 % held out, stratified

    # DP suite: the noise keeps every hospital's ledger at or below the target ε
    private = json.loads((out / "pneumonia-privacy" / "results.json").read_text())
    methods = private["privacy"]["methods"]
    assert set(methods) == set(private["algorithms"])
    for entry in methods.values():
        if entry["epsilon"] is None:  # the algorithm without DP
            assert entry["spent_epsilon"] == {}
            continue
        assert set(entry["spent_epsilon"]) == set(private["hospitals"])
        assert max(entry["spent_epsilon"].values()) <= entry["epsilon"]
        assert entry["train_seconds_per_round"] > 0
    assert methods["fedavg-dp-eps1"]["train_cost_ratio"] > 0
    # SecAgg+ rows: their reference is the same method without it; DP + SecAgg keeps DP's ε
    assert methods["fedavg-secagg"]["reference"] == "fedavg"
    assert methods["fedavg-secagg"]["epsilon"] is None
    both = methods["fedavg-dp-eps8-secagg"]
    assert both["reference"] == "fedavg-dp-eps8" and both["secure_aggregation"] is True
    assert both["epsilon"] == 8 and both["wall_cost_ratio"] > 0

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
    assert "**FedHelp, dual distillation only** (ours)" in text
    assert "## PneumoniaMNIST strong label skew" in text and "Meets target" in text
    assert "private wide-cnn" in text  # FedHelp's model classes are named in the table
    images = sorted(p.name for p in plots.glob("*.png"))
    assert "Training (x reference)" in text and "FedAvg, DP ε = 8, SecAgg+" in text
    assert len(images) == 16
    assert "heart_federated_bars_test_accuracy.png" in images  # every suite's runs completed
    for name in images:
        assert f"plots/{name}" in text
        assert (plots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (plots / "heart_summary.csv").is_file()


def test_report_without_results_is_a_config_error(tmp_path: Path) -> None:
    code = main(["bench", "report", "--results", str(tmp_path), "--out", str(tmp_path / "B.md")])
    assert code == 2


def test_validation_score_is_the_best_rounds_mean_validation_balanced_accuracy(
    tmp_path: Path,
) -> None:
    from fedclinic.bench.quality import validation_score

    rows = [  # round 0: mean 0.6; round 1: mean 0.75 (the best); test values are ignored
        {"kind": "evaluate", "model_round": 0, "val_balanced_accuracy": 0.5, "test_auc": 1.0},
        {"kind": "evaluate", "model_round": 0, "val_balanced_accuracy": 0.7},
        {"kind": "evaluate", "model_round": 1, "val_balanced_accuracy": 0.9},
        {"kind": "evaluate", "model_round": 1, "val_balanced_accuracy": 0.6},
        {"kind": "evaluate", "model_round": 2, "val_balanced_accuracy": None},
        {"kind": "train", "model_round": 1, "val_balanced_accuracy": 1.0},
    ]
    (tmp_path / "summary.json").write_text("{}")
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert validation_score(tmp_path) == pytest.approx(0.75)


def synthetic_plan(
    seeds: tuple[int, ...],
    algorithms: tuple[str, ...],
    samples: int,
    classes: int,
    rounds: int,
    steps: int,
    candidates: dict[str, list[dict[str, Any]]] | None = None,
) -> Any:
    """A quality plan on two synthetic hospitals (the ``pneumonia`` suite's name, no data)."""
    from fedclinic.bench import quality

    hospitals = [
        {"hospital": f"h{i}", "data-source": "synthetic", "num-samples": samples,
         "data-seed": i, "partition-id": i, "num-partitions": 2, "device": "cpu"}
        for i in range(2)
    ]  # fmt: skip
    return quality.Plan(
        suite="pneumonia",
        mode="quick",
        seeds=seeds,
        algorithms=algorithms,
        base={"model": "cnn", "data-source": "synthetic", "num-classes": classes,
              "rounds": rounds, "local-steps": steps, "batch-size": 16, "min-hospitals": 2},
        per_algorithm={},
        hospitals=hospitals,
        shares={"h0": 0.5, "h1": 0.5},
        candidates=candidates or {},
    )  # fmt: skip


def test_options_are_chosen_on_validation_and_every_seed_is_run_afresh(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two candidates of FedAvg on two synthetic hospitals: a learning rate too small to move
    # the model and a working one; the working one must win on validation data, and the
    # seed's result must come from a run of its own, not from the tuning run.
    from fedclinic.bench import quality

    plan = synthetic_plan(
        (7,), ("fedavg",), samples=120, classes=3, rounds=3, steps=8,
        candidates={"fedavg": [{"learning-rate": 1e-9}, {"learning-rate": 0.01}]},
    )  # fmt: skip
    monkeypatch.setattr(quality, "make_plan", lambda *args, **kwargs: plan)
    results = quality.run_suite("pneumonia", "quick", tmp_path)
    tried = results["tuning"]["fedavg"]
    assert [t["options"] for t in tried] == [{"learning-rate": 1e-9}, {"learning-rate": 0.01}]
    assert [t["chosen"] for t in tried] == [False, True]
    assert tried[1]["validation_score"] > tried[0]["validation_score"]
    assert results["settings"]["fedavg"]["learning-rate"] == 0.01
    (run,) = results["runs"]
    assert run["dir"] == "runs/fedavg/seed-7" and run["dir"] != tried[1]["dir"]
    assert (tmp_path / "pneumonia" / run["dir"] / "summary.json").is_file()
    assert (tmp_path / "pneumonia" / tried[1]["dir"] / "summary.json").is_file()


def test_a_failed_seed_is_reported_and_the_call_goes_on_for_the_chosen_methods(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--methods`` runs only the methods named (an unknown one is refused in one line); a
    seed run that fails (here seed 7 of FedAvg, as a diverged run fails) is listed with its
    reason in ``failed_runs`` and in the report, the method's row is over the other seed."""
    from fedclinic.bench import quality
    from fedclinic.errors import ConfigError, FedClinicError

    plan = synthetic_plan((7, 8), ("local-only", "fedavg"), samples=60, classes=2, rounds=2,
                          steps=2)  # fmt: skip
    real = quality.run_federation

    def federation(flat: dict[str, object], nodes: object, target: Path) -> object:
        if flat["run-name"] == "fedavg-seed7":
            raise FedClinicError("round 2: diverged: a NaN/Inf update from h1")
        return real(flat, nodes, target)  # type: ignore[arg-type]

    monkeypatch.setattr(quality, "run_federation", federation)
    monkeypatch.setattr(quality, "make_plan", lambda *args, **kwargs: plan)
    with pytest.raises(ConfigError, match="--methods fedprox not in the pneumonia suite"):
        quality.run_suite("pneumonia", "quick", tmp_path, methods=("fedprox",))
    results = quality.run_suite("pneumonia", "quick", tmp_path, methods=("fedavg",))
    assert results["algorithms"] == ["fedavg"]
    assert [(r["algorithm"], r["seed"]) for r in results["runs"]] == [("fedavg", 8)]
    [failed] = results["failed_runs"]
    assert (failed["algorithm"], failed["seed"]) == ("fedavg", 7)
    assert "diverged: a NaN/Inf update from h1" in failed["failure"]
    [row] = results["summary"]
    assert row["client_avg_test_balanced_accuracy"]["n"] == 1
    report = tmp_path / "BENCHMARKS.md"
    args = ["bench", "report", "--results", str(tmp_path), "--out", str(report)]
    assert main([*args, "--plots", str(tmp_path / "plots")]) == 0
    text = report.read_text()
    assert "seed 7 failed** (round 2: diverged: a NaN/Inf update from h1)" in text
    # the method's row names what it deploys from a seed that ran (the first one failed)
    assert "| **FedAvg** | global cnn |" in text


def test_report_draws_the_cost_plots_from_system_json(tmp_path: Path) -> None:
    from fedclinic.bench.report import runtime_sections

    scale = [
        {"app": app, "hospitals": n, "median_round_overhead_seconds": 5.0 * n,
         "peak_rss_mib": {"flwr-clientapp": 900.0}}
        for app in ("fedclinic-fedavg", "plain-flower") for n in (2, 4)
    ]  # fmt: skip
    transfer = [
        {"app": "fedclinic-pfednet", "model": "cnn", "compression": "stc",
         "wire_bytes_per_round": {"down_bytes": 6e5, "up_bytes": 1e5}}
    ]  # fmt: skip
    (tmp_path / "system").mkdir()
    (tmp_path / "system" / "system.json").write_text(
        json.dumps({"scale": scale, "transfer": transfer})
    )
    (tmp_path / "system" / "system.md").write_text("the system tables")
    plots = tmp_path / "plots"
    lines = runtime_sections(tmp_path, plots, "docs/bench")
    assert "the system tables" in lines and "![runtime costs](docs/bench/system_costs.png)" in lines
    assert (plots / "system_costs.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (plots / "system.json").is_file()  # kept beside the plots for later reports


def test_report_adds_a_sections_notes_labelled_as_typed_in(tmp_path: Path) -> None:
    from fedclinic.bench.report import runtime_sections

    (tmp_path / "load").mkdir()
    (tmp_path / "load" / "load.md").write_text("the load table")
    (tmp_path / "load" / "notes.md").write_text("A nice-19 job ran\nalongside.\n")
    plots = tmp_path / "plots"
    lines = runtime_sections(tmp_path, plots, "docs/bench")
    note = "Conditions of this measurement, noted by whoever ran it: A nice-19 job ran alongside."
    assert lines == ["## Load: many hospitals on one machine", "", "the load table", "", note, ""]
    # kept beside the plots: a later report without these results still shows it
    (tmp_path / "load" / "notes.md").unlink()
    (tmp_path / "load" / "load.md").unlink()
    assert runtime_sections(tmp_path, plots, "docs/bench") == lines
    # a section without notes has none
    (plots / "load_notes.md").unlink()
    assert note not in runtime_sections(tmp_path, plots, "docs/bench")


def test_privacy_noise_keeps_the_smallest_hospital_at_its_target(tmp_path: Path) -> None:
    """The DP suite's noise multiplier per target ε: the hospital with the largest sample
    rate reaches the target (Opacus's RDP analysis, computed here directly), none passes it;
    for a balanced-softmax method (FedHelp, pFedNet, Fed-MAS) composed with its one class-prior
    release (RDP ``alpha / (2 * 10^2)``, written out by hand), which needs more noise."""
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    from fedclinic.bench.quality import privacy_plan, set_privacy_noise

    plan = privacy_plan("full", tmp_path)
    set_privacy_noise(plan)
    assert len(plan.algorithms) == 6 * 4 + 2 and plan.base["rounds"] == 20  # + 2 SecAgg+
    with_secagg = plan.flat("fedavg-dp-eps8-secagg", 42)
    assert with_secagg.pop("secure-aggregation") is True
    assert with_secagg.pop("run-name") == "fedavg-dp-eps8-secagg-seed42"
    parent = plan.flat("fedavg-dp-eps8", 42)
    assert parent.pop("run-name") == "fedavg-dp-eps8-seed42" and with_secagg == parent
    assert with_secagg["optimizer"] == "sgd"  # DP rows: Adam's steps vanish under the noise
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    for method, entry in plan.privacy.items():
        flat = plan.flat(method, 42)
        assert flat["dp"] == "dp-sgd" and flat["dp-noise-multiplier"] == entry["noise_multiplier"]
        spent = {}
        for hospital, rate in entry["sample_rate"].items():
            steps = entry["planned_steps"][hospital]
            rdp = compute_rdp(
                q=rate, noise_multiplier=entry["noise_multiplier"], steps=steps, orders=orders
            )
            if entry["algorithm"] in ("fedhelp", "pfednet", "fedmas"):
                assert entry["prior_noise"] == 10.0
                rdp = rdp + np.array(orders) / (2 * 10.0**2)
            else:
                assert entry["prior_noise"] is None
            spent[hospital] = get_privacy_spent(orders=orders, rdp=rdp, delta=1e-5)[0]
        assert max(spent.values()) <= entry["epsilon"]
        assert max(spent.values()) >= entry["epsilon"] - 0.05 * entry["epsilon"]
        assert max(spent, key=lambda h: spent[h]) == entry["binding_hospital"] == "h6"
    fedmas, fedavg = plan.privacy["fedmas-dp-eps1"], plan.privacy["fedavg-dp-eps1"]
    assert fedmas["planned_steps"] == fedavg["planned_steps"]  # one model, one charge a round
    assert fedmas["noise_multiplier"] > fedavg["noise_multiplier"]  # the release costs noise
    fedhelp, fedavg = plan.privacy["fedhelp-dp-eps3"], plan.privacy["fedavg-dp-eps3"]
    assert fedhelp["planned_steps"]["h1"] == 2 * fedavg["planned_steps"]["h1"]  # two models
