"""``fedclinic bench quality``: does the model get better for every hospital?

Two suites on real medical data, each run as many seeds x algorithms, in process
(:mod:`fedclinic.bench.grid`: the real strategy and ClientApp code, no gRPC):

- ``heart``: Fed-Heart-Disease with FLamby's protocol (``../shared/REFERENCE-RESULTS.md``
  section 2): logistic regression, 4 centres, 15 rounds x 100 SGD steps of batch 4, client lr
  1e-3 (FedProx mu 0.01), seeds 42-46; local and pooled baselines with FLamby's Adam 1e-3,
  batch 4, 50 epochs. FLamby has no validation split, so every run reports its final model.
- ``pneumonia``: PneumoniaMNIST split into 6 hospitals of very unequal size with Dirichlet
  label skew (the ``medmnist`` source's partition mode); validation from each hospital's own
  train share, each tested on its share of the official test split; 3 seeds; models selected
  on validation data only.

Results land in ``<out>/<suite>/``: one results directory per run under ``runs/`` (what the
strategy writes), and ``results.json``, ``per_hospital.csv``, ``summary.csv`` and
``curves.csv`` aggregated from them. ``fedclinic bench report`` renders them.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedclinic.bench.grid import run_federation
from fedclinic.bench.pooled import PooledData, heart_pooled, hospital_union, run_pooled
from fedclinic.errors import FedClinicError

#: the shared reference data beside the checkout (``../shared/data``), read in place, never
#: copied; ``FEDCLINIC_SHARED_DATA`` points elsewhere
SHARED_DATA = Path(
    os.environ.get(
        "FEDCLINIC_SHARED_DATA", Path(__file__).resolve().parents[2].parent / "shared" / "data"
    )
)
HEART_DIR = SHARED_DATA / "heart_disease"
PNEUMONIA_FILE = SHARED_DATA / "pneumoniamnist.npz"
HEART_CENTRES = ("cleveland", "hungarian", "switzerland", "va")
PNEUMONIA_FRACTIONS = (0.40, 0.30, 0.12, 0.08, 0.06, 0.04)
PNEUMONIA_ALPHA = 0.5
#: the partition's data-seed is the first from 0 up that gives every hospital at least this
#: many test images of each class (labels only), so that every hospital's balanced accuracy
#: and AUC are defined; strong skew leaves some small hospitals without a class otherwise
PNEUMONIA_MIN_TEST_PER_CLASS = 5
#: hospitals holding less than this share of the pooled train split are "small"
SMALL_SHARE = 0.10
MOCO_STEPS = 200
ALL_ALGORITHMS = ("local-only", "pooled", "fedavg", "fedprox", "fedhelp", "pfednet", "fedmas")
#: FedHelp's open design choices (FH-3 heads; the ranking loss's batch reduction, which with
#: the reference's sum grows with the batch size: the reference's batch is 4, ours 32), tried
#: at the first seed and chosen on validation data; the reference's settings come first
FEDHELP_CANDIDATES = [
    {"fedhelp.head-init": head, "fedhelp.rank-reduction": reduction}
    for head in ("fresh", "global", "kept")
    for reduction in ("sum", "mean")
]
#: the metrics aggregated per hospital (test split of the model chosen on validation data)
METRICS = ("test_accuracy", "test_balanced_accuracy", "test_auc")


@dataclass
class Plan:
    """One suite in one mode: what runs, with which settings, on which hospitals."""

    suite: str
    mode: str
    seeds: tuple[int, ...]
    algorithms: tuple[str, ...]
    base: dict[str, Any]
    per_algorithm: dict[str, dict[str, Any]]
    hospitals: list[dict[str, Any]]
    shares: dict[str, float]
    not_run: dict[str, str] = field(default_factory=dict)
    protocol: list[str] = field(default_factory=list)
    pooled_data: PooledData = hospital_union
    #: per-algorithm extra hospital keys (public data, knowledge file, prior)
    node_extra: dict[str, dict[str, Any]] = field(default_factory=dict)
    setup_seconds: float = 0.0
    #: target size fractions (pneumonia), beside the realised ``shares``
    targets: dict[str, float] = field(default_factory=dict)
    #: per hospital: share, class counts of its train+val and of its test split (pneumonia)
    layout: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: what was cut from the full protocol, when ``--rounds`` overrides it
    reduced: str = ""
    #: per algorithm, option sets tried at the first seed; the one with the best validation
    #: score is used for every seed (never a test split: see :func:`validation_score`)
    candidates: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    #: what the choice saw: per algorithm, each candidate with its validation score
    tuning: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def flat(self, algorithm: str, seed: int) -> dict[str, Any]:
        flat = {**self.base, **self.per_algorithm.get(algorithm, {}), "seed": seed}
        flat["algorithm"] = "fedavg" if algorithm == "pooled" else algorithm
        flat["run-name"] = f"{algorithm}-seed{seed}"
        return flat


# ------------------------------------------------------------------------------ heart


def heart_plan(mode: str, work: Path) -> Plan:
    """FLamby's Fed-Heart-Disease protocol (quick: 1 seed, 2 rounds of 10 steps, 3 methods)."""
    quick = mode == "quick"
    hospitals = [
        {
            "hospital": centre,
            "data-source": "heart-disease",
            "data-path": str(HEART_DIR / f"processed.{centre}.data"),
            "device": "cpu",
        }
        for centre in HEART_CENTRES
    ]
    base = {
        "model": "logreg",
        "data-source": "heart-disease",
        "num-features": 13,
        "num-classes": 2,
        "min-hospitals": len(hospitals),
        "optimizer": "sgd",
        "momentum": 0.0,
        "learning-rate": 0.001,
        "batch-size": 4,
        "rounds": 2 if quick else 15,
        "local-steps": 10 if quick else 100,
    }
    # FLamby's local and pooled baselines: Adam lr 1e-3, batch 4, 50 epochs (one per round)
    adam_epochs = {
        "optimizer": "adam",
        "learning-rate": 0.001,
        "local-steps": 0,
        "local-epochs": 1,
        "rounds": 2 if quick else 50,
    }
    quick_algorithms = ("local-only", "pooled", "fedavg", "fedhelp", "fedmas")
    algorithms = quick_algorithms if quick else ALL_ALGORITHMS
    return Plan(
        suite="heart",
        mode=mode,
        seeds=(42,) if quick else (42, 43, 44, 45, 46),
        algorithms=algorithms,
        base=base,
        per_algorithm={
            "local-only": adam_epochs,
            "pooled": adam_epochs,
            "fedprox": {"fedprox.proximal-mu": 0.01},
            "fedhelp": HEART_FEDHELP,
            "fedmas": HEART_FEDMAS,
        },
        hospitals=hospitals,
        shares={},
        pooled_data=heart_pooled,
        protocol=[
            "Data: UCI Heart Disease, FLamby's Fed-Heart-Disease preprocessing and split "
            "(data source `heart-disease`), per-centre z-scoring with the centre's train "
            "statistics (pooled: pooled train statistics, as FLamby).",
            f"Federated methods: {base['rounds']} rounds x {base['local-steps']} local SGD steps "
            f"(lr {base['learning-rate']}, no momentum) at batch size {base['batch-size']}, all "
            "4 centres every round; FedProx mu 0.01; pFedNet with its defaults (logreg: the "
            "whole model is personal).",
            f"Local-only and pooled: FLamby's baseline protocol, Adam lr 1e-3, batch 4, "
            f"{adam_epochs['rounds']} epochs (local-only: one epoch per round).",
            "FLamby has no validation split: every run reports its final model (nothing is "
            "chosen on test data), and no option is tuned.",
            "FedHelp without public data (`fedhelp.knowledge = \"none\"`): no public table "
            "with these 13 features exists outside the four centres, and using a centre's rows "
            "as 'public' would move patient data between sites, so the one-time knowledge "
            "(modules 3.2-3.3's public step) is left out and only the asymmetric dual "
            "distillation runs: the 2 largest centres (by training rows) keep a private MLP "
            "(`fedhelp.large-model = mlp`), the others are small; `head-init = global`, chosen "
            "before any run because a logistic regression is all head: a fresh head would "
            "discard the received model every round.",
            "Fed-MAS on a logistic regression (`model = logreg`: the 13 features are the "
            "backbone, the task head is the deployed linear model) with a seeded random frozen "
            "tabular encoder as the prior (`fedmas.prior-source = random`, `prior-arch = mlp`): "
            "MAS-2's last substitute, **degraded** — no self-supervised tabular encoder can be "
            "pretrained without public data.",
        ],
    )


