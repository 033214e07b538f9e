"""Start daemons and make sure every process they spawn is gone afterwards.

Flower's daemons spawn helpers: the SuperLink and each SuperNode start a
``flower-superexec``, which starts one ``flwr-serverapp`` / ``flwr-clientapp`` per task.
The SuperLink starts its SuperExec with ``start_new_session=True`` (a new process group),
so killing the SuperLink's process group alone leaves the SuperExec and its ServerApp
running. Two mechanisms together catch everything:

1. each daemon is started in its own session (``start_new_session=True``): Ctrl-C in the
   terminal reaches only us, and we stop the daemons in order (SIGTERM to the group,
   then SIGKILL);
2. each daemon asks the kernel for SIGTERM when we die (``PR_SET_PDEATHSIG``), so even a
   ``kill -9`` of the runner does not leave daemons running;
3. each daemon's environment carries a marker variable (``FEDCLINIC_SUPERVISOR=<token>``)
   that every descendant inherits, whatever its process group. A final sweep over every
   process's environment (``psutil``) terminates every process still carrying our token.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

MARKER_VARIABLE = "FEDCLINIC_SUPERVISOR"
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


@dataclass
class ManagedProcess:
    """One daemon we started: its command, log file and :class:`subprocess.Popen`."""

    name: str
    command: list[str]
    log_path: Path
    popen: subprocess.Popen[bytes]
    tier: int = 0
    forced: bool = False  # needed SIGKILL: did not stop within the grace period

    @property
    def pid(self) -> int:
        return self.popen.pid

    def exit_code(self) -> int | None:
        """``None`` while running, else the exit status (negative: killed by a signal)."""
        return self.popen.poll()

    def log_tail(self, lines: int = 40) -> str:
        return tail_file(self.log_path, lines)


def read_from(path: Path, offset: int) -> bytes:
    """What ``path`` holds after byte ``offset`` (empty when it cannot be read): a log
    followed as its process appends to it."""
    try:
        with path.open("rb") as log:
            log.seek(offset)
            return log.read()
    except OSError:
        return b""


def tail_file(path: Path, lines: int = 40, max_bytes: int = 256 * 1024) -> str:
    """The last ``lines`` lines of a (possibly large, possibly missing) log file.

    Colour codes are stripped: Flower always colours its log lines, even into files.
    """
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - max_bytes))
            data = handle.read()
    except OSError:
        return ""
    text = ANSI_ESCAPE.sub("", data.decode("utf-8", errors="replace"))
    return "\n".join(text.splitlines()[-lines:])


def _live_processes(attrs: list[str]) -> Iterator[dict[str, Any]]:
    """``psutil`` info dicts of live processes other than this one (zombies skipped:
    they hold no resources but a PID slot, and their parent reaps them)."""
    own = os.getpid()
    for process in psutil.process_iter([*attrs, "status"], ad_value=None):
        info = process.info
        if process.pid != own and info["status"] != psutil.STATUS_ZOMBIE:
            yield info


def pids_with_marker(token: str) -> list[int]:
    """PIDs of live processes whose ``FEDCLINIC_SUPERVISOR`` list holds ``token``."""
    found = []
    for info in _live_processes(["pid", "environ"]):
        marker = (info["environ"] or {}).get(MARKER_VARIABLE, "")
        if token in marker.split(","):
            found.append(int(info["pid"]))
    return found


def pids_with_cmdline(fragment: str, environ: bool = False) -> list[int]:
    """PIDs of live processes whose command line contains ``fragment`` (e.g. a work dir).

    With ``environ=True`` the environment counts too: a SuperNode's SuperExec has no path
    in its command line, but inherits ``FLWR_HOME=<work dir>/homes/<hospital>``.
    """
    found = []
    for info in _live_processes(["pid", "cmdline", *(["environ"] if environ else [])]):
        text = " ".join(info["cmdline"] or [])
        if environ:
            text += " " + " ".join(f"{k}={v}" for k, v in (info["environ"] or {}).items())
        if fragment in text:
            found.append(int(info["pid"]))
    return found


PR_SET_PDEATHSIG = 1
# Resolved once in the parent: a preexec_fn must not do anything that could fork or lock.
_PRCTL = getattr(ctypes.CDLL(None), "prctl", None) if sys.platform == "linux" else None


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM this process when the runner dies (Linux only)."""
    if _PRCTL is not None:
        _PRCTL(PR_SET_PDEATHSIG, int(signal.SIGTERM))


