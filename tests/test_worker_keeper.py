"""The site worker's keeper (fedclinic.worker.keeper), shared by ``fedclinic hospital`` and
``fedclinic local``: start and the bounded wait, one line when a worker cannot start,
restarts after a crash (bounded), and no stale socket after the stop.

Stand-in workers (a short Python script that logs the worker's "serving" line) keep these
fast; the real worker runs in tests/test_e2e_worker.py and tests/test_e2e_local.py.
"""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import sys
import time
from pathlib import Path

import pytest

from fedclinic.local.supervisor import ProcessSupervisor
from fedclinic.worker import keeper as keeper_module
from fedclinic.worker.keeper import WorkerError, WorkerKeeper, workers_disabled
from fedclinic.worker.protocol import LOCK_NAME, SOCKET_NAME, remove_stale_socket

STAND_IN = (
    "import sys, time\n"
    "print('fedclinic worker stand-in: serving ' + sys.argv[1], flush=True)\n"
    "time.sleep(120)\n"
)


def stand_in(monkeypatch: pytest.MonkeyPatch, script: str = STAND_IN) -> None:
    monkeypatch.setattr(
        keeper_module,
        "worker_command",
        lambda config, runtime_address="": [sys.executable, "-c", script, str(config)],
    )


def leave_socket(root: Path) -> Path:
    """A socket file whose listener is gone, as a SIGKILLed worker leaves it."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / SOCKET_NAME
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.close()
    return path


def test_a_stale_socket_is_removed_a_live_workers_is_not(tmp_path: Path) -> None:
    path = leave_socket(tmp_path / "a")
    with (tmp_path / "a" / LOCK_NAME).open("a+") as held:  # a live worker holds the lock
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert not remove_stale_socket(tmp_path / "a")
        assert path.exists()
    assert remove_stale_socket(tmp_path / "a")  # its holder is gone
    assert not path.exists()
    assert not remove_stale_socket(tmp_path / "nothing-here")


def test_workers_disabled_by_the_environment() -> None:
    assert workers_disabled({"FEDCLINIC_WORKER": "OFF"})
    assert not workers_disabled({"FEDCLINIC_WORKER": "on"}) and not workers_disabled({})


def test_a_crashed_worker_is_restarted_then_given_up_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stand_in(monkeypatch)
    said: list[str] = []
    root = tmp_path / "state"
    with ProcessSupervisor(grace_seconds=3) as supervisor:
        keeper = WorkerKeeper(
            supervisor, lambda name, message: said.append(f"{name}: {message}"), restart_limit=2
        )
        worker = keeper.add(
            "st-mary", tmp_path / "st-mary.toml", {"hospital": "st-mary", "state-dir": str(root)},
            tmp_path / "worker.log",
        )  # fmt: skip
        keeper.wait_serving(30)
        keeper.check()  # alive: nothing to do
        assert len(worker.starts) == 1 and not said
        for crash in (1, 2):
            assert worker.process is not None
            first = worker.process.pid
            os.kill(first, signal.SIGKILL)
            worker.process.popen.wait(10)
            keeper.check()
            assert worker.process.pid != first, crash
            assert said[-1] == (
                f"st-mary: the site worker (pid {first}) exited with status -9; restarting it"
            )
            keeper.wait_serving(30)
        leave_socket(root)  # the third crash leaves its socket behind
        os.kill(worker.process.pid, signal.SIGKILL)
        worker.process.popen.wait(10)
        keeper.check()
        assert worker.given_up and "not restarting it" in said[-1]
        assert "answered in process from now on" in said[-1]
        assert not (root / SOCKET_NAME).exists()
        keeper.check()  # given up: no more restarts, no error
        assert len(worker.starts) == 3
        keeper.stop(3)
    assert supervisor.remaining() == []


def test_a_given_up_worker_leaves_the_nodes_tasks_to_flowers_superexec(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker that took its node's tasks (--isolation process) and keeps dying: someone
    must take them, or the node waits for a reply forever: Flower's own SuperExec, on the
    same Runtime API, under the same supervisor (stopped with the rest)."""
    stand_in(monkeypatch)
    executors: list[str] = []

    def superexec(address: str) -> list[str]:
        executors.append(address)
        return [sys.executable, "-c", "import time; print('superexec', flush=True); time.sleep(60)"]

    monkeypatch.setattr(keeper_module, "superexec_command", superexec)
    said: list[str] = []
    with ProcessSupervisor(grace_seconds=3) as supervisor:
        keeper = WorkerKeeper(supervisor, lambda n, m: said.append(m), restart_limit=0)
        worker = keeper.add(
            "a", tmp_path / "a.toml", {"hospital": "a", "state-dir": str(tmp_path / "s")},
            tmp_path / "a.log", runtime_address="127.0.0.1:40009",
        )  # fmt: skip
        keeper.wait_serving(30)
        assert worker.process is not None
        os.kill(worker.process.pid, signal.SIGKILL)
        worker.process.popen.wait(10)
        keeper.check()
        assert worker.given_up and executors == ["127.0.0.1:40009"]
        assert "Flower's SuperExec takes the node's tasks" in said[-1]
        assert worker.process.name == "superexec-a" and worker.process.exit_code() is None
        keeper.check()  # given up: nothing restarted
        assert executors == ["127.0.0.1:40009"]
        keeper.stop(3)
        assert worker.process.exit_code() is not None
    assert supervisor.remaining() == []


