"""Task registry: what differs between classification and segmentation, in one place.

Each :class:`Task` names its loss (training), its scoring of model outputs (evaluation), its
label check (data loading), the metrics a run may select models on, and the metrics the
runner's final table shows. Training, evaluation, the data checks and the client objectives
look the task up here (``task_of(run)``) instead of branching on the task name.

==============  ===============================  ========================================
task            labels                           metrics (``val_`` / ``test_`` prefixed)
==============  ===============================  ========================================
classification  int64 ``(N,)``, one per sample   loss, accuracy, balanced_accuracy, auc,
                                                 recall (per class)
segmentation    int64 ``(N, H, W)``, per pixel   loss, dice, dice_c1.., iou (foreground)
==============  ===============================  ========================================

Model selection (``selection-metric``) defaults to ``auto``: ``val_balanced_accuracy`` for
classification, ``val_dice`` for segmentation (the first of each task's list below).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import torch

from fedclinic.errors import ConfigError, DataError
from fedclinic.metrics import class_probabilities, classification_loss, classification_metrics
from fedclinic.models import MODELS
from fedclinic.segmentation import SegmentationScores, segmentation_loss

Metrics = dict[str, float | list[float]]
Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]  # (logits on the CPU, labels)


@dataclass(frozen=True)
class Task:
    """One learning task: loss, scoring, label check, selectable metrics, table columns."""

    name: str
    #: (logits, labels) -> scalar loss
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    #: (batches of logits and labels, num_classes) -> metrics of the whole split
    score: Callable[[Batches, int], Metrics]
    #: (labels, spatial size of the inputs, num_classes, where) -> None or DataError
    check_labels: Callable[[torch.Tensor, tuple[int, ...], int, str], None]
    #: metrics a run may select its model on; the first is the default (``auto``)
    selection_metrics: tuple[str, ...]
    #: (metric key, short label) of the runner's final table; the first two also for "sel"
    summary_metrics: tuple[tuple[str, str], ...]
    #: samples per forward pass when evaluating (label maps: a few images at a time)
    eval_batch_size: int = 256

    @property
    def default_selection(self) -> str:
        return self.selection_metrics[0]


# ------------------------------------------------------------------------------ classification


def _score_classification(batches: Batches, num_classes: int) -> Metrics:
    """Needs every sample at once (ROC-AUC), so the batches are concatenated."""
    pairs = list(batches)
    if not pairs:
        return {}
    logits = torch.cat([logits for logits, _ in pairs])
    labels = torch.cat([labels for _, labels in pairs])
    loss = float(classification_loss(logits, labels))
    probabilities = class_probabilities(logits).numpy()
    return classification_metrics(probabilities, labels.numpy(), num_classes, loss)


def _check_class_labels(
    labels: torch.Tensor, spatial: tuple[int, ...], num_classes: int, where: str
) -> None:
    if labels.dtype != torch.int64 or labels.ndim != 1:
        raise DataError(f"{where} labels must be a 1-D int64 tensor (one class per sample)")
    _check_range(labels, num_classes, where, "label")


# ------------------------------------------------------------------------------ segmentation


def _score_segmentation(batches: Batches, num_classes: int) -> Metrics:
    """Accumulated batch by batch: a split of large label maps never sits in memory twice."""
    scores = SegmentationScores(num_classes)
    for logits, labels in batches:
        scores.add(logits, labels)
    return scores.result()


def _check_label_maps(
    labels: torch.Tensor, spatial: tuple[int, ...], num_classes: int, where: str
) -> None:
    if labels.dtype != torch.int64 or labels.ndim != 3:
        raise DataError(
            f"{where} masks must be an int64 tensor (N, H, W) of per-pixel labels; found "
            f"{labels.dtype} with shape {tuple(labels.shape)}"
        )
    if tuple(labels.shape[1:]) != tuple(spatial):
        raise DataError(
            f"{where} masks are {tuple(labels.shape[1:])} pixels; the images are "
            f"{tuple(spatial)} (every mask must have its image's size)"
        )
    _check_range(labels, num_classes, where, "pixel label")


def _check_range(labels: torch.Tensor, num_classes: int, where: str, what: str) -> None:
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        bad = int(labels[(labels < 0) | (labels >= num_classes)][0])
        raise DataError(
            f"{where} contains {what} {bad}; expected {what}s 0..{num_classes - 1} "
            f"(run config num-classes = {num_classes})"
        )


# ------------------------------------------------------------------------------ registry


TASKS: dict[str, Task] = {
    "classification": Task(
        name="classification",
        loss=classification_loss,
        score=_score_classification,
        check_labels=_check_class_labels,
        selection_metrics=("val_balanced_accuracy", "val_accuracy", "val_auc", "val_loss"),
        summary_metrics=(
            ("test_accuracy", "test acc"),
            ("test_balanced_accuracy", "test bacc"),
            ("test_auc", "test AUC"),
            ("val_balanced_accuracy", "val bacc"),
        ),
    ),
    "segmentation": Task(
        name="segmentation",
        loss=segmentation_loss,
        score=_score_segmentation,
        check_labels=_check_label_maps,
        selection_metrics=("val_dice", "val_iou", "val_loss"),
        summary_metrics=(
            ("test_dice", "test Dice"),
            ("test_iou", "test IoU"),
            ("val_dice", "val Dice"),
            ("val_iou", "val IoU"),
        ),
        eval_batch_size=16,
    ),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ConfigError(
            f"run config: key 'task' = {name!r} is not allowed: expected one of {', '.join(TASKS)}"
        )
    return TASKS[name]


class TaskConfig(Protocol):
    """What this module reads from a run config (``RunConfig`` has it)."""

    @property
    def task(self) -> str: ...
    @property
    def selection_metric(self) -> str: ...


def task_of(run: TaskConfig) -> Task:
    return get_task(run.task)


def selection_metric(run: TaskConfig) -> str:
    """The run's selection metric with ``auto`` resolved to the task's default."""
    if run.selection_metric == "auto":
        return task_of(run).default_selection
    return run.selection_metric


def check_selection_metric(task: str, metric: str) -> str:
    """``metric`` when the task can select on it (or ``auto``); else a ValueError for pydantic."""
    allowed = get_task(task).selection_metrics
    if metric != "auto" and metric not in allowed:
        raise ValueError(f"expected auto, {', '.join(allowed)} for task = {task!r}")
    return metric


def check_model_fits_task(task: str, model: str, image_size: int) -> None:
    """Segmentation needs a segmentation network (and images it can pool), and vice versa."""
    spec = MODELS.get(model)
    if spec is None:
        return  # the model key's own validation names the allowed models
    if spec.task != task:
        fitting = [name for name, s in MODELS.items() if s.task == task]
        raise ConfigError(
            f"run config: key 'model' = {model!r} is not allowed with task = {task!r}: "
            f"expected one of {', '.join(fitting)}"
        )
    if image_size < spec.min_image_size:
        raise ConfigError(
            f"run config: key 'image-size' = {image_size} is not allowed with model = "
            f"{model!r}: expected at least {spec.min_image_size} (the network pools 2x "
            "four times)"
        )
