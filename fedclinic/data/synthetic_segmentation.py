"""Synthetic lesion images with masks: a segmentation federation to try without real data.

Why: as :mod:`fedclinic.data.synthetic` for classification: hospitals that differ in
controlled ways (size, lesion mix, scanner), regenerated anywhere from a few numbers.

What (``data-source = "synthetic"`` with ``task = "segmentation"``): the classification
generator's images (same lesion shapes, textures and per-hospital acquisition chain, one
lesion per image) with a per-pixel label map ``(image-size, image-size)``: 0 background,
and where the lesion's outline (its extent before texture and scanner) exceeds 0.5:

* ``num-classes`` = 2 (binary): 1, for lesions of the first four types (round, spiculated,
  ring, nodules), so the network must find lesions of varied shape;
* ``num-classes`` = C > 2: the lesion type plus one (1 round, 2 spiculated, ... up to C-1
  of the six types), so the network must also tell the types apart.

``class-priors`` (optional) gives the share of each lesion type among the images (four
numbers for a binary run, C-1 otherwise); ``num-samples``, ``acquisition-shift``,
``data-seed`` and ``val-fraction`` mean what they mean for the classification source.
The split is stratified by lesion type (70/15/15 by default). The scanner changes the image,
never the mask.
"""

from __future__ import annotations

from dataclasses import asdict

import torch

from fedclinic.data.base import DataRequest, HospitalData
from fedclinic.data.common import SPLITS, counts_text, make_mask_split, stable_seed
from fedclinic.data.splits import (
    DEFAULT_TEST_FRACTION,
    resolve_val_fraction,
    train_val_test_split,
)
from fedclinic.data.synthetic import (
    DEFAULT_VAL_FRACTION,
    LESIONS,
    acquisition_for,
    class_counts,
    generate_lesions,
)
from fedclinic.errors import ConfigError

BINARY_KINDS = 4  # round, spiculated, ring, nodules: lesions with a clear outline
MAX_CLASSES = 1 + len(LESIONS)


def lesion_kinds(num_classes: int) -> int:
    """How many lesion types the images show: four for a binary run, else ``num-classes - 1``."""
    return BINARY_KINDS if num_classes == 2 else num_classes - 1


def masks_from_extent(extent: torch.Tensor, kinds: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Label maps ``(N, H, W)``: the lesion (extent > 0.5) as 1 (binary) or its type + 1."""
    inside = (extent > 0.5).long()
    if num_classes == 2:
        return inside
    return inside * (kinds.long() + 1)[:, None, None]


def check_run(request: DataRequest) -> None:
    """Pre-flight and load: number of classes, class priors per lesion type."""
    run, hospital = request.run, request.hospital
    if run.num_classes > MAX_CLASSES:
        raise ConfigError(
            f"run config: key 'num-classes' = {run.num_classes} is not allowed with data source "
            f"'synthetic' and task = 'segmentation': expected 2..{MAX_CLASSES} (background + "
            f"lesion types {', '.join(LESIONS)})"
        )
    kinds = lesion_kinds(run.num_classes)
    priors = hospital.floats(hospital.class_priors)
    if priors and len(priors) != kinds:
        raise ConfigError(
            f"hospital config: key 'class-priors' = {hospital.class_priors!r} is not allowed: "
            f"expected {kinds} numbers, the share of each lesion type "
            f"({', '.join(LESIONS[:kinds])}) for a segmentation run with num-classes = "
            f"{run.num_classes}"
        )


def load(request: DataRequest) -> HospitalData:
    """Generate this hospital's images and masks and split them by lesion type."""
    run, hospital = request.run, request.hospital
    check_run(request)
    kinds = lesion_kinds(run.num_classes)
    priors = hospital.floats(hospital.class_priors)
    val_fraction = resolve_val_fraction(hospital, DEFAULT_VAL_FRACTION)
    counts = class_counts(hospital.num_samples, priors, kinds)
    seed = stable_seed("synthetic-segmentation", run.seed, hospital.hospital, hospital.data_seed)
    order = torch.randperm(hospital.num_samples, generator=torch.Generator().manual_seed(seed))
    types = torch.repeat_interleave(torch.arange(kinds), torch.as_tensor(counts))[order]
    acquisition = acquisition_for(hospital.hospital, hospital.data_seed, hospital.acquisition_shift)
    images, extent = generate_lesions(types, run.image_size, run.in_channels, acquisition, seed)
    masks = masks_from_extent(extent, types, run.num_classes)
    parts = train_val_test_split(
        types.numpy(), val_fraction, DEFAULT_TEST_FRACTION, seed=[hospital.data_seed, 1]
    )
    splits = {
        name: make_mask_split(images[index], masks[index])
        for name, index in zip(SPLITS, parts, strict=True)
    }
    foreground = float((masks > 0).double().mean())
    description = (
        f"synthetic segmentation '{hospital.hospital}': {hospital.num_samples} images "
        f"{run.in_channels}x{run.image_size}x{run.image_size} with masks, lesion types "
        f"{'/'.join(LESIONS[:kinds])} ({'/'.join(str(c) for c in counts)}), foreground "
        f"{foreground:.1%} of pixels; pixels per class train "
        f"{counts_text(splits['train'], run.num_classes)}; train {len(parts[0])}, "
        f"val {len(parts[1])}, test {len(parts[2])}; acquisition-shift "
        f"{hospital.acquisition_shift}"
    )
    extra = {"source": "synthetic", "task": "segmentation", "lesion_counts": counts.tolist()}
    extra.update(foreground_fraction=foreground, acquisition=asdict(acquisition))
    return HospitalData(**splits, description=description, extra=extra)
