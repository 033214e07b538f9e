"""DICOM files as a PACS exports them, plus a label sheet: ``data-source = "dicom"``.

Why: hospitals hold DICOM, one file per image, with patient identifiers in the headers and
labels in a spreadsheet keyed by study or accession number; converting to PNG by hand
loses the rescale and window a radiologist reads with and invites mistakes. docs/data.md
tells a hospital's IT how to export and what the sheet looks like.

What (``data-path`` = the export folder, any depth of sub-folders): every file is a DICOM
Part 10 file (``DICM`` at byte 128), except hidden entries, ``DICOMDIR``, the label sheet,
the mask folder and what ``dicom-exclude`` names; anything else is refused by name. One
image per instance (``dicom-frame`` picks the frame of a multi-frame one). Which instances
are images to learn from, in this order (each left-out count is in the site's log):

* not images (no Rows/Columns: structured reports, presentation states, ...) and DICOM SEG
  files (masks, for segmentation) are not images;
* ``dicom-modality``: only these modalities; when empty, the images must share one;
* ``dicom-series-description``: only series whose SeriesDescription matches (regex);
* ``dicom-series = "largest"``: per study, only the series with the most images;
* images of different sizes are refused unless ``dicom-mixed-sizes = true``.

Labels (classification): ``dicom-label-sheet`` (CSV; default ``labels.csv`` in data-path),
one row per ``dicom-label-key`` value (StudyInstanceUID by default): a column of that name,
a ``label`` column (integers 0..num-classes-1, or class names whose sorted order gives the
indices) and optionally a ``split`` column (train/val/test). Every image needs a row and
every row an image. Segmentation: masks from DICOM SEG files in the tree (highdicom; segment
number k is label k), or, with ``dicom-masks``, a folder of ``<SOPInstanceUID>.png`` /
``.nii`` / ``.nii.gz`` masks.

Splits are by patient, so one patient's images never span train and test: the sheet's
``split`` column (a patient in two splits is refused), else the SHA-256 of ``data-seed``
and the PatientID: test 15 %, val ``val-fraction`` (default 15 %). A patient's split depends
on nothing else, so adding patients to the export never moves another patient.

Patient identifiers stay at the site: headers are read with ``stop_before_pixels`` and only
the tags in :data:`HEADER_TAGS`; pixels with the image elements only
(:mod:`fedclinic.data.dicom_pixels`). No message carries a header value: a problem names the
file (site log) and, for the coordinator, ``DICOM file #12`` (its position in the sorted
tree) or ``label sheet row 7``. Decoded images go through the site's cache
(:mod:`fedclinic.data.cache`): decoding happens once, again only for changed files.
"""

from __future__ import annotations

import csv
import fnmatch
import hashlib
import os
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from pydicom import dcmread

from fedclinic.config import HospitalConfig
from fedclinic.data.base import DataRequest, HospitalData
from fedclinic.data.cache import decode_rows, site_cache
from fedclinic.data.common import (
    SPLITS,
    counts_text,
    hospital_data,
    make_mask_split,
    make_split,
    require_data_path,
    require_grey_or_colour,
    require_image_model,
    require_path,
)
from fedclinic.data.dicom_pixels import (
    SEGMENTATION_STORAGE,
    FileProblem,
    decode_instance,
    first_line,
    quiet,
    read_instance_and_mask,
    segmentation_sources,
)
from fedclinic.data.segmentation_folder import case_of
from fedclinic.data.splits import DEFAULT_TEST_FRACTION, resolve_val_fraction
from fedclinic.errors import ConfigError, DataError

SOURCE = "dicom"
DEFAULT_VAL_FRACTION = 0.15
#: every header element the scan reads (nothing else is kept; PatientID only for the split)
HEADER_TAGS = [
    "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
    "AccessionNumber", "PatientID", "Modality", "SeriesDescription",
    "Rows", "Columns", "NumberOfFrames",
]  # fmt: skip
REQUIRED_TAGS = ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "PatientID")
WHAT = "a folder of DICOM files (a PACS export)"


