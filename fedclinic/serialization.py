"""Model weights on the wire (Flower ArrayRecords) and on disk (checkpoints with content hashes).

Wire precision (run key ``wire-dtype``, docs/architecture.md#wire-precision): :func:`to_wire`
narrows a record's float32 arrays to float16 or bfloat16 for transport only and
:func:`from_wire` widens them back to float32 on receipt, before any maths; integer and
boolean arrays (BatchNorm's ``num_batches_tracked``, pFedNet's codes and name tag) never
change. With ``float32`` both return the record they are given: the default path is the
same objects and bytes as without the option.

Packed layout (docs/architecture.md#packed-models): :func:`packed` sends a model as its
bytes back to back, in parts, plus its layout instead of one Flower ``Array`` per tensor.
Flower stores and moves every ``Array`` and every chunk of it as an object of its own, one
Fleet API call each, with its own hashing, signature check and SQLite bookkeeping at the
SuperLink: a ResNet-101 (626 tensors) was about 1,300 objects per message. Packed, it is 9
parts of 20 MB, each cut into Flower's 5 MB chunks. :func:`unpacked` gives the exact
``Array``s back (same dtype, shape, serialisation type and bytes), so packing changes no
value.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from flwr.common.constant import FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE, SType

from fedclinic.config import WIRE_DTYPES
from fedclinic.errors import DataError, file_problem

State = dict[str, torch.Tensor]

#: the serialisation type of a bfloat16 array: its raw little-endian 16-bit patterns (numpy
#: has no bfloat16, so Flower's ``numpy.ndarray`` type cannot carry one)
BFLOAT16_STYPE = "fedclinic.bfloat16-le"
#: the entries of a packed model: its layout (UTF-8 JSON, one ``[name, dtype, shape, stype,
#: bytes]`` per array, in order) and its arrays' bytes back to back, in numbered parts; all
#: raw bytes (:data:`PACKED_STYPE`)
PACKED_LAYOUT = "fedclinic.packed-layout"
PACKED_PART = "fedclinic.packed."
PACKED_STYPE = "fedclinic.raw-bytes"
#: a part is four of Flower's chunks: few objects per message (a ResNet-101: 9 parts, 33
#: chunks), while a receiver inflates one part, not the whole model, at once
PACKED_PART_BYTES = 4 * FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE


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


# ------------------------------------------------------------------------ wire precision


def to_wire(record: ArrayRecord, dtype: str) -> ArrayRecord:
    """``record`` with its float32 arrays narrowed to ``dtype`` (round to nearest even).

    An array that would overflow (a finite value beyond float16's 65504) travels in float32
    as it is; NaN/Inf travel as NaN/Inf, for the receiver's checks to refuse. Arrays of any
    other dtype, and arrays already narrowed, are kept, so casting twice changes nothing.
    """
    if dtype == "float32":
        return record
    return ArrayRecord({key: _narrow(array, dtype) for key, array in record.items()})


def from_wire(record: ArrayRecord, dtype: str) -> ArrayRecord:
    """``record`` with its ``dtype`` arrays widened back to float32 (exact: every float16
    and bfloat16 value is a float32 value). Arrays of other dtypes are kept, so a sender on
    another wire precision is refused by the layout check, not silently converted."""
    if dtype == "float32":
        return record
    return ArrayRecord({key: _widen(array, dtype) for key, array in record.items()})


def wire_round_trip(record: ArrayRecord, dtype: str) -> ArrayRecord:
    """What a receiver holds after ``record`` crossed the wire in ``dtype``."""
    return from_wire(to_wire(record, dtype), dtype)


def _narrow(array: Array, dtype: str) -> Array:
    if array.stype != SType.NUMPY or array.dtype != "float32":
        return array
    values = array.numpy()
    if dtype == "float16":
        with np.errstate(over="ignore"):
            narrowed = values.astype(np.float16)
        if np.isfinite(values).all() and not np.isfinite(narrowed).all():
            return array  # out of float16's range: float32 as it is
        return Array(narrowed)
    if dtype == "bfloat16":
        tensor = torch.from_numpy(np.ascontiguousarray(values)).to(torch.bfloat16)
        bits = tensor.view(torch.int16).numpy().view(np.uint16).astype("<u2")
        overflow = (bits & 0x7F80) == 0x7F80  # exponent all ones: inf or NaN
        if overflow.any() and np.isfinite(values).all():
            return array  # rounded up past bfloat16's largest value: float32 as it is
        return Array(dtype="bfloat16", shape=tuple(values.shape), stype=BFLOAT16_STYPE,
                     data=bits.tobytes())  # fmt: skip
    raise ValueError(f"unknown wire dtype {dtype!r}; expected one of {', '.join(WIRE_DTYPES)}")


def _widen(array: Array, dtype: str) -> Array:
    if dtype == "float16" and array.stype == SType.NUMPY and array.dtype == "float16":
        return Array(array.numpy().astype(np.float32))
    if dtype == "bfloat16" and array.stype == BFLOAT16_STYPE:
        count = int(np.prod(array.shape, dtype=np.int64))
        if len(array.data) != 2 * count:
            raise DataError(
                f"a bfloat16 array of shape {tuple(array.shape)} carries {len(array.data)} "
                f"bytes; expected {2 * count}"
            )
        bits = np.frombuffer(array.data, dtype="<u2").astype(np.uint32) << 16
        return Array(bits.view(np.float32).reshape(tuple(array.shape)))
    return array


# ------------------------------------------------------------------------ packed layout


def is_packed(record: ArrayRecord) -> bool:
    return PACKED_LAYOUT in record


def _raw(data: bytes) -> Array:
    return Array(dtype="uint8", shape=(len(data),), stype=PACKED_STYPE, data=data)


def packed(record: ArrayRecord) -> ArrayRecord:
    """``record`` as its layout (:data:`PACKED_LAYOUT`) and its arrays' bytes back to back,
    cut into parts of :data:`PACKED_PART_BYTES` (``fedclinic.packed.00000``, ...); a record of
    fewer than two arrays, or one already packed, is returned as it is."""
    if len(record) < 2 or is_packed(record):
        return record
    layout = [
        [name, array.dtype, list(array.shape), array.stype, len(array.data)]
        for name, array in record.items()
    ]
    parts: list[bytes] = []
    current = bytearray()
    for array in record.values():  # filled part by part: no copy of the whole model at once
        view = memoryview(array.data)
        while view:
            take = PACKED_PART_BYTES - len(current)
            current += view[:take]
            view = view[take:]
            if len(current) == PACKED_PART_BYTES:
                parts.append(bytes(current))
                current = bytearray()
    if current:
        parts.append(bytes(current))
    arrays = {f"{PACKED_PART}{index:05d}": _raw(part) for index, part in enumerate(parts)}
    return ArrayRecord({PACKED_LAYOUT: _raw(json.dumps(layout).encode()), **arrays})


def unpacked(record: ArrayRecord) -> ArrayRecord:
    """The arrays :func:`packed` was given, byte for byte; any other record as it is.

    Raises :class:`DataError` (one line) for parts or a layout that do not fit together."""
    if not is_packed(record):
        return record
    names = [f"{PACKED_PART}{index:05d}" for index in range(len(record) - 1)]
    if set(record.keys()) != {PACKED_LAYOUT, *names} or any(
        record[key].stype != PACKED_STYPE for key in (PACKED_LAYOUT, *names)
    ):
        raise DataError("packed model: its entries are not a layout and numbered byte parts")
    try:
        layout = json.loads(record[PACKED_LAYOUT].data.decode())
        entries = [
            (str(name), str(dtype), tuple(int(d) for d in shape), str(stype), int(size))
            for name, dtype, shape, stype, size in layout
        ]
    except (ValueError, TypeError, KeyError, UnicodeDecodeError) as err:
        raise DataError(f"packed model: unreadable layout ({err})") from None
    total = sum(entry[4] for entry in entries)
    if len({entry[0] for entry in entries}) != len(entries) or any(e[4] < 0 for e in entries):
        raise DataError("packed model: the layout does not describe one buffer of named arrays")
    buffer = b"".join(record[key].data for key in names)  # only once the layout holds
    if total != len(buffer):
        raise DataError(
            f"packed model: the layout describes {total} bytes, the parts hold {len(buffer)}"
        )
    arrays, offset = {}, 0
    for name, dtype, shape, stype, size in entries:
        arrays[name] = Array(dtype=dtype, shape=shape, stype=stype,
                             data=buffer[offset : offset + size])  # fmt: skip
        offset += size
    return ArrayRecord(arrays)
