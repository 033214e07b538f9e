"""Synthetic medical-like images: a federation to try without any real data.

Why: demos, tests and algorithm comparisons need hospitals whose data differ in controlled
ways (size, class balance, scanner) and that can be regenerated anywhere from a few numbers.

What: grey (or tinted, for ``in-channels`` > 1) tissue-like images of shape
``(in-channels, image-size, image-size)`` in [0, 1], one lesion per image; the class shows in
the lesion's shape and texture, while position, size, rotation and contrast vary at random:

====  ==============  ===================================================================
0     round           smooth, homogeneous, round/oval benign-looking lesion, soft edge
1     spiculated      irregular outline with spikes, sharp edge, speckled texture
2     ring            bright rim around a darker centre (ring-enhancing lesion)
3     nodules         3-5 small separate nodules clustered together
4     streak          long thin elongated opacity with striated texture
5     diffuse         large hazy opacity without edge, mottled texture
====  ==============  ===================================================================

Hospital settings: ``num-samples`` (total before the split), ``class-priors`` (exact class
counts by the largest-remainder rule; empty = uniform), ``acquisition-shift`` in [0, 1] (the
hospital's "scanner": contrast, gamma, brightness, noise level and blur, in a direction drawn
from the hospital name and ``data-seed`` — so each hospital differs — with a size that grows
with the setting; 0 = every hospital shares the same acquisition), ``data-seed``. The run's
``seed`` also enters the sample seed. Split: stratified train/val/test = 70/15/15;
``val-fraction`` >= 0 replaces the val share (test stays 15 %).

Generation is vectorised with torch (600 images of 28x28: a few tens of milliseconds) and
reproducible for a given torch version.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fedclinic.config import HospitalConfig
from fedclinic.data.base import DataRequest, HospitalData
from fedclinic.data.common import hospital_data, make_split, require_image_model, stable_seed
from fedclinic.data.splits import (
    DEFAULT_TEST_FRACTION,
    allocate,
    resolve_val_fraction,
    train_val_test_split,
)
from fedclinic.errors import ConfigError

LESIONS = ("round", "spiculated", "ring", "nodules", "streak", "diffuse")
MIN_CLASSES, MAX_CLASSES = 2, len(LESIONS)
DEFAULT_VAL_FRACTION = 0.15
CHUNK_PIXELS = 1 << 22  # images per generation chunk = this // (image-size ** 2)


@dataclass(frozen=True)
class Acquisition:
    """One hospital's imaging chain, applied to every image it produces."""

    contrast: float = 1.0  # multiplies the deviation from mid-grey
    gamma: float = 1.0  # x ** gamma
    brightness: float = 0.0  # added after contrast
    noise: float = 0.02  # std of additive Gaussian noise
    blur: float = 0.0  # Gaussian blur sigma in pixels at 28 px (scaled with image size)


def acquisition_for(hospital: str, data_seed: int, shift: float) -> Acquisition:
    """The hospital's acquisition: a direction from (hospital, data-seed), a size from ``shift``."""
    rng = np.random.default_rng(stable_seed("synthetic-acquisition", hospital, data_seed))
    d = rng.normal(size=5)
    d /= np.linalg.norm(d)
    s = float(shift)
    return Acquisition(
        contrast=math.exp(0.6 * s * float(d[0])),
        gamma=math.exp(0.6 * s * float(d[1])),
        brightness=0.15 * s * float(d[2]),
        noise=0.02 + 0.08 * s * abs(float(d[3])),
        blur=1.2 * s * abs(float(d[4])),
    )


def class_counts(num_samples: int, priors: list[float], num_classes: int) -> np.ndarray:
    """Exact per-class counts (largest remainder): imbalance without sampling noise."""
    weights = priors if priors else [1.0] * num_classes
    return allocate(num_samples, weights)


def _uniform(g: torch.Generator, n: int, low: float, high: float) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=g)


def _smooth_noise(g: torch.Generator, n: int, size: int, cells: int) -> torch.Tensor:
    """Low-frequency texture, roughly unit variance, shape (n, size, size)."""
    coarse = torch.randn(n, 1, cells, cells, generator=g)
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)[:, 0]


