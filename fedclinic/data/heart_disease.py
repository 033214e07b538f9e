"""UCI Heart Disease, one centre per hospital, with FLamby's exact Fed-Heart-Disease preprocessing.

Why: Fed-Heart-Disease is the standard cross-silo tabular benchmark (FLamby); results are
comparable with the published numbers only if the data are prepared exactly the same way.

What (``data-path`` = one ``processed.<centre>.data`` file, centre = cleveland, hungarian,
switzerland or va), following ``flamby/datasets/fed_heart_disease/dataset.py``:

1. read the 14 headerless comma-separated columns; ``?`` is a missing value;
2. drop columns 10, 11, 12 (slope, ca, thal), then every row with a missing value
   (303 / 261 / 46 / 130 rows remain);
3. split the centre with ``train_test_split(np.arange(n), train_size=0.66, test_size=0.34,
   random_state=43, shuffle=True)``, stratified on the binarised label only when there are
   two classes with more than 2 samples each (so Switzerland is not stratified):
   199/104, 172/89, 30/16 and 85/45 rows;
4. one-hot ``cp`` into cp==2,3,4 and ``restecg`` into restecg==1,2 (FLamby's
   ``get_dummies(drop_first=True)`` over all centres gives the same columns), so the 13
   features are: age, sex, trestbps, chol, fbs, thalach, exang, oldpeak, cp_2, cp_3, cp_4,
   restecg_1, restecg_2; a ``cp`` outside 1..4 or ``restecg`` outside 0..2 is refused;
5. label = ``num > 0`` (``num`` is the UCI diagnosis 0..4; any other value is refused);
6. z-score with the centre's train mean and unbiased std (float32, as torch computes it):
   ``(x - mean) / (std + 1e-9)``. :func:`load_pooled` uses the pooled train statistics instead
   (FLamby's pooled mode). With ``normalisation = federated`` (or ``raw``, for statistics)
   the features stay raw here and every split is z-scored with the federation's pooled
   train statistics (:class:`~fedclinic.data.base.Standardise`, docs/statistics.md).

Validation: FLamby has none, so this source's default ``val-fraction`` is 0 (empty val split,
train keeps FLamby's sizes). With ``val-fraction`` > 0 the validation rows are carved out of
the train split (stratified, seeded by ``data-seed``) and the normalisation statistics come
from the remaining train rows: this departs from FLamby's train sizes, so results are then
not directly comparable with FLamby's table.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedclinic.config import HospitalConfig
from fedclinic.data.base import DataRequest, HospitalData, Split
from fedclinic.data.common import make_split, require_data_path, require_path, subset
from fedclinic.data.splits import resolve_val_fraction, stratified_split
from fedclinic.errors import ConfigError, DataError

COLUMNS = (
    "age", "sex", "cp", "trestbps", "chol", "fbs", "restecg",
    "thalach", "exang", "oldpeak", "slope", "ca", "thal", "num",
)  # fmt: skip
FEATURES = (
    "age", "sex", "trestbps", "chol", "fbs", "thalach", "exang", "oldpeak",
    "cp_2", "cp_3", "cp_4", "restecg_1", "restecg_2",
)  # fmt: skip
CENTRES = {"cleveland": 0, "hungarian": 1, "switzerland": 2, "va": 3}
DROPPED = (10, 11, 12)  # slope, ca, thal
KEPT = (0, 1, 3, 4, 5, 7, 8, 9)  # numeric features kept as they are
TRAIN_SIZE, TEST_SIZE, SPLIT_SEED = 0.66, 0.34, 43
EPS = 1e-9
NUM_VALUES = (0, 1, 2, 3, 4)  # the UCI diagnosis column; label = num > 0
WHAT = "a processed.<centre>.data file"
DEFAULT_VAL_FRACTION = 0.0


@dataclass(frozen=True)
class Centre:
    """One centre's rows after FLamby's cleaning: raw (not normalised) features and labels."""

    name: str
    path: Path
    features: np.ndarray  # (n, 13) float32, order FEATURES
    labels: np.ndarray  # (n,) int64, num > 0
    train: np.ndarray  # row indices of FLamby's train split
    test: np.ndarray  # row indices of FLamby's test split


def centre_name(path: Path) -> str:
    """``processed.<centre>.data`` -> centre, or a :class:`DataError`."""
    parts = path.name.split(".")
    if len(parts) != 3 or parts[0] != "processed" or parts[2] != "data" or parts[1] not in CENTRES:
        raise DataError(
            f"{path}: cannot tell the centre from the file name; expected "
            + ", ".join(f"processed.{c}.data" for c in CENTRES)
        )
    return parts[1]


def read_rows(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The file's rows as float64 ``(n, 14)`` (NaN for ``?``) and their line numbers.

    Blank lines are skipped (as pandas does); anything else that is not 14 numbers or ``?``
    is refused with the file and line number.
    """
    if not path.is_file():
        raise DataError(f"{path}: heart-disease file not found (hospital config 'data-path')")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot be read as text ({err})") from None
    rows: list[list[float]] = []
    numbers: list[int] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        cells = line.split(",")
        if len(cells) != len(COLUMNS):
            raise DataError(
                f"{path}:{number}: {len(cells)} comma-separated values; expected {len(COLUMNS)} "
                f"({', '.join(COLUMNS)})"
            )
        row = []
        for column, cell in zip(COLUMNS, cells, strict=True):
            row.append(_number(path, number, column, cell.strip()))
        rows.append(row)
        numbers.append(number)
    if not rows:
        raise DataError(f"{path}: the file has no rows")
    return np.asarray(rows, dtype=np.float64), np.asarray(numbers, dtype=np.int64)


