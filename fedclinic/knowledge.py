"""FedHelp's one-time knowledge acquisition: foundation-model probabilities on public data.

FedHelp (arXiv 2412.19654 §3.2; docs/fedhelp.md, decision IDs FH-n defined at #decisions)
guides the small hospitals with the outputs of a foundation model on a **public** data set,
computed **once** before federated training and never updated. This module produces that
file and checks it where it is used.

``fedclinic knowledge build`` writes a *knowledge file* (``.npz``: ``probabilities``
``(N_pub, C_pub)`` float32, or ``(N_pub, C_pub, H, W)`` per pixel for segmentation, plus a
JSON ``meta`` entry) and its SHA-256, from one of three sources:

(a) ``--model-file``: a model the operator supplies as a file, run once over the public
    images: TorchScript (``torch.jit.save``) or a ``torch.export`` program (``.pt2``), or a
    state dict together with ``--architecture`` (``torchvision:<name>``, ``monai:<Name>`` or
    ``fedclinic:<name>``);
(b) ``--train-teacher``: when no pretrained weights can be had, a teacher network is trained
    once on the *labelled* public data and its outputs exported, then discarded. This is a
    **substitute** for a foundation model (design decision FH-2, substitute 2); the file's
    meta says so (``"substitute": true``);
(c) ``--logits-file``: outputs computed elsewhere (an API export) as ``.npy``/``.npz``,
    checked for shape (one row per public sample) and finiteness.

Raw outputs are always turned into **probabilities** before they are stored (softmax, or
sigmoid for a single binary logit; design decision FH-4: the reference code passes the
stored vectors as KL targets as they are, so they must be probabilities). The file records
the SHA-256 of the public data file it was computed on.

Public data: an ``.npz`` with ``images`` (and optional ``labels``) or the MedMNIST layout
``<split>_images`` / ``<split>_labels`` (``--split``, default ``train``); images ``(N, H, W)``,
``(N, H, W, C)`` or ``(N, C, H, W)``, uint8 (scaled to [0, 1]) or float; tabular data
``(N, F)``. Labels are optional (they enable the teacher and FedHelp's public CE, FH-5):
``(N,)`` classes, or ``(N, H, W)`` per-pixel masks for segmentation (the teacher is then a
UNet trained with Dice + CE, and the stored probabilities are per pixel).

Chain of trust at a small hospital (:func:`load_shared_knowledge`): the knowledge file must
have the SHA-256 the run config pins (``fedhelp.knowledge-sha256``), and the public data file
must have the SHA-256 the knowledge file records; anything else is an
:class:`~fedclinic.errors.IntegrityError`. No hospital data ever enters this module.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedclinic.data.synthetic import Acquisition, class_counts, generate_lesions
from fedclinic.data.synthetic_segmentation import lesion_kinds, masks_from_extent
from fedclinic.errors import ConfigError, DataError, FedClinicError, IntegrityError, file_problem
from fedclinic.models import ModelDims, build, model_spec
from fedclinic.serialization import file_sha256
from fedclinic.tasks import get_task
from fedclinic.training import LocalLoop, OptimizerSettings, StepResult, select_device

KNOWLEDGE_FORMAT = "fedclinic-knowledge/1"
#: architectures FedHelp can build for a teacher (source b) or a large hospital's private model
NETWORKS = ("resnet18", "resnet101", "densenet121", "wide-cnn", "cnn", "mlp", "unet", "unet-large")
#: the segmentation networks among them (per-pixel outputs, trained on masks)
SEGMENTATION_NETWORKS = ("unet", "unet-large")
#: row sums of stored probabilities may deviate this much from 1 (float32 rounding)
SUM_TOLERANCE = 1e-3


# ------------------------------------------------------------------------------ public data


@dataclass(frozen=True)
class PublicData:
    """A public data file as stored: raw images (or features), optional labels, its hash."""

    path: Path
    sha256: str
    split: str  # "" when the file has plain ``images``/``labels`` keys
    images: np.ndarray
    labels: np.ndarray | None

    def __len__(self) -> int:
        return int(self.images.shape[0])


def read_public_data(path: str | Path, split: str = "train") -> PublicData:
    """Read a public ``.npz`` (``images``/``labels`` or MedMNIST ``<split>_images``/``_labels``)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(f"public data file '{file}' does not exist")
    try:
        archive = np.load(file, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise DataError(
            f"public data file '{file}' is not a readable .npz ({_line(err)})"
        ) from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(f"public data file '{file}' is a single array; expected an .npz archive")
    with archive:
        if "images" in archive.files:
            image_key, label_key, used_split = "images", "labels", ""
        elif f"{split}_images" in archive.files:
            image_key, label_key, used_split = f"{split}_images", f"{split}_labels", split
        else:
            raise DataError(
                f"public data file '{file}' has keys {', '.join(archive.files) or '(none)'}; "
                f"expected 'images' (+ optional 'labels') or '{split}_images' "
                f"(+ optional '{split}_labels')"
            )
        try:
            images = archive[image_key]
            labels = archive[label_key] if label_key in archive.files else None
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:
            raise DataError(
                f"public data file '{file}': a member is corrupt ({_line(err)})"
            ) from None
    if images.ndim not in (2, 3, 4) or images.shape[0] == 0:
        raise DataError(
            f"public data file '{file}': '{image_key}' has shape {images.shape}; expected "
            "(N, H, W), (N, H, W, C), (N, C, H, W) or (N, F) with N > 0"
        )
    if labels is not None:
        labels = _public_labels(file, label_key, labels, int(images.shape[0]))
    return PublicData(file, file_sha256(file), used_split, images, labels)


def _public_labels(file: Path, key: str, labels: np.ndarray, count: int) -> np.ndarray:
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim not in (1, 3) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"public data file '{file}': '{key}' has shape {labels.shape} and dtype "
            f"{labels.dtype}; expected (N,) or (N, 1) integer class labels, or (N, H, W) "
            "integer masks"
        )
    if len(labels) != count:
        raise DataError(
            f"public data file '{file}': '{key}' has {len(labels)} labels for {count} images"
        )
    if labels.min() < 0:
        raise DataError(f"public data file '{file}': '{key}' contains a negative label")
    return labels.astype(np.int64)


