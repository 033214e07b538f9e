"""The site's data cache inside the image-folder and segmentation-folder sources (issue 20).

Through the sources' own ``load`` (what a hospital runs), with the hospital config key
``data-cache``: a cache hit gives bit for bit what a load without the cache gives, and the
pixels are checked against values computed by hand (a uniform image resizes to itself); a
changed file is decoded again (stat: new mtime; hash: same size and mtime, other bytes);
added files decode alone (decoder calls counted); ``off`` writes nothing; a damaged entry is
rebuilt with one log line; the cache lives under the state dir only. The worker's data memo
notices a change that only ``hash`` can see.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from fedclinic.config import HospitalConfig, RunConfig
from fedclinic.data import HospitalData, image_folder, load_hospital_data, segmentation_folder
from fedclinic.data.base import DataRequest
from fedclinic.data.cache import CACHE_DIR
from fedclinic.errors import DataError
from fedclinic.redact import shareable
from fedclinic.worker.server import DataMemo

SIZE = 32  # run image-size; files are 32x32 too, so a uniform image stays exactly uniform


def write_png(path: Path, value: int | np.ndarray) -> Path:
    """A grey PNG stored uncompressed: its size depends on its dimensions only, so a
    rewrite with other pixels keeps the file size (the case ``stat`` alone cannot tell
    apart when the modification time is kept too)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.full((SIZE, SIZE), value, np.uint8) if isinstance(value, int) else value
    Image.fromarray(pixels.astype(np.uint8)).save(path, compress_level=0)
    return path


def image_folder_at(root: Path, per_class: int = 6) -> Path:
    for label, name in enumerate(("a", "b")):
        for i in range(per_class):
            write_png(root / name / f"{i:02d}.png", 10 + 100 * label + 7 * i)
    return root


def seg_folder_at(root: Path, cases: int = 8) -> Path:
    for i in range(cases):
        write_png(root / "images" / f"c{i}.png", 20 + 9 * i)
        mask = np.zeros((SIZE, SIZE), np.uint8)
        mask[: 2 + i, :] = 1 + i % 2  # label i % 2 + 1 over the first 2 + i rows
        write_png(root / "masks" / f"c{i}.png", mask)
    return root


def request(
    root: Path, state: Path, cache: str, source: str = "image-folder", **run: Any
) -> DataRequest:
    task = "segmentation" if source == "segmentation-folder" else "classification"
    model = "unet" if task == "segmentation" else "cnn"
    classes = 3 if task == "segmentation" else 2
    hospital = HospitalConfig(
        hospital="h", data_source=source, data_path=str(root), state_dir=str(state),
        data_cache=cache,
    )  # fmt: skip
    settings = {"image_size": SIZE, **run}
    config = RunConfig(data_source=source, task=task, model=model, num_classes=classes, **settings)
    return DataRequest(config, hospital)


def counting(monkeypatch: pytest.MonkeyPatch, module: Any, name: str) -> list[Path]:
    """Every file ``module.name`` (a reader the source's decoder calls) is called for."""
    calls: list[Path] = []
    original: Callable[..., Any] = getattr(module, name)

    def wrapper(path: Path, *args: Any) -> Any:
        calls.append(path)
        return original(path, *args)

    monkeypatch.setattr(module, name, wrapper)
    return calls


def assert_same(one: HospitalData, other: HospitalData) -> None:
    """Bit equality of every split's inputs and labels, and the same files in each split."""
    for split in ("train", "val", "test"):
        a, b = getattr(one, split), getattr(other, split)
        assert a.inputs.dtype == b.inputs.dtype and a.labels.dtype == b.labels.dtype
        assert torch.equal(a.inputs, b.inputs) and torch.equal(a.labels, b.labels), split
    assert one.extra.get("files", one.extra.get("cases")) == other.extra.get(
        "files", other.extra.get("cases")
    )


def value_of(data: HospitalData, relative: str) -> torch.Tensor:
    """The loaded image of the file at ``relative`` (path inside the image folder)."""
    for split in ("train", "val", "test"):
        files = data.extra["files"][split]
        if relative in files:
            return getattr(data, split).inputs[files.index(relative)]
    raise AssertionError(f"{relative} not loaded")


# ------------------------------------------------------------------------------ image folder