def _cmdline(pid: int) -> str:
    try:
        return " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return "?"


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _signal_pid(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


class ProcessSupervisor:
    """Owns the daemons of one local federation; :meth:`stop_all` leaves nothing behind.

    Use it as a context manager (``with ProcessSupervisor() as sup:``) so the stop also
    happens on exceptions and Ctrl-C.
    """

    def __init__(self, grace_seconds: float = 10.0, token: str | None = None) -> None:
        self.grace_seconds = grace_seconds
        self.token = token or uuid.uuid4().hex
        self.processes: list[ManagedProcess] = []
        self.swept: dict[int, str] = {}

    def __enter__(self) -> ProcessSupervisor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()

    def environment(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """``base`` (default: ours) plus the marker every descendant will inherit.

        A marker already there (a supervisor running under another, like ``fedclinic
        hospital`` in a test) is kept in front: the outer sweep still finds everything.
        """
        env = dict(os.environ if base is None else base)
        outer = [t for t in env.get(MARKER_VARIABLE, "").split(",") if t and t != self.token]
        env[MARKER_VARIABLE] = ",".join([*outer, self.token])
        return env

    def start(
        self,
        name: str,
        command: Sequence[str],
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        tier: int = 0,
    ) -> ManagedProcess:
        """Start ``command`` in its own session, stdout and stderr appended to ``log_path``.

        :meth:`stop_all` stops higher tiers first (SuperNodes before the SuperLink).
        """
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log:
            popen = subprocess.Popen(
                list(command),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.environment(env),
                cwd=cwd,
                start_new_session=True,
                preexec_fn=_die_with_parent if _PRCTL is not None else None,
            )
        process = ManagedProcess(name, list(command), log_path, popen, tier)
        self.processes.append(process)
        return process

    def run(
        self,
        command: Sequence[str],
        env: Mapping[str, str] | None = None,
        timeout: float = 60.0,
        cwd: Path | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a short command (the ``flwr`` CLI) to completion, marked like the daemons.

        Raises :class:`subprocess.TimeoutExpired` after ``timeout`` seconds (the child
        is killed first).
        """
        return subprocess.run(
            list(command),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env=self.environment(env),
            cwd=cwd,
            timeout=timeout,
            check=False,
        )

    def stop(self, process: ManagedProcess, grace_seconds: float | None = None) -> None:
        """SIGTERM the process group, wait up to the grace period, then SIGKILL it."""
        self.stop_together([process], grace_seconds)

    def stop_together(
        self, processes: Sequence[ManagedProcess], grace_seconds: float | None = None
    ) -> None:
        """SIGTERM every process group at once, wait up to one grace period, SIGKILL."""
        grace = self.grace_seconds if grace_seconds is None else grace_seconds
        # start_new_session: each daemon leads its own process group (pgid == pid).
        for process in processes:
            if process.exit_code() is None:
                _signal_group(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for process in processes:
            try:
                process.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.forced = True
        # Kill the rest of each group too: helpers can outlive a daemon that exited.
        for process in processes:
            _signal_group(process.pid, signal.SIGKILL)
        for process in processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.popen.wait(timeout=5)

    def stop_all(self) -> None:
        """Stop daemons tier by tier (highest first, each tier at once), then sweep.

        SuperNodes (tier 1) go before the SuperLink (tier 0), so each SuperNode can
        deregister cleanly while the SuperLink still answers.
        """
        for tier in sorted({p.tier for p in self.processes}, reverse=True):
            self.stop_together([p for p in self.processes if p.tier == tier])
        self.sweep()

    def sweep(self, grace_seconds: float = 3.0) -> list[int]:
        """Terminate every remaining process carrying our marker; return their PIDs.

        The PIDs (with command lines) are kept in :attr:`swept` for diagnostics.
        """
        leftover = pids_with_marker(self.token)
        if not leftover:
            return []
        self.swept.update({pid: _cmdline(pid) for pid in leftover})
        for pid in leftover:
            _signal_pid(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_seconds
        while time.monotonic() < deadline and pids_with_marker(self.token):
            time.sleep(0.1)
        for pid in pids_with_marker(self.token):
            _signal_pid(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and pids_with_marker(self.token):
            time.sleep(0.1)
        return leftover

    def remaining(self) -> list[int]:
        """Live processes still carrying our marker (empty after :meth:`stop_all`)."""
        return pids_with_marker(self.token)