def public_inputs(
    data: PublicData,
    in_channels: int | None = None,
    image_size: int | None = None,
    num_features: int | None = None,
) -> torch.Tensor:
    """Model inputs ``(N, C, H, W)`` float32 (or ``(N, F)`` for tabular data).

    uint8 images are scaled to [0, 1]; grey images are repeated to ``in_channels``, RGB
    images are averaged to grey when one channel is asked for; ``image_size`` resizes
    (bilinear, antialiased) to a square when the stored size differs.
    """
    array, where = data.images, f"public data file '{data.path}'"
    if np.issubdtype(array.dtype, np.integer):
        values = torch.from_numpy(array.astype(np.float32) / 255.0)
    elif np.issubdtype(array.dtype, np.floating):
        values = torch.from_numpy(array.astype(np.float32))
    else:
        raise DataError(f"{where}: images have dtype {array.dtype}; expected uint8 or float")
    if not torch.isfinite(values).all():
        raise DataError(f"{where}: the images contain NaN or infinite values")
    if values.ndim == 2:
        if num_features is not None and values.shape[1] != num_features:
            raise DataError(
                f"{where}: {values.shape[1]} features per sample; the run expects "
                f"{num_features} (run config num-features)"
            )
        return values.contiguous()
    if num_features is not None and in_channels is None:
        raise DataError(f"{where}: holds images; the run's model expects {num_features} features")
    if values.ndim == 3:
        values = values[:, None]
    elif values.shape[-1] in (1, 3) and values.shape[1] not in (1, 3):
        values = values.permute(0, 3, 1, 2)
    elif values.shape[1] not in (1, 3):
        raise DataError(
            f"{where}: images of shape {tuple(array.shape)} have neither 1 nor 3 channels"
        )
    channels = values.shape[1]
    if in_channels is not None and channels != in_channels:
        if channels == 1:
            values = values.expand(-1, in_channels, -1, -1)
        elif in_channels == 1:
            values = values.mean(dim=1, keepdim=True)
        else:
            raise DataError(
                f"{where}: images have {channels} channels; {in_channels} are expected "
                "(only grey-to-colour and colour-to-grey conversions are made)"
            )
    if image_size is not None and tuple(values.shape[-2:]) != (image_size, image_size):
        values = F.interpolate(
            values,
            size=(image_size, image_size),
            mode="bilinear",
            antialias=True,
            align_corners=False,
        )
    return values.to(torch.float32).contiguous()


def write_synthetic_public(
    path: str | Path,
    num_samples: int,
    num_classes: int,
    image_size: int = 28,
    in_channels: int = 1,
    seed: int = 1000,
    task: str = "classification",
) -> Path:
    """A labelled public set from the synthetic generator, MedMNIST layout (``train_*``).

    For demos and tests: use a ``seed`` different from the hospitals' so the public images
    are new draws of the same lesion types, not copies of any hospital's data. With
    ``task = "segmentation"`` the labels are the images' masks ``(N, H, W)`` (as the
    synthetic segmentation source draws them, ``num_classes`` including background).
    """
    kinds = lesion_kinds(num_classes) if task == "segmentation" else num_classes
    counts = class_counts(num_samples, [], kinds)
    labels = torch.repeat_interleave(torch.arange(kinds), torch.as_tensor(counts))
    labels = labels[torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed))]
    images, extent = generate_lesions(labels, image_size, in_channels, Acquisition(), seed)
    pixels = (images * 255).round().clamp(0, 255).to(torch.uint8).numpy()
    pixels = pixels[:, 0] if in_channels == 1 else pixels.transpose(0, 2, 3, 1)
    if task == "segmentation":
        stored = masks_from_extent(extent, labels, num_classes).to(torch.uint8).numpy()
    else:
        stored = labels.numpy()[:, None]
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(target.name + ".tmp")
    with temporary.open("wb") as handle:
        np.savez(handle, train_images=pixels, train_labels=stored)
    os.replace(temporary, target)
    return target