def _lesions(kind: str, n: int, size: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` lesions of one class: intensity maps (n, size, size), roughly in [0, 0.6], and
    their extent in [0, 1] (the soft outline without texture; > 0.5 is the lesion's mask)."""
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    px = 2.0 / size  # one pixel in grid units
    cx = _uniform(g, n, -0.4, 0.4)[:, None, None]
    cy = _uniform(g, n, -0.4, 0.4)[:, None, None]
    r = _uniform(g, n, 0.3, 0.45)[:, None, None]
    angle = _uniform(g, n, 0.0, 2 * math.pi)[:, None, None]
    amp = _uniform(g, n, 0.35, 0.55)[:, None, None]
    dx, dy = xx - cx, yy - cy
    u = dx * torch.cos(angle) + dy * torch.sin(angle)
    v = -dx * torch.sin(angle) + dy * torch.cos(angle)
    rho = torch.sqrt(u**2 + v**2)
    phi = torch.atan2(v, u)

    if kind == "round":
        aspect = _uniform(g, n, 0.75, 1.0)[:, None, None]
        rho_e = torch.sqrt(u**2 + (v / aspect) ** 2)
        extent = torch.sigmoid((r - rho_e) / (0.6 * px))
        return amp * extent, extent
    if kind == "spiculated":
        k1 = torch.randint(5, 9, (n, 1, 1), generator=g)
        k2 = torch.randint(9, 14, (n, 1, 1), generator=g)
        m = torch.randint(6, 11, (n, 1, 1), generator=g)
        p1, p2, p3 = (_uniform(g, n, 0, 2 * math.pi)[:, None, None] for _ in range(3))
        outline = r * (0.8 + 0.15 * torch.sin(k1 * phi + p1) + 0.08 * torch.sin(k2 * phi + p2))
        spikes = 0.8 * r * torch.relu(torch.cos(m * phi + p3)) ** 10
        mask = torch.sigmoid((outline + spikes - rho) / (0.4 * px))
        speckle = (1.0 + 0.6 * torch.randn(n, size, size, generator=g)).clamp_min(0)
        return amp * mask * speckle, mask
    if kind == "ring":
        outer = r * 1.05
        inner = outer * _uniform(g, n, 0.45, 0.62)[:, None, None]
        inside_outer = torch.sigmoid((outer - rho) / (0.6 * px))
        inside_inner = torch.sigmoid((inner - rho) / (0.6 * px))
        # the extent includes the darker centre, as a ring-enhancing lesion's outline does
        return amp * (inside_outer - inside_inner) - 0.15 * amp * inside_inner, inside_outer
    if kind == "nodules":
        count = torch.randint(3, 6, (n, 1), generator=g)
        active = (torch.arange(5)[None, :] < count).float()[:, :, None, None]
        theta = torch.rand(n, 5, generator=g) * 2 * math.pi
        dist = (0.3 + 0.7 * torch.rand(n, 5, generator=g)) * r[:, :, 0] * 1.3
        nx = (cx[:, :, 0] + dist * torch.cos(theta))[:, :, None, None]
        ny = (cy[:, :, 0] + dist * torch.sin(theta))[:, :, None, None]
        sigma = (0.07 + 0.04 * torch.rand(n, 5, generator=g))[:, :, None, None]
        d2 = (xx - nx) ** 2 + (yy - ny) ** 2
        blobs = (active * torch.exp(-d2 / (2 * sigma**2))).sum(dim=1)
        return amp * blobs.clamp_max(1.2), blobs.clamp_max(1.0)
    if kind == "streak":
        rho_e = torch.sqrt((u / (1.5 * r)) ** 2 + (v / (0.3 * r)) ** 2)
        mask = torch.sigmoid((1.0 - rho_e) / 0.12)
        freq = _uniform(g, n, 12.0, 20.0)[:, None, None]
        stripes = 1.0 + 0.35 * torch.sin(freq * u / r.clamp_min(0.1))
        return amp * mask * stripes, mask
    if kind == "diffuse":
        sigma = 1.3 * r
        haze = torch.exp(-(rho**2) / (2 * sigma**2))
        mottle = (0.6 + 0.4 * _smooth_noise(g, n, size, 8)).clamp_min(0)
        return 0.8 * amp * haze * mottle, haze
    raise ValueError(f"unknown lesion kind {kind!r}")


def _blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur with reflected borders, as two matrix products (faster than conv2d)."""
    if sigma < 0.05:
        return images
    size = images.shape[-1]
    radius = min(max(1, math.ceil(3 * sigma)), size - 1)
    offsets = torch.arange(-radius, radius + 1)
    weights = torch.exp(-(offsets.float() ** 2) / (2 * sigma**2))
    weights = weights / weights.sum()
    rows = torch.arange(size)[:, None].expand(-1, len(offsets))
    cols = (rows + offsets[None, :]).abs()  # reflect below 0: -1 -> 1
    cols = torch.where(cols > size - 1, 2 * (size - 1) - cols, cols)  # and above: size -> size-2
    matrix = torch.zeros(size, size).index_put_(
        (rows.reshape(-1), cols.reshape(-1)), weights.repeat(size), accumulate=True
    )
    return matrix @ images @ matrix.T


def generate_images(
    labels: torch.Tensor,
    image_size: int,
    in_channels: int,
    acquisition: Acquisition,
    seed: int,
) -> torch.Tensor:
    """Images ``(N, in_channels, image_size, image_size)`` in [0, 1] for the given labels."""
    return generate_lesions(labels, image_size, in_channels, acquisition, seed)[0]


def generate_lesions(
    labels: torch.Tensor,
    image_size: int,
    in_channels: int,
    acquisition: Acquisition,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images as :func:`generate_images` plus each lesion's extent ``(N, size, size)`` in [0, 1]
    (before the acquisition chain: a scanner changes the image, not the lesion).

    Generated in chunks of about 4 M pixels (each with its own derived seed), so memory stays
    bounded for large hospitals or images.
    """
    n = int(labels.shape[0])
    out = torch.empty(n, in_channels, image_size, image_size)
    extent = torch.empty(n, image_size, image_size)
    chunk = max(1, CHUNK_PIXELS // (image_size * image_size))
    for index, start in enumerate(range(0, n, chunk)):
        g = torch.Generator().manual_seed(stable_seed(seed, "chunk", index))
        part = labels[start : start + chunk]
        images, shapes = _generate_chunk(part, image_size, in_channels, acquisition, g)
        out[start : start + len(part)] = images
        extent[start : start + len(part)] = shapes
    return out, extent


def _generate_chunk(
    labels: torch.Tensor,
    size: int,
    in_channels: int,
    acquisition: Acquisition,
    g: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    n = int(labels.shape[0])
    background = (
        0.3
        + 0.05 * _smooth_noise(g, n, size, 4)
        + 0.025 * _smooth_noise(g, n, size, max(6, size // 4))
        + 0.01 * torch.randn(n, size, size, generator=g)
    )
    lesion = torch.zeros(n, size, size)
    extent = torch.zeros(n, size, size)
    for cls, kind in enumerate(LESIONS):
        members = torch.nonzero(labels == cls).flatten()
        if len(members):
            lesion[members], extent[members] = _lesions(kind, len(members), size, g)
    if in_channels == 1:
        images = (background + lesion)[:, None]
    else:  # a per-image tint for tissue and lesion (as in dermoscopy or stained slides)
        tissue_tint = 1.0 + 0.08 * torch.randn(n, in_channels, 1, 1, generator=g)
        lesion_tint = 1.0 + 0.25 * torch.randn(n, in_channels, 1, 1, generator=g)
        images = background[:, None] * tissue_tint + lesion[:, None] * lesion_tint
    images = _blur(images.clamp(0, 1), acquisition.blur * size / 28)
    images = images.clamp(0, 1) ** acquisition.gamma
    images = (images - 0.5) * acquisition.contrast + 0.5 + acquisition.brightness
    images = images + acquisition.noise * torch.randn(images.shape, generator=g)
    return images.clamp(0, 1).to(torch.float32), extent


def check_files(hospital: HospitalConfig) -> None:
    """Pre-flight: generated images read no file, so a ``data-path`` here is a mistake (the
    hospital would train on generated images while its operator thinks it reads that path)."""
    if hospital.data_path:
        raise ConfigError(
            f"hospital config: key 'data-path' = {hospital.data_path!r} is not allowed with "
            "data-source = 'synthetic' (built-in generated images, no file is read): set "
            "data-source to the kind of data at that path, or remove data-path"
        )


def check_run(request: DataRequest) -> None:
    """Pre-flight and load: image model, number of lesion types, class priors."""
    run, hospital = request.run, request.hospital
    require_image_model(request, "synthetic")
    if not MIN_CLASSES <= run.num_classes <= MAX_CLASSES:
        raise ConfigError(
            f"run config: key 'num-classes' = {run.num_classes} is not allowed with data source "
            f"'synthetic': expected {MIN_CLASSES}..{MAX_CLASSES} (lesion types: "
            f"{', '.join(LESIONS)})"
        )
    priors = hospital.floats(hospital.class_priors)
    if priors and len(priors) != run.num_classes:
        raise ConfigError(
            f"hospital config: key 'class-priors' = {hospital.class_priors!r} is not allowed: "
            f"expected {run.num_classes} numbers (run config num-classes = {run.num_classes})"
        )


def load(request: DataRequest) -> HospitalData:
    """Generate this hospital's images and split them (stratified 70/15/15 by default)."""
    run, hospital = request.run, request.hospital
    check_run(request)
    priors = hospital.floats(hospital.class_priors)
    val_fraction = resolve_val_fraction(hospital, DEFAULT_VAL_FRACTION)

    counts = class_counts(hospital.num_samples, priors, run.num_classes)
    seed = stable_seed("synthetic", run.seed, hospital.hospital, hospital.data_seed)
    order = torch.randperm(hospital.num_samples, generator=torch.Generator().manual_seed(seed))
    labels = torch.repeat_interleave(torch.arange(run.num_classes), torch.as_tensor(counts))[order]
    acquisition = acquisition_for(hospital.hospital, hospital.data_seed, hospital.acquisition_shift)
    images = generate_images(labels, run.image_size, run.in_channels, acquisition, seed)

    train, val, test = train_val_test_split(
        labels.numpy(), val_fraction, DEFAULT_TEST_FRACTION, seed=[hospital.data_seed, 1]
    )
    splits = {
        name: make_split(images[idx], labels[idx])
        for name, idx in (("train", train), ("val", val), ("test", test))
    }
    what = (
        f"synthetic '{hospital.hospital}': {hospital.num_samples} images "
        f"{run.in_channels}x{run.image_size}x{run.image_size}, classes "
        f"{'/'.join(LESIONS[: run.num_classes])}, acquisition-shift {hospital.acquisition_shift}"
    )
    extra = {
        "source": "synthetic",
        "class_counts": counts.tolist(),
        "acquisition": asdict(acquisition),
    }
    return hospital_data(splits, what, run.num_classes, extra)
