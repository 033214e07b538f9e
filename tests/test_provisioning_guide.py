"""docs/provisioning.md's walk-through, run exactly as written: from an empty folder to a
finished 2-round federation on one machine with local processes (issue 17.8).

The shell blocks of the walk-through section are read from the doc and run in order with
bash in one temporary folder, ``fedclinic`` on ``PATH``. Blocks that start a long-running
node (``fedclinic coordinator``, ``fedclinic hospital``) are started in the background under
a :class:`ProcessSupervisor` (an operator's second terminal) and stopped at the end; every
other block must exit 0. Then: the run completed with both hospitals, each hospital's log
says when it joined and when it left, and no process is left behind.

The coordinator block runs through :func:`start_coordinator`: until ``fedclinic
coordinator`` is registered in this checkout's CLI it starts the same SuperLink that command
runs (``python -m fedclinic.superlink`` with the doc's certificate and state folders).
"""

from __future__ import annotations

import os
import re
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from fedclinic.local.ports import is_port_free
from fedclinic.local.supervisor import ManagedProcess, ProcessSupervisor

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "provisioning.md"
SECTION = "## Walk-through: a federation on one machine"
LONG_RUNNING = ("fedclinic coordinator", "fedclinic hospital")
PORTS = (9092, 8000, 9094, 9099, 9095, 9100)  # the doc's fixed ports: Flower's defaults


def guide_blocks() -> list[str]:
    text = GUIDE.read_text(encoding="utf-8")
    section = text[text.index(SECTION) :]
    section = section[: section.index("\n## ", len(SECTION))]
    return re.findall(r"```bash\n(.*?)```", section, flags=re.S)


def environment(workdir: Path) -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
            "PWD": str(workdir), "PYTHONUNBUFFERED": "1"}  # fmt: skip


def wait_for_health(process: ManagedProcess, ca: Path, timeout: float = 120) -> None:
    """Until the coordinator's Control API answers /health (what an operator waits for)."""
    context = ssl.create_default_context(cafile=str(ca))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.exit_code() is None, process.log_tail(40)
        try:
            with urllib.request.urlopen("https://127.0.0.1:8000/health", context=context) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"the coordinator did not come up:\n{process.log_tail(40)}")


def start_coordinator(
    supervisor: ProcessSupervisor, block: str, workdir: Path, env: dict[str, str]
) -> ManagedProcess:
    """The doc's coordinator block (``fedclinic coordinator``), run as written."""
    log = workdir / "coordinator.log"
    return supervisor.start("coordinator", ["bash", "-c", block], log, env=env, cwd=workdir)


@pytest.mark.e2e
def test_the_provisioning_walk_through_runs_as_written(tmp_path: Path) -> None:
    blocks = guide_blocks()
    assert len(blocks) >= 8 and any(b.startswith("fedclinic submit") for b in blocks)
    busy = [port for port in PORTS if not is_port_free(port)]
    assert not busy, f"the walk-through uses Flower's default ports; in use here: {busy}"
    env = environment(tmp_path)
    hospitals: list[ManagedProcess] = []
    with ProcessSupervisor(grace_seconds=20) as supervisor:
        for index, block in enumerate(blocks):
            if block.startswith("fedclinic coordinator"):
                coordinator = start_coordinator(supervisor, block, tmp_path, env)
                wait_for_health(coordinator, tmp_path / "operator" / "certs" / "ca.crt")
            elif block.startswith(LONG_RUNNING):
                name = f"hospital-{len(hospitals)}"
                command = ["bash", "-c", block]
                log = tmp_path / f"{name}.log"
                started = supervisor.start(name, command, log, env=env, cwd=tmp_path, tier=1)
                hospitals.append(started)
            else:
                done = subprocess.run(
                    ["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, env=env,
                    capture_output=True, text=True, timeout=1500,
                )  # fmt: skip
                logs = "\n".join(f"--- {p.name}:\n{p.log_tail(30)}" for p in supervisor.processes)
                assert done.returncode == 0, (
                    f"block {index} failed:\n{block}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
                    f"\n{logs}"
                )
                if block.startswith("fedclinic submit"):
                    submitted = done.stdout
        supervisor.stop_all()
        assert supervisor.remaining() == []

    assert "completed" in submitted
    summary = (tmp_path / "operator" / "runs" / "study-1" / "summary.json").read_text()
    assert '"status": "completed"' in summary
    assert '"st-mary"' in summary and '"county"' in summary
    for process in hospitals:
        log = process.log_path.read_text()
        assert re.search(r"joined the coordinator at 127\.0\.0\.1:9092 as node \d+", log), log
        assert "left the coordinator at 127.0.0.1:9092 (stopped by SIGTERM)" in log, log[-2000:]
