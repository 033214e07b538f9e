"""What a hospital's reply tells the coordinator, through the real ClientApp handler
(``client.app.answer``) in process:

- every reply names the data source and a fingerprint of the data (counts per split and
  class, a content hash), and the fingerprint changes when the data does (issue 17.1);
- an error names the problem and a site-local reference, never a site path: file names
  can carry patient identifiers (issue 17.6); the full path stays in the site's log.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from PIL import Image

from client.app import answer
from fedclinic.config import HospitalConfig, parse_hospital_config
from fedclinic.data import DataRequest, load_hospital_data
from fedclinic.errors import DataError
from fedclinic.models import build_model
from fedclinic.redact import scrub, shareable
from fedclinic.serialization import state_to_record
from strategies import load_run_config

RUN = {"rounds": 1, "local-steps": 1, "batch-size": 8}


@pytest.fixture(autouse=True)
def task_identity() -> None:
    """Flower's Message needs the task identity a ClientApp process has."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1


def reply(node_config: dict[str, Any], train: bool = True) -> dict[str, Any]:
    model = build_model(load_run_config(RUN))
    content = RecordDict(
        {
            "arrays": state_to_record(model.state_dict()),
            "config": ConfigRecord({"server-round": 1}),
        }
    )
    message = Message(content, dst_node_id=1, message_type="train")
    context = Context(
        run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config=RUN
    )
    return dict(answer(message, context, train=train).content["info"])


def write_images(root: Path, counts: dict[str, int]) -> Path:
    rng = np.random.default_rng(0)
    for name, count in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            pixels = (rng.random((28, 28)) * 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"MRN-{1000 + i}.png")
    return root


# ---------------------------------------------------------------------------- 17.1


def test_a_reply_names_its_data_source_and_fingerprint(tmp_path: Path) -> None:
    node = {"hospital": "a", "data-source": "synthetic", "num-samples": 40, "device": "cpu"}
    node["state-dir"] = str(tmp_path)
    info = reply(node)
    assert info["data_source"] == "synthetic"
    fingerprint = json.loads(info["data_fingerprint"])
    assert fingerprint["counts"] == {"train": [14, 14], "val": [3, 3], "test": [3, 3]}
    assert len(fingerprint["sha256"]) == 64
    again = json.loads(reply(node, train=False)["data_fingerprint"])
    assert again == fingerprint  # an evaluate-only reply says the same
    other = json.loads(reply({**node, "data-seed": 1})["data_fingerprint"])
    assert other["counts"] == fingerprint["counts"] and other["sha256"] != fingerprint["sha256"]


def test_the_fingerprint_hashes_what_was_loaded_in_order(tmp_path: Path) -> None:
    """An independent hash of the loaded tensors, and a change of one pixel changes it."""
    images = write_images(tmp_path / "export", {"benign": 6, "malignant": 6})
    hospital = parse_hospital_config(
        {"hospital": "a", "data-source": "image-folder", "data-path": str(images)}
    )
    data = load_hospital_data(DataRequest(load_run_config({}), hospital))
    digest = hashlib.sha256()
    for split in (data.train, data.val, data.test):
        for tensor in (split.inputs, split.labels):
            name = next(n for n in ("train", "val", "test") if getattr(data, n) is split)
            digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(tensor.numpy().tobytes())
    printed = json.loads(data.fingerprint(2))
    assert printed["sha256"] == digest.hexdigest()
    assert sum(map(sum, printed["counts"].values())) == 12
    assert "MRN" not in data.fingerprint(2) and str(images) not in data.fingerprint(2)
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(images / "benign" / "MRN-1000.png")
    changed = load_hospital_data(DataRequest(load_run_config({}), hospital))
    assert json.loads(changed.fingerprint(2))["sha256"] != printed["sha256"]


def test_a_config_without_a_data_source_trains_nothing(tmp_path: Path) -> None:
    info = reply({"hospital": "a", "num-samples": 40, "state-dir": str(tmp_path)})
    assert "key 'data-source' is required but missing" in info["error"]
    assert "data_fingerprint" not in info


# ---------------------------------------------------------------------------- 17.6


def test_a_corrupt_image_is_named_by_class_and_position_not_by_path(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    images = write_images(tmp_path / "patients", {"normal": 5, "pneumonia": 5})
    corrupt = images / "pneumonia" / "MRN-1003.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    node = {"hospital": "st-mary", "data-source": "image-folder", "data-path": str(images)}
    info = reply({**node, "state-dir": str(tmp_path / "state")})
    sent = info["error"]
    assert sent.startswith("image 4 of class 'pneumonia': not a readable image"), sent
    assert str(tmp_path) not in sent and "MRN" not in sent and "patients" not in sent
    assert str(corrupt) in caplog.text  # the site's own log keeps the full path


def test_other_errors_are_scrubbed_of_site_paths(tmp_path: Path) -> None:
    node = {"hospital": "st-mary", "data-source": "image-folder", "device": "cpu"}
    info = reply({**node, "data-path": str(tmp_path / "MRN-77" / "export")})
    assert "image folder not found" in info["error"]
    assert "MRN-77" not in info["error"] and "<data-path>" in info["error"]


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ("/srv/x ray/a/MRN-1.png: not readable", "<data-path>: not readable"),
        ("'/srv/x ray': no such folder", "'<data-path>': no such folder"),
        ("/srv/x ray/processed.va.data:42: column 'cp'", "<data-path>:42: column 'cp'"),
        ("cannot write /state/site/model.pt", "cannot write <state-dir>"),
        ("prior '/opt/shared/prior.pt' differs", "prior '<prior-path>' differs"),
        ("config '/etc/fedclinic/h.toml' bad", "config '<path>' bad"),
        ("a 0/255 mask; train 10/12; images/", "a 0/255 mask; train 10/12; images/"),
    ],
)
def test_scrub(message: str, expected: str) -> None:
    hospital = HospitalConfig(
        hospital="a",
        data_source="image-folder",
        data_path="/srv/x ray",
        state_dir="/state",
        prior_path="/opt/shared/prior.pt",
    )
    assert scrub(message, hospital) == expected


def test_a_data_error_may_carry_its_shareable_form() -> None:
    err = DataError("/srv/a/MRN-1.png: bad", shared="image 1 of class 'a': bad")
    assert shareable(err, None) == "image 1 of class 'a': bad"
    assert shareable(DataError("/srv/a/MRN-1.png: bad"), None) == "<path>: bad"
