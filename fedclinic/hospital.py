"""``fedclinic hospital``: one hospital's node, the hospital image's entrypoint.

It runs Flower's SuperNode (which spawns our ClientApp per message) with the hospital's
config, the consortium CA and the hospital's private key, and makes its failures readable:

1. the inputs are checked before anything starts (hospital config, CA certificate, private
   key, data path): a mistake is one ``error:`` line and exit 2;
2. flower-supernode runs under a :class:`ProcessSupervisor`, its log streamed to stdout;
   SIGTERM/Ctrl-C stop it gracefully, so the coordinator marks the node offline at once
   (SIGTERM, ``docker stop``, then ends with exit 0 when the node left within
   ``--stop-timeout``);
3. when the coordinator refuses the key (Flower 2004) it tries again, a bounded number of
   times: a node that was killed hard stays "online" at the coordinator for up to a minute,
   and the operator may be registering the key right now;
4. any other failure, or the last refusal, ends with one ``error:`` line saying what
   happened and what to do (exit 1). Nothing else is retried here: connection losses are
   retried by Flower itself for ``--connect-timeout`` seconds, and a container restart
   policy covers the rest.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedclinic.errors import ConfigError, FedClinicError
from fedclinic.local.configs import HospitalSpec, load_hospital_files
from fedclinic.local.federation import (
    Interrupted,
    flower_bin_dir,
    flower_environment,
    signals_as_exceptions,
)
from fedclinic.local.supernode import diagnose, grpc_detail, supernode_command
from fedclinic.local.supervisor import ProcessSupervisor, tail_file

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2
DEFAULT_HEALTH_ADDRESS = "127.0.0.1:9099"
STOP_GRACE_SECONDS = 7.0  # SIGTERM -> SIGKILL for the SuperNode, under Docker's default 10 s


def configure(parser: argparse.ArgumentParser) -> None:
    """Arguments; the defaults are the hospital image's mount points."""
    parser.add_argument(
        "--superlink", required=True, metavar="HOST:PORT",
        help="the coordinator's Fleet API (port 9092), e.g. coordinator.example.org:9092",
    )  # fmt: skip
    parser.add_argument(
        "--ca", type=Path, default=Path("/certs/ca.crt"), help="the consortium CA certificate"
    )
    parser.add_argument(
        "--key", type=Path, default=Path("/keys/hospital.key"),
        help="this hospital's private key (OpenSSH ECDSA; never leaves the site)",
    )  # fmt: skip
    parser.add_argument(
        "--config", type=Path, default=Path("/config/hospital.toml"), metavar="FILE.toml",
        help="this hospital's config (fedclinic.config.HospitalConfig)",
    )  # fmt: skip
    parser.add_argument(
        "--runtime-port", type=int, default=9094,
        help="the SuperNode's own Runtime API port on loopback (one per node on a host)",
    )  # fmt: skip
    parser.add_argument(
        "--health-server-address", default=DEFAULT_HEALTH_ADDRESS, metavar="HOST:PORT",
        help="Flower's gRPC health service, for the container health check",
    )  # fmt: skip
    parser.add_argument(
        "--connect-timeout", type=float, default=300.0, metavar="S",
        help="how long Flower keeps retrying an unreachable coordinator before giving up",
    )  # fmt: skip
    parser.add_argument(
        "--attempts", type=int, default=5, metavar="N",
        help="SuperNode starts while the coordinator refuses the key (Flower 2004)",
    )  # fmt: skip
    parser.add_argument(
        "--retry-wait", type=float, default=20.0, metavar="S", help="pause between attempts"
    )
    parser.add_argument(
        "--stop-timeout", type=float, default=STOP_GRACE_SECONDS, metavar="S",
        help="on SIGTERM, how long the SuperNode may take to leave before it is killed; keep "
        "it under the container's stop timeout (docker: 10 s) (default: %(default)s)",
    )  # fmt: skip


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


def check_data_path(spec: HospitalSpec) -> None:
    """A configured data path must exist: the site's data volume is mounted, read-only."""
    config = spec.config
    synthetic = config.data_source == "synthetic"
    if config.data_path and not synthetic and not Path(config.data_path).exists():
        raise ConfigError(
            f"{spec.source}: hospital config: key 'data-path' = {config.data_path!r}: no "
            "such file or folder (mount the site's data read-only, e.g. at /data)"
        )