@dataclass(frozen=True)
class Instance:
    """What the scan keeps of one file: identifiers for matching and splitting (never sent
    anywhere), and what the series rules need."""

    path: Path
    number: int  # position in the sorted tree: the reference the coordinator may see
    sop_class: str
    sop: str
    study: str
    series: str
    accession: str
    patient: str
    modality: str
    description: str
    rows: int
    columns: int

    @property
    def reference(self) -> str:
        return f"DICOM file #{self.number}"

    @property
    def is_image(self) -> bool:
        return self.rows > 0 and self.columns > 0 and self.sop_class != SEGMENTATION_STORAGE

    def key(self, name: str) -> str:
        return {
            "StudyInstanceUID": self.study,
            "SeriesInstanceUID": self.series,
            "SOPInstanceUID": self.sop,
            "AccessionNumber": self.accession,
        }[name]


def problem(instance: Instance, text: str) -> DataError:
    """One file's problem: its path for the site's log, its number for the coordinator."""
    return DataError(f"{instance.path}: {text}", shared=f"{instance.reference}: {text}")


# ------------------------------------------------------------------------------ the tree


def site_path(hospital: HospitalConfig, value: str) -> Path:
    """A dicom-* path key: relative paths are relative to data-path."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else Path(hospital.data_path).expanduser() / path


def list_files(root: Path, hospital: HospitalConfig) -> list[Path]:
    """The DICOM files of the tree, sorted by relative path (their numbers start at 1).

    Skipped by rule: hidden entries, ``DICOMDIR``, the label sheet, the mask folder and
    ``dicom-exclude`` globs (matched against the relative path and the file name); any
    other file without the DICOM Part 10 marker is refused by name.
    """
    if not root.is_dir():
        raise DataError(f"{root}: DICOM folder not found (hospital config 'data-path')")
    skip = {site_path(hospital, hospital.dicom_label_sheet).resolve()}
    masks = site_path(hospital, hospital.dicom_masks).resolve() if hospital.dicom_masks else None
    patterns = [p.strip() for p in hospital.dicom_exclude.split(",") if p.strip()]
    files = []
    for folder, folders, names in os.walk(root):
        folders[:] = sorted(
            f for f in folders if not f.startswith(".") and Path(folder, f).resolve() != masks
        )
        for name in names:
            path = Path(folder, name)
            relative = path.relative_to(root).as_posix()
            if name.startswith(".") or name.upper() == "DICOMDIR" or path.resolve() in skip:
                continue
            if any(fnmatch.fnmatch(relative, p) or fnmatch.fnmatch(name, p) for p in patterns):
                continue
            files.append(path)
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    for number, path in enumerate(files, start=1):
        try:
            with path.open("rb") as handle:
                handle.seek(128)
                marker = handle.read(4)
        except OSError as err:
            raise DataError(
                f"{path}: not readable ({err.strerror})",
                shared=f"DICOM file #{number}: not readable ({err.strerror})",
            ) from None
        if marker != b"DICM":
            text = (
                "not a DICOM file (no 'DICM' marker at byte 128); export DICOM Part 10 files, "
                "or name it in dicom-exclude"
            )
            raise DataError(f"{path}: {text}", shared=f"DICOM file #{number}: {text}")
    if not files:
        raise DataError(f"{root}: no DICOM files in the folder (hospital config 'data-path')")
    return files


def _text(dataset: object, keyword: str) -> str:
    value = getattr(dataset, keyword, None)
    return "" if value is None else str(value).strip().rstrip("\x00").strip()


def read_header(path: Path, number: int) -> Instance:
    """The few header elements the source needs (:data:`HEADER_TAGS`), no pixel data."""
    reference = f"DICOM file #{number}"
    try:
        with quiet():  # values are parsed when read: pydicom's warnings come then too
            header = dcmread(path, stop_before_pixels=True, specific_tags=HEADER_TAGS)
            meta = "TransferSyntaxUID" in getattr(header, "file_meta", {})
            values = {k: _text(header, k) for k in HEADER_TAGS}
    except Exception as err:  # pydicom raises many types for a broken file
        raise DataError(
            f"{path}: not a readable DICOM file ({first_line(err)})",
            shared=f"{reference}: not a readable DICOM file",
        ) from None
    if not meta:
        raise DataError(
            f"{path}: not a readable DICOM file (no file meta information: a broken or "
            "truncated file)",
            shared=f"{reference}: not a readable DICOM file",
        )
    missing = [k for k in REQUIRED_TAGS if not values[k]]
    if missing:
        why = " (the split is by patient)" if "PatientID" in missing else ""
        text = f"no {', '.join(missing)} in the header{why}; every instance needs one"
        raise DataError(f"{path}: {text}", shared=f"{reference}: {text}")
    try:
        rows, columns = int(values["Rows"] or 0), int(values["Columns"] or 0)
    except ValueError:
        rows = columns = 0
    return Instance(
        path, number, values["SOPClassUID"], values["SOPInstanceUID"], values["StudyInstanceUID"],
        values["SeriesInstanceUID"], values["AccessionNumber"], values["PatientID"],
        values["Modality"].upper(), values["SeriesDescription"], rows, columns,
    )  # fmt: skip


def scan(root: Path, hospital: HospitalConfig) -> list[Instance]:
    """Every file's header; duplicate SOPInstanceUIDs are refused (naming both files)."""
    instances = [read_header(p, i) for i, p in enumerate(list_files(root, hospital), start=1)]
    seen: dict[str, Instance] = {}
    for instance in instances:
        if instance.sop in seen:
            first = seen[instance.sop]
            raise DataError(
                f"{instance.path}: the same SOPInstanceUID as {first.path}; remove the duplicate "
                "file (an instance must be exported once)",
                shared=f"{instance.reference} has the same SOPInstanceUID as {first.reference}",
            )
        seen[instance.sop] = instance
    return instances


