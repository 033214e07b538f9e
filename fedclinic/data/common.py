"""Small checks and constructors shared by the data sources (one place, one wording)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from fedclinic.config import HospitalConfig
from fedclinic.data.base import DataRequest, HospitalData, Split
from fedclinic.data.splits import DEFAULT_TEST_FRACTION, stratified_split, train_val_test_split
from fedclinic.errors import ConfigError, DataError

SPLITS = ("train", "val", "test")
Item = TypeVar("Item")


class FileProblem(DataError):
    """A problem with one file: ``str()`` names the file (site log); ``problem`` is the same
    without the path and without any value read from the file (what may be shared). Raised
    by decoders the site's cache calls, so a source can name the file's place for the
    coordinator (``image 8 of class 'malignant'``, ``DICOM file #12``). ``local`` replaces
    the site log's text where it names more than this file."""

    def __init__(self, path: Path, problem: str, detail: str = "", local: str = "") -> None:
        text = local or f"{path}: {problem}{f' ({detail})' if detail else ''}"
        super().__init__(text, shared=problem)
        self.path = path
        self.problem = problem


def require_image_model(request: DataRequest, source: str) -> None:
    """Image sources cannot feed the tabular ``logreg`` model."""
    if request.run.model == "logreg":
        raise ConfigError(
            f"run config: key 'model' = 'logreg' is not allowed with data source '{source}': "
            "it produces images; use an image model (cnn, resnet18, resnet101, densenet121)"
        )


def require_grey_or_colour(request: DataRequest, source: str) -> None:
    """Image files are grey or RGB: the run must ask for 1 or 3 channels."""
    if request.run.in_channels not in (1, 3):
        raise ConfigError(
            f"run config: key 'in-channels' = {request.run.in_channels} is not allowed with "
            f"data source '{source}': expected 1 (grey) or 3 (RGB)"
        )


def require_path(hospital: HospitalConfig, source: str, what: str) -> Path:
    """The hospital's ``data-path``, which file-based sources cannot do without."""
    if not hospital.data_path:
        raise ConfigError(
            f"hospital config: key 'data-path' is empty; data source '{source}' expects {what}"
        )
    return Path(hospital.data_path).expanduser()


def require_data_path(request: DataRequest, what: str) -> Path:
    """:func:`require_path` for a load."""
    return require_path(request.hospital, request.source, what)


def make_split(inputs: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray) -> Split:
    """A :class:`Split` with float32 inputs and 1-D int64 labels."""
    x = torch.as_tensor(np.asarray(inputs) if isinstance(inputs, np.ndarray) else inputs)
    y = torch.as_tensor(np.asarray(labels) if isinstance(labels, np.ndarray) else labels)
    return Split(x.to(torch.float32).contiguous(), y.to(torch.int64).reshape(-1).contiguous())


def make_mask_split(inputs: torch.Tensor | np.ndarray, masks: torch.Tensor | np.ndarray) -> Split:
    """A segmentation :class:`Split`: float32 images ``(N, C, H, W)``, int64 masks ``(N, H, W)``."""
    x = torch.as_tensor(np.asarray(inputs) if isinstance(inputs, np.ndarray) else inputs)
    y = torch.as_tensor(np.asarray(masks) if isinstance(masks, np.ndarray) else masks)
    return Split(x.to(torch.float32).contiguous(), y.to(torch.int64).contiguous())


def empty_split(sample_shape: tuple[int, ...]) -> Split:
    return Split(torch.zeros((0, *sample_shape)), torch.zeros(0, dtype=torch.int64))


def subset(split: Split, indices: np.ndarray) -> Split:
    index = torch.as_tensor(indices, dtype=torch.int64)
    return Split(split.inputs[index].contiguous(), split.labels[index].contiguous())


def split_here(
    whole: Split, items: Sequence[Item], strata: np.ndarray, val_fraction: float, seed: int
) -> tuple[dict[str, Split], dict[str, list[Item]]]:
    """Train/val/test (test 15 %, val ``val_fraction``) stratified by ``strata``, with the
    items (files, cases) that went where, in the order of each split."""
    split = train_val_test_split(strata, val_fraction, DEFAULT_TEST_FRACTION, seed)
    parts = dict(zip(SPLITS, split, strict=True))
    splits = {name: subset(whole, part) for name, part in parts.items()}
    return splits, {name: [items[i] for i in part] for name, part in parts.items()}


def carve_validation(
    splits: dict[str, Split],
    items: dict[str, list[Item]],
    strata: np.ndarray,
    val_fraction: float,
    seed: int,
) -> None:
    """Move a stratified ``val_fraction`` of the train split (and its items) into ``val``."""
    keep, val = stratified_split(strata, [1.0 - val_fraction, val_fraction], seed)
    train, train_items = splits["train"], items["train"]
    splits["train"], items["train"] = subset(train, keep), [train_items[i] for i in keep]
    splits["val"], items["val"] = subset(train, val), [train_items[i] for i in val]


def stable_seed(*parts: int | str) -> int:
    """A 63-bit seed derived from the parts (stable across processes, unlike ``hash``)."""
    text = "/".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def counts_text(split: Split, num_classes: int) -> str:
    return "/".join(str(c) for c in split.class_counts(num_classes))


def hospital_data(
    splits: Mapping[str, Split], what: str, num_classes: int, extra: dict[str, object]
) -> HospitalData:
    """The sites' data with the one description every source gives: what was read, then
    each split's size and class counts (so hospital logs read the same whatever the source)."""
    sizes = ", ".join(
        f"{s} {len(splits[s])} ({counts_text(splits[s], num_classes)})" for s in SPLITS
    )
    return HospitalData(
        splits["train"], splits["val"], splits["test"], description=f"{what}; {sizes}", extra=extra
    )
