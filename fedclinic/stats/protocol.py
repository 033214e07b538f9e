"""What travels in a statistics exchange: the coordinator's request, the hospital's answer,
and the pooled statistics a federated-normalisation run sends in every message.

Request and answer travel as JSON strings in the messages' config records
(:data:`fedclinic.messages.STATS_REQUEST`, :data:`fedclinic.messages.STATS`) and are
validated on arrival: a hospital refuses a bad request with one line (unknown feature,
bins outside 1..:data:`~fedclinic.config.STATS_MAX_BINS`, non-finite or reversed range), and
the coordinator refuses a malformed answer.

A count is a :data:`Cell`: an integer, or a marker when it is not disclosed: ``"<5"`` (below
the hospital's minimum cell size, here 5), ``"hidden"`` (large enough, withheld so that a
``"<5"`` cell cannot be worked out from a released total), ``"withheld"`` (a whole table
that could not be protected otherwise). docs/statistics.md gives the rules.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from fedclinic import messages as keys
from fedclinic.config import STATS_MAX_BINS, RunConfig
from fedclinic.data.base import Normalisation, Standardise
from fedclinic.errors import ConfigError, FedClinicError

SplitName = Literal["train", "val", "test"]
SPLITS: tuple[SplitName, ...] = ("train", "val", "test")
HIDDEN = "hidden"
WITHHELD = "withheld"
_MARKER = re.compile(r"^(<\d+|hidden|withheld)$")


def below(k: int) -> str:
    """The marker of a count under the minimum cell size ``k``."""
    return f"<{k}"


def _cell(value: int | str) -> int | str:
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"a count cannot be negative ({value})")
        return value
    if isinstance(value, str) and _MARKER.match(value):
        return value
    raise ValueError(f"expected a count or '<N', 'hidden', 'withheld'; got {value!r}")


#: a disclosed count, or why it is not disclosed
Cell = Annotated[int | str, AfterValidator(_cell)]


def released(cell: Cell) -> int | None:
    """The count, or ``None`` when it was not disclosed."""
    return cell if isinstance(cell, int) else None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# ------------------------------------------------------------------------------ request


class HistogramSpec(_Strict):
    """Equal-width bins over ``[low, high]``, plus one cell below and one above the range."""

    low: float
    high: float
    bins: int

    @field_validator("bins")
    @classmethod
    def _bins(cls, value: int) -> int:
        if not 1 <= value <= STATS_MAX_BINS:
            raise ValueError(f"bins = {value} is not allowed: expected 1..{STATS_MAX_BINS}")
        return value

    @model_validator(mode="after")
    def _range(self) -> HistogramSpec:
        if not self.high > self.low:
            raise ValueError(f"range [{self.low:g}, {self.high:g}] is empty: expected low < high")
        return self

    def edges(self) -> list[float]:
        step = (self.high - self.low) / self.bins
        return [self.low + i * step for i in range(self.bins)] + [self.high]


class StatsRequest(_Strict):
    """One statistics exchange: which splits and variables, moments and/or histograms."""

    splits: tuple[SplitName, ...] = SPLITS
    #: features (tabular) or ``channel-<c>`` / ``stored-height`` / ``stored-width`` (images);
    #: empty: every variable the hospital has
    variables: tuple[str, ...] = ()
    #: only the model's inputs (features or channels), in the model's input order
    inputs_only: bool = False
    #: per-variable count, sum and sum of squares (min/max where the hospital allows)
    moments: bool = True
    histograms: dict[str, HistogramSpec] = Field(default_factory=dict)

    @field_validator("splits")
    @classmethod
    def _splits(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value or len(set(value)) != len(value):
            raise ValueError("expected one or more of train, val, test, each once")
        return value

    def to_json(self) -> str:
        return self.model_dump_json()

    def summary(self) -> str:
        """One line for the hospital's log: what was asked."""
        asked = ", ".join(self.variables) if self.variables else "all variables"
        parts = [f"splits {', '.join(self.splits)}", "inputs only" if self.inputs_only else asked]
        if self.moments:
            parts.append("count/sum/sum of squares")
        if self.histograms:
            bins = sorted({h.bins for h in self.histograms.values()})
            parts.append(f"histograms of {len(self.histograms)} ({'/'.join(map(str, bins))} bins)")
        return "; ".join(parts)


