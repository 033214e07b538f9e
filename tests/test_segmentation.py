"""Segmentation task: loss and metrics against hand computations, the task registry, the
run-config rules, the UNet models and the runner's final table."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console
from torch import nn

from fedclinic.config import RunConfig
from fedclinic.data.base import Split
from fedclinic.errors import ConfigError, DataError
from fedclinic.local.progress import format_row, summary_table
from fedclinic.models import MODELS, build_model, head_prefix, personal_prefixes
from fedclinic.segmentation import (
    SegmentationScores,
    output_channels,
    predicted_labels,
    segmentation_loss,
)
from fedclinic.tasks import get_task
from fedclinic.training import evaluate, train_local
from strategies import load_run_config

ROOT = Path(__file__).resolve().parents[1]


def defaults() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


def logits_for(labels: torch.Tensor, num_classes: int, scale: float = 10.0) -> torch.Tensor:
    """Confident logits whose prediction is exactly ``labels`` (B, H, W)."""
    if num_classes == 2:
        return (labels.float()[:, None] * 2 - 1) * scale
    return F.one_hot(labels, num_classes).permute(0, 3, 1, 2).float() * scale


def score(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, Any]:
    scores = SegmentationScores(num_classes)
    scores.add(logits, labels)
    return scores.result()


# ------------------------------------------------------------------------------ metrics


@pytest.mark.parametrize("num_classes", [2, 4])
def test_perfect_masks_give_dice_and_iou_one(num_classes: int) -> None:
    labels = torch.zeros(3, 8, 8, dtype=torch.long)
    for c in range(1, num_classes):
        labels[:, c, : c + 2] = c
    result = score(logits_for(labels, num_classes), labels, num_classes)
    assert result["dice"] == pytest.approx(1.0) and result["iou"] == pytest.approx(1.0)
    for c in range(1, num_classes):
        assert result[f"dice_c{c}"] == pytest.approx(1.0)
    assert "dice_c0" not in result  # background excluded


def test_empty_prediction_on_a_non_empty_mask_gives_zero() -> None:
    labels = torch.zeros(2, 6, 6, dtype=torch.long)
    labels[:, 1:4, 1:4] = 1
    empty = torch.full((2, 1, 6, 6), -5.0)
    result = score(empty, labels, 2)
    assert result["dice"] == 0.0 and result["iou"] == 0.0 and result["dice_c1"] == 0.0


def test_partial_overlap_by_hand() -> None:
    # image 0: truth 4 px, prediction 2 of them + 2 outside: Dice 2*2/(4+4), IoU 2/6
    # image 1: truth 2 px, prediction exactly them: Dice 1, IoU 1
    truth = torch.zeros(2, 4, 4, dtype=torch.long)
    truth[0, 0, :4] = 1
    truth[1, 3, :2] = 1
    predicted = torch.zeros(2, 4, 4, dtype=torch.long)
    predicted[0, 0, :2] = 1
    predicted[0, 1, :2] = 1
    predicted[1, 3, :2] = 1
    result = score(logits_for(predicted, 2), truth, 2)
    assert result["dice"] == pytest.approx((0.5 + 1.0) / 2)
    assert result["iou"] == pytest.approx((2 / 6 + 1.0) / 2)


def test_a_class_absent_from_the_split_is_nan_not_zero() -> None:
    labels = torch.zeros(2, 4, 4, dtype=torch.long)
    labels[:, :2, :2] = 1  # class 2 never present
    result = score(logits_for(labels, 3), labels, 3)
    assert result["dice_c1"] == pytest.approx(1.0) and math.isnan(result["dice_c2"])
    assert result["dice"] == pytest.approx(1.0)  # the mean over classes that have a value


def test_an_image_without_the_class_does_not_count_for_it() -> None:
    labels = torch.zeros(2, 4, 4, dtype=torch.long)
    labels[0, :2, :2] = 1  # image 1 has no lesion; its false positive is not scored
    predicted = labels.clone()
    predicted[1, 0, 0] = 1
    assert score(logits_for(predicted, 2), labels, 2)["dice"] == pytest.approx(1.0)


def test_prediction_rule() -> None:
    assert predicted_labels(torch.tensor([[[[0.5, -0.5]]]])).tolist() == [[[1, 0]]]
    multi = torch.tensor([[[[0.0]], [[2.0]], [[1.0]]]])  # (1, 3, 1, 1): class 1 wins
    assert predicted_labels(multi).tolist() == [[[1]]]
    assert output_channels(2) == 1 and output_channels(5) == 5


# ------------------------------------------------------------------------------ loss


def _soft_dice_loss(probabilities: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - (2 sum(p y) + s) / (sum p + sum y + s) per image and channel, averaged (s = 1e-5)."""
    dims = (2, 3)
    smooth = 1e-5
    intersection = (probabilities * target).sum(dims)
    ratio = (2 * intersection + smooth) / (probabilities.sum(dims) + target.sum(dims) + smooth)
    return (1 - ratio).mean()