# ------------------------------------------------------------------------------ networks


def build_network(name: str, num_classes: int, input_shape: Sequence[int]) -> nn.Module:
    """A teacher or large-model architecture of :mod:`fedclinic.models` for inputs of
    ``input_shape`` (``(C, H, W)`` or ``(F,)``).

    ``wide-cnn`` is the run's small CNN three times as wide (48 instead of 16 channels):
    a CPU-sized "large" model; ``mlp`` is a two-hidden-layer perceptron on the flattened
    inputs (tabular data); ``unet`` / ``unet-large`` are the segmentation networks.
    """
    if name not in NETWORKS:
        raise ConfigError(f"network {name!r} is unknown: expected one of {', '.join(NETWORKS)}")
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3 and not model_spec(name).tabular:
        raise ConfigError(
            f"network {name!r} needs image inputs (C, H, W); the inputs have shape {shape} "
            "(use 'mlp' for tabular data)"
        )
    images = len(shape) == 3
    dims = ModelDims(
        num_classes=num_classes,
        in_channels=shape[0] if images else 1,
        image_size=shape[1] if images else 1,
        num_features=math.prod(shape),
    )
    return build(name, dims)


# ------------------------------------------------------------------------------ sources


def load_model_file(
    path: str | Path,
    architecture: str = "",
    num_outputs: int = 0,
    in_channels: int = 3,
    image_size: int = 224,
) -> nn.Module:
    """Source (a): the operator's model file (TorchScript / ``.pt2``, or state dict + arch)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(f"model file '{file}' does not exist")
    if not architecture:
        return _load_program(file)
    model = _architecture(architecture, num_outputs, in_channels, image_size)
    try:
        raw = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a corrupt file
        raise DataError(
            f"model file '{file}' is not a readable state dict ({_line(err)})"
        ) from None
    if isinstance(raw, dict) and isinstance(raw.get("state_dict"), dict):
        raw = raw["state_dict"]
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise DataError(f"model file '{file}' does not hold a state dict of tensors")
    state = {k.removeprefix("module."): v for k, v in raw.items()}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        problems = [
            f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape", wrong))
            if keys
        ]
        raise DataError(
            f"model file '{file}' does not fit architecture {architecture!r} with "
            f"{num_outputs} outputs ({'; '.join(problems)})"
        )
    model.load_state_dict(state)
    return model


def _load_program(file: Path) -> nn.Module:
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit deprecation notice
            if file.suffix == ".pt2":
                return torch.export.load(str(file)).module()
            return torch.jit.load(str(file), map_location="cpu")
    except Exception as err:  # torch raises many types for a corrupt or foreign file
        raise DataError(
            f"model file '{file}' is not a TorchScript (.pt) or torch.export (.pt2) program "
            f"({_line(err)}); for a state dict, also give --architecture"
        ) from None


def _architecture(name: str, num_outputs: int, in_channels: int, image_size: int) -> nn.Module:
    if num_outputs < 1:
        raise ConfigError("--num-outputs is required with --architecture (the model's classes)")
    family, _, arch = name.partition(":") if ":" in name else ("torchvision", "", name)
    if family == "torchvision":
        import torchvision

        if arch not in torchvision.models.list_models():
            raise ConfigError(f"--architecture {name!r}: torchvision has no model {arch!r}")
        return torchvision.models.get_model(arch, weights=None, num_classes=num_outputs)
    if family == "monai":
        import monai.networks.nets as nets

        constructor = getattr(nets, arch, None)
        if constructor is None:
            raise ConfigError(f"--architecture {name!r}: monai.networks.nets has no {arch!r}")
        return constructor(spatial_dims=2, in_channels=in_channels, out_channels=num_outputs)
    if family == "fedclinic":
        return build_network(arch, num_outputs, (in_channels, image_size, image_size))
    raise ConfigError(
        f"--architecture {name!r}: expected torchvision:<name>, monai:<Name> or fedclinic:<name>"
    )


@torch.no_grad()
def model_probabilities(
    model: nn.Module, inputs: torch.Tensor, device: torch.device, batch_size: int = 64
) -> np.ndarray:
    """Run ``model`` once over the public inputs; softmax/sigmoid of its outputs (FH-4)."""
    model.to(device).eval()
    chunks = []
    for start in range(0, len(inputs), batch_size):
        output = model(inputs[start : start + batch_size].to(device))
        if isinstance(output, tuple | list):  # e.g. CLIP-style (logits_per_image, ...)
            output = output[0]
        if not isinstance(output, torch.Tensor):
            raise DataError(
                f"the model returned {type(output).__name__}; expected a tensor of logits"
            )
        chunks.append(output.float().cpu())
    logits = torch.cat(chunks)
    return logits_to_probabilities(logits.numpy(), len(inputs), "the model's outputs")


def train_teacher(
    inputs: torch.Tensor,
    labels: np.ndarray,
    network: str,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    weight_decay: float,
    seed: int,
    device: torch.device,
) -> tuple[nn.Module, dict[str, float]]:
    """Source (b), the FH-2 substitute: train a teacher once on the labelled public data (Adam).

    Class labels ``(N,)``: cross-entropy; masks ``(N, H, W)``: a segmentation network trained
    with the segmentation task's Dice + CE.
    """
    dense = labels.ndim == 3
    if dense != (network in SEGMENTATION_NETWORKS):
        expected = ", ".join(SEGMENTATION_NETWORKS) if dense else "a classification network"
        raise ConfigError(
            f"--train-teacher {network}: the public labels are "
            f"{'masks' if dense else 'class labels'}; expected {expected}"
        )
    loss_of = get_task("segmentation" if dense else "classification").loss
    num_classes = int(labels.max()) + 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_network(network, max(num_classes, 2), tuple(inputs.shape[1:]))
    model.to(device).train()
    loop = LocalLoop(device)
    settings = OptimizerSettings("adam", learning_rate, weight_decay=weight_decay)
    updater = loop.updater(model.parameters(), settings)
    targets = torch.from_numpy(labels)
    generator = torch.Generator().manual_seed(seed)

    def step(batch: tuple[torch.Tensor, torch.Tensor]) -> StepResult:
        x, y = batch
        with loop.autocast():
            loss = loss_of(model(x), y)
        updater.step(loss)
        return len(y), {"loss": loss}

    started, loss_value = time.perf_counter(), float("nan")
    for _ in range(epochs):  # one run per epoch: the last epoch's mean loss is reported
        order = torch.randperm(len(inputs), generator=generator)
        chunks = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
        # a lazy pass over this epoch's order: run() takes exactly its len(chunks) batches
        batches = loop.cycle((inputs[index], targets[index]) for index in chunks)
        loss_value = loop.run(len(chunks), batches, step).loss
    return model, {"final_loss": loss_value, "seconds": time.perf_counter() - started}


def read_logits_file(
    path: str | Path, num_public: int, key: str = "", already_probabilities: bool = False
) -> np.ndarray:
    """Source (c): logits (or probabilities) computed elsewhere, checked and made probabilities."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(f"logits file '{file}' does not exist")
    if file.suffix not in (".npy", ".npz"):
        raise DataError(f"logits file '{file}': expected a .npy or .npz file")
    try:
        loaded = np.load(file, allow_pickle=False)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded:
                names = loaded.files
                if key:
                    chosen = key
                elif len(names) == 1:
                    chosen = names[0]
                else:
                    chosen = next((n for n in ("logits", "probabilities") if n in names), "")
                if chosen not in names:
                    raise DataError(
                        f"logits file '{file}' has arrays {', '.join(names) or '(none)'}; name "
                        "one with --logits-key (or store a single array, or 'logits')"
                    )
                array = loaded[chosen]
        else:
            array = loaded
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        raise DataError(f"logits file '{file}' is unreadable or corrupt ({_line(err)})") from None
    what = f"logits file '{file}'"
    if already_probabilities:
        return check_probabilities(np.asarray(array), num_public, what)
    return logits_to_probabilities(np.asarray(array), num_public, what)


