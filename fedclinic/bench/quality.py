"""``fedclinic bench quality``: does the model get better for every hospital?

Three suites on real medical data, each run as many seeds x methods, in process
(:mod:`fedclinic.bench.grid`: the real strategy and ClientApp code, no gRPC):

- ``heart``: Fed-Heart-Disease with FLamby's protocol (``owkin/FLamby@edacf54``,
  ``flamby/datasets/fed_heart_disease``, ``flamby/config_heart_disease.json``): logistic
  regression, 4 centres, 15 rounds x 100 SGD steps of batch 4, client lr 1e-3 (FedProx mu
  0.01), seeds 42-46; local and pooled baselines with FLamby's Adam 1e-3, batch 4, 50 epochs.
  FLamby has no validation split, so every run reports its final model.
- ``pneumonia``: PneumoniaMNIST split into 6 hospitals of very unequal size with Dirichlet
  label skew (the ``medmnist`` source's partition mode); validation from each hospital's own
  train share, each tested on its share of the official test split; 3 seeds; models selected
  on validation data only. Beside the methods, controls for FedHelp's public data: FedAvg
  whose small hospitals also train on the labelled public set, a pooled+public model, and
  FedHelp with a cross-fitted knowledge file (:mod:`fedclinic.bench.crossfit`); Fed-MAS with
  FedAvg weights (``fedmas.aggregation = avg``) beside MAS.
- ``pneumonia-skew``: the same images split with strong label skew (the FedHelp reference's
  size fractions 0.6..0.02, Dirichlet alpha 0.3) where every seed algorithm, with its default
  options, is compared hospital by hospital with local-only; local-only and FedAvg also run
  with balanced softmax (``<algo>.local-loss = "bsm"``, FedHelp's and pFedNet's default) so
  that the loss is not what the comparison measures.

A method is a registered algorithm with fixed options (``Plan.runs_as``); its key names the
row (``fedavg-public``, ``fedhelp-crossfit``, ...).

Decision IDs (FH-n, MAS-n, PF-n) are defined in docs/fedhelp.md, docs/fedmas.md and
docs/pfednet.md (section "Decisions").

Results land in ``<out>/<suite>/``: one results directory per run under ``runs/`` (what the
strategy writes), and ``results.json``, ``per_hospital.csv``, ``summary.csv`` and
``curves.csv`` aggregated from them. ``fedclinic bench report`` renders them.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import math
import os
import shlex
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedclinic import opacus_backend
from fedclinic.bench.crossfit import build_cross_fitted_knowledge
from fedclinic.bench.grid import run_federation
from fedclinic.bench.pooled import (
    Evaluation,
    PooledData,
    heart_pooled,
    hospital_union,
    run_pooled,
)
from fedclinic.bench.suites import PNEUMONIA_SUITES, SUITES
from fedclinic.config import RunConfig, parse_hospital_config
from fedclinic.data import DataRequest, Split
from fedclinic.data.medmnist import partition_plan, read_npz
from fedclinic.data.splits import stratified_split
from fedclinic.datasets import SHARED
from fedclinic.errors import ConfigError, FedClinicError
from fedclinic.knowledge import build_knowledge, public_inputs, read_public_data
from fedclinic.prior import MocoSettings, save_prior, train_moco
from fedclinic.privacy import Steps, epsilon
from fedclinic.training import poisson_plan
from strategies import get_algorithm, load_run_config

#: the shared reference data (``../shared/data`` beside the checkout, or
#: ``$FEDCLINIC_SHARED_DATA``): the project's one lookup, :data:`fedclinic.datasets.SHARED`
SHARED_DATA = SHARED
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
#: the strong-skew case: the FedHelp reference's client fractions (medfed_code sampling.py),
#: Dirichlet alpha 0.3; its data-seed is the first that leaves every hospital at least this
#: many test / validation images of each class (from the labels alone; no seed below 300
#: gives 5 test images of each class at the 2 % hospital)
SKEW_FRACTIONS = (0.60, 0.20, 0.08, 0.06, 0.04, 0.02)
SKEW_ALPHA = 0.3
SKEW_MIN_TEST_PER_CLASS = 3
SKEW_MIN_VAL_PER_CLASS = 2
#: the "no worse than local-only" margin of issue 16 (balanced accuracy, mean over seeds)
SKEW_MARGIN = 0.02
#: the strong-skew case evaluated on held-out images of the hospitals' own (train) share
HELD_OUT = "pneumonia-skew-heldout"
HELD_OUT_VAL = 0.1
HELD_OUT_TEST = 0.2
#: cross-fitted knowledge: folds of the public set
CROSS_FIT_FOLDS = 5
#: methods that are not a registered algorithm under their own name: what they run as, with
#: which options, and the label the tables print
CONTROLS: dict[str, tuple[str, dict[str, Any], str]] = {
    "pooled-public": ("pooled", {}, "Pooled + public labelled set"),
    "fedavg-public": ("fedavg", {}, "FedAvg, small hospitals + public labelled set"),
    "fedhelp-crossfit": ("fedhelp", {}, "FedHelp, cross-fitted knowledge"),
    "fedmas-avg": ("fedmas", {"fedmas.aggregation": "avg"}, "Fed-MAS, FedAvg weights"),
    "local-only-bsm": (
        "local-only",
        {"local-only.local-loss": "bsm"},
        "Local-only, balanced softmax",
    ),
    "fedavg-bsm": ("fedavg", {"fedavg.local-loss": "bsm"}, "FedAvg, balanced softmax"),
}
#: FedHelp's open design choices (FH-3 heads; the ranking loss's batch reduction, which with
#: the reference's sum grows with the batch size: the reference's batch is 4, ours 32), tried
#: at the first seed and chosen on validation data; the reference's settings come first
FEDHELP_CANDIDATES = [
    {"fedhelp.head-init": head, "fedhelp.rank-reduction": reduction}
    for head in ("fresh", "global", "kept")
    for reduction in ("sum", "mean")
]
#: the DP suite (issue 23): the ``pneumonia`` partition with DP-SGD at each target ε
PRIVACY = "pneumonia-privacy"
PRIVACY_EPSILONS = (1.0, 3.0, 8.0)
PRIVACY_DELTA = 1e-5
#: every algorithm that trains under DP (docs/privacy.md, section 1)
PRIVACY_ALGORITHMS = ("local-only", "fedavg", "fedprox", "fedhelp", "pfednet", "fedmas")
PRIVACY_CLIP = 1.0
#: the DP rows' optimiser: Adam's second moment is the DP noise's variance and barely moves
#: (fedclinic.privacy.optimizer_warning); SGD's learning rate chosen on validation data only
#: (FedAvg at ε = 8, seed 42, 20 rounds; client-average validation balanced accuracy: SGD
#: 0.03 -> 0.801, 0.1 -> 0.844, 0.3 -> 0.777, Adam 1e-3 -> 0.500); docs/privacy.md, section 9
PRIVACY_OPTIMIZER = {"optimizer": "sgd", "learning-rate": 0.1, "momentum": 0.9}
#: algorithms whose DP learning rate is chosen in the suite itself (validation data, at the
#: largest ε, first seed): their distillation and two-phase losses are not FedAvg's (FedHelp's
#: diverged to NaN at ε 1 with 0.1)
PRIVACY_TUNED = ("fedhelp", "pfednet", "fedmas")
PRIVACY_RATES = (0.01, 0.03, 0.1)
#: models or phases charged per round on a hospital's data beyond one (FedHelp's large
#: hospitals: proxy and large model; pFedNet: shared and personal phase), as an upper bound
PRIVACY_CHARGES = {"fedhelp": 2, "pfednet": 2}
PRIVACY_LABELS = {
    "local-only": "Local-only",
    "fedavg": "FedAvg",
    "fedprox": "FedProx",
    "fedhelp": "FedHelp",
    "pfednet": "pFedNet",
    "fedmas": "Fed-MAS",
}
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
    #: a ``candidates`` key that is a method, not an algorithm: the methods its choice
    #: applies to (the privacy suite tunes each DP algorithm at one ε for all its ε)
    tuned_together: dict[str, tuple[str, ...]] = field(default_factory=dict)
    #: per method, hospital -> node config replacing that hospital's (FedAvg + public data)
    node_override: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    #: per method, the pooled data builder when not ``pooled_data`` (pooled + public data)
    pooled_for: dict[str, PooledData] = field(default_factory=dict)
    #: table labels of methods whose key is not a label of its own (report.LABELS)
    labels: dict[str, str] = field(default_factory=dict)
    #: methods of this suite only: key -> (the method whose settings it starts from, extra
    #: settings); the privacy suite's ``<algorithm>-dp-eps<ε>``
    variants: dict[str, tuple[str, dict[str, Any]]] = field(default_factory=dict)
    #: the privacy suite: per DP method, its target ε and the noise chosen for it
    privacy: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: the privacy suite: per SecAgg+ method, the method it adds secure aggregation to
    secagg: dict[str, str] = field(default_factory=dict)

    def tuned_by_choice_of(self, key: str) -> tuple[str, ...]:
        """The methods that take the options chosen for ``candidates[key]``."""
        if key in self.tuned_together:
            return self.tuned_together[key]
        return tuple(m for m in self.algorithms if self.runs_as(m) == key)

    def runs_as(self, method: str) -> str:
        """The registered algorithm (or ``pooled``) a method runs."""
        if method in self.variants:
            return self.runs_as(self.variants[method][0])
        return CONTROLS[method][0] if method in CONTROLS else method

    def flat(self, method: str, seed: int) -> dict[str, Any]:
        algorithm = self.runs_as(method)
        if method in self.variants:
            parent, extra = self.variants[method]
            options = {**self.flat(parent, seed), **extra}
        else:
            options = CONTROLS[method][1] if method in CONTROLS else {}
        flat = {**self.base, **options, **self.per_algorithm.get(method, {}), "seed": seed}
        flat["algorithm"] = "fedavg" if algorithm == "pooled" else algorithm
        flat["run-name"] = f"{method}-seed{seed}"
        return flat

    def nodes(self, method: str, state: Path) -> list[dict[str, Any]]:
        """The hospitals' node configs for one run of ``method``, site state under ``state``."""
        override = self.node_override.get(method, {})
        return [
            {
                **override.get(node["hospital"], node),
                **self.node_extra.get(method, {}),
                "state-dir": str(state / node["hospital"]),
            }
            for node in self.hospitals
        ]


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
        labels={
            "fedhelp": "FedHelp, dual distillation only",
            "fedmas": "Fed-MAS (degraded: logistic regression, random prior)",
        },
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
            'FedHelp without public data (`fedhelp.knowledge = "none"`): no public table '
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
    """Predict each centre's train-majority class on its test split (client average 0.721).

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


def pneumonia_names(fractions: tuple[float, ...] = PNEUMONIA_FRACTIONS) -> list[str]:
    return [f"h{i + 1}" for i in range(len(fractions))]


def official_labels() -> tuple[np.ndarray, np.ndarray]:
    """The labels of the official train and test splits (no image is kept)."""
    arrays = read_npz(PNEUMONIA_FILE)
    train, test = (arrays[f"{s}_labels"].reshape(-1).astype(np.int64) for s in ("train", "test"))
    return train, test


def hospital_plan(
    node: dict[str, Any], flat: dict[str, Any], labels: tuple[np.ndarray, np.ndarray]
) -> dict[str, np.ndarray]:
    """Row numbers of one hospital's train / val (official train split) and test rows, from
    the data source's own partitioner (labels only)."""
    run = load_run_config({**flat, "algorithm": "fedavg"})
    return partition_plan(*labels, DataRequest(run, parse_hospital_config(node)))


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
    train, test = labels
    classes = int(flat["num-classes"])
    layout = {}
    for node in hospitals:
        rows = hospital_plan({**node, "data-seed": data_seed}, flat, labels)
        development = np.concatenate([rows["train"], rows["val"]])
        layout[node["hospital"]] = {
            "share": len(development) / len(train),
            "development_class_counts": np.bincount(train[development], minlength=classes).tolist(),
            "val_class_counts": np.bincount(train[rows["val"]], minlength=classes).tolist(),
            "test_class_counts": np.bincount(test[rows["test"]], minlength=classes).tolist(),
        }
    return layout


