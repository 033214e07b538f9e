"""``fedclinic bench system``'s data-load part: what a hospital pays to load its data, with
and without the site's preprocessed-data cache (:mod:`fedclinic.data.cache`), and per round
with and without the site worker (:mod:`fedclinic.worker`).

Two folders are generated under the results directory: an image folder (class folders of
grey PNGs) and a segmentation folder (``images/`` + ``masks/`` PNG pairs). The pixels are
PneumoniaMNIST's chest X-rays when the data set is found (``fedclinic datasets path
pneumoniamnist``), else smooth random images; either way each is enlarged to
``SOURCE_SIZE`` pixels with a little noise, so files are the size and the decoding the work
of a small export rather than of 28x28 thumbnails. Each folder is then loaded through the
source's own ``load`` (what a hospital runs):

- **cold**: ``data-cache = "off"``: every file decoded and resized;
- **first**: ``data-cache = "stat"``, empty cache: decoded, then written to the cache;
- **warm**: the same again: read from the cache (best of ``WARM_REPEATS``, as every
  repeated case: the least disturbed by other work on the machine);
- **warm, hash**: ``data-cache = "hash"`` (every file's SHA-256 checked), warm;
- **per round, worker**: a round in a run served by the site worker: its data memo checks
  the files' identity (one ``stat`` per file; with ``hash`` every file's SHA-256) and
  reuses the loaded data;
- **per round, no worker**: a ClientApp process per message loads again every round: the
  warm number.

The files were just written, so they are in the OS page cache in every case: the numbers
are decoding and cache costs, not disk reads (a cold disk adds the same file reads to cold
and first, and far fewer bytes to warm).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from fedclinic.config import HospitalConfig, RunConfig
from fedclinic.data import DataRequest, load_hospital_data
from fedclinic.data.cache import CACHE_DIR
from fedclinic.datasets import dataset_path
from fedclinic.errors import FedClinicError
from fedclinic.worker.server import DataMemo

#: files per folder: image folder, segmentation pairs
COUNTS: dict[str, tuple[int, int]] = {"quick": (300, 150), "full": (3000, 2000)}
SOURCE_SIZE = 256  # pixels of each generated file (square)
IMAGE_SIZE = 64  # the run's image-size: what the files are resized to
WARM_REPEATS = 3
CASES = ("cold", "first", "warm", "warm_hash", "round_worker", "round_worker_hash",
         "round_no_worker")  # fmt: skip


def source_pixels(count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, str]:
    """``count`` grey images (uint8, 28x28) with 0/1 labels, and where they came from."""
    try:
        with np.load(dataset_path("pneumoniamnist")) as archive:
            images, labels = archive["train_images"], archive["train_labels"].reshape(-1)
        picked = np.resize(np.arange(len(images)), count)  # repeats only past 4708 images
        return images[picked], labels[picked].astype(np.int64), "PneumoniaMNIST (train)"
    except (FedClinicError, OSError, KeyError):
        rng = np.random.default_rng(seed)
        coarse = rng.integers(0, 256, (count, 7, 7)).astype(np.uint8)
        images = np.stack([np.asarray(Image.fromarray(c).resize((28, 28))) for c in coarse])
        return images, rng.integers(0, 2, count), "synthetic (PneumoniaMNIST not found)"


def enlarged(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A 28x28 image as a ``SOURCE_SIZE`` one with film-grain-like noise (so PNG
    compression and decoding do the work of a real export)."""
    big = np.asarray(Image.fromarray(pixels).resize((SOURCE_SIZE, SOURCE_SIZE)), np.int16)
    grain = rng.integers(-3, 4, big.shape, dtype=np.int16)
    return np.clip(big + grain, 0, 255).astype(np.uint8)


