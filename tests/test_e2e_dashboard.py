"""``fedclinic local --dashboard`` end to end: the dashboard beside a real federation (a real
SuperLink and two SuperNodes, TLS + node authentication) shows the run live, with each
hospital's status from the SuperLink's own node list (``flwr supernode list``), and stops
with the run.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.e2e
def test_local_run_with_its_dashboard(tmp_path: Path) -> None:
    out = tmp_path / "out"
    command = [sys.executable, "-m", "fedclinic.cli", "local", "--hospitals", "2",
               "--set", "rounds=3", "--output-dir", str(out), "--timeout", "600",
               "--dashboard", "0"]  # fmt: skip
    process = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: list[str] = []
    found = threading.Event()

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line)
            if "dashboard: http" in line:
                found.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    seen: dict[str, object] = {}
    try:
        assert found.wait(120), "".join(lines)
        url = re.search(r"http://127\.0\.0\.1:\d+/runs/out", "".join(lines))
        assert url, "".join(lines)
        api = url.group(0).replace("/runs/out", "/api/runs/out")
        deadline = time.monotonic() + 540
        with httpx.Client(timeout=10) as http:
            while time.monotonic() < deadline and process.poll() is None:
                response = http.get(api)
                if response.status_code == 200:
                    view = response.json()
                    for hospital in view["hospitals"]:
                        if hospital["superlink_status"] == "online":
                            seen[hospital["name"]] = view["status"]
                    if len(seen) == 2:
                        break
                time.sleep(1.0)
            page = http.get(url.group(0))
            assert page.status_code == 200 and "content-security-policy" in page.headers
        assert set(seen) == {"hospital-a", "hospital-b"}, (seen, lines[-20:])
        assert process.wait(timeout=600) == 0, "".join(lines[-40:])
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=60)
    reader.join(timeout=10)
    with pytest.raises(httpx.TransportError):  # the dashboard stopped with the run
        httpx.get(api, timeout=2)
