"""Model registry: every architecture fedclinic builds, from plain values.

One entry per architecture (:data:`REGISTRY`), built from :class:`ModelDims` (classes, input
channels, image size, features), never from a whole run config, so that the config schema,
the tools and the algorithms can all use it without importing each other. Each entry names
the parameter prefix of its classification head, so algorithms that treat the head
differently (FedHelp's heads, pFedNet's personalised classifier) find it without knowing the
architecture, and how to cut it down to a feature extractor (Fed-MAS's backbone).

Models a run config may name as ``model`` (:data:`MODELS`):

- ``logreg``: a binary logistic regression has one output logit (FLamby's ``Linear(13, 1)`` +
  sigmoid); every other classification model has one logit per class;
- ``cnn``: a small CNN for 28x28 images;
- ``resnet18`` (about 45 MB of float32 weights) and ``resnet101`` (about 170 MB: the large
  model, for sites with a GPU): torchvision's ResNets with a small-image stem;
- ``densenet121``: MONAI's, with the same small-image stem;
- ``unet`` / ``unet-large`` (``task = "segmentation"``): MONAI ``BasicUNet`` s, features
  16-16-32-64-128 (about 0.5 M parameters, CPU-sized) and twice as wide (about 2 M; FedHelp's
  private large model). Their head is the final 1x1 convolution (``final_conv``, the
  reference's ``outconv``): one foreground channel for two classes, else one per class. Their
  decoder (the up-sampling blocks and the head) is the default personalised component.

Networks only the tools and algorithms build (FedHelp's large models and teachers, Fed-MAS's
frozen priors and MoCo encoders): ``wide-cnn`` (the small CNN three times as wide, a CPU-sized
large model), ``mlp`` (two hidden layers, for tabular rows or flattened images) and the
encoders ``encoder-resnet50`` / ``encoder-resnet18`` (torchvision's ImageNet stem, as MoCo-v2
trains them, so official checkpoints load), ``encoder-cnn`` (three conv-BatchNorm blocks) and
``encoder-mlp`` (tabular rows), each returning its pooled feature (``feature_dim`` values).
"""

from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from fedclinic import opacus_backend
from fedclinic.errors import ConfigError
from fedclinic.segmentation import output_channels


@dataclass(frozen=True)
class ModelDims:
    """What an architecture needs to know about its data: the plain values it is built from."""

    num_classes: int = 2
    in_channels: int = 1
    image_size: int = 28
    #: features of a tabular row (or of a flattened image, for ``mlp``)
    num_features: int = 13


class ModelConfig(Protocol):
    """What :func:`build_model` reads from a run config (``RunConfig`` has all of it)."""

    @property
    def model(self) -> str: ...
    @property
    def num_classes(self) -> int: ...
    @property
    def in_channels(self) -> int: ...
    @property
    def image_size(self) -> int: ...
    @property
    def num_features(self) -> int: ...


def dims_of(run: ModelConfig) -> ModelDims:
    return ModelDims(run.num_classes, run.in_channels, run.image_size, run.num_features)


# ------------------------------------------------------------------------------ architectures


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


