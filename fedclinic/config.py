"""The two config schemas: one for a run (coordinator side), one for a hospital node.

Flower hands both sides flat key/value maps (``context.run_config``, ``context.node_config``)
with kebab-case keys. They are validated here, once, at the edge: a wrong key or value
becomes one :class:`~fedclinic.errors.ConfigError` line naming the key, the value and what
is allowed. Algorithm options live in the run config under ``<algorithm>.<key>`` and are
validated by the options model that each algorithm module declares.
"""

from __future__ import annotations

import difflib
import math
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from fedclinic.errors import ConfigError
from fedclinic.tasks import check_model_fits_task, check_selection_metric, selection_metric

Scalar = bool | int | float | str

WireDtype = Literal["float32", "float16", "bfloat16"]
#: the wire precisions a run may choose (``wire-dtype``; fedclinic.serialization narrows to them)
WIRE_DTYPES: tuple[WireDtype, ...] = ("float32", "float16", "bfloat16")


def _kebab(name: str) -> str:
    return name.replace("_", "-")


class Schema(BaseModel):
    """Base for every config model: kebab-case keys, unknown keys refused, frozen.

    Strict types (``rounds = true`` is not a number, ``seed = 1.5`` not an integer; an
    integer is still a valid float) and finite floats only: ``nan``/``inf`` pass every
    bound check pydantic would otherwise apply, so they are refused for every float key.
    """

    model_config = ConfigDict(
        extra="forbid",
        alias_generator=_kebab,
        populate_by_name=True,
        frozen=True,
        strict=True,
        allow_inf_nan=False,
    )

    def to_flat(self) -> dict[str, Scalar]:
        """The flat kebab-case map Flower understands (the inverse of validation)."""
        return self.model_dump(by_alias=True)


class NoOptions(Schema):
    """Options model of an algorithm that has none."""


def describe_validation_error(
    scope: str,
    model: type[BaseModel],
    err: ValidationError,
    data: Mapping[str, Any],
    key_prefix: str = "",
) -> str:
    """One line per error naming the key, the value given and what is allowed."""
    allowed = sorted(
        key_prefix + str(f.alias or name) for name, f in model.model_fields.items() if not f.exclude
    )
    lines = []
    for item in err.errors():
        raw_key = ".".join(str(p) for p in item["loc"])
        key = key_prefix + raw_key if raw_key else "<config>"
        if item["type"] == "extra_forbidden":
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            lines.append(f"{scope}: unknown key '{key}'{hint}; allowed keys: {', '.join(allowed)}")
        elif item["type"] == "missing":
            lines.append(f"{scope}: key '{key}' is required but missing")
        else:
            value = data.get(raw_key, item.get("input"))
            message = item["msg"].removeprefix("Value error, ")
            if isinstance(value, bool) and item["type"] in ("int_type", "float_type"):
                message = "expected a number, not true/false"
            shown = str(value).lower() if isinstance(value, bool) else repr(value)
            lines.append(f"{scope}: key '{key}' = {shown} is not allowed: {message}")
    return "; ".join(lines)


def validate_schema(
    model: type[Schema], data: Mapping[str, Any], scope: str, key_prefix: str = ""
) -> Any:
    """Validate ``data`` into ``model`` or raise a one-line :class:`ConfigError`."""
    try:
        return model.model_validate(dict(data))
    except ValidationError as err:
        message = describe_validation_error(scope, model, err, data, key_prefix)
        raise ConfigError(message) from None


Algorithm = str
#: Where a hospital's data comes from (``fedclinic.data`` has one loader per name).
DATA_SOURCES = (
    "synthetic", "medmnist", "heart-disease", "image-folder", "segmentation-folder", "dicom"
)  # fmt: skip


