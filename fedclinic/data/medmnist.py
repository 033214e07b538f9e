"""MedMNIST ``.npz`` files: real small medical images, whole or split into simulated hospitals.

Why: MedMNIST gives real images with an official train/val/test split, small enough to run a
federation on one machine; partitioning one file simulates hospitals with controlled size
and label skew.

What (``data-path`` = the ``.npz`` file): keys ``train_images``, ``train_labels``,
``val_images``, ``val_labels``, ``test_images``, ``test_labels``; images ``(N, H, W)``
(grey) or ``(N, H, W, 3)`` (RGB) uint8, scaled to [0, 1] as ``(N, C, H, W)``; labels
``(N, 1)`` (or ``(N,)``) integers. The images must already have the run's ``image-size`` and
``in-channels``: nothing is resized or converted here.

* ``num-partitions`` = 1: the file's three splits are used as they are (``val-fraction``,
  ``partition-fractions`` and ``label-skew-alpha`` play no part).
* ``num-partitions`` = P > 1: this hospital is partition ``partition-id`` of P. The official
  *train* split is divided among the P hospitals (sizes follow ``partition-fractions``,
  equal when empty; each hospital's class mix is drawn from a Dirichlet with
  ``label-skew-alpha``, none when 0, and fitted so that every image is used:
  :func:`~fedclinic.data.splits.label_skew_proportions`),
  and each hospital carves its validation split (``val-fraction``, default 0.1, stratified)
  from its own train share. The official *test* split is divided with the same per-class
  shares, so each hospital is tested on a test set distributed like its training data.
  The official val split is not used in this mode (recorded in ``extra``).
  Every hospital derives the same plan from ``data-seed``, so all hospitals of one
  federation must use the same ``data-seed``, ``num-partitions``, ``partition-fractions``
  and ``label-skew-alpha``; the parts are then disjoint and cover both splits.
"""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path

import numpy as np

from fedclinic.config import HospitalConfig
from fedclinic.data.base import DataRequest, HospitalData
from fedclinic.data.common import (
    SPLITS,
    hospital_data,
    make_split,
    require_data_path,
    require_image_model,
    require_path,
)
from fedclinic.data.splits import (
    label_skew_proportions,
    partition_by_proportions,
    partition_fractions,
    resolve_val_fraction,
    stratified_split,
)
from fedclinic.errors import ConfigError, DataError

KEYS = tuple(f"{split}_{part}" for split in SPLITS for part in ("images", "labels"))
DEFAULT_VAL_FRACTION = 0.1
WHAT = "a MedMNIST .npz file"


def check_files(hospital: HospitalConfig) -> None:
    """Pre-flight: a readable ``.npz`` with the six MedMNIST keys (no array is read)."""
    path = require_path(hospital, "medmnist", WHAT)
    with _open_npz(path) as archive:
        _check_keys(path, archive)


def check_run(request: DataRequest) -> None:
    """Pre-flight and load: MedMNIST holds images, not tabular rows."""
    require_image_model(request, "medmnist")


