"""The pooled (centralised) reference: one model trained on the union of the hospitals' data.

Why: "pooled" is what a federation would reach if the data could be moved; every benchmark
reports it as the reference. No algorithm in the registry does this (it is not federated), so
it is trained here in process with the same model registry, training loop
(:func:`fedclinic.training.train_local`) and metrics as the hospitals, and it writes the same
``metrics.jsonl`` / ``summary.json`` layout as a federated run, so one reader serves both.

Model selection uses the union of the hospitals' *validation* splits (mean over hospitals of
the run's selection metric, as the federated strategies do); with no validation data (FLamby's
Heart protocol) the last epoch is reported.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedclinic.config import parse_hospital_config
from fedclinic.data import DataRequest, Split, load_hospital_data
from fedclinic.models import build_model
from fedclinic.results import ResultsWriter, write_json
from fedclinic.training import evaluate, seeded_generator, train_local
from strategies import load_run_config

#: (hospital name, validation split, test split) per hospital
Evaluation = list[tuple[str, Split, Split]]
#: builds the pooled training split and each hospital's evaluation splits
PooledData = Callable[[Any, list[dict[str, Any]]], tuple[Split, Evaluation]]


def hospital_union(run: Any, hospitals: list[dict[str, Any]]) -> tuple[Split, Evaluation]:
    """The union of the hospitals' train splits, each loaded by its own data source."""
    trains, evaluation = [], []
    for node in hospitals:
        config = parse_hospital_config(node)
        data = load_hospital_data(DataRequest(run, config))
        trains.append(data.train)
        evaluation.append((config.hospital, data.val, data.test))
    pooled = Split(torch.cat([t.inputs for t in trains]), torch.cat([t.labels for t in trains]))
    return pooled, evaluation


def heart_pooled(run: Any, hospitals: list[dict[str, Any]]) -> tuple[Split, Evaluation]:
    """FLamby's pooled mode for Heart: pooled train statistics normalise every split."""
    from fedclinic.data.heart_disease import load_pooled

    names = [parse_hospital_config(n).hospital for n in hospitals]
    train, tests = load_pooled([Path(n["data-path"]) for n in hospitals])
    empty = Split(torch.zeros((0, run.num_features)), torch.zeros(0, dtype=torch.int64))
    return train, [(name, empty, test) for name, test in zip(names, tests, strict=True)]


def run_pooled(
    flat: dict[str, Any],
    hospitals: list[dict[str, Any]],
    output_dir: Path,
    data: PooledData = hospital_union,
) -> Path:
    """Train ``rounds`` epochs (or ``local-steps`` batches each) on the pooled data."""
    run = load_run_config(flat)
    results = ResultsWriter(output_dir)
    results.write_config({**run.to_flat(), "algorithm": "pooled"})
    device = torch.device("cpu")
    train, evaluation = data(run, hospitals)
    model = build_model(run, seed=run.seed)
    key = run.selection_key
    rows_by_round: dict[int, dict[str, dict[str, Any]]] = {}
    best: tuple[int, float] | None = None
    for epoch in range(run.rounds + 1):
        if epoch > 0:
            torch.manual_seed(
                int(seeded_generator(run.seed, epoch, "pooled").initial_seed() % 2**31)
            )
            train_local(model, train, run, device, seeded_generator(run.seed, epoch, "pooled"))
        rows: list[dict[str, Any]] = []
        for name, val, test in evaluation:
            metrics = {
                **evaluate(model, val, device, run.num_classes, "val_", run.task),
                **evaluate(model, test, device, run.num_classes, "test_", run.task),
                "num_val": len(val),
                "num_test": len(test),
            }
            rows.append(
                {
                    "round": epoch + 1,
                    "hospital": name,
                    "kind": "evaluate",
                    "model_round": epoch,
                    "model": "pooled",
                    **metrics,
                }
            )
        results.append(rows)
        rows_by_round[epoch] = {r["hospital"]: r for r in rows}
        scores = [float(r[key]) for r in rows if isinstance(r.get(key), int | float)]
        scores = [s for s in scores if np.isfinite(s)]
        if scores:
            value = -float(np.mean(scores)) if key == "val_loss" else float(np.mean(scores))
            if best is None or value > best[1]:
                best = (epoch, value)
    selected = best[0] if best else run.rounds

    def view(row: dict[str, Any]) -> dict[str, Any]:
        return {
            k: v
            for k, v in row.items()
            if k.startswith(("val_", "test_")) or k in ("num_val", "num_test")
        }

    write_json(
        output_dir / "summary.json",
        {
            "status": "completed",
            "algorithm": "pooled",
            "rounds": run.rounds,
            "selection_metric": key,
            "selected_round": selected,
            "selection_note": (
                "chosen on validation data" if best else "no validation data: the final epoch"
            ),
            "hospitals": {
                name: {
                    "final": view(rows_by_round[run.rounds][name]),
                    "selected": view(rows_by_round[selected][name]),
                    "num_train": len(train),
                    "model": "pooled",
                }
                for name, _, _ in evaluation
            },
        },
    )
    return output_dir