def logits_to_probabilities(logits: np.ndarray, num_public: int, what: str) -> np.ndarray:
    """Softmax over classes (sigmoid for one binary logit) after shape and finiteness checks;
    per pixel for ``(N, C, H, W)`` segmentation logits."""
    values = _check_matrix(logits, num_public, what)
    tensor = torch.from_numpy(values.astype(np.float64))
    if tensor.shape[1] == 1:
        positive = torch.sigmoid(tensor[:, 0])
        probabilities = torch.stack([1 - positive, positive], dim=1)
    else:
        probabilities = torch.softmax(tensor, dim=1)
    return probabilities.numpy().astype(np.float32)


def check_probabilities(values: np.ndarray, num_public: int, what: str) -> np.ndarray:
    """Probabilities as given: in [0, 1], summing to 1 over classes (axis 1, per pixel for
    ``(N, C, H, W)``); renormalised in float32."""
    matrix = _check_matrix(values, num_public, what).astype(np.float64)
    if matrix.shape[1] < 2:
        raise DataError(f"{what}: probabilities need at least 2 columns (classes); found 1")
    if (matrix < 0).any() or (matrix > 1).any():
        raise DataError(
            f"{what}: values outside [0, 1] are not probabilities (drop the flag for logits)"
        )
    sums = matrix.sum(axis=1, keepdims=True)
    worst = np.unravel_index(int(np.argmax(np.abs(sums - 1))), sums.shape)
    if abs(sums[worst] - 1) > SUM_TOLERANCE:
        raise DataError(
            f"{what}: row {worst[0]} sums to {sums[worst]:.6f}; probabilities must sum to 1"
        )
    return (matrix / sums).astype(np.float32)