def write_folders(root: Path, images: int, pairs: int) -> dict[str, Any]:
    """The image folder and the segmentation folder under ``root``; what was written."""
    pixels, labels, origin = source_pixels(max(images, pairs))
    rng = np.random.default_rng(1)
    folder, seg = root / "image-folder", root / "segmentation-folder"
    for name in ("normal", "pneumonia"):
        (folder / name).mkdir(parents=True, exist_ok=True)
    for sub in ("images", "masks"):
        (seg / sub).mkdir(parents=True, exist_ok=True)
    for i in range(images):
        name = ("normal", "pneumonia")[int(labels[i])]
        Image.fromarray(enlarged(pixels[i], rng)).save(folder / name / f"{i:05d}.png")
    for i in range(pairs):
        image = enlarged(pixels[i], rng)
        mask = (image > np.percentile(image, 70)).astype(np.uint8)  # label 1: the bright 30 %
        Image.fromarray(image).save(seg / "images" / f"case{i:05d}.png")
        Image.fromarray(mask).save(seg / "masks" / f"case{i:05d}.png")
    size = sum(p.stat().st_size for p in root.rglob("*.png"))
    return {"origin": origin, "source_pixels": SOURCE_SIZE, "megabytes": round(size / 1e6, 1)}


def _request(
    source: str, path: Path, state: Path, cache: Literal["stat", "hash", "off"]
) -> DataRequest:
    segmentation = source == "segmentation-folder"
    run = RunConfig(
        data_source=source,
        task="segmentation" if segmentation else "classification",
        model="unet" if segmentation else "cnn",
        num_classes=2,
        image_size=IMAGE_SIZE,
    )
    hospital = HospitalConfig(
        hospital="bench", data_source=source, data_path=str(path), state_dir=str(state),
        data_cache=cache,
    )  # fmt: skip
    return DataRequest(run, hospital)


def _timed(action: Callable[[], object], repeats: int = 1) -> tuple[float, float]:
    """Best wall and CPU seconds (this process, every thread) of ``repeats`` calls of
    ``action``. CPU seconds stay meaningful on a machine busy with other work; wall seconds
    are what a site waits."""
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        action()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return min(walls), min(cpus)


def warm_up(source: str, path: Path, state: Path) -> None:
    """Load a copy of four of the folder's files once: imports, MONAI's readers and
    Pillow's plugins are then outside every measurement."""
    small = state.parent / f"{state.name}-warm-up"
    shutil.rmtree(small, ignore_errors=True)
    if source == "image-folder":
        for folder in sorted(p for p in path.iterdir() if p.is_dir()):
            (small / "data" / folder.name).mkdir(parents=True)
            for file in sorted(folder.iterdir())[:2]:
                shutil.copy2(file, small / "data" / folder.name / file.name)
    else:
        for file in sorted((path / "images").iterdir())[:4]:
            for sub in ("images", "masks"):
                (small / "data" / sub).mkdir(parents=True, exist_ok=True)
                shutil.copy2(path / sub / file.name, small / "data" / sub / file.name)
    load_hospital_data(_request(source, small / "data", small / "state", "stat"))
    shutil.rmtree(small, ignore_errors=True)