def check_data_source(value: str) -> str:
    """A known data source name (``did you mean`` for a typo such as ``synthetc``)."""
    if value in DATA_SOURCES:
        return value
    close = difflib.get_close_matches(value, DATA_SOURCES, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise ValueError(f"expected one of {', '.join(DATA_SOURCES)}{hint}")


#: the most histogram bins a statistics request may ask for (a hospital refuses more)
STATS_MAX_BINS = 200
ModelName = Literal["logreg", "cnn", "resnet18", "resnet101", "densenet121", "unet", "unet-large"]


class RunConfig(Schema):
    """Everything the coordinator needs to drive one federated run."""

    algorithm: Algorithm = "fedavg"
    task: Literal["classification", "segmentation"] = "classification"
    model: ModelName = "cnn"
    num_classes: int = Field(2, ge=2, le=1000)
    in_channels: int = Field(1, ge=1, le=16)
    image_size: int = Field(28, ge=8, le=1024)
    num_features: int = Field(13, ge=1)
    data_source: str = Field(
        "synthetic",
        description="only what 'fedclinic local --hospitals N' writes into the hospital "
        "configs it generates (synthetic: generated hospitals have no data-path); a hospital "
        "reads the source its own config names, never this key",
    )
    rounds: int = Field(3, ge=1, le=10_000)
    local_epochs: int = Field(1, ge=1, le=1000)
    local_steps: int = Field(0, ge=0, description="batches per round; 0 means local-epochs")
    batch_size: int = Field(32, ge=1, le=65_536)
    optimizer: Literal["sgd", "adam", "adamw"] = "adam"
    learning_rate: float = Field(0.001, gt=0, le=10)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    amp: bool = False
    min_hospitals: int = Field(2, ge=1)
    round_timeout: float = Field(600.0, gt=0, description="seconds a round waits for replies")
    max_update_norm_ratio: float = Field(
        10.0, ge=0, description="refuse updates this many times the round's median norm; 0 = off"
    )
    seed: int = Field(42, ge=0)
    selection_metric: str = Field(
        "auto", description="validation metric; auto = the task's (fedclinic.tasks)"
    )
    output_dir: str = ""
    run_name: str = Field("", pattern=r"^[A-Za-z0-9_.-]*$")
    resume: bool = Field(
        False, description="go on from the checkpoint in output-dir (fedclinic.checkpoint)"
    )
    run_kind: Literal["train", "stats"] = Field(
        "train",
        description="train: a federated training run; stats: federated statistics "
        "of the hospitals' data (fedclinic.stats, docs/statistics.md)",
    )
    normalisation: Literal["site", "federated"] = Field(
        "site",
        description="site: each data source's own preprocessing (Heart: the centre's "
        "train statistics); federated: pooled train mean/std from a statistics exchange "
        "before round 1 (docs/statistics.md)",
    )
    stats_bins: int = Field(20, ge=1, le=STATS_MAX_BINS, description="histogram bins (stats)")
    stats_features: str = Field(
        "", description="comma-separated features/channels to describe (stats); empty = all"
    )
    dp: Literal["off", "dp-sgd"] = Field(
        "off",
        description="dp-sgd: sample-level differential privacy of every training step "
        "on private data (Opacus; docs/privacy.md); each hospital's own budget applies",
    )
    dp_noise_multiplier: float = Field(
        1.0, gt=0, le=100, description="DP-SGD: noise std as a multiple of dp-max-grad-norm"
    )
    dp_max_grad_norm: float = Field(
        1.0, gt=0, le=1e4, description="DP-SGD: each sample's gradient is clipped to this norm"
    )
    dp_prior_noise: float = Field(
        10.0,
        gt=0,
        le=1e4,
        description="DP: std of the Gaussian noise added once per run to "
        "each training class count that the balanced-softmax loss (local-loss = bsm) reads, "
        "charged to each hospital's ledger (docs/privacy.md, section 6)",
    )
    privacy_fix_model: bool = Field(
        False,
        description="DP-SGD: replace the model's BatchNorm layers by GroupNorm (Opacus "
        "ModuleValidator.fix); without it a model with BatchNorm is refused under dp",
    )
    secure_aggregation: bool = Field(
        False,
        description="SecAgg+: the coordinator learns only the sum of the hospitals' "
        "clipped, quantised updates (fedclinic.secagg; docs/privacy.md); FedAvg, FedProx, FedHelp",
    )
    secagg_num_shares: int = Field(
        0,
        ge=0,
        le=512,
        description="SecAgg+: hospitals (itself included) each hospital "
        "shares its secrets with and masks against; 0 = every hospital of the round",
    )
    secagg_reconstruction_threshold: int = Field(
        0,
        ge=0,
        le=512,
        description="SecAgg+: shares needed to recover a hospital's secret; "
        "a round unmasks only if this many of each one's neighbours answer; 0 = a majority "
        "of the shares (at least 2)",
    )
    secagg_clipping_range: float = Field(
        8.0,
        gt=0,
        le=1e6,
        description="SecAgg+: each entry of a hospital's update (local "
        "model - global model) is clipped to [-range, range] before quantisation",
    )
    secagg_quantization_range: int = Field(
        2**22,
        ge=2**8,
        le=2**30,
        description="SecAgg+: the clipped range is quantised "
        "onto 0..this (stochastic rounding); the error per entry is below 2 x range / this",
    )
    wire_dtype: WireDtype = Field(
        "float32",
        description="precision of the float32 weights and updates on the wire, "
        "both ways; received values are widened to float32 before any maths "
        "(docs/architecture.md#wire-precision)",
    )

    # Filled by parse_run_config from the "<algorithm>.<key>" entries.
    options: dict[str, Any] = Field(default_factory=dict, exclude=True)

    @field_validator("data_source")
    @classmethod
    def _source(cls, value: str) -> str:
        return check_data_source(value)

    @field_validator("selection_metric")
    @classmethod
    def _selection_fits_task(cls, value: str, info: ValidationInfo) -> str:
        return check_selection_metric(info.data.get("task", "classification"), value)

    @model_validator(mode="after")
    def _resume_names_its_run(self) -> RunConfig:
        if self.resume and not self.output_dir:
            raise ConfigError(
                "run config: resume = true needs output-dir: the directory of the run to "
                "resume, where its checkpoint.pkl is"
            )
        return self

    @model_validator(mode="after")
    def _stats_run_has_no_rounds_to_resume(self) -> RunConfig:
        if self.resume and self.run_kind == "stats":
            raise ConfigError(
                "run config: resume = true is not allowed with run-kind = 'stats': a statistics "
                "run has no rounds to resume; start it again"
            )
        return self

    @model_validator(mode="after")
    def _model_fits_task(self) -> RunConfig:
        # a ConfigError passes through pydantic unchanged
        check_model_fits_task(self.task, self.model, self.image_size)
        return self

    @model_validator(mode="after")
    def _dp_without_amp(self) -> RunConfig:
        if self.dp != "off" and self.amp:
            raise ConfigError(
                "run config: amp = true is not allowed with dp = 'dp-sgd': Opacus's per-sample "
                "gradients are computed in full precision (set amp = false)"
            )
        return self

    @model_validator(mode="after")
    def _secagg_shares(self) -> RunConfig:
        shares, threshold = self.secagg_num_shares, self.secagg_reconstruction_threshold
        if shares in (1, 2):
            raise ConfigError(
                f"run config: key 'secagg-num-shares' = {shares} is not allowed: expected 0 "
                "(every hospital of the round) or at least 3"
            )
        if threshold == 1:
            raise ConfigError(
                "run config: key 'secagg-reconstruction-threshold' = 1 is not allowed: one "
                "share would reveal a hospital's secret; expected 0 (a majority) or at least 2"
            )
        if shares and threshold > shares:
            raise ConfigError(
                f"run config: key 'secagg-reconstruction-threshold' = {threshold} is not "
                f"allowed with secagg-num-shares = {shares}: a secret cannot need more shares "
                "than there are"
            )
        return self

    @model_validator(mode="after")
    def _secagg_at_full_precision(self) -> RunConfig:
        if self.secure_aggregation and self.wire_dtype != "float32":
            raise ConfigError(
                f"run config: wire-dtype = '{self.wire_dtype}' is not allowed with "
                "secure-aggregation = true: the masked uploads are integer vectors of their own "
                "(docs/privacy.md, section 7); set wire-dtype = 'float32'"
            )
        return self

    @property
    def selection_key(self) -> str:
        """The metric models are selected on, ``auto`` resolved for the run's task."""
        return selection_metric(self)

    def algorithm_options(self) -> Any:
        """The validated options model of the selected algorithm."""
        return self.options[self.algorithm]

    def to_flat(self) -> dict[str, Scalar]:
        flat: dict[str, Scalar] = self.model_dump(by_alias=True)
        for name, opts in self.options.items():
            flat.update({f"{name}.{k}": v for k, v in opts.to_flat().items()})
        return flat


def parse_run_config(
    flat: Mapping[str, Any], option_models: Mapping[str, type[Schema]]
) -> RunConfig:
    """Validate Flower's flat run config, including every algorithm's options section."""
    core: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {name: {} for name in option_models}
    for key, value in flat.items():
        prefix, dot, rest = key.partition(".")
        if not dot:
            core[key] = value
        elif prefix in sections:
            sections[prefix][rest] = value
        else:
            close = difflib.get_close_matches(prefix, list(sections), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(
                f"run config: unknown section '{prefix}' in key '{key}'{hint}; "
                f"allowed sections: {', '.join(sorted(sections))}"
            )
    run: RunConfig = validate_schema(RunConfig, core, "run config")
    if run.algorithm not in option_models:
        raise ConfigError(
            f"run config: key 'algorithm' = {run.algorithm!r} is not allowed: "
            f"expected one of {', '.join(sorted(option_models))}"
        )
    options = {
        name: validate_schema(model, sections[name], "run config", f"{name}.")
        for name, model in option_models.items()
    }
    return run.model_copy(update={"options": options})


DeviceName = str
#: what a DICOM label sheet may be keyed by (the column of that name holds the value)
DICOM_LABEL_KEYS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "AccessionNumber")


class HospitalConfig(Schema):
    """One hospital node: who it is, where its data is, which device it trains on."""

    hospital: str = Field(..., pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    #: required at the edge (:func:`parse_hospital_config`): no default for where patient
    #: data comes from; empty only in configs built in code that never load data
    data_source: str = ""
    data_path: str = ""
    partition_id: int = Field(0, ge=0)
    num_partitions: int = Field(1, ge=1)
    partition_fractions: str = ""
    label_skew_alpha: float = Field(0.0, ge=0, description="Dirichlet alpha; 0 = no label skew")
    num_samples: int = Field(600, ge=10, le=1_000_000)
    class_priors: str = ""
    acquisition_shift: float = Field(0.0, ge=0, le=1)
    data_seed: int = Field(0, ge=0)
    val_fraction: float = Field(-1.0, ge=-1, lt=0.9, description="-1 = the source's default")
    device: DeviceName = "auto"
    state_dir: str = ""
    data_cache: Literal["stat", "hash", "off"] = Field(
        "stat",
        description="decoded images kept in <state-dir>/data-cache (image-folder, "
        "segmentation-folder, dicom): a file is decoded again when its size or modification "
        "time changed (stat) or also its bytes (hash: every file read each load); off = none",
    )
    role: Literal["", "large", "small"] = ""
    prior_path: str = Field("", description="Fed-MAS: this site's copy of the shared prior file")
    public_data_path: str = Field("", description="FedHelp: this site's copy of the public data")
    knowledge_path: str = Field("", description="FedHelp: this site's copy of the knowledge file")
    stats_min_count: int = Field(
        5,
        ge=1,
        description="statistics: smallest count this hospital discloses; smaller "
        "cells are sent as '<N' (set here only: no request can lower it)",
    )
    stats_allow_extremes: bool = Field(
        False, description="statistics: whether this hospital discloses per-feature min/max"
    )
    # differential privacy (docs/privacy.md): set here only, no run config can change them
    privacy_epsilon: float = Field(
        0.0,
        ge=0,
        description="DP ceiling: the most epsilon this hospital spends on one data "
        "set, summed over every run (its privacy ledger); 0 = no ceiling",
    )
    privacy_delta: float = Field(
        1e-5, gt=0, lt=1, description="DP: the delta epsilon is computed at (ledger, ceiling)"
    )
    privacy_required: bool = Field(
        False, description="refuse to train in a run without dp = 'dp-sgd'"
    )
    # data-source = "dicom" only (fedclinic.data.dicom, docs/data.md); relative paths are
    # taken relative to data-path
    dicom_label_sheet: str = Field(
        "labels.csv", description="classification: the CSV label sheet (relative: in data-path)"
    )
    dicom_label_key: Literal[DICOM_LABEL_KEYS] = Field(  # type: ignore[valid-type]
        "StudyInstanceUID", description="the header the label sheet is keyed by"
    )
    dicom_modality: str = Field(
        "", description="keep only these modalities, e.g. 'CR,DX'; empty = any, but only one"
    )
    dicom_series_description: str = Field(
        "", description="keep only series whose SeriesDescription matches (regex, any case)"
    )
    dicom_series: Literal["all", "largest"] = Field(
        "all", description="per study: every selected series, or only the one with most images"
    )
    dicom_frame: Literal["middle", "first"] = Field(
        "middle", description="the one frame taken from a multi-frame instance"
    )
    dicom_window: str = Field(
        "file", description="file (the file's VOI window/LUT), minmax, or 'center,width'"
    )
    dicom_mixed_sizes: bool = Field(
        False, description="allow images of different sizes (each resized to image-size)"
    )
    dicom_masks: str = Field(
        "", description="segmentation: '' = DICOM SEG in data-path, else a folder of masks"
    )
    dicom_exclude: str = Field(
        "", description="comma-separated globs of files in data-path that are not read"
    )

    @field_validator("dicom_modality")
    @classmethod
    def _modalities(cls, value: str) -> str:
        if value and not re.fullmatch(r"[A-Z0-9]{2,16}(,[A-Z0-9]{2,16})*", value):
            raise ValueError("expected modality codes in capitals, comma-separated, e.g. 'CR,DX'")
        return value

    @field_validator("dicom_series_description")
    @classmethod
    def _regex(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as err:
            raise ValueError(f"not a regular expression ({err})") from None
        return value

    @field_validator("dicom_window")
    @classmethod
    def _window(cls, value: str) -> str:
        if value in ("file", "minmax"):
            return value
        try:
            center, width = (float(v) for v in value.split(","))
        except ValueError:
            raise ValueError("expected file, minmax or 'center,width', e.g. '40,400'") from None
        if not (math.isfinite(center) and math.isfinite(width) and width >= 1):
            raise ValueError("expected a finite window center and a width >= 1")
        return value

    @field_validator("data_source")
    @classmethod
    def _source(cls, value: str) -> str:
        return value if value == "" else check_data_source(value)

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value in ("auto", "cpu", "cuda", "mps") or (
            value.startswith("cuda:") and value[5:].isdigit()
        ):
            return value
        raise ValueError("expected auto, cpu, cuda, cuda:N or mps")

    @field_validator("partition_fractions", "class_priors")
    @classmethod
    def _float_list(cls, value: str) -> str:
        if value == "":
            return value
        try:
            numbers = [float(v) for v in value.split(",")]
        except ValueError:
            raise ValueError("expected comma-separated numbers, e.g. '0.5,0.3,0.2'") from None
        if any(n <= 0 for n in numbers) or abs(sum(numbers) - 1.0) > 1e-6:
            raise ValueError("expected positive numbers that sum to 1")
        return value

    @staticmethod
    def floats(value: str) -> list[float]:
        return [float(v) for v in value.split(",")] if value else []


def parse_hospital_config(flat: Mapping[str, Any]) -> HospitalConfig:
    """Validate a SuperNode's node config into a :class:`HospitalConfig`.

    ``data-source`` is required: a hospital trains on what its own config names, never on
    a default (a missing key once meant built-in synthetic images with good-looking metrics).
    """
    config: HospitalConfig = validate_schema(HospitalConfig, flat, "hospital config")
    if not config.data_source:
        raise ConfigError(
            "hospital config: key 'data-source' is required but missing: name where this "
            f"hospital's data comes from, one of {', '.join(DATA_SOURCES)} (there is no "
            "default; 'synthetic' means built-in generated images, no patient data)"
        )
    if config.partition_id >= config.num_partitions:
        raise ConfigError(
            f"hospital config: key 'partition-id' = {config.partition_id} is not allowed: "
            f"expected 0..{config.num_partitions - 1} (num-partitions = {config.num_partitions})"
        )
    dicom_keys = sorted(k for k in config.model_fields_set if k.startswith("dicom_"))
    if dicom_keys and config.data_source != "dicom":
        raise ConfigError(
            f"hospital config: key '{_kebab(dicom_keys[0])}' is not allowed with data-source = "
            f"{config.data_source!r}: the dicom-* keys apply to data-source = 'dicom' only"
        )
    fractions = config.floats(config.partition_fractions)
    if fractions and len(fractions) != config.num_partitions:
        raise ConfigError(
            f"hospital config: key 'partition-fractions' = {config.partition_fractions!r} "
            f"is not allowed: expected {config.num_partitions} numbers (one per partition)"
        )
    return config


def load_toml(path: str | Path, what: str) -> dict[str, Any]:
    """Read a flat (or dotted) TOML config file, with a clear error when it is bad."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{what} file '{file}' does not exist")
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{what} file '{file}' is not valid TOML: {err}") from None
    return _flatten(data)


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{full}."))
        else:
            flat[full] = value
    return flat
