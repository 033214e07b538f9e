"""Small checks and constructors shared by the data sources (one place, one wording)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from fedclinic.data.base import DataRequest, Split
from fedclinic.errors import ConfigError


def require_image_model(request: DataRequest, source: str) -> None:
    """Image sources cannot feed the tabular ``logreg`` model."""
    if request.run.model == "logreg":
        raise ConfigError(
            f"run config: key 'model' = 'logreg' is not allowed with data source '{source}': "
            "it produces images; use an image model (cnn, resnet18, densenet121)"
        )


def require_data_path(request: DataRequest, what: str) -> Path:
    """The hospital's ``data-path``, which file-based sources cannot do without."""
    if not request.hospital.data_path:
        raise ConfigError(
            f"hospital config: key 'data-path' is empty; data source '{request.source}' "
            f"expects {what}"
        )
    return Path(request.hospital.data_path).expanduser()


def make_split(inputs: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray) -> Split:
    """A :class:`Split` with float32 inputs and 1-D int64 labels."""
    x = torch.as_tensor(np.asarray(inputs) if isinstance(inputs, np.ndarray) else inputs)
    y = torch.as_tensor(np.asarray(labels) if isinstance(labels, np.ndarray) else labels)
    return Split(x.to(torch.float32).contiguous(), y.to(torch.int64).reshape(-1).contiguous())


def empty_split(sample_shape: tuple[int, ...]) -> Split:
    return Split(torch.zeros((0, *sample_shape)), torch.zeros(0, dtype=torch.int64))


def subset(split: Split, indices: np.ndarray) -> Split:
    index = torch.as_tensor(indices, dtype=torch.int64)
    return Split(split.inputs[index].contiguous(), split.labels[index].contiguous())


def stable_seed(*parts: int | str) -> int:
    """A 63-bit seed derived from the parts (stable across processes, unlike ``hash``)."""
    text = "/".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def counts_text(split: Split, num_classes: int) -> str:
    return "/".join(str(c) for c in split.class_counts(num_classes))
