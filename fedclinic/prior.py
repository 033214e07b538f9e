"""The shared frozen self-supervised prior of Fed-MAS: encoders, checkpoint loading, MoCo-v2.

Fed-MAS (arXiv 2307.14959; docs/fedmas.md, decision IDs MAS-n defined at #decisions)
measures every hospital's class-wise divergence against one frozen self-supervised encoder
``f``; the measurements are comparable across hospitals only if every hospital runs a
**bit-identical** ``f`` (design decision MAS-2). This module

- builds the encoder architectures (``resnet50`` as in the reference's MoCo-v2 prior,
  ``resnet18``, and a small conv-BatchNorm ``cnn`` encoder for tests and CPU demos), each with
  its classification layer ``fc`` replaced by the identity so that it outputs the pooled
  feature (2048 / 512 / 64 values);
- reads prior files: the official MoCo-v2 checkpoint layout (``{"state_dict":
  {"module.encoder_q.<layer>": ...}}``, the MLP head ``fc.*`` dropped) and a plain
  torchvision-style state dict (``conv1.weight``, ..., ``fc`` dropped), e.g. ImageNet weights;
- trains a substitute when no pretrained weights can be had: ``fedclinic prior train`` runs
  MoCo-v2 self-supervised pretraining once on unlabelled public images and writes the query
  encoder **in the official layout** plus its SHA-256, so that one loader serves both.

The run config carries the file's SHA-256 (``fedmas.prior-sha256``); a hospital whose file
differs refuses to train (:class:`~fedclinic.errors.IntegrityError`).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import os
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedclinic.config import HospitalConfig, RunConfig
from fedclinic.data import synthetic
from fedclinic.data.base import DataRequest
from fedclinic.errors import DataError, FedClinicError, file_problem
from fedclinic.models import REGISTRY, ModelDims, build
from fedclinic.serialization import content_sha256, file_sha256
from fedclinic.training import LocalLoop, OptimizerSettings, StepResult, select_device

#: pooled-feature size of each prior architecture (the projector's output size): the
#: registry's ``encoder-<arch>`` networks
PRIOR_DIMS: dict[str, int] = {
    name.removeprefix("encoder-"): spec.feature_dim
    for name, spec in REGISTRY.items()
    if spec.task == "encoder"
}
#: encoders of tabular rows ``(N, F)``; every other prior encodes images ``(N, C, H, W)``
TABULAR_PRIORS = tuple(arch for arch in PRIOR_DIMS if REGISTRY[f"encoder-{arch}"].tabular)
IMAGE_PRIORS = tuple(arch for arch in PRIOR_DIMS if arch not in TABULAR_PRIORS)
#: the priors MoCo-v2 can pretrain (image augmentations)
#: key prefix of the query encoder in MoCo's checkpoints (DistributedDataParallel + MoCo)
MOCO_PREFIX = "module.encoder_q."
#: parameter name of the first convolution, from which the input channels are read
#: (for ``mlp``: the first linear layer, whose in-features are the row's features)
FIRST_CONV = {
    "resnet50": "conv1.weight",
    "resnet18": "conv1.weight",
    "cnn": "features.0.weight",
    "mlp": "features.0.weight",
}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ------------------------------------------------------------------------------ encoders


def build_encoder(arch: str, in_channels: int) -> nn.Module:
    """An encoder whose ``fc`` is the identity: it returns the pooled ``PRIOR_DIMS[arch]`` feature.

    The registry's ``encoder-<arch>`` (:mod:`fedclinic.models`). ResNets keep torchvision's
    ImageNet stem (7x7 stride 2 + max-pool), as MoCo-v2 does, so official checkpoints load
    unchanged; only ``conv1`` takes ``in_channels`` when it is not 3. For ``mlp`` (tabular),
    ``in_channels`` is the number of features.
    """
    if arch not in PRIOR_DIMS:
        raise DataError(
            f"prior architecture {arch!r} is unknown: expected one of {', '.join(PRIOR_DIMS)}"
        )
    return build(f"encoder-{arch}", ModelDims(in_channels=in_channels, num_features=in_channels))


class FrozenPrior(nn.Module):
    """The frozen prior ``f``: no gradients, always in eval mode (MAS-1), output ``(N, dim)``.

    Inputs with one channel are repeated to the encoder's channels (grey images into an RGB
    MoCo encoder); ``image_size`` > 0 resizes them (the reference feeds 224 px); ``imagenet``
    normalises [0, 1] RGB inputs with the ImageNet mean and std, as MoCo was trained.
    """

    def __init__(
        self,
        encoder: nn.Module,
        in_channels: int,
        dim: int,
        image_size: int = 0,
        imagenet: bool = False,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.in_channels = in_channels
        self.dim = dim
        self.image_size = image_size
        self.imagenet = imagenet
        for parameter in self.encoder.parameters():
            parameter.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FrozenPrior:
        """Stay in eval mode whatever the caller asks: BatchNorm must use its frozen statistics."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 2:  # tabular rows: nothing to repeat, resize or normalise
            if x.shape[1] != self.in_channels:
                raise DataError(
                    f"the Fed-MAS prior expects rows of {self.in_channels} features; the data "
                    f"have {x.shape[1]}"
                )
            return self.encoder(x).float()
        channels = x.shape[1]
        if channels != self.in_channels:
            if channels != 1:
                raise DataError(
                    f"the Fed-MAS prior expects {self.in_channels}-channel images; the data have "
                    f"{channels} channels"
                )
            x = x.expand(-1, self.in_channels, -1, -1)
        if self.image_size and x.shape[-1] != self.image_size:
            x = F.interpolate(
                x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False
            )
        if self.imagenet:
            if self.in_channels != 3:
                raise DataError(
                    "fedmas.prior-normalize = 'imagenet' needs a 3-channel prior encoder; "
                    f"this one takes {self.in_channels} channel(s)"
                )
            mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
            std = torch.tensor(IMAGENET_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
            x = (x - mean) / std
        return self.encoder(x).flatten(1).float()


# ------------------------------------------------------------------------------ prior files


@dataclass
class PriorFile:
    """What a prior file holds: the encoder weights (``fc`` dropped) and where they come from."""

    state: dict[str, torch.Tensor]
    arch: str | None
    origin: str
    dropped: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)


