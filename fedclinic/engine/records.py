"""The engine's rows (evaluate, train), model selection on validation data, and the summary."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from flwr.app import ArrayRecord

from fedclinic import messages as keys
from fedclinic.engine.algorithm import Reply
from fedclinic.rows import EvaluateRow, TrainRow
from fedclinic.serialization import numpy_to_record, record_to_numpy
from fedclinic.training import mean_or_nan

#: metrics a hospital reports about the model it evaluated
EVALUATION_PREFIXES = ("val_", "test_")
EVALUATION_KEYS = (keys.NUM_VAL, keys.NUM_TEST, keys.EVAL_SECONDS)
#: train metrics that have their own column in a train row
TRAIN_COLUMNS = (keys.TRAIN_LOSS, keys.TRAIN_SECONDS, keys.TRAIN_STEPS)


def evaluation_flags(metrics: Mapping[str, Any]) -> list[str]:
    """Why a hospital's scores mean little, from the class counts its evaluation reports
    (``val_``/``test_`` ``classes_present`` and ``classes_predicted``): a model that predicts
    one class for every sample of a split holding several (balanced accuracy is then at
    chance whatever the AUC), or a split holding one class (balanced accuracy and AUC are
    then undefined or trivial). A split without those counts is not judged."""
    model: list[str] = []
    split: list[str] = []
    for name in ("val", "test"):
        present = metrics.get(f"{name}_classes_present")
        predicted = metrics.get(f"{name}_classes_predicted")
        if not isinstance(present, int | float) or present < 1:
            continue
        if present < 2:
            split.append(f"{name}-split-one-class")
        elif isinstance(predicted, int | float) and predicted < 2:
            model.append(f"predicts-one-class-on-{name}")
    return model + split


def evaluate_row(server_round: int, reply: Reply) -> EvaluateRow:
    metrics = {
        k: v
        for k, v in reply.metrics.items()
        if k.startswith(EVALUATION_PREFIXES) or k in EVALUATION_KEYS
    }
    return EvaluateRow(
        round=server_round,
        hospital=reply.hospital,
        node_id=reply.node_id,
        model_round=keys.model_round(server_round),
        model=str(reply.info.get(keys.DEPLOYED, "global")),
        flags=evaluation_flags(metrics) or None,
        deployed_sha256=reply.info.get(keys.DEPLOYED_SHA256),
        **metrics,
    )


def flag_line(row: EvaluateRow, final: bool = False) -> str:
    """The coordinator's log line for a flagged evaluation (empty when nothing is flagged)."""
    if not row.flags:
        return ""
    where = "final evaluation" if final else f"round {row.round}"
    return (
        f"{where}: {row.hospital}'s {row.model} model r{row.model_round} flagged: "
        f"{', '.join(row.flags)} (balanced accuracy and AUC mean little there)"
    )


def train_row(server_round: int, reply: Reply) -> TrainRow:
    info, metrics = reply.info, reply.metrics

    def text(key: str) -> str | None:
        value = info.get(key)
        return None if value is None else str(value)

    return TrainRow(
        round=server_round,
        hospital=reply.hospital,
        node_id=reply.node_id,
        train_loss=metrics.get(keys.TRAIN_LOSS),
        num_examples=reply.num_examples,
        num_train=metrics.get(keys.NUM_TRAIN),
        seconds=metrics.get(keys.TRAIN_SECONDS),
        steps=metrics.get(keys.TRAIN_STEPS),
        device=text(keys.DEVICE),
        data_source=text(keys.DATA_SOURCE),
        data_fingerprint=text(keys.DATA_FINGERPRINT),
        phase=text(keys.PHASE),
        # hashes of models kept at the site (local-only, personalised, large); the evaluated
        # model's is in the evaluate row
        **{k: v for k, v in info.items() if k.endswith("sha256") and k != keys.DEPLOYED_SHA256},
        # DP-SGD: the ε this hospital has now spent on its data set (its ledger, all runs)
        **{k: info[k] for k in (keys.DP_EPSILON, keys.DP_DELTA) if k in info},
        **{k: v for k, v in metrics.items() if k.startswith("train_") and k not in TRAIN_COLUMNS},
    )


