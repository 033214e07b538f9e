"""Data sources behind one registry, per task; loaded only at the hospital.

Every source has a loader per task it serves and two pre-flight checks that read no data
set: ``check_files`` (the hospital config alone: the path exists and has the source's
shape of file or folder; what ``fedclinic hospital`` can check) and ``check_run`` (the run
config too: model, channels, classes fit the source; what ``fedclinic local`` adds).
:func:`preflight` runs them before anything starts; the loaders run ``check_run`` again.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import ModuleType

from fedclinic.config import DATA_SOURCES, HospitalConfig, RunConfig
from fedclinic.data.base import (
    DataRequest,
    DataSource,
    HospitalData,
    Split,
    Standardise,
    check_hospital_data,
    source_of,
)
from fedclinic.errors import ConfigError


@dataclass(frozen=True)
class Source:
    """One data source: its loader per task and its pre-flight checks."""

    loaders: Mapping[str, DataSource]
    check_files: Callable[[HospitalConfig], None]
    check_run: Mapping[str, Callable[[DataRequest], None]]


@cache
def _sources() -> dict[str, Source]:
    """Imported lazily: a hospital pays only for the data layer when it loads data."""
    from fedclinic.data import (
        dicom,
        heart_disease,
        image_folder,
        medmnist,
        segmentation_folder,
        synthetic,
        synthetic_segmentation,
    )

    def single(module: ModuleType, task: str = "classification") -> Source:
        return Source({task: module.load}, module.check_files, {task: module.check_run})

    return {
        "synthetic": Source(
            {"classification": synthetic.load, "segmentation": synthetic_segmentation.load},
            synthetic.check_files,
            {
                "classification": synthetic.check_run,
                "segmentation": synthetic_segmentation.check_run,
            },
        ),
        "medmnist": single(medmnist),
        "heart-disease": single(heart_disease),
        "image-folder": single(image_folder),
        "segmentation-folder": single(segmentation_folder, "segmentation"),
        "dicom": Source(
            {"classification": dicom.load_classification, "segmentation": dicom.load_segmentation},
            dicom.check_files,
            {
                "classification": dicom.check_run_classification,
                "segmentation": dicom.check_run_segmentation,
            },
        ),
    }


SOURCE_NAMES = DATA_SOURCES


def _source(request_source: str, task: str | None) -> Source:
    sources = _sources()
    if request_source not in sources:
        raise ConfigError(
            f"hospital config: key 'data-source' = {request_source!r} is not allowed: "
            f"expected one of {', '.join(SOURCE_NAMES)}"
        )
    source = sources[request_source]
    if task is not None and task not in source.loaders:
        fitting = [name for name, s in sources.items() if task in s.loaders]
        raise ConfigError(
            f"hospital config: key 'data-source' = {request_source!r} is not allowed with "
            f"task = {task!r}: expected one of {', '.join(fitting)}"
        )
    return source


#: hospital config keys naming a site copy of a shared file (algorithms read them later)
SHARED_FILE_KEYS = ("prior-path", "public-data-path", "knowledge-path")


def preflight(hospital: HospitalConfig, run: RunConfig | None = None) -> None:
    """Check a hospital's data source before anything starts; reads no data set.

    Without ``run`` (``fedclinic hospital``: the run config comes later from the
    coordinator) only what the hospital config says; with it also that the run fits.
    Raises a one-line :class:`~fedclinic.errors.ConfigError` or ``DataError``.
    """
    source = _source(source_of(hospital), run.task if run else None)
    source.check_files(hospital)
    if run is not None:
        source.check_run[run.task](DataRequest(run, hospital))
    for key in SHARED_FILE_KEYS:
        value = getattr(hospital, key.replace("-", "_"))
        if value and not Path(value).expanduser().is_file():
            raise ConfigError(
                f"hospital config: key '{key}' = {value!r}: no such file (the site's copy of "
                "the shared file must be in place before the node starts)"
            )


def load_hospital_data(request: DataRequest) -> HospitalData:
    """Load and check one hospital's splits from the source its config names."""
    source = _source(request.source, request.run.task)
    data = source.loaders[request.run.task](request)
    origin = request.hospital.data_path or request.source
    if isinstance(request.normalisation, Standardise):  # the sources load it raw
        data = request.normalisation.apply(data, origin)
    return check_hospital_data(data, request, origin)


__all__ = [
    "SOURCE_NAMES",
    "DataRequest",
    "HospitalData",
    "Split",
    "Standardise",
    "load_hospital_data",
    "preflight",
]
