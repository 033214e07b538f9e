"""MedMNIST source: the real PneumoniaMNIST file, simulated hospitals, and every bad input."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedclinic.config import HospitalConfig, RunConfig
from fedclinic.data import load_hospital_data, medmnist
from fedclinic.data.base import DataRequest
from fedclinic.datasets import SHARED
from fedclinic.errors import ConfigError, DataError

PNEUMONIA = SHARED / "pneumoniamnist.npz"
needs_pneumonia = pytest.mark.skipif(
    not PNEUMONIA.is_file(), reason=f"reference data {PNEUMONIA} is not on this machine"
)


def make(path: Path, run: dict[str, Any] | None = None, **hospital: Any) -> DataRequest:
    run_config = RunConfig(**(run or {}))
    hospital.setdefault("data_source", "medmnist")
    return DataRequest(run_config, HospitalConfig(hospital="h", data_path=str(path), **hospital))


def write_npz(path: Path, sizes: tuple[int, int, int] = (40, 10, 20), **override: Any) -> Path:
    """A small valid MedMNIST-like file; ``override`` replaces or (with None) removes keys."""
    rng = np.random.default_rng(0)
    arrays: dict[str, Any] = {}
    for split, n in zip(("train", "val", "test"), sizes, strict=True):
        arrays[f"{split}_images"] = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).astype(np.uint8).reshape(n, 1)
    arrays.update(override)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


@needs_pneumonia
def test_official_splits_as_they_are() -> None:
    data = load_hospital_data(make(PNEUMONIA))
    assert (len(data.train), len(data.val), len(data.test)) == (4690, 524, 621)
    assert data.train.class_counts(2) == [1213, 3477]
    assert data.val.class_counts(2) == [135, 389]
    assert data.test.class_counts(2) == [234, 387]
    assert data.train.inputs.shape[1:] == (1, 28, 28)
    assert data.train.inputs.dtype == torch.float32
    assert 0.0 <= float(data.train.inputs.min()) < float(data.train.inputs.max()) <= 1.0
    with np.load(PNEUMONIA) as raw:
        expected = torch.from_numpy(raw["test_images"][:5].astype(np.float32) / 255)
    assert torch.equal(data.test.inputs[:5, 0], expected)


@needs_pneumonia
@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_partitions_are_disjoint_and_cover_train_and_test(alpha: float) -> None:
    parts = [
        medmnist.load(
            make(
                PNEUMONIA,
                num_partitions=3,
                partition_id=k,
                partition_fractions="0.5,0.3,0.2",
                label_skew_alpha=alpha,
                data_seed=4,
            )
        )
        for k in range(3)
    ]
    development = np.concatenate(
        [np.concatenate([p.extra["indices"]["train"], p.extra["indices"]["val"]]) for p in parts]
    )
    test = np.concatenate([p.extra["indices"]["test"] for p in parts])
    assert sorted(development.tolist()) == list(range(4690))
    assert sorted(test.tolist()) == list(range(621))
    for part in parts:
        assert len(part.val) == pytest.approx(0.1 * (len(part.train) + len(part.val)), abs=2)
        assert part.extra["official_val_used"] is False
    if alpha == 0.0:  # sizes follow the fractions, classes keep the pooled shares
        assert [len(p.train) + len(p.val) for p in parts] == [2345, 1407, 938]
        for part in parts:
            train_share = part.train.class_counts(2)[1] / len(part.train)
            assert train_share == pytest.approx(3477 / 4690, abs=0.01)
    else:  # with skew, each hospital holds the same share of each class in train and test
        for part in parts:
            development = np.add(part.train.class_counts(2), part.val.class_counts(2))
            share_train = development / np.array([1213, 3477])
            share_test = np.array(part.test.class_counts(2)) / np.array([234, 387])
            np.testing.assert_allclose(share_test, share_train, atol=0.01)
        assert abs(share_train[0] - share_train[1]) > 0.05  # and the shares differ by class


@needs_pneumonia
def test_partition_inputs_match_the_file_rows() -> None:
    data = medmnist.load(make(PNEUMONIA, num_partitions=2, partition_id=1, val_fraction=0.2))
    with np.load(PNEUMONIA) as raw:
        rows = data.extra["indices"]["val"][:7]
        expected = torch.from_numpy(raw["train_images"][rows].astype(np.float32) / 255)
        labels = torch.from_numpy(raw["train_labels"][rows, 0].astype(np.int64))
    assert torch.equal(data.val.inputs[:7, 0], expected)
    assert torch.equal(data.val.labels[:7], labels)


def test_rgb_images_become_channels_first(tmp_path: Path) -> None:
    rgb = np.zeros((6, 28, 28, 3), dtype=np.uint8)
    rgb[..., 2] = 255
    path = write_npz(tmp_path / "rgb.npz", sizes=(6, 6, 6), train_images=rgb, val_images=rgb,
                     test_images=rgb)  # fmt: skip
    data = medmnist.load(make(path, {"in_channels": 3}))
    assert data.train.inputs.shape == (6, 3, 28, 28)
    assert data.train.inputs[:, 2].min() == 1.0 and data.train.inputs[:, :2].max() == 0.0


def _error(request: DataRequest) -> str:
    with pytest.raises(DataError) as caught:
        medmnist.load(request)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_missing_file(tmp_path: Path) -> None:
    message = _error(make(tmp_path / "nothere.npz"))
    assert "nothere.npz" in message and "not found" in message


def test_not_an_npz_file(tmp_path: Path) -> None:
    text = tmp_path / "notes.npz"
    text.write_text("hello, this is not numpy")
    assert "notes.npz: not a .npz file" in _error(make(text))
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(write_npz(tmp_path / "whole.npz").read_bytes()[:500])
    assert "truncated.npz: not a readable .npz file" in _error(make(truncated))
    single = tmp_path / "single.npy"
    np.save(single, np.zeros(3))
    assert "single.npy: expected a .npz archive" in _error(make(single))


def test_corrupt_npz_member(tmp_path: Path) -> None:
    path = write_npz(tmp_path / "good.npz")
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("train_images.npy")
    start = info.header_offset + 30 + len(info.filename) + 200
    data[start : start + 2000] = b"\x00" * 2000  # break the member, keep the directory
    broken = tmp_path / "broken.npz"
    broken.write_bytes(bytes(data))
    message = _error(make(broken))
    assert "broken.npz" in message


def test_missing_key_is_named(tmp_path: Path) -> None:
    path = write_npz(tmp_path / "nokey.npz", val_labels=None)
    message = _error(make(path))
    assert "missing key(s) val_labels" in message and "nokey.npz" in message


def test_wrong_image_size_is_not_resized(tmp_path: Path) -> None:
    path = write_npz(tmp_path / "big.npz")
    message = _error(make(path, {"image_size": 64}))
    assert "big.npz" in message and "28x28 images with 1 channel(s)" in message
    assert "64x64 with 1" in message


def test_wrong_channels(tmp_path: Path) -> None:
    path = write_npz(tmp_path / "grey.npz")
    assert "the run expects 28x28 with 3" in _error(make(path, {"in_channels": 3}))


def test_label_out_of_range(tmp_path: Path) -> None:
    labels = np.array([[0], [1], [2], [1]], dtype=np.uint8)
    images = np.zeros((4, 28, 28), dtype=np.uint8)
    path = write_npz(tmp_path / "three.npz", test_images=images, test_labels=labels)
    message = _error(make(path))
    assert "'test_labels' contains label 2" in message and "num-classes = 2" in message


def test_multilabel_and_mismatched_counts(tmp_path: Path) -> None:
    multi = write_npz(tmp_path / "multi.npz", train_labels=np.zeros((40, 14), dtype=np.uint8))
    assert "multi-label" in _error(make(multi))
    short = write_npz(tmp_path / "short.npz", train_labels=np.zeros((39, 1), dtype=np.uint8))
    assert "39 labels but 'train_images' has 40 images" in _error(make(short))
    floats = write_npz(tmp_path / "float.npz", val_images=np.zeros((10, 28, 28), np.float32))
    assert "'val_images' has dtype float32; expected uint8" in _error(make(floats))


def test_bad_config(tmp_path: Path) -> None:
    no_path = DataRequest(RunConfig(), HospitalConfig(hospital="h", data_source="medmnist"))
    with pytest.raises(ConfigError, match="key 'data-path' is empty"):
        medmnist.load(no_path)
    path = write_npz(tmp_path / "ok.npz")
    with pytest.raises(ConfigError, match="'model' = 'logreg'"):
        medmnist.load(make(path, {"model": "logreg"}))


def test_empty_partition_is_an_error(tmp_path: Path) -> None:
    labels = np.zeros((40, 1), dtype=np.uint8)  # one class only
    path = write_npz(tmp_path / "one.npz", train_labels=labels)
    request = make(
        path, num_partitions=4, partition_id=3, partition_fractions="0.97,0.01,0.01,0.01"
    )
    message = _error(request)
    assert "one.npz: partition 3 of 4 received no training images" in message
