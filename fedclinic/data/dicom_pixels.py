"""One DICOM instance to one image array, and a DICOM SEG to one label map per image.

Why a module of its own: these are the decode functions of the ``dicom`` source that the
site's preprocessed-data cache (:mod:`fedclinic.data.cache`) calls, and the cache keys its
entries on this module's source, so a change here decodes everything again while a change
of how files are scanned or split (``dicom.py``) does not.

What is read (pydicom): the pixel data of one frame and the group 0028 elements that say
how to turn it into an image (rows, columns, bits, photometric interpretation, rescale,
window, LUTs), plus the functional groups of enhanced multi-frame images; ``pixel_array``
with ``ds_out`` reads nothing else, so no patient identifier is ever in memory here. Then:

1. the modality LUT (RescaleSlope/RescaleIntercept or the Modality LUT Sequence), pydicom's
   ``apply_modality_lut``: stored values become HU, optical density, ...;
2. the VOI transform to [0, 1], by ``dicom-window``: ``file`` (the file's first Window
   Center/Width with its VOI LUT Function, else its VOI LUT Sequence, else min-max),
   ``minmax`` (per image), or ``center,width`` (linear, DICOM PS3.3 C.11.2.1.2); windows go
   through pydicom's ``apply_windowing`` onto an output range of exactly [0, 1];
3. MONOCHROME1 (white is low) is inverted, so that high always means bright;
4. colour (RGB, YBR converted to RGB by pydicom) is scaled by its bit depth and, for one
   channel, turned grey by ITU-R 601 luminance; grey is replicated to three channels;
5. resizing to ``image-size`` (bilinear, antialiased; the aspect ratio is not kept).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, apply_voi, apply_windowing, pixel_array

from fedclinic.data.common import FileProblem
from fedclinic.data.segmentation_folder import LUMINANCE, _resize, check_mask, read_array
from fedclinic.errors import DataError

#: SOP Class UID of DICOM Segmentation Storage
SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
#: which package decodes which compressed transfer syntax (by pydicom's name prefix)
DECODERS = {
    "JPEG Baseline": "pylibjpeg + pylibjpeg-libjpeg, or python-gdcm",
    "JPEG Extended": "pylibjpeg + pylibjpeg-libjpeg, or python-gdcm",
    "JPEG Lossless": "pylibjpeg + pylibjpeg-libjpeg, or python-gdcm",
    "JPEG-LS": "pyjpegls, or pylibjpeg + pylibjpeg-libjpeg, or python-gdcm",
    "JPEG 2000": "pylibjpeg + pylibjpeg-openjpeg, or python-gdcm",
    "High-Throughput JPEG 2000": "pylibjpeg + pylibjpeg-openjpeg",
    "RLE Lossless": "pylibjpeg + pylibjpeg-rle (pydicom decodes it too, slowly)",
}
_FUNCTIONAL_GROUPS = [0x52009229, 0x52009230]  # Shared, Per-frame Functional Groups Sequence


@contextmanager
def quiet() -> Iterator[None]:
    """pydicom warns about odd files with the element's value in the text: not here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__


def decoder_hint(transfer_syntax: str) -> str:
    """Which package would decode pixel data in ``transfer_syntax`` (pydicom's UID name)."""
    for prefix, packages in DECODERS.items():
        if transfer_syntax.startswith(prefix):
            return f"install a decoder for it: {packages}"
    return "convert the files to an uncompressed transfer syntax (e.g. Explicit VR Little Endian)"


def frame_index(frames: int, rule: str) -> int:
    """The frame taken from a multi-frame instance: ``first``, or ``middle`` (frames // 2)."""
    return frames // 2 if rule == "middle" and frames > 1 else 0


def read_frame(path: Path, frame_rule: str) -> tuple[np.ndarray, Dataset]:
    """One frame's pixels as stored and the group 0028 (+ functional groups) elements."""
    with quiet():
        try:
            header = dcmread(path, stop_before_pixels=True, specific_tags=[0x00280008])
            frames = int(header.get("NumberOfFrames") or 1)
            syntax = header.file_meta.TransferSyntaxUID
        except Exception as err:  # pydicom raises many types for a broken file
            raise FileProblem(path, "not a readable DICOM file", first_line(err)) from None
        pixels = Dataset()
        try:
            array = pixel_array(
                str(path),
                ds_out=pixels,
                index=frame_index(frames, frame_rule),
                specific_tags=_FUNCTIONAL_GROUPS,
            )
        except Exception as err:
            if syntax.is_compressed and isinstance(err, (RuntimeError, NotImplementedError)):
                raise FileProblem(
                    path,
                    f"pixel data in transfer syntax '{syntax.name}' cannot be decoded here; "
                    + decoder_hint(syntax.name),
                    first_line(err),
                ) from None
            raise FileProblem(path, "pixel data not readable", first_line(err)) from None
    _frame_groups(pixels, frame_index(frames, frame_rule))
    return array, pixels


