"""What an operator sees when things go wrong, on real processes (TLS + node auth, loopback),
in one run of two hospitals (min-hospitals = 1):

- A hospital with a corrupt image file: the operator is told which hospital and which image
  (its class and position), in one line; the file's path stays at the site: nothing the
  coordinator stored (metrics, audit log, summary, its own log) holds it, the hospital's logs
  do. (That a run needing that hospital fails with exit 1: the engine's tests, in process;
  a failed run's exit status on real processes: tests/test_e2e_deploy.py.)
- Ctrl-C during the run: the runner exits 130 and leaves no SuperLink, SuperNode, SuperExec
  or app process behind.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from harness import write_image_folder

from fedclinic.local.supervisor import pids_with_cmdline

ROOT = Path(__file__).resolve().parents[1]


def fedclinic(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedclinic.cli", *args]


def image_folder_with_a_corrupt_file(images: Path) -> Path:
    """Two classes of 12 random PNGs; the 8th malignant one is cut short. Returns it."""
    write_image_folder(images)
    corrupt = images / "malignant" / "007.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n this is not the rest of a PNG file")
    return corrupt


@pytest.mark.e2e
def test_a_corrupt_image_is_named_in_one_line_and_ctrl_c_stops_every_process(
    tmp_path: Path,
) -> None:
    images = tmp_path / "st-mary-export"
    corrupt = image_folder_with_a_corrupt_file(images)
    good = tmp_path / "county.toml"
    good.write_text('hospital = "county"\ndata-source = "synthetic"\nnum-samples = 120\n')
    bad = tmp_path / "st-mary.toml"
    bad.write_text(f'hospital = "st-mary"\ndata-source = "image-folder"\ndata-path = "{images}"\n')
    out = tmp_path / "out"
    # min-hospitals = 1: the run goes on with county, so it is still running for Ctrl-C
    command = fedclinic(
        "local", "--hospital", str(good), "--hospital", str(bad),
        "--set", "rounds=20", "--set", "min-hospitals=1", "--set", "round-timeout=120",
        "--output-dir", str(out),
    )  # fmt: skip
    runner = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: list[str] = []

    def read() -> None:
        assert runner.stdout is not None
        lines.extend(iter(runner.stdout.readline, ""))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 300
        # Interrupt once the operator has been shown st-mary's line (the runner prints each
        # metrics row as it follows the run) and county has trained.
        while not (
            any("image 8 of class 'malignant'" in line for line in lines)
            and '"kind": "train"' in ((out / "metrics.jsonl").read_text()
                                      if (out / "metrics.jsonl").is_file() else "")
        ):  # fmt: skip
            assert runner.poll() is None, "".join(lines)[-3000:]
            assert time.monotonic() < deadline, "no error line and train row within 300 s"
            time.sleep(1)
        assert pids_with_cmdline(str(out), environ=True), "the federation should be running"
        runner.send_signal(signal.SIGINT)
        runner.wait(timeout=120)
    finally:
        if runner.poll() is None:
            runner.kill()
    reader.join(timeout=10)
    output = "".join(lines)
    assert runner.returncode == 130, output[-3000:]
    time.sleep(1)
    assert pids_with_cmdline(str(out), environ=True) == []

    # the operator is told which hospital and which image, in one line
    lines = [line for line in output.splitlines() if "image 8 of class 'malignant'" in line]
    assert any("st-mary" in line and "not a readable image" in line for line in lines), output
    # the path stays at the site: not in what the coordinator stored, nor in its logs
    work = out / "federation"
    coordinator_side = [p for p in out.iterdir() if p.is_file()]
    coordinator_side += [work / "superlink.log", *(work / "homes" / "superlink").rglob("*")]
    assert any(p.name == "metrics.jsonl" for p in coordinator_side)
    for path in (p for p in coordinator_side if p.is_file()):
        content = path.read_bytes().decode("utf-8", "replace")
        assert str(images) not in content and "007.png" not in content, path
    assert str(images) not in output and "st-mary-export" not in output
    # the site's own logs: its SuperNode's and its site worker's (which answered)
    site_logs = [work / "hospital-st-mary.log", work / "hospital-st-mary-worker.log"]
    assert any(str(corrupt) in p.read_text() for p in site_logs if p.exists())