#: heart: FedHelp's dual distillation without public data (see the protocol text)
HEART_FEDHELP = {
    "fedhelp.knowledge": "none",
    "fedhelp.num-large": 2,
    "fedhelp.large-model": "mlp",
    "fedhelp.head-init": "global",
}
#: heart: Fed-MAS with a random tabular prior (MAS-2 substitute 4, degraded)
HEART_FEDMAS = {"fedmas.prior-source": "random", "fedmas.prior-arch": "mlp"}


def majority_rule() -> dict[str, Any]:
    """Predict each centre's train-majority class on its test split (REFERENCE-RESULTS 2.7).

    Computed from the same split the benchmark uses, not copied: it is the bar a per-centre
    bias term alone reaches.
    """
    from fedclinic.data.heart_disease import read_centre

    per_centre, correct, total = {}, 0, 0
    for centre in HEART_CENTRES:
        data = read_centre(HEART_DIR / f"processed.{centre}.data")
        majority = int(np.bincount(data.labels[data.train], minlength=2).argmax())
        test = data.labels[data.test]
        per_centre[centre] = float((test == majority).mean())
        correct += int((test == majority).sum())
        total += len(test)
    return {
        "client_avg_accuracy": float(np.mean(list(per_centre.values()))),
        "pooled_accuracy": correct / total,
        "per_centre": per_centre,
    }


