"""Model registry: every architecture the coordinator and the hospitals build from a run config.

Each entry names the parameter prefix of its classification head, so algorithms that treat
the head differently (FedHelp's heads, pFedNet's personalised classifier) find it without
knowing the architecture. A binary logistic regression has one output logit (FLamby's
``Linear(13, 1)`` + sigmoid); every other classification model has one logit per class.
``resnet18`` (about 45 MB of float32 weights) and ``resnet101`` (about 170 MB: the large
model, for sites with a GPU) are torchvision's ResNets with a small-image stem.

Segmentation models (``task = "segmentation"``) are MONAI ``BasicUNet`` s: ``unet`` (features
16-16-32-64-128, about 0.5 M parameters, CPU-sized) and ``unet-large`` (twice as wide, about
2 M; FedHelp's private large model). Their head is the final 1x1 convolution (``final_conv``,
the reference's ``outconv``): one foreground channel for two classes, else one per class.
Their decoder (the up-sampling blocks and the head) is the default personalised component.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from fedclinic.config import RunConfig
from fedclinic.errors import ConfigError


class LogisticRegression(nn.Module):
    """Linear model for tabular data; one logit for two classes, else one per class."""

    def __init__(self, num_features: int, num_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(num_features, 1 if num_classes == 2 else num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class CentredFeatures(nn.Sequential):
    """A layer stack fed [0, 1] images moved to about zero mean and unit spread.

    ``(x - 0.5) / 0.25``, parameter-free and the same at every hospital. Without it the small
    CNN, which has no normalisation layer, sits for a few hundred steps on the constant
    predictor of imbalanced data before it learns features (PneumoniaMNIST, centralised: balanced
    accuracy still 0.5 after 100 Adam steps, 0.90 with the centring). A subclass of
    ``nn.Sequential`` so that parameter names stay ``features.<i>``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward((x - 0.5) * 4.0)


class SmallCNN(nn.Module):
    """Two conv blocks and a two-layer head: fast on a CPU, enough for 28x28 medical images.

    No BatchNorm, so FedAvg has no running statistics to reconcile across hospitals; the
    inputs are centred instead (:class:`CentredFeatures`).
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 16) -> None:
        super().__init__()
        self.features = CentredFeatures(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(2 * width * 16, 64),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _resnet(depth: int) -> Callable[[RunConfig], nn.Module]:
    """A torchvision ResNet-``depth`` builder with the small-image stem (head ``fc``)."""

    def build(run: RunConfig) -> nn.Module:
        from torchvision import models

        model: nn.Module = getattr(models, f"resnet{depth}")(
            weights=None, num_classes=run.num_classes
        )
        # Small single-channel images: a 3x3 stride-1 stem and no max-pool keep spatial detail
        # that the ImageNet stem (7x7 stride 2 + pool) would throw away at 28x28.
        model.conv1 = nn.Conv2d(run.in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        if run.image_size <= 64:
            model.maxpool = nn.Identity()
        return model

    return build


def _densenet121(run: RunConfig) -> nn.Module:
    from monai.networks.nets import DenseNet121

    model = DenseNet121(spatial_dims=2, in_channels=run.in_channels, out_channels=run.num_classes)
    if run.image_size <= 64:
        # Same small-image stem as ResNet-18: 3x3 stride 1, no pool, so 28x28 inputs survive
        # the three transition layers (the ImageNet stem would shrink them below 1x1).
        model.features.conv0 = nn.Conv2d(run.in_channels, 64, 3, stride=1, padding=1, bias=False)
        model.features.pool0 = nn.Identity()
    return model


UNET_DECODER = ("upcat_4.", "upcat_3.", "upcat_2.", "upcat_1.", "final_conv.")


@dataclass(frozen=True)
class ModelSpec:
    """How to build one architecture, its task, and where its head (and decoder) live."""

    build: Callable[[RunConfig], nn.Module]
    head_prefix: str
    tabular: bool = False
    task: str = "classification"
    #: smallest image side the network accepts (four 2x poolings need 32 for a UNet)
    min_image_size: int = 8
    #: default personalised component (pFedNet); empty = the head
    personal_prefixes: tuple[str, ...] = ()


def _unet(features: tuple[int, int, int, int, int, int]) -> ModelSpec:
    """A MONAI BasicUNet of the given widths: head ``final_conv``, decoder personalised."""

    def build(run: RunConfig) -> nn.Module:
        from monai.networks.nets import BasicUNet

        from fedclinic.segmentation import output_channels

        return BasicUNet(
            spatial_dims=2,
            in_channels=run.in_channels,
            out_channels=output_channels(run.num_classes),
            features=features,
        )

    return ModelSpec(
        build,
        "final_conv.",
        task="segmentation",
        min_image_size=32,
        personal_prefixes=UNET_DECODER,
    )


MODELS: dict[str, ModelSpec] = {
    "logreg": ModelSpec(
        lambda run: LogisticRegression(run.num_features, run.num_classes), "linear.", tabular=True
    ),
    "cnn": ModelSpec(lambda run: SmallCNN(run.in_channels, run.num_classes), "classifier."),
    "resnet18": ModelSpec(_resnet(18), "fc."),
    "resnet101": ModelSpec(_resnet(101), "fc."),
    "densenet121": ModelSpec(_densenet121, "class_layers."),
    "unet": _unet((16, 16, 32, 64, 128, 16)),
    "unet-large": _unet((32, 32, 64, 128, 256, 32)),
}


def build_model(run: RunConfig, seed: int | None = None) -> nn.Module:
    """Build the run's model; with ``seed`` the initial weights are reproducible."""
    if run.model not in MODELS:
        raise ConfigError(
            f"run config: key 'model' = {run.model!r} is not allowed: "
            f"expected one of {', '.join(MODELS)}"
        )
    if seed is not None:
        torch.manual_seed(seed)
    return MODELS[run.model].build(run)


def head_prefix(run: RunConfig) -> str:
    """Parameter-name prefix of the model's classification head."""
    return MODELS[run.model].head_prefix


def personal_prefixes(run: RunConfig) -> tuple[str, ...]:
    """The model's default personalised component: its decoder for a UNet, else its head."""
    spec = MODELS[run.model]
    return spec.personal_prefixes or (spec.head_prefix,)