def pick_data_seed(
    hospitals: list[dict[str, Any]],
    flat: dict[str, Any],
    labels: tuple[np.ndarray, np.ndarray],
    min_test: int = PNEUMONIA_MIN_TEST_PER_CLASS,
    min_val: int = 0,
) -> int:
    """The first data-seed whose partition leaves every hospital at least ``min_test`` test
    and ``min_val`` validation images of each class; labels only."""
    for seed in range(1000):
        layout = partition_layout(hospitals, flat, seed, labels)
        if all(
            min(h["test_class_counts"]) >= min_test and min(h["val_class_counts"]) >= min_val
            for h in layout.values()
        ):
            return seed
    raise FedClinicError("bench quality pneumonia: no data-seed below 1000 fits the partition")


#: data-seeds found by :func:`pick_data_seed`, per (fractions, alpha, min test, min val)
DATA_SEEDS: dict[tuple[Any, ...], int] = {}


def pneumonia_plan(mode: str, work: Path, suite: str = "pneumonia") -> Plan:
    """Six unequal PneumoniaMNIST hospitals (quick: 1 seed, 2 rounds of 3 steps).

    ``pneumonia``: the benchmark's fractions and alpha 0.5, every method and the public-data
    and Fed-MAS controls, FedHelp's FH-3 / ranking options chosen on validation data.
    ``pneumonia-skew``: the strong-skew case, every method with its default options against
    local-only hospital by hospital, local-only and FedAvg with both local losses.
    """
    quick, skew = mode == "quick", suite in ("pneumonia-skew", HELD_OUT)
    fractions = SKEW_FRACTIONS if skew else PNEUMONIA_FRACTIONS
    alpha = SKEW_ALPHA if skew else PNEUMONIA_ALPHA
    min_test = SKEW_MIN_TEST_PER_CLASS if skew else PNEUMONIA_MIN_TEST_PER_CLASS
    min_val = SKEW_MIN_VAL_PER_CLASS if skew else 0
    names = pneumonia_names(fractions)
    text = ",".join(f"{f:g}" for f in fractions)
    hospitals = [
        {
            "hospital": name,
            "data-source": "medmnist",
            "data-path": str(PNEUMONIA_FILE),
            "partition-id": i,
            "num-partitions": len(names),
            "partition-fractions": text,
            "label-skew-alpha": alpha,
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
    key = (fractions, alpha, min_test, min_val)
    if key not in DATA_SEEDS:  # a few hundred partitions: found once per process
        DATA_SEEDS[key] = pick_data_seed(hospitals, base, labels, min_test, min_val)
    data_seed = DATA_SEEDS[key]
    hospitals = [{**node, "data-seed": data_seed} for node in hospitals]
    layout = partition_layout(hospitals, base, data_seed, labels)
    if suite == HELD_OUT:
        algorithms: tuple[str, ...] = (
            ("local-only", "fedhelp")
            if quick
            else ("local-only", "local-only-bsm", "fedavg", "fedhelp", "pfednet")
        )
    elif skew:
        algorithms = (
            ("local-only", "local-only-bsm", "fedhelp", "pfednet")
            if quick
            else ("local-only", "local-only-bsm", "pooled", "fedavg", "fedavg-bsm", "fedhelp",
                  "pfednet", "fedmas")
        )  # fmt: skip
    else:
        algorithms = (
            ("local-only", "pooled", "fedavg")
            if quick
            else ("local-only", "pooled", "pooled-public", "fedavg", "fedavg-public", "fedprox",
                  "fedhelp", "fedhelp-crossfit", "pfednet", "fedmas", "fedmas-avg")
        )  # fmt: skip
    fedhelp = {"fedhelp.num-large": 2, "fedhelp.large-model": "wide-cnn"}
    rule = (
        f"at least {min_test} test images"
        + (f" and {min_val} validation images" if min_val else "")
        + " of each class"
    )
    plan = Plan(
        suite=suite,
        mode=mode,
        seeds=(42,) if quick else (42, 43, 44),
        algorithms=algorithms,
        base=base,
        per_algorithm={
            "fedprox": {"fedprox.proximal-mu": 0.01},
            "fedhelp": dict(fedhelp),
            "fedhelp-crossfit": dict(fedhelp),
            "fedmas": {"fedmas.prior-arch": "cnn"},
            "fedmas-avg": {"fedmas.prior-arch": "cnn"},
            # public images; small hospitals have fewer than 784 (docs/pfednet.md, PF-1)
            "pfednet": {"pfednet.allow-rank-deficient-sketch": True},
        },
        candidates={} if quick or skew else {"fedhelp": FEDHELP_CANDIDATES},
        hospitals=hospitals,
        shares={name: entry["share"] for name, entry in layout.items()},
        layout=layout,
        targets=dict(zip(names, fractions, strict=True)),
        labels={k: label for k, (_, _, label) in CONTROLS.items()},
        protocol=[
            "Data: PneumoniaMNIST (28x28 chest X-rays, 2 classes). The official train split is "
            f"divided into {len(names)} hospitals with size fractions {text} and Dirichlet "
            f"label skew (alpha {alpha}: each hospital's class mix drawn from "
            "Dirichlet(alpha x K x pooled mix), then fitted so that the sizes follow the "
            "fractions and every image is used; the `medmnist` source's partition mode). "
            f"data-seed {data_seed}: the first seed from 0 up that gives every hospital {rule}, "
            "chosen from the labels alone. "
            + (
                "Each hospital carves its validation and test splits from its own share (below)."
                if suite == HELD_OUT
                else "Each hospital carves its validation split (10 %, stratified) from its own "
                "share and is tested on its share of the official test split (same per-class "
                "shares)."
            )
            + " The official val split is given to no hospital.",
            f"All methods: the small CNN (`model = cnn`), Adam lr 1e-3, batch 32, {rounds} rounds "
            + (
                "of 3 local steps (quick mode)."
                if quick
                else "of one local epoch each; pooled: "
                f"{rounds} epochs on the union of the hospitals' train splits."
            ),
            "Model selection: the round (pooled: epoch) with the best mean validation balanced "
            "accuracy over the hospitals; test splits are never used to choose anything.",
            "Local losses: FedHelp and pFedNet train with their default balanced softmax "
            "(`local-loss = bsm`: cross-entropy of the logits shifted by the hospital's own log "
            "class prior; docs/fedhelp.md, docs/pfednet.md), Fed-MAS with its balanced softmax; "
            "local-only, FedAvg and FedProx with plain cross-entropy unless the row says "
            "'balanced softmax'.",
        ],
    )
    if suite == HELD_OUT:
        plan.protocol.append(
            "Held-out test (this suite): the same partition, but each hospital's test split is "
            f"carved from its own share of the official train split ({HELD_OUT_TEST:.0%}, "
            f"stratified; train {1 - HELD_OUT_TEST - HELD_OUT_VAL:.0%}, validation "
            f"{HELD_OUT_VAL:.0%}) instead of the official test split, whose images are shifted "
            "against the train split (on the `pneumonia-skew` suite every shared model, the "
            "pooled one included, has a normal-class recall of about 0.95 on validation and "
            "0.47 on the official test split). Here test and validation come from the same "
            "distribution, so the comparison with local-only is about label skew alone."
        )
    if skew:
        plan.protocol.append(
            "Every method runs with its default options (nothing tuned), FedHelp with its 2 "
            "largest hospitals large (private `wide-cnn`) and the same knowledge file as the "
            "`pneumonia` suite. The per-hospital table compares each method with local-only "
            f"at the hospitals whose test split holds both classes; a gap below -{SKEW_MARGIN} "
            "balanced accuracy (mean over seeds) is marked."
        )
    return plan


def write_held_out_hospital(
    node: dict[str, Any], flat: dict[str, Any], labels: tuple[np.ndarray, np.ndarray], out: Path
) -> dict[str, Any]:
    """One hospital of the held-out suite: its share of the official train split (its train
    and validation rows of the partition) cut again, stratified, into train / validation /
    test, as a one-partition MedMNIST file; the official test split is not used."""
    arrays = read_npz(PNEUMONIA_FILE)
    rows = hospital_plan(node, flat, labels)
    share = np.sort(np.concatenate([rows["train"], rows["val"]]))
    targets = arrays["train_labels"].reshape(-1)[share]
    fractions = [1 - HELD_OUT_VAL - HELD_OUT_TEST, HELD_OUT_VAL, HELD_OUT_TEST]
    parts = stratified_split(targets, fractions, seed=[int(node["data-seed"]), 7])
    names = ("train", "val", "test")
    picked = {split: share[part] for split, part in zip(names, parts, strict=True)}
    np.savez(
        out,
        **{f"{s}_images": arrays["train_images"][r] for s, r in picked.items()},
        **{f"{s}_labels": arrays["train_labels"][r] for s, r in picked.items()},
    )
    kept = ("hospital", "device")
    return {**{k: node[k] for k in kept}, "data-source": "medmnist", "data-path": str(out)}


def held_out_layout(plan: Plan) -> dict[str, dict[str, Any]]:
    """Shares and class counts of the held-out suite's hospital files (labels only)."""
    layout = {}
    total = len(official_labels()[0])
    for node in plan.hospitals:
        arrays = np.load(node["data-path"])
        counts = {s: np.bincount(arrays[f"{s}_labels"].reshape(-1), minlength=2).tolist()
                  for s in ("train", "val", "test")}  # fmt: skip
        development = [a + b for a, b in zip(counts["train"], counts["val"], strict=True)]
        layout[node["hospital"]] = {
            "share": (sum(development) + sum(counts["test"])) / total,
            "development_class_counts": development,
            "val_class_counts": counts["val"],
            "test_class_counts": counts["test"],
        }
    return layout


def small_by_size(plan: Plan, large: int = 2) -> list[str]:
    """FedHelp's small hospitals: all but the ``large`` largest (by share, as FedHelp ranks)."""
    ranked = sorted(plan.shares, key=lambda h: (-plan.shares[h], h))
    return sorted(ranked[large:])


def write_public_hospital(
    node: dict[str, Any], flat: dict[str, Any], labels: tuple[np.ndarray, np.ndarray], out: Path
) -> dict[str, Any]:
    """The control "small hospital + public data": the hospital's own train split plus the
    labelled public set (the official val split, the images FedHelp's small hospitals hold),
    its own validation and test splits unchanged, as a one-partition MedMNIST file."""
    arrays = read_npz(PNEUMONIA_FILE)
    rows = hospital_plan(node, flat, labels)
    images = {
        "train": np.concatenate([arrays["train_images"][rows["train"]], arrays["val_images"]]),
        "val": arrays["train_images"][rows["val"]],
        "test": arrays["test_images"][rows["test"]],
    }
    targets = {
        "train": np.concatenate([arrays["train_labels"][rows["train"]], arrays["val_labels"]]),
        "val": arrays["train_labels"][rows["val"]],
        "test": arrays["test_labels"][rows["test"]],
    }
    np.savez(
        out,
        **{f"{s}_images": images[s] for s in images},
        **{f"{s}_labels": targets[s] for s in targets},
    )
    kept = ("hospital", "device")
    return {**{k: node[k] for k in kept}, "data-source": "medmnist", "data-path": str(out)}


def public_pooled(run: Any, hospitals: list[dict[str, Any]]) -> tuple[Split, Evaluation]:
    """The union of the hospitals' train splits plus the labelled public set, once."""
    pooled, evaluation = hospital_union(run, hospitals)
    public = read_public_data(PNEUMONIA_FILE, "val")
    inputs = public_inputs(public, run.in_channels, run.image_size)
    extra = torch.from_numpy(np.asarray(public.labels, dtype=np.int64))
    joined = Split(torch.cat([pooled.inputs, inputs]), torch.cat([pooled.labels, extra]))
    return joined, evaluation


def pneumonia_setup(plan: Plan, work: Path) -> None:
    """FedHelp's knowledge files, Fed-MAS's prior and the public-data controls, all from the
    official *val* split.

    No simulated hospital holds the official val split, so it can serve as the public data
    without moving any hospital's records: FedHelp's teacher (FH-2 substitute: a CNN trained
    once on the labelled public images; in-sample, and cross-fitted for the control row),
    Fed-MAS's MoCo-v2 prior (MAS-2 substitute 3: self-supervised on the same images, labels
    unused), and the baselines' copies of the labelled public set are built from it once, here.
    """
    started = time.perf_counter()
    if plan.suite == HELD_OUT:
        labels = official_labels()
        plan.hospitals = [
            write_held_out_hospital(node, plan.base, labels, work / f"{node['hospital']}.npz")
            | {"data-seed": node["data-seed"]}
            for node in plan.hospitals
        ]
        plan.layout = held_out_layout(plan)
    public_note = (
        "FedHelp: the 2 largest hospitals are large (private `wide-cnn`, deployed there), the "
        "others small (they deploy the global `cnn`); public data = the official val split "
        "(524 labelled images, held by no hospital) at the small hospitals; knowledge file "
        "from a CNN teacher trained once on it and scoring the same images (FH-2 substitute "
        "2, in-sample)."
    )
    if any(plan.runs_as(m) == "fedhelp" for m in plan.algorithms):
        knowledge = work / "knowledge.npz"
        digest, _ = build_knowledge(
            PNEUMONIA_FILE, knowledge, split="val", train_teacher_network="cnn", epochs=10
        )
        for method in plan.algorithms:
            if plan.runs_as(method) == "fedhelp":
                plan.per_algorithm.setdefault(method, {})["fedhelp.knowledge-sha256"] = digest
                plan.node_extra[method] = {
                    "public-data-path": str(PNEUMONIA_FILE),
                    "knowledge-path": str(knowledge),
                }
        plan.protocol.append(public_note)
    if "fedhelp-crossfit" in plan.algorithms:
        crossfit = work / "knowledge-crossfit.npz"
        digest, meta = build_cross_fitted_knowledge(
            PNEUMONIA_FILE, crossfit, split="val", network="cnn", folds=CROSS_FIT_FOLDS, epochs=10
        )
        plan.per_algorithm["fedhelp-crossfit"]["fedhelp.knowledge-sha256"] = digest
        plan.node_extra["fedhelp-crossfit"]["knowledge-path"] = str(crossfit)
        plan.protocol.append(
            "FedHelp, cross-fitted knowledge (control): the same run with a knowledge file "
            f"whose every row comes from a teacher that did not see that image ({CROSS_FIT_FOLDS} "
            "stratified folds of the public set, out-of-fold accuracy "
            f"{meta['teacher_out_of_fold_accuracy']:.3f}). This is the closer stand-in for the "
            "paper's setting (arXiv 2412.19654 section 3.2: a foundation model queried once, "
            "never fitted to the public labels); the in-sample file of the FedHelp row gives "
            "probabilities fitted to the very labels the small hospitals also train on."
        )
    if "fedavg-public" in plan.algorithms:
        labels = official_labels()
        small = small_by_size(plan)
        plan.node_override["fedavg-public"] = {
            node["hospital"]: write_public_hospital(
                node, plan.base, labels, work / f"public-{node['hospital']}.npz"
            )
            for node in plan.hospitals
            if node["hospital"] in small
        }
        plan.protocol.append(
            "Public-data controls: FedAvg whose small hospitals (FedHelp's: "
            f"{', '.join(small)}) train on their own train split plus the 524 labelled public "
            "images (their validation and test splits unchanged), and a pooled model trained on "
            "the union of the hospitals' train splits plus the public set once. They see the "
            "labelled public data FedHelp's small hospitals see."
        )
    if "pooled-public" in plan.algorithms:
        plan.pooled_for["pooled-public"] = public_pooled
    if any(plan.runs_as(m) == "fedmas" for m in plan.algorithms):
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
        for method in plan.algorithms:
            if plan.runs_as(method) == "fedmas":
                plan.per_algorithm.setdefault(method, {})["fedmas.prior-sha256"] = digest
                plan.node_extra[method] = {"prior-path": str(prior)}
        plan.protocol.append(
            "Fed-MAS: `cnn` backbone; prior = a small conv encoder pretrained once with MoCo-v2 "
            f"({MOCO_STEPS} steps) on the official val images without labels (MAS-2 substitute "
            "3: the MoCo ResNet-50 checkpoint cannot be downloaded here)."
            + (
                " Fed-MAS, FedAvg weights (ablation): the same local training with the server "
                "weighting by training-set size (`fedmas.aggregation = avg`) instead of MAS's "
                "robust factors, so the gain can be split between the balanced-softmax local "
                "training and the MAS weighting."
                if "fedmas-avg" in plan.algorithms
                else ""
            )
        )
    plan.setup_seconds = time.perf_counter() - started


def heart_federated_plan(mode: str, work: Path) -> Plan:
    """Heart with ``normalisation = federated`` (docs/statistics.md): every other setting as
    :func:`heart_plan`, so its rows stand beside the FLamby-protocol ones."""
    plan = heart_plan(mode, work)
    plan.suite = "heart-federated"
    plan.base["normalisation"] = "federated"
    plan.protocol[0] = (
        "Data: UCI Heart Disease, FLamby's Fed-Heart-Disease preprocessing and split; "
        "**`normalisation = federated`**: before round 1 one statistics exchange asks each "
        "centre for the count, sum and sum of squares of its raw train features, and every "
        "centre z-scores all its splits with the pooled train mean/std (hospitals' default "
        "`stats-min-count` = 5: a 0/1 feature whose rarer value a centre holds fewer than 5 "
        "times is pooled without that centre). Pooled baseline: FLamby's pooled mode (the "
        "exact pooled train statistics), as in the FLamby-protocol suite."
    )
    return plan


def privacy_plan(mode: str, work: Path) -> Plan:
    """The ``pneumonia`` partition with DP-SGD (docs/privacy.md) at each target ε of
    :data:`PRIVACY_EPSILONS`, δ = :data:`PRIVACY_DELTA`, per algorithm that supports it,
    beside the same algorithm without DP (the reference of the DP cost). The noise multiplier
    of each DP method is chosen by :func:`set_privacy_noise` once the rounds are known.
    Quick: FedAvg at every ε and without DP, FedHelp and Fed-MAS at the largest ε."""
    quick = mode == "quick"
    plan = pneumonia_plan(mode, work, suite="pneumonia")
    plan.suite = PRIVACY
    plan.candidates = {}  # the algorithms' own options are their defaults (nothing tuned)
    for node in plan.hospitals:
        node["privacy-delta"] = PRIVACY_DELTA
    methods: list[str] = []
    for algorithm in ("fedavg", "fedhelp", "fedmas") if quick else PRIVACY_ALGORITHMS:
        full = not quick or algorithm == "fedavg"
        if full:
            methods.append(algorithm)
        for target in PRIVACY_EPSILONS if full else PRIVACY_EPSILONS[-1:]:
            method = f"{algorithm}-dp-eps{target:g}"
            extra: dict[str, Any] = {
                "dp": "dp-sgd",
                "dp-max-grad-norm": PRIVACY_CLIP,
                **PRIVACY_OPTIMIZER,
            }
            if algorithm == "fedmas":  # its projector's BatchNorm1d becomes GroupNorm
                extra["privacy-fix-model"] = True
            plan.variants[method] = (algorithm, extra)
            plan.privacy[method] = {"algorithm": algorithm, "epsilon": target}
            plan.labels[method] = f"{PRIVACY_LABELS[algorithm]}, DP ε = {target:g}"
            methods.append(method)
    # what secure aggregation costs a round, alone and on top of DP (FedAvg: its masked
    # sum is the whole aggregation; docs/privacy.md, section 7)
    for reference in ("fedavg", f"fedavg-dp-eps{PRIVACY_EPSILONS[-1]:g}"):
        method = f"{reference}-secagg"
        plan.variants[method] = (reference, {"secure-aggregation": True})
        plan.secagg[method] = reference
        plan.labels[method] = f"{plan.labels.get(reference, PRIVACY_LABELS['fedavg'])}, SecAgg+"
        methods.insert(methods.index(reference) + 1, method)
    plan.algorithms = tuple(methods)
    if not quick:  # each distillation / two-phase algorithm's own DP learning rate
        top = PRIVACY_EPSILONS[-1]
        for algorithm in PRIVACY_TUNED:
            key = f"{algorithm}-dp-eps{top:g}"
            plan.candidates[key] = [{"learning-rate": rate} for rate in PRIVACY_RATES]
            plan.tuned_together[key] = tuple(
                m for m, e in plan.privacy.items() if e["algorithm"] == algorithm
            )
    plan.protocol.append(
        "Differential privacy (docs/privacy.md): DP-SGD at every hospital (Opacus: Poisson "
        f"batches of expected size {plan.base['batch-size']}, each sample's gradient clipped to "
        f"{PRIVACY_CLIP:g}, Gaussian noise), for every training step on private data: "
        "FedHelp's surrogate, proxy and large-model steps, Fed-MAS's local steps (its projector "
        "with GroupNorm, `privacy-fix-model = true`), both pFedNet phases. Per target ε "
        f"(δ = {PRIVACY_DELTA:g}) the noise multiplier is Opacus's `get_noise_multiplier` (RDP) "
        "for each hospital's sample rate (batch / its training rows) and its steps over the "
        "whole run (rounds x steps per round x models or phases charged per round: 2 for "
        "FedHelp and pFedNet), the largest over the hospitals, so that no hospital's ledger "
        "passes the target; the ε each ledger reached is reported. Methods whose loss is the "
        "balanced softmax (FedHelp, pFedNet, Fed-MAS) also release their training class counts "
        "once per run (Gaussian mechanism, `dp-prior-noise` "
        f"{RunConfig.model_fields['dp_prior_noise'].default:g}; docs/privacy.md, section 2), "
        "composed with the steps within the same target. DP rows train with SGD "
        f"(learning rate {PRIVACY_OPTIMIZER['learning-rate']:g}, momentum "
        f"{PRIVACY_OPTIMIZER['momentum']:g}; chosen on validation data only, FedAvg at ε = 8, "
        "seed 42: Adam's steps vanish under DP noise; "
        f"{', '.join(PRIVACY_LABELS[a] for a in PRIVACY_TUNED)} choose their own learning rate "
        f"from {', '.join(f'{r:g}' for r in PRIVACY_RATES)} on validation data at ε = "
        f"{PRIVACY_EPSILONS[-1]:g}, used at every ε); rows without 'DP' are the same "
        "algorithm without DP and with its usual optimiser (Adam 1e-3), the reference of the "
        "DP cost per round."
    )
    return plan


@functools.cache
def noise_for(target: float, rate: float, steps: int, prior_noise: float | None = None) -> float:
    """Opacus's noise multiplier for ``steps`` Poisson steps at ``rate`` to reach ``target``
    at :data:`PRIVACY_DELTA` (RDP); the methods of one ε share most of them. With
    ``prior_noise`` (a balanced-softmax method: its class counts are released once through
    the Gaussian mechanism at that noise, docs/privacy.md, section 6), the smallest noise
    multiplier whose steps composed with that release stay within ``target`` (bisection on
    the ledger's own accountant, :func:`fedclinic.privacy.epsilon`)."""
    if prior_noise is None:
        return float(
            opacus_backend.get_noise_multiplier(
                target_epsilon=target, target_delta=PRIVACY_DELTA, sample_rate=rate,
                steps=steps, accountant="rdp", epsilon_tolerance=0.01,
            )
        )  # fmt: skip
    release: Steps = (prior_noise, 1.0, 1)
    if epsilon([release], PRIVACY_DELTA) >= target:
        raise ConfigError(
            f"bench quality: the class-prior release alone (dp-prior-noise {prior_noise:g}) "
            f"spends the whole target ε {target:g}"
        )
    low, high = 0.1, 1.0

    def above(sigma: float) -> bool:
        with warnings.catch_warnings():  # far too little noise: "optimal order is the largest"
            warnings.simplefilter("ignore", UserWarning)
            return epsilon([(sigma, rate, steps), release], PRIVACY_DELTA) > target

    while above(high):
        low, high = high, high * 2
    while high - low > 1e-3:  # epsilon falls as the noise grows
        middle = (low + high) / 2
        low, high = (middle, high) if above(middle) else (low, middle)
    return high


def reads_class_prior(algorithm: str, flat: dict[str, Any]) -> bool:
    """Whether a method's loss is the balanced softmax, whose class counts a DP run releases
    (and charges) once per hospital: its ``local-loss`` option, else that option's default."""
    field = get_algorithm(algorithm).options.model_fields.get("local_loss")
    return field is not None and flat.get(f"{algorithm}.local-loss", field.default) == "bsm"


def set_privacy_noise(plan: Plan) -> None:
    """Each DP method's noise multiplier: the smallest that keeps every hospital's ε over
    the run at or below the target (Opacus ``get_noise_multiplier``, RDP accountant)."""
    train_rows = {
        name: sum(entry["development_class_counts"]) - sum(entry["val_class_counts"])
        for name, entry in plan.layout.items()
    }
    for method, entry in plan.privacy.items():
        flat = plan.flat(method, plan.seeds[0])
        charges = PRIVACY_CHARGES.get(entry["algorithm"], 1)
        prior = (
            float(flat.get("dp-prior-noise", RunConfig.model_fields["dp_prior_noise"].default))
            if reads_class_prior(entry["algorithm"], flat)
            else None
        )
        needed, schedule = {}, {}
        for hospital, rows in train_rows.items():
            rate, per_round = poisson_plan(
                int(flat["batch-size"]), rows, int(flat["local-steps"]), int(flat["local-epochs"])
            )
            steps = per_round * int(flat["rounds"]) * charges
            schedule[hospital] = (rate, steps)
            needed[hospital] = noise_for(entry["epsilon"], rate, steps, prior)
        binding = max(needed, key=lambda h: needed[h])
        sigma = math.ceil(needed[binding] * 1e4) / 1e4  # rounded up: never above the target
        plan.variants[method][1]["dp-noise-multiplier"] = sigma
        release: list[Steps] = [] if prior is None else [(prior, 1.0, 1)]
        entry.update(
            noise_multiplier=sigma,
            binding_hospital=binding,
            prior_noise=prior,
            planned_epsilon={
                h: epsilon([(sigma, rate, steps), *release], PRIVACY_DELTA)
                for h, (rate, steps) in schedule.items()
            },
            planned_steps={h: steps for h, (_, steps) in schedule.items()},
            sample_rate={h: rate for h, (rate, _) in schedule.items()},
        )


PLANS: dict[str, Callable[[str, Path], Plan]] = {
    "heart": heart_plan,
    "heart-federated": heart_federated_plan,
    **{suite: functools.partial(pneumonia_plan, suite=suite) for suite in PNEUMONIA_SUITES},
    PRIVACY: privacy_plan,
}


def make_plan(suite: str, mode: str, work: Path, rounds: int = 0) -> Plan:
    """The suite's plan; ``rounds`` > 0 cuts every federated run to that many rounds
    (recorded as ``reduced`` and printed in the report)."""
    if suite not in PLANS:
        raise ConfigError(
            f"bench quality: suite {suite!r} is unknown: expected one of {', '.join(SUITES)}"
        )
    plan = PLANS[suite](mode, work)
    if rounds:
        full = plan.base["rounds"]
        plan.base["rounds"] = rounds
        for settings in plan.per_algorithm.values():
            if "rounds" in settings:
                settings["rounds"] = rounds
        plan.reduced = f"rounds cut from {full} to {rounds} (time budget of the session)"
        plan.protocol.append(f"**REDUCED: {plan.reduced}.**")
    if suite in PNEUMONIA_SUITES:  # public data, knowledge and the MoCo prior: not for heart
        pneumonia_setup(plan, work)
    if plan.privacy:  # the noise depends on the rounds
        set_privacy_noise(plan)
    return plan


# ------------------------------------------------------------------------------ running


def check_data(suite: str) -> None:
    """Refuse early, with one line, when the shared data is not where the suite reads it."""
    path = HEART_DIR if suite.startswith("heart") else PNEUMONIA_FILE
    if not path.exists():
        raise FedClinicError(f"bench quality {suite}: data not found at {path}")


def run_suite(
    suite: str,
    mode: str,
    out: Path,
    progress: Callable[[str], None] | None = None,
    rounds: int = 0,
    jobs: int = 1,
    resume: bool = False,
    methods: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Run every (algorithm, seed) of the suite, then aggregate; return ``results.json``.

    ``jobs`` > 1 runs that many runs at a time, each in its own process with one torch
    thread (every run is seeded, so the numbers do not depend on ``jobs``). ``resume`` keeps
    the runs an interrupted call of the same suite finished (those with :data:`RUN_DONE`)
    and runs the rest. ``methods``: only these of the suite's methods (and their tuning).
    A seed run that fails (a diverged model) is listed in ``failed_runs`` and its method's
    row is aggregated over the other seeds; the call goes on."""
    check_data(suite)
    directory = out / suite
    if directory.exists() and not resume:
        shutil.rmtree(directory)
    directory.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    load_start = os.getloadavg()[0]
    with single_thread(), tempfile.TemporaryDirectory(prefix="fedclinic-bench-") as scratch:
        work = Path(scratch)
        plan = make_plan(suite, mode, work, rounds)
        select_methods(plan, methods)
        pool = RunPool(jobs, progress)

        def submit(
            method: str, flat: dict[str, Any], target: Path, state: str, note: str
        ) -> Future[float]:
            """One run into ``target``; its site state lives under ``work`` and is deleted."""
            pooled = (
                plan.pooled_for.get(method, plan.pooled_data)
                if plan.runs_as(method) == "pooled"
                else None
            )
            if resume and (target / RUN_DONE).exists():
                return pool.done(note, json.loads((target / RUN_DONE).read_text())["seconds"])
            shutil.rmtree(target, ignore_errors=True)  # an unfinished run starts again
            nodes = plan.nodes(method, work / "state" / state)
            return pool.submit(note, execute_run, pooled, flat, nodes, target)

        try:
            # Options chosen on validation data at the first seed, then applied to every
            # method that runs the algorithm; the tuning runs are not reused as seed results
            # (every seed, the first included, is run again with the chosen options).
            tuning: dict[str, list[tuple[dict[str, Any], Path, Future[float]]]] = {}
            for algorithm, candidates in plan.candidates.items():
                if algorithm not in plan.algorithms:
                    continue
                seed = plan.seeds[0]
                for index, options in enumerate(candidates):
                    target = directory / "tuning" / algorithm / f"candidate-{index + 1}"
                    flat = {**plan.flat(algorithm, seed), **options}
                    note = f"{suite}: {algorithm} candidate {index + 1}/{len(candidates)}"
                    job = submit(algorithm, flat, target, f"tune-{algorithm}-{index}", note)
                    tuning.setdefault(algorithm, []).append((options, target, job))
            for algorithm, jobs_of in tuning.items():
                tried: list[dict[str, Any]] = []
                for options, target, job in jobs_of:
                    try:  # the run is done before it is scored
                        seconds, score, failure = pool.result(job), validation_score(target), ""
                    except FedClinicError as err:  # a candidate that diverged is not chosen
                        seconds, score, failure = 0.0, -1.0, str(err)
                    tried.append({"options": options, "validation_score": score, "dir": target,
                                  "seconds": seconds, "failure": failure})  # fmt: skip
                best = max(tried, key=lambda t: t["validation_score"])  # ties: the first listed
                for method in plan.tuned_by_choice_of(algorithm):
                    plan.per_algorithm.setdefault(method, {}).update(best["options"])
                plan.tuning[algorithm] = [
                    {**t, "dir": str(t["dir"].relative_to(directory)), "chosen": t is best}
                    for t in tried
                ]
            pending = []
            for method in plan.algorithms:
                for seed in plan.seeds:
                    target = directory / "runs" / method / f"seed-{seed}"
                    flat = plan.flat(method, seed)
                    note = f"{suite}: {method} seed {seed}"
                    job = submit(method, flat, target, f"{method}-{seed}", note)
                    pending.append((method, seed, target, job))
            runs: list[dict[str, Any]] = []
            failed: list[dict[str, Any]] = []
            for method, seed, target, job in pending:
                entry = {"algorithm": method, "seed": seed,
                         "dir": str(target.relative_to(directory))}  # fmt: skip
                try:
                    runs.append({**entry, "seconds": pool.result(job)})
                except FedClinicError as err:  # reported with its row, the others go on
                    failed.append({**entry, "failure": str(err)})
        finally:
            pool.close()
    results = aggregate(plan, directory, runs)
    results["failed_runs"] = failed
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


def select_methods(plan: Plan, methods: tuple[str, ...]) -> None:
    """Keep only ``methods`` of the plan (all when empty); an unknown one is refused."""
    if not methods:
        return
    unknown = [m for m in methods if m not in plan.algorithms]
    if unknown:
        raise ConfigError(
            f"bench quality: --methods {', '.join(unknown)} not in the {plan.suite} suite: "
            f"expected some of {', '.join(plan.algorithms)}"
        )
    plan.algorithms = tuple(m for m in plan.algorithms if m in methods)
    plan.privacy = {m: e for m, e in plan.privacy.items() if m in methods}
    plan.protocol.append(
        f"Methods run in this call: {', '.join(plan.algorithms)} (`--methods`; the suite's "
        "others ran in other calls or not at all)."
    )


#: written into a run's directory when it finished (its seconds): what ``--resume`` keeps
RUN_DONE = "bench_run.json"


def execute_run(
    pooled: PooledData | None, flat: dict[str, Any], nodes: list[dict[str, Any]], target: Path
) -> float:
    """One run into ``target`` (pooled when ``pooled`` builds its data, else a federation);
    its seconds. The hospitals' site state (``nodes``' state dirs) is deleted after it."""
    started = time.perf_counter()
    if pooled is not None:
        run_pooled(flat, nodes, target, pooled)
    else:
        run_federation(flat, nodes, target)
    for node in nodes:
        shutil.rmtree(node["state-dir"], ignore_errors=True)
    seconds = time.perf_counter() - started
    (target / RUN_DONE).write_text(json.dumps({"seconds": seconds}) + "\n")
    return seconds


def _one_thread() -> None:
    torch.set_num_threads(1)


class RunPool:
    """Runs in this process one after the other (``jobs`` 1), or in ``jobs`` processes
    (spawned: no torch state is forked); ``progress`` hears of each run as it starts
    (in order) or, with several processes, as it ends. Either way a run is a
    :class:`~concurrent.futures.Future`: its failure is raised by :meth:`result`, where the
    caller handles it, not by :meth:`submit`."""

    def __init__(self, jobs: int, progress: Callable[[str], None] | None) -> None:
        if jobs < 1:
            raise ConfigError(f"--jobs = {jobs}: expected a number of processes >= 1")
        self.progress = progress
        self.executor = (
            ProcessPoolExecutor(jobs, get_context("spawn"), initializer=_one_thread)
            if jobs > 1
            else None
        )

    def submit(self, note: str, function: Callable[..., float], *args: Any) -> Future[float]:
        if self.executor is None:
            if self.progress:
                self.progress(note)
            job: Future[float] = Future()
            try:
                job.set_result(function(*args))
            except FedClinicError as err:
                job.set_exception(err)
            return job
        job = self.executor.submit(function, *args)
        if self.progress:
            progress = self.progress
            job.add_done_callback(lambda _job: progress(f"{note}: done"))
        return job

    def done(self, note: str, seconds: float) -> Future[float]:
        """A run finished before (``--resume``): nothing to run."""
        if self.progress:
            self.progress(f"{note}: kept")
        job: Future[float] = Future()
        job.set_result(float(seconds))
        return job

    def result(self, job: Future[float]) -> float:
        return float(job.result())

    def close(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)


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


def one_class(recall: Any) -> bool:
    """Whether per-class recalls are those of a model predicting one class for every image
    (one recall 1, the others 0; classes absent from the split, recall null, left out). For
    two classes this is exact."""
    if not isinstance(recall, list):
        return False
    present = [r for r in recall if isinstance(r, int | float) and math.isfinite(r)]
    return len(present) >= 2 and sorted(present) == [0.0] * (len(present) - 1) + [1.0]


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
                    "epsilon": (entry.get("privacy") or {}).get("epsilon"),
                    "one_class_test": one_class(chosen.get("test_recall")),
                    "one_class_val": one_class(chosen.get("val_recall")),
                    "val_recall": chosen.get("val_recall"),
                    "test_recall": chosen.get("test_recall"),
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
    # hospitals whose test split holds every class: where balanced accuracy and AUC mean
    # something (from the partition's labels; heart: every centre)
    both = [
        h for h in hospitals if h not in plan.layout or min(plan.layout[h]["test_class_counts"]) > 0
    ]
    # where every method deploys the run's own architecture: FedHelp's small hospitals (its
    # large ones deploy a private model of another class)
    large = {r["hospital"] for r in per_hospital if r["model"] == "large"}
    like = [h for h in hospitals if h not in large]
    references: list[str] = [r for r in ("local-only", "local-only-bsm") if r in plan.algorithms]
    groups = {"small": small, "both": both, "like": like}
    summary_rows = summarise(
        plan.algorithms, plan.seeds, hospitals, groups, references, per_hospital
    )
    results: dict[str, Any] = {
        "suite": plan.suite,
        "mode": plan.mode,
        "seeds": list(plan.seeds),
        "algorithms": list(plan.algorithms),
        "labels": plan.labels,
        "not_run": plan.not_run,
        "hospitals": hospitals,
        "shares": plan.shares,
        "targets": plan.targets,
        "layout": plan.layout,
        "tuning": plan.tuning,
        "reduced": plan.reduced,
        "small_hospitals": small,
        "both_classes_hospitals": both,
        "like_for_like_hospitals": like,
        "large_model_hospitals": sorted(large),
        "references": references,
        "margin": SKEW_MARGIN,
        "protocol": plan.protocol,
        "settings": {a: plan.flat(a, plan.seeds[0]) for a in plan.algorithms},
        "runs": runs,
        "setup_seconds": plan.setup_seconds,
        "summary": summary_rows,
        "per_hospital": per_hospital,
        "curves": curves,
        "runtime": "in process: the same ServerApp strategy and ClientApp handler, no gRPC",
    }
    if plan.suite.startswith("heart"):
        results["majority_rule"] = majority_rule()
    if plan.privacy:
        results["privacy"] = privacy_results(plan, directory, runs, per_hospital)
    return results


def train_seconds_per_round(run_dir: Path) -> float:
    """The hospitals' training seconds per round, summed over the hospitals (``train``
    rows), averaged over the rounds."""
    per_round: dict[int, float] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row.get("kind") == "train" and isinstance(row.get("seconds"), int | float):
            key = int(row["round"])
            per_round[key] = per_round.get(key, 0.0) + float(row["seconds"])
    return float(np.mean(list(per_round.values()))) if per_round else math.nan


def privacy_results(
    plan: Plan, directory: Path, runs: list[dict[str, Any]], per_hospital: list[dict[str, Any]]
) -> dict[str, Any]:
    """Per method: the target ε, the noise, the ε each hospital's ledger reached (the most
    over seeds), and the cost per round: training seconds summed over the hospitals and the
    run's wall seconds per round, beside its reference: the same algorithm without DP, or,
    for a SecAgg+ method, the same method without secure aggregation."""
    methods: dict[str, dict[str, Any]] = {}
    for method in plan.algorithms:
        adds_secagg_to = plan.secagg.get(method)
        own = [r for r in runs if r["algorithm"] == method]
        rounds = int(plan.flat(method, plan.seeds[0])["rounds"])
        train = [train_seconds_per_round(directory / r["dir"]) for r in own]
        spent: dict[str, float] = {}
        for row in per_hospital:
            if row["algorithm"] == method and isinstance(row.get("epsilon"), int | float):
                spent[row["hospital"]] = max(spent.get(row["hospital"], 0.0), row["epsilon"])
        dp_entry = plan.privacy.get(adds_secagg_to or method)
        entry = dp_entry or {"algorithm": plan.runs_as(method), "epsilon": None}
        methods[method] = {
            **entry,
            "secure_aggregation": adds_secagg_to is not None,
            "reference": adds_secagg_to or (entry["algorithm"] if dp_entry else None),
            "spent_epsilon": spent,
            "train_seconds_per_round": float(np.nanmean(train)) if train else math.nan,
            "wall_seconds_per_round": (
                float(np.mean([r["seconds"] for r in own])) / rounds if own else math.nan
            ),
        }
    for entry in methods.values():
        reference = methods.get(entry["reference"] or "")
        if reference:
            entry["train_cost_ratio"] = (
                entry["train_seconds_per_round"] / reference["train_seconds_per_round"]
            )
            entry["wall_cost_ratio"] = (
                entry["wall_seconds_per_round"] / reference["wall_seconds_per_round"]
            )
    return {"delta": PRIVACY_DELTA, "epsilons": list(PRIVACY_EPSILONS), "methods": methods}


def summarise(
    algorithms: tuple[str, ...],
    seeds: tuple[int, ...],
    hospitals: list[str],
    groups: dict[str, list[str]],
    references: list[str],
    per_hospital: list[dict[str, Any]],
) -> list[dict[str, Any]]:
    """One row per method: each headline metric's mean and 95 % interval over seeds.

    Per seed: the client average and worst hospital of each metric, pooled-test accuracy, each
    hospital's value, the mean over each hospital group (``small``, ``both`` = test split with
    every class, ``like`` = hospitals deploying the run's architecture under every method), and
    the gap to each reference method (local-only, ...) on the same hospital and seed: per
    hospital, over the client average, and over the small hospitals (``small_gain_*``, against
    the first reference).
    """
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
            add("one_class_test", float(sum(r["one_class_test"] for r in rows)))
            for hospital in hospitals:
                row = table.get((algorithm, seed, hospital))
                if row:
                    for metric in METRICS:
                        add(f"{hospital}:{metric}", row[metric])
            for metric in METRICS:
                for group, members in groups.items():
                    values = [table[(algorithm, seed, h)][metric] for h in members
                              if (algorithm, seed, h) in table]  # fmt: skip
                    if values:
                        add(f"{group}_mean_{metric}", float(np.nanmean(values)))
            for metric in ("test_balanced_accuracy", "test_auc"):
                for index, reference in enumerate(references):
                    gaps = {
                        h: table[(algorithm, seed, h)][metric] - table[(reference, seed, h)][metric]
                        for h in hospitals
                        if (algorithm, seed, h) in table and (reference, seed, h) in table
                    }
                    for hospital, gap in gaps.items():
                        add(f"{hospital}:gap_{reference}_{metric}", gap)
                    if gaps:
                        mean_gap = float(np.nanmean(list(gaps.values())))
                        add(f"client_avg_gap_{reference}_{metric}", mean_gap)
                    small = [gaps[h] for h in groups.get("small", []) if h in gaps]
                    if small and index == 0:
                        add(f"small_gain_{metric}", float(np.nanmean(small)))
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

    suites = list(SUITES) if args.suite == "all" else [args.suite]
    console = Console(stderr=True)
    methods = tuple(m for m in (args.methods or "").split(",") if m)
    try:
        if methods and len(suites) > 1:
            raise ConfigError("--methods needs one --suite")
        for suite in suites:
            plan = PLANS[suite](args.mode, Path("."))
            select_methods(plan, methods)
            tuning = sum(len(c) for a, c in plan.candidates.items() if a in plan.algorithms)
            total = len(plan.algorithms) * len(plan.seeds) + tuning
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

                results = run_suite(
                    suite, args.mode, args.out, step, args.rounds, args.jobs, args.resume,
                    methods,
                )  # fmt: skip
                bar.update(task, completed=total, description=f"{suite}: done")
            console.print(
                f"{suite}: {len(results['runs'])} runs in {results['seconds']:.1f} s -> "
                f"{args.out / suite / 'results.json'}"
            )
            for failure in results["failed_runs"]:
                console.print(
                    f"{suite}: {failure['algorithm']} seed {failure['seed']} failed: "
                    f"{failure['failure']}"
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
