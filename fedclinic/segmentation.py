"""Segmentation loss and metrics (MONAI), shared by hospitals (training, evaluation) and tests.

Conventions (the same as the classification models'): a binary task (``num-classes`` = 2)
has **one** output channel, a foreground logit per pixel (sigmoid); a multi-class task has
one channel per class (softmax). Labels are int64 label maps ``(N, H, W)`` with values
``0..num-classes-1``, 0 being background.

- Loss: MONAI ``DiceCELoss``: soft Dice + binary cross-entropy on the foreground logit
  (binary), or soft Dice (background channel included, MONAI's default) + cross-entropy on
  the softmax (multi-class).
- Prediction: foreground where the logit is > 0 (sigmoid > 0.5), else the arg-max class.
- Metrics: MONAI ``DiceMetric`` and ``MeanIoU`` per image and per **foreground** class
  (background excluded), on the hard prediction. An image whose ground truth lacks a class
  gives no score for that class (MONAI's ``ignore_empty``), so a false positive on an image
  without that class is not counted. Per-class values are the mean over the images that have
  the class; a class absent from the whole split is ``nan`` (written as null), never 0.
  ``dice`` and ``iou`` are the means over the foreground classes that have a value.
- One class: ``classes_present`` / ``classes_predicted`` count the pixel labels that occur
  anywhere in the split's masks / predictions, background included. A model that predicts
  no foreground anywhere on a split with foreground predicts one class (1); a split whose
  masks hold no foreground is a one-class split (its Dice is null). The engine flags both,
  as for classification.
"""

from __future__ import annotations

import math
from functools import cache
from typing import cast

import torch
from torch import nn


def output_channels(num_classes: int) -> int:
    """One foreground logit for a binary task, else one channel per class."""
    return 1 if num_classes == 2 else num_classes


@cache
def _dice_ce(binary: bool) -> nn.Module:
    from monai.losses import DiceCELoss

    if binary:
        return DiceCELoss(sigmoid=True)
    return DiceCELoss(softmax=True, to_onehot_y=True)


def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Dice + cross-entropy of logits ``(B, C, H, W)`` against label maps ``(B, H, W)``."""
    target = labels[:, None]
    if logits.shape[1] == 1:
        return _dice_ce(True)(logits.float(), target.float())
    return _dice_ce(False)(logits.float(), target)


def predicted_labels(logits: torch.Tensor) -> torch.Tensor:
    """Hard label maps ``(B, H, W)``: foreground where the logit > 0, else the arg-max class."""
    if logits.shape[1] == 1:
        return (logits[:, 0] > 0).long()
    return logits.argmax(dim=1)


class SegmentationScores:
    """Accumulates per-image Dice and IoU over batches; :meth:`result` gives the split's metrics."""

    def __init__(self, num_classes: int) -> None:
        from monai.metrics import DiceMetric, MeanIoU

        self.num_classes = num_classes
        self.dice = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
        self.iou = MeanIoU(include_background=False, reduction="none", ignore_empty=True)
        self.loss_sum = 0.0
        self.count = 0
        self.present = torch.zeros(num_classes, dtype=torch.bool)
        self.predicted = torch.zeros(num_classes, dtype=torch.bool)

    def add(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """One batch: logits ``(B, C, H, W)``, label maps ``(B, H, W)``."""
        from monai.networks.utils import one_hot

        logits, labels = logits.float().cpu(), labels.cpu()
        self.loss_sum += float(segmentation_loss(logits, labels)) * len(labels)
        self.count += len(labels)
        hard = predicted_labels(logits)
        self.present[torch.unique(labels)] = True
        self.predicted[torch.unique(hard)] = True
        prediction = one_hot(hard[:, None], self.num_classes)
        truth = one_hot(labels[:, None], self.num_classes)
        self.dice(y_pred=prediction, y=truth)
        self.iou(y_pred=prediction, y=truth)

    def result(self) -> dict[str, float | list[float]]:
        """``loss``, ``dice``, ``iou``, ``dice_c1``.. (one per foreground class), and the pixel
        classes present in the masks and in the predictions."""
        if self.count == 0:
            return {}
        # without get_not_nans, MONAI's aggregate() gives the tensor alone (not a pair)
        dice = _class_means(cast(torch.Tensor, self.dice.aggregate()))
        iou = _class_means(cast(torch.Tensor, self.iou.aggregate()))
        metrics: dict[str, float | list[float]] = {
            "loss": self.loss_sum / self.count,
            "dice": _nan_mean(dice),
            "iou": _nan_mean(iou),
            "classes_present": int(self.present.sum()),
            "classes_predicted": int(self.predicted.sum()),
        }
        metrics.update({f"dice_c{c}": value for c, value in enumerate(dice, start=1)})
        return metrics


def _class_means(per_image: torch.Tensor) -> list[float]:
    """Mean over images of a ``(N, C-1)`` score matrix, ignoring nan (class absent)."""
    return [float(v) for v in torch.nanmean(per_image.double(), dim=0)]


def _nan_mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan
