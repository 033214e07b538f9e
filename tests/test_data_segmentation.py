"""Segmentation data: the synthetic source (deterministic, shifted per hospital, masks from the
classification generator's lesions) and the image/mask folder source with every bad input."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from fedclinic.config import parse_hospital_config
from fedclinic.data import DataRequest, load_hospital_data
from fedclinic.data.synthetic import acquisition_for, generate_images, generate_lesions
from fedclinic.data.synthetic_segmentation import lesion_kinds, masks_from_extent
from fedclinic.errors import ConfigError, DataError
from strategies import load_run_config


def request(data: dict[str, Any], **run: Any) -> DataRequest:
    flat = {"task": "segmentation", "model": "unet", "image-size": 32, **run}
    hospital = {"hospital": "h", "data-source": "synthetic", **data}
    return DataRequest(load_run_config(flat), parse_hospital_config(hospital))


# ------------------------------------------------------------------------------ synthetic


def test_synthetic_is_deterministic_and_its_masks_are_label_maps() -> None:
    data = {"num-samples": 40, "acquisition-shift": 0.4, "data-seed": 3}
    a, b = load_hospital_data(request(data)), load_hospital_data(request(data))
    for name in ("train", "val", "test"):
        assert torch.equal(getattr(a, name).inputs, getattr(b, name).inputs)
        assert torch.equal(getattr(a, name).labels, getattr(b, name).labels)
    assert a.train.labels.dtype == torch.int64 and a.train.labels.shape[1:] == (32, 32)
    assert set(a.train.labels.unique().tolist()) == {0, 1}
    assert len(a.train) + len(a.val) + len(a.test) == 40
    # every image shows a lesion, which covers a minority of the pixels
    assert (a.train.labels.reshape(len(a.train), -1).amax(dim=1) == 1).all()
    assert 0.02 < a.extra["foreground_fraction"] < 0.5


def test_masks_mark_the_lesions_and_name_their_type() -> None:
    hospital = {"num-samples": 24, "acquisition-shift": 0.5, "data-seed": 1}
    data = load_hospital_data(request(hospital, **{"num-classes": 4}))
    # multi-class labels are the lesion type + 1: one type per image, three types in all
    types = data.train.labels.reshape(len(data.train), -1).amax(dim=1) - 1
    assert set(types.tolist()) == set(range(lesion_kinds(4)))
    for image, labels, kind in zip(data.train.inputs, data.train.labels, types, strict=True):
        assert set(labels.unique().tolist()) == {0, int(kind) + 1}
        # the masked pixels are the lesion: brighter than the tissue around it
        assert image[0][labels > 0].mean() > image[0][labels == 0].mean() + 0.05


def test_the_images_come_from_the_classification_generator() -> None:
    """Reuse, not a copy: generate_lesions is the generator behind generate_images."""
    types = torch.tensor([0, 1, 2, 3, 0])
    acquisition = acquisition_for("h", 0, 0.3)
    images, extent = generate_lesions(types, 32, 1, acquisition, seed=5)
    assert torch.equal(images, generate_images(types, 32, 1, acquisition, seed=5))
    masks = masks_from_extent(extent, types, 2)
    assert masks.dtype == torch.int64 and set(masks.unique().tolist()) == {0, 1}
    assert torch.equal(masks_from_extent(extent, types, 5), masks * (types + 1)[:, None, None])


def test_acquisition_shift_changes_images_never_masks() -> None:
    plain = load_hospital_data(request({"num-samples": 20, "acquisition-shift": 0.0}))
    shifted = load_hospital_data(request({"num-samples": 20, "acquisition-shift": 0.8}))
    assert torch.equal(plain.train.labels, shifted.train.labels)
    assert not torch.allclose(plain.train.inputs, shifted.train.inputs)


def test_synthetic_refuses_bad_settings_in_one_line() -> None:
    with pytest.raises(ConfigError, match=r"'class-priors' = '0.5,0.5' .* expected 4 numbers"):
        load_hospital_data(request({"num-samples": 20, "class-priors": "0.5,0.5"}))
    with pytest.raises(ConfigError, match=r"'num-classes' = 8 .* expected 2\.\.7"):
        load_hospital_data(request({"num-samples": 20}, **{"num-classes": 8}))
    priors = load_hospital_data(request({"num-samples": 40, "class-priors": "0.7,0.1,0.1,0.1"}))
    assert priors.extra["lesion_counts"] == [28, 4, 4, 4]


def test_classification_sources_refuse_segmentation() -> None:
    with pytest.raises(ConfigError) as caught:
        load_hospital_data(request({"data-source": "image-folder", "data-path": "/nowhere"}))
    message = str(caught.value)
    assert "'data-source' = 'image-folder' is not allowed with task = 'segmentation'" in message
    assert "segmentation-folder" in message and "synthetic" in message


# ------------------------------------------------------------------------------ folder


def write_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def write_nifti(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4)), str(path))
    return path


def case(root: Path, name: str, size: int = 40, label: int = 1, offset: int = 0) -> None:
    """A grey PNG image with a bright square and its mask (the square labelled ``label``)."""
    image = np.full((size, size), 40, dtype=np.uint8)
    mask = np.zeros((size, size), dtype=np.uint8)
    image[8 + offset : 20 + offset, 10:24] = 220
    mask[8 + offset : 20 + offset, 10:24] = label
    write_png(root / "images" / f"{name}.png", image)
    write_png(root / "masks" / f"{name}.png", mask)


def folder_request(root: Path, **run: Any) -> DataRequest:
    return request({"data-source": "segmentation-folder", "data-path": str(root)}, **run)


def test_png_pairs_are_read_resized_and_split(tmp_path: Path) -> None:
    for index in range(10):
        case(tmp_path, f"case-{index:02d}", offset=index % 3)
    data = load_hospital_data(folder_request(tmp_path))
    assert len(data.train) + len(data.val) + len(data.test) == 10
    assert data.train.inputs.shape[1:] == (1, 32, 32) and data.train.labels.shape[1:] == (32, 32)
    # the bright square is where the mask says, after resizing 40 -> 32 (nearest for masks)
    first = data.train
    inside = first.inputs[:, 0][first.labels == 1]
    outside = first.inputs[:, 0][first.labels == 0]
    assert inside.mean() > 0.7 > 0.3 > outside.mean()
    assert set(first.labels.unique().tolist()) == {0, 1}
    cases = data.extra["cases"]
    assert sorted(cases["train"] + cases["val"] + cases["test"]) == [
        f"case-{i:02d}" for i in range(10)
    ]


def test_nifti_pairs_and_the_split_layout(tmp_path: Path) -> None:
    for split, count in (("train", 6), ("test", 2)):
        for index in range(count):
            image = np.zeros((32, 32), dtype=np.float32) - 1000.0  # CT-like values
            image[4:12, 4:12] = 300.0
            mask = np.zeros((32, 32, 1), dtype=np.int16)
            mask[4:12, 4:12, 0] = 2
            write_nifti(tmp_path / split / "images" / f"c{index}.nii.gz", image)
            write_nifti(tmp_path / split / "masks" / f"c{index}.nii", mask)
    data = load_hospital_data(folder_request(tmp_path, **{"num-classes": 3}))
    assert len(data.test) == 2 and len(data.train) + len(data.val) == 6 and len(data.val) >= 1
    assert data.extra["layout"].startswith("given train/test split, val carved")
    image, labels = data.train.inputs[0, 0], data.train.labels[0]
    assert float(image.min()) == 0.0 and float(image.max()) == 1.0  # min-max per image
    assert int(labels.sum()) == 2 * 64 and torch.equal(image == 1.0, labels == 2)


def test_rgb_images_become_the_runs_channels(tmp_path: Path) -> None:
    for index in range(4):
        colour = np.zeros((32, 32, 3), dtype=np.uint8)
        colour[..., 0] = 255  # pure red: luminance 0.299
        write_png(tmp_path / "images" / f"{index}.png", colour)
        write_png(tmp_path / "masks" / f"{index}.png", np.zeros((32, 32), dtype=np.uint8))
    grey = load_hospital_data(folder_request(tmp_path))
    assert torch.allclose(grey.train.inputs, torch.full_like(grey.train.inputs, 0.299), atol=1e-5)
    colour = load_hospital_data(folder_request(tmp_path, **{"in-channels": 3}))
    assert colour.train.inputs.shape[1] == 3 and float(colour.train.inputs[:, 0].min()) == 1.0


def bad_folder(tmp_path: Path, problem: str) -> tuple[Path, str]:
    """A folder with one kind of problem and the fragment its error must contain."""
    root = tmp_path / problem
    for index in range(3):
        case(root, f"ok-{index}")
    if problem == "missing-mask":
        write_png(root / "images" / "lonely.png", np.zeros((40, 40), dtype=np.uint8))
        return root, f"{root / 'images' / 'lonely.png'}: no mask for case 'lonely'"
    if problem == "mask-without-image":
        write_png(root / "masks" / "orphan.png", np.zeros((40, 40), dtype=np.uint8))
        return root, f"{root / 'masks' / 'orphan.png'}: mask of case 'orphan' has no image"
    if problem == "size-mismatch":
        write_png(root / "images" / "odd.png", np.zeros((40, 40), dtype=np.uint8))
        write_png(root / "masks" / "odd.png", np.zeros((40, 30), dtype=np.uint8))
        return root, f"{root / 'masks' / 'odd.png'}: mask is 40x30 pixels but its image"
    if problem == "label-255":
        mask = np.zeros((40, 40), dtype=np.uint8)
        mask[:5] = 255
        write_png(root / "images" / "white.png", np.zeros((40, 40), dtype=np.uint8))
        write_png(root / "masks" / "white.png", mask)
        return root, "white.png: mask contains label 255 (labels found: 0, 255); expected 0..1"
    if problem == "rgb-mask":
        write_png(root / "images" / "rgb.png", np.zeros((40, 40), dtype=np.uint8))
        write_png(root / "masks" / "rgb.png", np.zeros((40, 40, 3), dtype=np.uint8))
        return root, "rgb.png: mask has 3 channels; expected a single-channel label map"
    if problem == "volume":
        write_nifti(root / "images" / "vol.nii.gz", np.zeros((40, 40, 5), dtype=np.float32))
        write_nifti(root / "masks" / "vol.nii.gz", np.zeros((40, 40, 5), dtype=np.uint8))
        return root, "vol.nii.gz: NIfTI of shape (40, 40, 5); expected one 2-D slice"
    if problem == "fractional-mask":
        write_nifti(root / "images" / "f.nii", np.zeros((40, 40), dtype=np.float32))
        write_nifti(root / "masks" / "f.nii", np.full((40, 40), 0.5, dtype=np.float32))
        return root, "f.nii: mask holds non-integer values"
    if problem == "corrupt":
        (root / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
        write_png(root / "masks" / "broken.png", np.zeros((40, 40), dtype=np.uint8))
        return root, f"{root / 'images' / 'broken.png'}: not a readable PNG file"
    if problem == "two-files":
        write_nifti(root / "images" / "ok-1.nii", np.zeros((40, 40), dtype=np.float32))
        return root, "case 'ok-1' has two files in 'images/'"
    if problem == "stray-file":
        (root / "images" / "notes.txt").write_text("x")
        return root, "notes.txt: not an image file; 'images/' may hold only"
    if problem == "no-masks-folder":
        for mask in (root / "masks").iterdir():
            mask.unlink()
        (root / "masks").rmdir()
        return root, "expected exactly the folders images/ and masks/"
    raise AssertionError(problem)


@pytest.mark.parametrize(
    "problem",
    [
        "missing-mask",
        "mask-without-image",
        "size-mismatch",
        "label-255",
        "rgb-mask",
        "volume",
        "fractional-mask",
        "corrupt",
        "two-files",
        "stray-file",
        "no-masks-folder",
    ],
)
def test_every_bad_pair_is_named_in_one_line(tmp_path: Path, problem: str) -> None:
    root, fragment = bad_folder(tmp_path, problem)
    with pytest.raises(DataError) as caught:
        load_hospital_data(folder_request(root))
    message = str(caught.value)
    assert fragment in message and "\n" not in message


def test_a_0_255_mask_gets_a_hint_and_a_missing_folder_is_named(tmp_path: Path) -> None:
    root, _ = bad_folder(tmp_path, "label-255")
    with pytest.raises(DataError, match="a 0/255 binary mask must be stored as 0/1"):
        load_hospital_data(folder_request(root))
    with pytest.raises(DataError, match="segmentation folder not found"):
        load_hospital_data(folder_request(tmp_path / "absent"))
    with pytest.raises(ConfigError, match="'data-path' is empty"):
        load_hospital_data(request({"data-source": "segmentation-folder"}))
