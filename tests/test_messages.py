"""Issue 17.9: messages that mislead. A hospital is never told to unpickle a file (numpy's
``allow_pickle``, torch's ``weights_only=False``: both run arbitrary code from an untrusted
file); FedHelp's wrong-kind knowledge message says what the run needs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, RecordDict

from fedclinic.config import HospitalConfig
from fedclinic.data import DataRequest, load_hospital_data
from fedclinic.errors import NO_PICKLE, DataError
from fedclinic.knowledge import build_knowledge, read_knowledge, write_synthetic_public
from fedclinic.models import build_model
from fedclinic.prior import load_images, read_prior_file
from fedclinic.serialization import load_checkpoint, state_to_record
from fedclinic.site import SiteState
from strategies import load_run_config
from strategies.base import ClientContext
from strategies.fedhelp import ROLE_KEY, FedHelpObjective


class Payload:
    """Any Python object: pickled by torch.save, refused by weights_only loading."""


def test_a_knowledge_file_with_pickled_objects_is_not_to_be_unpickled(tmp_path: Path) -> None:
    path = tmp_path / "knowledge.npz"
    np.savez(
        path,
        probabilities=np.array([{"a": 1}], dtype=object),
        meta=np.array(json.dumps({"format": "x"})),
    )
    with pytest.raises(DataError) as caught:
        read_knowledge(path)
    assert "allow_pickle" not in str(caught.value) and NO_PICKLE in str(caught.value)


@pytest.mark.parametrize("reader", [read_prior_file, load_checkpoint])
def test_a_torch_file_with_pickled_objects_is_not_to_be_unpickled(
    tmp_path: Path, reader: object
) -> None:
    path = tmp_path / "file.pt"
    torch.save({"weights": torch.zeros(2), "extra": Payload()}, path)
    with pytest.raises(DataError) as caught:
        reader(path)  # type: ignore[operator]
    message = str(caught.value)
    assert "weights_only" not in message and "Weights only" not in message
    assert NO_PICKLE in message and "\n" not in message


def test_public_images_with_pickled_objects(tmp_path: Path) -> None:
    path = tmp_path / "images.npz"
    np.savez(path, images=np.array([object()], dtype=object))
    with pytest.raises(DataError) as caught:
        load_images(path)
    assert "allow_pickle" not in str(caught.value) and NO_PICKLE in str(caught.value)


def test_fedhelp_per_pixel_knowledge_in_a_classification_run(tmp_path: Path) -> None:
    """Once: "holds per-pixel probabilities; a classification run needs per-pixel ones"."""
    public = write_synthetic_public(
        tmp_path / "public.npz", 8, 2, image_size=28, seed=3, task="segmentation"
    )
    np.save(tmp_path / "api.npy", np.zeros((8, 1, 28, 28), dtype=np.float32))
    digest, _ = build_knowledge(public, tmp_path / "k.npz", logits_file=tmp_path / "api.npy")
    run = load_run_config(
        {
            "algorithm": "fedhelp", "run-name": "msg", "local-steps": 1, "batch-size": 8,
            "fedhelp.large-model": "wide-cnn", "fedhelp.knowledge-sha256": digest,
        }
    )  # fmt: skip
    hospital = HospitalConfig(
        hospital="h", data_source="synthetic", num_samples=40, state_dir=str(tmp_path / "s"),
        public_data_path=str(public), knowledge_path=str(tmp_path / "k.npz"),
    )  # fmt: skip
    context = ClientContext(
        run=run, hospital=hospital, data=load_hospital_data(DataRequest(run, hospital)),
        device=torch.device("cpu"), site=SiteState.for_run(hospital, run, run_id=1),
        server_round=1, server_config={"server-round": 1, ROLE_KEY: "small"},
    )  # fmt: skip
    content = RecordDict(
        {"arrays": state_to_record(build_model(run).state_dict()), "config": ConfigRecord({})}
    )
    with pytest.raises(DataError) as caught:
        FedHelpObjective(context).respond(content, train=True)
    assert "holds per-pixel probabilities; a classification run needs per-image ones" in str(
        caught.value
    )