def _frame_groups(ds: Dataset, index: int) -> None:
    """Enhanced multi-frame images keep rescale and window in functional groups: copy the
    frame's (else the shared) values to the top level, where pydicom's LUT functions look."""
    groups = []
    if "PerFrameFunctionalGroupsSequence" in ds and index < len(
        ds.PerFrameFunctionalGroupsSequence
    ):
        groups.append(ds.PerFrameFunctionalGroupsSequence[index])
    if "SharedFunctionalGroupsSequence" in ds and len(ds.SharedFunctionalGroupsSequence):
        groups.append(ds.SharedFunctionalGroupsSequence[0])
    for sequence, keywords in (
        ("PixelValueTransformationSequence", ("RescaleSlope", "RescaleIntercept")),
        ("FrameVOILUTSequence", ("WindowCenter", "WindowWidth", "VOILUTFunction")),
    ):
        for group in groups:
            if sequence in group and len(group[sequence].value):
                item = group[sequence].value[0]
                for keyword in keywords:
                    if keyword in item and keyword not in ds:
                        setattr(ds, keyword, item[keyword].value)
                break


def window_to_unit(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """pydicom's windowing onto exactly [0, 1]: an unsigned 1-bit output range."""
    voi = Dataset()
    voi.PhotometricInterpretation = "MONOCHROME2"
    voi.BitsStored, voi.PixelRepresentation = 1, 0
    voi.WindowCenter, voi.WindowWidth = center, width
    voi.VOILUTFunction = function
    return apply_windowing(values.astype(np.float64), voi)


def min_max(values: np.ndarray) -> np.ndarray:
    low, high = float(values.min()), float(values.max())
    return (values - low) / (high - low) if high > low else np.zeros_like(values)


def _first(value: Any) -> float:
    """A window value: multi-valued elements give several views; the first is the default."""
    return float(value[0]) if isinstance(value, MultiValue | list | tuple) else float(value)


def grey_to_unit(stored: np.ndarray, ds: Dataset, window: str) -> np.ndarray:
    """Modality LUT, then the VOI transform to [0, 1], then MONOCHROME1 inverted."""
    values = np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
    if window == "minmax":
        unit = min_max(values)
    elif window != "file":
        center, width = (float(v) for v in window.split(","))
        unit = window_to_unit(values, center, width, "LINEAR")
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        function = str(ds.get("VOILUTFunction") or "LINEAR").upper()
        center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
        if function == "LINEAR" and width < 1:
            function = "LINEAR_EXACT"  # a width under 1 is only defined for LINEAR_EXACT
        unit = window_to_unit(values, center, width, function)
    elif "VOILUTSequence" in ds and len(ds.VOILUTSequence):
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        unit = np.asarray(apply_voi(values, ds), dtype=np.float64) / (2**bits - 1)
    else:
        unit = min_max(values)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        unit = 1.0 - unit
    return unit


def to_image(path: Path, stored: np.ndarray, ds: Dataset, channels: int, window: str) -> np.ndarray:
    """float64 ``(H, W, channels)`` in [0, 1] from one stored frame."""
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if photometric in ("MONOCHROME1", "MONOCHROME2") and stored.ndim == 2:
        values = grey_to_unit(stored, ds, window)
        if not np.isfinite(values).all():
            raise FileProblem(path, "the image holds NaN or infinite values")
        return np.repeat(values[..., None], channels, axis=2)
    if stored.ndim == 3 and stored.shape[2] == 3 and photometric.startswith(("RGB", "YBR")):
        values = stored.astype(np.float64) / (2 ** int(ds.BitsStored) - 1)
        return values @ LUMINANCE[:, None] if channels == 1 else values
    raise FileProblem(
        path,
        f"photometric interpretation '{photometric}' with {stored.shape[2:] or (1,)} samples "
        "per pixel is not supported; expected MONOCHROME1, MONOCHROME2, RGB or YBR",
    )


def read_instance(path: Path, size: int, channels: int, window: str, frame: str) -> np.ndarray:
    """One instance as float32 ``(channels, size, size)`` in [0, 1] (see the module notes)."""
    stored, ds = read_frame(path, frame)
    image = to_image(path, stored, ds, channels, window)
    tensor = torch.from_numpy(image.transpose(2, 0, 1).copy()).float()[None]
    return _resize(tensor, size, "bilinear")[0].clamp(0, 1).numpy()


def decode_instance(
    item: tuple[Path, ...], size: int, channels: int, window: str, frame: str
) -> tuple[np.ndarray]:
    """A classification row for the cache: ``(image,)`` of the instance ``item[0]``."""
    return (read_instance(item[0], size, channels, window, frame),)


# ------------------------------------------------------------------------------ masks


@lru_cache(maxsize=4)
def _segmentation(path: str, identity: tuple[int, int]) -> Any:
    """A SEG read once per process (one SEG usually holds the masks of many images)."""
    import highdicom

    with quiet():
        return highdicom.seg.segread(path)


def read_segmentation(path: Path) -> Any:
    """The SEG at ``path`` (highdicom), cached while the file is unchanged."""
    status = path.stat()
    try:
        return _segmentation(str(path), (status.st_size, status.st_mtime_ns))
    except Exception as err:
        raise FileProblem(path, "not a readable DICOM SEG file", first_line(err)) from None


def segmentation_sources(path: Path) -> list[str]:
    """SOPInstanceUIDs of the images a SEG holds masks for."""
    return [str(uid) for _, _, uid in read_segmentation(path).get_source_image_uids()]


def seg_mask(seg_path: Path, sop: str, num_classes: int) -> np.ndarray:
    """The label map (segment numbers, 0 = background) of one source image in a SEG."""
    seg = read_segmentation(seg_path)
    numbers = [int(n) for n in seg.segment_numbers]
    if numbers and max(numbers) >= num_classes:
        raise FileProblem(
            seg_path,
            f"the segmentation has segment number {max(numbers)}; the run expects labels "
            f"0..{num_classes - 1} (run config num-classes = {num_classes}; segment k is label k)",
        )
    try:
        with quiet():
            mask = seg.get_pixels_by_source_instance(
                [sop],
                combine_segments=True,
                ignore_spatial_locations=True,
                assert_missing_frames_are_empty=True,
            )[0]
    except Exception as err:
        raise FileProblem(
            seg_path, "no label map for one of its source images", first_line(err)
        ) from None
    return np.asarray(mask)


def read_instance_and_mask(
    item: tuple[Path, ...], size: int, channels: int, window: str, frame: str, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """A segmentation row: the image (as :func:`read_instance`) and its label map, from a
    DICOM SEG (``item[1]`` a ``.dcm`` SEG) or a PNG/NIfTI mask file."""
    image_path, mask_path = item
    stored, ds = read_frame(image_path, frame)
    image = to_image(image_path, stored, ds, channels, window)
    if _is_dicom(mask_path):
        with quiet():
            sop = str(dcmread(image_path, stop_before_pixels=True, specific_tags=[0x00080018])
                      .SOPInstanceUID)  # fmt: skip
        values = seg_mask(mask_path, sop, num_classes).astype(np.float64)
    else:
        try:
            values = read_array(mask_path)[0].astype(np.float64)
        except DataError as err:
            raise FileProblem(mask_path, "not a readable mask file", str(err)) from None
    if values.ndim != 2 or values.shape != stored.shape[:2]:
        raise FileProblem(
            mask_path,
            f"mask of shape {values.shape} for an image of {stored.shape[0]}x{stored.shape[1]} "
            "pixels; every mask must have its image's size",
        )
    try:
        check_mask(values, mask_path, num_classes)
    except DataError as err:
        raise FileProblem(mask_path, str(err).removeprefix(f"{mask_path}: ")) from None
    tensor = torch.from_numpy(image.transpose(2, 0, 1).copy()).float()[None]
    picture = _resize(tensor, size, "bilinear")[0].clamp(0, 1).numpy()
    labels = torch.from_numpy(values.astype(np.float32))[None, None]
    return picture, _resize(labels, size, "nearest").round().long()[0, 0].numpy()


def _is_dicom(path: Path) -> bool:
    with path.open("rb") as handle:
        handle.seek(128)
        return handle.read(4) == b"DICM"
