"""``fedclinic hospital``: one hospital's node, the hospital image's entrypoint.

It runs Flower's SuperNode (whose messages the site worker answers) with the hospital's
config, the consortium CA and the hospital's private key, and makes its failures readable:

1. the inputs are checked before anything starts (hospital config, CA certificate, private
   key, the data source and its path, the shared files): a mistake is one ``error:`` line
   and exit 2; ``--ca/--key/--config`` default to the image's mount points only inside a
   container; the state dir is locked while the node runs (a second node on it is refused);
2. the hospital's site worker (:mod:`fedclinic.worker`: torch, the data and the model
   loaded once, taking every message from the node's Runtime API on ``--runtime-port``;
   the node runs with ``--isolation process``) starts first, and the node only once it
   serves (bounded by ``--worker-timeout``; a worker that cannot start is one ``error:``
   line); it is restarted when it dies while the node runs
   (:class:`~fedclinic.worker.keeper.WorkerKeeper`). ``--no-worker`` or
   ``FEDCLINIC_WORKER=off`` keep the per-message path (each ClientApp answers in process);
3. flower-supernode runs under a :class:`ProcessSupervisor`, its log (and the worker's)
   streamed to stdout; SIGTERM/Ctrl-C stop it gracefully, so the coordinator marks the
   node offline at once, and the worker with it (SIGTERM, ``docker stop``, then ends with
   exit 0 when both left within ``--stop-timeout``; no socket is left in the state dir);
4. when the coordinator refuses the key (Flower 2004) it tries again, a bounded number of
   times (the worker keeps running): a node that was killed hard stays "online" at the
   coordinator for up to a minute, and the operator may be registering the key right now;
5. any other failure, or the last refusal, ends with one ``error:`` line saying what
   happened and what to do (exit 1). Nothing else is retried here: connection losses are
   retried by Flower itself for ``--connect-timeout`` seconds, and a container restart
   policy covers the rest.

The node's log says, with a timestamp, when it joined the coordinator (Flower accepted it)
and when it left.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedclinic.data import preflight
from fedclinic.errors import ConfigError, FedClinicError
from fedclinic.local.configs import HospitalSpec, load_hospital_files
from fedclinic.local.federation import (
    Interrupted,
    flower_bin_dir,
    flower_environment,
    signals_as_exceptions,
)
from fedclinic.local.ports import LOOPBACK, is_port_free
from fedclinic.local.supernode import (
    DEFAULT_HEALTH_ADDRESS,
    diagnose,
    grpc_detail,
    supernode_command,
)
from fedclinic.local.supervisor import ProcessSupervisor, read_from, tail_file
from fedclinic.site import effective_state_dir, state_dir_lock
from fedclinic.training import select_device
from fedclinic.worker.forwarder import MODE_VARIABLE
from fedclinic.worker.keeper import NODE_ISOLATION, WorkerError, WorkerKeeper, workers_disabled

EXIT_OK, EXIT_FAILED = 0, 1
__all__ = ["DEFAULT_HEALTH_ADDRESS", "run_hospital"]


#: the hospital image's mount points: ``--ca``, ``--key`` and ``--config`` default to them
#: inside a container only (outside one, a path that happens to exist must not be used)
CONTAINER_DEFAULTS = {
    "ca": Path("/certs/ca.crt"),
    "key": Path("/keys/hospital.key"),
    "config": Path("/config/hospital.toml"),
}
CONTAINER_MARKERS = (Path("/.dockerenv"), Path("/run/.containerenv"))


def in_container() -> bool:
    """Docker and Podman leave a marker file; ``FEDCLINIC_CONTAINER=1`` says so explicitly."""
    if os.environ.get("FEDCLINIC_CONTAINER") in ("1", "0"):
        return os.environ["FEDCLINIC_CONTAINER"] == "1"
    return any(marker.exists() for marker in CONTAINER_MARKERS)


def resolve_paths(args: argparse.Namespace) -> None:
    """Fill ``--ca/--key/--config`` from the container defaults, inside a container only."""
    for name, default in CONTAINER_DEFAULTS.items():
        if getattr(args, name) is not None:
            continue
        if not in_container():
            raise ConfigError(
                f"--{name} is required outside the hospital container (its default "
                f"'{default}' is the image's mount point)"
            )
        setattr(args, name, default)


# ---------------------------------------------------------------------------- 1. inputs


def check_address(superlink: str) -> None:
    """``HOST:PORT`` with a port number; IPv6 hosts in brackets."""
    host, sep, port = superlink.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(
            f"--superlink {superlink!r}: expected HOST:PORT of the coordinator's Fleet API, "
            "e.g. coordinator.example.org:9092"
        )


def check_certificate(path: Path) -> None:
    """The consortium CA: a readable PEM certificate."""
    try:
        x509.load_pem_x509_certificate(path.read_bytes())
    except OSError as err:
        raise ConfigError(f"--ca '{path}' cannot be read: {err.strerror}") from None
    except ValueError:
        raise ConfigError(
            f"--ca '{path}' is not a PEM certificate: expected the consortium's ca.crt"
        ) from None


def check_private_key(path: Path) -> None:
    """An OpenSSH ECDSA private key, readable by this user (the image runs as uid 10001)."""
    try:
        data = path.read_bytes()
    except PermissionError:
        raise ConfigError(
            f"--key '{path}' cannot be read by this user: the hospital container runs as "
            "uid 10001, so the key file must be readable by it (chown 10001, mode 0600)"
        ) from None
    except OSError as err:
        raise ConfigError(f"--key '{path}' cannot be read: {err.strerror}") from None
    if data.lstrip().startswith(b"ecdsa-sha2-"):
        raise ConfigError(
            f"--key '{path}' is a public key: pass the private key (the file without .pub)"
        )
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except (ValueError, TypeError):
        key = None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(
            f"--key '{path}' is not an unencrypted OpenSSH ECDSA private key: Flower's node "
            "authentication needs ECDSA on a NIST curve (fedclinic certs writes one)"
        )


def check_data(spec: HospitalSpec) -> None:
    """The hospital's data source, checked without the run config (which the coordinator
    sends later): a known source, its path in place with the source's shape of file or
    folder (nothing is loaded), the shared files the config names."""
    config = spec.config
    if config.data_path and not Path(config.data_path).expanduser().exists():
        raise ConfigError(
            f"{spec.source}: hospital config: key 'data-path' = {config.data_path!r}: no "
            "such file or folder (mount the site's data read-only, e.g. at /data)"
        )
    try:
        preflight(config)
        select_device(config.device)  # 'cuda' where this node sees no GPU: refused now
    except FedClinicError as err:
        raise ConfigError(f"{spec.source}: {err}") from None


def check_ports(args: argparse.Namespace) -> None:
    """The node's own loopback ports are free (a second node on one host needs others)."""
    host, _, port = args.health_server_address.rpartition(":")
    health = int(port) if port.isdigit() else -1
    for option, address, number in (
        ("--runtime-port", LOOPBACK, args.runtime_port),
        ("--health-server-address", host.strip("[]") or LOOPBACK, health),
    ):
        if not 0 < number < 65536:
            raise ConfigError(f"{option}: expected a port number 1..65535, got {number}")
        if not is_port_free(number, address):
            raise ConfigError(
                f"{option}: port {number} on {address} is in use (another hospital node on "
                f"this host?); give this node a free port with {option}"
            )


