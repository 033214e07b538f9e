"""The ``dicom`` source: pixels against hand computations, series rules, the label sheet,
splits by patient, DICOM SEG and mask files, the cache, and every refused input (one line
naming the file; what the coordinator would see carries no path and no header value)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
import torch
from dicom_files import (
    CT_STORAGE,
    MULTIFRAME_STORAGE,
    Study,
    chest_export,
    identifying_values,
    write_instance,
    write_sheet,
)
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.sr.codedict import codes
from pydicom.uid import JPEGLosslessSV1, RLELossless, generate_uid

from fedclinic.cli import main
from fedclinic.config import HospitalConfig, RunConfig, parse_hospital_config
from fedclinic.data import DataRequest, dicom, dicom_pixels, load_hospital_data, preflight
from fedclinic.data.cache import CACHE_DIR
from fedclinic.errors import ConfigError, DataError
from fedclinic.local.configs import write_flat_toml
from fedclinic.redact import shareable

MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


def request(root: Path, run: dict[str, Any] | None = None, **keys: Any) -> DataRequest:
    keys.setdefault("state_dir", str(root.parent / "state"))
    hospital = HospitalConfig(hospital="h", data_source="dicom", data_path=str(root), **keys)
    return DataRequest(RunConfig(**(run or {})), hospital)


def refused(req: DataRequest, *fragments: str) -> DataError:
    """Loading fails with one line naming the file; the shared line names no site path and
    no header value of any file in the export."""
    with pytest.raises(DataError) as caught:
        load_hospital_data(req)
    err = caught.value
    message = str(err)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    sent = shareable(err, req.hospital)
    root = Path(req.hospital.data_path)
    assert str(root) not in sent and str(root.parent) not in sent, sent
    for value in identifying_values([], root):
        assert value not in sent, (value, sent)
    return err


def one_image(root: Path, stored: np.ndarray, **options: Any) -> tuple[Path, Study]:
    study = Study(1, "ACC1")
    path = root / "a" / "IM1.dcm"
    write_instance(path, study, stored, **options)
    write_sheet(root / "labels.csv", [{"StudyInstanceUID": study.uid, "label": "0"}])
    return path, study


def quadrants(values: tuple[int, int, int, int], size: int = 28) -> np.ndarray:
    half = size // 2
    pixels = np.zeros((size, size), dtype=np.uint16)
    pixels[:half, :half], pixels[:half, half:] = values[0], values[1]
    pixels[half:, :half], pixels[half:, half:] = values[2], values[3]
    return pixels


def corners(image: torch.Tensor) -> list[float]:
    return [round(float(image[0, r, c]), 6) for r, c in ((0, 0), (0, -1), (-1, 0), (-1, -1))]


def loaded_image(root: Path, **keys: Any) -> torch.Tensor:
    """The one image of a one-image export (hashing puts its patient in some split)."""
    data = load_hospital_data(request(root, {"image_size": 28}, **keys))
    split = next(s for s in (data.train, data.val, data.test) if len(s))
    return split.inputs[0]


# ------------------------------------------------------------------------------ pixels

# stored 100/200/250/300, rescale 2x - 100 -> 100/300/400/500
STORED = (100, 200, 250, 300)


@pytest.mark.parametrize(
    ("options", "keys", "expected"),
    [
        # the file's window: center 400.5, width 201 -> (x - 400) / 200 + 0.5, clipped
        ({"window": (400.5, 201.0)}, {}, [0.0, 0.0, 0.5, 1.0]),
        ({"window": (400.5, 201.0), "photometric": "MONOCHROME1"}, {}, [1.0, 1.0, 0.5, 0.0]),
        # the config's window wins over the file's: center 300.5, width 401 -> (x-300)/400+.5
        ({"window": (400.5, 201.0)}, {"dicom_window": "300.5,401"}, [0.0, 0.5, 0.75, 1.0]),
        # min-max: (x - 100) / 400
        ({"window": (400.5, 201.0)}, {"dicom_window": "minmax"}, [0.0, 0.5, 0.75, 1.0]),
        ({}, {}, [0.0, 0.5, 0.75, 1.0]),  # no window in the file: min-max
        ({"photometric": "MONOCHROME1"}, {}, [1.0, 0.5, 0.25, 0.0]),
    ],
)
def test_rescale_window_and_inversion_by_hand(
    tmp_path: Path, options: dict[str, Any], keys: dict[str, Any], expected: list[float]
) -> None:
    root = tmp_path / "export"
    one_image(root, quadrants(STORED), rescale=(2.0, -100.0), **options)
    assert corners(loaded_image(root, **keys)) == expected


def test_signed_ct_with_a_negative_intercept(tmp_path: Path) -> None:
    """Signed 16-bit CT: stored -24/1000, rescale x - 1024 -> HU -1048/-24; lung window."""
    root = tmp_path / "export"
    pixels = quadrants((0, 0, 0, 0)).astype(np.int16)
    pixels[:14, :14], pixels[:14, 14:], pixels[14:, :14], pixels[14:, 14:] = -24, 424, 624, 1000
    one_image(root, pixels, signed=True, rescale=(1.0, -1024.0), modality="CT",
              sop_class=CT_STORAGE)  # fmt: skip
    # window -600/1500 (LINEAR): (x - -600.5) / 1499 + 0.5
    image = loaded_image(root, dicom_window="-600,1500")
    hu = np.array([-1048, -600, -400, -24], dtype=np.float64)
    expected = np.clip((hu + 600.5) / 1499 + 0.5, 0, 1)
    assert np.allclose(corners(image), expected, atol=1e-6)


def test_multi_frame_takes_the_middle_or_first_frame(tmp_path: Path) -> None:
    root = tmp_path / "export"
    frames = np.stack([np.full((28, 28), 100 * k, dtype=np.uint16) for k in (1, 2, 3)])
    frames[:, 0, 0] = 0  # keeps every frame non-constant
    one_image(root, frames, sop_class=MULTIFRAME_STORAGE, modality="OT")
    # window 200.5/401: (x - 200) / 400 + 0.5 -> frame 1: 0.25, 2: 0.5, 3: 0.75
    middle = loaded_image(root, dicom_window="200.5,401")
    first = loaded_image(root, dicom_window="200.5,401", dicom_frame="first")
    assert float(middle[0, 5, 5]) == pytest.approx(0.5)
    assert float(first[0, 5, 5]) == pytest.approx(0.25)


def test_rle_compressed_reads_as_the_uncompressed_file(tmp_path: Path) -> None:
    pixels = np.random.default_rng(1).integers(0, 4000, (28, 28)).astype(np.uint16)
    plain, packed = tmp_path / "plain", tmp_path / "packed"
    one_image(plain, pixels, window=(2000.0, 4000.0))
    path, _ = one_image(packed, pixels, window=(2000.0, 4000.0), syntax=RLELossless)
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == RLELossless
    assert torch.equal(loaded_image(plain), loaded_image(packed))


def test_pydicom_ct_small_matches_an_independent_reading(tmp_path: Path) -> None:
    """pydicom's own CT_small.dcm (a real CT header): HU by the file's rescale, min-max."""
    source = Path(get_testdata_file("CT_small.dcm"))
    root = tmp_path / "export"
    (root / "ct").mkdir(parents=True)
    shutil.copy(source, root / "ct" / "CT_small.dcm")
    ds = pydicom.dcmread(source)
    write_sheet(root / "labels.csv", [{"StudyInstanceUID": ds.StudyInstanceUID, "label": "1"}])
    data = load_hospital_data(request(root, {"image_size": 128}))
    image = next(s for s in (data.train, data.val, data.test) if len(s)).inputs[0, 0].numpy()
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    expected = (hu - hu.min()) / (hu.max() - hu.min())
    assert np.abs(image - expected).max() < 1e-6


def test_colour_to_grey_or_rgb(tmp_path: Path) -> None:
    pixels = np.zeros((28, 28, 3), dtype=np.uint8)
    pixels[..., 0], pixels[..., 1], pixels[..., 2] = 255, 51, 0
    root = tmp_path / "export"
    one_image(root, pixels, sop_class="1.2.840.10008.5.1.4.1.1.7", modality="XC")
    data = load_hospital_data(request(root, {"image_size": 28, "in_channels": 3}))
    image = next(s for s in (data.train, data.val, data.test) if len(s)).inputs[0]
    assert [float(image[c, 3, 3]) for c in range(3)] == pytest.approx([1.0, 0.2, 0.0])
    grey = loaded_image(root)
    assert float(grey[0, 3, 3]) == pytest.approx(0.299 + 0.587 * 0.2)


def test_resized_to_image_size(tmp_path: Path) -> None:
    root = tmp_path / "export"
    pixels = np.zeros((40, 40), dtype=np.uint16)
    pixels[:, 20:] = 1000  # left half dark, right half bright
    one_image(root, pixels)
    data = load_hospital_data(request(root, {"image_size": 16}))
    image = next(s for s in (data.train, data.val, data.test) if len(s)).inputs[0, 0]
    assert image.shape == (16, 16)
    assert float(image[:, :7].max()) == 0.0
    assert float(image[:, 9:].min()) == pytest.approx(1.0)


# ------------------------------------------------------------------------------ labels


def export(tmp_path: Path, patients: int = 24, **kwargs: Any) -> tuple[Path, list[Study], list]:
    root = tmp_path / "export"
    studies, rows = chest_export(root, patients, **kwargs)
    write_sheet(root / "labels.csv", rows)
    return root, studies, rows


def test_labels_by_study_and_every_image_read_once(tmp_path: Path) -> None:
    root, _studies, _ = export(tmp_path)
    data = load_hospital_data(request(root, {"image_size": 16}))
    assert data.extra["classes"] == ["normal", "pneumonia"]
    files = data.extra["files"]
    every = sorted(f for s in ("train", "val", "test") for f in files[s])
    assert every == sorted(f"P{n:03d}/ST{n:03d}/IM0001.dcm" for n in range(24))
    # labels follow the sheet: odd patients have pneumonia (a bright square); every third
    # file is MONOCHROME1 (stored inverted), shown the right way round after inversion
    for name in ("train", "val", "test"):
        split = getattr(data, name)
        for path, label, image in zip(files[name], split.labels, split.inputs, strict=True):
            n = int(path[1:4])
            assert int(label) == n % 2
            assert bool(image[0, 5, 5] > 0.5) == bool(n % 2), path
            assert float(image[0, 0, 0]) < 0.5
    assert "24 images (left out: 24 not images) of 48 files" in data.description


def test_integer_labels_accession_key_semicolons_and_bom(tmp_path: Path) -> None:
    root, studies, _ = export(tmp_path, 10)
    rows = [{"AccessionNumber": s.accession, "label": f"0{s.patient % 2}"} for s in studies]
    (root / "labels.csv").unlink()  # in the tree, only the configured sheet is skipped
    sheet = write_sheet(tmp_path / "sheets" / "labels.csv", rows, delimiter=";")
    sheet.write_bytes(b"\xef\xbb\xbf" + sheet.read_bytes())
    data = load_hospital_data(
        request(root, dicom_label_key="AccessionNumber", dicom_label_sheet=str(sheet))
    )
    labels = torch.cat([data.train.labels, data.val.labels, data.test.labels])
    assert sorted(labels.tolist()) == [0] * 5 + [1] * 5


def test_sop_key_and_a_given_split(tmp_path: Path) -> None:
    root, studies, _ = export(tmp_path, 12)
    files = {s.patient: root / f"P{s.patient:03d}/ST{s.patient:03d}/IM0001.dcm" for s in studies}
    sops = {n: pydicom.dcmread(f).SOPInstanceUID for n, f in files.items()}
    split_of = {n: ("test" if n < 3 else "val" if n < 5 else "train") for n in range(12)}
    rows = [{"SOPInstanceUID": sops[n], "label": str(n % 2), "split": split_of[n].upper()}
            for n in range(12)]  # fmt: skip
    write_sheet(root / "labels.csv", rows)
    data = load_hospital_data(request(root, dicom_label_key="SOPInstanceUID"))
    assert (len(data.train), len(data.val), len(data.test)) == (7, 2, 3)
    assert sorted(f[:4] for f in data.extra["files"]["test"]) == ["P000", "P001", "P002"]
    assert data.extra["layout"].startswith("split given by the label sheet")


def test_split_by_patient_hash_keeps_patients_whole_and_stable(tmp_path: Path) -> None:
    root = tmp_path / "export"
    _studies, rows = chest_export(root, 60, report=False)
    for n in range(0, 60, 3):  # a second study for every third patient
        second = Study(n, accession=f"ACC{n:06d}-2")
        write_instance(root / f"P{n:03d}" / "ST2" / "IM0001.dcm", second,
                       np.full((16, 16), 300, np.uint16))  # fmt: skip
        rows.append({"StudyInstanceUID": second.uid, "label": "normal", "PatientName": "x"})
    write_sheet(root / "labels.csv", rows)
    data = load_hospital_data(request(root, {"image_size": 16}))
    where = {name: {f[:4] for f in data.extra["files"][name]} for name in ("train", "val", "test")}
    assert not (where["train"] & where["test"] or where["train"] & where["val"])
    assert not where["val"] & where["test"]
    # adding patients moves nobody already there
    _more, more_rows = chest_export(root, 20, first=60, report=False)
    write_sheet(root / "labels.csv", rows + more_rows)
    grown = load_hospital_data(request(root, {"image_size": 16}))
    for name in ("train", "val", "test"):
        assert where[name] <= {f[:4] for f in grown.extra["files"][name]}
    # a different data-seed is a different assignment
    other = load_hospital_data(request(root, {"image_size": 16}, data_seed=7))
    assert other.extra["files"]["test"] != grown.extra["files"]["test"]


def test_hashed_split_shares_follow_the_fractions() -> None:
    patients = [f"MRN{n}" for n in range(4000)]
    counts = {"train": 0, "val": 0, "test": 0}
    for name in patients:
        counts[dicom.hashed_split(name, 0, 0.2)] += 1
    assert abs(counts["test"] / 4000 - 0.15) < 0.02
    assert abs(counts["val"] / 4000 - 0.20) < 0.02


# ------------------------------------------------------------------------------ series rules


def two_series_export(tmp_path: Path) -> tuple[Path, Study]:
    root = tmp_path / "export"
    study = Study(1, "ACC1")
    for k in range(3):
        write_instance(root / f"ax{k}.dcm", study, np.full((16, 16), 100 + k, np.uint16),
                       series="AX T2", modality="MR", sop_class=MR_STORAGE)  # fmt: skip
    write_instance(root / "loc.dcm", study, np.full((16, 16), 7, np.uint16),
                   series="LOCALIZER", modality="MR", sop_class=MR_STORAGE)  # fmt: skip
    write_sheet(root / "labels.csv", [{"StudyInstanceUID": study.uid, "label": "1"}])
    return root, study


@pytest.mark.parametrize("keys", [{"dicom_series": "largest"}, {"dicom_series_description": "^ax"}])
def test_series_rules_pick_the_axial_series(tmp_path: Path, keys: dict[str, Any]) -> None:
    root, _ = two_series_export(tmp_path)
    data = load_hospital_data(request(root, {"image_size": 16}, **keys))
    files = [f for s in ("train", "val", "test") for f in data.extra["files"][s]]
    assert sorted(files) == ["ax0.dcm", "ax1.dcm", "ax2.dcm"]
    assert "left out: " in data.description and "1 by dicom-" in data.description


def test_mixed_modalities_need_a_rule(tmp_path: Path) -> None:
    root, _ = two_series_export(tmp_path)
    study = Study(2, "ACC2")
    write_instance(root / "cr.dcm", study, np.full((16, 16), 1, np.uint16), modality="CR")
    rows = [{"StudyInstanceUID": study.uid, "label": "0"}]
    write_sheet(root / "labels.csv", [*rows, {"StudyInstanceUID": Study(1, "x").uid, "label": "1"}])
    refused(request(root), "modality", "set dicom-modality", str(root))
    write_sheet(root / "labels.csv", rows)
    data = load_hospital_data(request(root, {"image_size": 16}, dicom_modality="CR"))
    assert [f for s in ("train", "val", "test") for f in data.extra["files"][s]] == ["cr.dcm"]


def test_mixed_sizes_need_a_rule(tmp_path: Path) -> None:
    root, _studies, rows = export(tmp_path, 6)
    odd = Study(9, "ACC9")
    write_instance(root / "odd.dcm", odd, np.full((20, 24), 5, np.uint16))
    write_sheet(root / "labels.csv", [*rows, {"StudyInstanceUID": odd.uid, "label": "normal",
                                              "PatientName": "-"}])  # fmt: skip
    refused(request(root), str(root / "odd.dcm"), "20x24 pixels", "dicom-mixed-sizes")
    data = load_hospital_data(request(root, dicom_mixed_sizes=True))
    assert sum(len(s) for s in (data.train, data.val, data.test)) == 7


# ------------------------------------------------------------------------------ bad input


def test_label_sheet_problems_name_the_row(tmp_path: Path) -> None:
    root, _studies, rows = export(tmp_path, 6)
    sheet = root / "labels.csv"
    cases = [
        (rows[:-1], "IM0001.dcm: no row in the label sheet for its StudyInstanceUID"),
        ([*rows, rows[0]], "row 8: the same StudyInstanceUID as row 2"),
        ([*rows, {**rows[0], "StudyInstanceUID": "1.2.3.4.5"}], "row 8: no DICOM file"),
        ([{**rows[0], "label": ""}, *rows[1:]], "row 2: the 'label' cell is empty"),
        ([{**r, "split": "training"} for r in rows], "split 'training' is not train"),
        ([{"study": r["StudyInstanceUID"], "label": r["label"]} for r in rows], "no 'Study"),
    ]
    for sheet_rows, fragment in cases:
        write_sheet(sheet, sheet_rows)
        err = refused(request(root), fragment)
        assert "label sheet" in shareable(err, None) or "DICOM file #" in shareable(err, None)
    write_sheet(sheet, [{**rows[0], "label": "x"}, *rows[1:]])
    refused(request(root), "the label sheet has 3 classes (normal, pneumonia, x)")
    sheet.unlink()
    refused(request(root), "label sheet not found")


def test_a_row_whose_images_were_all_left_out(tmp_path: Path) -> None:
    root, study = two_series_export(tmp_path)
    other = Study(3, "ACC3")
    write_instance(root / "other" / "loc.dcm", other, np.full((16, 16), 1, np.uint16),
                   series="LOCALIZER", modality="MR", sop_class=MR_STORAGE)  # fmt: skip
    write_sheet(root / "labels.csv", [{"StudyInstanceUID": study.uid, "label": "1"},
                                      {"StudyInstanceUID": other.uid, "label": "0"}])  # fmt: skip
    refused(request(root, dicom_series_description="^AX"), "row 3: every instance", "left out")


def test_a_patient_in_two_splits(tmp_path: Path) -> None:
    root, _studies, rows = export(tmp_path, 6)
    second = Study(2, "ACC2-2")  # patient 2 again
    write_instance(root / "P002" / "ST9" / "IM0001.dcm", second, np.full((16, 16), 3, np.uint16))
    rows = [{**r, "split": "train"} for r in rows]
    rows[2]["split"] = "test"
    rows.append({"StudyInstanceUID": second.uid, "label": "normal", "PatientName": "-",
                 "split": "train"})  # fmt: skip
    write_sheet(root / "labels.csv", rows)
    err = refused(request(root), "one patient must stay in one split", "P002")
    assert "belong to one patient" in shareable(err, None)


def test_unreadable_and_foreign_files(tmp_path: Path) -> None:
    root, _studies, _rows = export(tmp_path, 6)
    (root / "README.txt").write_text("exported by PACS viewer 7")
    refused(request(root), f"{root / 'README.txt'}: not a DICOM file")
    with pytest.raises(DataError, match="not a DICOM file"):
        preflight(request(root).hospital)  # caught before anything starts
    data = load_hospital_data(request(root, dicom_exclude="*.txt"))
    assert sum(len(s) for s in (data.train, data.val, data.test)) == 6
    (root / "README.txt").unlink()
    broken = root / "P001" / "ST001" / "IM0001.dcm"
    blob = broken.read_bytes()
    broken.write_bytes(blob[: len(blob) - 100])  # truncated pixel data
    err = refused(request(root), f"{broken}: pixel data not readable")
    assert shareable(err, None).startswith("DICOM file #")
    broken.write_bytes(blob[:132] + b"\xff" * 40)
    refused(request(root), f"{broken}: not a readable DICOM file (no file meta")


def test_compressed_without_a_decoder_names_the_package(tmp_path: Path) -> None:
    root = tmp_path / "export"
    path, _ = one_image(root, quadrants(STORED), syntax=JPEGLosslessSV1)
    err = refused(request(root), str(path), "JPEG Lossless", "pylibjpeg-libjpeg", "gdcm")
    assert "pylibjpeg-libjpeg" in shareable(err, None)
    # pydicom's own 12-bit JPEG Extended file: Pillow is here but decodes 8-bit only
    shutil.copy(get_testdata_file("JPGExtended.dcm"), path)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    write_sheet(root / "labels.csv", [{"StudyInstanceUID": ds.StudyInstanceUID, "label": "0"}])
    refused(request(root, {"image_size": 28}, dicom_mixed_sizes=True), "JPEG Extended",
            "pylibjpeg")  # fmt: skip


def test_duplicate_instances_and_missing_patient_id(tmp_path: Path) -> None:
    root, _studies, _rows = export(tmp_path, 6)
    copy = root / "P001" / "ST001" / "IM0001-copy.dcm"
    shutil.copy(root / "P001" / "ST001" / "IM0001.dcm", copy)
    err = refused(request(root), str(copy), "the same SOPInstanceUID as")
    assert "has the same SOPInstanceUID as DICOM file #" in shareable(err, None)
    copy.unlink()
    path = root / "P002" / "ST002" / "IM0001.dcm"
    ds = pydicom.dcmread(path)
    del ds.PatientID
    ds.save_as(path)
    refused(request(root), f"{path}: no PatientID in the header (the split is by patient)")


def test_config_keys_are_refused_clearly() -> None:
    base = {"hospital": "h", "data-source": "dicom"}
    for keys, fragment in [
        ({"dicom-window": "wide"}, "'dicom-window' = 'wide' is not allowed"),
        ({"dicom-window": "40,0.5"}, "width >= 1"),
        ({"dicom-series-description": "[AX"}, "not a regular expression"),
        ({"dicom-modality": "ct"}, "modality codes in capitals"),
        ({"dicom-label-key": "PatientID"}, "'dicom-label-key' = 'PatientID'"),
        ({"dicom-series": "biggest"}, "'dicom-series' = 'biggest'"),
        ({"dicom-frame": "last"}, "'dicom-frame' = 'last'"),
        ({"dicom-mixed-sizes": "yes"}, "'dicom-mixed-sizes' = 'yes'"),
        ({"data-source": "image-folder", "dicom-frame": "first"}, "data-source = 'dicom' only"),
    ]:
        with pytest.raises(ConfigError, match="hospital config") as caught:
            parse_hospital_config({**base, **keys})
        assert fragment in str(caught.value), caught.value


# ------------------------------------------------------------------------------ the cache


def test_decoded_once_then_from_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root, _studies, _ = export(tmp_path, 8)
    calls: list[Path] = []
    real = dicom_pixels.read_frame

    def counting(path: Path, frame: str) -> Any:
        calls.append(path)
        return real(path, frame)

    monkeypatch.setattr(dicom_pixels, "read_frame", counting)
    req = request(root, {"image_size": 16})
    first = load_hospital_data(req)
    assert len(calls) == 8 and (tmp_path / "state" / CACHE_DIR).is_dir()
    calls.clear()
    again = load_hospital_data(req)
    assert calls == [] and torch.equal(again.train.inputs, first.train.inputs)
    changed = root / "P003" / "ST003" / "IM0001.dcm"
    os.utime(changed, ns=(1, 1))  # a changed file is decoded again, alone
    load_hospital_data(req)
    assert calls == [changed]
    calls.clear()
    load_hospital_data(request(root, {"image_size": 16}, dicom_window="minmax"))
    assert len(calls) == 8  # another window: other rows
    # data-cache = "off": every file decoded at every load, the same arrays, nothing written
    calls.clear()
    off = request(root, {"image_size": 16}, state_dir=str(tmp_path / "off"), data_cache="off")
    uncached = load_hospital_data(off)
    load_hospital_data(off)
    assert len(calls) == 16 and not (tmp_path / "off").exists()
    assert torch.equal(uncached.train.inputs, load_hospital_data(req).train.inputs)


# ------------------------------------------------------------------------------ segmentation


def ct_series(root: Path, patient: int, slices: int = 3) -> list[pydicom.Dataset]:
    study = Study(patient, f"ACC{patient}")
    frame_of_reference = generate_uid()
    return [
        write_instance(
            root / f"P{patient}" / f"CT{k}.dcm",
            study,
            np.full((32, 32), 100 + 10 * k + patient, np.uint16),
            modality="CT",
            sop_class=CT_STORAGE,
            series="AX",
            extra={
                "ImagePositionPatient": [0, 0, k],
                "ImageOrientationPatient": [1, 0, 0, 0, 1, 0],
                "PixelSpacing": [1, 1],
                "SliceThickness": 1,
                "FrameOfReferenceUID": frame_of_reference,
            },
        )
        for k in range(slices)
    ]


def write_seg(path: Path, sources: list[pydicom.Dataset], masks: np.ndarray) -> None:
    """A binary DICOM SEG (highdicom) of ``masks`` ``(slices, H, W)`` holding labels 0..S."""
    segments = int(masks.max())
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=k,
            segment_label=f"lesion {k}",
            segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        )
        for k in range(1, segments + 1)
    ]
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=masks.astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=90,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="fedclinic tests",
        manufacturer_model_name="test", software_versions="1", device_serial_number="1",
    )  # fmt: skip
    seg.save_as(path)


def test_masks_from_dicom_seg(tmp_path: Path) -> None:
    root = tmp_path / "export"
    truth: dict[str, np.ndarray] = {}
    for patient in range(8):
        sources = ct_series(root, patient)
        masks = np.zeros((3, 32, 32), dtype=np.int64)
        masks[0, 2:6, 2:6] = 1
        masks[1, 8:12, 4:8] = 2
        write_seg(root / f"P{patient}" / "seg.dcm", sources, masks)
        for ds, mask in zip(sources, masks, strict=True):
            truth[f"P{patient}/CT{int(ds.ImagePositionPatient[2])}.dcm"] = mask
    data = load_hospital_data(request(root, {"task": "segmentation", "model": "unet",
                                             "image_size": 32, "num_classes": 3}))  # fmt: skip
    seen = 0
    for name in ("train", "val", "test"):
        split = getattr(data, name)
        for file, mask in zip(data.extra["files"][name], split.labels, strict=True):
            assert np.array_equal(mask.numpy(), truth[file]), file
            seen += 1
    assert seen == 24 and "masks from DICOM SEG" in data.description
    # more segments than the run's classes
    refused(request(root, {"task": "segmentation", "model": "unet", "image_size": 32}),
            "segment number 2")  # fmt: skip
    # a missing segmentation is a missing label
    (root / "P3" / "seg.dcm").unlink()
    refused(request(root, {"task": "segmentation", "model": "unet", "image_size": 32,
                          "num_classes": 3}),
            "no mask for this image in any DICOM SEG")  # fmt: skip


def test_masks_from_files_named_by_sop_instance_uid(tmp_path: Path) -> None:
    root, masks = tmp_path / "export", tmp_path / "masks"
    masks.mkdir()
    expected = {}
    for patient in range(6):
        for ds in ct_series(root, patient, 2):
            mask = np.zeros((32, 32), dtype=np.uint8)
            mask[patient : patient + 4, 3:9] = 1
            Image.fromarray(mask).save(masks / f"{ds.SOPInstanceUID}.png")
            expected[ds.SOPInstanceUID] = mask
    req = request(root, {"task": "segmentation", "model": "unet", "image_size": 32},
                  dicom_masks=str(masks))  # fmt: skip
    data = load_hospital_data(req)
    for name in ("train", "val", "test"):
        for file, mask in zip(data.extra["files"][name], getattr(data, name).labels, strict=True):
            sop = pydicom.dcmread(root / file, stop_before_pixels=True).SOPInstanceUID
            assert np.array_equal(mask.numpy(), expected[sop])
    stray = masks / f"{generate_uid()}.png"
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(stray)
    refused(req, str(stray), "no selected image has this SOPInstanceUID")
    stray.unlink()
    wrong = next(iter(masks.glob("*.png")))
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(wrong)
    refused(req, str(wrong), "every mask must have its image's size")
    wrong.unlink()
    refused(req, "no mask for this image in dicom-masks")


# ------------------------------------------------------------------------------ pre-flight


def test_preflight_before_anything_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``fedclinic local`` refuses a DICOM hospital without its label sheet, one line, and
    starts nothing; with the sheet the same pre-flight passes."""
    root, _, _ = export(tmp_path, 4)
    (root / "labels.csv").rename(tmp_path / "elsewhere.csv")
    files = []
    for name, keys in (("good", {"data-source": "synthetic"}),
                       ("dicom", {"data-source": "dicom", "data-path": str(root)})):  # fmt: skip
        flat = {"hospital": name, "state-dir": str(tmp_path / "state" / name), **keys}
        files += ["--hospital", str(write_flat_toml(tmp_path / f"{name}.toml", flat))]
    out = tmp_path / "out"
    code = main(["local", "--output-dir", str(out), *files])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert f"{root / 'labels.csv'}: label sheet not found" in lines[0]
    assert not (out / "federation").exists()
    hospital = parse_hospital_config(
        {
            "hospital": "h",
            "data-source": "dicom",
            "data-path": str(root),
            "dicom-label-sheet": str(tmp_path / "elsewhere.csv"),
        }
    )
    preflight(hospital, RunConfig())
    with pytest.raises(ConfigError, match="'model' = 'logreg' is not allowed"):
        preflight(hospital, RunConfig(model="logreg"))
