"""The preprocessed-data cache: rows equal fresh decoding, reuse, and every invalidation.

The reference is always the source's own decoder called file by file (what a load without
the cache does), never the cache's earlier output.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedclinic.config import HospitalConfig
from fedclinic.data import image_folder, segmentation_folder
from fedclinic.data.cache import CACHE_DIR, ArrayCache, Item, decode_rows, site_cache
from fedclinic.errors import DataError

SIZE, CHANNELS = 16, 1
PARAMS = {"size": SIZE, "channels": CHANNELS}


def write_png(path: Path, seed: int, size: int = 24) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def decode_image(item: Item) -> tuple[np.ndarray, ...]:
    return (image_folder.read_image(item[0], SIZE, CHANNELS),)


def fresh(items: list[Item]) -> np.ndarray:
    """Decoded file by file, as a load without the cache does it."""
    return np.stack([image_folder.read_image(f, SIZE, CHANNELS) for (f,) in items])


def images(folder: Path, count: int) -> list[Item]:
    return [(write_png(folder / f"{i:03d}.png", seed=i),) for i in range(count)]


def test_rows_equal_fresh_decoding_and_are_reused(tmp_path: Path) -> None:
    items = images(tmp_path / "data", 12)
    cache = ArrayCache(tmp_path / "cache")
    (first,) = cache.rows("image-folder", PARAMS, items, decode_image)
    assert cache.decoded == 12
    np.testing.assert_array_equal(first, fresh(items))
    assert first.dtype == np.float32 and first.shape == (12, 1, SIZE, SIZE)
    again = ArrayCache(tmp_path / "cache")  # another process, another run: same files
    (second,) = again.rows("image-folder", PARAMS, items, decode_image)
    assert again.decoded == 0
    np.testing.assert_array_equal(second, first)
    second[0] = 0.0  # in memory and writable: the cache on disk is untouched
    (third,) = again.rows("image-folder", PARAMS, items, decode_image)
    np.testing.assert_array_equal(third, first)
    # other decode parameters are another entry (the old one stays for its runs)
    cache.rows("image-folder", {**PARAMS, "channels": 3}, items, decode_image)
    assert cache.decoded == 12
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_a_changed_added_or_removed_file_decodes_only_what_changed(tmp_path: Path) -> None:
    items = images(tmp_path / "data", 10)
    cache = ArrayCache(tmp_path / "cache")
    cache.rows("image-folder", PARAMS, items, decode_image)
    write_png(items[3][0], seed=99)  # rewritten in place
    (rows,) = cache.rows("image-folder", PARAMS, items, decode_image)
    assert cache.decoded == 1
    np.testing.assert_array_equal(rows, fresh(items))
    added = [*items[:5], (write_png(tmp_path / "data" / "new.png", seed=50),), *items[5:]]
    (rows,) = cache.rows("image-folder", PARAMS, added, decode_image)
    assert cache.decoded == 1
    np.testing.assert_array_equal(rows, fresh(added))
    fewer = added[::2]
    (rows,) = cache.rows("image-folder", PARAMS, fewer, decode_image)
    assert cache.decoded == 0
    np.testing.assert_array_equal(rows, fresh(fewer))
    entries = list((tmp_path / "cache").iterdir())
    assert len(entries) == 1 and len(list(entries[0].glob("rows-*.npy"))) == 1  # old ones gone


def test_hash_mode_sees_a_change_that_keeps_size_and_time(tmp_path: Path) -> None:
    items = images(tmp_path / "data", 4)
    target = items[1][0]
    for verify in ("stat", "hash"):
        ArrayCache(tmp_path / verify, verify).rows("image-folder", PARAMS, items, decode_image)
    status = target.stat()
    data = bytearray(target.read_bytes())
    data[-20] ^= 0xFF  # same size, other bytes (inside the PNG's compressed pixel data)
    target.write_bytes(bytes(data))
    os.utime(target, ns=(status.st_atime_ns, status.st_mtime_ns))
    stat_cache = ArrayCache(tmp_path / "stat", "stat")
    stat_cache.rows("image-folder", PARAMS, items, decode_image)
    assert stat_cache.decoded == 0  # the documented limit of size + mtime
    hash_cache = ArrayCache(tmp_path / "hash", "hash")
    with pytest.raises(DataError, match=str(target)):  # decoding it again finds the damage
        hash_cache.rows("image-folder", PARAMS, items, decode_image)


def test_a_bad_file_stops_the_load_and_nothing_is_cached(tmp_path: Path) -> None:
    items = images(tmp_path / "data", 5)
    items[2][0].write_bytes(b"not a png")
    cache = ArrayCache(tmp_path / "cache")
    with pytest.raises(DataError, match=rf"{items[2][0]}: not a readable image"):
        cache.rows("image-folder", PARAMS, items, decode_image)
    assert not list((tmp_path / "cache").rglob("*.npy"))
    write_png(items[2][0], seed=7)
    (rows,) = cache.rows("image-folder", PARAMS, items, decode_image)
    np.testing.assert_array_equal(rows, fresh(items))


def test_a_damaged_cache_is_rebuilt(tmp_path: Path) -> None:
    items = images(tmp_path / "data", 6)
    cache = ArrayCache(tmp_path / "cache")
    cache.rows("image-folder", PARAMS, items, decode_image)
    (stored,) = list((tmp_path / "cache").rglob("rows-*.npy"))
    stored.write_bytes(stored.read_bytes()[:100])  # truncated (disk full, killed writer)
    (rows,) = cache.rows("image-folder", PARAMS, items, decode_image)
    assert cache.decoded == 6
    np.testing.assert_array_equal(rows, fresh(items))
    (manifest,) = list((tmp_path / "cache").rglob("manifest.json"))
    manifest.write_text("{not json")
    (rows,) = cache.rows("image-folder", PARAMS, items, decode_image)
    assert cache.decoded == 6
    np.testing.assert_array_equal(rows, fresh(items))


def test_segmentation_pairs_cache_image_and_mask(tmp_path: Path) -> None:
    pairs = []
    for i in range(5):
        image = write_png(tmp_path / "images" / f"c{i}.png", seed=i)
        mask = tmp_path / "masks" / f"c{i}.png"
        mask.parent.mkdir(exist_ok=True)
        labels = np.random.default_rng(10 + i).integers(0, 3, (24, 24), dtype=np.uint8)
        Image.fromarray(labels).save(mask)
        pairs.append((image, mask))

    def decode_pair(item: Item) -> tuple[np.ndarray, ...]:
        image, _ = segmentation_folder.read_image(item[0], SIZE, CHANNELS)
        mask, _ = segmentation_folder.read_mask(item[1], SIZE, 3)
        return image, mask

    cache = ArrayCache(tmp_path / "cache")
    images_, masks = cache.rows("segmentation-folder", {**PARAMS, "classes": 3}, pairs, decode_pair)
    again = cache.rows("segmentation-folder", {**PARAMS, "classes": 3}, pairs, decode_pair)
    assert cache.decoded == 0
    for got in (images_, masks), again:
        for (image, mask), row_image, row_mask in zip(pairs, *got, strict=True):
            np.testing.assert_array_equal(
                row_image, segmentation_folder.read_image(image, SIZE, CHANNELS)[0]
            )
            np.testing.assert_array_equal(row_mask, segmentation_folder.read_mask(mask, SIZE, 3)[0])
    assert masks.dtype == np.int64 and masks.shape == (5, SIZE, SIZE)


def test_decode_rows_without_a_cache_and_where_the_site_cache_lives(tmp_path: Path) -> None:
    items = images(tmp_path / "data", 3)
    (rows,) = decode_rows(None, "image-folder", PARAMS, items, decode_image)
    np.testing.assert_array_equal(rows, fresh(items))
    hospital = HospitalConfig(hospital="h", state_dir=str(tmp_path / "state"))
    found = site_cache(hospital)
    assert found is not None and found.directory == tmp_path / "state" / CACHE_DIR
    (cached,) = decode_rows(site_cache(hospital), "image-folder", PARAMS, items, decode_image)
    np.testing.assert_array_equal(cached, rows)
    assert list((tmp_path / "state" / CACHE_DIR).rglob("*.npy"))


def test_a_partial_decoder_keys_by_its_bound_arguments(tmp_path: Path) -> None:
    items = images(tmp_path / "data", 3)

    def decode(item: Item, size: int) -> tuple[np.ndarray, ...]:
        return (image_folder.read_image(item[0], size, CHANNELS),)

    ArrayCache(tmp_path / "cache").rows("image-folder", {}, items, partial(decode, size=SIZE))
    again = ArrayCache(tmp_path / "cache")  # a new partial object, same arguments: reused
    (rows,) = again.rows("image-folder", {}, items, partial(decode, size=SIZE))
    assert again.decoded == 0
    np.testing.assert_array_equal(rows, fresh(items))
    (other,) = again.rows("image-folder", {}, items, partial(decode, size=SIZE + 4))
    assert again.decoded == 3 and other.shape[-1] == SIZE + 4