def test_binary_loss_is_bce_plus_soft_dice_by_hand() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 1, 5, 5, generator=generator)
    labels = (torch.rand(3, 5, 5, generator=generator) > 0.6).long()
    target = labels[:, None].float()
    expected = F.binary_cross_entropy_with_logits(logits, target) + _soft_dice_loss(
        torch.sigmoid(logits), target
    )
    assert segmentation_loss(logits, labels).item() == pytest.approx(expected.item(), rel=1e-5)


def test_multiclass_loss_is_ce_plus_soft_dice_with_background_by_hand() -> None:
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 4, 4, generator=generator)
    labels = torch.randint(0, 3, (2, 4, 4), generator=generator)
    one_hot = F.one_hot(labels, 3).permute(0, 3, 1, 2).float()
    expected = F.cross_entropy(logits, labels) + _soft_dice_loss(logits.softmax(1), one_hot)
    assert segmentation_loss(logits, labels).item() == pytest.approx(expected.item(), rel=1e-5)


def test_the_loss_trains_a_unet_and_evaluate_reports_the_task_metrics() -> None:
    run = load_run_config(
        {"task": "segmentation", "model": "unet", "image-size": 32, "batch-size": 4, "seed": 0}
    )
    inputs = torch.rand(4, 1, 32, 32)
    labels = (inputs[:, 0] > 0.5).long()
    model = build_model(run, seed=0)
    split = Split(inputs, labels)
    stats = train_local(model, split, run, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert stats.steps == 1 and math.isfinite(stats.loss)
    metrics = evaluate(model, split, torch.device("cpu"), 2, "val_", "segmentation")
    assert set(metrics) == {"val_loss", "val_dice", "val_iou", "val_dice_c1",
                            "val_classes_present", "val_classes_predicted"}  # fmt: skip


class _Oracle(nn.Module):
    """Returns confident logits for the mask that the input encodes (input = mask)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 20 - 10


def test_evaluate_with_a_perfect_model_batches_through_the_registry() -> None:
    labels = torch.zeros(40, 6, 6, dtype=torch.long)  # more images than one eval batch
    labels[:, 2:, 2:] = 1
    split = Split(labels[:, None].float(), labels)
    metrics = evaluate(_Oracle(), split, torch.device("cpu"), 2, "test_", "segmentation")
    assert metrics["test_dice"] == pytest.approx(1.0) and metrics["test_iou"] == pytest.approx(1.0)
    assert metrics["test_loss"] < 0.01


# ------------------------------------------------------------------------------ registry


def test_label_checks_per_task() -> None:
    segmentation, classification = get_task("segmentation"), get_task("classification")
    good = torch.zeros(2, 4, 4, dtype=torch.long)
    segmentation.check_labels(good, (4, 4), 2, "x: train")
    with pytest.raises(DataError, match=r"x: train masks are \(4, 3\) pixels; the images are"):
        segmentation.check_labels(torch.zeros(2, 4, 3, dtype=torch.long), (4, 4), 2, "x: train")
    bad = good.clone()
    bad[1, 2, 2] = 3
    with pytest.raises(DataError, match=r"contains pixel label 3; expected pixel labels 0\.\.1"):
        segmentation.check_labels(bad, (4, 4), 2, "x: train")
    with pytest.raises(DataError, match=r"masks must be an int64 tensor \(N, H, W\)"):
        segmentation.check_labels(torch.zeros(2, dtype=torch.long), (4, 4), 2, "x: val")
    with pytest.raises(DataError, match="1-D int64"):
        classification.check_labels(good, (4, 4), 2, "x: test")
    with pytest.raises(ConfigError, match="'task' = 'detection'"):
        get_task("detection")


def test_selection_metric_defaults_per_task_and_refuses_the_other_tasks() -> None:
    flat = defaults()
    assert flat["selection-metric"] == "auto"
    assert load_run_config(flat).selection_key == "val_balanced_accuracy"
    segmentation = {**flat, "task": "segmentation", "model": "unet", "image-size": 32}
    assert load_run_config(segmentation).selection_key == "val_dice"
    chosen = load_run_config({**segmentation, "selection-metric": "val_iou"})
    assert chosen.selection_key == "val_iou"
    with pytest.raises(ConfigError) as caught:
        load_run_config({**segmentation, "selection-metric": "val_auc"})
    message = str(caught.value)
    assert "'selection-metric' = 'val_auc'" in message and "val_dice" in message
    assert "\n" not in message
    with pytest.raises(ConfigError, match="'selection-metric' = 'val_dice'"):
        load_run_config({**flat, "selection-metric": "val_dice"})


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ({"task": "segmentation"}, "'model' = 'cnn' is not allowed with task = 'segmentation'"),
        ({"model": "unet"}, "'model' = 'unet' is not allowed with task = 'classification'"),
        (
            {"task": "segmentation", "model": "unet", "image-size": 28},
            "'image-size' = 28 is not allowed with model = 'unet': expected at least 32",
        ),
        (
            {"task": "segmentation", "model": "unet", "image-size": 32, "algorithm": "fedmas"},
            "'task' = 'segmentation' is not allowed with algorithm = 'fedmas'",
        ),
    ],
)
def test_task_model_and_algorithm_must_fit(override: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_run_config({**defaults(), **override})
    assert fragment in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("algorithm", ["fedavg", "fedprox", "local-only", "fedhelp", "pfednet"])
def test_the_four_algorithms_and_local_only_accept_segmentation(algorithm: str) -> None:
    flat = {**defaults(), "task": "segmentation", "model": "unet", "image-size": 32}
    flat.update({"algorithm": algorithm, "fedhelp.large-model": "unet-large"})
    assert load_run_config(flat).task == "segmentation"


# ------------------------------------------------------------------------------ models


@pytest.mark.parametrize(("name", "classes", "channels"), [("unet", 2, 1), ("unet-large", 4, 4)])
def test_unets_build_with_a_head_and_a_decoder(name: str, classes: int, channels: int) -> None:
    run = RunConfig(task="segmentation", model=name, num_classes=classes, image_size=32)
    model = build_model(run, seed=0).eval()
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, channels, 32, 32)
    head = dict(model.named_modules())[head_prefix(run).rstrip(".")]
    assert isinstance(head, nn.Conv2d) and head.kernel_size == (1, 1)
    names = [n for n, _ in model.named_parameters()]
    decoder = [n for n in names if n.startswith(personal_prefixes(run))]
    assert decoder and all(n.startswith(("upcat_", "final_conv.")) for n in decoder)
    assert not [n for n in names if n.startswith(("conv_0.", "down_")) and n in decoder]
    assert MODELS[name].task == "segmentation"


def test_unet_large_is_wider_than_unet() -> None:
    sizes = {}
    for name in ("unet", "unet-large"):
        run = RunConfig(task="segmentation", model=name, image_size=32)
        sizes[name] = sum(p.numel() for p in build_model(run).parameters())
    assert sizes["unet-large"] > 3 * sizes["unet"]


# ------------------------------------------------------------------------------ runner output


def test_final_table_shows_dice_for_segmentation_runs() -> None:
    summary = {
        "algorithm": "fedavg",
        "task": "segmentation",
        "rounds": 2,
        "selected_round": 2,
        "selection_metric": "val_dice",
        "hospitals": {
            "hospital-a": {
                "num_train": 50,
                "final": {"test_dice": 0.8125, "test_iou": 0.6875, "val_dice": 0.75},
                "selected": {"test_dice": 0.8125, "test_iou": 0.6875},
            }
        },
    }
    console = Console(record=True, width=200)
    console.print(summary_table(summary))
    text = console.export_text()
    assert "test Dice" in text and "test IoU" in text and "0.812" in text and "0.688" in text
    assert "bacc" not in text
    row = {"round": 1, "hospital": "a", "kind": "evaluate", "model_round": 0, "val_dice": 0.5}
    assert "val Dice 0.500" in format_row(row)