def read_prior_file(path: str | Path) -> PriorFile:
    """Read a prior in the MoCo-v2 layout or as a plain state dict; ``fc.*`` keys are dropped."""
    file = Path(path)
    if not file.is_file():
        raise DataError(f"Fed-MAS prior file '{file}' does not exist")
    try:
        raw = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a corrupt file
        detail = file_problem(err)
        raise DataError(f"Fed-MAS prior file '{file}' is unreadable or corrupt: {detail}") from None
    if not isinstance(raw, Mapping):
        raise DataError(f"Fed-MAS prior file '{file}' does not hold a dictionary of weights")
    arch = raw.get("arch") if isinstance(raw.get("arch"), str) else None
    meta = dict(raw["fedclinic"]) if isinstance(raw.get("fedclinic"), Mapping) else {}
    if "state_dict" in raw:
        state_dict = raw["state_dict"]
        if not isinstance(state_dict, Mapping):
            raise DataError(f"Fed-MAS prior file '{file}': 'state_dict' is not a dictionary")
        encoder = {
            k[len(MOCO_PREFIX) :]: v for k, v in state_dict.items() if k.startswith(MOCO_PREFIX)
        }
        if not encoder:
            example = next(iter(state_dict), "<empty>")
            raise DataError(
                f"Fed-MAS prior file '{file}': 'state_dict' has no '{MOCO_PREFIX}' keys "
                f"(first key: {example!r}); expected the MoCo-v2 checkpoint layout"
            )
        origin = "fedclinic prior train" if meta else "moco-v2 checkpoint"
    else:
        encoder = dict(raw)
        origin = "state dict"
    if not all(isinstance(v, torch.Tensor) for v in encoder.values()):
        raise DataError(f"Fed-MAS prior file '{file}': the encoder weights are not all tensors")
    dropped = sorted(k for k in encoder if k.startswith("fc."))
    state = {k: v for k, v in encoder.items() if not k.startswith("fc.")}
    return PriorFile(state, arch, origin, dropped, meta)


