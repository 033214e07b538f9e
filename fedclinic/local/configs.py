"""The inputs of a local federation, resolved and validated before any process starts.

- Run config: ``[tool.flwr.app.config]`` of the app's ``pyproject.toml`` (the defaults),
  then a ``--run-config`` TOML file, then ``--set KEY=VALUE`` overrides. The merged map is
  validated with the same schema the ServerApp uses, so a typo costs one line, not a
  federation start-up.
- Hospital configs: given TOML files (validated with the ClientApp's schema) or ``N``
  generated synthetic hospitals of unequal size and acquisition.

Both end up as TOML files Flower reads directly (``flwr run --run-config run.toml``,
``flower-supernode --node-config <hospital>.toml``), written with ``tomli-w`` (Flower's own
TOML writer) as flat maps with quoted dotted keys: Flower accepts only bool/int/float/str
values there.
"""

from __future__ import annotations

import re
import string
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from fedclinic.config import (
    HospitalConfig,
    RunConfig,
    Scalar,
    _flatten,
    load_toml,
    parse_hospital_config,
)
from fedclinic.errors import ConfigError
from fedclinic.local.supervisor import MARKER_VARIABLE
from strategies import load_run_config

# Sizes and scanner differences of the generated hospitals: one large, one medium, one small, ...
BASE_SAMPLES = 900
MIN_SAMPLES = 60
MAX_SHIFT = 0.6
MAX_HOSPITALS = 64


#: variables the local federation sets itself for every hospital's processes
MANAGED_VARIABLES = frozenset({"FLWR_HOME", MARKER_VARIABLE})
_VARIABLE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class HospitalSpec:
    """One hospital of the local federation: its validated config and the flat map to write.

    ``env``: extra environment variables for this hospital's processes only (its SuperNode,
    and through it its SuperExec and every ``flwr-clientapp``), on top of the runner's own
    environment; e.g. ``CUDA_VISIBLE_DEVICES`` to pin one site to one GPU.
    """

    config: HospitalConfig
    flat: dict[str, Scalar]
    source: Path | None = None  # the operator's file, None when generated
    env: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key, value in self.env.items():
            if not isinstance(key, str) or not _VARIABLE_NAME.match(key):
                raise ConfigError(
                    f"hospital {self.name}: environment variable name {key!r} is not allowed: "
                    "expected letters, digits and '_', not starting with a digit"
                )
            if key in MANAGED_VARIABLES:
                raise ConfigError(
                    f"hospital {self.name}: environment variable {key} is set by the local "
                    "federation itself and cannot be overridden"
                )
            if not isinstance(value, str) or "\0" in value:
                raise ConfigError(
                    f"hospital {self.name}: environment variable {key} must be a string "
                    "without NUL characters"
                )

    @property
    def name(self) -> str:
        return self.config.hospital


# ---------------------------------------------------------------------------- app project


def find_app_dir(start: Path | None = None) -> Path:
    """The project root holding ``pyproject.toml`` with ``[tool.flwr.app]``.

    Default: the parent of the ``fedclinic`` package (the checkout or the editable install
    this code runs from); ``flwr run`` builds the FAB from that directory.
    """
    app_dir = (start or Path(__file__).resolve().parents[2]).resolve()
    pyproject = app_dir / "pyproject.toml"
    if not pyproject.is_file():
        raise ConfigError(
            f"no pyproject.toml in '{app_dir}': fedclinic local needs the project directory "
            "that holds the Flower app (pass --app-dir)"
        )
    if "app" not in _read_pyproject(pyproject).get("tool", {}).get("flwr", {}):
        raise ConfigError(f"'{pyproject}' has no [tool.flwr.app] table: not a Flower app")
    return app_dir