# ------------------------------------------------------------------------------ series rules


@dataclass(frozen=True)
class Selection:
    """The images to learn from and what the rules left out (counts, for the site's log)."""

    images: list[Instance]
    left_out: dict[str, int]
    segs: list[Instance]

    def summary(self) -> str:
        dropped = ", ".join(f"{n} {why}" for why, n in self.left_out.items() if n)
        return f"{len(self.images)} images" + (f" (left out: {dropped})" if dropped else "")


def select(instances: list[Instance], hospital: HospitalConfig) -> Selection:
    """Apply the series rules (module notes) in order."""
    left_out: dict[str, int] = {}
    segs = [i for i in instances if i.sop_class == SEGMENTATION_STORAGE]
    images = [i for i in instances if i.is_image]
    left_out["not images"] = len(instances) - len(images) - len(segs)
    wanted = [m for m in hospital.dicom_modality.split(",") if m]
    if wanted:
        kept = [i for i in images if i.modality in wanted]
        left_out["by dicom-modality"] = len(images) - len(kept)
        images = kept
    else:
        by_modality: dict[str, Instance] = {}
        for image in images:
            by_modality.setdefault(image.modality, image)
        if len(by_modality) > 1:
            (a, first), (b, second) = list(by_modality.items())[:2]
            raise DataError(
                f"{second.path}: modality {b or '(none)'}, but {first.path} is {a or '(none)'}; "
                "images of several modalities need a rule: set dicom-modality (e.g. "
                f"'{a or 'OT'}' or '{','.join(m for m in by_modality if m)}')",
                shared=f"{second.reference} is modality {b or '(none)'} but {first.reference} "
                f"is {a or '(none)'}; set dicom-modality",
            )
    if hospital.dicom_series_description:
        pattern = re.compile(hospital.dicom_series_description, re.IGNORECASE)
        kept = [i for i in images if pattern.search(i.description)]
        left_out["by dicom-series-description"] = len(images) - len(kept)
        images = kept
    if hospital.dicom_series == "largest":
        series: dict[str, dict[str, list[Instance]]] = defaultdict(lambda: defaultdict(list))
        for image in images:
            series[image.study][image.series].append(image)
        keep: set[str] = set()
        for by_series in series.values():  # most images; a tie goes to the first in the tree
            best = max(by_series.values(), key=lambda s: (len(s), -s[0].number))
            keep.update(i.sop for i in best)
        kept = [i for i in images if i.sop in keep]
        left_out["by dicom-series = largest"] = len(images) - len(kept)
        images = kept
    if not images:
        raise DataError(
            f"no image left to learn from: {len(instances)} DICOM files, left out "
            + ", ".join(f"{n} {why}" for why, n in left_out.items())
        )
    sizes: dict[tuple[int, int], Instance] = {}
    for image in images:
        sizes.setdefault((image.rows, image.columns), image)
    if len(sizes) > 1 and not hospital.dicom_mixed_sizes:
        (size_a, first), (size_b, second) = list(sizes.items())[:2]
        text = (
            f"{size_b[0]}x{size_b[1]} pixels, but {{}} is {size_a[0]}x{size_a[1]}; "
            "images of different sizes"
        )
        advice = (
            " need a rule: set dicom-mixed-sizes = true to resize each to image-size, or "
            "select one kind of series (dicom-series-description, dicom-modality)"
        )
        raise DataError(
            f"{second.path}: " + text.format(first.path) + advice,
            shared=f"{second.reference}: " + text.format(first.reference) + advice,
        )
    return Selection(images, left_out, segs)