# ------------------------------------------------------------------------------ pneumonia


def pneumonia_names() -> list[str]:
    return [f"h{i + 1}" for i in range(len(PNEUMONIA_FRACTIONS))]


def official_labels() -> tuple[np.ndarray, np.ndarray]:
    """The labels of the official train and test splits (no image is kept)."""
    from fedclinic.data.medmnist import read_npz

    arrays = read_npz(PNEUMONIA_FILE)
    return tuple(arrays[f"{s}_labels"].reshape(-1).astype(np.int64) for s in ("train", "test"))


def partition_layout(
    hospitals: list[dict[str, Any]],
    flat: dict[str, Any],
    data_seed: int,
    labels: tuple[np.ndarray, np.ndarray],
) -> dict[str, dict[str, Any]]:
    """Each hospital's share of the official train split and its class counts, per split.

    Computed by the data source's own partitioner from the labels alone (no image, no result
    is read): what the report shows, and what picks the data-seed.
    """
    from fedclinic.config import parse_hospital_config
    from fedclinic.data import DataRequest
    from fedclinic.data.medmnist import partition_plan
    from strategies import load_run_config

    train, test = labels
    run = load_run_config({**flat, "algorithm": "fedavg"})
    classes = run.num_classes
    layout = {}
    for node in hospitals:
        request = DataRequest(run, parse_hospital_config({**node, "data-seed": data_seed}))
        plan = partition_plan(train, test, request)
        development = np.concatenate([plan["train"], plan["val"]])
        layout[node["hospital"]] = {
            "share": len(development) / len(train),
            "development_class_counts": np.bincount(train[development], minlength=classes).tolist(),
            "test_class_counts": np.bincount(test[plan["test"]], minlength=classes).tolist(),
        }
    return layout


