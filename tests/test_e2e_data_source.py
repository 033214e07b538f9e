"""Issue 17.1 on real processes: a hospital config without ``data-source`` is refused before
anything starts, by ``fedclinic local`` and by ``fedclinic hospital`` (once, such a hospital
trained on built-in synthetic images and the run completed with good-looking metrics).

Each command runs as its own process, exactly as an operator types it; nothing may be
started or written (no SuperLink, no SuperNode, no output directory).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from harness import write_image_folder

from fedclinic.local.supervisor import pids_with_cmdline

ROOT = Path(__file__).resolve().parents[1]


def fedclinic(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "fedclinic.cli", *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)


def site_files(tmp_path: Path) -> dict[str, Path]:
    """Two hospitals: one names its source, st-mary points at its images but names none."""
    images = tmp_path / "st-mary-export"
    write_image_folder(images)
    county = tmp_path / "county.toml"
    county.write_text('hospital = "county"\ndata-source = "synthetic"\nnum-samples = 120\n')
    st_mary = tmp_path / "st-mary.toml"
    st_mary.write_text(f'hospital = "st-mary"\ndata-path = "{images}"\n')
    return {"county": county, "st-mary": st_mary}


def one_error_line(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 2, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    return lines[0]


def test_local_refuses_a_hospital_without_a_data_source(tmp_path: Path) -> None:
    files = site_files(tmp_path)
    out = tmp_path / "out"
    done = fedclinic(
        "local", "--hospital", str(files["county"]), "--hospital", str(files["st-mary"]),
        "--set", "rounds=1", "--output-dir", str(out),
    )  # fmt: skip
    line = one_error_line(done)
    assert str(files["st-mary"]) in line
    assert "key 'data-source' is required but missing" in line
    assert not out.exists()  # nothing written, nothing started
    assert pids_with_cmdline(str(out), environ=True) == []


def test_hospital_refuses_a_config_without_a_data_source(tmp_path: Path) -> None:
    files = site_files(tmp_path)
    keys = tmp_path / "keys"
    done = fedclinic("certs", "--out", str(keys), "--keys-only", "--hospital", "st-mary")
    assert done.returncode == 0, done.stderr
    ca = fedclinic("certs", "--out", str(tmp_path / "certs"))
    assert ca.returncode == 0, ca.stderr
    done = fedclinic(
        "hospital", "--superlink", "127.0.0.1:9092",
        "--ca", str(tmp_path / "certs" / "ca.crt"),
        "--key", str(tmp_path / "keys" / "hospitals" / "st-mary.key"),
        "--config", str(files["st-mary"]),
    )  # fmt: skip
    line = one_error_line(done)
    assert "key 'data-source' is required but missing" in line
    assert "joining" not in done.stdout + done.stderr  # no SuperNode was started
