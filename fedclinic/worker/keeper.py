"""Keep each hospital's site worker running beside its SuperNode.

One piece of code for ``fedclinic hospital`` (one hospital, the hospital image's
entrypoint) and ``fedclinic local`` (one worker per hospital): the worker
(``python -m fedclinic.worker --config <the node's hospital config>``) runs under the
caller's :class:`~fedclinic.local.supervisor.ProcessSupervisor`, so its stop and final
sweep cover it like the Flower daemons. :class:`WorkerKeeper`

1. starts it with the node's environment and hospital config (hence the same state dir and
   socket the forwarder ClientApp looks for) and waits, bounded, until it serves;
2. restarts it when it dies after it served (:meth:`WorkerKeeper.check`, called from the
   caller's supervising loop). The message it was answering gets a one-line error reply
   from the new worker (:mod:`fedclinic.worker.executor` keeps the task in flight in
   ``worker.task``), or from the forwarder when it came that way; the next messages wait at
   the node for the new worker. A worker that keeps dying is given up on after
   :data:`RESTART_LIMIT` restarts in :data:`RESTART_WINDOW` seconds: Flower's SuperExec then
   takes the node's tasks, and messages are answered in process;
3. stops it and removes a socket a killed worker left (:meth:`WorkerKeeper.stop`).

A worker that cannot start at all (it exits, or does not serve within the bound) is a
:class:`WorkerError`: one line naming the hospital, the worker's own error and the
opt-out (``--no-worker`` or ``FEDCLINIC_WORKER=off``).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedclinic.errors import FedClinicError
from fedclinic.flower import flower_bin_dir
from fedclinic.local.supervisor import ANSI_ESCAPE, ManagedProcess, ProcessSupervisor, read_from
from fedclinic.worker.forwarder import MODE_VARIABLE
from fedclinic.worker.protocol import remove_stale_socket, state_root

#: what ``python -m fedclinic.worker`` logs once it listens (``... : serving <socket>``)
SERVING = ": serving "
#: seconds a worker may take to serve: it imports torch (several seconds on a loaded host)
START_TIMEOUT = 180.0
#: restarts within :data:`RESTART_WINDOW` seconds after which a worker is given up on
RESTART_LIMIT = 5
RESTART_WINDOW = 600.0
POLL_SECONDS = 0.2
#: the SuperNode's ``--isolation`` when its worker takes its tasks: Flower then starts no
#: SuperExec of its own (which would race the worker for every task)
NODE_ISOLATION = "process"


class WorkerError(FedClinicError):
    """A hospital's site worker could not start."""


def workers_disabled(env: Mapping[str, str] | None = None) -> bool:
    """``FEDCLINIC_WORKER=off``: no worker, every message answered in process."""
    return (os.environ if env is None else env).get(MODE_VARIABLE, "").lower() == "off"


def worker_command(config: Path, runtime_address: str = "") -> list[str]:
    """The worker for the hospital config ``config``, on this interpreter and code; with
    ``runtime_address`` it takes the node's tasks from that Runtime API (the node runs with
    ``--isolation process``, :data:`NODE_ISOLATION`)."""
    command = [sys.executable, "-m", "fedclinic.worker", "--config", str(config)]
    return [*command, "--runtime-api-address", runtime_address] if runtime_address else command


def superexec_command(runtime_address: str) -> list[str]:
    """Flower's own executor for a node whose worker was given up on: one
    ``flwr-clientapp`` per message again (answered in process by the forwarder)."""
    return [
        str(flower_bin_dir() / "flower-superexec"), "--insecure",
        "--runtime-api-address", runtime_address,
    ]  # fmt: skip


@dataclass
class KeptWorker:
    """One hospital's worker: how to start it, its current process, its history."""

    name: str
    command: list[str]
    root: Path  # the state dir: worker.sock and worker.lock live there
    log_path: Path
    env: dict[str, str] | None
    tier: int
    log_hint: str  # where an operator finds the worker's log
    runtime_address: str = ""  # the node's Runtime API, where the worker takes its tasks
    process: ManagedProcess | None = None
    offset: int = 0  # size of the log when the current process started
    served: bool = False  # the current process logged that it serves
    ever_served: bool = False
    starts: list[float] = field(default_factory=list)
    given_up: bool = False

    def log_since_start(self) -> str:
        """What the current process wrote to the log (colour codes stripped)."""
        data = read_from(self.log_path, self.offset)
        return ANSI_ESCAPE.sub("", data.decode("utf-8", errors="replace"))