def pick_data_seed(
    hospitals: list[dict[str, Any]], flat: dict[str, Any], labels: tuple[np.ndarray, np.ndarray]
) -> int:
    """The first data-seed whose partition gives every hospital both classes in its test split
    (at least ``PNEUMONIA_MIN_TEST_PER_CLASS`` images each); labels only."""
    for seed in range(1000):
        layout = partition_layout(hospitals, flat, seed, labels)
        fewest = min(min(h["test_class_counts"]) for h in layout.values())
        if fewest >= PNEUMONIA_MIN_TEST_PER_CLASS:
            return seed
    raise FedClinicError("bench quality pneumonia: no data-seed below 1000 fits the partition")


def pneumonia_plan(mode: str, work: Path) -> Plan:
    """Six unequal hospitals from PneumoniaMNIST (quick: 1 seed, 2 rounds of 3 steps)."""
    quick = mode == "quick"
    names = pneumonia_names()
    fractions = ",".join(f"{f:g}" for f in PNEUMONIA_FRACTIONS)
    hospitals = [
        {
            "hospital": name,
            "data-source": "medmnist",
            "data-path": str(PNEUMONIA_FILE),
            "partition-id": i,
            "num-partitions": len(names),
            "partition-fractions": fractions,
            "label-skew-alpha": PNEUMONIA_ALPHA,
            "device": "cpu",
        }
        for i, name in enumerate(names)
    ]
    rounds = 2 if quick else 20
    base: dict[str, Any] = {
        "model": "cnn",
        "data-source": "medmnist",
        "num-classes": 2,
        "in-channels": 1,
        "image-size": 28,
        "min-hospitals": len(hospitals),
        "optimizer": "adam",
        "learning-rate": 0.001,
        "batch-size": 32,
        "rounds": rounds,
        "local-epochs": 1,
        "local-steps": 3 if quick else 0,
    }
    labels = official_labels()
    data_seed = pick_data_seed(hospitals, base, labels)
    hospitals = [{**node, "data-seed": data_seed} for node in hospitals]
    layout = partition_layout(hospitals, base, data_seed, labels)
    plan = Plan(
        suite="pneumonia",
        mode=mode,
        seeds=(42,) if quick else (42, 43, 44),
        algorithms=("local-only", "pooled", "fedavg") if quick else ALL_ALGORITHMS,
        base=base,
        per_algorithm={
            "fedprox": {"fedprox.proximal-mu": 0.01},
            "fedhelp": {"fedhelp.num-large": 2, "fedhelp.large-model": "wide-cnn"},
            "fedmas": {"fedmas.prior-arch": "cnn"},
            # public images; small hospitals have fewer than 784 (docs/pfednet.md, PF-1)
            "pfednet": {"pfednet.allow-rank-deficient-sketch": True},
        },
        candidates={} if quick else {"fedhelp": FEDHELP_CANDIDATES},
        hospitals=hospitals,
        shares={name: entry["share"] for name, entry in layout.items()},
        layout=layout,
        targets=dict(zip(names, PNEUMONIA_FRACTIONS, strict=True)),
        protocol=[
            "Data: PneumoniaMNIST (28x28 chest X-rays, 2 classes). The official train split is "
            f"divided into {len(names)} hospitals with size fractions {fractions} and Dirichlet "
            f"label skew (alpha {PNEUMONIA_ALPHA}: each hospital's class mix drawn from "
            "Dirichlet(alpha x K x pooled mix), then fitted so that the sizes follow the "
            "fractions and every image is used; the `medmnist` source's partition mode). "
            f"data-seed {data_seed}: the first seed from 0 up that gives every hospital at "
            f"least {PNEUMONIA_MIN_TEST_PER_CLASS} test images of each class, chosen from the "
            "labels alone. Each hospital carves its validation split (10 %, stratified) from "
            "its own share and is tested on its share of the official test split (same "
            "per-class shares). The official val split is given to no hospital.",
            f"All methods: the small CNN (`model = cnn`), Adam lr 1e-3, batch 32, {rounds} rounds "
            + (
                "of 3 local steps (quick mode)."
                if quick
                else "of one local epoch each; pooled: "
                f"{rounds} epochs on the union of the hospitals' train splits."
            ),
            "Model selection: the round (pooled: epoch) with the best mean validation balanced "
            "accuracy over the hospitals; test splits are never used to choose anything.",
        ],
    )
    return plan


