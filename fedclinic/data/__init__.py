"""Data sources behind one registry; loaded only at the hospital."""

from __future__ import annotations

from fedclinic.data.base import DataRequest, DataSource, HospitalData, Split, check_hospital_data
from fedclinic.errors import ConfigError


def _sources() -> dict[str, DataSource]:
    # Imported lazily: a hospital pays only for the source it uses.
    from fedclinic.data import heart_disease, image_folder, medmnist, synthetic

    return {
        "synthetic": synthetic.load,
        "medmnist": medmnist.load,
        "heart-disease": heart_disease.load,
        "image-folder": image_folder.load,
    }


SOURCE_NAMES = ("synthetic", "medmnist", "heart-disease", "image-folder")


def load_hospital_data(request: DataRequest) -> HospitalData:
    """Load and check one hospital's splits from the source its config names."""
    sources = _sources()
    if request.source not in sources:
        raise ConfigError(
            f"hospital config: key 'data-source' = {request.source!r} is not allowed: "
            f"expected one of {', '.join(SOURCE_NAMES)}"
        )
    data = sources[request.source](request)
    origin = request.hospital.data_path or request.source
    return check_hospital_data(data, request, origin)


__all__ = ["SOURCE_NAMES", "DataRequest", "HospitalData", "Split", "load_hospital_data"]