def _open_npz(path: Path) -> np.lib.npyio.NpzFile:
    """The opened archive (arrays are read lazily), or a :class:`DataError`."""
    if not path.is_file():
        raise DataError(f"{path}: MedMNIST file not found (hospital config 'data-path')")
    try:
        with path.open("rb") as handle:
            magic = handle.read(6)
    except OSError as err:
        raise DataError(f"{path}: cannot be read ({_first_line(err)})") from None
    if not magic.startswith((b"PK", b"\x93NUMPY")):
        raise DataError(f"{path}: not a .npz file (expected a zip archive of .npy arrays)")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise DataError(f"{path}: not a readable .npz file ({_first_line(err)})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(f"{path}: expected a .npz archive (MedMNIST), found a single .npy array")
    return archive


def _check_keys(path: Path, archive: np.lib.npyio.NpzFile) -> None:
    missing = [key for key in KEYS if key not in archive.files]
    if missing:
        raise DataError(
            f"{path}: missing key(s) {', '.join(missing)}; a MedMNIST file has {', '.join(KEYS)}"
        )


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """The six arrays of a MedMNIST file, or a :class:`DataError` naming the file and problem."""
    with _open_npz(path) as archive:
        _check_keys(path, archive)
        try:
            return {key: archive[key] for key in KEYS}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:
            detail = _first_line(err)
            raise DataError(f"{path}: a member of the .npz file is corrupt ({detail})") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _check_images(path: Path, split: str, images: np.ndarray, request: DataRequest) -> None:
    """Refuse images whose dtype, size or channels do not fit the run (nothing is resized)."""
    run = request.run
    expected = (run.image_size, run.image_size, run.in_channels)
    key = f"{split}_images"
    if images.dtype != np.uint8:
        raise DataError(f"{path}: '{key}' has dtype {images.dtype}; expected uint8 (0..255)")
    if images.ndim == 3:
        found = (*images.shape[1:], 1)
    elif images.ndim == 4 and images.shape[-1] == 3:
        found = images.shape[1:]
    else:
        raise DataError(
            f"{path}: '{key}' has shape {images.shape}; expected (N, H, W) or (N, H, W, 3)"
        )
    if tuple(found) != expected:
        raise DataError(
            f"{path}: '{key}' holds {found[0]}x{found[1]} images with {found[2]} channel(s); the "
            f"run expects {expected[0]}x{expected[1]} with {expected[2]} (run config image-size "
            f"= {run.image_size}, in-channels = {run.in_channels}); images are not resized"
        )


def _to_float(images: np.ndarray) -> np.ndarray:
    """uint8 ``(N, H, W)`` or ``(N, H, W, 3)`` -> float32 ``(N, C, H, W)`` in [0, 1]."""
    scaled = images.astype(np.float32) / 255.0
    if scaled.ndim == 3:
        return scaled[:, None]
    return np.ascontiguousarray(scaled.transpose(0, 3, 1, 2))


def _labels(path: Path, split: str, labels: np.ndarray, count: int, num_classes: int) -> np.ndarray:
    key = f"{split}_labels"
    if labels.ndim == 2 and labels.shape[1] != 1:
        raise DataError(
            f"{path}: '{key}' has shape {labels.shape}; expected (N, 1) single-label classes "
            "(multi-label MedMNIST sets are not supported)"
        )
    if labels.ndim not in (1, 2):
        raise DataError(f"{path}: '{key}' has shape {labels.shape}; expected (N, 1)")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: '{key}' has dtype {labels.dtype}; expected integers")
    flat = labels.reshape(-1).astype(np.int64)
    if len(flat) != count:
        raise DataError(
            f"{path}: '{key}' has {len(flat)} labels but '{split}_images' has {count} images"
        )
    bad = flat[(flat < 0) | (flat >= num_classes)]
    if len(bad):
        raise DataError(
            f"{path}: '{key}' contains label {int(bad[0])}; expected 0..{num_classes - 1} "
            f"(run config num-classes = {num_classes})"
        )
    return flat


def load(request: DataRequest) -> HospitalData:
    """This hospital's splits from a MedMNIST file (whole, or its simulated partition)."""
    check_run(request)
    path = require_data_path(request, WHAT)
    hospital, run = request.hospital, request.run
    arrays = read_npz(path)
    images = {s: arrays[f"{s}_images"] for s in SPLITS}
    for s in SPLITS:
        _check_images(path, s, images[s], request)
    labels = {
        s: _labels(path, s, arrays[f"{s}_labels"], len(images[s]), run.num_classes) for s in SPLITS
    }
    if hospital.num_partitions == 1:
        splits = {s: make_split(_to_float(images[s]), labels[s]) for s in SPLITS}
        indices = {s: np.arange(len(labels[s])) for s in SPLITS}
        what = f"medmnist {path.name}: official splits"
        if hospital.val_fraction >= 0:
            what += f" (val-fraction {hospital.val_fraction} unused: one partition)"
    else:
        indices = partition_plan(labels["train"], labels["test"], request)
        source = {"train": "train", "val": "train", "test": "test"}  # official split used
        splits = {  # only this hospital's rows are converted to float
            s: make_split(_to_float(images[source[s]][indices[s]]), labels[source[s]][indices[s]])
            for s in SPLITS
        }
        what = (
            f"medmnist {path.name}: partition {hospital.partition_id} of "
            f"{hospital.num_partitions} (label-skew-alpha {hospital.label_skew_alpha})"
        )
    return hospital_data(
        splits,
        what,
        run.num_classes,
        {
            "source": "medmnist",
            "file": str(path),
            # Row numbers in the file: train and val index the official train split (val
            # too, when partitioned), test indexes the official test split.
            "indices": indices,
            "official_val_used": hospital.num_partitions == 1,
        },
    )


def partition_plan(
    train_labels: np.ndarray, test_labels: np.ndarray, request: DataRequest
) -> dict[str, np.ndarray]:
    """Row numbers of this hospital's train/val (in the official train split) and test rows."""
    hospital, run = request.hospital, request.run
    if hospital.partition_id >= hospital.num_partitions:
        raise ConfigError(
            f"hospital config: key 'partition-id' = {hospital.partition_id} is not allowed: "
            f"expected 0..{hospital.num_partitions - 1} "
            f"(num-partitions = {hospital.num_partitions})"
        )
    fractions = partition_fractions(hospital)
    seed = hospital.data_seed
    proportions = label_skew_proportions(
        np.bincount(train_labels, minlength=run.num_classes),
        fractions,
        hospital.label_skew_alpha,
        seed=[seed, 0],
    )
    train_share = partition_by_proportions(train_labels, proportions, seed=[seed, 1])
    test_share = partition_by_proportions(test_labels, proportions, seed=[seed, 2])
    mine = train_share[hospital.partition_id]
    if len(mine) == 0:
        raise DataError(
            f"{hospital.data_path}: partition {hospital.partition_id} of "
            f"{hospital.num_partitions} received no training images "
            f"(label-skew-alpha = {hospital.label_skew_alpha}, "
            f"partition-fractions = {hospital.partition_fractions or 'equal'}); use a larger "
            "alpha or fraction"
        )
    val_fraction = resolve_val_fraction(hospital, DEFAULT_VAL_FRACTION)
    keep, val = stratified_split(
        train_labels[mine],
        [1.0 - val_fraction, val_fraction],
        seed=[seed, 3, hospital.partition_id],
    )
    return {"train": mine[keep], "val": mine[val], "test": test_share[hospital.partition_id]}