def pneumonia_setup(plan: Plan, work: Path) -> None:
    """FedHelp's knowledge file and Fed-MAS's prior, both from the official *val* split.

    No simulated hospital holds the official val split, so it can serve as the public data
    without moving any hospital's records: FedHelp's teacher (FH-2 substitute: a CNN trained
    once on the labelled public images) and Fed-MAS's MoCo-v2 prior (MAS-2 substitute 3:
    self-supervised on the same images, labels unused) are built from it once, here.
    """
    started = time.perf_counter()
    if "fedhelp" in plan.algorithms:
        from fedclinic.knowledge import build_knowledge

        knowledge = work / "knowledge.npz"
        digest, _ = build_knowledge(
            PNEUMONIA_FILE, knowledge, split="val", train_teacher_network="cnn", epochs=10
        )
        plan.per_algorithm["fedhelp"]["fedhelp.knowledge-sha256"] = digest
        plan.node_extra["fedhelp"] = {
            "public-data-path": str(PNEUMONIA_FILE),
            "knowledge-path": str(knowledge),
        }
        plan.protocol.append(
            "FedHelp: the 2 largest hospitals are large (private `wide-cnn`), the others small; "
            "public data = the official val split (524 images, held by no hospital); knowledge "
            "file from a CNN teacher trained once on it (FH-2 substitute: no foundation model "
            "is available offline)."
        )
    if "fedmas" in plan.algorithms:
        import torch

        from fedclinic.data.medmnist import read_npz
        from fedclinic.prior import MocoSettings, save_prior, train_moco

        images = torch.from_numpy(read_npz(PNEUMONIA_FILE)["val_images"]).float()[:, None] / 255
        state, stats = train_moco(images, MocoSettings(arch="cnn", steps=MOCO_STEPS, seed=0))
        prior = work / "prior.pt"
        digest = save_prior(
            prior,
            "cnn",
            state,
            {"tool": "fedclinic bench", "images": "pneumoniamnist official val split",
             "steps": MOCO_STEPS, "final_loss": stats["final_loss"]},
        )  # fmt: skip
        plan.per_algorithm["fedmas"]["fedmas.prior-sha256"] = digest
        plan.node_extra["fedmas"] = {"prior-path": str(prior)}
        plan.protocol.append(
            "Fed-MAS: `cnn` backbone; prior = a small conv encoder pretrained once with MoCo-v2 "
            f"({MOCO_STEPS} steps) on the official val images without labels (MAS-2 substitute "
            "3: the MoCo ResNet-50 checkpoint cannot be downloaded here)."
        )
    plan.setup_seconds = time.perf_counter() - started


def make_plan(suite: str, mode: str, work: Path, rounds: int = 0) -> Plan:
    """The suite's plan; ``rounds`` > 0 cuts every federated run to that many rounds
    (recorded as ``reduced`` and printed in the report)."""
    plan = heart_plan(mode, work) if suite == "heart" else pneumonia_plan(mode, work)
    if rounds:
        full = plan.base["rounds"]
        plan.base["rounds"] = rounds
        for settings in plan.per_algorithm.values():
            if "rounds" in settings:
                settings["rounds"] = rounds
        plan.reduced = f"rounds cut from {full} to {rounds} (time budget of the session)"
        plan.protocol.append(f"**REDUCED: {plan.reduced}.**")
    if suite == "pneumonia":
        pneumonia_setup(plan, work)
    return plan


# ------------------------------------------------------------------------------ running


def check_data(suite: str) -> None:
    """Refuse early, with one line, when the shared data is not where the suite reads it."""
    path = HEART_DIR if suite == "heart" else PNEUMONIA_FILE
    if not path.exists():
        raise FedClinicError(f"bench quality {suite}: data not found at {path}")