def _read_pyproject(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read '{path}': {err}") from None


def app_defaults(app_dir: Path) -> dict[str, Scalar]:
    """``[tool.flwr.app.config]`` flattened the way Flower flattens it (dotted keys)."""
    data = _read_pyproject(app_dir / "pyproject.toml")
    table = data.get("tool", {}).get("flwr", {}).get("app", {}).get("config", {})
    return _flatten(table)


# ---------------------------------------------------------------------------- run config


def parse_assignment(text: str) -> tuple[str, Scalar]:
    """``KEY=VALUE`` from ``--set``: VALUE is read as a TOML value, else as a plain string.

    So ``rounds=5`` is an int, ``amp=true`` a bool, ``learning-rate=1e-3`` a float, and both
    ``algorithm=fedprox`` and ``algorithm="fedprox"`` are the string ``fedprox``.
    """
    key, sep, raw = text.partition("=")
    key, raw = key.strip(), raw.strip()
    if not sep or not key:
        raise ConfigError(f"--set expects KEY=VALUE, got {text!r}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    if not isinstance(value, bool | int | float | str):
        raise ConfigError(f"--set {key}: only a number, true/false or a string is allowed")
    return key, value


def _coerce(value: Any, default: Any) -> Any:
    """Match the default's type where that is lossless (``--set run-name=42`` is a string)."""
    if isinstance(default, str) and isinstance(value, bool | int | float):
        return str(value).lower() if isinstance(value, bool) else str(value)
    if isinstance(default, float) and not isinstance(default, bool) and type(value) is int:
        return float(value)
    return value


def merge_run_config(
    defaults: Mapping[str, Scalar],
    file_values: Mapping[str, Any] | None = None,
    assignments: Sequence[str] = (),
) -> dict[str, Scalar]:
    """Defaults, then the file, then ``--set`` (later wins). Keys are checked by validation."""
    merged: dict[str, Any] = dict(defaults)
    for key, value in (file_values or {}).items():
        merged[key] = _coerce(value, defaults.get(key))
    for text in assignments:
        key, value = parse_assignment(text)
        merged[key] = _coerce(value, defaults.get(key))
    return merged


def check_keys_known(flat: Mapping[str, Any], defaults: Mapping[str, Any]) -> None:
    """Flower refuses run-config keys missing from ``[tool.flwr.app.config]``; say it early."""
    unknown = sorted(set(flat) - set(defaults))
    if unknown:
        raise ConfigError(
            f"run config: key(s) {', '.join(unknown)} are not in [tool.flwr.app.config] of "
            "pyproject.toml; Flower only accepts keys declared there"
        )


def resolve_run_config(
    app_dir: Path | None, run_config: Path | None, assignments: Sequence[str]
) -> tuple[Path, dict[str, Scalar], RunConfig]:
    """The app project, the merged flat run config and its validated form.

    Defaults from the app's ``pyproject.toml`` < the ``--run-config`` file < ``--set``; what
    ``fedclinic local`` and ``fedclinic submit`` both check before anything starts.
    """
    file_values = load_toml(run_config, "run config") if run_config else None
    return resolve_run_values(app_dir, file_values, assignments)


def resolve_run_values(
    app_dir: Path | None, file_values: Mapping[str, Any] | None, assignments: Sequence[str]
) -> tuple[Path, dict[str, Scalar], RunConfig]:
    """:func:`resolve_run_config` for values already read (a run's ``config.json``)."""
    app = find_app_dir(app_dir)
    defaults = app_defaults(app)
    merged = merge_run_config(defaults, file_values, assignments)
    run = load_run_config(merged)  # the ServerApp's own check, algorithm checks included
    check_keys_known(merged, defaults)
    return app, merged, run


# ---------------------------------------------------------------------------- hospitals


def hospital_name(index: int) -> str:
    """``hospital-a`` ... ``hospital-z``, then ``hospital-aa``, ``hospital-ab``, ..."""
    letters = string.ascii_lowercase
    suffix = ""
    index += 1
    while index:
        index, rest = divmod(index - 1, 26)
        suffix = letters[rest] + suffix
    return f"hospital-{suffix}"


def synthetic_hospitals(count: int, state_root: Path, data_seed: int = 0) -> list[HospitalSpec]:
    """``count`` synthetic hospitals: sizes halve (900, 450, 220, ...), scanners drift apart.

    Unequal sizes and acquisition shifts make the demo federation non-IID the way real
    consortia are (one large centre, smaller community hospitals with other scanners).
    Each config names ``data-source = "synthetic"`` itself, like every hospital config.
    """
    if not 1 <= count <= MAX_HOSPITALS:
        raise ConfigError(f"--hospitals = {count} is not allowed: expected 1..{MAX_HOSPITALS}")
    specs = []
    for i in range(count):
        name = hospital_name(i)
        samples = max(MIN_SAMPLES, round(BASE_SAMPLES * 0.5**i / 10.0) * 10)
        shift = 0.0 if count == 1 else round(MAX_SHIFT * i / (count - 1), 3)
        flat: dict[str, Scalar] = {
            "hospital": name,
            "data-source": "synthetic",
            "num-samples": samples,
            "acquisition-shift": shift,
            "data-seed": data_seed + i,
            "partition-id": i,
            "num-partitions": count,
            "device": "auto",
            "state-dir": str((state_root / name).resolve()),
        }
        specs.append(HospitalSpec(parse_hospital_config(flat), flat))
    return specs


def load_hospital_files(paths: Sequence[Path]) -> list[HospitalSpec]:
    """Validate the operator's hospital TOML files; names must be unique."""
    specs = []
    for path in paths:
        flat = load_toml(path, "hospital config")
        try:
            config = parse_hospital_config(flat)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None
        if config.hospital.startswith("."):
            raise ConfigError(
                f"{path}: hospital config: key 'hospital' = {config.hospital!r} is not allowed: "
                "it names files and directories, so it must not start with '.'"
            )
        bad = [k for k, v in flat.items() if not isinstance(v, bool | int | float | str)]
        if bad:
            raise ConfigError(
                f"{path}: hospital config: key '{bad[0]}' must be a number, true/false or a string"
            )
        specs.append(HospitalSpec(config, dict(flat), Path(path).resolve()))
    names = [s.name for s in specs]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"hospital names must be unique; repeated: {', '.join(repeated)}")
    return specs


# ---------------------------------------------------------------------------- TOML


def dump_flat_toml(flat: Mapping[str, Scalar]) -> str:
    """A flat map as TOML; dotted keys are quoted, so they stay one key (``"fedprox.mu"``).

    Flower flattens nested tables with dots, so ``"fedprox.proximal-mu" = 0.01`` and a
    ``[fedprox]`` table holding ``proximal-mu`` mean the same run-config key.
    """
    return tomli_w.dumps(dict(flat))


def write_flat_toml(path: Path, flat: Mapping[str, Scalar]) -> Path:
    """Write ``flat`` as TOML (parent folders created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dump_flat_toml(flat), encoding="utf-8")
    return path