def test_a_cache_hit_is_bit_equal_to_a_load_without_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = image_folder_at(tmp_path / "site")
    calls = counting(monkeypatch, image_folder, "read_image")
    cold = load_hospital_data(request(root, tmp_path / "off", "off"))
    assert len(calls) == 12
    first = load_hospital_data(request(root, tmp_path / "state", "stat"))  # writes the cache
    assert len(calls) == 24
    warm = load_hospital_data(request(root, tmp_path / "state", "stat"))  # reads it
    assert len(calls) == 24  # nothing decoded
    assert_same(cold, first)
    assert_same(cold, warm)
    # by hand: a uniform 32x32 image at image-size 32 is value / 255 everywhere
    for name, label in (("a", 0), ("b", 1)):
        for i in range(6):
            image = value_of(warm, f"{name}/{i:02d}.png")
            expected = np.float32(10 + 100 * label + 7 * i) / np.float32(255)
            assert torch.equal(image, torch.full_like(image, float(expected)))
    # another image size is another entry; the first one stays for its runs
    load_hospital_data(request(root, tmp_path / "state", "stat", image_size=SIZE * 2))
    assert len(calls) == 36
    assert len(list((tmp_path / "state" / CACHE_DIR).iterdir())) == 2
    load_hospital_data(request(root, tmp_path / "state", "stat"))
    assert len(calls) == 36


def test_the_given_split_layout_is_one_entry_reused_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for split in ("train", "val", "test"):
        image_folder_at(tmp_path / "site" / split, per_class=2)
    calls = counting(monkeypatch, image_folder, "read_image")
    cold = load_hospital_data(request(tmp_path / "site", tmp_path / "off", "off"))
    load_hospital_data(request(tmp_path / "site", tmp_path / "state", "stat"))
    warm = load_hospital_data(request(tmp_path / "site", tmp_path / "state", "stat"))
    assert len(calls) == 24  # 12 cold + 12 written, none read back
    assert_same(cold, warm)
    assert len(list((tmp_path / "state" / CACHE_DIR).iterdir())) == 1


def test_a_rewritten_file_is_decoded_again_stat_sees_the_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = image_folder_at(tmp_path / "site")
    load_hospital_data(request(root, tmp_path / "state", "stat"))
    target = root / "a" / "03.png"
    size = target.stat().st_size
    write_png(target, 250)  # other pixels, same size (uncompressed), a later time
    assert target.stat().st_size == size
    future = target.stat().st_mtime_ns + 5 * 10**9
    os.utime(target, ns=(future, future))
    calls = counting(monkeypatch, image_folder, "read_image")
    data = load_hospital_data(request(root, tmp_path / "state", "stat"))
    assert calls == [target]
    image = value_of(data, "a/03.png")
    assert torch.equal(image, torch.full_like(image, float(np.float32(250) / np.float32(255))))
    assert_same(data, load_hospital_data(request(root, tmp_path / "off", "off")))


def test_hash_mode_decodes_a_file_whose_size_and_time_were_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = image_folder_at(tmp_path / "site")
    load_hospital_data(request(root, tmp_path / "hash", "hash"))
    load_hospital_data(request(root, tmp_path / "stat", "stat"))
    target = root / "b" / "01.png"
    before = target.stat()
    write_png(target, 3)  # same size, other bytes; then the old modification time back
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = target.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    calls = counting(monkeypatch, image_folder, "read_image")
    stale = load_hospital_data(request(root, tmp_path / "stat", "stat"))
    assert calls == []  # the documented limit of size + time
    image = value_of(stale, "b/01.png")
    assert float(image[0, 0, 0]) == pytest.approx(117 / 255)  # the old pixels
    data = load_hospital_data(request(root, tmp_path / "hash", "hash"))
    assert calls == [target]
    image = value_of(data, "b/01.png")
    assert torch.equal(image, torch.full_like(image, float(np.float32(3) / np.float32(255))))


def test_added_files_decode_alone_and_removed_ones_decode_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = image_folder_at(tmp_path / "site")
    load_hospital_data(request(root, tmp_path / "state", "stat"))
    added = [write_png(root / "a" / f"new{i}.png", 200 + i) for i in range(3)]
    calls = counting(monkeypatch, image_folder, "read_image")
    data = load_hospital_data(request(root, tmp_path / "state", "stat"))
    assert sorted(calls) == sorted(added)
    assert_same(data, load_hospital_data(request(root, tmp_path / "off", "off")))
    calls.clear()
    (root / "b" / "00.png").unlink()
    data = load_hospital_data(request(root, tmp_path / "state", "stat"))
    assert calls == []
    calls.clear()
    assert_same(data, load_hospital_data(request(root, tmp_path / "off", "off")))
    assert len(calls) == 14  # without the cache every file, every time