def _check_matrix(values: np.ndarray, num_public: int, what: str) -> np.ndarray:
    if values.ndim not in (2, 4):
        raise DataError(
            f"{what} has shape {values.shape}; expected (N, C) = ({num_public}, classes), "
            "one row per public sample, or (N, C, H, W) per pixel"
        )
    if values.shape[0] != num_public:
        raise DataError(
            f"{what} has {values.shape[0]} rows; the public data has {num_public} samples "
            f"(expected shape ({num_public}, classes))"
        )
    if values.shape[1] < 1:
        raise DataError(f"{what} has no columns; expected one per class")
    if not np.issubdtype(values.dtype, np.number) or np.issubdtype(
        values.dtype, np.complexfloating
    ):
        raise DataError(f"{what} has dtype {values.dtype}; expected real numbers")
    bad = ~np.isfinite(values.astype(np.float64))
    if bad.any():
        row = int(np.argwhere(bad)[0][0])
        raise DataError(f"{what} contains NaN or infinite values (first in row {row})")
    return values


# ------------------------------------------------------------------------------ the file


@dataclass(frozen=True)
class Knowledge:
    """A verified knowledge file: probabilities ``(N_pub, C_pub)`` (or ``(N_pub, C_pub, H, W)``
    per pixel), its meta and SHA-256."""

    probabilities: torch.Tensor
    meta: dict[str, Any]
    sha256: str

    @property
    def num_classes(self) -> int:
        return int(self.probabilities.shape[1])


def write_knowledge(path: str | Path, probabilities: np.ndarray, meta: dict[str, Any]) -> str:
    """Write the knowledge ``.npz`` atomically plus ``<file>.sha256``; return the SHA-256."""
    target = Path(path).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(target.name + ".tmp")
    full_meta = {"format": KNOWLEDGE_FORMAT, **meta}
    with temporary.open("wb") as handle:
        np.savez(
            handle,
            probabilities=np.ascontiguousarray(probabilities, dtype=np.float32),
            meta=np.array(json.dumps(full_meta, sort_keys=True)),
        )
    os.replace(temporary, target)
    digest = file_sha256(target)
    target.with_name(target.name + ".sha256").write_text(f"{digest}  {target.name}\n")
    return digest


