"""Run and hospital config validation: every bad key or value is one line naming it."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from fedclinic.config import RunConfig, load_toml, parse_hospital_config
from fedclinic.errors import ConfigError
from strategies import REGISTRY, load_run_config

ROOT = Path(__file__).resolve().parents[1]


def pyproject_run_config() -> dict[str, object]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return data["tool"]["flwr"]["app"]["config"]


def test_pyproject_defaults_validate_and_match_the_schema() -> None:
    flat = pyproject_run_config()
    run = load_run_config(flat)
    assert run.to_flat() == flat  # every key present, every default equal


def test_every_schema_key_has_a_pyproject_default() -> None:
    flat = pyproject_run_config()
    expected = set(RunConfig().to_flat())
    for name, algorithm in REGISTRY.items():
        expected |= {f"{name}.{k}" for k in algorithm.options().to_flat()}
    assert expected == set(flat)


@pytest.mark.parametrize(
    ("override", "fragments"),
    [
        ({"locl-epochs": 2}, ["unknown key 'locl-epochs'", "did you mean 'local-epochs'"]),
        ({"local-epochs": 0}, ["'local-epochs' = 0", "greater than or equal to 1"]),
        ({"optimizer": "rmsprop"}, ["'optimizer' = 'rmsprop'", "'sgd', 'adam' or 'adamw'"]),
        ({"algorithm": "fedsomething"}, ["'algorithm' = 'fedsomething'", "fedavg"]),
        ({"model": "vgg"}, ["'model' = 'vgg'", "'cnn'"]),
        ({"fedprox.proximal-mu": -1.0}, ["'fedprox.proximal-mu' = -1.0", "greater than"]),
        ({"fedprox.mu": 1.0}, ["unknown key 'fedprox.mu'", "proximal-mu"]),
        ({"fedprx.mu": 1.0}, ["unknown section 'fedprx'", "did you mean 'fedprox'"]),
        ({"run-name": "a b"}, ["'run-name' = 'a b'"]),
    ],
)
def test_bad_run_config_gives_one_line(override: dict[str, object], fragments: list[str]) -> None:
    flat = {**pyproject_run_config(), **override}
    with pytest.raises(ConfigError) as caught:
        load_run_config(flat)
    message = str(caught.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        ({}, "key 'hospital' is required"),
        ({"hospital": "bad name!"}, "'hospital' = 'bad name!'"),
        ({"hospital": "a", "device": "gpu"}, "expected auto, cpu, cuda, cuda:N or mps"),
        ({"hospital": "a", "partition-id": 3, "num-partitions": 2}, "expected 0..1"),
        ({"hospital": "a", "partition-fractions": "0.5,0.6"}, "sum to 1"),
        ({"hospital": "a", "num-partitions": 3, "partition-fractions": "0.5,0.5"}, "3 numbers"),
        ({"hospital": "a", "datapath": "/x"}, "did you mean 'data-path'"),
    ],
)
def test_bad_hospital_config_gives_one_line(config: dict[str, object], fragment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_hospital_config(config)
    assert fragment in str(caught.value)
    assert "\n" not in str(caught.value)


def test_hospital_config_from_toml(tmp_path: Path) -> None:
    path = tmp_path / "hospital.toml"
    path.write_text('hospital = "st-mary"\ndata-source = "synthetic"\nnum-samples = 300\n')
    config = parse_hospital_config(load_toml(path, "hospital config"))
    assert config.hospital == "st-mary" and config.num_samples == 300


def test_missing_and_corrupt_toml_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_toml(tmp_path / "nope.toml", "hospital config")
    bad = tmp_path / "bad.toml"
    bad.write_text("hospital = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_toml(bad, "hospital config")