def test_cache_off_writes_nothing_anywhere(tmp_path: Path) -> None:
    root = image_folder_at(tmp_path / "site")
    before = sorted(tmp_path.rglob("*"))
    load_hospital_data(request(root, tmp_path / "state", "off"))
    assert sorted(tmp_path.rglob("*")) == before


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "manifest", "array gone"])
def test_a_damaged_entry_is_rebuilt_with_one_log_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    root = image_folder_at(tmp_path / "site")
    reference = load_hospital_data(request(root, tmp_path / "off", "off"))
    load_hospital_data(request(root, tmp_path / "state", "stat"))
    (array,) = (tmp_path / "state" / CACHE_DIR).rglob("rows-*.npy")
    data = bytearray(array.read_bytes())
    if damage == "flipped byte":  # inside the pixel data: the header still reads
        data[-100] ^= 0x40
        array.write_bytes(bytes(data))
    elif damage == "truncated":
        array.write_bytes(bytes(data[: len(data) // 2]))
    elif damage == "manifest":
        (array.parent / "manifest.json").write_text('{"format": 2, "arrays": 7}')
    else:
        array.unlink()
    calls = counting(monkeypatch, image_folder, "read_image")
    with caplog.at_level(logging.WARNING):
        rebuilt = load_hospital_data(request(root, tmp_path / "state", "stat"))
    assert len(calls) == 12
    assert_same(rebuilt, reference)  # never the damaged rows
    lines = [r.getMessage() for r in caplog.records if "data cache" in r.getMessage()]
    assert len(lines) == 1 and "damaged" in lines[0], lines
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # the rebuilt entry is good again
        again = load_hospital_data(request(root, tmp_path / "state", "stat"))
    assert len(calls) == 12 and not caplog.records
    assert_same(again, reference)


def test_a_cache_that_cannot_be_written_costs_speed_not_the_load(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = image_folder_at(tmp_path / "site")
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / CACHE_DIR).write_text("not a folder")  # mkdir under it fails
    with caplog.at_level(logging.WARNING):
        data = load_hospital_data(request(root, tmp_path / "state", "stat"))
    assert_same(data, load_hospital_data(request(root, tmp_path / "off", "off")))
    lines = [r.getMessage() for r in caplog.records if "data cache" in r.getMessage()]
    assert len(lines) == 1 and "could not write" in lines[0], lines


def test_cache_files_stay_in_the_state_dir_and_out_of_what_is_shared(tmp_path: Path) -> None:
    root = image_folder_at(tmp_path / "site")
    outside = sorted(p for p in tmp_path.rglob("*") if "state" not in p.parts)
    data = load_hospital_data(request(root, tmp_path / "state", "stat"))
    load_hospital_data(request(root, tmp_path / "state", "hash"))
    assert sorted(p for p in tmp_path.rglob("*") if "state" not in p.parts) == outside
    written = [p for p in (tmp_path / "state").rglob("*") if p.is_file()]
    assert written and all(p.is_relative_to(tmp_path / "state" / CACHE_DIR) for p in written)
    # what a hospital may report (description, extra) never names the cache
    assert CACHE_DIR not in data.description and CACHE_DIR not in repr(data.extra)


def test_a_bad_file_keeps_its_site_local_reference(tmp_path: Path) -> None:
    root = image_folder_at(tmp_path / "site")
    load_hospital_data(request(root, tmp_path / "state", "stat"))
    (root / "b" / "04.png").write_bytes(b"not a png")
    with pytest.raises(DataError) as caught:
        load_hospital_data(request(root, tmp_path / "state", "stat"))
    assert str(caught.value).startswith(f"{root / 'b' / '04.png'}: not a readable image")
    assert caught.value.shared is not None
    assert caught.value.shared.startswith("image 5 of class 'b': not a readable image")
    # what leaves the site: the reference, the site path scrubbed (fedclinic.redact)
    told = shareable(caught.value, request(root, tmp_path / "state", "stat").hospital)
    assert told.startswith("image 5 of class 'b': not a readable image") and str(root) not in told


# ------------------------------------------------------------------------------ segmentation


def test_segmentation_pairs_cached_bit_equal_and_a_changed_mask_decoded_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = seg_folder_at(tmp_path / "seg")
    seg = "segmentation-folder"
    images = counting(monkeypatch, segmentation_folder, "read_image")
    masks = counting(monkeypatch, segmentation_folder, "read_mask")
    cold = load_hospital_data(request(root, tmp_path / "off", "off", seg))
    first = load_hospital_data(request(root, tmp_path / "state", "stat", seg))
    warm = load_hospital_data(request(root, tmp_path / "state", "stat", seg))
    assert (len(images), len(masks)) == (16, 16)  # cold and first, nothing for warm
    assert_same(cold, first)
    assert_same(cold, warm)
    # by hand: case i's mask is label i % 2 + 1 over its first 2 + i rows, 0 below
    for split in ("train", "val", "test"):
        for case, mask in zip(warm.extra["cases"][split], getattr(warm, split).labels, strict=True):
            i = int(case.removeprefix("c"))
            expected = torch.zeros(SIZE, SIZE, dtype=torch.int64)
            expected[: 2 + i] = 1 + i % 2
            assert torch.equal(mask, expected), case
    target = root / "masks" / "c5.png"
    write_png(target, np.ones((SIZE, SIZE), np.uint8))
    future = target.stat().st_mtime_ns + 5 * 10**9
    os.utime(target, ns=(future, future))
    images.clear()
    masks.clear()
    changed = load_hospital_data(request(root, tmp_path / "state", "stat", seg))
    assert masks == [target] and images == [root / "images" / "c5.png"]  # the pair, alone
    assert_same(changed, load_hospital_data(request(root, tmp_path / "off", "off", seg)))


def test_segmentation_damaged_entry_rebuilt(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = seg_folder_at(tmp_path / "seg")
    seg = "segmentation-folder"
    reference = load_hospital_data(request(root, tmp_path / "off", "off", seg))
    load_hospital_data(request(root, tmp_path / "state", "stat", seg))
    arrays = sorted((tmp_path / "state" / CACHE_DIR).rglob("rows-*.npy"))
    assert len(arrays) == 2  # images and masks
    masks = arrays[1] if arrays[1].stat().st_size < arrays[0].stat().st_size else arrays[0]
    data = bytearray(masks.read_bytes())
    data[-8] = 1 if data[-8] != 1 else 2  # one label changed: plausible, and wrong
    masks.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        rebuilt = load_hospital_data(request(root, tmp_path / "state", "stat", seg))
    assert_same(rebuilt, reference)
    assert sum("damaged" in r.getMessage() for r in caplog.records) == 1


# ------------------------------------------------------------------------------ worker memo


def test_worker_memo_in_hash_mode_notices_a_change_stat_cannot_see(tmp_path: Path) -> None:
    root = image_folder_at(tmp_path / "site")
    memo = DataMemo()
    hashed = request(root, tmp_path / "state", "hash")
    first = memo.load(hashed)
    assert memo.load(hashed) is first and memo.last == "reused"
    target = root / "a" / "00.png"
    before = target.stat()
    write_png(target, 99)
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    changed = memo.load(hashed)
    assert memo.last == "loaded"
    image = value_of(changed, "a/00.png")
    assert torch.equal(image, torch.full_like(image, float(np.float32(99) / np.float32(255))))
    assert memo.load(hashed) is changed and memo.last == "reused"


def test_segmentation_size_mismatch_names_both_files_at_the_site_only(tmp_path: Path) -> None:
    root = seg_folder_at(tmp_path / "seg")
    odd = root / "masks" / "c2.png"
    Image.fromarray(np.zeros((SIZE + 8, SIZE), np.uint8)).save(odd)
    hospital_request = request(root, tmp_path / "state", "stat", "segmentation-folder")
    with pytest.raises(DataError) as caught:
        load_hospital_data(hospital_request)
    assert str(caught.value) == (
        f"{odd}: mask is {SIZE + 8}x{SIZE} pixels but its image {root / 'images' / 'c2.png'} "
        f"is {SIZE}x{SIZE}; every mask must have its image's size"
    )
    assert shareable(caught.value, hospital_request.hospital) == (
        f"mask of pair 3: mask is {SIZE + 8}x{SIZE} pixels but its image is {SIZE}x{SIZE}"
    )