def read_knowledge(path: str | Path, expected_sha256: str | None = None) -> Knowledge:
    """Read a knowledge file; with ``expected_sha256`` refuse any other file (IntegrityError)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(f"knowledge file '{file}' does not exist")
    digest = file_sha256(file)
    if expected_sha256 is not None and digest != expected_sha256.strip().lower():
        raise IntegrityError(
            f"knowledge file '{file}' has SHA-256 {digest}, but the run config pins "
            f"fedhelp.knowledge-sha256 = {expected_sha256}; refusing a file that differs from "
            "the agreed one (copy the coordinator's file again)"
        )
    try:
        with np.load(file, allow_pickle=False) as archive:
            if "probabilities" not in archive.files or "meta" not in archive.files:
                raise DataError(
                    f"knowledge file '{file}' lacks 'probabilities' or 'meta'; write it with "
                    "'fedclinic knowledge build'"
                )
            probabilities = archive["probabilities"]
            meta = json.loads(str(archive["meta"]))
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, AttributeError) as err:
        raise DataError(
            f"knowledge file '{file}' is unreadable or corrupt ({_line(err)})"
        ) from None
    if not isinstance(meta, dict) or meta.get("format") != KNOWLEDGE_FORMAT:
        raise DataError(f"knowledge file '{file}': format is not {KNOWLEDGE_FORMAT}")
    number = int(meta.get("num_public", -1))
    checked = check_probabilities(probabilities, number, f"knowledge file '{file}'")
    return Knowledge(torch.from_numpy(checked), meta, digest)


@dataclass(frozen=True)
class SharedKnowledge:
    """What a small hospital distils from: public inputs, optional labels, probabilities."""

    inputs: torch.Tensor
    labels: torch.Tensor | None
    knowledge: Knowledge
    note: str = ""


def load_shared_knowledge(
    knowledge_path: str | Path,
    public_path: str | Path,
    expected_sha256: str | None,
    in_channels: int | None,
    image_size: int | None,
    num_features: int | None = None,
) -> SharedKnowledge:
    """The chain of trust: run config pins the knowledge file, which pins the public data."""
    knowledge = read_knowledge(knowledge_path, expected_sha256)
    public = read_public_data(public_path, str(knowledge.meta.get("public_split", "train")))
    recorded = str(knowledge.meta.get("public_data_sha256", ""))
    if public.sha256 != recorded:
        raise IntegrityError(
            f"public data file '{public.path}' has SHA-256 {public.sha256}, but knowledge file "
            f"'{knowledge_path}' was computed on public data with SHA-256 {recorded}; refusing "
            "mismatched public data"
        )
    if len(public) != len(knowledge.probabilities):
        raise DataError(
            f"public data file '{public.path}' has {len(public)} samples; knowledge file "
            f"'{knowledge_path}' has {len(knowledge.probabilities)} rows"
        )
    inputs = public_inputs(public, in_channels, image_size, num_features)
    if knowledge.probabilities.ndim == 4 and image_size is not None:
        knowledge = replace(
            knowledge, probabilities=resize_dense(knowledge.probabilities, image_size, "bilinear")
        )
    labels, note = None, ""
    if public.labels is not None:
        if int(public.labels.max()) < knowledge.num_classes:
            labels = torch.from_numpy(public.labels)
            if labels.ndim == 3 and image_size is not None:
                labels = resize_dense(labels, image_size, "nearest")
        else:  # e.g. a foundation model with its own label space: no CE on public labels
            note = (
                f"public label {int(public.labels.max())} is outside the knowledge file's "
                f"{knowledge.num_classes} classes; the public labels are not used"
            )
    return SharedKnowledge(inputs, labels, knowledge, note)


def resize_dense(values: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """Per-pixel probabilities ``(N, C, H, W)`` (bilinear, renormalised) or masks ``(N, H, W)``
    (nearest) at ``size`` x ``size``, when the public images were resized for the run."""
    if tuple(values.shape[-2:]) == (size, size):
        return values
    if mode == "nearest":
        resized = F.interpolate(values[:, None].float(), (size, size), mode="nearest-exact")
        return resized[:, 0].round().long()
    resized = F.interpolate(values.float(), (size, size), mode="bilinear", align_corners=False)
    return resized / resized.sum(dim=1, keepdim=True)


# ------------------------------------------------------------------------------ producing


def build_knowledge(
    public_data: str | Path,
    output: str | Path,
    *,
    split: str = "train",
    model_file: str | Path | None = None,
    architecture: str = "",
    num_outputs: int = 0,
    train_teacher_network: str | None = None,
    logits_file: str | Path | None = None,
    logits_key: str = "",
    already_probabilities: bool = False,
    input_channels: int | None = None,
    input_size: int | None = None,
    mean: Sequence[float] = (),
    std: Sequence[float] = (),
    batch_size: int = 64,
    epochs: int = 10,
    learning_rate: float = 1e-3,
    weight_decay: float = 1e-4,
    seed: int = 0,
    device: torch.device | None = None,
) -> tuple[str, dict[str, Any]]:
    """Produce a knowledge file from exactly one source; return ``(sha256, meta)``."""
    chosen = [s for s in (model_file, train_teacher_network, logits_file) if s]
    if len(chosen) != 1:
        raise ConfigError(
            "fedclinic knowledge build: give exactly one source: --model-file, --train-teacher "
            "or --logits-file"
        )
    device = device or torch.device("cpu")
    public = read_public_data(public_data, split)
    meta: dict[str, Any] = {
        "tool": "fedclinic knowledge build",
        "public_data": public.path.name,
        "public_data_sha256": public.sha256,
        "public_split": public.split,
        "num_public": len(public),
        "public_labels": public.labels is not None,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "stored": "probabilities (softmax of the source's logits, FH-4)",
    }

    def inputs() -> torch.Tensor:
        values = public_inputs(public, input_channels, input_size)
        if mean or std:
            if values.ndim != 4 or len(mean) != values.shape[1] or len(std) != values.shape[1]:
                raise ConfigError(
                    f"--mean/--std need one value per channel ({values.shape[1]} channel(s))"
                )
            shape = (1, -1, 1, 1)
            values = (values - torch.tensor(mean).view(shape)) / torch.tensor(std).view(shape)
        return values

    if model_file:
        x = inputs()
        channels = int(x.shape[1]) if x.ndim == 4 else 1
        size = int(x.shape[-1])
        model = load_model_file(model_file, architecture, num_outputs, channels, size)
        probabilities = model_probabilities(model, x, device, batch_size)
        meta.update(
            source="model-file",
            substitute=False,
            model_file=Path(model_file).name,
            model_sha256=file_sha256(Path(model_file).expanduser()),
            architecture=architecture or "program (TorchScript / torch.export)",
        )
    elif train_teacher_network:
        if public.labels is None:
            raise DataError(
                f"public data file '{public.path}' has no labels; --train-teacher needs labelled "
                "public data (or supply a model file or a logits file)"
            )
        x = inputs()
        teacher, stats = train_teacher(
            x,
            public.labels,
            train_teacher_network,
            epochs,
            batch_size,
            learning_rate,
            weight_decay,
            seed,
            device,
        )
        probabilities = model_probabilities(teacher, x, device, batch_size)
        accuracy = float((probabilities.argmax(axis=1) == public.labels).mean())
        meta.update(
            source="teacher",
            substitute=True,
            note=(
                "FH-2 substitute 2: no foundation model; a teacher trained once on the labelled "
                "public data, its outputs exported once, the teacher discarded"
            ),
            teacher=train_teacher_network,
            teacher_epochs=epochs,
            teacher_seed=seed,
            teacher_final_loss=stats["final_loss"],
            teacher_public_accuracy=accuracy,
        )
    else:
        assert logits_file is not None
        probabilities = read_logits_file(
            logits_file, len(public), logits_key, already_probabilities
        )
        meta.update(
            source="logits-file",
            substitute=False,
            logits_file=Path(logits_file).name,
            logits_sha256=file_sha256(Path(logits_file).expanduser()),
            given_as="probabilities" if already_probabilities else "logits",
        )
    meta["num_classes"] = int(probabilities.shape[1])
    digest = write_knowledge(output, probabilities, meta)
    return digest, meta


# ------------------------------------------------------------------------------ CLI


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``fedclinic knowledge build``, ``fedclinic knowledge check``, ``fedclinic knowledge
    synthetic-public``."""
    knowledge = subparsers.add_parser(
        "knowledge",
        help="FedHelp: one-time foundation-model probabilities on public data (+ SHA-256)",
    )
    commands = knowledge.add_subparsers(dest="knowledge_command", required=True)

    build = commands.add_parser(
        "build", help="compute the public-data probabilities once and write the knowledge file"
    )
    build.add_argument("--public-data", required=True, help="public .npz (images [+ labels])")
    build.add_argument("--split", default="train", help="MedMNIST-layout split (default train)")
    build.add_argument("--output", required=True, help="knowledge file to write (.npz)")
    source = build.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--model-file", help="(a) TorchScript/.pt2 program, or a state dict with --architecture"
    )
    source.add_argument(
        "--train-teacher",
        metavar="NETWORK",
        choices=NETWORKS,
        help="(b) FH-2 substitute: train a teacher NETWORK on the labelled public data "
        f"({', '.join(NETWORKS)})",
    )
    source.add_argument("--logits-file", help="(c) .npy/.npz of logits computed elsewhere")
    build.add_argument(
        "--architecture", default="", help="torchvision:<name>, monai:<Name> or fedclinic:<name>"
    )
    build.add_argument("--num-outputs", type=int, default=0, help="classes of --architecture")
    build.add_argument("--logits-key", default="", help="array name inside a .npz logits file")
    build.add_argument(
        "--already-probabilities",
        action="store_true",
        help="the logits file holds probabilities (checked, not softmaxed again)",
    )
    build.add_argument("--input-channels", type=int, default=None, help="model input channels")
    build.add_argument("--input-size", type=int, default=None, help="model input size (resize)")
    build.add_argument(
        "--mean", default="", help="per-channel normalisation, e.g. 0.485,0.456,0.406"
    )
    build.add_argument(
        "--std", default="", help="per-channel normalisation, e.g. 0.229,0.224,0.225"
    )
    build.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    build.add_argument("--epochs", type=int, default=10, help="teacher epochs")
    build.add_argument("--learning-rate", type=float, default=1e-3, help="teacher Adam lr")
    build.add_argument("--weight-decay", type=float, default=1e-4, help="teacher Adam wd")
    build.add_argument("--seed", type=int, default=0, help="teacher seed")
    build.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    build.set_defaults(handler=knowledge_build_command)

    check = commands.add_parser(
        "check", help="verify a knowledge file (and its public data) as a small hospital would"
    )
    check.add_argument("knowledge", help="knowledge file")
    check.add_argument("--public-data", default="", help="public .npz to check against the file")
    check.add_argument("--sha256", default="", help="the SHA-256 pinned in the run config")
    check.set_defaults(handler=knowledge_check_command)

    synthetic = commands.add_parser(
        "synthetic-public", help="write a labelled synthetic public set (demos and tests)"
    )
    synthetic.add_argument("--output", required=True, help=".npz to write (MedMNIST layout)")
    synthetic.add_argument("--num-samples", type=int, default=600, help="images to generate")
    synthetic.add_argument("--num-classes", type=int, default=2, help="lesion classes")
    synthetic.add_argument("--image-size", type=int, default=28, help="pixels per side")
    synthetic.add_argument("--in-channels", type=int, default=1, help="image channels")
    synthetic.add_argument("--seed", type=int, default=1000, help="differ from the hospitals'")
    synthetic.add_argument(
        "--task",
        choices=("classification", "segmentation"),
        default="classification",
        help="segmentation: per-pixel masks as labels (num-classes includes background)",
    )
    synthetic.set_defaults(handler=knowledge_synthetic_command)