def run_suite(
    suite: str,
    mode: str,
    out: Path,
    progress: Callable[[str], None] | None = None,
    rounds: int = 0,
) -> dict[str, Any]:
    """Run every (algorithm, seed) of the suite, then aggregate; return ``results.json``."""
    check_data(suite)
    directory = out / suite
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    started = time.perf_counter()
    load_start = os.getloadavg()[0]
    with single_thread(), tempfile.TemporaryDirectory(prefix="fedclinic-bench-") as scratch:
        work = Path(scratch)
        plan = make_plan(suite, mode, work, rounds)

        def execute(algorithm: str, flat: dict[str, Any], target: Path, state: Path) -> float:
            """One run into ``target``; its site state lives in ``state`` and is deleted."""
            nodes = [
                {
                    **node,
                    **plan.node_extra.get(algorithm, {}),
                    "state-dir": str(state / node["hospital"]),
                }
                for node in plan.hospitals
            ]
            run_started = time.perf_counter()
            if algorithm == "pooled":
                run_pooled(flat, nodes, target, plan.pooled_data)
            else:
                run_federation(flat, nodes, target)
            shutil.rmtree(state, ignore_errors=True)
            return time.perf_counter() - run_started

        # Options chosen on validation data at the first seed; that run is kept as the seed's.
        done: dict[tuple[str, int], tuple[Path, float]] = {}
        for algorithm, candidates in plan.candidates.items():
            if algorithm not in plan.algorithms:
                continue
            seed, tried = plan.seeds[0], []
            for index, options in enumerate(candidates):
                if progress:
                    progress(f"{suite}: {algorithm} candidate {index + 1}/{len(candidates)}")
                target = directory / "tuning" / algorithm / f"candidate-{index + 1}"
                flat = {**plan.flat(algorithm, seed), **options}
                seconds = execute(algorithm, flat, target, work / "state" / f"tune-{index}")
                tried.append({"options": options, "validation_score": validation_score(target),
                              "dir": target, "seconds": seconds})  # fmt: skip
            best = max(tried, key=lambda t: t["validation_score"])  # ties: the first listed
            plan.per_algorithm.setdefault(algorithm, {}).update(best["options"])
            done[(algorithm, seed)] = (best["dir"], best["seconds"])
            plan.tuning[algorithm] = [
                {**t, "dir": str(t["dir"].relative_to(directory)), "chosen": t is best}
                for t in tried
            ]
        jobs = [(a, s) for a in plan.algorithms for s in plan.seeds]
        runs: list[dict[str, Any]] = []
        for algorithm, seed in jobs:
            target = directory / "runs" / algorithm / f"seed-{seed}"
            if (algorithm, seed) in done:  # the chosen candidate is this very run
                chosen, seconds = done[(algorithm, seed)]
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copytree(chosen, target)
            else:
                if progress:
                    progress(f"{suite}: {algorithm} seed {seed}")
                flat = plan.flat(algorithm, seed)
                seconds = execute(algorithm, flat, target, work / "state" / f"{algorithm}-{seed}")
            runs.append(
                {
                    "algorithm": algorithm,
                    "seed": seed,
                    "dir": str(target.relative_to(directory)),
                    "seconds": seconds,
                }
            )
    results = aggregate(plan, directory, runs)
    results["seconds"] = time.perf_counter() - started
    results["environment"] = {
        **environment(),
        "load_average_1min": [round(load_start, 2), round(os.getloadavg()[0], 2)],
    }
    extra = ("--rounds", str(rounds)) if rounds else ()
    results["command"] = "fedclinic bench quality " + " ".join(
        shlex.quote(a) for a in ("--suite", suite, "--mode", mode, *extra, "--out", str(out))
    )
    write_results(directory, results)
    return results


