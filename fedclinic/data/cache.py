"""Decoded, resized arrays kept at the site, so an image is decoded once, not every run.

Why: an image-folder or segmentation-folder source decodes and resizes every file each
time it loads (PNG/JPEG/NIfTI decoding is most of a large folder's load time). The cache
writes the decoded rows once to ``<state-dir>/data-cache/`` as ``.npy`` files and reads
them back through a memory map (checked, see below); it lives in the hospital's state dir
and is never sent anywhere (the FAB carries only ``.py`` files; replies carry weights and
metrics).

Invalidation: every row records its files' identity: size and modification time, and with
``verify = "hash"`` also the SHA-256 of the bytes (slower: every file is read, though not
decoded). A row whose files changed is decoded again; rows of unchanged files are copied
from the old entry, so adding files to a folder decodes only the new ones. What the rows
mean is fixed by the entry key: the source's name, the decode parameters (image size,
channels, classes) and the source code of the decoding function's module, so a change of
the decoder invalidates everything it wrote.

Entries are replaced atomically (arrays under a fresh name, then the manifest), so a
concurrent reader sees either the old or the new entry, never half of one. The manifest
records each array's CRC-32, checked on every read: a damaged entry (truncated by a full
disk or a killed writer, a flipped bit, an unreadable manifest) is decoded again with one
line in the site's log, never used. A cache that cannot be written (read-only or full
state dir) costs speed, not the load: the rows are returned with one log line.

Which hospitals use it and how: the hospital config's ``data-cache`` key (``stat``, the
default; ``hash``; ``off``), read by :func:`site_cache`.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
import uuid
import zlib
from collections.abc import Callable, Mapping, Sequence
from logging import WARNING
from pathlib import Path
from typing import Any, Literal

import numpy as np
from flwr.common import log

from fedclinic.config import HospitalConfig
from fedclinic.site import default_state_dir

Verify = Literal["stat", "hash"]
#: one item: the files one row is decoded from (an image; an image and its mask)
Item = tuple[Path, ...]
MANIFEST = "manifest.json"
CACHE_DIR = "data-cache"
_FORMAT = 2  # 2: the manifest holds each array's CRC-32


class DamagedEntry(Exception):
    """A cache entry that exists but cannot be trusted (its text says why)."""


def file_identity(path: Path, verify: Verify = "stat") -> list[Any]:
    """``[size, mtime_ns]`` (and the content's SHA-256 with ``verify = "hash"``)."""
    status = path.stat()
    identity: list[Any] = [status.st_size, status.st_mtime_ns]
    if verify == "hash":
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        identity.append(digest.hexdigest())
    return identity


def tree_identity(path: Path, verify: Verify = "stat") -> str:
    """A digest of every file under ``path`` (or of the file itself): names, sizes and
    modification times (and contents with ``verify = "hash"``). Cheap with ``stat`` (one
    ``stat`` per file); any change of a file changes it."""
    digest = hashlib.sha256()
    if path.is_file():
        digest.update(json.dumps(file_identity(path, verify)).encode())
        return digest.hexdigest()
    for root, folders, files in os.walk(path):
        folders.sort()
        for name in sorted(files):
            file = Path(root, name)
            relative = file.relative_to(path).as_posix()
            digest.update(json.dumps([relative, *file_identity(file, verify)]).encode())
    return digest.hexdigest()


def checksum(array: np.ndarray) -> str:
    """CRC-32 of an array's bytes (about 3 GB/s: a damaged file is found, not forged)."""
    return f"{zlib.crc32(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data):08x}"


class ArrayCache:
    """Rows decoded from files, stored under ``directory`` (a hospital's ``data-cache``)."""

    def __init__(self, directory: Path, verify: Verify = "stat") -> None:
        self.directory = directory
        self.verify = verify
        self.decoded = 0  # rows decoded by the last call (the rest came from the cache)

    def rows(
        self,
        source: str,
        params: Mapping[str, Any],
        items: Sequence[Item],
        decode: Callable[[Item], tuple[np.ndarray, ...]],
    ) -> tuple[np.ndarray, ...]:
        """The stacked outputs of ``decode`` for every item, in the order of ``items``.

        ``decode`` returns a fixed number of arrays, each of one shape and dtype for every
        item (e.g. an image ``(C, S, S)`` float32 and a mask ``(S, S)`` int64); they come
        back stacked ``(len(items), ...)``, as writable in-memory arrays.
        """
        if not items:
            raise ValueError("no items to decode")
        entry = self.directory / f"{source}-{self._key(source, params, decode)[:24]}"
        identities = [[str(f) for f in item] + [self._identity(item)] for item in items]
        old: dict[str, Any] | None = None
        previous: list[np.ndarray] | None = None
        try:
            old = _read_manifest(entry)
            previous = _open_arrays(entry, old) if old is not None else None
        except DamagedEntry as damage:
            old, previous = None, None
            log(WARNING, "data cache: entry %s is damaged (%s); decoding its files again",
                entry, damage)  # fmt: skip
        reusable: dict[str, int] = {}
        if old is not None:
            reusable = {json.dumps(row): index for index, row in enumerate(old["rows"])}
        places = [reusable.get(json.dumps(identity)) for identity in identities]
        if previous is None:
            places = [None] * len(items)
        self.decoded = sum(place is None for place in places)
        if old is not None and previous is not None and places == list(range(len(old["rows"]))):
            return tuple(previous)
        outputs: list[np.ndarray] | None = None
        for index, (item, place) in enumerate(zip(items, places, strict=True)):
            row = decode(item) if place is None else tuple(a[place] for a in previous or ())
            if outputs is None:
                outputs = [np.empty((len(items), *r.shape), dtype=r.dtype) for r in row]
            for out, value in zip(outputs, row, strict=True):
                out[index] = value
        assert outputs is not None
        try:
            _write_entry(entry, identities, outputs)
        except OSError as err:  # a full or read-only state dir: slower next time, not wrong
            log(WARNING, "data cache: could not write %s (%s); loaded without the cache",
                entry, err.strerror or err)  # fmt: skip
        return tuple(outputs)

    def _identity(self, item: Item) -> list[Any]:
        return [file_identity(file, self.verify) for file in item]

    def _key(self, source: str, params: Mapping[str, Any], decode: Callable[..., Any]) -> str:
        function, bound = decode, []
        while isinstance(function, functools.partial):  # its arguments are part of the key
            bound.append([repr(function.args), repr(sorted(function.keywords.items()))])
            function = function.func
        try:
            module = inspect.getsourcefile(function)
        except TypeError:  # a builtin: no source file
            module = None
        code = Path(module).read_bytes() if module else b""
        text = json.dumps(
            {
                "format": _FORMAT,
                "source": source,
                "params": dict(params),
                "verify": self.verify,
                "decoder": getattr(function, "__qualname__", type(function).__qualname__),
                "bound": bound,
                "code": hashlib.sha256(code).hexdigest(),
            },
            sort_keys=True,
            default=str,
        )
        return hashlib.sha256(text.encode()).hexdigest()


def _read_manifest(entry: Path) -> dict[str, Any] | None:
    """The entry's manifest; None when there is none or another format version wrote it."""
    try:
        text = (entry / MANIFEST).read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError):  # no entry (yet)
        return None
    except (OSError, ValueError) as err:
        raise DamagedEntry(f"manifest not readable: {err}") from None
    try:
        manifest = json.loads(text)
    except ValueError:
        raise DamagedEntry("manifest is not JSON") from None
    if not isinstance(manifest, dict):
        raise DamagedEntry("manifest is not a JSON object")
    if manifest.get("format") != _FORMAT:
        return None  # an older version's entry: replaced without a word
    arrays, rows, sums = (manifest.get(k) for k in ("arrays", "rows", "checksums"))
    if not (
        isinstance(arrays, list)
        and isinstance(rows, list)
        and isinstance(sums, list)
        and len(sums) == len(arrays)
        and all(isinstance(n, str) and Path(n).name == n for n in arrays)
    ):
        raise DamagedEntry("manifest lacks its arrays, rows or checksums")
    return manifest