def _floats(text: str, option: str) -> list[float]:
    if not text:
        return []
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise ConfigError(f"{option} = {text!r}: expected comma-separated numbers") from None


def knowledge_build_command(args: argparse.Namespace) -> int:
    """Handler of ``fedclinic knowledge build``: 0 on success, 2 on a bad input (one line)."""
    try:
        for name in ("batch_size", "epochs"):
            if getattr(args, name) < 1:
                raise ConfigError(
                    f"--{name.replace('_', '-')} = {getattr(args, name)}: expected >= 1"
                )
        digest, meta = build_knowledge(
            args.public_data,
            args.output,
            split=args.split,
            model_file=args.model_file,
            architecture=args.architecture,
            num_outputs=args.num_outputs,
            train_teacher_network=args.train_teacher,
            logits_file=args.logits_file,
            logits_key=args.logits_key,
            already_probabilities=args.already_probabilities,
            input_channels=args.input_channels,
            input_size=args.input_size,
            mean=_floats(args.mean, "--mean"),
            std=_floats(args.std, "--std"),
            batch_size=args.batch_size,
            epochs=args.epochs,
            learning_rate=args.learning_rate,
            weight_decay=args.weight_decay,
            seed=args.seed,
            device=select_device(args.device),
        )
    except FedClinicError as err:
        print(f"fedclinic knowledge build: {err}", file=sys.stderr)
        return 2
    kind = (
        "SUBSTITUTE teacher (FH-2), not a foundation model"
        if meta["substitute"]
        else meta["source"]
    )
    print(
        f"knowledge written: {args.output} ({meta['num_public']} public samples x "
        f"{meta['num_classes']} classes, probabilities; source: {kind})"
    )
    print(f"sha256: {digest}")
    print(
        f'run config: fedhelp.knowledge-sha256 = "{digest}"; give every small hospital this file '
        "(hospital config knowledge-path) and the public data (public-data-path)"
    )
    return 0


