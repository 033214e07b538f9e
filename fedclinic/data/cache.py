"""Decoded, resized arrays kept at the site, so an image is decoded once, not every run.

Why: an image-folder or segmentation-folder source decodes and resizes every file each
time it loads (PNG/JPEG/NIfTI decoding is most of a large folder's load time). The cache
writes the decoded rows once to ``<state-dir>/data-cache/`` as ``.npy`` files and reads
them back memory-mapped; it lives in the hospital's state dir and is never sent anywhere
(the FAB carries only ``.py`` files; replies carry weights and metrics).

Invalidation: every row records its files' identity: size and modification time, and with
``verify = "hash"`` also the SHA-256 of the bytes (slower: every file is read, though not
decoded). A row whose files changed is decoded again; rows of unchanged files are copied
from the old entry, so adding files to a folder decodes only the new ones. What the rows
mean is fixed by the entry key: the source's name, the decode parameters (image size,
channels, classes) and the source code of the decoding function's module, so a change of
the decoder invalidates everything it wrote.

Entries are replaced atomically (arrays under a fresh name, then the manifest), so a
concurrent reader sees either the old or the new entry, never half of one.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from fedclinic.config import HospitalConfig
from fedclinic.site import default_state_dir

Verify = Literal["stat", "hash"]
#: one item: the files one row is decoded from (an image; an image and its mask)
Item = tuple[Path, ...]
MANIFEST = "manifest.json"
CACHE_DIR = "data-cache"
_FORMAT = 1


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


def tree_identity(path: Path) -> str:
    """A digest of every file under ``path`` (or of the file itself): names, sizes and
    modification times. Cheap (one ``stat`` per file); any change of a file changes it."""
    digest = hashlib.sha256()
    if path.is_file():
        digest.update(json.dumps(file_identity(path)).encode())
        return digest.hexdigest()
    for root, folders, files in os.walk(path):
        folders.sort()
        for name in sorted(files):
            file = Path(root, name)
            relative = file.relative_to(path).as_posix()
            digest.update(json.dumps([relative, *file_identity(file)]).encode())
    return digest.hexdigest()


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
        old = _read_manifest(entry)
        reusable: dict[str, int] = {}
        if old is not None:
            reusable = {json.dumps(row): index for index, row in enumerate(old["rows"])}
        places = [reusable.get(json.dumps(identity)) for identity in identities]
        previous = _open_arrays(entry, old) if old is not None else None
        if previous is None:
            places = [None] * len(items)
        self.decoded = sum(place is None for place in places)
        if old is not None and previous is not None and places == list(range(len(old["rows"]))):
            return tuple(np.array(a) for a in previous)  # into memory, writable
        outputs: list[np.ndarray] | None = None
        for index, (item, place) in enumerate(zip(items, places, strict=True)):
            row = decode(item) if place is None else tuple(a[place] for a in previous or ())
            if outputs is None:
                outputs = [np.empty((len(items), *r.shape), dtype=r.dtype) for r in row]
            for out, value in zip(outputs, row, strict=True):
                out[index] = value
        assert outputs is not None
        _write_entry(entry, identities, outputs)
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
    try:
        manifest = json.loads((entry / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != _FORMAT:
        return None
    return manifest


def _open_arrays(entry: Path, manifest: dict[str, Any]) -> list[np.ndarray] | None:
    """The entry's arrays memory-mapped read-only, or None when one is missing or short."""
    arrays = []
    try:
        for name in manifest["arrays"]:
            array = np.load(entry / name, mmap_mode="r", allow_pickle=False)
            if array.shape[0] != len(manifest["rows"]):
                return None
            arrays.append(array)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return arrays


def _write_entry(entry: Path, identities: list[list[Any]], outputs: list[np.ndarray]) -> None:
    """Arrays under fresh names, then the manifest (atomic rename), then old arrays go."""
    entry.mkdir(parents=True, exist_ok=True)
    version = uuid.uuid4().hex[:12]
    names = [f"rows-{version}-{i}.npy" for i in range(len(outputs))]
    for name, array in zip(names, outputs, strict=True):
        np.save(entry / name, array, allow_pickle=False)
    manifest = {"format": _FORMAT, "arrays": names, "rows": identities}
    temporary = entry / f"{MANIFEST}.{version}.tmp"
    temporary.write_text(json.dumps(manifest), encoding="utf-8")
    os.replace(temporary, entry / MANIFEST)
    for stale in entry.glob("rows-*.npy"):
        if stale.name not in names:
            stale.unlink(missing_ok=True)


def site_cache(hospital: HospitalConfig, verify: Verify = "stat") -> ArrayCache:
    """The cache in a hospital's state dir (``<state-dir>/data-cache``)."""
    root = Path(hospital.state_dir).expanduser() if hospital.state_dir else None
    return ArrayCache((root or default_state_dir(hospital)) / CACHE_DIR, verify)


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