# ------------------------------------------------------------------------------ label sheet


@dataclass(frozen=True)
class SheetRow:
    """One row: its line number in the file (as a spreadsheet shows it), key, label, split."""

    line: int
    key: str
    label: str
    split: str


def sheet_path(hospital: HospitalConfig) -> Path:
    return site_path(hospital, hospital.dicom_label_sheet)


def read_sheet(path: Path, key: str) -> list[SheetRow]:
    """The label sheet's rows; other columns are not read. Comma, semicolon or tab separated
    (as Excel saves CSV in different locales), UTF-8 with or without a BOM."""
    if not path.is_file():
        raise DataError(
            f"{path}: label sheet not found (hospital config 'dicom-label-sheet'); "
            f"expected a CSV with columns {key}, label (and optionally split)",
            shared="the label sheet was not found (hospital config 'dicom-label-sheet')",
        )
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(
            f"{path}: the label sheet is not UTF-8 text; save it as 'CSV UTF-8'",
            shared="the label sheet is not UTF-8 text",
        ) from None
    lines = text.splitlines()
    try:
        dialect: type[csv.Dialect] | csv.Dialect = csv.Sniffer().sniff(
            lines[0] if lines else "", delimiters=",;\t"
        )
    except csv.Error:
        dialect = csv.excel
    table = list(csv.reader(lines, dialect))
    header = [h.strip().lower() for h in (table[0] if table else [])]
    columns = {name: header.index(name.lower()) for name in (key, "label", "split")
               if name.lower() in header}  # fmt: skip
    for required in (key, "label"):
        if required not in columns:
            found = ", ".join(h for h in header if h) or "none"
            raise DataError(
                f"{path}: the label sheet has no '{required}' column (columns found: {found}); "
                f"expected {key}, label and optionally split (hospital config "
                "'dicom-label-key' names the key column)",
                shared=f"the label sheet has no '{required}' column",
            )
    rows: list[SheetRow] = []
    first: dict[str, int] = {}
    for line, cells in enumerate(table[1:], start=2):
        if not any(c.strip() for c in cells):
            continue
        cell = {n: (cells[i].strip() if i < len(cells) else "") for n, i in columns.items()}
        for name in (key, "label") + (("split",) if "split" in columns else ()):
            if not cell[name]:
                raise _row_error(path, line, f"the '{name}' cell is empty")
        split = cell.get("split", "").lower()
        if "split" in columns and split not in SPLITS:
            raise _row_error(path, line, f"split '{cell['split']}' is not train, val or test")
        if cell[key] in first:
            raise _row_error(
                path, line, f"the same {key} as row {first[cell[key]]}; one row per {key}"
            )
        first[cell[key]] = line
        rows.append(SheetRow(line, cell[key], cell["label"], split))
    if not rows:
        raise DataError(f"{path}: the label sheet has no rows", shared="the label sheet is empty")
    return rows


def _row_error(path: Path, line: int, text: str) -> DataError:
    return DataError(f"{path}: row {line}: {text}", shared=f"label sheet row {line}: {text}")


