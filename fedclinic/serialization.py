"""Model weights on the wire (Flower ArrayRecords) and on disk (checkpoints with content hashes)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from fedclinic.errors import DataError, file_problem

State = dict[str, torch.Tensor]


def state_to_record(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """A state dict as an ArrayRecord (keys kept, CPU copies)."""
    return ArrayRecord({k: Array(v.detach().cpu().numpy()) for k, v in state.items()})


def record_to_state(record: ArrayRecord) -> State:
    """An ArrayRecord back to a state dict of CPU tensors."""
    return {k: torch.from_numpy(np.array(v.numpy(), copy=True)) for k, v in record.items()}


def numpy_to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    # np.asarray keeps 0-d entries 0-d (ascontiguousarray would make them shape (1,)).
    return ArrayRecord({k: Array(np.asarray(v, order="C")) for k, v in arrays.items()})


def record_to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def content_sha256(state: Mapping[str, torch.Tensor | np.ndarray]) -> str:
    """Hash of names, dtypes, shapes and bytes: equal weights give equal hashes on any host."""
    digest = hashlib.sha256()
    for key in sorted(state):
        value = state[key]
        array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value
        array = np.ascontiguousarray(array)
        digest.update(f"{key}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(path: str | Path, state: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Write atomically (temp file + rename) and return the file and content hashes."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_suffix(target.suffix + ".tmp")
    torch.save({k: v.detach().cpu() for k, v in state.items()}, temporary)
    os.replace(temporary, target)
    return {
        "path": str(target),
        "sha256": file_sha256(target),
        "content_sha256": content_sha256(state),
    }


def load_checkpoint(path: str | Path) -> State:
    file = Path(path)
    if not file.is_file():
        raise DataError(f"checkpoint '{file}' does not exist")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a corrupt file
        detail = file_problem(err)
        raise DataError(f"checkpoint '{file}' is unreadable or corrupt: {detail}") from None
    if not isinstance(state, dict):
        raise DataError(f"checkpoint '{file}' does not hold a state dict")
    return state
