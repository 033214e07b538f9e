"""``fedclinic bench report``: results directory -> ``BENCHMARKS.md`` tables and PNG plots.

Why: the numbers a person reads must be the numbers the documented commands produced, with
the published anchors beside them; the report only reads ``<results>/<suite>/results.json``
(written by ``fedclinic bench quality``) and never recomputes or edits a result.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedclinic.bench.suites import PNEUMONIA_SUITES, SUITES

#: FLamby's published Fed-Heart-Disease accuracies, aggregated from its result files
#: (owkin/FLamby@edacf54, flamby/results/results_benchmark_fed_heart_disease/heart_seed4*.csv:
#: mean over the 5 seeds of the client average, sd over seeds, pooled test set), anchors only.
FLAMBY_HEART: tuple[tuple[str, float, float, float, tuple[float, ...]], ...] = (
    # (method, client-avg mean, sd over seeds, pooled test, per centre 0..3)
    ("Pooled training", 0.7353, 0.0025, 0.7953, (0.7827, 0.7640, 0.7500, 0.6444)),
    ("Local 0 (Cleveland)", 0.7221, 0.0189, 0.7843, (0.7462, 0.7596, 0.7250, 0.6578)),
    ("FedAvg", 0.6850, 0.0253, 0.7480, (0.7308, 0.7191, 0.6500, 0.6400)),
    ("FedProx", 0.6850, 0.0253, 0.7480, (0.7308, 0.7191, 0.6500, 0.6400)),
    ("SCAFFOLD", 0.6840, 0.0250, 0.7480, (0.7269, 0.7191, 0.6500, 0.6400)),
    ("FedAdam", 0.7255, 0.0124, 0.7787, (0.7519, 0.7461, 0.7375, 0.6667)),
    ("FedYogi", 0.7314, 0.0112, 0.7787, (0.7596, 0.7528, 0.7375, 0.6756)),
    ("FedAdagrad", 0.7314, 0.0112, 0.7787, (0.7596, 0.7528, 0.7375, 0.6756)),
    ("Cyclic", 0.7180, 0.0257, 0.7850, (0.7577, 0.7618, 0.7125, 0.6400)),
)
#: the per-centre-majority rule's client-averaged accuracy expected on FLamby's split, printed
#: beside the value fedclinic.bench.quality.majority_rule computes from the data
REFERENCE_MAJORITY = 0.721
CENTRE_NAMES = {
    "cleveland": "Cleveland",
    "hungarian": "Hungary",
    "switzerland": "Switzerland",
    "va": "VA",
}
LABELS = {
    "local-only": "Local-only",
    "pooled": "Pooled (centralised)",
    "fedavg": "FedAvg",
    "fedprox": "FedProx",
    "fedhelp": "FedHelp",
    "pfednet": "pFedNet",
    "fedmas": "Fed-MAS",
}


def label(algorithm: str, results: dict[str, Any] | None = None) -> str:
    """A method's table label: the suite's own (controls, degraded or partial variants, as
    ``fedclinic bench quality`` named them), else the algorithm's."""
    results = results or {}
    own = results.get("labels", {}).get(algorithm)
    if own:
        return own
    settings = results.get("settings", {}).get(algorithm, {})  # results without labels
    if settings.get("fedhelp.knowledge") == "none":
        return "FedHelp, dual distillation only"
    if settings.get("fedmas.prior-source") == "random" and settings.get("model") == "logreg":
        return "Fed-MAS (degraded: logistic regression, random prior)"
    return LABELS.get(algorithm, algorithm)


def interval(cell: dict[str, Any] | None, digits: int = 3) -> str:
    """``mean [low, high]`` (95 % t-interval over seeds), or the mean alone with one seed."""
    if not cell or cell.get("mean") is None:
        return "n/a"
    mean = f"{cell['mean']:.{digits}f}"
    if cell.get("low") is None:
        return mean
    return f"{mean} [{cell['low']:.{digits}f}, {cell['high']:.{digits}f}]"


def signed(cell: dict[str, Any] | None, digits: int = 3) -> str:
    if not cell or cell.get("mean") is None:
        return "n/a"
    text = f"{cell['mean']:+.{digits}f}"
    if cell.get("low") is None:
        return text
    return f"{text} [{cell['low']:+.{digits}f}, {cell['high']:+.{digits}f}]"


