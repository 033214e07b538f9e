"""Run and hospital config validation: every bad key or value is one line naming it."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from fedclinic.config import HospitalConfig, RunConfig, load_toml, parse_hospital_config
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
        parse_hospital_config({"data-source": "synthetic", **config} if config else config)
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


# ------------------------------------------------------------------ issue 17: strict values


@pytest.mark.parametrize(
    ("config", "fragments"),
    [
        ({"hospital": "a"}, ["key 'data-source' is required but missing", "no default"]),
        (
            {"hospital": "a", "data-source": "synthetc"},
            ["'data-source' = 'synthetc' is not allowed", "did you mean 'synthetic'"],
        ),
        ({"hospital": "a", "data-source": ""}, ["key 'data-source' is required"]),
    ],
)
def test_a_hospital_names_its_data_source(config: dict[str, object], fragments: list[str]) -> None:
    """No silent default for where patient data comes from (issue 17.1/17.2)."""
    with pytest.raises(ConfigError) as caught:
        parse_hospital_config(config)
    for fragment in fragments:
        assert fragment in str(caught.value)


def _float_keys(model: type) -> list[str]:
    return [str(f.alias) for f in model.model_fields.values() if f.annotation is float]


RUN_FLOATS = _float_keys(RunConfig) + [
    f"{name}.{key}" for name, a in REGISTRY.items() for key in _float_keys(a.options)
]
HOSPITAL_FLOATS = _float_keys(HospitalConfig)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("key", RUN_FLOATS)
def test_non_finite_numbers_are_refused_for_every_run_float(key: str, value: float) -> None:
    """``learning-rate = nan`` once said "should be <= 10"; ``round-timeout = inf`` passed."""
    with pytest.raises(ConfigError) as caught:
        load_run_config({**pyproject_run_config(), key: value})
    assert f"'{key}' = {value!r} is not allowed: Input should be a finite number" in str(
        caught.value
    )


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("key", HOSPITAL_FLOATS)
def test_non_finite_numbers_are_refused_for_every_hospital_float(key: str, value: float) -> None:
    with pytest.raises(ConfigError, match="Input should be a finite number"):
        parse_hospital_config({"hospital": "a", "data-source": "synthetic", key: value})


def test_float_key_lists_are_not_empty() -> None:
    assert {"learning-rate", "round-timeout", "fedprox.proximal-mu"} <= set(RUN_FLOATS)
    assert {"label-skew-alpha", "val-fraction"} <= set(HOSPITAL_FLOATS)


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("rounds", True, "'rounds' = true is not allowed: expected a number, not true/false"),
        ("learning-rate", False, "'learning-rate' = false is not allowed: expected a number"),
        ("seed", 1.5, "'seed' = 1.5 is not allowed: Input should be a valid integer"),
        ("run-name", 5, "'run-name' = 5 is not allowed: Input should be a valid string"),
        ("amp", 1, "'amp' = 1 is not allowed"),
    ],
)
def test_strict_types(key: str, value: object, fragment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_run_config({**pyproject_run_config(), key: value})
    assert fragment in str(caught.value)


def test_an_integer_is_still_a_float() -> None:
    assert load_run_config({"learning-rate": 1}).learning_rate == 1.0