def _short(keys: list[str], limit: int = 4) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def encoder_from_state(
    state: Mapping[str, torch.Tensor], arch: str, origin: str = "prior"
) -> tuple[nn.Module, int]:
    """Build ``arch`` with the channels of the state's first conv and load it strictly."""
    if arch not in PRIOR_DIMS:
        raise DataError(
            f"prior architecture {arch!r} is unknown: expected one of {', '.join(PRIOR_DIMS)}"
        )
    first = FIRST_CONV[arch]
    if first not in state:
        raise DataError(
            f"{origin}: key {first!r} is missing; the weights do not match a {arch} encoder "
            f"(fedmas.prior-arch = {arch!r})"
        )
    in_channels = int(state[first].shape[1])
    encoder = build_encoder(arch, in_channels)
    expected = set(encoder.state_dict())
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_short(unexpected)}")
        raise DataError(
            f"{origin}: the weights do not match a {arch} encoder (fedmas.prior-arch = {arch!r}): "
            + "; ".join(parts)
        )
    try:
        encoder.load_state_dict(dict(state), strict=True)
    except RuntimeError as err:
        detail = " ".join(str(err).split())[:300]
        raise DataError(f"{origin}: the weights do not fit a {arch} encoder: {detail}") from None
    return encoder, in_channels


def load_prior(
    path: str | Path, arch: str, image_size: int = 0, imagenet: bool = False
) -> tuple[FrozenPrior, PriorFile]:
    """Read a prior file and return the frozen encoder (eval mode, no gradients)."""
    prior_file = read_prior_file(path)
    if prior_file.arch is not None and prior_file.arch != arch:
        raise DataError(
            f"Fed-MAS prior file '{path}' holds a {prior_file.arch!r} encoder; the run expects "
            f"fedmas.prior-arch = {arch!r}"
        )
    encoder, in_channels = encoder_from_state(
        prior_file.state, arch, f"Fed-MAS prior file '{path}'"
    )
    return FrozenPrior(encoder, in_channels, PRIOR_DIMS[arch], image_size, imagenet), prior_file


def random_prior(
    arch: str, in_channels: int, seed: int, image_size: int = 0, imagenet: bool = False
) -> FrozenPrior:
    """MAS-2 substitute 4: a randomly initialised frozen encoder shared by seed (degraded)."""
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        encoder = build_encoder(arch, in_channels)
    finally:
        torch.random.set_rng_state(generator_state)
    return FrozenPrior(encoder, in_channels, PRIOR_DIMS[arch], image_size, imagenet)


def prior_content_sha256(prior: FrozenPrior) -> str:
    """Hash of the encoder's weights: equal on every hospital iff the priors are bit-identical."""
    return content_sha256(prior.encoder.state_dict())


# ------------------------------------------------------------------------------ MoCo-v2


@dataclass(frozen=True)
class MocoSettings:
    """MoCo-v2 hyperparameters, scaled down for a short pretraining on a few thousand images.

    MoCo-v2 uses SGD lr 0.03 (batch 256), momentum 0.999, a 65,536-key queue and 800 epochs;
    for a few hundred steps a faster key encoder (0.99) and lr 0.06 learn much more, and the
    queue is capped at a quarter of the images so that it rarely holds the positive's own image.
    """

    arch: str = "cnn"
    steps: int = 200
    batch_size: int = 64
    learning_rate: float = 0.06
    weight_decay: float = 1e-4
    temperature: float = 0.2
    encoder_momentum: float = 0.99
    queue_size: int = 4096
    dim: int = 128
    seed: int = 0


