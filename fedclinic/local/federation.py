"""A real federation on this machine: one SuperLink and one SuperNode per hospital, each its
own process, talking TLS on loopback with per-hospital node authentication.

This is the same topology a consortium deploys (only the addresses differ), so ``fedclinic
local`` exercises the real code paths: certificates, key registration, FAB upload, each
hospital's site worker taking its node's tasks. Steps of :meth:`LocalFederation.run`:

1. lay out the work dir (certificates, keys, TOML configs, one ``FLWR_HOME`` per process);
2. start the SuperLink on free ports and wait for ``/health``;
3. register each hospital's public key, start its site worker (:mod:`fedclinic.worker`,
   kept by :class:`~fedclinic.worker.keeper.WorkerKeeper` as ``fedclinic hospital`` keeps
   its own; it takes the tasks of its SuperNode's Runtime API) and its SuperNode
   (``--isolation process``), wait until all are online and every worker serves;
4. submit the run with ``flwr run`` and follow it (``flwr ls`` status, ``metrics.jsonl``
   rows, SuperNode processes);
5. report the outcome and stop every process it started, whatever happened.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import ssl
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from rich.console import Console
from rich.markup import escape

from fedclinic.audit import CERTIFICATES_VARIABLE
from fedclinic.config import Scalar
from fedclinic.errors import Interrupted
from fedclinic.flower import flower_bin_dir, flower_environment
from fedclinic.local.configs import HospitalSpec, write_flat_toml
from fedclinic.local.flwr_cli import FlowerCli, FlowerCliError, RunStatus
from fedclinic.local.follow import RunError, RunFollower, RunOutcome
from fedclinic.local.ports import LOOPBACK, pick_free_ports
from fedclinic.local.supernode import diagnose, supernode_command
from fedclinic.local.supervisor import ManagedProcess, ProcessSupervisor, tail_file
from fedclinic.pki import Provisioned, provision
from fedclinic.worker.forwarder import MODE_VARIABLE
from fedclinic.worker.keeper import (
    NODE_ISOLATION,
    START_TIMEOUT,
    WorkerError,
    WorkerKeeper,
    workers_disabled,
)

WORK_DIR_MARKER = ".fedclinic-federation"
PORT_IN_USE_HINTS = ("address already in use", "failed to bind", "errno 98")


class FederationError(RunError):
    """The local federation could not start or the run did not complete."""


@dataclass(frozen=True)
class FederationOptions:
    """Everything a local federation needs, already validated by the caller."""

    app_dir: Path
    output_dir: Path
    run_config: dict[str, Scalar]
    hospitals: list[HospitalSpec]
    work_dir: Path | None = None  # default: <output_dir>/federation
    tls: bool = True
    node_auth: bool = True
    timeout: float = 3600.0  # whole run, from submission to final status
    startup_timeout: float = 90.0  # SuperLink health, SuperNodes online
    # flwr ls (a CPU-second each): the end is seen sooner in the audit log (RunFollower)
    poll_interval: float = 20.0
    grace_seconds: float = 10.0  # SIGTERM -> SIGKILL
    #: CPU priority of the hospitals' processes (``nice``; 0 = the coordinator's). Many
    #: hospitals on one machine can starve the SuperLink otherwise (benchmarks use 10).
    hospital_niceness: int = 0
    #: one site worker per hospital (``fedclinic.worker``), unless this is False or the
    #: hospital's environment (its ``env`` or ours) says ``FEDCLINIC_WORKER=off``: then each
    #: message is answered in its own ClientApp process (``--no-worker``)
    site_workers: bool = True

    @property
    def work(self) -> Path:
        return (self.work_dir or self.output_dir / "federation").resolve()

    @property
    def rounds(self) -> int:
        value = self.run_config.get("rounds", 1)
        return int(value) if isinstance(value, int | float) else 1


def check_output_dir(output_dir: Path) -> None:
    """Refuse an output dir that holds results already: the ServerApp appends to them."""
    for name in ("metrics.jsonl", "summary.json"):
        if (output_dir / name).exists():
            raise FederationError(
                f"output dir '{output_dir}' already holds a run ({name}); "
                "choose another --output-dir"
            )


@contextlib.contextmanager
def signals_as_exceptions() -> Iterator[None]:
    """Turn the first SIGINT/SIGTERM into :class:`Interrupted`; ignore repeats meanwhile.

    The exception unwinds through the ``finally`` blocks that stop the processes; a
    second Ctrl-C must not abort that cleanup half-way and leave daemons behind.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired: list[int] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        if fired:
            return
        fired.append(signum)
        raise Interrupted(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _program(cmdline: str) -> str:
    """The Flower program in a command line (``python .../flwr-serverapp ...`` -> name)."""
    for token in cmdline.split():
        name = Path(token).name
        if name.startswith(("flower-", "flwr")):
            return name
    return Path(cmdline.split()[0]).name if cmdline.split() else "?"


def log_name(hospital: str, suffix: str = "") -> str:
    """``hospital-<name><suffix>.log`` without doubling the prefix of names like
    ``hospital-a`` (``suffix="-worker"``: the site worker's log)."""
    stem = hospital if hospital.startswith("hospital-") else f"hospital-{hospital}"
    return f"{stem}{suffix}.log"


def health_check(url: str, ca_cert: Path | None, timeout: float = 2.0) -> bool:
    """Whether ``GET url`` answers 200, verifying the server against our CA."""
    context = ssl.create_default_context(cafile=str(ca_cert)) if ca_cert else None
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError, ssl.SSLError):
        return False