def table(header: Sequence[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines.extend("| " + " | ".join(row) + " |" for row in rows)
    return lines


def minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


# ------------------------------------------------------------------------------ plots


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(results: dict[str, Any], metric: str, path: Path) -> None:
    """Per-round test curves, one panel per hospital, one line per method (mean over seeds).

    Test curves are shown for reading only; no round is chosen on them.
    """
    plt = _pyplot()
    hospitals = results["hospitals"]
    columns = min(3, len(hospitals))
    rows = math.ceil(len(hospitals) / columns)
    figure, axes = plt.subplots(
        rows, columns, figsize=(4.2 * columns, 3.2 * rows), squeeze=False, sharey=True
    )
    for index, hospital in enumerate(hospitals):
        axis = axes[index // columns][index % columns]
        for algorithm in results["algorithms"]:
            points: dict[int, list[float]] = {}
            for row in results["curves"]:
                if row["algorithm"] == algorithm and row["hospital"] == hospital:
                    value = row.get(metric)
                    if value is not None and math.isfinite(value):
                        points.setdefault(int(row["model_round"]), []).append(value)
            if points:
                rounds = sorted(points)
                means = [np.mean(points[r]) for r in rounds]
                axis.plot(rounds, means, marker=".", markersize=3, label=label(algorithm, results))
        share = results["shares"].get(hospital)
        axis.set_title(hospital + (f" ({share:.0%} of data)" if share else ""), fontsize=9)
        axis.set_xlabel("round (pooled/local: epoch)", fontsize=8)
        axis.set_ylabel(metric.replace("_", " "), fontsize=8)
        axis.grid(alpha=0.3)
    for index in range(len(hospitals), rows * columns):
        axes[index // columns][index % columns].axis("off")
    axes[0][0].legend(fontsize=7)
    figure.suptitle(
        f"{results['suite']}: per-round {metric.replace('_', ' ')} per hospital "
        f"(mean over {len(results['seeds'])} seed(s))",
        fontsize=10,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_bars(results: dict[str, Any], metric: str, path: Path) -> None:
    """Per-hospital bars of the reported model, one bar per method, 95 % interval whiskers."""
    plt = _pyplot()
    hospitals = results["hospitals"]
    algorithms = results["algorithms"]
    summary = {row["algorithm"]: row for row in results["summary"]}
    width = 0.8 / max(len(algorithms), 1)
    figure, axis = plt.subplots(figsize=(max(7.0, 1.3 * len(hospitals) + 2), 4.0))
    positions = np.arange(len(hospitals))
    for index, algorithm in enumerate(algorithms):
        cells = [summary[algorithm].get(f"{h}:{metric}") or {} for h in hospitals]
        means = [c.get("mean") if c.get("mean") is not None else np.nan for c in cells]
        errors = [(c["high"] - c["mean"]) if c.get("high") is not None else 0.0 for c in cells]
        axis.bar(
            positions + (index - (len(algorithms) - 1) / 2) * width,
            means,
            width,
            yerr=errors,
            capsize=2,
            label=label(algorithm, results),
        )
    axis.set_xticks(positions)
    axis.set_xticklabels(hospitals, fontsize=8)
    axis.set_ylabel(metric.replace("_", " "), fontsize=8)
    axis.set_ylim(0, 1)
    axis.grid(axis="y", alpha=0.3)
    axis.legend(fontsize=7, ncol=len(algorithms), loc="upper center", bbox_to_anchor=(0.5, -0.1))
    axis.set_title(f"{results['suite']}: {metric.replace('_', ' ')} per hospital", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _answering_peak(peaks: dict[str, float]) -> float:
    """The peak of the process that answered: the site worker, else a ClientApp."""
    return float(peaks.get("site-worker", peaks.get("flwr-clientapp", np.nan)))


def plot_system(system: dict[str, Any], path: Path) -> None:
    """Cost plots of ``bench system``: round overhead and the memory of the process that
    answers a hospital's messages (the site worker where one takes them, else the ClientApp)
    against the hospital count (fedclinic and the plain Flower app), and bytes on the wire per
    round of every transfer case (log scale)."""
    plt = _pyplot()
    figure, (overhead, memory, wire) = plt.subplots(
        1, 3, figsize=(15, 5.0), gridspec_kw={"width_ratios": [1, 1, 1.6]}
    )
    for app in sorted({e["app"] for e in system.get("scale", [])}):
        entries = sorted(
            (e for e in system["scale"] if e["app"] == app), key=lambda e: e["hospitals"]
        )
        counts = [e["hospitals"] for e in entries]
        seconds = [e.get("median_round_overhead_seconds") or np.nan for e in entries]
        rss = [_answering_peak(e.get("peak_rss_mib", {})) for e in entries]
        overhead.plot(counts, seconds, marker="o", label=app)
        memory.plot(counts, rss, marker="o", label=app)
    for axis, ylabel, title in (
        (overhead, "round overhead s (median)", "Round overhead"),
        (memory, "peak RSS MiB", "Peak memory: site worker, else ClientApp"),
    ):
        axis.set_xlabel("hospitals", fontsize=8)
        axis.set_ylabel(ylabel, fontsize=8)
        axis.set_title(title, fontsize=10)
        axis.set_ylim(bottom=0)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    cases = [e for e in system.get("transfer", []) if e.get("wire_bytes_per_round")]
    names = [
        f"{e['model']} {e['app'].replace('fedclinic-', '')}"
        + (" " + e["compression"] if e.get("compression", "none") != "none" else "")
        + (" " + e["wire_dtype"] if e.get("wire_dtype", "float32") != "float32" else "")
        for e in cases
    ]
    positions = np.arange(len(cases))
    for offset, key, arrow in ((-0.2, "down_bytes", "→"), (0.2, "up_bytes", "←")):
        megabytes = [e["wire_bytes_per_round"][key] / 1e6 for e in cases]
        name = key.split("_")[0]
        wire.bar(
            positions + offset, megabytes, 0.4, label=f"{name} (coordinator {arrow} hospitals)"
        )
    wire.set_xticks(positions)
    wire.set_xticklabels(names, fontsize=7, rotation=60, ha="right")  # many cases: slanted
    wire.set_yscale("log")
    wire.set_ylabel("MB on the wire per round (log)", fontsize=8)
    wire.set_title("Transfer per round, 2 hospitals", fontsize=10)
    wire.grid(axis="y", alpha=0.3)
    wire.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# ------------------------------------------------------------------------------ sections


def _protocol(results: dict[str, Any]) -> list[str]:
    lines = [f"- {item}" for item in results["protocol"]]
    lines.append(
        f"- Seeds: {', '.join(str(s) for s in results['seeds'])}; intervals are 95 % Student-t "
        "intervals over seeds (none with a single seed), not clipped to [0, 1]: with few seeds "
        "and a method that varies between seeds they can extend past 1."
    )
    lines.append(
        "- Runtime: quality sweeps run the same ServerApp strategy and ClientApp code in one "
        "process (an in-process grid hands each message to the real ClientApp handler) "
        "instead of over gRPC; the transport is benchmarked separately."
    )
    for algorithm, reason in results["not_run"].items():
        lines.append(f"- **{label(algorithm, results)}: {reason}.**")
    for failure in results.get("failed_runs", []):
        lines.append(
            f"- **{label(failure['algorithm'], results)}, seed {failure['seed']} failed** "
            f"({failure['failure']}); its row is over the seeds that finished."
        )
    return lines


def _tuning(results: dict[str, Any]) -> list[str]:
    """The options tried at the first seed and the one chosen on validation data."""
    lines: list[str] = []
    for algorithm, tried in results.get("tuning", {}).items():
        keys = sorted({k for t in tried for k in t["options"]})
        lines += [
            f"{label(algorithm, results)}'s options were chosen before the seeds ran: each "
            f"candidate below ran at seed {results['seeds'][0]} (tuning runs, kept apart), and "
            "the one whose best round has the highest mean **validation** balanced accuracy "
            "over the hospitals (what model selection maximises) was then run afresh at every "
            "seed, the tuning seed included: no tuning run is reported as a result. No test "
            "split was read for the choice.",
            "",
            "| " + " | ".join(f"`{k}`" for k in keys) + " | validation score | chosen |",
            "|" + "---|" * (len(keys) + 2),
        ]
        for t in tried:
            cells = [str(t["options"].get(k, "")) for k in keys]
            score = t["validation_score"]
            shown = f"{score:.3f}" if math.isfinite(score) else "-"
            if t.get("failure"):  # the run failed (a diverged candidate): never chosen
                shown = "failed: " + t["failure"].replace("|", "/")[:120]
            lines.append(f"| {' | '.join(cells)} | {shown} | {'yes' if t['chosen'] else ''} |")
        lines.append("")
    return lines


def portable_command(command: str) -> str:
    """The recorded command with its ``--out`` folder written ``DIR``: the committed report
    should not name a folder of the machine that ran it."""
    return re.sub(r"(--out )('[^']*'|\S+)", r"\1DIR", command)


def _runtime(results: dict[str, Any]) -> list[str]:
    per_algorithm: dict[str, float] = {}
    for run in results["runs"]:
        per_algorithm[run["algorithm"]] = per_algorithm.get(run["algorithm"], 0.0) + run["seconds"]
    for algorithm, tried in results.get("tuning", {}).items():  # the chosen one is counted
        extra = sum(t["seconds"] for t in tried if not t["chosen"])
        per_algorithm[algorithm] = per_algorithm.get(algorithm, 0.0) + extra
    env = results.get("environment", {})
    parts = ", ".join(f"{label(a, results)} {minutes(s)}" for a, s in per_algorithm.items())
    return [
        f"Command: `{portable_command(results['command'])}`",
        "",
        f"Measured wall time: **{minutes(results['seconds'])}** for {len(results['runs'])} runs "
        f"(setup {minutes(results.get('setup_seconds', 0.0))}; {parts}) on "
        f"{env.get('cpus', '?')} shared CPU cores, torch {env.get('torch', '?')}, "
        f"{env.get('torch_threads', '?')} torch thread"
        + (
            f"; 1-minute load average {load[0]} at the start and {load[1]} at the end (other "
            "work shared the cores, so read these as upper bounds)."
            if (load := env.get("load_average_1min"))
            else "."
        ),
    ]


def heart_section(results: dict[str, Any], plots: Path, relative: str) -> list[str]:
    summary = {row["algorithm"]: row for row in results["summary"]}
    hospitals = results["hospitals"]
    majority = results.get("majority_rule", {})
    federated = results.get("suite") == "heart-federated"
    title = "Fed-Heart-Disease, normalisation = federated" if federated else "Fed-Heart-Disease"
    lines = [f"## {title} ({results['mode']} mode)", ""]
    lines += [*_protocol(results), ""]
    like = results.get("like_for_like_hospitals", hospitals)
    header = [
        "Method",
        "Deployed models",
        "Client-avg accuracy",
        "Pooled-test accuracy",
        "Client-avg ROC-AUC",
        "Client-avg balanced acc.",
        f"Like for like ({', '.join(CENTRE_NAMES.get(h, h) for h in like)}): accuracy",
        *[CENTRE_NAMES.get(h, h) for h in hospitals],
    ]
    rows = []
    for algorithm in results["algorithms"]:
        row = summary[algorithm]
        rows.append(
            [
                f"**{label(algorithm, results)}** (ours)",
                deployed_models(results, algorithm),
                interval(row.get("client_avg_test_accuracy")),
                interval(row.get("pooled_test_accuracy")),
                interval(row.get("client_avg_test_auc")),
                interval(row.get("client_avg_test_balanced_accuracy")),
                interval(row.get("like_mean_test_accuracy")),
                *[interval(row.get(f"{h}:test_accuracy"), 2) for h in hospitals],
            ]
        )
    if majority:
        rows.append(
            [
                "Per-centre majority rule (computed on this split)",
                "-",
                f"{majority['client_avg_accuracy']:.3f} (reference: {REFERENCE_MAJORITY})",
                f"{majority['pooled_accuracy']:.3f}",
                "0.5 (constant score)",
                "0.500",
                "-",
                *[f"{majority['per_centre'].get(h, math.nan):.2f}" for h in hospitals],
            ]
        )
    for name, mean, sd, pooled, centres in FLAMBY_HEART:
        rows.append(
            [f"FLamby {name} (published)", "-", f"{mean:.4f} ± {sd:.4f} sd", f"{pooled:.4f}",
             "not published", "not published", "-", *[f"{c:.2f}" for c in centres]]
        )  # fmt: skip
    lines += table(header, rows)
    lines += [
        "",
        "Ours: mean [95 % interval] over seeds of the final model (FLamby protocol: no "
        "validation split). Client-avg = unweighted mean over the 4 centres' test sets "
        "(FLamby's metric); pooled-test accuracy = accuracy on the 4 test sets concatenated "
        "(each centre evaluated with the model it deploys). ROC-AUC and balanced accuracy are "
        "client-averaged. FLamby rows: mean ± standard deviation over seeds (not an interval), "
        "aggregated from FLamby's published result files (`owkin/FLamby@edacf54`, "
        "`flamby/results/results_benchmark_fed_heart_disease/`). FedHelp's large centres "
        "deploy a private "
        "model of another class (the MLP); the like-for-like column averages the centres where "
        "every method deploys the logistic regression.",
        "",
        "Reading notes: FedProx with mu = 0.01 is indistinguishable from FedAvg here, as in "
        "FLamby (their lines coincide in the plot). Local-only is each centre's own model on its "
        "own test set, unlike FLamby's 'Local i' rows (one centre's model on every centre). "
        "pFedNet with logistic regression has no shared part, so its round is the personal "
        "phase alone, which trains without evaluating: only its final model is scored (one "
        "point in the curves). Our pooled model matches FLamby's pooled-test accuracy but "
        "scores higher client-averaged; a plausible cause (assessment, not checked against "
        "FLamby's code) is that FLamby scores the pooled model on per-centre test sets "
        "normalised with each centre's own statistics, while ours uses the pooled statistics "
        "it was trained with.",
        "",
    ]
    for metric in ("test_accuracy",):
        prefix = str(results.get("suite", "heart")).replace("-", "_")
        curves, bars = f"{prefix}_curves_{metric}.png", f"{prefix}_bars_{metric}.png"
        plot_curves(results, metric, plots / curves)
        plot_bars(results, metric, plots / bars)
        lines += [
            f"![per-round curves]({relative}/{curves})",
            "",
            f"![per-centre bars]({relative}/{bars})",
            "",
        ]
    lines += [*_runtime(results), ""]
    return lines


def _layout(results: dict[str, Any]) -> list[str]:
    """The hospitals' sizes (against the targets) and class mixes, as a table."""
    targets, layout = results.get("targets", {}), results.get("layout", {})
    small = ", ".join(results["small_hospitals"])
    lines = ["| Hospital | share of train split (target) | train+val normal / pneumonia | "
             "test normal / pneumonia |", "|---|---|---|---|"]  # fmt: skip
    for h in results["hospitals"]:
        target = f" ({targets[h]:.0%})" if h in targets else ""
        entry = layout.get(h)
        if entry is None:  # results written before the layout was recorded
            lines.append(f"| {h} | {results['shares'][h]:.1%}{target} | - | - |")
            continue
        dev, test = entry["development_class_counts"], entry["test_class_counts"]
        lines.append(
            f"| {h} | {entry['share']:.1%}{target} | {' / '.join(map(str, dev))} "
            f"({dev[0] / max(sum(dev), 1):.0%} normal) | {' / '.join(map(str, test))} |"
        )
    return [*lines, "", f"Small hospitals (under 10 % of the data): {small}."]


def deployed_models(results: dict[str, Any], algorithm: str) -> str:
    """What each hospital deploys under a method: the architecture and its kind, hospitals
    named where the class differs (FedHelp's large hospitals deploy a private model)."""
    settings = results.get("settings", {}).get(algorithm, {})
    kinds: dict[str, list[str]] = {}
    ran = [r["seed"] for r in results["per_hospital"] if r["algorithm"] == algorithm]
    seed = results["seeds"][0] if results["seeds"][0] in ran or not ran else ran[0]
    for row in results["per_hospital"]:
        if row["algorithm"] == algorithm and row["seed"] == seed:
            kinds.setdefault(row.get("model") or "?", []).append(row["hospital"])
    base = settings.get("model", "?")
    names = {
        "large": f"private {settings.get('fedhelp.large-model', '?')}",
        "global": f"global {base}",
        "local": f"own {base}",
        "personal": f"personalised {base}",
        "pooled": f"pooled {base}",
    }
    if len(kinds) == 1:
        return names.get(next(iter(kinds)), next(iter(kinds)))
    return "; ".join(f"{', '.join(h)}: {names.get(k, k)}" for k, h in sorted(kinds.items()))


def pneumonia_section(results: dict[str, Any], plots: Path, relative: str) -> list[str]:
    summary = {row["algorithm"]: row for row in results["summary"]}
    hospitals = results["hospitals"]
    suite = results["suite"]
    title = {
        "pneumonia-skew": "strong label skew",
        "pneumonia-skew-heldout": "strong label skew, held-out test from the train share",
        "pneumonia-privacy": "hospitals with differential privacy (DP-SGD)",
    }.get(suite, "hospitals")
    lines = [f"## PneumoniaMNIST {title} ({results['mode']} mode)", ""]
    lines += [*_protocol(results), ""]
    lines += [*_layout(results), ""]
    lines += _tuning(results)
    like = results.get("like_for_like_hospitals", hospitals)
    large = results.get("large_model_hospitals", [])
    header = [
        "Method",
        "Deployed models",
        "Client-avg balanced acc.",
        "Worst-hospital balanced acc.",
        "Client-avg AUC",
        f"Like for like ({', '.join(like)}): balanced acc.",
        "Small hospitals: balanced acc.",
        "Small: gain over local-only (bal. acc.)",
        "Small: gain over local-only (AUC)",
        "One-class models",
    ]
    rows = []
    seeds = len(results["seeds"])
    for algorithm in results["algorithms"]:
        row = summary[algorithm]
        one = row.get("one_class_test") or {}
        count = round((one.get("mean") or 0.0) * seeds)
        rows.append(
            [
                f"**{label(algorithm, results)}**",
                deployed_models(results, algorithm),
                interval(row.get("client_avg_test_balanced_accuracy")),
                interval(row.get("worst_test_balanced_accuracy")),
                interval(row.get("client_avg_test_auc")),
                interval(row.get("like_mean_test_balanced_accuracy")),
                interval(row.get("small_mean_test_balanced_accuracy")),
                signed(row.get("small_gain_test_balanced_accuracy")),
                signed(row.get("small_gain_test_auc")),
                f"{count} of {seeds * len(hospitals)}",
            ]
        )
    lines += table(header, rows)
    lines += [
        "",
        f"Deployed models: under FedHelp, {', '.join(large) or 'no hospital'} deploy a private "
        "large model of another class than every other method's; the like-for-like column "
        "averages only the hospitals where every method deploys the run's own architecture. "
        "One-class models: hospital x seed results whose model predicts a single class for "
        "the whole test split (per-class recalls 1 and 0), of all hospital x seed results.",
        "",
        "Per-hospital test balanced accuracy / ROC-AUC (mean over seeds):",
        "",
    ]
    one_class: dict[tuple[str, str], int] = {}
    for entry in results["per_hospital"]:
        if entry.get("one_class_test"):
            key = (entry["algorithm"], entry["hospital"])
            one_class[key] = one_class.get(key, 0) + 1
    per_rows = []
    for algorithm in results["algorithms"]:
        row = summary[algorithm]
        per_rows.append(
            [label(algorithm, results)]
            + [
                f"{_mean(row, f'{h}:test_balanced_accuracy')}"
                + (f" †{one_class[(algorithm, h)]}" if (algorithm, h) in one_class else "")
                + f" / {_mean(row, f'{h}:test_auc')}"
                for h in hospitals
            ]
        )
    lines += table(["Method", *hospitals], per_rows)
    if one_class:
        lines += [
            "",
            "†k: at k of the seeds this hospital's reported model predicts one class for its "
            "whole test split.",
        ]
    if suite.startswith("pneumonia-skew"):
        lines += ["", *skew_tables(results), *recall_table(results)]
    if results.get("privacy"):
        lines += ["", *privacy_table(results)]
    lines += [
        "",
        "Each hospital's model chosen on validation data (the round with the best mean "
        "validation balanced accuracy over hospitals), then scored on the hospital's test share. "
        "Gain = the method's minus local-only's score on the same hospital and seed, averaged "
        "over the small hospitals. No published federated numbers exist for this split; the "
        "MedMNIST v2 paper reports centralised results on the official test split (best "
        "accuracy 0.946, Google AutoML Vision); that is a different setting (all training data "
        "in one place, larger models), so it is context, not an anchor.",
        "",
    ]
    prefix = {
        "pneumonia-skew": "skew",
        "pneumonia-skew-heldout": "skew_heldout",
        "pneumonia-privacy": "privacy",
    }.get(suite, "pneumonia")
    for metric in ("test_balanced_accuracy", "test_auc"):
        bars = f"{prefix}_bars_{metric}.png"
        plot_bars(results, metric, plots / bars)
        lines += [f"![per-hospital bars]({relative}/{bars})", ""]
    curves = f"{prefix}_curves_test_balanced_accuracy.png"
    plot_curves(results, "test_balanced_accuracy", plots / curves)
    lines += [f"![per-round curves]({relative}/{curves})", ""]
    lines += [*_runtime(results), ""]
    return lines


def privacy_table(results: dict[str, Any]) -> list[str]:
    """The privacy suite: per method its target ε, noise, the ε the hospitals' ledgers
    reached, balanced accuracy, and what DP costs per round against the same algorithm
    without DP."""
    privacy = results["privacy"]
    summary = {row["algorithm"]: row for row in results["summary"]}

    def number(value: Any, digits: int = 2, suffix: str = "") -> str:
        ok = isinstance(value, int | float) and math.isfinite(value)
        return f"{value:.{digits}f}{suffix}" if ok else "-"

    rows = []
    for method in results["algorithms"]:
        entry = privacy["methods"].get(method, {})
        spent = entry.get("spent_epsilon") or {}
        rows.append(
            [
                label(method, results),
                number(entry.get("epsilon"), 0) if entry.get("epsilon") else "no DP",
                number(entry.get("noise_multiplier"), 3),
                number(max(spent.values()), 2) if spent else "-",
                interval(summary.get(method, {}).get("client_avg_test_balanced_accuracy")),
                interval(summary.get(method, {}).get("worst_test_balanced_accuracy")),
                number(entry.get("train_seconds_per_round"), 2),
                number(entry.get("train_cost_ratio"), 2, " x"),
                number(entry.get("wall_seconds_per_round"), 2),
                number(entry.get("wall_cost_ratio"), 2, " x"),
            ]
        )
    header = [
        "Method",
        "Target ε",
        "σ",
        "ε spent (most at a hospital)",
        "Client-avg balanced acc.",
        "Worst-hospital balanced acc.",
        "Hospital training s / round",
        "Training (x reference)",
        "Wall s / round",
        "Wall (x reference)",
    ]
    return [
        f"Differential privacy (δ = {privacy['delta']:g}; docs/privacy.md): σ is the noise "
        "multiplier chosen for the target ε; ε spent is the largest any hospital's ledger "
        "reached (its own data set, every DP step of the run composed). Hospital training "
        "seconds per round are summed over the hospitals (each trains in turn in process); "
        "each cost is a ratio to the reference: the same algorithm without DP, or, for a "
        "SecAgg+ row, the same row without secure aggregation (four exchanges a round: keys, "
        "shares, masked sums, unmasking; its cost shows in the wall seconds, the hospitals' "
        "training seconds leave the masking out).",
        "",
        *table(header, rows),
        "",
    ]


def _mean(row: dict[str, Any], key: str, digits: int = 2, sign: bool = False) -> str:
    cell = row.get(key) or {}
    if cell.get("mean") is None:
        return "n/a"
    return f"{cell['mean']:{'+' if sign else ''}.{digits}f}"


def meets_target(row: dict[str, Any], reference: str, hospitals: list[str], margin: float) -> bool:
    """Issue 16's bar: no hospital (of ``hospitals``) more than ``margin`` balanced accuracy
    below ``reference`` on the mean over seeds, and above it on the client average."""
    gaps = [row.get(f"{h}:gap_{reference}_test_balanced_accuracy") or {} for h in hospitals]
    client = row.get(f"client_avg_gap_{reference}_test_balanced_accuracy") or {}
    if client.get("mean") is None or any(g.get("mean") is None for g in gaps):
        return False
    return all(g["mean"] >= -margin for g in gaps) and client["mean"] > 0


def recall_table(results: dict[str, Any]) -> list[str]:
    """Per-class recall on the validation and on the test splits (mean over hospitals and
    seeds): where the test split is shifted against the train split, the two differ for
    every model, and no choice made on validation data can see it."""
    rows = []
    for algorithm in results["algorithms"]:
        entries = [r for r in results["per_hospital"] if r["algorithm"] == algorithm]
        cells = []
        for split in ("val", "test"):
            recalls = [r.get(f"{split}_recall") for r in entries if r.get(f"{split}_recall")]
            if not recalls:
                return []  # results written before recalls were recorded
            values = np.array([[np.nan if v is None else v for v in r] for r in recalls], float)
            cells += [f"{np.nanmean(values[:, c]):.2f}" for c in range(values.shape[1])]
        rows.append([label(algorithm, results), *cells])
    classes = len(rows[0]) // 2 if rows else 0
    names = ["normal", "pneumonia"] if classes == 2 else [f"class {c}" for c in range(classes)]
    header = ["Method", *[f"val recall {n}" for n in names], *[f"test recall {n}" for n in names]]
    return [
        "Per-class recall of the reported models on the validation and the test splits (mean "
        "over hospitals and seeds):",
        "",
        *table(header, rows),
        "",
    ]


def skew_tables(results: dict[str, Any]) -> list[str]:
    """Each method against each local-only reference at the hospitals whose test split holds
    both classes: balanced accuracy (gap), the client average, and the target's verdict."""
    summary = {row["algorithm"]: row for row in results["summary"]}
    both, margin = results["both_classes_hospitals"], results["margin"]
    lines: list[str] = []
    for reference in results.get("references", []):
        lines += [
            f"Against {label(reference, results)}: test balanced accuracy, mean over seeds, with "
            f"the gap to {label(reference, results)} on the same hospital and seed in brackets, "
            f"at the hospitals whose test split holds both classes ({', '.join(both)}); a gap "
            f"below -{margin:g} is in bold. Target (issue 16): no such gap, and a client-average "
            "gap above 0.",
            "",
        ]
        rows = []
        for algorithm in results["algorithms"]:
            if algorithm == reference:
                continue
            row = summary[algorithm]
            cells = []
            for h in both:
                gap = (row.get(f"{h}:gap_{reference}_test_balanced_accuracy") or {}).get("mean")
                text = (
                    f"{_mean(row, f'{h}:test_balanced_accuracy')} "
                    f"({_mean(row, f'{h}:gap_{reference}_test_balanced_accuracy', sign=True)})"
                )
                cells.append(f"**{text}**" if gap is not None and gap < -margin else text)
            client = (
                f"{_mean(row, 'client_avg_test_balanced_accuracy', 3)} "
                f"({_mean(row, f'client_avg_gap_{reference}_test_balanced_accuracy', 3, True)})"
            )
            verdict = "yes" if meets_target(row, reference, both, margin) else "no"
            rows.append([label(algorithm, results), *cells, client, verdict])
        ref = summary.get(reference, {})
        rows.append(
            [f"*{label(reference, results)}*"]
            + [_mean(ref, f"{h}:test_balanced_accuracy") for h in both]
            + [_mean(ref, "client_avg_test_balanced_accuracy", 3), "-"]
        )
        lines += table(["Method", *both, "Client avg (gap)", "Meets target"], rows)
        lines.append("")
    return lines


def render(results_dir: Path, out: Path, plots: Path) -> str:
    """Write the plots and return the Markdown text."""
    plots.mkdir(parents=True, exist_ok=True)
    relative = os.path.relpath(plots, out.resolve().parent)
    found = {}
    for suite in SUITES:
        path = results_dir / suite / "results.json"
        if path.is_file():
            found[suite] = json.loads(path.read_text())
    if not found:
        from fedclinic.errors import ConfigError

        raise ConfigError(
            f"no results in '{results_dir}': expected <suite>/results.json for a suite of "
            f"{', '.join(SUITES)} (written by 'fedclinic bench quality')"
        )
    lines = [
        "# Benchmarks",
        "",
        "Generated by `fedclinic bench report` from the results of `fedclinic bench quality`; "
        "every number below comes from those files (nothing is typed in by hand except the "
        "published anchors, which are labelled).",
        "",
    ]
    for suite, results in found.items():
        if results.get("reduced"):
            lines += [
                f"**REDUCED run ({suite}): {results['reduced']}; every other setting is the "
                "full mode's.**",
                "",
            ]
    reduced = [s for s, r in found.items() if r["mode"] != "full"]
    if reduced:
        lines += [
            f"**Quick mode ({', '.join(reduced)}): a smoke test, not a benchmark; the numbers "
            "below are not comparable with the anchors.**",
            "",
        ]
    for suite in SUITES:
        if suite not in found:
            continue
        if suite in PNEUMONIA_SUITES:
            lines += pneumonia_section(found[suite], plots, relative)
        else:
            lines += heart_section(found[suite], plots, relative)
    lines += runtime_sections(results_dir, plots, relative)
    return "\n".join(lines).rstrip() + "\n"


#: the accuracy gate and the runtime benchmarks (real processes over gRPC) write a Markdown
#: section of their own
RUNTIME_SECTIONS = (
    ("gate", "Accuracy gate (CI)"),
    ("system", "Runtime cost on the real deployment runtime (gRPC + TLS)"),
    ("load", "Load: many hospitals on one machine"),
)


def runtime_sections(results_dir: Path, plots: Path, relative: str | None = None) -> list[str]:
    """The sections ``bench system`` and ``bench load`` wrote (``<results>/<name>/<name>.md``,
    kept beside the plots so a later report without those results still shows them), with
    the cost plots drawn from ``system.json``. A ``notes.md`` beside a section (what else ran
    on the machine, say) is added under it, labelled as typed in by hand."""
    lines: list[str] = []
    plots.mkdir(parents=True, exist_ok=True)
    for name, title in RUNTIME_SECTIONS:
        fresh, kept = results_dir / name / f"{name}.md", plots / f"{name}.md"
        if fresh.is_file() and fresh.resolve() != kept.resolve():
            shutil.copyfile(fresh, kept)
        notes, kept_notes = results_dir / name / "notes.md", plots / f"{name}_notes.md"
        if notes.is_file() and notes.resolve() != kept_notes.resolve():
            shutil.copyfile(notes, kept_notes)
        if kept.is_file():
            body = kept.read_text(encoding="utf-8").strip()
            lines += [f"## {title}", "", body, ""]
            if kept_notes.is_file():  # typed by whoever ran it: labelled as such
                text = " ".join(kept_notes.read_text(encoding="utf-8").split())
                lines += [f"Conditions of this measurement, noted by whoever ran it: {text}", ""]
            data, kept_data = results_dir / name / f"{name}.json", plots / f"{name}.json"
            if data.is_file() and data.resolve() != kept_data.resolve():
                shutil.copyfile(data, kept_data)
            if name == "system" and kept_data.is_file():
                image = plots / "system_costs.png"
                plot_system(json.loads(kept_data.read_text()), image)
                where = relative if relative is not None else os.path.relpath(plots)
                lines += [f"![runtime costs]({where}/{image.name})", ""]
    return lines


def report_command(args: argparse.Namespace) -> int:
    """Handler of ``fedclinic bench report``: 0 done, 2 no results."""
    from fedclinic.errors import FedClinicError

    plots = args.plots or args.out.resolve().parent / "docs" / "bench"
    try:
        text = render(args.results, args.out, plots)
    except FedClinicError as err:
        print(f"fedclinic bench report: {err}", file=sys.stderr)
        return 2
    args.out.write_text(text, encoding="utf-8")
    for suite in SUITES:  # the small tables travel with the plots
        for name in ("summary.csv", "per_hospital.csv"):
            source = args.results / suite / name
            if source.is_file():
                shutil.copyfile(source, plots / f"{suite}_{name}")
    print(f"wrote {args.out} and plots in {plots}")
    return 0