def measure(source: str, path: Path, state: Path) -> dict[str, Any]:
    """Every case of the module notes for one folder (wall and CPU seconds), and the size
    of the cache entry."""
    shutil.rmtree(state, ignore_errors=True)
    warm_up(source, path, state)
    load = load_hospital_data
    stat = _request(source, path, state, "stat")
    hashed = _request(source, path, state, "hash")
    times: dict[str, tuple[float, float]] = {}
    times["cold"] = _timed(lambda: load(_request(source, path, state, "off")))
    times["first"] = _timed(lambda: load(stat))
    times["warm"] = _timed(lambda: load(stat), WARM_REPEATS)
    cache_bytes = sum(p.stat().st_size for p in (state / CACHE_DIR).rglob("*") if p.is_file())
    load(hashed)  # writes the hash-verified entry
    times["warm_hash"] = _timed(lambda: load(hashed), WARM_REPEATS)
    memo = DataMemo()
    memo.load(stat)  # the run's first message loads
    times["round_worker"] = _timed(lambda: memo.load(stat), WARM_REPEATS)
    memo.load(hashed)
    times["round_worker_hash"] = _timed(lambda: memo.load(hashed), WARM_REPEATS)
    if memo.last != "reused":
        raise RuntimeError("the worker's data memo loaded again for unchanged files")
    times["round_no_worker"] = times["warm"]
    return {
        "source": source,
        "files": sum(1 for _ in path.rglob("*.png")),
        "seconds": {k: round(wall, 4) for k, (wall, _) in times.items()},
        "cpu_seconds": {k: round(cpu, 4) for k, (_, cpu) in times.items()},
        "cache_megabytes": round(cache_bytes / 1e6, 1),  # one entry (stat)
        "speedup_warm": round(times["cold"][0] / times["warm"][0], 1),
        "speedup_warm_cpu": round(times["cold"][1] / max(times["warm"][1], 1e-6), 1),
    }


def run_data_load(mode: str, out: Path) -> dict[str, Any]:
    """The data-load part of ``bench system`` in ``mode`` (``quick``: a few hundred files)."""
    images, pairs = COUNTS[mode]
    shutil.rmtree(out, ignore_errors=True)
    written = write_folders(out / "data", images, pairs)
    entries = [
        measure("image-folder", out / "data" / "image-folder", out / "state-images"),
        measure("segmentation-folder", out / "data" / "segmentation-folder", out / "state-seg"),
    ]
    shutil.rmtree(out / "data", ignore_errors=True)  # regenerated on every run
    return {"image_size": IMAGE_SIZE, **written, "entries": entries}


def _wall_cpu(entry: Mapping[str, Any], key: str, digits: int = 2) -> str:
    wall, cpu = entry["seconds"][key], entry.get("cpu_seconds", {}).get(key, float("nan"))
    return f"{wall:.{digits}f} / {cpu:.{digits}f}"


def data_load_lines(results: Mapping[str, Any] | None) -> list[str]:
    """The data-load table of the BENCHMARKS.md section (``system_section``)."""
    if not results:
        return ["**Data load** (not run: `--no-data-load`)."]
    lines = [
        f"**Data load per hospital** ({results['origin']}, each file {results['source_pixels']}"
        f"x{results['source_pixels']} grey PNG, resized to {results['image_size']}; "
        f"{results['megabytes']} MB of PNGs in all; files in the OS page cache, so these are "
        "decoding and cache costs, not disk reads). Seconds as wall / CPU of the loading "
        'process (CPU stays meaningful on a busy machine). cold = `data-cache = "off"`; '
        "first = empty cache (decode + write); warm = read from the cache (best of "
        f"{WARM_REPEATS}, as every repeated case); hash = "
        '`data-cache = "hash"` warm (every file\'s SHA-256 checked); per round: with the site '
        "worker its data memo checks one `stat` per file (hash: its SHA-256) and keeps the "
        "loaded data, without it every message's ClientApp loads again (= warm).",
        "",
        "| source | PNG files | cold s | first s | warm s | warm, hash s | cold / warm "
        "(wall, CPU) | per round s: worker | per round s: worker, hash | per round s: no worker "
        "| cache MB |",
        "|---|---:|---|---|---|---|---|---|---|---|---:|",
    ]
    for e in results["entries"]:
        both = partial(_wall_cpu, e)
        lines.append(
            f"| {e['source']} | {e['files']} | {both('cold')} | {both('first')} | "
            f"{both('warm', 3)} | {both('warm_hash', 3)} | {e['speedup_warm']:.0f}x, "
            f"{e.get('speedup_warm_cpu', 0):.0f}x | {both('round_worker', 4)} | "
            f"{both('round_worker_hash', 3)} | "
            f"{both('round_no_worker', 3)} | {e['cache_megabytes']} |"
        )
    return lines