def _number(path: Path, line: int, column: str, cell: str) -> float:
    if cell == "?":
        return math.nan
    try:
        value = float(cell)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise DataError(
            f"{path}:{line}: column '{column}' = {cell!r} is not a number "
            "(only '?' may mark a missing value)"
        )
    return value


def _encode(path: Path, rows: np.ndarray, line_numbers: np.ndarray) -> np.ndarray:
    """The 13 FLamby features from cleaned rows (cp and restecg one-hot, first level dropped)."""
    cp, restecg = rows[:, 2], rows[:, 6]
    for name, values, allowed in (("cp", cp, (1, 2, 3, 4)), ("restecg", restecg, (0, 1, 2))):
        bad = ~np.isin(values, allowed)
        if bad.any():
            first = int(np.flatnonzero(bad)[0])
            raise DataError(
                f"{path}:{line_numbers[first]}: column '{name}' = {values[first]:g}; expected "
                f"one of {', '.join(str(a) for a in allowed)}"
            )
    dummies = [cp == 2, cp == 3, cp == 4, restecg == 1, restecg == 2]
    return np.column_stack([rows[:, KEPT], *dummies]).astype(np.float32)


def flamby_split(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """FLamby's per-centre train/test row indices (stratified only where FLamby stratifies)."""
    # Imported here: the registry imports every source, and scikit-learn is slow to import.
    from sklearn.model_selection import train_test_split

    levels, counts = np.unique(labels, return_counts=True)
    stratify = labels if len(levels) > 1 and bool((counts > 2).all()) else None
    train, test = train_test_split(
        np.arange(len(labels)),
        train_size=TRAIN_SIZE,
        test_size=TEST_SIZE,
        random_state=SPLIT_SEED,
        shuffle=True,
        stratify=stratify,
    )
    # Sorted: FLamby keeps the rows in file order and only marks them train or test.
    return np.sort(train).astype(np.int64), np.sort(test).astype(np.int64)


def read_centre(path: Path) -> Centre:
    """Read and clean one centre's file and apply FLamby's split (features not normalised)."""
    name = centre_name(path)
    rows, line_numbers = read_rows(path)
    rows = np.delete(rows, DROPPED, axis=1)  # columns 0..9 keep their numbers, 10 = num
    complete = ~np.isnan(rows).any(axis=1)
    rows, line_numbers = rows[complete], line_numbers[complete]
    if len(rows) < 3:
        raise DataError(
            f"{path}: only {len(rows)} complete row(s) after dropping slope/ca/thal and rows "
            "with a missing value; expected at least 3"
        )
    features = _encode(path, rows, line_numbers)
    bad = ~np.isin(rows[:, 10], NUM_VALUES)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise DataError(
            f"{path}:{line_numbers[first]}: column 'num' = {rows[first, 10]:g}; expected the "
            "diagnosis 0, 1, 2, 3 or 4 (0 = no disease)"
        )
    labels = (rows[:, 10] > 0).astype(np.int64)
    train, test = flamby_split(labels)
    return Centre(name, path, features, labels, train, test)


def statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased std per feature (float32, as FLamby computes them with torch)."""
    return features.mean(dim=0), features.std(dim=0)


def normalise(split: Split, mean: torch.Tensor, std: torch.Tensor) -> Split:
    """FLamby's z-score: ``(x - mean) / (std + 1e-9)``."""
    return Split(((split.inputs - mean) / (std + EPS)).to(torch.float32), split.labels)


def check_files(hospital: HospitalConfig) -> None:
    """Pre-flight: a centre file, read and cleaned (a few hundred rows: fast)."""
    read_centre(require_path(hospital, "heart-disease", WHAT))


def check_run(request: DataRequest) -> None:
    run = request.run
    if run.model != "logreg":
        raise ConfigError(
            f"run config: key 'model' = {run.model!r} is not allowed with data source "
            "'heart-disease': expected 'logreg' (13 tabular features)"
        )
    if run.num_features != len(FEATURES):
        raise ConfigError(
            f"run config: key 'num-features' = {run.num_features} is not allowed with data "
            f"source 'heart-disease': expected {len(FEATURES)} ({', '.join(FEATURES)})"
        )
    if run.num_classes != 2:
        raise ConfigError(
            f"run config: key 'num-classes' = {run.num_classes} is not allowed with data "
            "source 'heart-disease': expected 2 (disease yes/no)"
        )


def load(request: DataRequest) -> HospitalData:
    """One centre's train/val/test splits, normalised with its own train statistics (raw
    unless the request's normalisation is ``site``)."""
    check_run(request)
    path = require_data_path(request, WHAT)
    centre = read_centre(path)
    hospital = request.hospital
    whole = make_split(centre.features, centre.labels)
    train_rows, val_rows = centre.train, np.zeros(0, dtype=np.int64)
    val_fraction = resolve_val_fraction(hospital, DEFAULT_VAL_FRACTION)
    if val_fraction > 0:
        keep, val = stratified_split(
            centre.labels[train_rows], [1.0 - val_fraction, val_fraction], hospital.data_seed
        )
        train_rows, val_rows = train_rows[keep], train_rows[val]
    train = subset(whole, train_rows)
    mean, std = statistics(train.inputs)
    splits = {"train": train, "val": subset(whole, val_rows), "test": subset(whole, centre.test)}
    if request.normalisation == "site":  # otherwise raw: pooled statistics come later
        splits = {name: normalise(split, mean, std) for name, split in splits.items()}
    counts = ", ".join(
        f"{name} {len(s)} ({int(s.labels.sum())} positive)" for name, s in splits.items()
    )
    note = "" if val_fraction == 0 else f"; val carved from train (val-fraction {val_fraction})"
    return HospitalData(
        splits["train"],
        splits["val"],
        splits["test"],
        description=f"heart-disease {centre.name} (FLamby centre {CENTRES[centre.name]}): "
        f"{counts}{note}",
        extra={
            "source": "heart-disease",
            "file": str(path),
            "centre": centre.name,
            "centre_id": CENTRES[centre.name],
            "features": list(FEATURES),
            "train_mean": mean.tolist(),
            "train_std": std.tolist(),
            "flamby_sizes": val_fraction == 0,
        },
    )


def load_pooled(paths: Sequence[Path]) -> tuple[Split, list[Split]]:
    """FLamby's pooled mode: all centres' train rows together, normalised with pooled statistics.

    Returns the pooled train split and each centre's test split (in the order of ``paths``),
    all normalised with the pooled train mean/std. Concatenating the test splits gives
    FLamby's pooled test set.
    """
    if not paths:
        raise ConfigError("heart-disease pooled: expected at least one processed.<centre>.data")
    centres = [read_centre(Path(p)) for p in paths]
    names = [c.name for c in centres]
    if len(set(names)) != len(names):
        raise DataError(f"heart-disease pooled: a centre is given twice ({', '.join(names)})")
    wholes = [make_split(c.features, c.labels) for c in centres]
    trains = [subset(w, c.train) for w, c in zip(wholes, centres, strict=True)]
    pooled = Split(torch.cat([t.inputs for t in trains]), torch.cat([t.labels for t in trains]))
    mean, std = statistics(pooled.inputs)
    tests = [normalise(subset(w, c.test), mean, std) for w, c in zip(wholes, centres, strict=True)]
    return normalise(pooled, mean, std), tests