def check_inputs(args: argparse.Namespace) -> HospitalSpec:
    """Everything a start needs, checked before it; raises a one-line :class:`ConfigError`."""
    check_address(args.superlink)
    resolve_paths(args)
    spec = load_hospital_files([args.config])[0]
    check_data(spec)
    check_certificate(args.ca)
    check_private_key(args.key)
    check_ports(args)
    if not (
        args.attempts >= 1
        and 0 <= args.retry_wait < float("inf")
        and 0 < args.connect_timeout < float("inf")
    ):
        raise ConfigError(
            "--attempts must be >= 1, --retry-wait >= 0 and --connect-timeout > 0 seconds"
        )
    if not 0 < args.stop_timeout < 3600:
        raise ConfigError(f"--stop-timeout = {args.stop_timeout}: expected seconds in (0, 3600)")
    if not 0 < args.worker_timeout < float("inf"):
        raise ConfigError(f"--worker-timeout = {args.worker_timeout}: expected seconds > 0")
    return spec


# ---------------------------------------------------------------------------- 2. one start


class Echo:
    """Copies what a process appends to its log file to our stdout (``docker logs``)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0

    def __call__(self) -> None:
        chunk = read_from(self.path, self.offset)
        if chunk:
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
        self.offset += len(chunk)


JOINED = re.compile(rb"SuperNode ID: (\d+)")


def say(name: str, message: str) -> None:
    """One timestamped line of our own in the node's log (stderr)."""
    stamp = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    print(f"{stamp} fedclinic hospital {name}: {message}", file=sys.stderr, flush=True)