def _mlp(dims: ModelDims) -> nn.Module:
    """Two hidden layers of 128 on flattened inputs (``num_features`` values per sample)."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(dims.num_features, 128),
        nn.ReLU(inplace=True),
        nn.Linear(128, 128),
        nn.ReLU(inplace=True),
        nn.Linear(128, dims.num_classes),
    )


def _resnet(depth: int) -> Callable[[ModelDims], nn.Module]:
    """A torchvision ResNet-``depth`` builder with the small-image stem (head ``fc``)."""

    def build(dims: ModelDims) -> nn.Module:
        from torchvision import models  # heavy: imported when a ResNet is built

        model: nn.Module = getattr(models, f"resnet{depth}")(
            weights=None, num_classes=dims.num_classes
        )
        # Small single-channel images: a 3x3 stride-1 stem and no max-pool keep spatial detail
        # that the ImageNet stem (7x7 stride 2 + pool) would throw away at 28x28.
        model.conv1 = nn.Conv2d(dims.in_channels, 64, 3, stride=1, padding=1, bias=False)
        if dims.image_size <= 64:
            model.maxpool = nn.Identity()
        return model

    return build


def _densenet121(dims: ModelDims) -> nn.Module:
    from monai.networks.nets import DenseNet121  # heavy: imported when one is built

    model = DenseNet121(spatial_dims=2, in_channels=dims.in_channels, out_channels=dims.num_classes)
    if dims.image_size <= 64:
        # Same small-image stem as ResNet-18: 3x3 stride 1, no pool, so 28x28 inputs survive
        # the three transition layers (the ImageNet stem would shrink them below 1x1).
        model.features.conv0 = nn.Conv2d(dims.in_channels, 64, 3, stride=1, padding=1, bias=False)
        model.features.pool0 = nn.Identity()
    return model


def _unet(features: tuple[int, int, int, int, int, int]) -> Callable[[ModelDims], nn.Module]:
    def build(dims: ModelDims) -> nn.Module:
        from monai.networks.nets import BasicUNet  # heavy: imported when one is built

        return BasicUNet(
            spatial_dims=2,
            in_channels=dims.in_channels,
            out_channels=output_channels(dims.num_classes),
            features=features,
        )

    return build


class CNNEncoder(nn.Module):
    """A small conv encoder for tests and CPU demos: three conv-BatchNorm-ReLU blocks, 64-d.

    BatchNorm matters: without it the random features are nearly collinear (cosine ~0.99)
    and MoCo's contrastive loss barely moves in a short pretraining. Its ``fc`` is the
    identity when frozen and MoCo's MLP head during pretraining.
    """

    def __init__(self, in_channels: int, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.fc: nn.Module = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class TabularEncoder(nn.Module):
    """An encoder of tabular rows: two Linear-BatchNorm-ReLU blocks, 64-d.

    No self-supervised pretraining is built for tables (MoCo's augmentations are image
    crops), so Fed-MAS uses it as a seeded random frozen prior (marked degraded) or loads one
    someone trained.
    """

    def __init__(self, in_features: int, width: int = 64) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Linear(in_features, width, bias=False),
            nn.BatchNorm1d(width),
            nn.ReLU(inplace=True),
            nn.Linear(width, width, bias=False),
            nn.BatchNorm1d(width),
            nn.ReLU(inplace=True),
        )
        self.fc: nn.Module = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def _imagenet_resnet_encoder(depth: int) -> Callable[[ModelDims], nn.Module]:
    """torchvision's ResNet with its ImageNet stem (as MoCo-v2 trains it) and ``fc`` = identity;
    only ``conv1`` takes ``in_channels`` when it is not 3."""

    def build(dims: ModelDims) -> nn.Module:
        from torchvision import models  # heavy: imported when a ResNet is built

        model: Any = getattr(models, f"resnet{depth}")(weights=None)
        if dims.in_channels != 3:
            model.conv1 = nn.Conv2d(dims.in_channels, 64, 7, stride=2, padding=3, bias=False)
        model.fc = nn.Identity()
        return model

    return build


# ------------------------------------------------------------------------------ backbones
# Fed-MAS keeps the architecture without its classification layer; the cut differs per
# family, and the logistic regression's "backbone" is the identity on its rows.


def _cnn_backbone(dims: ModelDims) -> tuple[nn.Module, int]:
    model = SmallCNN(dims.in_channels, dims.num_classes)
    return model.features, int(model.classifier.in_features)


def _resnet_backbone(depth: int) -> Callable[[ModelDims], tuple[nn.Module, int]]:
    def backbone(dims: ModelDims) -> tuple[nn.Module, int]:
        model: Any = _resnet(depth)(dims)
        dim = int(model.fc.in_features)
        model.fc = nn.Identity()
        return model, dim

    return backbone


def _densenet_backbone(dims: ModelDims) -> tuple[nn.Module, int]:
    model: Any = _densenet121(dims)
    dim = int(model.class_layers.out.in_features)
    model.class_layers.out = nn.Identity()
    return model, dim


# ------------------------------------------------------------------------------ registry

UNET_DECODER = ("upcat_4.", "upcat_3.", "upcat_2.", "upcat_1.", "final_conv.")


@dataclass(frozen=True)
class ModelSpec:
    """How to build one architecture, its task, and where its head (and decoder) live."""

    build: Callable[[ModelDims], nn.Module]
    #: parameter-name prefix of the classification head; "" for encoders
    head_prefix: str = ""
    #: inputs are feature rows ``(N, num_features)``, not images
    tabular: bool = False
    #: "classification", "segmentation", or "encoder" (outputs features, no head)
    task: str = "classification"
    #: smallest image side the network accepts (four 2x poolings need 32 for a UNet)
    min_image_size: int = 8
    #: default personalised component (pFedNet); empty = the head
    personal_prefixes: tuple[str, ...] = ()
    #: whether a run config may name it as ``model``
    run_model: bool = True
    #: the architecture without its classification layer, and its feature size (Fed-MAS)
    backbone: Callable[[ModelDims], tuple[nn.Module, int]] | None = None
    #: size of an encoder's output feature
    feature_dim: int = 0


def _unet_spec(features: tuple[int, int, int, int, int, int]) -> ModelSpec:
    return ModelSpec(
        _unet(features),
        "final_conv.",
        task="segmentation",
        min_image_size=32,
        personal_prefixes=UNET_DECODER,
    )


REGISTRY: dict[str, ModelSpec] = {
    "logreg": ModelSpec(
        lambda d: LogisticRegression(d.num_features, d.num_classes),
        "linear.",
        tabular=True,
        backbone=lambda d: (nn.Identity(), d.num_features),
    ),
    "cnn": ModelSpec(
        lambda d: SmallCNN(d.in_channels, d.num_classes), "classifier.", backbone=_cnn_backbone
    ),
    "resnet18": ModelSpec(_resnet(18), "fc.", backbone=_resnet_backbone(18)),
    "resnet101": ModelSpec(_resnet(101), "fc.", backbone=_resnet_backbone(101)),
    "densenet121": ModelSpec(_densenet121, "class_layers.", backbone=_densenet_backbone),
    "unet": _unet_spec((16, 16, 32, 64, 128, 16)),
    "unet-large": _unet_spec((32, 32, 64, 128, 256, 32)),
    "wide-cnn": ModelSpec(
        lambda d: SmallCNN(d.in_channels, d.num_classes, width=48), "classifier.", run_model=False
    ),
    "mlp": ModelSpec(_mlp, "5.", tabular=True, run_model=False),
    "encoder-resnet50": ModelSpec(
        _imagenet_resnet_encoder(50), task="encoder", run_model=False, feature_dim=2048
    ),
    "encoder-resnet18": ModelSpec(
        _imagenet_resnet_encoder(18), task="encoder", run_model=False, feature_dim=512
    ),
    "encoder-cnn": ModelSpec(
        lambda d: CNNEncoder(d.in_channels), task="encoder", run_model=False, feature_dim=64
    ),
    "encoder-mlp": ModelSpec(
        lambda d: TabularEncoder(d.num_features),
        tabular=True,
        task="encoder",
        run_model=False,
        feature_dim=64,
    ),
}

#: the architectures a run config may name as ``model``
MODELS: dict[str, ModelSpec] = {name: spec for name, spec in REGISTRY.items() if spec.run_model}


def model_spec(name: str) -> ModelSpec:
    if name not in REGISTRY:
        raise ConfigError(f"network {name!r} is unknown: expected one of {', '.join(REGISTRY)}")
    return REGISTRY[name]


def build(name: str, dims: ModelDims, seed: int | None = None) -> nn.Module:
    """Build architecture ``name`` for ``dims``; with ``seed`` the initial weights are
    reproducible (the global generator is seeded, as before every model build)."""
    spec = model_spec(name)
    if seed is not None:
        torch.manual_seed(seed)
    return spec.build(dims)


def build_backbone(name: str, dims: ModelDims) -> tuple[nn.Module, int]:
    """The architecture without its classification layer, and its feature size."""
    spec = model_spec(name)
    if spec.backbone is None:
        raise ConfigError(f"network {name!r} has no backbone to cut out")
    return spec.backbone(dims)


def build_model(run: ModelConfig, seed: int | None = None) -> nn.Module:
    """Build the run's model; with ``seed`` the initial weights are reproducible."""
    if run.model not in MODELS:
        raise ConfigError(
            f"run config: key 'model' = {run.model!r} is not allowed: "
            f"expected one of {', '.join(MODELS)}"
        )
    model = build(run.model, dims_of(run), seed)
    if getattr(run, "dp", "off") == "off":
        return model
    return private_variant(model, bool(getattr(run, "privacy_fix_model", False)))


