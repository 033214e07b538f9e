"""What an operator sees when things go wrong, on real processes (TLS + node auth, loopback).

- Ctrl-C during a run: the runner exits 130 and leaves no SuperLink, SuperNode, SuperExec
  or app process behind.
- A hospital with a corrupt image file: the run fails (non-zero exit) and the operator is
  told which hospital and which image (its class and position), in one line; the file's
  path stays at the site: nothing the coordinator stored (metrics, audit log, summary, its
  own and the ServerApp's logs) holds it, the hospital's logs do.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedclinic.local.supervisor import pids_with_cmdline

ROOT = Path(__file__).resolve().parents[1]


def fedclinic(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedclinic.cli", *args]


@pytest.mark.e2e
def test_ctrl_c_stops_every_process(tmp_path: Path) -> None:
    out = tmp_path / "out"
    command = fedclinic("local", "--hospitals", "2", "--set", "rounds=20", "--output-dir", str(out))
    runner = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 300
        metrics = out / "metrics.jsonl"
        # Interrupt once hospitals are training (the first rows have arrived).
        while not (metrics.is_file() and metrics.read_text().strip()):
            assert runner.poll() is None, runner.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "no metrics within 300 s"
            time.sleep(1)
        assert pids_with_cmdline(str(out), environ=True), "the federation should be running"
        runner.send_signal(signal.SIGINT)
        output, _ = runner.communicate(timeout=120)
    finally:
        if runner.poll() is None:
            runner.kill()
    assert runner.returncode == 130, output[-3000:]
    time.sleep(1)
    assert pids_with_cmdline(str(out), environ=True) == []


@pytest.mark.e2e
def test_corrupt_image_at_a_hospital_is_named_in_one_line(tmp_path: Path) -> None:
    images = tmp_path / "st-mary-export"
    rng = np.random.default_rng(0)
    for label in ("benign", "malignant"):
        (images / label).mkdir(parents=True)
        for index in range(12):
            pixels = (rng.random((28, 28)) * 255).astype(np.uint8)
            Image.fromarray(pixels).save(images / label / f"{index:03d}.png")
    corrupt = images / "malignant" / "007.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n this is not the rest of a PNG file")

    good = tmp_path / "county.toml"
    good.write_text('hospital = "county"\ndata-source = "synthetic"\nnum-samples = 120\n')
    bad = tmp_path / "st-mary.toml"
    bad.write_text(f'hospital = "st-mary"\ndata-source = "image-folder"\ndata-path = "{images}"\n')
    out = tmp_path / "out"
    command = fedclinic(
        "local", "--hospital", str(good), "--hospital", str(bad),
        "--set", "rounds=1", "--set", "round-timeout=120", "--output-dir", str(out),
    )
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 1, output[-4000:]
    lines = [line for line in output.splitlines() if "image 8 of class 'malignant'" in line]
    assert any("st-mary" in line and "not a readable image" in line for line in lines), output
    # the path stays at the site: not in what the coordinator stored, nor in its logs
    # (the runner's output includes the ServerApp's log, `flwr log`)
    work = out / "federation"
    coordinator_side = [p for p in out.iterdir() if p.is_file()]
    coordinator_side += [work / "superlink.log", *(work / "homes" / "superlink").rglob("*")]
    assert any(p.name == "metrics.jsonl" for p in coordinator_side)
    for path in (p for p in coordinator_side if p.is_file()):
        text = path.read_bytes().decode("utf-8", "replace")
        assert str(images) not in text and "007.png" not in text, path
    assert str(images) not in output and "st-mary-export" not in output
    # the site's own logs: its SuperNode's and its site worker's (which answered)
    site_logs = [work / "hospital-st-mary.log", work / "hospital-st-mary-worker.log"]
    assert any(str(corrupt) in p.read_text() for p in site_logs if p.exists())
    assert pids_with_cmdline(str(out), environ=True) == []