def class_names(rows: Sequence[SheetRow], num_classes: int, path: Path) -> dict[str, int]:
    """Label -> class index: integers 0..num-classes-1 stand for themselves (``01`` is 1);
    otherwise the sorted names give the indices and there must be num-classes of them."""
    labels = sorted({r.label for r in rows})
    if all(re.fullmatch(r"\d+", v) and int(v) < num_classes for v in labels):
        return {v: int(v) for v in labels}
    if len(labels) != num_classes:
        shown = ", ".join(labels[:10]) + (" ..." if len(labels) > 10 else "")
        text = (
            f"the label sheet has {len(labels)} classes ({shown}); the run expects "
            f"{num_classes} (run config num-classes): labels are integers 0..{num_classes - 1} "
            f"or {num_classes} class names"
        )
        raise DataError(f"{path}: {text}", shared=text)
    return {name: index for index, name in enumerate(labels)}


def label_images(
    images: list[Instance],
    all_instances: list[Instance],
    rows: list[SheetRow],
    key: str,
    path: Path,
) -> dict[str, SheetRow]:
    """``{SOPInstanceUID: row}``: every image has a row, every row an image."""
    by_key = {r.key: r for r in rows}
    labelled: dict[str, SheetRow] = {}
    used: set[str] = set()
    for image in images:
        value = image.key(key)
        if not value:
            raise problem(image, f"no {key} in the header; the label sheet is keyed by it")
        if value not in by_key:
            raise problem(
                image, f"no row in the label sheet for its {key} (every image needs a label)"
            )
        labelled[image.sop] = by_key[value]
        used.add(value)
    present = {i.key(key) for i in all_instances}
    for row in rows:
        if row.key in used:
            continue
        if row.key in present:
            why = (
                f"every instance of this {key} was left out by the series rules "
                "(dicom-modality, dicom-series-description, dicom-series) or is not an image"
            )
        else:
            why = f"no DICOM file in data-path has this {key}"
        raise _row_error(path, row.line, why + "; remove the row or export its images")
    return labelled


# ------------------------------------------------------------------------------ splits


