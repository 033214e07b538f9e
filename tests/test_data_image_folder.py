"""Image-folder source: both layouts, conversion and resizing, and every refused file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from fedclinic.config import HospitalConfig, RunConfig
from fedclinic.data import image_folder, load_hospital_data
from fedclinic.data.base import DataRequest
from fedclinic.errors import ConfigError, DataError


def make(path: Path, run: dict[str, Any] | None = None, **hospital: Any) -> DataRequest:
    run_config = RunConfig(**(run or {}))
    hospital.setdefault("data_source", "image-folder")
    return DataRequest(run_config, HospitalConfig(hospital="h", data_path=str(path), **hospital))


def write_image(path: Path, value: int, size: int = 20, mode: str = "L") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "RGB":
        array = np.zeros((size, size, 3), dtype=np.uint8)
        array[..., 0] = value
        Image.fromarray(array).save(path)
    else:
        Image.fromarray(np.full((size, size), value, dtype=np.uint8)).save(path)
    return path


def write_folder(root: Path, counts: dict[str, int], suffix: str = ".png") -> Path:
    for label, (name, count) in enumerate(sorted(counts.items())):
        for i in range(count):
            write_image(root / name / f"img{i:03d}{suffix}", value=40 + 100 * label)
    return root


def test_class_folders_split_here_stratified(tmp_path: Path) -> None:
    counts = {"normal": 20, "pneumonia": 40}
    root = write_folder(tmp_path / "site", counts)
    (root / ".DS_Store").write_bytes(b"\x00\x01")  # hidden: ignored
    (root / "normal" / ".thumbs").write_text("x")
    data = load_hospital_data(make(root, data_seed=3))
    assert (len(data.train), len(data.val), len(data.test)) == (42, 9, 9)
    assert data.train.class_counts(2) == [14, 28]
    assert data.test.class_counts(2) == [3, 6]
    assert data.train.inputs.shape[1:] == (1, 28, 28)  # resized from 20x20
    normal = data.train.inputs[data.train.labels == 0]
    assert torch.allclose(normal, torch.full_like(normal, 40 / 255))
    assert data.extra["classes"] == ["normal", "pneumonia"]
    again = image_folder.load(make(root, data_seed=3))
    other = image_folder.load(make(root, data_seed=4))
    assert torch.equal(again.test.inputs, data.test.inputs)
    assert torch.equal(again.test.labels, data.test.labels)
    assert again.extra["files"] == data.extra["files"]
    assert other.extra["files"]["test"] != data.extra["files"]["test"]
    every = [f for split in ("train", "val", "test") for f in data.extra["files"][split]]
    assert sorted(every) == sorted(
        f"{c}/img{i:03d}.png" for c, n in counts.items() for i in range(n)
    )


def test_val_fraction_override(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "site", {"a": 20, "b": 20}, suffix=".JPG")
    data = image_folder.load(make(root, val_fraction=0.0))
    assert (len(data.train), len(data.val), len(data.test)) == (34, 0, 6)


def test_given_split_is_used_as_is(tmp_path: Path) -> None:
    root = tmp_path / "site"
    write_folder(root / "train", {"benign": 5, "malignant": 3})
    write_folder(root / "val", {"benign": 2, "malignant": 1})
    write_folder(root / "test", {"benign": 1, "malignant": 2})
    data = image_folder.load(make(root))
    assert [s.class_counts(2) for s in (data.train, data.val, data.test)] == [
        [5, 3],
        [2, 1],
        [1, 2],
    ]
    assert data.extra["layout"] == "given split"


def test_given_split_without_val_carves_it_from_train(tmp_path: Path) -> None:
    root = tmp_path / "site"
    write_folder(root / "train", {"benign": 10, "malignant": 10})
    write_folder(root / "test", {"benign": 2, "malignant": 2})
    data = image_folder.load(make(root, val_fraction=0.2))
    assert (len(data.train), len(data.val), len(data.test)) == (16, 4, 4)


def test_rgb_grey_conversion_and_16_bit(tmp_path: Path) -> None:
    root = tmp_path / "site"
    write_image(root / "a" / "red.png", 200, mode="RGB")
    write_image(root / "b" / "grey.jpeg", 100)
    deep = np.full((10, 10), 65535 // 2, dtype=np.uint16)
    Image.fromarray(deep).save(root / "b" / "deep.png")
    rgb = image_folder.load(make(root, {"in_channels": 3, "image_size": 16}, val_fraction=0.0))
    images = torch.cat([rgb.train.inputs, rgb.test.inputs])
    labels = torch.cat([rgb.train.labels, rgb.test.labels])
    assert images.shape == (3, 3, 16, 16)
    red = images[labels == 0][0]
    assert red[0].mean() == pytest.approx(200 / 255, abs=1e-3) and red[1:].max() == 0
    assert float(images.max()) <= 1.0
    greys = images[labels == 1]
    assert sorted(round(float(g.mean()), 2) for g in greys) == [0.39, 0.5]  # 100/255, 16-bit half
    grey = image_folder.read_image(root / "a" / "red.png", 8, 1)
    assert grey.shape == (1, 8, 8) and 0 < grey.mean() < 200 / 255  # luminance of red


def _error(request: DataRequest) -> str:
    with pytest.raises(DataError) as caught:
        image_folder.load(request)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_missing_and_empty_folders(tmp_path: Path) -> None:
    assert "nowhere: image folder not found" in _error(make(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    assert "empty: the folder is empty" in _error(make(tmp_path / "empty"))
    root = write_folder(tmp_path / "site", {"a": 3})
    (root / "b").mkdir()
    assert "class folder 'b' has no images" in _error(make(root))


def test_class_count_must_match_run(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "site", {"a": 3, "b": 3, "c": 3})
    message = _error(make(root))
    assert "found 3 class folder(s) (a, b, c); the run expects 2" in message


def test_unreadable_and_non_image_files_are_named(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "site", {"a": 3, "b": 3})
    (root / "a" / "broken.png").write_bytes(b"not really a png")
    assert "broken.png: not a readable image" in _error(make(root))
    (root / "a" / "broken.png").unlink()
    (root / "b" / "report.pdf").write_bytes(b"%PDF")
    assert "report.pdf: not an image file" in _error(make(root))
    (root / "b" / "report.pdf").unlink()
    (root / "labels.csv").write_text("a,b")
    assert "expected only class folders, found file(s) labels.csv" in _error(make(root))
    (root / "labels.csv").unlink()
    (root / "a" / "nested").mkdir()
    assert "unexpected folder inside class folder 'a'" in _error(make(root))


def test_split_layout_problems(tmp_path: Path) -> None:
    root = tmp_path / "site"
    write_folder(root / "train", {"a": 2, "b": 2})
    assert "no 'test/' folder" in _error(make(root))
    write_folder(root / "test", {"a": 1, "c": 1})
    assert "differ from train/ (a, b)" in _error(make(root))
    write_folder(root / "extra", {"a": 1})
    assert "and also extra" in _error(make(root))


def test_bad_config(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "site", {"a": 2, "b": 2})
    with pytest.raises(ConfigError, match="'in-channels' = 2"):
        image_folder.load(make(root, {"in_channels": 2}))
    with pytest.raises(ConfigError, match="'model' = 'logreg'"):
        image_folder.load(make(root, {"model": "logreg"}))
    no_path = DataRequest(RunConfig(), HospitalConfig(hospital="h", data_source="image-folder"))
    with pytest.raises(ConfigError, match="key 'data-path' is empty"):
        image_folder.load(no_path)