def _basic_block_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    """torchvision's ``BasicBlock.forward`` with ``out + identity`` instead of ``out +=``."""
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return self.relu(out + identity)


def _bottleneck_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    """torchvision's ``Bottleneck.forward`` with ``out + identity`` instead of ``out +=``."""
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    return self.relu(out + identity)


#: torchvision's residual blocks, whose forward adds the shortcut in place
_OUT_OF_PLACE = {"BasicBlock": _basic_block_forward, "Bottleneck": _bottleneck_forward}


def private_variant(model: nn.Module, fix: bool) -> nn.Module:
    """The version of ``model`` Opacus can compute per-sample gradients of (DP-SGD,
    docs/privacy.md): with ``fix`` (the run's ``privacy-fix-model``) every BatchNorm becomes
    a GroupNorm (Opacus ``ModuleValidator.fix``), because BatchNorm mixes the samples of a
    batch; in-place activations become out-of-place, and torchvision's ResNet blocks add
    their shortcut out of place, because Opacus's backward hooks forbid changing a layer's
    output in place. Parameter names and shapes stay those of the converted model, so every
    side that builds it the same way exchanges the same state.
    """
    if fix:
        model = opacus_backend.ModuleValidator.fix(model)
    for module in model.modules():
        if getattr(module, "inplace", False):
            module.inplace = False  # type: ignore[assignment]  # nn.ReLU & co.: a bool
        forward = _OUT_OF_PLACE.get(type(module).__name__)
        if forward is not None and type(module).__module__ == "torchvision.models.resnet":
            setattr(module, "forward", types.MethodType(forward, module))  # noqa: B010
    return model


def head_prefix(run: ModelConfig) -> str:
    """Parameter-name prefix of the model's classification head."""
    return MODELS[run.model].head_prefix


def personal_prefixes(run: ModelConfig) -> tuple[str, ...]:
    """The model's default personalised component: its decoder for a UNet, else its head."""
    spec = MODELS[run.model]
    return spec.personal_prefixes or (spec.head_prefix,)
