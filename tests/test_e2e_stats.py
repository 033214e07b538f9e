"""``fedclinic stats local`` end to end on real processes (SuperLink + one SuperNode per Heart
centre, TLS and node authentication), on two of the four centres (the four: in process,
tests/test_stats_engine.py): the pooled train mean/std of every feature equal numpy's on the
concatenated raw data of the centres that released it, no count between 1 and 4 leaves a
hospital, Switzerland (30 train cases, all with heart disease) is flagged, the report is
written, and no process is left behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_stats_engine import disclosed_counts

from fedclinic.data.heart_disease import FEATURES, read_centre
from fedclinic.datasets import SHARED
from fedclinic.local.supervisor import pids_with_cmdline

ROOT = Path(__file__).resolve().parents[1]
HEART = SHARED / "heart_disease"
CENTRES = ("hungarian", "switzerland")


@pytest.mark.e2e
@pytest.mark.skipif(
    not (HEART / "processed.cleveland.data").is_file() and os.environ.get("CI") != "true",
    reason=f"reference data {HEART} is not on this machine",
)
def test_stats_local_across_two_heart_centres(tmp_path: Path) -> None:
    out = tmp_path / "out"
    command = [sys.executable, "-m", "fedclinic.cli", "stats", "local",
               "--run-config", str(ROOT / "examples" / "heart-stats.toml"),
               "--set", f"min-hospitals={len(CENTRES)}",
               "--output-dir", str(out), "--timeout", "900"]  # fmt: skip
    for centre in CENTRES:
        config = tmp_path / f"{centre}.toml"
        config.write_text(
            f'hospital = "{centre}"\ndata-source = "heart-disease"\n'
            f'data-path = "{(HEART / f"processed.{centre}.data").resolve()}"\ndevice = "cpu"\n'
            f'state-dir = "{tmp_path / "state" / centre}"\n'
        )
        command += ["--hospital", str(config)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "report:" in done.stdout

    result = json.loads((out / "stats.json").read_text())
    raw = {}
    for centre in CENTRES:
        data = read_centre(HEART / f"processed.{centre}.data")
        raw[centre] = data.features[data.train].astype(np.float64)
    pooled = result["pooled"]["train"]["variables"]
    assert set(pooled) == set(FEATURES)  # (stats.json keys are sorted)
    for j, name in enumerate(FEATURES):
        kept = pooled[name]["hospitals"]
        assert set(kept) | set(pooled[name]["excluded"]) == set(CENTRES)
        if not kept:  # no centre may release it (two centres: some categories are rare)
            assert not pooled[name]["count"], (name, pooled[name])
            continue
        values = np.concatenate([raw[c][:, j] for c in kept])
        assert pooled[name]["count"] == len(values)
        assert pooled[name]["mean"] == pytest.approx(values.mean(), rel=1e-10, abs=1e-12), name
        assert pooled[name]["std"] == pytest.approx(values.std(ddof=1), rel=1e-9), name
    for name in ("age", "trestbps", "chol", "thalach", "oldpeak"):  # continuous: every centre
        assert pooled[name]["hospitals"] == list(CENTRES)

    disclosed = disclosed_counts(result["hospitals"])
    assert disclosed and all(c == 0 or c >= 5 for c in disclosed)
    assert {"hospital": "switzerland", "split": "train", "flag": "one class",
            "detail": "all 30 train cases are class 1"} in result["flags"]  # fmt: skip
    page = (out / "report.html").read_text()
    assert "switzerland" in page and "one class" in page
    assert (out / "plots" / "hist-chol.png").stat().st_size > 0
    audit = [json.loads(x)["event"] for x in (out / "audit.jsonl").read_text().splitlines()]
    assert audit == ["run_start", "statistics", "statistics", "run_end"]
    assert pids_with_cmdline(str(out), environ=True) == []
