"""Models build for every registry entry; metrics agree with their definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedclinic.config import RunConfig
from fedclinic.errors import ConfigError
from fedclinic.metrics import class_probabilities, classification_loss, classification_metrics
from fedclinic.models import (
    MODELS,
    REGISTRY,
    ModelDims,
    build,
    build_backbone,
    build_model,
    head_prefix,
    personal_prefixes,
)
from fedclinic.training import select_device


@pytest.mark.parametrize(
    "name", sorted(n for n, spec in MODELS.items() if spec.task == "classification")
)
def test_every_model_builds_and_has_its_head(name: str) -> None:
    run = RunConfig(model=name, num_classes=3, in_channels=1, image_size=28, num_features=13)
    model = build_model(run, seed=0)
    inputs = torch.randn(2, 13) if name == "logreg" else torch.randn(2, 1, 28, 28)
    model.eval()
    assert model(inputs).shape == (2, 3)
    assert any(k.startswith(head_prefix(run)) for k in model.state_dict())


@pytest.mark.parametrize("name", sorted(n for n in REGISTRY if n not in MODELS))
def test_tool_networks_build_from_plain_values(name: str) -> None:
    """FedHelp's large networks and Fed-MAS's encoders come from the same registry, built from
    plain values; an encoder returns its ``feature_dim`` values, a classifier one per class."""
    spec = REGISTRY[name]
    dims = ModelDims(num_classes=3, in_channels=1, image_size=28, num_features=13)
    model = build(name, dims, seed=0).eval()
    inputs = torch.randn(2, 13) if spec.tabular else torch.randn(2, 1, 28, 28)
    outputs = spec.feature_dim if spec.task == "encoder" else 3
    assert model(inputs).shape == (2, outputs)
    assert not spec.run_model and (spec.task == "encoder") == (spec.head_prefix == "")


@pytest.mark.parametrize("name", ["cnn", "logreg", "resnet18"])
def test_backbones_output_their_feature_size(name: str) -> None:
    dims = ModelDims(num_classes=3, in_channels=1, image_size=28, num_features=13)
    backbone, size = build_backbone(name, dims)
    inputs = torch.randn(2, 13) if name == "logreg" else torch.randn(2, 1, 28, 28)
    assert backbone.eval()(inputs).flatten(1).shape == (2, size)
    with pytest.raises(ConfigError, match="'unet' has no backbone"):
        build_backbone("unet", dims)
    with pytest.raises(ConfigError, match="'nope' is unknown"):
        build("nope", dims)


def model_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def test_resnet101_is_the_100mb_model_with_resnet18s_stem_and_head() -> None:
    run = RunConfig(model="resnet101", num_classes=2, in_channels=1, image_size=28)
    model = build_model(run, seed=0)
    assert model_bytes(model) > 1e8  # float32 parameters + buffers: about 170 MB
    assert model_bytes(model) > 3 * model_bytes(build_model(RunConfig(model="resnet18")))
    assert head_prefix(run) == "fc." and personal_prefixes(run) == ("fc.",)
    assert model.state_dict()["fc.weight"].shape == (2, 2048)
    conv1 = model.conv1
    assert conv1.in_channels == 1 and conv1.kernel_size == (3, 3) and conv1.stride == (1, 1)
    assert isinstance(model.maxpool, torch.nn.Identity)  # small images keep their 28x28
    colour = build_model(RunConfig(model="resnet101", in_channels=3, image_size=128), seed=0)
    assert colour.conv1.in_channels == 3 and isinstance(colour.maxpool, torch.nn.MaxPool2d)


def test_binary_logistic_regression_has_one_logit_like_flamby() -> None:
    model = build_model(RunConfig(model="logreg", num_classes=2, num_features=13))
    assert model(torch.randn(4, 13)).shape == (4, 1)


def test_same_seed_same_initial_weights() -> None:
    run = RunConfig(model="cnn")
    a, b = build_model(run, seed=7).state_dict(), build_model(run, seed=7).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_single_logit_loss_and_probabilities_are_binary_cross_entropy() -> None:
    logits = torch.tensor([[0.0], [2.0]])
    labels = torch.tensor([0, 1])
    expected = -(math.log(0.5) + math.log(1 / (1 + math.exp(-2.0)))) / 2
    assert classification_loss(logits, labels).item() == pytest.approx(expected, rel=1e-6)
    probs = class_probabilities(logits)
    torch.testing.assert_close(probs.sum(1), torch.ones(2))
    assert probs[1, 1].item() == pytest.approx(1 / (1 + math.exp(-2.0)))


def test_metrics_against_hand_computation() -> None:
    # labels 0,0,0,1 ; predictions 0,1,0,1 -> accuracy 3/4, recall c0 = 2/3, c1 = 1
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.8, 0.2], [0.3, 0.7]])
    labels = np.array([0, 0, 0, 1])
    metrics = classification_metrics(probs, labels, 2, loss=0.5)
    assert metrics["accuracy"] == pytest.approx(0.75)
    assert metrics["balanced_accuracy"] == pytest.approx((2 / 3 + 1) / 2)
    assert metrics["recall"] == pytest.approx([2 / 3, 1.0])
    # AUC: positive score 0.7 beats negatives 0.1, 0.6, 0.2 -> 1.0
    assert metrics["auc"] == pytest.approx(1.0)


def test_auc_is_nan_when_a_class_is_absent() -> None:
    probs = np.array([[0.2, 0.8], [0.4, 0.6]])
    metrics = classification_metrics(probs, np.array([1, 1]), 2, loss=0.1)
    assert math.isnan(metrics["auc"])
    assert math.isnan(metrics["recall"][0])


def test_device_selection_on_this_host() -> None:
    assert select_device("cpu").type == "cpu"
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert select_device("auto").type == expected