@contextmanager
def single_thread() -> Iterator[None]:
    """One torch thread: these models are tiny, and on a shared 2-core machine intra-op
    threads spin against other processes (a 4-sample BCE step took 10 ms instead of 30 us)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------ aggregation


def validation_score(run_dir: Path) -> float:
    """What model selection maximises: the best round's mean validation balanced accuracy
    over the hospitals (evaluate rows only; test metrics are not read)."""
    _, rows = read_run(run_dir)
    per_round: dict[int, list[float]] = {}
    for row in rows:
        value = row.get("val_balanced_accuracy")
        if isinstance(value, int | float) and math.isfinite(value):
            per_round.setdefault(int(row["model_round"]), []).append(float(value))
    means = [float(np.mean(v)) for v in per_round.values() if v]
    return max(means) if means else -math.inf


def t_interval(values: list[float]) -> dict[str, Any]:
    """Mean and 95 % Student-t interval over seeds (``None`` bounds with fewer than 2)."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return {"mean": None, "low": None, "high": None, "n": 0, "sd": None}
    mean = float(np.mean(finite))
    if len(finite) < 2:
        return {"mean": mean, "low": None, "high": None, "n": len(finite), "sd": None}
    from scipy import stats

    sd = float(np.std(finite, ddof=1))
    half = float(stats.t.ppf(0.975, len(finite) - 1)) * sd / math.sqrt(len(finite))
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": len(finite), "sd": sd}


def _number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) else math.nan


def read_run(directory: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A run's ``summary.json`` and its evaluation rows from ``metrics.jsonl``."""
    summary = json.loads((directory / "summary.json").read_text())
    rows = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]
    return summary, [r for r in rows if r.get("kind") == "evaluate"]