class LocalFederation:
    """One SuperLink + N SuperNodes on loopback, a submitted run, and its complete cleanup."""

    def __init__(
        self,
        options: FederationOptions,
        console: Console | None = None,
        supervisor: ProcessSupervisor | None = None,
    ) -> None:
        self.options = options
        self.console = console or Console()
        self.supervisor = supervisor or ProcessSupervisor(grace_seconds=options.grace_seconds)
        self.work = options.work
        self.bin_dir = flower_bin_dir()
        self.env = flower_environment(self.bin_dir)
        self.pki: Provisioned | None = None
        self.superlink: ManagedProcess | None = None
        self.supernodes: dict[str, ManagedProcess] = {}
        self.node_ids: dict[str, int] = {}
        #: each hospital's Runtime API port (its site worker takes the node's tasks there)
        self.runtime_ports: dict[str, int] = {}
        self.fleet_port = 0
        self.control_port = 0
        self._t0 = time.monotonic()
        self.cli = FlowerCli(
            self.bin_dir / "flwr", self.work / "homes" / "cli", self.supervisor, self.env
        )
        self.keeper = WorkerKeeper(
            self.supervisor, lambda name, message: self.say(f"{name}: {escape(message)}")
        )

    # ------------------------------------------------------------------ lifecycle

    def run(self) -> RunOutcome:
        """Start, run, report; stop every process on any exit path (also Ctrl-C/SIGTERM)."""
        self._t0 = time.monotonic()
        with signals_as_exceptions():
            try:
                with self.supervisor:
                    try:
                        self.prepare()
                        self.start_superlink()
                        self.start_hospitals()
                        run_id = self.submit()
                        status = self.follow(run_id)
                        return self.report(status)
                    finally:
                        self.say("[dim]stopping the local federation ...[/dim]")
            finally:
                self.keeper.stop()  # already stopped with the rest: a killed one's socket
                left = self.supervisor.remaining()
                forced = [p.name for p in self.supervisor.processes if p.forced]
                notes = []
                if forced:
                    notes.append(f"SIGKILL after {self.options.grace_seconds:.0f} s: {forced}")
                if self.supervisor.swept:
                    helpers = sorted(map(_program, self.supervisor.swept.values()))
                    notes.append(f"swept helpers: {', '.join(helpers)}")
                if left:  # pragma: no cover - the sweep should have caught them
                    self.say(f"[red]processes still running after the stop: {left}[/red]")
                else:
                    note = f" ({'; '.join(notes)})" if notes else ""
                    self.say(f"[dim]all processes stopped{escape(note)}[/dim]")

    def say(self, message: str) -> None:
        """A progress line, prefixed with the seconds since :meth:`run` began."""
        elapsed = time.monotonic() - self._t0
        self.console.print(f"[dim]{elapsed:6.1f}s[/dim] {message}", highlight=False)

    def paths(self) -> dict[str, Path]:
        """Where things live in the work dir (stable names the docs and tests rely on)."""
        return {
            "pki": self.work / "pki",
            "run_config": self.work / "run.toml",
            "hospital_configs": self.work / "hospitals",
            "state_db": self.work / "state.db",
            "superlink_log": self.work / "superlink.log",
            "homes": self.work / "homes",
        }

    # ------------------------------------------------------------------ 1. work dir

    def prepare(self) -> None:
        """Create the work dir, certificates and keys, run and hospital TOML files."""
        work = self.work
        if work.exists() and any(work.iterdir()):
            if not (work / WORK_DIR_MARKER).exists():
                raise FederationError(
                    f"work dir '{work}' exists and was not made by fedclinic; refusing to use it"
                )
            shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
        (work / WORK_DIR_MARKER).write_text("made by fedclinic local; safe to delete\n")
        self.options.output_dir.mkdir(parents=True, exist_ok=True)
        paths = self.paths()
        if self.options.tls:
            names = [h.name for h in self.options.hospitals] if self.options.node_auth else []
            self.pki = provision(paths["pki"], names)
        write_flat_toml(paths["run_config"], self.options.run_config)
        for spec in self.options.hospitals:
            write_flat_toml(paths["hospital_configs"] / f"{spec.name}.toml", spec.flat)
        self.say(f"work dir: {work}")

    # ------------------------------------------------------------------ 2. SuperLink

    def superlink_command(self) -> list[str]:
        """Flower's SuperLink through :mod:`fedclinic.superlink` (a longer SQLite busy
        timeout: without it many hospitals lose replies; docs/reliability.md)."""
        paths = self.paths()
        command = [sys.executable, "-m", "fedclinic.superlink"]
        if self.pki is not None:
            command += [
                "--ssl-ca-certfile", str(self.pki.ca_cert),
                "--ssl-certfile", str(self.pki.server_cert),
                "--ssl-keyfile", str(self.pki.server_key),
            ]  # fmt: skip
            if self.options.node_auth:
                command.append("--enable-supernode-auth")
        else:
            command.append("--insecure")
        command += [
            "--fleet-api-address", f"{LOOPBACK}:{self.fleet_port}",
            "--host", LOOPBACK,
            "--port", str(self.control_port),
            "--disable-runtime-dependency-installation",
            "--database", str(paths["state_db"]),
        ]  # fmt: skip
        return command

    def start_superlink(self, attempts: int = 3, same_ports: bool = False) -> None:
        """Start the SuperLink and wait for ``/health``; new ports if one was taken meanwhile.

        ``same_ports`` restarts a coordinator where its hospitals expect it (after a crash;
        its state database keeps the registered hospital keys).
        """
        log_path = self.paths()["superlink_log"]
        for attempt in range(1, attempts + 1):
            if not same_ports:
                self.fleet_port, self.control_port = pick_free_ports(2)
            env = {**self.env, "FLWR_HOME": str(self.paths()["homes"] / "superlink")}
            if self.pki is not None:  # the audit log records what the coordinator serves
                env[CERTIFICATES_VARIABLE] = os.pathsep.join(
                    [str(self.pki.ca_cert), str(self.pki.server_cert)]
                )
            self.superlink = self.supervisor.start(
                "superlink", self.superlink_command(), log_path, env=env, tier=0
            )
            try:
                self._wait_healthy(self.superlink)
            except FederationError:
                tail = tail_file(log_path, 30).lower()
                if (
                    attempt < attempts
                    and not same_ports
                    and any(hint in tail for hint in PORT_IN_USE_HINTS)
                ):
                    self.supervisor.stop(self.superlink)
                    continue
                raise
            break
        ca = self.pki.ca_cert if self.pki else None
        self.cli.configure(f"{LOOPBACK}:{self.control_port}", ca)
        mode = "TLS" if self.pki else "plaintext (--insecure)"
        auth = "on" if self.pki and self.options.node_auth else "off"
        self.say(
            f"SuperLink up: Fleet API {LOOPBACK}:{self.fleet_port}, Control API "
            f"{LOOPBACK}:{self.control_port}, {mode}, node authentication {auth}"
        )

    def _wait_healthy(self, process: ManagedProcess) -> None:
        scheme = "https" if self.pki else "http"
        url = f"{scheme}://{LOOPBACK}:{self.control_port}/health"
        ca = self.pki.ca_cert if self.pki else None
        deadline = time.monotonic() + self.options.startup_timeout
        while time.monotonic() < deadline:
            if process.exit_code() is not None:
                raise FederationError(
                    f"the SuperLink exited with status {process.exit_code()} during start-up; "
                    f"see {process.log_path}:\n{process.log_tail(25)}"
                )
            if health_check(url, ca):
                return
            time.sleep(0.25)
        raise FederationError(
            f"the SuperLink did not answer {url} within {self.options.startup_timeout:.0f} s; "
            f"see {process.log_path}:\n{process.log_tail(25)}"
        )

    # ------------------------------------------------------------------ 3. hospitals

    def supernode_command(
        self, spec: HospitalSpec, port: int, *, site_worker: bool | None = None
    ) -> list[str]:
        """The hospital's SuperNode (``port``: its Runtime API); where the hospital has a
        site worker (``site_worker``; default: as this federation starts it), the worker
        takes its tasks (``--isolation process``), else Flower's SuperExec does."""
        keys = self.pki.hospitals[spec.name] if self.pki and self.options.node_auth else None
        if site_worker is None:
            site_worker = not workers_disabled(self.hospital_environment(spec))
        return supernode_command(
            f"{LOOPBACK}:{self.fleet_port}",
            self.paths()["hospital_configs"] / f"{spec.name}.toml",
            port,
            root_certificates=self.pki.ca_cert if self.pki else None,
            private_key=keys.private_key if keys else None,
            max_retries=20,
            max_wait_time=120,
            isolation=NODE_ISOLATION if site_worker else None,
        )

    def hospital_environment(self, spec: HospitalSpec) -> dict[str, str]:
        """The environment of one hospital's SuperNode, inherited by its SuperExec and every
        ``flwr-clientapp`` it starts, and of its site worker: ours, the hospital's own
        ``env``, its ``FLWR_HOME``; ``FEDCLINIC_WORKER=off`` where it has no worker."""
        env = {**self.env, **spec.env, "FLWR_HOME": str(self.paths()["homes"] / spec.name)}
        if not self.options.site_workers:
            env[MODE_VARIABLE] = "off"
        return env

    def start_worker(self, spec: HospitalSpec, port: int) -> bool:
        """Start the hospital's site worker, taking the tasks of the node whose Runtime API
        is ``port`` (returns at once); False where it has none."""
        env = self.hospital_environment(spec)
        if workers_disabled(env):
            return False
        nice = self.options.hospital_niceness
        self.keeper.add(
            spec.name,
            self.paths()["hospital_configs"] / f"{spec.name}.toml",
            spec.flat,
            self.work / log_name(spec.name, "-worker"),
            env=env,
            prefix=["nice", "-n", str(nice)] if nice else [],
            runtime_address=f"{LOOPBACK}:{port}",
        )
        return True

    def start_hospitals(self) -> None:
        """Register each hospital's key, start its SuperNode, wait until all are online."""
        specs = self.options.hospitals
        if self.pki is not None and self.options.node_auth:
            for spec in specs:
                keys = self.pki.hospitals[spec.name]
                try:
                    self.node_ids[spec.name] = self.cli.register_supernode(
                        keys.public_key, spec.name
                    )
                except FlowerCliError as err:
                    raise FederationError(f"registering {spec.name}: {err}") from None
        # the workers import torch while the SuperNodes come online
        ports = pick_free_ports(len(specs))
        self.runtime_ports = dict(zip([spec.name for spec in specs], ports, strict=True))
        workers = [
            spec.name for spec, port in zip(specs, ports, strict=True)
            if self.start_worker(spec, port)
        ]  # fmt: skip
        for spec, port in zip(specs, ports, strict=True):
            command = self.supernode_command(spec, port)
            if self.options.hospital_niceness:
                command = ["nice", "-n", str(self.options.hospital_niceness), *command]
            self.supernodes[spec.name] = self.supervisor.start(
                spec.name,
                command,
                self.work / log_name(spec.name),
                env=self.hospital_environment(spec),
                tier=1,
            )
        self._wait_online()
        self._wait_workers()
        names = ", ".join(
            f"{n} (node {self.node_ids[n]})" if n in self.node_ids else n for n in self.supernodes
        )
        served = f"{len(workers)} site worker(s) serving" if workers else "no site workers"
        self.say(f"{len(specs)} hospitals online: {names}; {served}")

    def _wait_workers(self) -> None:
        """Until every site worker serves (the run's first message would otherwise be
        answered in process), or one could not start."""
        try:
            self.keeper.wait_serving(
                max(self.options.startup_timeout, START_TIMEOUT), tick=self._check_processes
            )
        except WorkerError as err:
            raise FederationError(str(err)) from None

    def _wait_online(self) -> None:
        """Until ``flwr supernode list`` shows every hospital online, or a SuperNode died."""
        expected = len(self.supernodes)
        deadline = time.monotonic() + self.options.startup_timeout
        online, pause = 0, 1.0
        while time.monotonic() < deadline:
            # each check is a `flwr` process (about a CPU-second, more on a busy machine) and
            # a SuperNode takes seconds to connect: ask after 1, 2.5, 4.75, 8 s, then every 5 s
            time.sleep(pause)
            pause = min(1.5 * pause, 5.0)
            self._check_processes()
            try:
                nodes = self.cli.supernodes()
            except FlowerCliError:
                nodes = []
            online = sum(1 for n in nodes if n.get("status") == "online")
            if online >= expected:
                return
        tails = "\n".join(f"--- {p.log_path}:\n{p.log_tail(10)}" for p in self.supernodes.values())
        raise FederationError(
            f"only {online} of {expected} hospitals came online within "
            f"{self.options.startup_timeout:.0f} s\n{tails}"
        )

    def _check_processes(self) -> None:
        """Fail at once, with its log, when the SuperLink or a SuperNode has exited or a site
        worker could not start; restart a site worker that died after it served."""
        if self.superlink is not None and self.superlink.exit_code() is not None:
            raise FederationError(
                f"the SuperLink exited with status {self.superlink.exit_code()}; "
                f"see {self.superlink.log_path}:\n{self.superlink.log_tail(25)}"
            )
        for name, process in self.supernodes.items():
            if process.exit_code() is not None:
                tail = process.log_tail(25)
                found = diagnose(tail, f"{LOOPBACK}:{self.fleet_port}", None)
                reason = f": {found.message}" if found else ""
                raise FederationError(
                    f"the SuperNode of {name} exited with status {process.exit_code()}"
                    f"{reason}; see {process.log_path}:\n{tail}"
                )
        try:
            self.keeper.check()
        except WorkerError as err:
            raise FederationError(str(err)) from None

    # ------------------------------------------------------------------ 4. the run

    def submit(self) -> int:
        """``flwr run``: package the app, start the run, return its ID."""
        try:
            run_id = self.cli.submit(self.options.app_dir, self.paths()["run_config"])
        except FlowerCliError as err:
            raise FederationError(f"submitting the run: {err}") from None
        self.say(
            f"run {run_id} submitted: {self.options.run_config.get('algorithm', '?')}, "
            f"{self.options.rounds} rounds; results in {self.options.output_dir}"
        )
        return run_id

    def follower(self) -> RunFollower:
        """Follows the run while checking that every SuperNode process is still alive."""
        return RunFollower(
            self.cli,
            self.console,
            self.options.output_dir,
            rounds=self.options.rounds,
            timeout=self.options.timeout,
            poll_interval=self.options.poll_interval,
            check=self._check_processes,
        )

    def follow(self, run_id: int) -> RunStatus:
        return self.follower().follow(run_id)

    # ------------------------------------------------------------------ 5. outcome

    def report(self, status: RunStatus) -> RunOutcome:
        outcome = self.follower().report(status)
        outcome.node_ids = dict(self.node_ids)
        return outcome