def test_the_stop_removes_a_socket_left_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stand_in(monkeypatch)
    root = tmp_path / "state"
    with ProcessSupervisor(grace_seconds=3) as supervisor:
        keeper = WorkerKeeper(supervisor)
        keeper.add("a", tmp_path / "a.toml", {"hospital": "a", "state-dir": str(root)},
                   tmp_path / "a.log")  # fmt: skip
        keeper.wait_serving(30)
        leave_socket(root)
        started = time.monotonic()
        keeper.stop(3)
        assert time.monotonic() - started < 3
    assert not (root / SOCKET_NAME).exists()
    assert [p.exit_code() for p in keeper.processes()] == [-signal.SIGTERM]


def test_a_worker_that_never_serves_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stand_in(monkeypatch, "import time\nprint('importing torch ...', flush=True)\ntime.sleep(60)\n")
    with ProcessSupervisor(grace_seconds=3) as supervisor:
        keeper = WorkerKeeper(supervisor)
        keeper.add("a", tmp_path / "a.toml", {"hospital": "a", "state-dir": str(tmp_path)},
                   tmp_path / "a.log", log_hint="its lines above")  # fmt: skip
        with pytest.raises(WorkerError) as caught:
            keeper.wait_serving(1.0)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("hospital a: the site worker could not start: it did not serve")
    assert "its last line: importing torch ..." in message and "(log: its lines above)" in message
    assert "--no-worker or FEDCLINIC_WORKER=off" in message


def test_the_real_worker_with_a_bad_config_is_one_line(tmp_path: Path) -> None:
    """The real ``python -m fedclinic.worker``: its own ``error:`` line is passed on, whether
    the wait or the watch notices first."""
    missing = tmp_path / "missing.toml"
    with ProcessSupervisor(grace_seconds=3) as supervisor:
        keeper = WorkerKeeper(supervisor)
        worker = keeper.add("a", missing, {"hospital": "a", "state-dir": str(tmp_path)},
                            tmp_path / "a.log")  # fmt: skip
        with pytest.raises(WorkerError) as waited:
            keeper.wait_serving(180)
        with pytest.raises(WorkerError) as watched:
            keeper.check()
    assert worker.process is not None and worker.process.exit_code() == 2
    for caught in (waited, watched):
        message = str(caught.value)
        assert message.startswith("hospital a: the site worker could not start: it exited "
                                  "with status 2; its last line: error: "), message  # fmt: skip
        assert str(missing) in message and "\n" not in message
