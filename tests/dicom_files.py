"""DICOM files for the tests, written with pydicom: real Part 10 files with the headers a PACS
export has, identifying tags included (so tests can search what left the site for them).

Every value a test may search for is in :data:`IDENTIFYING` form: ``patient(n)`` gives a
patient's identifying tags, unique strings that appear nowhere else.
"""

from __future__ import annotations

import csv
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEGLosslessSV1,
    RLELossless,
    generate_uid,
)

CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"  # Computed Radiography Image Storage
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MULTIFRAME_STORAGE = "1.2.840.10008.5.1.4.1.1.7.3"  # Multi-frame Grayscale Word SC
SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR: no pixels


def patient(n: int) -> dict[str, str]:
    """Identifying header values of patient ``n``: each unique, easy to search for."""
    return {
        "PatientName": f"Doe{n:03d}^Jane^Q",
        "PatientID": f"MRN{n:05d}X",
        "PatientBirthDate": f"1950{n % 12 + 1:02d}{n % 28 + 1:02d}",
        "OtherPatientIDs": f"OPID{n:05d}",
        "InstitutionName": "Saint Elsewhere Teaching Hospital",
        "ReferringPhysicianName": "Westphall^Donald",
        "StationName": "XRAYROOM7",
        "PatientSex": "F",
    }


@dataclass
class Study:
    """One study of one patient: its UIDs and accession number."""

    patient: int
    accession: str
    uid: str = field(default_factory=generate_uid)
    series: dict[str, str] = field(default_factory=dict)  # name -> SeriesInstanceUID

    def series_uid(self, name: str) -> str:
        return self.series.setdefault(name, generate_uid())


def write_instance(
    path: Path,
    study: Study,
    pixels: np.ndarray,
    *,
    series: str = "PA",
    modality: str = "CR",
    photometric: str = "MONOCHROME2",
    rescale: tuple[float, float] | None = None,
    window: tuple[float, float] | None = None,
    sop: str | None = None,
    syntax: str = ExplicitVRLittleEndian,
    sop_class: str = CR_STORAGE,
    signed: bool = False,
    extra: dict[str, Any] | None = None,
) -> Dataset:
    """A Part 10 file of ``pixels`` (``(H, W)``, ``(F, H, W)`` multi-frame, ``(H, W, 3)`` RGB)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop or generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    for keyword, value in patient(study.patient).items():
        setattr(ds, keyword, value)
    ds.StudyInstanceUID = study.uid
    ds.SeriesInstanceUID = study.series_uid(series)
    ds.AccessionNumber = study.accession
    ds.StudyDate, ds.StudyTime = "20240131", "101500"
    ds.StudyID = f"S{study.patient}"
    ds.SeriesDescription = series
    ds.SeriesNumber = len(study.series)
    ds.InstanceNumber = 1
    ds.Modality = modality
    ds.Manufacturer = "Acme Imaging"
    rgb = pixels.ndim == 3 and pixels.shape[-1] == 3
    ds.SamplesPerPixel = 3 if rgb else 1
    ds.PhotometricInterpretation = "RGB" if rgb else photometric
    if rgb:
        ds.PlanarConfiguration = 0
    if pixels.ndim == 3 and not rgb:
        ds.NumberOfFrames = pixels.shape[0]
    ds.Rows, ds.Columns = pixels.shape[-3:-1] if rgb else pixels.shape[-2:]
    bits = 8 if pixels.dtype.itemsize == 1 else 16
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, bits, bits - 1
    ds.PixelRepresentation = 1 if signed else 0
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    for keyword, value in (extra or {}).items():
        setattr(ds, keyword, value)
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    if syntax == RLELossless:
        ds.compress(RLELossless, encoding_plugin="pydicom")
    elif syntax == JPEGLosslessSV1:  # no decoder here: the bytes are never decoded
        ds.PixelData = encapsulate([b"\xff\xd8\xff\xc3" + bytes(64) + b"\xff\xd9"])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return ds


def write_report(path: Path, study: Study) -> Dataset:
    """A structured report in the study: no pixels, not an image."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SR_STORAGE
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = SR_STORAGE, generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for keyword, value in patient(study.patient).items():
        setattr(ds, keyword, value)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study.uid, study.series_uid("report")
    ds.AccessionNumber, ds.Modality = study.accession, "SR"
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return ds


def write_sheet(path: Path, rows: list[dict[str, str]], delimiter: str = ",") -> Path:
    """A label sheet (CSV) with the columns of the first row, plus an identifying column that
    the source must never read (sheets exported from a RIS often carry names)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(rows[0])
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, columns, delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)
    return path


def chest_export(
    root: Path,
    patients: int,
    *,
    first: int = 0,
    size: int = 16,
    seed: int = 0,
    report: bool = True,
) -> tuple[list[Study], list[dict[str, str]]]:
    """A small chest X-ray export: one CR study per patient with a PA image (MONOCHROME2 or
    MONOCHROME1, rescaled), a structured report, a label per study (pneumonia: bright
    blob), as a PACS export folder ``<root>/<patient>/<study>/<n>.dcm``; and the sheet's
    rows keyed by StudyInstanceUID (with the patient's name in an extra column)."""
    rng = np.random.default_rng(seed)
    studies, rows = [], []
    for n in range(first, first + patients):
        study = Study(n, accession=f"ACC{n:06d}")
        label = n % 2
        pixels = rng.integers(200, 400, size=(size, size)).astype(np.uint16)
        if label:
            pixels[size // 4 : size // 2, size // 4 : size // 2] += 600
        inverted = n % 3 == 0
        if inverted:
            pixels = (1200 - pixels).astype(np.uint16)
        folder = root / f"P{n:03d}" / f"ST{n:03d}"
        write_instance(
            folder / "IM0001.dcm", study, pixels,
            photometric="MONOCHROME1" if inverted else "MONOCHROME2", rescale=(1.0, 0.0),
            window=(600.0, 1200.0),
        )  # fmt: skip
        if report:
            write_report(folder / "SR0001.dcm", study)
        studies.append(study)
        rows.append(
            {
                "StudyInstanceUID": study.uid,
                "label": "pneumonia" if label else "normal",
                "PatientName": patient(n)["PatientName"],
            }
        )
    return studies, rows


def identifying_values(studies: list[Study], root: Path) -> list[str]:
    """Every identifying value written into the export's headers (to search for)."""
    values: set[str] = set()
    for file in root.rglob("*.dcm"):
        with warnings.catch_warnings():  # tests break some files on purpose
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(file, stop_before_pixels=True)
        for keyword in (
            "PatientName", "PatientID", "PatientBirthDate", "OtherPatientIDs", "AccessionNumber",
            "InstitutionName", "ReferringPhysicianName", "StationName", "StudyInstanceUID",
            "SeriesInstanceUID", "SOPInstanceUID",
        ):  # fmt: skip
            if keyword in ds and str(ds.data_element(keyword).value):
                values.add(str(ds.data_element(keyword).value))
    for study in studies:
        values.add(study.accession)
        values.add(study.uid)
    return sorted(values)