def _random_resized_crop(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """torchvision's RandomResizedCrop(scale=(0.2, 1), ratio=(3/4, 4/3)) with our generator."""
    from torchvision.transforms.v2 import functional as TF

    height, width = image.shape[-2:]
    area = height * width
    for _ in range(10):
        target = area * (0.2 + 0.8 * float(torch.rand(1, generator=generator)))
        log_ratio = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * float(
            torch.rand(1, generator=generator)
        )
        ratio = math.exp(log_ratio)
        w = round(math.sqrt(target * ratio))
        h = round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return TF.resized_crop(image, top, left, h, w, [height, width], antialias=True)
    return image


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """MoCo-v2's augmentation for grey or RGB tensors: crop, flip, brightness/contrast, blur."""
    from torchvision.transforms.v2 import functional as TF

    out = []
    size = images.shape[-1]
    kernel = max(3, (int(0.1 * size) // 2) * 2 + 1)
    for image in images:
        image = _random_resized_crop(image, generator)
        if float(torch.rand(1, generator=generator)) < 0.5:
            image = image.flip(-1)
        if float(torch.rand(1, generator=generator)) < 0.8:
            contrast = 0.6 + 0.8 * float(torch.rand(1, generator=generator))
            brightness = 0.6 + 0.8 * float(torch.rand(1, generator=generator))
            mean = image.mean()
            image = ((image - mean) * contrast + mean) * brightness
        if float(torch.rand(1, generator=generator)) < 0.5:
            sigma = 0.1 + 1.9 * float(torch.rand(1, generator=generator))
            image = TF.gaussian_blur(image, [kernel, kernel], [sigma, sigma])
        out.append(image)
    return torch.stack(out)


class MoCo(nn.Module):
    """MoCo-v2: query/key encoders with an MLP head, momentum update and a queue of keys."""

    queue: torch.Tensor  # registered as a buffer in __init__

    def __init__(self, settings: MocoSettings, in_channels: int) -> None:
        super().__init__()
        self.settings = settings
        dim_mlp = PRIOR_DIMS[settings.arch]
        self.encoder_q = build_encoder(settings.arch, in_channels)
        self.encoder_q.fc = nn.Sequential(
            nn.Linear(dim_mlp, dim_mlp), nn.ReLU(inplace=True), nn.Linear(dim_mlp, settings.dim)
        )
        self.encoder_k = copy.deepcopy(self.encoder_q)
        for parameter in self.encoder_k.parameters():
            parameter.requires_grad_(False)
        self.register_buffer(
            "queue", F.normalize(torch.randn(settings.dim, settings.queue_size), dim=0)
        )
        self.pointer = 0

    @torch.no_grad()
    def _momentum_update(self) -> None:
        m = self.settings.encoder_momentum
        for q, k in zip(self.encoder_q.parameters(), self.encoder_k.parameters(), strict=True):
            k.mul_(m).add_(q.detach(), alpha=1 - m)

    @torch.no_grad()
    def _enqueue(self, keys: torch.Tensor) -> None:
        size = self.settings.queue_size
        index = (self.pointer + torch.arange(keys.shape[0], device=keys.device)) % size
        self.queue[:, index] = keys.T
        self.pointer = int((self.pointer + keys.shape[0]) % size)

    def forward(
        self, im_q: torch.Tensor, im_k: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        """InfoNCE loss. BatchNorm sees two "virtual devices": the query batch in two halves
        in order, the key batch shuffled before halving (MoCo's shuffle-BN, on one process)."""
        q = F.normalize(torch.cat([self.encoder_q(c) for c in im_q.chunk(2)]), dim=1)
        with torch.no_grad():
            self._momentum_update()
            perm = torch.randperm(im_k.shape[0], generator=generator).to(im_k.device)
            shuffled = torch.cat([self.encoder_k(c) for c in im_k[perm].chunk(2)])
            k = F.normalize(shuffled[torch.argsort(perm)], dim=1)
        positive = (q * k).sum(dim=1, keepdim=True)
        negative = q @ self.queue.clone().detach()
        logits = torch.cat([positive, negative], dim=1) / self.settings.temperature
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        loss = F.cross_entropy(logits, labels)
        self._enqueue(k)
        return loss


def train_moco(
    images: torch.Tensor, settings: MocoSettings, device: torch.device | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """MoCo-v2 pretraining on unlabelled ``images`` ``(N, C, H, W)``; returns the query
    encoder's state dict (with its MLP head ``fc.*``, as MoCo saves it) and statistics."""
    device = device or torch.device("cpu")
    if images.ndim != 4 or images.shape[0] < 2:
        raise DataError(
            f"MoCo pretraining needs images (N>=2, C, H, W); got shape {tuple(images.shape)}"
        )
    batch = min(settings.batch_size, images.shape[0])
    batch -= batch % 2  # two shuffle-BN halves
    queue = max(batch, min(settings.queue_size, images.shape[0] // 4))
    settings = dataclasses.replace(settings, queue_size=queue)
    torch.manual_seed(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    model = MoCo(settings, int(images.shape[1])).to(device)
    loop = LocalLoop(device)
    sgd = OptimizerSettings("sgd", settings.learning_rate, 0.9, settings.weight_decay)
    updater = loop.updater([p for p in model.parameters() if p.requires_grad], sgd)
    losses: list[float] = []

    def views() -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """Two augmented views of a random batch, step after step."""
        for step in range(settings.steps):
            x = images[torch.randperm(images.shape[0], generator=generator)[:batch]]
            yield step, augment(x, generator).to(device), augment(x, generator).to(device)

    def step(pair: tuple[int, torch.Tensor, torch.Tensor]) -> StepResult:
        index, im_q, im_k = pair
        lr = 0.5 * settings.learning_rate * (1 + math.cos(math.pi * index / settings.steps))
        for group in updater.optimizer.param_groups:  # cosine schedule, as MoCo-v2
            group["lr"] = lr
        loss = model(im_q, im_k, generator)
        updater.step(loss)
        losses.append(float(loss.detach()))
        return len(im_q), {"loss": loss}

    model.train()
    stats = loop.run(settings.steps, views(), step)
    state = {k: v.detach().cpu().clone() for k, v in model.encoder_q.state_dict().items()}
    return state, {
        "steps": float(settings.steps),
        "first_loss": losses[0] if losses else math.nan,
        "final_loss": losses[-1] if losses else math.nan,
        "seconds": stats.seconds,
        "queue_size": float(queue),
        "batch_size": float(batch),
    }


def save_prior(
    path: str | Path, arch: str, encoder_state: Mapping[str, torch.Tensor], meta: dict[str, Any]
) -> str:
    """Write the encoder in MoCo's checkpoint layout (atomically) plus ``<file>.sha256``."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "arch": arch,
        "state_dict": {MOCO_PREFIX + k: v.detach().cpu() for k, v in encoder_state.items()},
        "fedclinic": meta,
    }
    temporary = target.with_name(target.name + ".tmp")
    torch.save(payload, temporary)
    os.replace(temporary, target)
    digest = file_sha256(target)
    Path(str(target) + ".sha256").write_text(f"{digest}  {target.name}\n", encoding="utf-8")
    return digest


def load_images(path: str | Path) -> torch.Tensor:
    """Unlabelled images from an ``.npz`` (key ``images``, or its only array) as float32 NCHW."""
    file = Path(path)
    if not file.is_file():
        raise DataError(f"public image file '{file}' does not exist")
    try:
        with np.load(file, allow_pickle=False) as archive:
            keys = list(archive.keys())
            if "images" in keys:
                array = archive["images"]
            elif len(keys) == 1:
                array = archive[keys[0]]
            else:
                raise DataError(
                    f"public image file '{file}' has arrays {keys}; expected one named 'images'"
                )
    except DataError:
        raise
    except Exception as err:
        raise DataError(
            f"public image file '{file}' is not a readable .npz: {file_problem(err)}"
        ) from None
    if array.ndim == 3:
        array = array[:, None]
    if array.ndim != 4 or array.shape[0] < 2:
        raise DataError(
            f"public image file '{file}': images have shape {array.shape}; "
            "expected (N>=2, C, H, W) or (N, H, W)"
        )
    if not np.issubdtype(array.dtype, np.number):
        raise DataError(
            f"public image file '{file}': images have dtype {array.dtype}; expected numbers"
        )
    images = array.astype(np.float32) / (255.0 if array.dtype == np.uint8 else 1.0)
    if not np.isfinite(images).all():
        raise DataError(f"public image file '{file}': images contain NaN or infinite values")
    return torch.from_numpy(images)


def synthetic_images(
    num_samples: int, in_channels: int, image_size: int, seed: int
) -> torch.Tensor:
    """Unlabelled public images from the synthetic generator (every split of one fake site)."""
    run = RunConfig(in_channels=in_channels, image_size=image_size, model="cnn", seed=seed)
    hospital = HospitalConfig(hospital="public-prior", num_samples=num_samples, data_seed=seed)
    data = synthetic.load(DataRequest(run, hospital))
    return torch.cat([data.train.inputs, data.val.inputs, data.test.inputs])


# ------------------------------------------------------------------------------ CLI


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``fedclinic prior train`` and ``fedclinic prior hash``."""
    prior = subparsers.add_parser(
        "prior", help="the shared frozen self-supervised prior of Fed-MAS (train once, hash)"
    )
    commands = prior.add_subparsers(dest="prior_command", required=True)

    train = commands.add_parser(
        "train",
        help="MoCo-v2 pretraining on unlabelled public images, once; writes the prior + SHA-256",
    )
    source = train.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help=".npz of unlabelled images (key 'images'), NCHW or NHW")
    source.add_argument(
        "--synthetic-samples", type=int, help="use this many images of the synthetic generator"
    )
    train.add_argument("--output", required=True, help="prior file to write (MoCo-v2 layout)")
    train.add_argument("--arch", choices=sorted(IMAGE_PRIORS), default="cnn", help="encoder")
    train.add_argument("--steps", type=_positive_int, default=200, help="MoCo steps")
    train.add_argument("--batch-size", type=_batch_size, default=64, help="images per step")
    train.add_argument("--learning-rate", type=float, default=0.06, help="SGD learning rate")
    train.add_argument("--temperature", type=float, default=0.2, help="InfoNCE temperature")
    train.add_argument(
        "--encoder-momentum", type=float, default=0.99, help="key encoder EMA momentum"
    )
    train.add_argument(
        "--queue-size", type=_positive_int, default=4096, help="capped at a quarter of the images"
    )
    train.add_argument("--seed", type=int, default=0, help="random seed")
    train.add_argument("--in-channels", type=_positive_int, default=1, help="synthetic images only")
    train.add_argument("--image-size", type=_positive_int, default=28, help="synthetic images only")
    train.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    train.set_defaults(handler=prior_train_command)

    digest = commands.add_parser(
        "hash", help="check that a file loads as a Fed-MAS prior and print its SHA-256"
    )
    digest.add_argument("path", help="prior file (MoCo-v2 checkpoint or state dict)")
    digest.add_argument(
        "--arch", choices=sorted(PRIOR_DIMS), default="resnet50", help="encoder of the file"
    )
    digest.set_defaults(handler=prior_hash_command)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _batch_size(text: str) -> int:
    value = int(text)
    if value < 4:
        raise argparse.ArgumentTypeError(f"expected a batch size of at least 4, got {text}")
    return value


def prior_train_command(args: argparse.Namespace) -> int:
    """Handler of ``fedclinic prior train``: 0 on success, 2 on a bad input (one line)."""
    try:
        device = select_device(args.device)
        if args.images:
            images = load_images(args.images)
            images_sha256 = file_sha256(args.images)
            source = str(args.images)
        else:
            images = synthetic_images(
                args.synthetic_samples, args.in_channels, args.image_size, args.seed
            )
            images_sha256 = content_sha256({"images": images})
            source = f"synthetic:{args.synthetic_samples}"
        settings = MocoSettings(
            arch=args.arch,
            steps=args.steps,
            batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            temperature=args.temperature,
            encoder_momentum=args.encoder_momentum,
            queue_size=args.queue_size,
            seed=args.seed,
        )
        state, stats = train_moco(images, settings, device)
        meta = {
            "tool": "fedclinic prior train",
            "method": "moco-v2",
            "images": source,
            "images_sha256": images_sha256,
            "num_images": int(images.shape[0]),
            "image_shape": [int(s) for s in images.shape[1:]],
            "steps": settings.steps,
            "batch_size": int(stats["batch_size"]),
            "queue_size": int(stats["queue_size"]),
            "learning_rate": settings.learning_rate,
            "encoder_momentum": settings.encoder_momentum,
            "temperature": settings.temperature,
            "seed": settings.seed,
            "final_loss": stats["final_loss"],
        }
        digest = save_prior(args.output, args.arch, state, meta)
    except FedClinicError as err:
        print(f"fedclinic prior train: {err}", file=sys.stderr)
        return 2
    print(f"prior written: {args.output} ({args.arch}, {PRIOR_DIMS[args.arch]}-d features)")
    print(
        f"MoCo-v2: {settings.steps} steps on {images.shape[0]} images "
        f"(batch {stats['batch_size']:.0f}, queue {stats['queue_size']:.0f}), "
        f"loss {stats['first_loss']:.3f} -> {stats['final_loss']:.3f}, {stats['seconds']:.1f} s"
    )
    print(f"sha256: {digest}")
    print(
        f'run config: fedmas.prior-sha256 = "{digest}"  fedmas.prior-arch = "{args.arch}"; '
        "give every hospital this same file (hospital config prior-path)"
    )
    return 0


def prior_hash_command(args: argparse.Namespace) -> int:
    """Handler of ``fedclinic prior hash``: load the file as a prior, print its SHA-256."""
    try:
        prior, prior_file = load_prior(args.path, args.arch)
        digest = file_sha256(args.path)
    except FedClinicError as err:
        print(f"fedclinic prior hash: {err}", file=sys.stderr)
        return 2
    print(
        f"{args.path}: {prior_file.origin}, {args.arch} encoder, {prior.in_channels} input "
        f"channel(s), {prior.dim}-d features; dropped {len(prior_file.dropped)} fc key(s)"
    )
    print(f"sha256: {digest}")
    print(f'run config: fedmas.prior-sha256 = "{digest}"  fedmas.prior-arch = "{args.arch}"')
    return 0
