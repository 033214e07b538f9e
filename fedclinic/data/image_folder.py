"""A folder of class sub-folders of PNG/JPEG images: what a hospital exports from its PACS.

Why: the simplest layout a hospital can produce without any tooling, and the common
``ImageFolder`` convention.

What (``data-path`` = the folder), one of two layouts:

* ``<data-path>/<class>/<image>`` — split here, class by class (stratified), seeded by
  ``data-seed``: test 15 %, val ``val-fraction`` (default 15 %), the rest train;
* ``<data-path>/{train,val,test}/<class>/<image>`` — the hospital's own split, used as
  given (``val/`` may be left out: validation is then carved from ``train/`` as above).

Class folder names, sorted, give the label indices (``0..num-classes-1``); their number must
equal the run's ``num-classes`` and, with the split layout, every split must have the same
class folders. Files must be ``.png``, ``.jpg`` or ``.jpeg`` (any case). Hidden entries
(names starting with ``.``, e.g. ``.DS_Store``, ``.ipynb_checkpoints``) are ignored; any
other file or folder is refused by name — nothing is skipped silently.

Reading (Pillow): converted to ``L`` (grey) when ``in-channels`` = 1 or ``RGB`` when 3
(colour images are converted to grey and grey images replicated, as Pillow's ``convert``
does), then **resized** to ``image-size`` x ``image-size`` with bilinear filtering (the
aspect ratio is not kept: crop beforehand if it matters), then scaled to [0, 1]. 16-bit grey
PNGs are scaled by 65535, not clipped to 8 bits. Decoded images go through the site's cache
(:mod:`fedclinic.data.cache`, hospital config ``data-cache``): a file is decoded once, again
only when it changes.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from fedclinic.config import HospitalConfig
from fedclinic.data.base import DataRequest, HospitalData, Split
from fedclinic.data.cache import Item, decode_rows, site_cache
from fedclinic.data.common import (
    SPLITS,
    FileProblem,
    carve_validation,
    empty_split,
    hospital_data,
    make_split,
    require_data_path,
    require_grey_or_colour,
    require_image_model,
    require_path,
    split_here,
)
from fedclinic.data.splits import DEFAULT_TEST_FRACTION, resolve_val_fraction
from fedclinic.errors import DataError

SOURCE = "image-folder"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
DEFAULT_VAL_FRACTION = 0.15


def _visible(folder: Path) -> list[Path]:
    """Entries of ``folder`` except hidden ones, sorted by name."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def scan(folder: Path) -> dict[str, list[Path]]:
    """``{class name: image files}`` of a folder of class folders, refusing anything else."""
    if not folder.is_dir():
        raise DataError(f"{folder}: image folder not found (hospital config 'data-path')")
    entries = _visible(folder)
    if not entries:
        raise DataError(f"{folder}: the folder is empty; expected one sub-folder per class")
    strays = [p.name for p in entries if not p.is_dir()]
    if strays:
        raise DataError(f"{folder}: expected only class folders, found file(s) {', '.join(strays)}")
    classes: dict[str, list[Path]] = {}
    for class_dir in entries:
        files = _visible(class_dir)
        if not files:
            raise DataError(f"{class_dir}: class folder '{class_dir.name}' has no images")
        for file in files:
            if file.is_dir():
                raise DataError(
                    f"{file}: unexpected folder inside class folder '{class_dir.name}'; "
                    "expected only image files"
                )
            if file.suffix.lower() not in IMAGE_SUFFIXES:
                raise DataError(
                    f"{file}: not an image file; class folders may hold only "
                    f"{', '.join(IMAGE_SUFFIXES)} files"
                )
        classes[class_dir.name] = files
    return classes


def read_image(path: Path, size: int, channels: int) -> np.ndarray:
    """One image as float32 ``(channels, size, size)`` in [0, 1] (see the module notes)."""
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):
                values = np.asarray(image, dtype=np.float64)
                if values.min() < 0 or values.max() > 65535:
                    raise DataError(
                        f"{path}: {image.mode} pixel values outside 0..65535; expected 8- or "
                        "16-bit images"
                    )
                grey = Image.fromarray((values / 65535.0).astype(np.float32))  # mode F
                grey = grey.resize((size, size), Image.Resampling.BILINEAR)
                plane = np.asarray(grey, dtype=np.float32)
                array = np.repeat(plane[None], channels, axis=0)
            else:
                converted = image.convert("L" if channels == 1 else "RGB")
                converted = converted.resize((size, size), Image.Resampling.BILINEAR)
                array = np.asarray(converted, dtype=np.float32) / 255.0
                array = array[None] if channels == 1 else array.transpose(2, 0, 1)
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(f"{path}: not a readable image ({detail})") from None
    return np.ascontiguousarray(array.clip(0.0, 1.0), dtype=np.float32)


def decode_image(item: Item, size: int, channels: int) -> tuple[np.ndarray]:
    """A row for the site's cache: ``(image,)`` of the file ``item[0]``; a bad file is a
    :class:`FileProblem` naming it."""
    try:
        return (read_image(item[0], size, channels),)
    except FileProblem:
        raise
    except DataError as err:
        raise FileProblem(item[0], str(err).removeprefix(f"{item[0]}: ")) from None