class WorkerKeeper:
    """Starts, watches, restarts and stops site workers under one supervisor."""

    def __init__(
        self,
        supervisor: ProcessSupervisor,
        say: Callable[[str, str], None] = lambda name, message: None,
        *,
        start_timeout: float = START_TIMEOUT,
        restart_limit: int = RESTART_LIMIT,
        restart_window: float = RESTART_WINDOW,
    ) -> None:
        self.supervisor = supervisor
        self.say = say  # (hospital, message): a line in the caller's log
        self.start_timeout = start_timeout
        self.restart_limit = restart_limit
        self.restart_window = restart_window
        self.workers: dict[str, KeptWorker] = {}

    # ------------------------------------------------------------------ start

    def add(
        self,
        name: str,
        config: Path,
        node_config: Mapping[str, Any],
        log_path: Path,
        *,
        env: Mapping[str, str] | None = None,
        tier: int = 0,
        prefix: Sequence[str] = (),
        log_hint: str = "",
        runtime_address: str = "",
    ) -> KeptWorker:
        """Start the worker of hospital ``name`` (``config``: the file its SuperNode gets as
        ``--node-config``, ``node_config``: its flat contents); returns at once. ``prefix``
        goes before the command (``nice -n 10``); ``log_hint`` says where its log is shown
        (default: ``log_path``); ``runtime_address``: the node's Runtime API, where the
        worker takes the node's tasks (the node then starts no executor of its own)."""
        worker = KeptWorker(
            name,
            [*prefix, *worker_command(config, runtime_address)],
            state_root(node_config),
            log_path,
            None if env is None else dict(env),
            tier,
            log_hint or str(log_path),
            runtime_address,
        )
        self.workers[name] = worker
        self._start(worker)
        return worker

    def _start(self, worker: KeptWorker) -> None:
        try:
            worker.offset = worker.log_path.stat().st_size
        except OSError:
            worker.offset = 0
        worker.process = self.supervisor.start(
            f"worker-{worker.name}", worker.command, worker.log_path, env=worker.env,
            tier=worker.tier,
        )  # fmt: skip
        worker.served = False
        worker.starts.append(time.monotonic())

    def serving(self, worker: KeptWorker) -> bool:
        """Whether the worker's current process has logged that it serves (and runs)."""
        process = worker.process
        if process is None or process.exit_code() is not None:
            return False
        if not worker.served and SERVING in worker.log_since_start():
            worker.served = worker.ever_served = True
        return worker.served

    def wait_serving(
        self, timeout: float | None = None, tick: Callable[[], None] = lambda: None
    ) -> None:
        """Until every worker serves; :class:`WorkerError` when one exits first or the bound
        (``timeout``, default the keeper's ``start_timeout``) passes. ``tick`` runs at each
        poll (the caller echoes logs, watches its other processes)."""
        limit = self.start_timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        while True:
            tick()
            pending = []
            for worker in self.workers.values():
                if worker.given_up or self.serving(worker):
                    continue
                assert worker.process is not None
                status = worker.process.exit_code()
                if status is not None:
                    raise WorkerError(self.failure(worker, f"exited with status {status}"))
                pending.append(worker)
            if not pending:
                return
            if time.monotonic() > deadline:
                raise WorkerError(self.failure(pending[0], f"did not serve within {limit:g} s"))
            time.sleep(POLL_SECONDS)

    def failure(self, worker: KeptWorker, what: str) -> str:
        """One line: which hospital, what happened, the worker's own last words, the way out."""
        lines = [line.strip() for line in worker.log_since_start().splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("error:")]
        said = (errors or lines or ["(no output)"])[-1]
        return (
            f"hospital {worker.name}: the site worker could not start: it {what}; its last "
            f"line: {said} (log: {worker.log_hint}); to answer in the node's ClientApp "
            f"instead, start without it (--no-worker or {MODE_VARIABLE}=off)"
        )

    # ------------------------------------------------------------------ watch

    def check(self) -> None:
        """Restart each worker that died after it served; :class:`WorkerError` for one that
        died before it ever served (it cannot start). Call it from the supervising loop."""
        now = time.monotonic()
        for worker in self.workers.values():
            process = worker.process
            if worker.given_up or process is None:
                continue
            self.serving(worker)  # notes a first "serving" line before the process ends
            status = process.exit_code()
            if status is None:
                continue
            if not worker.ever_served:
                raise WorkerError(self.failure(worker, f"exited with status {status}"))
            recent = [t for t in worker.starts if now - t < self.restart_window]
            if len(recent) > self.restart_limit:
                worker.given_up = True
                remove_stale_socket(worker.root)
                executor = " (Flower's SuperExec takes the node's tasks)"
                self.say(
                    worker.name,
                    f"the site worker (pid {process.pid}) exited with status {status}, "
                    f"{len(recent)} starts within {self.restart_window:g} s: not restarting "
                    f"it; messages are answered in process from now on"
                    f"{executor if worker.runtime_address else ''} (log: {worker.log_hint})",
                )
                if worker.runtime_address:  # someone must take the node's tasks
                    worker.process = self.supervisor.start(
                        f"superexec-{worker.name}", superexec_command(worker.runtime_address),
                        worker.log_path, env=worker.env, tier=worker.tier,
                    )  # fmt: skip
                continue
            self.say(
                worker.name,
                f"the site worker (pid {process.pid}) exited with status {status}; restarting it",
            )
            self._start(worker)

    # ------------------------------------------------------------------ stop

    def processes(self) -> list[ManagedProcess]:
        return [w.process for w in self.workers.values() if w.process is not None]

    def terminate(self) -> None:
        """SIGTERM every running worker without waiting: a hospital's stop reaches node and
        worker at once, so both have the whole ``--stop-timeout`` (:meth:`stop` waits)."""
        for process in self.processes():
            if process.exit_code() is None:
                with suppress(ProcessLookupError, PermissionError):
                    os.killpg(process.pid, signal.SIGTERM)

    def stop(self, grace_seconds: float | None = None) -> None:
        """Stop every worker (SIGTERM, then SIGKILL after the grace period) and remove a
        socket a killed one left behind. Safe to call again, and after the supervisor's
        own stop."""
        self.supervisor.stop_together(self.processes(), grace_seconds)
        for worker in self.workers.values():
            remove_stale_socket(worker.root)