def run_supernode(
    command: list[str],
    env: dict[str, str],
    supervisor: ProcessSupervisor,
    joined: Callable[[str], None] = lambda node: None,
    tick: Callable[[], None] = lambda: None,
    stopping: Callable[[], None] = lambda: None,
) -> tuple[int, str]:
    """Run one SuperNode until it exits; its status and the tail of its log.

    ``joined`` is called once with the node ID when the coordinator accepted the node
    (Flower logs ``SuperNode ID: <id>`` once connected and activated); ``tick`` at every
    poll (the site worker's watch); ``stopping`` when a signal stops us, before the node is
    stopped (the site worker is told to stop at the same time). The supervisor stops it
    (SIGTERM to its process group, so Flower deactivates the node) and sweeps its SuperExec
    and ClientApps also when :class:`Interrupted` unwinds.
    """
    with tempfile.TemporaryDirectory(prefix="fedclinic-hospital-") as tmp, supervisor:
        log_path = Path(tmp) / "supernode.log"
        process = supervisor.start("supernode", command, log_path, env=env)
        echo, node = Echo(log_path), ""
        try:
            while (status := process.exit_code()) is None:
                echo()
                tick()
                if not node and (found := JOINED.search(_read(log_path))):
                    node = found[1].decode()
                    joined(node)
                time.sleep(0.2)
        except Interrupted:
            stopping()
            raise
        finally:
            supervisor.stop_all()
            echo()
        return status, tail_file(log_path, 80)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()[-65536:]
    except OSError:
        return b""


# ---------------------------------------------------------------------------- 3./4. loop


def _error(message: str) -> None:
    print(f"error: {' '.join(message.split())}", file=sys.stderr, flush=True)


def _idle() -> None:
    """No site worker to watch."""


def start_worker(
    keeper: WorkerKeeper,
    spec: HospitalSpec,
    config: Path,
    env: dict[str, str],
    echo: Echo,
    runtime_address: str,
) -> Callable[[], None]:
    """Start the hospital's site worker, which takes the tasks of the node whose Runtime API
    is ``runtime_address``, and wait until it serves (its log echoed meanwhile); the watch to
    run while the node runs: echo the worker's log, restart it if it died."""
    keeper.add(
        spec.name, config, spec.flat, echo.path, env=env, log_hint="its lines above",
        runtime_address=runtime_address,
    )  # fmt: skip
    say(spec.name, f"starting its site worker (up to {keeper.start_timeout:g} s)")
    keeper.wait_serving(tick=echo)
    echo()

    def watch() -> None:
        echo()
        keeper.check()

    return watch


