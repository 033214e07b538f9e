"""The benchmark's controls for FedHelp's public data: the cross-fitted knowledge file, the
hospitals that also train on the public set, the pooled + public model's data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedclinic.bench import crossfit
from fedclinic.bench.quality import (
    PNEUMONIA_FILE,
    official_labels,
    public_pooled,
    write_public_hospital,
)
from fedclinic.config import parse_hospital_config
from fedclinic.data import DataRequest, load_hospital_data
from fedclinic.knowledge import (
    load_shared_knowledge,
    read_public_data,
    write_synthetic_public,
)
from strategies import load_run_config


def test_every_row_of_the_cross_fitted_file_comes_from_a_teacher_that_never_saw_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    public = write_synthetic_public(tmp_path / "public.npz", 40, 2, seed=7)
    images = read_public_data(public).images
    trained_on: list[set[bytes]] = []
    scored: list[set[bytes]] = []
    real_train, real_score = crossfit.train_teacher, crossfit.model_probabilities

    def fingerprint(batch: torch.Tensor) -> set[bytes]:
        return {row.numpy().tobytes() for row in batch}

    def train(inputs: torch.Tensor, *args: Any) -> Any:
        trained_on.append(fingerprint(inputs))
        return real_train(inputs, *args)

    def score(model: Any, inputs: torch.Tensor, device: Any) -> np.ndarray:
        scored.append(fingerprint(inputs))
        return real_score(model, inputs, device)

    monkeypatch.setattr(crossfit, "train_teacher", train)
    monkeypatch.setattr(crossfit, "model_probabilities", score)
    digest, meta = crossfit.build_cross_fitted_knowledge(
        public, tmp_path / "k.npz", split="train", network="cnn", folds=4, epochs=1
    )
    assert len(trained_on) == len(scored) == 4
    for seen, held_out in zip(trained_on, scored, strict=True):
        assert not seen & held_out  # a teacher never scores an image it trained on
    everything = set().union(*scored)
    assert len(everything) == len(images) and sum(len(s) for s in scored) == len(images)
    # a knowledge file like any other: the small hospitals' chain of trust accepts it
    shared = load_shared_knowledge(tmp_path / "k.npz", public, digest, 1, 28)
    assert shared.knowledge.meta["source"] == "teacher-cross-fit" and meta["folds"] == 4
    assert shared.knowledge.meta["substitute"] is True
    torch.testing.assert_close(
        shared.knowledge.probabilities.sum(dim=1), torch.ones(len(images)), atol=1e-5, rtol=0
    )


needs_pneumonia = pytest.mark.skipif(not PNEUMONIA_FILE.is_file(), reason="shared data absent")
BASE = {"model": "cnn", "data-source": "medmnist", "num-classes": 2, "in-channels": 1,
        "image-size": 28}  # fmt: skip
NODE = {"hospital": "h4", "data-source": "medmnist", "data-path": str(PNEUMONIA_FILE),
        "partition-id": 3, "num-partitions": 6, "data-seed": 18, "device": "cpu",
        "partition-fractions": "0.4,0.3,0.12,0.08,0.06,0.04", "label-skew-alpha": 0.5}  # fmt: skip


def load(node: dict[str, Any]) -> Any:
    run = load_run_config({**BASE, "algorithm": "fedavg"})
    return load_hospital_data(DataRequest(run, parse_hospital_config(node)))


@needs_pneumonia
def test_a_public_data_hospital_adds_the_public_set_to_its_own_train_split_only(
    tmp_path: Path,
) -> None:
    own = load(NODE)
    node = write_public_hospital(NODE, BASE, official_labels(), tmp_path / "h4.npz")
    extended = load(node)
    public = read_public_data(PNEUMONIA_FILE, "val")
    assert len(extended.train) == len(own.train) + len(public)
    torch.testing.assert_close(extended.train.inputs[: len(own.train)], own.train.inputs)
    assert torch.equal(extended.val.labels, own.val.labels)
    torch.testing.assert_close(extended.test.inputs, own.test.inputs)
    counts = np.bincount(public.labels, minlength=2) + np.asarray(own.train.class_counts(2))
    assert extended.train.class_counts(2) == counts.tolist()


@needs_pneumonia
def test_the_pooled_public_model_trains_on_the_union_plus_the_public_set_once() -> None:
    run = load_run_config({**BASE, "algorithm": "fedavg"})
    second = {**NODE, "hospital": "h5", "partition-id": 4}
    train, evaluation = public_pooled(run, [NODE, second])
    sizes = [len(load(n).train) for n in (NODE, second)]
    assert len(train) == sum(sizes) + len(read_public_data(PNEUMONIA_FILE, "val"))
    assert [name for name, _, _ in evaluation] == ["h4", "h5"]
