"""What every data source returns, and the checks every source applies before training.

Data is loaded only at the hospital (inside the ClientApp). A source turns a
:class:`DataRequest` into a :class:`HospitalData` with train, validation and test splits,
already checked against the run's task (input shape, label range). Nothing is dropped
silently: a bad file is a :class:`~fedclinic.errors.DataError` naming the file.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Literal

import torch

from fedclinic.config import HospitalConfig, RunConfig
from fedclinic.errors import ConfigError, DataError
from fedclinic.tasks import task_of


@dataclass(frozen=True)
class Split:
    """One split: float32 inputs ``(N, C, H, W)`` or ``(N, F)`` and int64 labels: ``(N,)``
    (classification) or per-pixel label maps ``(N, H, W)`` (segmentation)."""

    inputs: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def class_counts(self, num_classes: int) -> list[int]:
        """Samples per class (classification) or pixels per class (segmentation)."""
        return torch.bincount(self.labels.reshape(-1), minlength=num_classes).tolist()


@dataclass(frozen=True)
class HospitalData:
    """A hospital's three splits plus a one-line description for logs and results."""

    train: Split
    val: Split
    test: Split
    description: str = ""
    extra: dict[str, object] = field(default_factory=dict)

    def fingerprint(self, num_classes: int, class_counts: bool = True) -> str:
        """What this hospital trained and was tested on, as compact JSON, safe to send.

        ``counts``: per split, samples per class (pixels per class for segmentation); with
        ``class_counts`` false (a run that hides them: pFedNet's noised sketch) ``sizes``,
        samples per split, instead; ``sha256``: a hash of the loaded splits' content
        (inputs and labels, in order), so any change of files, partition, preprocessing or
        image size changes it and two sites reading the same data show the same value.
        Nothing in it identifies a patient or names a file. Hashing costs about a second per
        GB of loaded tensors.
        """
        digest = hashlib.sha256()
        counts: dict[str, list[int] | int] = {}
        for name in ("train", "val", "test"):
            split: Split = getattr(self, name)
            counts[name] = split.class_counts(num_classes) if class_counts else len(split)
            for tensor in (split.inputs, split.labels):
                digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
                digest.update(tensor.contiguous().numpy().tobytes())
        return json.dumps(
            {"counts" if class_counts else "sizes": counts, "sha256": digest.hexdigest()},
            separators=(",", ":"),
        )


def source_of(hospital: HospitalConfig) -> str:
    """The hospital's own ``data-source``; never the run config's (no silent default)."""
    if not hospital.data_source:
        raise ConfigError(
            f"hospital {hospital.hospital}: hospital config: key 'data-source' is required but "
            "missing; a hospital trains only on the data its own config names"
        )
    return hospital.data_source


@dataclass(frozen=True)
class Standardise:
    """Pooled statistics every split is normalised with: ``(x - mean) / (std + 1e-9)`` per
    feature (tabular) or channel (images), as FLamby z-scores (``normalisation = federated``,
    docs/statistics.md)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def apply(self, data: HospitalData, origin: str) -> HospitalData:
        """``data`` with every split's inputs normalised (labels untouched)."""
        width = int(data.train.inputs.shape[1])
        if len(self.mean) != width or len(self.std) != width:
            raise DataError(
                f"{origin}: the pooled statistics have {len(self.mean)} means and "
                f"{len(self.std)} stds, but the inputs have {width} features/channels"
            )
        shape = (1, width) + (1,) * (data.train.inputs.ndim - 2)
        mean = torch.tensor(self.mean, dtype=torch.float32).reshape(shape)
        std = torch.tensor(self.std, dtype=torch.float32).reshape(shape)

        def scaled(split: Split) -> Split:
            return Split(((split.inputs - mean) / (std + 1e-9)).to(torch.float32), split.labels)

        return replace(data, train=scaled(data.train), val=scaled(data.val), test=scaled(data.test))


#: how a source's inputs are normalised: "site", its own preprocessing (Heart: the centre's
#: train statistics; images: [0, 1] intensities); "raw", none (what statistics describe);
#: or pooled statistics from the federation
Normalisation = Literal["site", "raw"] | Standardise


@dataclass(frozen=True)
class DataRequest:
    """Everything a source needs: the run's task and the hospital's own settings."""

    run: RunConfig
    hospital: HospitalConfig
    normalisation: Normalisation = "site"

    @property
    def source(self) -> str:
        return source_of(self.hospital)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Expected shape of one sample: ``(F,)`` for tabular models, else ``(C, H, W)``."""
        if self.run.model == "logreg":
            return (self.run.num_features,)
        return (self.run.in_channels, self.run.image_size, self.run.image_size)


DataSource = Callable[[DataRequest], HospitalData]


def check_split(split: Split, request: DataRequest, origin: str, name: str) -> None:
    """Refuse a split whose shape, dtype or labels do not fit the run (``origin``: the file)."""
    expected = request.input_shape
    if split.inputs.dtype != torch.float32:
        raise DataError(
            f"{origin}: {name} inputs have dtype {split.inputs.dtype}; expected float32"
        )
    if tuple(split.inputs.shape[1:]) != expected:
        raise DataError(
            f"{origin}: {name} samples have shape {tuple(split.inputs.shape[1:])}; "
            f"the run expects {expected} (run config in-channels/image-size/num-features)"
        )
    if split.labels.ndim == 0 or split.inputs.shape[0] != split.labels.shape[0]:
        raise DataError(
            f"{origin}: {name} has {split.inputs.shape[0]} samples "
            f"but {split.labels.shape[0] if split.labels.ndim else 0} labels"
        )
    spatial = tuple(split.inputs.shape[2:])
    task_of(request.run).check_labels(
        split.labels, spatial, request.run.num_classes, f"{origin}: {name}"
    )
    if not torch.isfinite(split.inputs).all():
        raise DataError(f"{origin}: {name} inputs contain NaN or infinite values")


def check_hospital_data(data: HospitalData, request: DataRequest, origin: str) -> HospitalData:
    """Check all three splits; the training split must not be empty."""
    if len(data.train) == 0:
        raise DataError(f"{origin}: the training split is empty")
    for name in ("train", "val", "test"):
        check_split(getattr(data, name), request, origin, name)
    return data