def patient_share(patient: str, seed: int) -> float:
    """A patient's place in [0, 1): SHA-256 of the seed and the PatientID."""
    digest = hashlib.sha256(f"fedclinic-dicom/{seed}/{patient}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def hashed_split(patient: str, seed: int, val_fraction: float) -> str:
    share = patient_share(patient, seed)
    if share < DEFAULT_TEST_FRACTION:
        return "test"
    return "val" if share < DEFAULT_TEST_FRACTION + val_fraction else "train"


def assign_splits(
    images: list[Instance], given: dict[str, str] | None, seed: int, val_fraction: float
) -> dict[str, list[Instance]]:
    """Images per split, by patient: ``given`` (SOPInstanceUID -> split, from the sheet) or
    hashed. With a given split without val, val is carved from train by patient hash."""
    splits: dict[str, list[Instance]] = {name: [] for name in SPLITS}
    if given is None:
        for image in images:
            splits[hashed_split(image.patient, seed, val_fraction)].append(image)
        return splits
    first: dict[str, Instance] = {}
    for image in images:
        other = first.setdefault(image.patient, image)
        if given[other.sop] != given[image.sop]:
            a, b = given[other.sop], given[image.sop]
            raise DataError(
                f"{image.path}: the label sheet puts it in {b} but {other.path}, of the same "
                f"patient, in {a}; one patient must stay in one split",
                shared=f"{image.reference} and {other.reference} belong to one patient but the "
                f"label sheet puts them in {b} and {a}",
            )
    carve = not any(given[i.sop] == "val" for i in images)
    for image in images:
        split = given[image.sop]
        if carve and split == "train" and patient_share(image.patient, seed) < val_fraction:
            split = "val"
        splits[split].append(image)
    return splits


# ------------------------------------------------------------------------------ masks


def mask_files(
    images: list[Instance], selection: Selection, hospital: HospitalConfig
) -> dict[str, Path]:
    """``{SOPInstanceUID: mask file}``: a DICOM SEG of the tree or a file of ``dicom-masks``.
    Every image needs one mask; every mask must belong to an image."""
    wanted = {i.sop: i for i in images}
    masks: dict[str, Path] = {}
    if hospital.dicom_masks:
        folder = site_path(hospital, hospital.dicom_masks)
        if not folder.is_dir():
            raise DataError(
                f"{folder}: mask folder not found (hospital config 'dicom-masks')",
                shared="the mask folder was not found (hospital config 'dicom-masks')",
            )
        for entry in sorted(folder.iterdir()):
            case = case_of(entry)
            if entry.name.startswith("."):
                continue
            if entry.is_dir() or case is None:
                raise DataError(
                    f"{entry}: not a mask file; the mask folder may hold only "
                    "<SOPInstanceUID>.png, .nii or .nii.gz files",
                    shared="the mask folder holds a file that is not a mask",
                )
            if case not in wanted:
                raise DataError(
                    f"{entry}: no selected image has this SOPInstanceUID (the mask's name); "
                    "remove the mask or export its image",
                    shared="a mask file names no selected image",
                )
            if case in masks:
                raise DataError(
                    f"{entry}: a second mask for the image of {masks[case]}",
                    shared=f"two mask files for {wanted[case].reference}",
                )
            masks[case] = entry
    else:
        for seg in selection.segs:
            for sop in segmentation_sources(seg.path):
                if sop not in wanted:
                    raise problem(
                        seg,
                        "a DICOM SEG with a mask for an image that is not among the selected "
                        "images (missing, or left out by the series rules)",
                    )
                if sop in masks:
                    raise problem(
                        seg,
                        f"a second DICOM SEG for {wanted[sop].reference}; keep one per image "
                        f"(the other is {masks[sop]})",
                    )
                masks[sop] = seg.path
    for image in images:
        if image.sop not in masks:
            where = "in dicom-masks" if hospital.dicom_masks else "in any DICOM SEG of data-path"
            raise problem(image, f"no mask for this image {where} (every image needs a mask)")
    return masks


# ------------------------------------------------------------------------------ the source


def check_files(hospital: HospitalConfig) -> None:
    """Pre-flight: the folder holds DICOM files (markers only; no header is parsed) and a
    label sheet, when there is one, has its columns."""
    root = require_path(hospital, SOURCE, WHAT)
    list_files(root, hospital)
    sheet = sheet_path(hospital)
    if sheet.is_file():
        read_sheet(sheet, hospital.dicom_label_key)


def _check_image_run(request: DataRequest) -> None:
    require_image_model(request, SOURCE)
    require_grey_or_colour(request, SOURCE)
    require_data_path(request, WHAT)


def check_run_classification(request: DataRequest) -> None:
    """Pre-flight and load: an image model, 1 or 3 channels, a label sheet that fits."""
    _check_image_run(request)
    rows = read_sheet(sheet_path(request.hospital), request.hospital.dicom_label_key)
    class_names(rows, request.run.num_classes, sheet_path(request.hospital))


def check_run_segmentation(request: DataRequest) -> None:
    """Pre-flight and load: 1 or 3 channels; a mask folder when one is named."""
    _check_image_run(request)
    if (
        request.hospital.dicom_masks
        and not site_path(request.hospital, request.hospital.dicom_masks).is_dir()
    ):
        folder = site_path(request.hospital, request.hospital.dicom_masks)
        raise ConfigError(
            f"hospital config: key 'dicom-masks' = {request.hospital.dicom_masks!r}: "
            f"{folder} is not a folder"
        )


def decode_all(
    request: DataRequest,
    images: list[Instance],
    items: Sequence[tuple[Path, ...]],
    decode: Callable[[tuple[Path, ...]], tuple[np.ndarray, ...]],
) -> tuple[np.ndarray, ...]:
    """Decoded rows of every image, in one call to the site's cache (one entry for the
    selection, so a later load reuses every row); a bad file keeps its number."""
    by_path = {i.path: i for i in images}
    params = {"size": request.run.image_size, "channels": request.run.in_channels}
    try:
        return decode_rows(site_cache(request.hospital), SOURCE, params, items, decode)
    except FileProblem as err:
        instance = by_path.get(err.path)
        where = instance.reference if instance else "a mask file"
        raise DataError(str(err), shared=f"{where}: {err.problem}") from None


def split_rows(
    images: list[Instance], parts: dict[str, list[Instance]], rows: tuple[np.ndarray, ...]
) -> dict[str, tuple[np.ndarray, ...]]:
    """The decoded rows of each split (rows are in the order of ``images``)."""
    index = {i.sop: n for n, i in enumerate(images)}
    return {
        name: tuple(r[[index[i.sop] for i in part]] for r in rows) for name, part in parts.items()
    }


def _prepare(request: DataRequest) -> tuple[Path, list[Instance], Selection, float]:
    check = (
        check_run_classification if request.run.task == "classification"
        else check_run_segmentation
    )  # fmt: skip
    check(request)
    root = require_data_path(request, WHAT)
    instances = scan(root, request.hospital)
    return (
        root,
        instances,
        select(instances, request.hospital),
        resolve_val_fraction(request.hospital, DEFAULT_VAL_FRACTION),
    )


def _layout(given: bool, splits: dict[str, list[Instance]], val_fraction: float) -> str:
    patients = len({i.patient for s in splits.values() for i in s})
    how = (
        "split given by the label sheet"
        if given
        else (f"split by patient hash (val {val_fraction}, test {DEFAULT_TEST_FRACTION})")
    )
    return f"{how}; {patients} patients"


def load_classification(request: DataRequest) -> HospitalData:
    """This hospital's DICOM images with the label sheet's labels, split by patient."""
    run, hospital = request.run, request.hospital
    root, instances, selection, val_fraction = _prepare(request)
    sheet = sheet_path(hospital)
    rows = read_sheet(sheet, hospital.dicom_label_key)
    classes = class_names(rows, run.num_classes, sheet)
    names = sorted(classes, key=classes.__getitem__)
    labelled = label_images(selection.images, instances, rows, hospital.dicom_label_key, sheet)
    given = {sop: row.split for sop, row in labelled.items()} if rows[0].split else None
    parts = assign_splits(selection.images, given, hospital.data_seed, val_fraction)
    decode = partial(
        decode_instance, size=run.image_size, channels=run.in_channels,
        window=hospital.dicom_window, frame=hospital.dicom_frame,
    )  # fmt: skip
    images = selection.images
    (inputs,) = decode_all(request, images, [(i.path,) for i in images], decode)
    labels = np.asarray([classes[labelled[i.sop].label] for i in images], dtype=np.int64)
    rows_of = split_rows(images, parts, (inputs, labels))
    splits = {name: make_split(*rows_of[name]) for name in SPLITS}
    layout = _layout(given is not None, parts, val_fraction)
    return hospital_data(
        splits,
        f"dicom {root}: {selection.summary()} of {len(instances)} files, {layout}; "
        f"classes {', '.join(names)}",
        run.num_classes,
        _extra(root, parts, layout, names),
    )


def load_segmentation(request: DataRequest) -> HospitalData:
    """This hospital's DICOM images with masks from DICOM SEG or mask files, by patient."""
    run, hospital = request.run, request.hospital
    root, instances, selection, val_fraction = _prepare(request)
    masks = mask_files(selection.images, selection, hospital)
    parts = assign_splits(selection.images, None, hospital.data_seed, val_fraction)
    decode = partial(
        read_instance_and_mask, size=run.image_size, channels=run.in_channels,
        window=hospital.dicom_window, frame=hospital.dicom_frame, num_classes=run.num_classes,
    )  # fmt: skip
    images = selection.images
    items = [(i.path, masks[i.sop]) for i in images]
    rows_of = split_rows(images, parts, decode_all(request, images, items, decode))
    splits = {name: make_mask_split(*rows_of[name]) for name in SPLITS}
    layout = _layout(False, parts, val_fraction)
    masks_from = "mask files" if hospital.dicom_masks else "DICOM SEG"
    description = (
        f"dicom {root}: {selection.summary()} of {len(instances)} files, masks from "
        f"{masks_from}, {layout}; pixels per class: "
        + ", ".join(
            f"{s} {len(splits[s])} images ({counts_text(splits[s], run.num_classes)})"
            for s in SPLITS
        )
    )
    return HospitalData(**splits, description=description, extra=_extra(root, parts, layout, None))


def _extra(
    root: Path, parts: dict[str, list[Instance]], layout: str, names: list[str] | None
) -> dict[str, object]:
    """What stays at the site beside the data: which file went where (relative paths)."""
    extra: dict[str, object] = {
        "source": SOURCE,
        "folder": str(root),
        "layout": layout,
        "files": {s: [str(i.path.relative_to(root)) for i in parts[s]] for s in SPLITS},
        "patients": {s: len({i.patient for i in parts[s]}) for s in SPLITS},
    }
    if names is not None:
        extra["classes"] = names
    return extra
