"""Heart-disease source: FLamby's Fed-Heart-Disease sizes, labels, normalisation; bad files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedclinic.config import HospitalConfig, RunConfig
from fedclinic.data import heart_disease, load_hospital_data
from fedclinic.data.base import DataRequest
from fedclinic.datasets import SHARED as DATA
from fedclinic.errors import ConfigError, DataError

SHARED = DATA / "heart_disease"
needs_heart = pytest.mark.skipif(
    not (SHARED / "processed.cleveland.data").is_file(),
    reason=f"reference data {SHARED} is not on this machine",
)
# FLamby's split (owkin/FLamby@edacf54, fed_heart_disease): sizes as FLamby's; label balance as
# re-implemented with scikit-learn: (train n, train positives, test n, test positives).
EXPECTED = {
    "cleveland": (199, 91, 104, 48),
    "hungarian": (172, 65, 89, 33),
    "switzerland": (30, 30, 16, 15),
    "va": (85, 66, 45, 35),
}
GOOD_ROW = "63.0,1.0,1.0,145.0,233.0,1.0,2.0,150.0,0.0,2.3,3.0,0.0,6.0,0"


def make(path: Path, run: dict[str, Any] | None = None, **hospital: Any) -> DataRequest:
    run_config = RunConfig(**{"model": "logreg", **(run or {})})
    hospital.setdefault("data_source", "heart-disease")
    return DataRequest(run_config, HospitalConfig(hospital="h", data_path=str(path), **hospital))


@needs_heart
@pytest.mark.parametrize("centre", list(EXPECTED))
def test_flamby_sizes_positives_and_normalisation(centre: str) -> None:
    data = load_hospital_data(make(SHARED / f"processed.{centre}.data"))
    train_n, train_pos, test_n, test_pos = EXPECTED[centre]
    assert (len(data.train), int(data.train.labels.sum())) == (train_n, train_pos)
    assert (len(data.test), int(data.test.labels.sum())) == (test_n, test_pos)
    assert len(data.val) == 0 and data.val.inputs.shape == (0, 13)
    assert data.train.inputs.shape[1] == 13 and data.train.inputs.dtype == torch.float32
    assert data.train.inputs.mean(dim=0).abs().max() < 1e-5
    std = data.train.inputs.std(dim=0)
    constant = torch.tensor(data.extra["train_std"]) == 0  # Switzerland's chol is all 0
    assert torch.allclose(std[~constant], torch.ones(int((~constant).sum())), atol=1e-5)
    assert (data.train.inputs[:, constant] == 0).all()
    assert data.extra["features"] == list(heart_disease.FEATURES)


@needs_heart
def test_switzerland_has_constant_cholesterol() -> None:
    data = heart_disease.load(make(SHARED / "processed.switzerland.data"))
    assert data.extra["train_std"][heart_disease.FEATURES.index("chol")] == 0.0


@needs_heart
def test_matches_a_pandas_reimplementation_of_flamby() -> None:
    """Bit-for-bit against FLamby's own steps (read_csv, dropna, get_dummies, torch stats)."""
    pd = pytest.importorskip("pandas")
    from sklearn.model_selection import train_test_split

    for centre in EXPECTED:
        df = pd.read_csv(SHARED / f"processed.{centre}.data", header=None)
        df = df.replace("?", np.nan).drop([10, 11, 12], axis=1).dropna(axis=0)
        df = df.apply(pd.to_numeric)
        y = df.iloc[:, -1].where(df.iloc[:, -1] == 0, 1)
        levels = np.unique(y)
        stratify = y if len(levels) > 1 and all((y == v).sum() > 2 for v in levels) else None
        train, _ = train_test_split(
            np.arange(len(df)), train_size=0.66, test_size=0.34, random_state=43,
            shuffle=True, stratify=stratify,
        )  # fmt: skip
        x = df.iloc[:, :-1].copy()
        x[2] = pd.Categorical(x[2], categories=[1.0, 2.0, 3.0, 4.0])  # all centres' levels
        x[6] = pd.Categorical(x[6], categories=[0.0, 1.0, 2.0])
        x = pd.get_dummies(x, columns=[2, 6], drop_first=True).to_numpy(np.float32)
        rows = torch.from_numpy(x[np.sort(train)])
        expected = (rows - rows.mean(0)) / (rows.std(0) + 1e-9)
        data = heart_disease.load(make(SHARED / f"processed.{centre}.data"))
        assert torch.equal(data.train.inputs, expected), centre


