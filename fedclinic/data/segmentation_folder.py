"""A folder of image/mask pairs (PNG or NIfTI): what a hospital exports for 2-D segmentation.

Why: the layout most segmentation exports already have (an ``images`` and a ``masks``
folder with one file per case under the same name), read with MONAI's readers so PNG and
NIfTI need no conversion at the site.

What (``data-path`` = the folder), one of two layouts:

* ``<data-path>/images/<case>.<ext>`` and ``<data-path>/masks/<case>.<ext>`` — split here,
  seeded by ``data-seed`` and stratified by the highest label present in each mask: test
  15 %, val ``val-fraction`` (default 15 %), the rest train;
* ``<data-path>/{train,val,test}/{images,masks}/`` — the hospital's own split, used as
  given (``val/`` may be left out: validation is then carved from ``train/`` as above).

Files: ``.png``, ``.nii`` or ``.nii.gz`` (any case), paired by name without the extension
(``case-017.png`` with ``case-017.png`` or ``case-017.nii.gz``). A NIfTI file must hold one
2-D slice (``(H, W)`` or ``(H, W, 1)``); 3-D volumes are refused (export slices). Hidden
entries (``.DS_Store``, ...) are ignored; anything else is refused by name.

Every pair is checked, and a problem stops loading with one line naming the file(s): an
image without a mask (or a mask without an image), two files for one case, an unreadable
file, a mask that is not a single-channel label map, a mask whose size differs from its
image's, a non-integer mask value, or a label outside ``0..num-classes-1`` (0 is
background; a 0/255 binary mask must be stored as 0/1).

Reading: images become ``in-channels`` channels (grey replicated, colour to grey by ITU-R 601
luminance as Pillow does; an alpha channel is dropped); 8-bit PNGs are scaled by 255,
16-bit PNGs by 65535, NIfTI images per image to [0, 1] (min-max: CT and MR intensities have
no fixed range). Images are then **resized** to ``image-size`` x ``image-size`` (bilinear,
antialiased) and masks with nearest-neighbour sampling, so labels stay labels; the aspect
ratio is not kept (crop beforehand if it matters). Decoded pairs go through the site's cache
(:mod:`fedclinic.data.cache`, hospital config ``data-cache``): a pair is decoded once, again
only when its image or mask file changes.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fedclinic.config import HospitalConfig
from fedclinic.data.base import DataRequest, HospitalData, Split
from fedclinic.data.cache import Item, decode_rows, site_cache
from fedclinic.data.common import (
    SPLITS,
    FileProblem,
    carve_validation,
    counts_text,
    make_mask_split,
    require_data_path,
    require_grey_or_colour,
    require_path,
    split_here,
)
from fedclinic.data.image_folder import _visible
from fedclinic.data.splits import DEFAULT_TEST_FRACTION, resolve_val_fraction
from fedclinic.errors import DataError

SOURCE = "segmentation-folder"
SUFFIXES = (".nii.gz", ".nii", ".png")
PAIR_FOLDERS = ("images", "masks")
DEFAULT_VAL_FRACTION = 0.15
LUMINANCE = np.array([0.299, 0.587, 0.114])  # ITU-R 601, as Pillow's convert("L")


@dataclass(frozen=True)
class Pair:
    """One case: its image file and its mask file."""

    case: str
    image: Path
    mask: Path


def case_of(path: Path) -> str | None:
    """The case name (file name without a supported extension), or None when unsupported."""
    lower = path.name.lower()
    for suffix in SUFFIXES:
        if lower.endswith(suffix) and len(lower) > len(suffix):
            return path.name[: -len(suffix)]
    return None


def _cases(folder: Path) -> dict[str, Path]:
    """``{case: file}`` of an ``images/`` or ``masks/`` folder, refusing anything else."""
    files: dict[str, Path] = {}
    for entry in _visible(folder):
        case = case_of(entry)
        if entry.is_dir() or case is None:
            raise DataError(
                f"{entry}: not an image file; '{folder.name}/' may hold only "
                f"{', '.join(SUFFIXES)} files"
            )
        if case in files:
            raise DataError(
                f"{entry}: case '{case}' has two files in '{folder.name}/' "
                f"({files[case].name}, {entry.name}); keep one"
            )
        files[case] = entry
    return files


def scan_pairs(folder: Path) -> list[Pair]:
    """The image/mask pairs of a folder holding ``images/`` and ``masks/``, by case name."""
    if not folder.is_dir():
        raise DataError(f"{folder}: segmentation folder not found (hospital config 'data-path')")
    entries = _visible(folder)
    strays = [p.name for p in entries if p.name not in PAIR_FOLDERS or not p.is_dir()]
    missing = [name for name in PAIR_FOLDERS if not (folder / name).is_dir()]
    if strays or missing:
        found = ", ".join(p.name for p in entries) or "nothing"
        raise DataError(
            f"{folder}: expected exactly the folders images/ and masks/ (found {found})"
        )
    images, masks = _cases(folder / "images"), _cases(folder / "masks")
    if not images:
        raise DataError(f"{folder / 'images'}: no images")
    for case, image in sorted(images.items()):
        if case not in masks:
            raise DataError(
                f"{image}: no mask for case '{case}' in {folder / 'masks'} (every image needs "
                "a mask with the same name)"
            )
    for case, mask in sorted(masks.items()):
        if case not in images:
            raise DataError(f"{mask}: mask of case '{case}' has no image in {folder / 'images'}")
    return [Pair(case, images[case], masks[case]) for case in sorted(images)]


# ------------------------------------------------------------------------------ reading


@cache
def _reader(kind: str) -> Any:
    from monai.transforms import LoadImage

    with warnings.catch_warnings():  # MONAI builds every reader; its DICOM one warns when
        warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader")  # no nvImageCodec
        if kind == "png":  # rows first, as the file stores them (MONAI transposes by default)
            return LoadImage(
                reader="PILReader", image_only=True, dtype=None, reverse_indexing=False
            )
        return LoadImage(reader="NibabelReader", image_only=True, dtype=None)


def read_array(path: Path) -> tuple[np.ndarray, str]:
    """The stored array (``(H, W)`` or ``(H, W, channels)``) and its kind (png / nifti)."""
    kind = "png" if path.name.lower().endswith(".png") else "nifti"
    try:
        with warnings.catch_warnings():  # MONAI wraps Pillow's read-only buffer; we copy it
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            array = np.array(_reader(kind)(str(path)).as_tensor().numpy())
    except Exception as err:  # PIL, nibabel and MONAI raise many types for a corrupt file
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"{path}: not a readable {kind.upper()} file ({detail})") from None
    if kind == "nifti":
        while array.ndim > 2 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.ndim != 2:
            raise DataError(
                f"{path}: NIfTI of shape {array.shape}; expected one 2-D slice (H, W) or "
                "(H, W, 1); export 3-D volumes as slices"
            )
    elif array.ndim not in (2, 3):
        raise DataError(f"{path}: image of shape {array.shape}; expected (H, W) or (H, W, C)")
    return array, kind


def _resize(tensor: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    if tuple(tensor.shape[-2:]) == (size, size):
        return tensor
    if mode == "bilinear":
        return F.interpolate(tensor, (size, size), mode="bilinear", antialias=True)
    return F.interpolate(tensor, (size, size), mode="nearest-exact")


def read_image(path: Path, size: int, channels: int) -> tuple[np.ndarray, tuple[int, int]]:
    """float32 ``(channels, size, size)`` in [0, 1], and the stored size ``(H, W)``."""
    array, kind = read_array(path)
    stored = (int(array.shape[0]), int(array.shape[1]))
    values = array.astype(np.float64)
    if kind == "png" and array.dtype == np.uint8:
        values = values / 255.0
    elif kind == "png":
        if values.min() < 0 or values.max() > 65535:
            raise DataError(f"{path}: pixel values outside 0..65535; expected 8- or 16-bit PNG")
        values = values / 65535.0
    else:
        low, high = float(values.min()), float(values.max())
        if not np.isfinite([low, high]).all():
            raise DataError(f"{path}: the image contains NaN or infinite values")
        values = (values - low) / (high - low) if high > low else np.zeros_like(values)
    if values.ndim == 3:  # channel last: grey (+ alpha), RGB (+ alpha)
        if values.shape[2] < 3:
            values = values[..., 0]
        else:
            values = values[..., :3] @ LUMINANCE if channels == 1 else values[..., :3]
    if values.ndim == 2:
        values = np.repeat(values[..., None], channels, axis=2)
    tensor = torch.from_numpy(values.transpose(2, 0, 1).copy()).float()[None]
    return _resize(tensor, size, "bilinear")[0].clamp(0, 1).numpy(), stored


def read_mask(path: Path, size: int, num_classes: int) -> tuple[np.ndarray, tuple[int, int]]:
    """int64 label map ``(size, size)``, and the stored size ``(H, W)``."""
    array, _ = read_array(path)
    if array.ndim != 2:
        raise DataError(
            f"{path}: mask has {array.shape[2]} channels; expected a single-channel label map "
            "(one integer class per pixel)"
        )
    values = array.astype(np.float64)
    check_mask(values, path, num_classes)
    stored = (int(array.shape[0]), int(array.shape[1]))
    tensor = torch.from_numpy(values.astype(np.float32))[None, None]
    return _resize(tensor, size, "nearest").round().long()[0, 0].numpy(), stored


def check_mask(values: np.ndarray, path: Path, num_classes: int) -> None:
    """Refuse a label map with non-integer values or labels outside ``0..num_classes-1``."""
    if not np.isfinite(values).all() or (values != np.round(values)).any():
        raise DataError(f"{path}: mask holds non-integer values; expected class labels per pixel")
    labels = np.unique(values).astype(np.int64)
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if len(bad):
        hint = ""
        if num_classes == 2 and set(labels.tolist()) <= {0, 255}:
            hint = "; a 0/255 binary mask must be stored as 0/1"
        raise DataError(
            f"{path}: mask contains label {int(bad[0])} (labels found: "
            f"{', '.join(str(v) for v in labels[:10])}); expected 0..{num_classes - 1} "
            f"(run config num-classes = {num_classes}){hint}"
        )


def decode_pair(
    item: Item, size: int, channels: int, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """A row for the site's cache: the image and mask of the pair ``item`` (image file, mask
    file), checked (a mask must have its image's size); a bad file is a
    :class:`FileProblem` naming it."""
    image_file, mask_file = item
    file = image_file
    try:
        image, image_size = read_image(image_file, size, channels)
        file = mask_file
        mask, mask_size = read_mask(mask_file, size, num_classes)
    except FileProblem:
        raise
    except DataError as err:
        raise FileProblem(file, str(err).removeprefix(f"{file}: ")) from None
    if image_size != mask_size:
        mask_text = f"mask is {mask_size[0]}x{mask_size[1]} pixels but its image"
        image_text = f"is {image_size[0]}x{image_size[1]}"
        raise FileProblem(
            mask_file,
            f"{mask_text} {image_text}",
            local=f"{mask_file}: {mask_text} {image_file} {image_text}; every mask must have "
            "its image's size",
        )
    return image, mask


def read_pairs(
    hospital: HospitalConfig,
    scanned: dict[str, list[Pair]],
    size: int,
    channels: int,
    num_classes: int,
) -> dict[str, Split]:
    """Every pair of every split (``{split: pairs}``) read and checked, in one call to the
    site's cache (one entry for the folder, so the next load reuses every unchanged pair).

    A bad file stops loading with its path (for the site's log) and, for the coordinator,
    a site-local reference: ``mask of pair 17 in train/`` (its position by case name, and
    its split folder).
    """
    references: dict[Path, str] = {}
    for split, pairs in scanned.items():
        where = f" in {split}/" if split else ""
        for index, pair in enumerate(pairs, start=1):
            references[pair.image] = f"image of pair {index}{where}"
            references[pair.mask] = f"mask of pair {index}{where}"
    items = [(p.image, p.mask) for pairs in scanned.values() for p in pairs]
    empty = Split(torch.zeros(0, channels, size, size), torch.zeros(0, size, size).long())
    if not items:
        return {split: empty for split in scanned}
    decode = partial(decode_pair, size=size, channels=channels, num_classes=num_classes)
    params = {"size": size, "channels": channels, "classes": num_classes}
    try:
        images, masks = decode_rows(site_cache(hospital), SOURCE, params, items, decode)
    except FileProblem as err:
        shared = f"{references[err.path]}: {err.problem}"
        raise DataError(str(err), shared=shared) from None
    splits: dict[str, Split] = {}
    start = 0
    for split, pairs in scanned.items():
        end = start + len(pairs)
        splits[split] = make_mask_split(images[start:end], masks[start:end]) if pairs else empty
        start = end
    return splits


# ------------------------------------------------------------------------------ the source


def strata(split: Split) -> np.ndarray:
    """Highest label present in each mask: the split keeps rare classes in every part."""
    return split.labels.reshape(len(split), -1).amax(dim=1).numpy()


def scan_layout(root: Path) -> dict[str, list[Pair]]:
    """The folder's pairs without reading them: ``{split: pairs}`` for the split layout,
    ``{"": pairs}`` for one ``images/`` + ``masks/`` folder to be split here."""
    if not root.is_dir():
        raise DataError(f"{root}: segmentation folder not found (hospital config 'data-path')")
    present = {p.name for p in _visible(root) if p.is_dir()}
    if not present & set(SPLITS):
        return {"": scan_pairs(root)}
    strays = [p.name for p in _visible(root) if p.name not in SPLITS or not p.is_dir()]
    if strays:
        raise DataError(
            f"{root}: has split folders and also {', '.join(strays)}; expected only "
            "train/, val/ (optional) and test/, each with images/ and masks/"
        )
    for required in ("train", "test"):
        if required not in present:
            raise DataError(f"{root}: has split folders but no '{required}/' folder")
    return {name: scan_pairs(root / name) for name in SPLITS if name in present}


WHAT = "a folder with images/ and masks/ (PNG or NIfTI)"


def check_files(hospital: HospitalConfig) -> None:
    """Pre-flight: the folder pairs images and masks by name (no file is read)."""
    scan_layout(require_path(hospital, "segmentation-folder", WHAT))


def check_run(request: DataRequest) -> None:
    """Pre-flight and load: image files are grey or colour."""
    require_grey_or_colour(request, "segmentation-folder")


def load(request: DataRequest) -> HospitalData:
    """This hospital's image/mask pairs (its own split, or split here)."""
    run, hospital = request.run, request.hospital
    check_run(request)
    root = require_data_path(request, WHAT)
    size, channels, classes = run.image_size, run.in_channels, run.num_classes
    val_fraction = resolve_val_fraction(hospital, DEFAULT_VAL_FRACTION)
    seed = hospital.data_seed
    splits: dict[str, Split] = {}
    cases: dict[str, list[str]] = {}
    scanned = scan_layout(root)
    if "" not in scanned:
        splits = read_pairs(hospital, scanned, size, channels, classes)
        cases = {name: [f"{name}/{p.case}" for p in pairs] for name, pairs in scanned.items()}
        layout = "given split"
        if "val" not in splits:
            carve_validation(splits, cases, strata(splits["train"]), val_fraction, seed)
            layout = f"given train/test split, val carved from train ({val_fraction})"
    else:
        pairs = scanned[""]
        whole = read_pairs(hospital, scanned, size, channels, classes)[""]
        names = [p.case for p in pairs]
        splits, cases = split_here(whole, names, strata(whole), val_fraction, seed)
        layout = f"split here (val {val_fraction}, test {DEFAULT_TEST_FRACTION})"
    description = f"segmentation-folder {root} ({layout}); pixels per class: " + ", ".join(
        f"{s} {len(splits[s])} images ({counts_text(splits[s], classes)})" for s in SPLITS
    )
    extra = {"source": "segmentation-folder", "folder": str(root), "layout": layout}
    return HospitalData(**splits, description=description, extra={**extra, "cases": cases})
