"""Classification losses and metrics shared by hospitals (evaluation) and the coordinator (reports).

Metrics come from scikit-learn so that they match what clinicians' statisticians compute.
A metric that is undefined on a split (ROC-AUC with one class present, recall of an absent
class) is ``nan`` rather than a made-up number; results files write it as ``null``. Two counts
say when balanced accuracy and AUC mean little: ``classes_present`` (distinct labels in the
split) and ``classes_predicted`` (distinct predicted classes): 1 is a one-class split or a
model that predicts one class for every sample (the engine flags both, docs/reliability.md).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F

METRIC_NAMES = ("loss", "accuracy", "balanced_accuracy", "auc")


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy; binary cross-entropy when the model has a single output logit."""
    if logits.shape[1] == 1:
        return F.binary_cross_entropy_with_logits(logits[:, 0], labels.float())
    return F.cross_entropy(logits, labels)


def class_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Per-class probabilities ``(N, C)``, also for single-logit binary models."""
    if logits.shape[1] == 1:
        positive = torch.sigmoid(logits[:, 0].float())
        return torch.stack([1 - positive, positive], dim=1)
    return torch.softmax(logits.float(), dim=1)


def classification_metrics(
    probabilities: np.ndarray, labels: np.ndarray, num_classes: int, loss: float
) -> dict[str, float | list[float]]:
    """Loss, accuracy, balanced accuracy, ROC-AUC, per-class recall of one split, and how many
    classes the split holds and the model predicts."""
    if len(labels) == 0:
        return {}
    # heavy (about 1 s of CPU): imported when a split is first scored, so the processes that
    # never score one (ServerApp, CLI, SuperNode-side forwarder) do not pay for it
    from sklearn.metrics import balanced_accuracy_score, recall_score, roc_auc_score

    predictions = probabilities.argmax(axis=1)
    classes = list(range(num_classes))
    present = np.unique(labels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # absent classes are reported as nan below
        recall = recall_score(
            labels, predictions, labels=classes, average=None, zero_division=np.nan
        )
        balanced = float(balanced_accuracy_score(labels, predictions))
    auc = math.nan
    if len(present) == num_classes:
        if num_classes == 2:
            auc = float(roc_auc_score(labels, probabilities[:, 1]))
        else:
            auc = float(roc_auc_score(labels, probabilities, multi_class="ovr", labels=classes))
    return {
        "loss": float(loss),
        "accuracy": float((predictions == labels).mean()),
        "balanced_accuracy": balanced,
        "auc": auc,
        "recall": [float(r) for r in recall],
        "classes_present": len(present),
        "classes_predicted": len(np.unique(predictions)),
    }


def finite_or_none(value: float) -> float | None:
    """JSON has no NaN: undefined metrics are written as null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value