@needs_heart
def test_val_fraction_carves_validation_from_train() -> None:
    data = heart_disease.load(make(SHARED / "processed.cleveland.data", val_fraction=0.2))
    assert (len(data.train), len(data.val), len(data.test)) == (159, 40, 104)
    assert int(data.train.labels.sum()) + int(data.val.labels.sum()) == 91
    assert data.train.inputs.mean(dim=0).abs().max() < 1e-5  # statistics of the kept rows
    assert "val carved from train" in data.description


@needs_heart
def test_pooled_mode_uses_pooled_train_statistics() -> None:
    paths = [SHARED / f"processed.{c}.data" for c in EXPECTED]
    train, tests = heart_disease.load_pooled(paths)
    assert len(train) == 199 + 172 + 30 + 85
    assert int(train.labels.sum()) == 91 + 65 + 30 + 66
    assert [len(t) for t in tests] == [104, 89, 16, 45]
    assert train.inputs.mean(dim=0).abs().max() < 1e-5
    assert torch.allclose(train.inputs.std(dim=0), torch.ones(13), atol=1e-5)
    local = heart_disease.load(make(paths[2]))  # Switzerland alone: different statistics
    assert not torch.allclose(local.test.inputs, tests[2].inputs)
    with pytest.raises(DataError, match="given twice"):
        heart_disease.load_pooled([paths[0], paths[0]])


def _error(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(DataError) as caught:
        heart_disease.load(make(path))
    message = str(caught.value)
    assert "\n" not in message and name in message
    return message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"processed\.va\.data: heart-disease file not found"):
        heart_disease.load(make(tmp_path / "processed.va.data"))


def test_unknown_centre_in_file_name(tmp_path: Path) -> None:
    message = _error(tmp_path, "processed.boston.data", GOOD_ROW + "\n")
    assert "cannot tell the centre" in message and "processed.cleveland.data" in message


def test_wrong_number_of_columns_names_the_line(tmp_path: Path) -> None:
    text = "\n".join([GOOD_ROW] * 3 + ["63.0,1.0,1.0,145.0"] + [GOOD_ROW] * 3) + "\n"
    message = _error(tmp_path, "processed.va.data", text)
    assert "processed.va.data:4: 4 comma-separated values; expected 14" in message


def test_non_numeric_value(tmp_path: Path) -> None:
    bad = GOOD_ROW.replace("233.0", "high")
    message = _error(tmp_path, "processed.va.data", f"{GOOD_ROW}\n{GOOD_ROW}\n{bad}\n")
    assert "processed.va.data:3: column 'chol' = 'high' is not a number" in message


def test_unexpected_category(tmp_path: Path) -> None:
    bad = "63.0,1.0,7.0" + GOOD_ROW[len("63.0,1.0,1.0") :]
    message = _error(tmp_path, "processed.va.data", "\n".join([GOOD_ROW] * 4 + [bad]))
    assert "processed.va.data:5: column 'cp' = 7" in message


def test_missing_values_drop_rows_and_too_few_remain(tmp_path: Path) -> None:
    missing = GOOD_ROW.replace("145.0", "?")
    message = _error(tmp_path, "processed.va.data", f"{GOOD_ROW}\n{missing}\n{GOOD_ROW}\n")
    assert "only 2 complete row(s)" in message


def test_missing_slope_ca_thal_do_not_drop_rows(tmp_path: Path) -> None:
    cells = GOOD_ROW.split(",")
    cells[10:13] = ["?", "?", "?"]
    rows = [GOOD_ROW.replace(",0.0,6.0,0", ",0.0,6.0,1")] * 5 + [",".join(cells)] * 5
    path = tmp_path / "processed.hungarian.data"
    path.write_text("\n".join(rows) + "\n\n")  # trailing blank lines are fine
    data = heart_disease.load(make(path))
    assert len(data.train) + len(data.test) == 10


@pytest.mark.parametrize(
    ("run", "fragment"),
    [
        ({"model": "cnn"}, "key 'model' = 'cnn'"),
        ({"num_features": 16}, "key 'num-features' = 16"),
        ({"num_classes": 3}, "key 'num-classes' = 3"),
    ],
)
def test_run_config_must_fit(tmp_path: Path, run: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        heart_disease.load(make(tmp_path / "processed.va.data", run))
    assert fragment in str(caught.value)


@pytest.mark.parametrize("num", ["7", "-1", "1.5", "5"])
def test_a_diagnosis_outside_0_to_4_is_refused(tmp_path: Path, num: str) -> None:
    """``num`` is the UCI diagnosis 0..4; once any value was silently binarised (num > 0)."""
    bad = GOOD_ROW[: -len("0")] + num
    message = _error(tmp_path, "processed.va.data", "\n".join([GOOD_ROW] * 4 + [bad]))
    assert f"processed.va.data:5: column 'num' = {num}; expected the diagnosis 0, 1, 2, 3 or 4" in (
        message
    )