def aggregate(plan: Plan, directory: Path, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-hospital rows, per-round curves and per-method intervals over seeds."""
    per_hospital: list[dict[str, Any]] = []
    curves: list[dict[str, Any]] = []
    for run in runs:
        summary, rows = read_run(directory / run["dir"])
        run["selected_round"] = summary.get("selected_round")
        run["selection_note"] = summary.get("selection_note")
        for name, entry in sorted(summary["hospitals"].items()):
            chosen = entry.get("selected") or entry.get("final") or {}
            per_hospital.append(
                {
                    "algorithm": run["algorithm"],
                    "seed": run["seed"],
                    "hospital": name,
                    "model": entry.get("model"),
                    "num_test": chosen.get("num_test"),
                    **{m: _number(chosen.get(m)) for m in METRICS},
                }
            )
        for row in rows:
            curves.append(
                {
                    "algorithm": run["algorithm"],
                    "seed": run["seed"],
                    "hospital": row["hospital"],
                    "model_round": row["model_round"],
                    **{
                        k: _number(row.get(k))
                        for k in ("val_balanced_accuracy", "val_auc", *METRICS)
                    },
                }
            )
    hospitals = [n["hospital"] for n in plan.hospitals]
    small = [h for h in hospitals if plan.shares.get(h, 1.0) < SMALL_SHARE]
    summary_rows = summarise(plan.algorithms, plan.seeds, hospitals, small, per_hospital)
    results: dict[str, Any] = {
        "suite": plan.suite,
        "mode": plan.mode,
        "seeds": list(plan.seeds),
        "algorithms": list(plan.algorithms),
        "not_run": plan.not_run,
        "hospitals": hospitals,
        "shares": plan.shares,
        "targets": plan.targets,
        "layout": plan.layout,
        "tuning": plan.tuning,
        "reduced": plan.reduced,
        "small_hospitals": small,
        "protocol": plan.protocol,
        "settings": {a: plan.flat(a, plan.seeds[0]) for a in plan.algorithms},
        "runs": runs,
        "setup_seconds": plan.setup_seconds,
        "summary": summary_rows,
        "per_hospital": per_hospital,
        "curves": curves,
        "runtime": "in process: the same ServerApp strategy and ClientApp handler, no gRPC",
    }
    if plan.suite == "heart":
        results["majority_rule"] = majority_rule()
    return results


def summarise(
    algorithms: tuple[str, ...],
    seeds: tuple[int, ...],
    hospitals: list[str],
    small: list[str],
    per_hospital: list[dict[str, Any]],
) -> list[dict[str, Any]]:
    """One row per method: each headline metric's mean and 95 % interval over seeds."""
    table = {(r["algorithm"], r["seed"], r["hospital"]): r for r in per_hospital}
    out = []
    for algorithm in algorithms:
        per_seed: dict[str, list[float]] = {}

        def add(name: str, value: float, store: dict[str, list[float]] = per_seed) -> None:
            store.setdefault(name, []).append(value)

        for seed in seeds:
            rows = [table[(algorithm, seed, h)] for h in hospitals if (algorithm, seed, h) in table]
            if not rows:
                continue
            for metric in METRICS:
                values = [r[metric] for r in rows]
                add(f"client_avg_{metric}", float(np.nanmean(values)))
                add(f"worst_{metric}", float(np.nanmin(values)))
            counts = [r["num_test"] or 0 for r in rows]
            accuracy = [r["test_accuracy"] for r in rows]
            add("pooled_test_accuracy", float(np.dot(accuracy, counts) / max(sum(counts), 1)))
            for hospital in hospitals:
                row = table.get((algorithm, seed, hospital))
                if row:
                    for metric in METRICS:
                        add(f"{hospital}:{metric}", row[metric])
            if small:
                gains = {}
                for metric in ("test_balanced_accuracy", "test_auc"):
                    pairs = [
                        (
                            table[(algorithm, seed, h)][metric],
                            table[("local-only", seed, h)][metric],
                        )
                        for h in small
                        if (algorithm, seed, h) in table and ("local-only", seed, h) in table
                    ]
                    if pairs:
                        gains[metric] = float(np.nanmean([a - b for a, b in pairs]))
                        add(f"small_gain_{metric}", gains[metric])
                    add(
                        f"small_mean_{metric}",
                        float(np.nanmean([table[(algorithm, seed, h)][metric] for h in small])),
                    )
        out.append({"algorithm": algorithm, **{k: t_interval(v) for k, v in per_seed.items()}})
    return out


def write_results(directory: Path, results: dict[str, Any]) -> None:
    """``results.json`` plus CSV views a spreadsheet opens."""
    from fedclinic.results import write_json

    write_json(directory / "results.json", results)
    _csv(directory / "per_hospital.csv", results["per_hospital"])
    _csv(directory / "curves.csv", results["curves"])
    flat = []
    for row in results["summary"]:
        for key, value in row.items():
            if key != "algorithm":
                flat.append({"algorithm": row["algorithm"], "metric": key, **value})
    _csv(directory / "summary.csv", flat)


def _csv(path: Path, rows: list[dict[str, Any]]) -> None:
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


# ------------------------------------------------------------------------------ CLI


def quality_command(args: argparse.Namespace) -> int:
    """Handler of ``fedclinic bench quality``: 0 done, 1 a run failed, 2 bad input."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from fedclinic.errors import ConfigError

    suites = ["heart", "pneumonia"] if args.suite == "all" else [args.suite]
    console = Console(stderr=True)
    try:
        for suite in suites:
            plan = (heart_plan if suite == "heart" else pneumonia_plan)(args.mode, Path("."))
            total = len(plan.algorithms) * len(plan.seeds)
            with Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total} runs"),
                TimeElapsedColumn(),
                console=console,
                transient=False,
            ) as bar:
                task = bar.add_task(f"{suite}: setup", total=total)
                started: list[bool] = []

                def step(
                    description: str,
                    task: Any = task,
                    bar: Any = bar,
                    started: list[bool] = started,
                ) -> None:
                    if started:
                        bar.advance(task)
                    started.append(True)
                    bar.update(task, description=description)

                results = run_suite(suite, args.mode, args.out, step, args.rounds)
                bar.update(task, completed=total, description=f"{suite}: done")
            console.print(
                f"{suite}: {len(results['runs'])} runs in {results['seconds']:.1f} s -> "
                f"{args.out / suite / 'results.json'}"
            )
    except ConfigError as err:
        print(f"fedclinic bench quality: {err}", file=sys.stderr)
        return 2
    except FedClinicError as err:
        print(f"fedclinic bench quality: {err}", file=sys.stderr)
        return 1
    return 0


def environment() -> dict[str, Any]:
    """Where the numbers were measured (the report prints it beside the runtimes)."""
    import platform

    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "torch_threads": 1,
    }