def check_inputs(args: argparse.Namespace) -> HospitalSpec:
    """Everything a start needs, checked before it; raises a one-line :class:`ConfigError`."""
    check_address(args.superlink)
    spec = load_hospital_files([args.config])[0]
    check_data_path(spec)
    check_certificate(args.ca)
    check_private_key(args.key)
    if args.attempts < 1 or args.retry_wait < 0 or args.connect_timeout <= 0:
        raise ConfigError(
            "--attempts must be >= 1, --retry-wait >= 0 and --connect-timeout > 0 seconds"
        )
    if not 0 < args.stop_timeout < 3600:
        raise ConfigError(f"--stop-timeout = {args.stop_timeout}: expected seconds in (0, 3600)")
    return spec


# ---------------------------------------------------------------------------- 2. one start


def _echo(path: Path, offset: int) -> int:
    """Copy what the SuperNode appended to its log since ``offset`` to our stdout."""
    try:
        with path.open("rb") as log:
            log.seek(offset)
            chunk = log.read()
    except OSError:
        return offset
    if chunk:
        sys.stdout.buffer.write(chunk)
        sys.stdout.flush()
    return offset + len(chunk)


def run_supernode(
    command: list[str], env: dict[str, str], supervisor: ProcessSupervisor
) -> tuple[int, str]:
    """Run one SuperNode until it exits; its status and the tail of its log.

    The supervisor stops it (SIGTERM to its process group, so Flower deactivates the node)
    and sweeps its SuperExec and ClientApps also when :class:`Interrupted` unwinds.
    """
    with tempfile.TemporaryDirectory(prefix="fedclinic-hospital-") as tmp, supervisor:
        log_path = Path(tmp) / "supernode.log"
        process = supervisor.start("supernode", command, log_path, env=env)
        offset = 0
        try:
            while (status := process.exit_code()) is None:
                offset = _echo(log_path, offset)
                time.sleep(0.2)
        finally:
            supervisor.stop_all()
            _echo(log_path, offset)
        return status, tail_file(log_path, 80)


# ---------------------------------------------------------------------------- 3./4. loop


def _error(message: str) -> None:
    print(f"error: {' '.join(message.split())}", file=sys.stderr, flush=True)


def run_hospital(args: argparse.Namespace) -> int:
    """``fedclinic hospital``: check, start, retry refusals, end with one clear line."""
    try:
        spec = check_inputs(args)
        bin_dir = flower_bin_dir()
    except FedClinicError as err:
        _error(str(err))
        return EXIT_CONFIG
    command = supernode_command(
        bin_dir,
        args.superlink,
        args.config,
        args.runtime_port,
        root_certificates=args.ca,
        private_key=args.key,
        max_wait_time=args.connect_timeout,
        health_address=args.health_server_address,
    )
    env = flower_environment(bin_dir)
    # a stop (docker stop: SIGTERM, then SIGKILL after 10 s) leaves time to deregister
    supervisor = ProcessSupervisor(grace_seconds=args.stop_timeout)
    with signals_as_exceptions():
        try:
            for attempt in range(1, args.attempts + 1):
                print(
                    f"fedclinic hospital {spec.name}: joining {args.superlink} "
                    f"(attempt {attempt}/{args.attempts})",
                    file=sys.stderr, flush=True,
                )  # fmt: skip
                status, log = run_supernode(command, env, supervisor)
                if status == 0:
                    return EXIT_OK
                found = diagnose(log, args.superlink, args.ca)
                if found is not None and found.retry and attempt < args.attempts:
                    print(
                        f"fedclinic hospital {spec.name}: {found.message}; trying again in "
                        f"{args.retry_wait:g} s",
                        file=sys.stderr, flush=True,
                    )  # fmt: skip
                    time.sleep(args.retry_wait)
                    continue
                if found is None:
                    detail = grpc_detail(log) or "see the log above"
                    _error(f"hospital {spec.name}: flower-supernode exited with {status}: {detail}")
                else:
                    _error(f"hospital {spec.name}: {found.message}")
                return EXIT_FAILED
        except Interrupted as stop:
            # SIGTERM is how a container is stopped: a clean stop when the node left in time
            clean = stop.signum == signal.SIGTERM and not any(
                p.forced for p in supervisor.processes
            )
            print(f"fedclinic hospital {spec.name}: stopped ({stop})", file=sys.stderr)
            return EXIT_OK if clean else 128 + stop.signum
    return EXIT_FAILED  # pragma: no cover - the loop always returns