def parse_request(text: str) -> StatsRequest:
    """The coordinator's request, or a one-line :class:`ConfigError` naming what is wrong."""
    try:
        data = json.loads(text)  # accepts NaN/Infinity, which validation then refuses by name
    except (TypeError, ValueError) as err:
        raise ConfigError(f"statistics request: not JSON ({err})") from None
    if not isinstance(data, Mapping):
        raise ConfigError("statistics request: expected a JSON object")
    try:
        return StatsRequest.model_validate(data)
    except ValidationError as err:
        raise ConfigError("statistics request: " + _problems(err)) from None


def _problems(err: ValidationError) -> str:
    lines = []
    for item in err.errors():
        where = ".".join(str(p) for p in item["loc"]) or "<request>"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "finite_number":
            message = f"{item.get('input')!r} is not a finite number"
        lines.append(f"{where}: {message}")
    return "; ".join(lines)


# ------------------------------------------------------------------------------ answer


class VariableAnswer(_Strict):
    """One variable over one split. ``count``: values (cases x values per case); ``sum`` and
    ``sum_sq`` in float64, ``None`` when withheld (``withheld`` says why)."""

    count: Cell
    sum: float | None = None
    sum_sq: float | None = None
    min: float | None = None
    max: float | None = None
    withheld: str = ""


class HistogramAnswer(_Strict):
    """``counts``: below ``low``, the ``bins`` bins, above ``high`` (``bins + 2`` cells)."""

    low: float
    high: float
    bins: int
    counts: list[Cell]

    @model_validator(mode="after")
    def _length(self) -> HistogramAnswer:
        if len(self.counts) != self.bins + 2:
            raise ValueError(f"{len(self.counts)} cells for {self.bins} bins; expected bins + 2")
        return self


class ForegroundAnswer(_Strict):
    """Segmentation masks: images with and without foreground (a partition of the split),
    and the foreground's share of the pixels (``None`` when withheld)."""

    images: list[Cell]
    pixels: float | None = None
    foreground_pixels: float | None = None


class SplitAnswer(_Strict):
    cases: Cell
    #: per class: cases (classification) or images showing the class (segmentation)
    classes: list[Cell]
    variables: dict[str, VariableAnswer] = Field(default_factory=dict)
    histograms: dict[str, HistogramAnswer] = Field(default_factory=dict)
    foreground: ForegroundAnswer | None = None


class SiteAnswer(_Strict):
    """A hospital's answer: what it applied (minimum cell size, extremes) and per split."""

    hospital: str
    kind: Literal["tabular", "image"]
    task: str
    min_count: int = Field(ge=1)
    extremes: bool
    #: the model's input variables, in input order
    inputs: list[str]
    #: the loaded sample shape (``[F]`` or ``[C, H, W]``)
    shape: list[int]
    splits: dict[SplitName, SplitAnswer]


def parse_answer(text: object) -> SiteAnswer:
    """A hospital's answer, or a one-line :class:`FedClinicError`."""
    if not isinstance(text, str):
        raise FedClinicError("the reply carries no statistics")
    try:
        return SiteAnswer.model_validate_json(text)
    except ValidationError as err:
        raise FedClinicError(f"malformed statistics: {_problems(err)}") from None


# ------------------------------------------------------------------------------ normalisation


def normalisation_config(mean: list[float], std: list[float]) -> dict[str, list[float]]:
    """The config entries a federated-normalisation run sends in every message."""
    return {keys.NORMALISATION_MEAN: list(mean), keys.NORMALISATION_STD: list(std)}


def normalisation_of(run: RunConfig, config: Mapping[str, Any]) -> Normalisation:
    """How this message's data is normalised: the source's own way (``site``), or the pooled
    statistics the coordinator sent (``federated``; refused when they are missing)."""
    if run.normalisation == "site":
        return "site"
    mean, std = config.get(keys.NORMALISATION_MEAN), config.get(keys.NORMALISATION_STD)
    if not isinstance(mean, list) or not isinstance(std, list):
        raise FedClinicError(
            "run config: normalisation = federated, but the message carries no pooled "
            f"statistics ({keys.NORMALISATION_MEAN}, {keys.NORMALISATION_STD})"
        )
    values = [float(v) for v in (*mean, *std)]
    if not all(math.isfinite(v) for v in values) or min((float(s) for s in std), default=1) <= 0:
        raise FedClinicError("the pooled statistics in the message are not finite positive stds")
    return Standardise(tuple(float(m) for m in mean), tuple(float(s) for s in std))
