"""Synthetic source: deterministic, shaped by the hospital config, fast, and learnable."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn

from fedclinic.config import HospitalConfig, RunConfig
from fedclinic.data import load_hospital_data, synthetic
from fedclinic.data.base import DataRequest, HospitalData
from fedclinic.errors import ConfigError


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny models train faster and far more steadily on one thread on a busy 2-core host."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make(run: dict[str, Any] | None = None, **hospital: Any) -> DataRequest:
    hospital.setdefault("hospital", "st-mary")
    hospital.setdefault("data_source", "synthetic")
    return DataRequest(RunConfig(**(run or {})), HospitalConfig(**hospital))


def same(a: HospitalData, b: HospitalData) -> bool:
    return all(
        torch.equal(getattr(a, s).inputs, getattr(b, s).inputs)
        and torch.equal(getattr(a, s).labels, getattr(b, s).labels)
        for s in ("train", "val", "test")
    )


def test_default_shapes_ranges_and_split_sizes() -> None:
    data = load_hospital_data(make())
    assert (len(data.train), len(data.val), len(data.test)) == (420, 90, 90)
    for split in (data.train, data.val, data.test):
        assert split.inputs.shape[1:] == (1, 28, 28)
        assert split.inputs.dtype == torch.float32 and split.labels.dtype == torch.int64
        assert float(split.inputs.min()) >= 0.0 and float(split.inputs.max()) <= 1.0
        assert split.class_counts(2) in ([210, 210], [45, 45])
    assert "synthetic 'st-mary'" in data.description


def test_deterministic_and_different_per_hospital_and_seed() -> None:
    base = synthetic.load(make(num_samples=60))
    assert same(base, synthetic.load(make(num_samples=60)))
    assert not same(base, synthetic.load(make(num_samples=60, hospital="general")))
    assert not same(base, synthetic.load(make(num_samples=60, data_seed=1)))
    assert not same(base, synthetic.load(make({"seed": 7}, num_samples=60)))


def test_run_shape_channels_and_classes() -> None:
    data = synthetic.load(
        make({"image_size": 32, "in_channels": 3, "num_classes": 6}, num_samples=120)
    )
    assert data.train.inputs.shape[1:] == (3, 32, 32)
    assert sorted(set(data.train.labels.tolist())) == list(range(6))


def test_class_priors_give_exact_imbalance() -> None:
    data = synthetic.load(
        make({"num_classes": 3}, num_samples=200, class_priors="0.6,0.3,0.1", val_fraction=0.25)
    )
    total = [
        sum(c)
        for c in zip(*(s.class_counts(3) for s in (data.train, data.val, data.test)), strict=True)
    ]
    assert total == [120, 60, 20]
    assert (len(data.train), len(data.val), len(data.test)) == (120, 50, 30)  # val 25 %, test 15 %


def test_acquisition_shift_differs_per_hospital_and_vanishes_at_zero() -> None:
    a = synthetic.acquisition_for("a", 0, 1.0)
    b = synthetic.acquisition_for("b", 0, 1.0)
    assert a != b
    assert a == synthetic.acquisition_for("a", 0, 1.0)
    assert synthetic.acquisition_for("a", 0, 0.0) == synthetic.acquisition_for("b", 5, 0.0)
    plain = synthetic.load(make(num_samples=100, hospital="a"))
    shifted = synthetic.load(make(num_samples=100, hospital="a", acquisition_shift=1.0))
    assert torch.equal(plain.train.labels, shifted.train.labels)  # same patients, other scanner
    assert not torch.allclose(plain.train.inputs, shifted.train.inputs, atol=0.05)


@pytest.mark.parametrize(
    ("run", "hospital", "fragment"),
    [
        ({"model": "logreg"}, {}, "key 'model' = 'logreg'"),
        ({"num_classes": 7}, {}, "key 'num-classes' = 7"),
        ({"num_classes": 3}, {"class_priors": "0.5,0.5"}, "key 'class-priors'"),
        ({}, {"val_fraction": 0.88}, "key 'val-fraction'"),
    ],
)
def test_bad_config_is_one_line(
    run: dict[str, Any], hospital: dict[str, Any], fragment: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        synthetic.load(make(run, **hospital))
    assert fragment in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.usefixtures("one_thread")
def test_learnable_by_a_tiny_cnn() -> None:
    """Four lesion types under a scanner shift: 3 short epochs already beat chance (0.25)."""
    data = synthetic.load(make({"num_classes": 4}, num_samples=600, acquisition_shift=0.5))
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveMaxPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 4),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    inputs, labels = data.train.inputs - 0.3, data.train.labels
    for _ in range(3):
        order = torch.randperm(len(labels))
        for start in range(0, len(labels), 16):
            batch = order[start : start + 16]
            loss = nn.functional.cross_entropy(model(inputs[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        predicted = model(data.test.inputs - 0.3).argmax(dim=1)
    accuracy = float((predicted == data.test.labels).float().mean())
    assert accuracy > 0.4, accuracy