class Selection:
    """Every hospital's evaluation of every round's model, and the round whose model scores
    best on the hospitals' VALIDATION splits (the run's ``selection-metric``)."""

    def __init__(self, metric: str) -> None:
        self.metric = metric
        self.evaluations: dict[int, dict[str, dict[str, Any]]] = {}  # model round -> hospital
        self.best: tuple[int, float] | None = None
        self.best_arrays: ArrayRecord | None = None

    def observe(
        self, model_round: int, rows: Sequence[EvaluateRow], sent: ArrayRecord | None
    ) -> None:
        """Record a round's evaluations of the model ``sent``; keep it if it is the best."""
        for row in rows:
            self.evaluations.setdefault(model_round, {})[row.hospital] = row.dump()
        extra = [row.model_extra or {} for row in rows]
        score = mean_or_nan([float(e.get(self.metric, float("nan"))) for e in extra])
        if not np.isfinite(score):
            return
        value = -score if self.metric == "val_loss" else score
        if self.best is None or value > self.best[1]:
            self.best = (model_round, value)
            self.best_arrays = sent

    def state_dict(self) -> dict[str, Any]:
        return {
            "evaluations": self.evaluations,
            "best": self.best,
            "best_arrays": None if self.best_arrays is None else record_to_numpy(self.best_arrays),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.evaluations = dict(state.get("evaluations", {}))
        self.best = state.get("best")
        best = state.get("best_arrays")
        self.best_arrays = None if best is None else numpy_to_record(best)


def metric_view(row: dict[str, Any]) -> dict[str, Any]:
    """An evaluation's scores, sizes, flags, and the site file of the model it scored."""
    extra = (keys.NUM_VAL, keys.NUM_TEST, "flags", keys.DEPLOYED_SHA256)
    return {k: v for k, v in row.items() if k.startswith(EVALUATION_PREFIXES) or k in extra}


def flag_union(*views: Mapping[str, Any]) -> list[str]:
    """The flags of several evaluations, each once, in their first order."""
    return list(dict.fromkeys(flag for view in views for flag in view.get("flags") or ()))


def flagged(hospitals: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``summary.json``'s top-level ``flags``: every flagged hospital with its flags."""
    return [
        {"hospital": name, "flags": entry["flags"]}
        for name, entry in sorted(hospitals.items())
        if entry.get("flags")
    ]


def hospital_summaries(
    selection: Selection, rounds: int, selected_round: int, rows: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    """``summary.json``'s ``hospitals``: final and selected scores, training size, the model
    evaluated, models kept at the site (hashes, never weights), and the data it reported."""
    last_train: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row.get("kind") == "train":
            last_train[str(row.get("hospital"))] = row
    hospitals: dict[str, Any] = {}
    for name in sorted({h for e in selection.evaluations.values() for h in e}):
        final = selection.evaluations.get(rounds, {}).get(name, {})
        selected = selection.evaluations.get(selected_round, {}).get(name, {})
        trained = last_train.get(name, {})
        hospitals[name] = {
            "final": metric_view(final),
            "selected": metric_view(selected),
            "flags": flag_union(final, selected),  # of the final or the selected model
            "num_train": trained.get("num_train"),
            "model": final.get("model"),
            "site_models": {k: v for k, v in trained.items() if k.endswith("sha256")},
            "data_source": trained.get("data_source"),
            "data_fingerprint": trained.get("data_fingerprint"),
        }
        if keys.DP_EPSILON in trained:  # its ledger's total after its last DP round
            hospitals[name]["privacy"] = {
                "epsilon": trained[keys.DP_EPSILON],
                "delta": trained.get(keys.DP_DELTA),
            }
    return hospitals