def knowledge_check_command(args: argparse.Namespace) -> int:
    """Handler of ``fedclinic knowledge check``: verify like a small hospital, print the hash."""
    try:
        expected = args.sha256 or None  # without a pin, only the file itself is checked
        if args.public_data:
            shared = load_shared_knowledge(args.knowledge, args.public_data, expected, None, None)
            knowledge = shared.knowledge
        else:
            knowledge = read_knowledge(args.knowledge, expected)
    except FedClinicError as err:
        print(f"fedclinic knowledge check: {err}", file=sys.stderr)
        return 2
    meta = knowledge.meta
    substitute = " (SUBSTITUTE, FH-2)" if meta.get("substitute") else ""
    print(
        f"{args.knowledge}: {meta.get('num_public')} public samples x {knowledge.num_classes} "
        f"classes; source {meta.get('source')}{substitute}; "
        f"public data SHA-256 {meta.get('public_data_sha256')}"
    )
    print(f"sha256: {knowledge.sha256}")
    return 0


def knowledge_synthetic_command(args: argparse.Namespace) -> int:
    """Handler of ``fedclinic knowledge synthetic-public``."""
    try:
        most = 7 if args.task == "segmentation" else 6  # background + the six lesion types
        if not 2 <= args.num_classes <= most or args.num_samples < args.num_classes:
            raise ConfigError(
                f"--num-classes must be 2..{most} and --num-samples at least --num-classes"
            )
        path = write_synthetic_public(
            args.output,
            args.num_samples,
            args.num_classes,
            args.image_size,
            args.in_channels,
            args.seed,
            args.task,
        )
    except FedClinicError as err:
        print(f"fedclinic knowledge synthetic-public: {err}", file=sys.stderr)
        return 2
    print(f"public data written: {path} ({args.num_samples} labelled synthetic images)")
    print(f"sha256: {file_sha256(path)}")
    return 0


def _line(err: BaseException) -> str:
    return file_problem(err)