def run_hospital(args: argparse.Namespace) -> int:
    """``fedclinic hospital``: check, lock the state dir, start, retry refusals, end with one
    clear line; the log says when the node joined the coordinator and when it left."""
    spec = check_inputs(args)  # a ConfigError: one line, exit 2 (fedclinic.cli)
    bin_dir = flower_bin_dir()
    env = flower_environment(bin_dir)
    state_dir = effective_state_dir(spec.config)
    # Flower's own node state (installed apps) is site state too: one per node, unless the
    # environment names it (the image sets FLWR_HOME=/state/flwr)
    env.setdefault("FLWR_HOME", str(state_dir.resolve() / "flwr"))
    name = spec.name
    joined: list[str] = []

    def on_join(node: str) -> None:
        joined.append(node)
        say(name, f"joined the coordinator at {args.superlink} as node {node}")

    def left(reason: str) -> None:
        if joined:
            say(name, f"left the coordinator at {args.superlink} ({reason})")

    # a stop (docker stop: SIGTERM, then SIGKILL after 10 s) leaves time to deregister
    supervisor = ProcessSupervisor(grace_seconds=args.stop_timeout)
    use_worker = not (args.no_worker or workers_disabled(env))
    if not use_worker:  # the forwarder then answers in process, whatever else serves
        env[MODE_VARIABLE] = "off"
    command = supernode_command(
        args.superlink,
        args.config,
        args.runtime_port,
        root_certificates=args.ca,
        private_key=args.key,
        max_wait_time=args.connect_timeout,
        health_address=args.health_server_address,
        isolation=NODE_ISOLATION if use_worker else None,  # the worker takes the node's tasks
    )
    keeper = WorkerKeeper(
        ProcessSupervisor(grace_seconds=args.stop_timeout), say, start_timeout=args.worker_timeout
    )

    echoes: list[Echo] = []  # the worker's log, once there is one

    def stop_worker(since: float | None = None) -> None:
        """Wait for the worker (SIGTERMed with the node) what is left of ``--stop-timeout``
        since the signal, then kill it."""
        spent = 0.0 if since is None else time.monotonic() - since
        keeper.stop(max(1.0, args.stop_timeout - spent))
        for echo in echoes:  # its last lines: how it stopped
            echo()

    with (
        state_dir_lock(state_dir, f"hospital {name}"),
        signals_as_exceptions(),
        tempfile.TemporaryDirectory(prefix="fedclinic-worker-") as tmp,
        keeper.supervisor,
    ):
        try:
            tick = _idle
            if use_worker:
                echoes.append(Echo(Path(tmp) / "worker.log"))
                tick = start_worker(
                    keeper, spec, args.config, env, echoes[0], f"{LOOPBACK}:{args.runtime_port}"
                )
            else:
                say(name, f"no site worker (--no-worker or {MODE_VARIABLE}=off): every message "
                    "is answered in the node's ClientApp process")  # fmt: skip
            for attempt in range(1, args.attempts + 1):
                say(name, f"joining {args.superlink} (attempt {attempt}/{args.attempts})")
                joined.clear()
                status, log = run_supernode(
                    command, env, supervisor, on_join, tick, stopping=keeper.terminate
                )
                if status == 0:
                    left("the node stopped")
                    return EXIT_OK
                left(f"flower-supernode exited with {status}")
                found = diagnose(log, args.superlink, args.ca)
                if found is not None and found.retry and attempt < args.attempts:
                    say(name, f"{found.message}; trying again in {args.retry_wait:g} s")
                    time.sleep(args.retry_wait)
                    continue
                if found is None:
                    detail = grpc_detail(log) or "see the log above"
                    _error(f"hospital {name}: flower-supernode exited with {status}: {detail}")
                else:
                    _error(f"hospital {name}: {found.message}")
                return EXIT_FAILED
        except WorkerError as err:
            left("its site worker failed")
            _error(str(err))
            return EXIT_FAILED
        except Interrupted as stop:
            stop_worker(stop.at)
            left(f"stopped by {stop}")
            say(name, f"stopped ({stop})")
            # SIGTERM is how a container is stopped: a clean stop when the node left in time
            processes = [*supervisor.processes, *keeper.processes()]
            if forced := sorted({p.name for p in processes if p.forced}):
                say(name, f"killed after --stop-timeout = {args.stop_timeout:g} s: "
                    f"{', '.join(forced)}")  # fmt: skip
            clean = stop.signum == signal.SIGTERM and not forced
            return EXIT_OK if clean else 128 + stop.signum
        finally:
            stop_worker()
    return EXIT_FAILED  # pragma: no cover - the loop always returns