def _read_splits(
    hospital: HospitalConfig,
    scanned: dict[str, dict[str, list[Path]]],
    names: list[str],
    size: int,
    channels: int,
) -> tuple[dict[str, Split], dict[str, list[Path]]]:
    """All images of every split's class folders (``{split: {class: files}}``), labelled by
    position in ``names``, decoded in one call to the site's cache (one entry for the
    folder, so the next load reuses every unchanged file).

    A bad image stops loading with its path (for the site's log) and, for the coordinator,
    a site-local reference: ``image 8 of class 'malignant' in train/`` (its position, by
    name, in its class folder, and its split folder).
    """
    files: dict[str, list[Path]] = {}
    labels: dict[str, list[int]] = {}
    references: dict[Path, str] = {}
    for split, classes in scanned.items():
        where = f" in {split}/" if split else ""
        files[split], labels[split] = [], []
        for label, name in enumerate(names):
            for index, file in enumerate(classes[name], start=1):
                files[split].append(file)
                labels[split].append(label)
                references[file] = f"image {index} of class '{name}'{where}"
    items = [(f,) for split in scanned for f in files[split]]
    if not items:
        return {s: empty_split((channels, size, size)) for s in scanned}, files
    decode = partial(decode_image, size=size, channels=channels)
    params = {"size": size, "channels": channels}
    try:
        (images,) = decode_rows(site_cache(hospital), SOURCE, params, items, decode)
    except FileProblem as err:
        shared = f"{references[err.path]}: {err.problem}"
        raise DataError(str(err), shared=shared) from None
    splits: dict[str, Split] = {}
    start = 0
    for split in scanned:
        end = start + len(files[split])
        if end == start:
            splits[split] = empty_split((channels, size, size))
        else:
            splits[split] = make_split(images[start:end], np.asarray(labels[split], np.int64))
        start = end
    return splits, files


def _check_classes(where: Path, names: list[str], num_classes: int) -> None:
    if len(names) != num_classes:
        raise DataError(
            f"{where}: found {len(names)} class folder(s) ({', '.join(names)}); the run expects "
            f"{num_classes} (run config num-classes)"
        )


def scan_layout(root: Path) -> dict[str, dict[str, list[Path]]]:
    """The folder's images without reading them: ``{split: {class: files}}`` for the split
    layout, ``{"": {class: files}}`` for class folders to be split here."""
    if not root.is_dir():
        raise DataError(f"{root}: image folder not found (hospital config 'data-path')")
    if not {p.name for p in _visible(root) if p.is_dir()} & set(SPLITS):
        return {"": scan(root)}
    entries = _visible(root)
    strays = [p.name for p in entries if p.name not in SPLITS or not p.is_dir()]
    if strays:
        raise DataError(
            f"{root}: has split folders ({', '.join(s for s in SPLITS if (root / s).is_dir())}) "
            f"and also {', '.join(strays)}; expected only train/, val/ (optional) and test/"
        )
    for required in ("train", "test"):
        if not (root / required).is_dir():
            raise DataError(f"{root}: has split folders but no '{required}/' folder")
    scanned = {s: scan(root / s) for s in SPLITS if (root / s).is_dir()}
    names = sorted(scanned["train"])
    for split, classes in scanned.items():
        if sorted(classes) != names:
            raise DataError(
                f"{root / split}: class folders ({', '.join(sorted(classes))}) differ from "
                f"train/ ({', '.join(names)}); every split needs the same class folders"
            )
    return scanned


def check_files(hospital: HospitalConfig) -> None:
    """Pre-flight: the folder has one of the two layouts of image files (none is read)."""
    root = require_path(hospital, "image-folder", "a folder of class folders of PNG/JPEG images")
    scan_layout(root)


def check_run(request: DataRequest) -> None:
    """Pre-flight and load: the run's model, channels and classes fit the folder."""
    require_image_model(request, "image-folder")
    require_grey_or_colour(request, "image-folder")
    root = require_data_path(request, "a folder of class folders of PNG/JPEG images")
    scanned = scan_layout(root)
    where = root if "" in scanned else root / "train"
    _check_classes(where, sorted(next(iter(scanned.values()))), request.run.num_classes)


def load(request: DataRequest) -> HospitalData:
    """This hospital's splits from its image folder (its own split, or split here)."""
    check_run(request)
    run, hospital = request.run, request.hospital
    root = require_data_path(request, "a folder of class folders of PNG/JPEG images")
    size, channels = run.image_size, run.in_channels
    val_fraction = resolve_val_fraction(hospital, DEFAULT_VAL_FRACTION)
    seed = hospital.data_seed
    scanned = scan_layout(root)
    splits: dict[str, Split] = {}
    files: dict[str, list[Path]] = {}
    if "" not in scanned:
        names = sorted(scanned["train"])
        splits, files = _read_splits(hospital, scanned, names, size, channels)
        layout = "given split"
        if "val" not in splits:
            strata = splits["train"].labels.numpy()
            carve_validation(splits, files, strata, val_fraction, seed)
            layout = f"given train/test split, val carved from train ({val_fraction})"
    else:
        names = sorted(scanned[""])
        read, read_files = _read_splits(hospital, scanned, names, size, channels)
        whole, all_files = read[""], read_files[""]
        splits, files = split_here(whole, all_files, whole.labels.numpy(), val_fraction, seed)
        layout = f"split here (val {val_fraction}, test {DEFAULT_TEST_FRACTION})"
    return hospital_data(
        splits,
        f"image-folder {root} ({layout}); classes {', '.join(names)}",
        run.num_classes,
        {
            "source": "image-folder",
            "folder": str(root),
            "classes": names,
            "layout": layout,
            # Which file went where (relative to the folder), in the order of the split.
            "files": {s: [str(f.relative_to(root)) for f in files[s]] for s in SPLITS},
        },
    )
