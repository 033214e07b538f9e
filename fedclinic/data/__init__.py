"""Data sources behind one registry, per task; loaded only at the hospital."""

from __future__ import annotations

from fedclinic.data.base import DataRequest, DataSource, HospitalData, Split, check_hospital_data
from fedclinic.errors import ConfigError


def _sources() -> dict[str, dict[str, DataSource]]:
    """``{source: {task: loader}}``. Imported lazily: a hospital pays only for its source."""
    from fedclinic.data import (
        heart_disease,
        image_folder,
        medmnist,
        segmentation_folder,
        synthetic,
        synthetic_segmentation,
    )

    return {
        "synthetic": {
            "classification": synthetic.load,
            "segmentation": synthetic_segmentation.load,
        },
        "medmnist": {"classification": medmnist.load},
        "heart-disease": {"classification": heart_disease.load},
        "image-folder": {"classification": image_folder.load},
        "segmentation-folder": {"segmentation": segmentation_folder.load},
    }


SOURCE_NAMES = ("synthetic", "medmnist", "heart-disease", "image-folder", "segmentation-folder")


def load_hospital_data(request: DataRequest) -> HospitalData:
    """Load and check one hospital's splits from the source its config names."""
    sources = _sources()
    if request.source not in sources:
        raise ConfigError(
            f"hospital config: key 'data-source' = {request.source!r} is not allowed: "
            f"expected one of {', '.join(SOURCE_NAMES)}"
        )
    by_task = sources[request.source]
    task = request.run.task
    if task not in by_task:
        fitting = [name for name, tasks in sources.items() if task in tasks]
        raise ConfigError(
            f"hospital config: key 'data-source' = {request.source!r} is not allowed with "
            f"task = {task!r}: expected one of {', '.join(fitting)}"
        )
    data = by_task[task](request)
    origin = request.hospital.data_path or request.source
    return check_hospital_data(data, request, origin)


__all__ = ["SOURCE_NAMES", "DataRequest", "HospitalData", "Split", "load_hospital_data"]