def _open_arrays(entry: Path, manifest: dict[str, Any]) -> list[np.ndarray]:
    """The entry's arrays read through a memory map into memory (writable copies), each
    checked against its manifest's row count and CRC-32."""
    arrays = []
    for name, expected in zip(manifest["arrays"], manifest["checksums"], strict=True):
        try:
            mapped = np.load(entry / name, mmap_mode="r", allow_pickle=False)
            array = np.array(mapped)  # into memory: what the training reads
            del mapped
        except (OSError, ValueError, TypeError) as err:  # missing, truncated, bad header
            raise DamagedEntry(f"{name}: {err}") from None
        if array.ndim == 0 or array.shape[0] != len(manifest["rows"]):
            raise DamagedEntry(
                f"{name}: {array.shape[:1]} rows, manifest has {len(manifest['rows'])}"
            )
        if checksum(array) != expected:
            raise DamagedEntry(f"{name}: checksum differs from the manifest's")
        arrays.append(array)
    return arrays


def _write_entry(entry: Path, identities: list[list[Any]], outputs: list[np.ndarray]) -> None:
    """Arrays under fresh names, then the manifest (atomic rename), then old arrays go."""
    entry.mkdir(parents=True, exist_ok=True)
    version = uuid.uuid4().hex[:12]
    names = [f"rows-{version}-{i}.npy" for i in range(len(outputs))]
    for name, array in zip(names, outputs, strict=True):
        np.save(entry / name, array, allow_pickle=False)
    checksums = [checksum(array) for array in outputs]
    manifest = {"format": _FORMAT, "arrays": names, "rows": identities, "checksums": checksums}
    temporary = entry / f"{MANIFEST}.{version}.tmp"
    temporary.write_text(json.dumps(manifest), encoding="utf-8")
    os.replace(temporary, entry / MANIFEST)
    for stale in entry.glob("rows-*.npy"):
        if stale.name not in names:
            stale.unlink(missing_ok=True)


def site_cache(hospital: HospitalConfig) -> ArrayCache | None:
    """The cache in a hospital's state dir (``<state-dir>/data-cache``), verified as its
    ``data-cache`` key says; None with ``data-cache = "off"``."""
    if hospital.data_cache == "off":
        return None
    root = Path(hospital.state_dir).expanduser() if hospital.state_dir else None
    return ArrayCache((root or default_state_dir(hospital)) / CACHE_DIR, hospital.data_cache)


def decode_rows(
    cache: ArrayCache | None,
    source: str,
    params: Mapping[str, Any],
    items: Sequence[Item],
    decode: Callable[[Item], tuple[np.ndarray, ...]],
) -> tuple[np.ndarray, ...]:
    """What a data source calls instead of decoding every file itself: through ``cache``
    when the hospital has one, else decoded here and stacked."""
    if cache is not None:
        return cache.rows(source, params, items, decode)
    decoded = [decode(item) for item in items]
    return tuple(np.stack(column) for column in zip(*decoded, strict=True))
