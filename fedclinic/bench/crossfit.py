"""A cross-fitted knowledge file: each public image scored by a teacher that never saw it.

Why: ``fedclinic knowledge build --train-teacher`` (FH-2 substitute 2; decision IDs as in
docs/fedhelp.md#decisions) trains one teacher on
the labelled public images and exports its outputs on those same images, so the small
hospitals distil from probabilities fitted to the very labels they also train on (close to
one-hot on a memorised set). A foundation model queried once, as in the paper (arXiv
2412.19654 §3.2), has not been fitted to the public labels. Cross-fitting is the
closer substitute: the public set is cut into K stratified folds, a teacher is trained on
K - 1 of them and scores the held-out fold, and every row of the file is such an out-of-fold
output. Built from :mod:`fedclinic.knowledge`'s public functions; the file has the same format
and chain of trust (its meta pins the public data's hash), so small hospitals read it as any
other knowledge file.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.model_selection import StratifiedKFold

from fedclinic.errors import DataError
from fedclinic.knowledge import (
    model_probabilities,
    public_inputs,
    read_public_data,
    train_teacher,
    write_knowledge,
)


def build_cross_fitted_knowledge(
    public_data: str | Path,
    output: str | Path,
    *,
    split: str,
    network: str,
    folds: int = 5,
    epochs: int = 10,
    batch_size: int = 64,
    learning_rate: float = 1e-3,
    weight_decay: float = 1e-4,
    seed: int = 0,
    device: torch.device | None = None,
) -> tuple[str, dict[str, Any]]:
    """Write the out-of-fold teacher probabilities of every public sample; ``(sha256, meta)``."""
    device = device or torch.device("cpu")
    public = read_public_data(public_data, split)
    if public.labels is None or public.labels.ndim != 1:
        raise DataError(f"public data file '{public.path}': cross-fitting needs class labels (N,)")
    inputs = public_inputs(public, None, None)
    labels = public.labels
    num_classes = max(int(labels.max()) + 1, 2)
    probabilities = np.zeros((len(labels), num_classes), dtype=np.float32)
    cuts = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    started = time.perf_counter()
    for fold, (train, held_out) in enumerate(cuts.split(np.zeros(len(labels)), labels)):
        teacher, _ = train_teacher(
            inputs[train], labels[train], network, epochs, batch_size, learning_rate,
            weight_decay, seed + fold, device,
        )  # fmt: skip
        probabilities[held_out] = model_probabilities(teacher, inputs[held_out], device)
    accuracy = float((probabilities.argmax(axis=1) == labels).mean())
    meta = {
        "tool": "fedclinic bench (cross-fitted teacher)",
        "public_data": public.path.name,
        "public_data_sha256": public.sha256,
        "public_split": public.split,
        "num_public": len(public),
        "public_labels": True,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "stored": "probabilities (softmax of the source's logits, FH-4)",
        "source": "teacher-cross-fit",
        "substitute": True,
        "note": (
            f"FH-2 substitute 2, cross-fitted: {folds} stratified folds, each public sample "
            "scored by a teacher trained on the other folds only"
        ),
        "teacher": network,
        "teacher_epochs": epochs,
        "teacher_seed": seed,
        "folds": folds,
        "teacher_out_of_fold_accuracy": accuracy,
        "seconds": time.perf_counter() - started,
        "num_classes": num_classes,
    }
    return write_knowledge(output, probabilities, meta), meta
