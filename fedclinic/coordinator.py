"""``fedclinic coordinator``: the consortium's coordinator, Flower's SuperLink with TLS and
hospital authentication always on (the coordinator image's entrypoint; also a plain command).

From two folders it derives everything ``flower-superlink`` needs, so an operator never
rebuilds its flags by hand:

- ``--certs DIR`` (what ``fedclinic certs`` wrote): ``ca.crt``, ``server.pem`` and
  ``server.key`` become ``--ssl-ca-certfile``/``--ssl-certfile``/``--ssl-keyfile``, node
  authentication is on (``--enable-supernode-auth``: only registered hospital keys join), and
  the certificates' fingerprints reach the audit log (``FEDCLINIC_CERTIFICATES``);
- ``--state-dir DIR``: the SuperLink's database (registrations, runs) and Flower's
  ``FLWR_HOME``, kept across restarts.

The inputs are checked first (one ``error:`` line, exit 2, nothing started). Then it runs
the SuperLink (``python -m fedclinic.superlink``: Flower's own, with a longer SQLite busy
timeout) as its child, passes SIGTERM/Ctrl-C on to it, and exits 0 when that stop went
cleanly (``docker stop``), else with the SuperLink's status. Flower's executables are found
the way the OS finds them (:func:`fedclinic.local.federation.flower_bin_dir`), not from the
caller's ``PATH``.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import FrameType

from cryptography import x509

from fedclinic.audit import CERTIFICATES_VARIABLE
from fedclinic.errors import ConfigError, FedClinicError
from fedclinic.flower import flower_bin_dir, flower_environment

EXIT_OK, EXIT_CONFIG = 0, 2
CA_CERT, SERVER_CERT, SERVER_KEY = "ca.crt", "server.pem", "server.key"
DATABASE = "superlink.db"


def configure(parser: argparse.ArgumentParser) -> None:
    """Arguments; the image passes ``--certs /certs --state-dir /state`` and public addresses."""
    parser.add_argument(
        "--certs", type=Path, required=True, metavar="DIR",
        help=f"the coordinator's TLS files from 'fedclinic certs': {CA_CERT}, {SERVER_CERT}, "
        f"{SERVER_KEY}",
    )  # fmt: skip
    parser.add_argument(
        "--state-dir", type=Path, required=True, metavar="DIR",
        help=f"kept across restarts: the SuperLink's database ({DATABASE}: registered "
        "hospitals, runs) and Flower's FLWR_HOME (flwr/)",
    )  # fmt: skip
    parser.add_argument(
        "--fleet-address", default="0.0.0.0:9092", metavar="HOST:PORT",
        help="where hospitals dial in (Fleet API, gRPC + TLS) (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--control-address", default="127.0.0.1:8000", metavar="HOST:PORT",
        help="the operators' Control API and the ServerApp's Runtime API (HTTPS); keep it "
        "off the internet (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--health-address", default=None, metavar="HOST:PORT",
        help="Flower's gRPC health service, for a container health check (default: off)",
    )  # fmt: skip


# ---------------------------------------------------------------------------- checks


def split_address(option: str, value: str) -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 hosts in brackets) as ``(host, port)``; one line when it is not."""
    host, sep, port = value.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{option} {value!r}: expected HOST:PORT, e.g. 0.0.0.0:9092")
    return host, int(port)


def check_port_free(option: str, value: str) -> None:
    """Bind the address for a moment (as the servers will, with SO_REUSEADDR)."""
    host, port = split_address(option, value)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as err:
            reason = "in use" if err.errno in (98, 48) else (err.strerror or str(err))
            raise ConfigError(
                f"{option} {value}: port {port} on {host} cannot be used ({reason}): stop "
                f"what holds it or choose another with {option}"
            ) from None


def check_certificates(certs: Path) -> dict[str, Path]:
    """The three TLS files, readable, the certificates PEM; their absolute paths."""
    files = {name: (certs / name).resolve() for name in (CA_CERT, SERVER_CERT, SERVER_KEY)}
    for name, path in files.items():
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ConfigError(
                f"--certs '{certs}': no {name} (make the coordinator's files with 'fedclinic "
                "certs'; docs/provisioning.md)"
            ) from None
        except OSError as err:
            raise ConfigError(f"--certs: '{path}' cannot be read: {err.strerror}") from None
        if name == SERVER_KEY:
            if b"PRIVATE KEY" not in data:
                raise ConfigError(f"--certs: '{path}' is not a PEM private key")
            continue
        try:
            x509.load_pem_x509_certificate(data)
        except ValueError:
            raise ConfigError(f"--certs: '{path}' is not a PEM certificate") from None
    return files


def check_state_dir(state_dir: Path) -> Path:
    """Create the state dir if needed; it must be writable by this user."""
    state = state_dir.resolve()
    try:
        (state / "flwr").mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"--state-dir '{state_dir}' cannot be created: {err.strerror}") from None
    if not os.access(state, os.W_OK | os.X_OK):
        raise ConfigError(f"--state-dir '{state_dir}' is not writable by this user")
    return state


# ---------------------------------------------------------------------------- the command


def superlink_command(
    args: argparse.Namespace, files: dict[str, Path], state: Path, python: str = sys.executable
) -> list[str]:
    """``python -m fedclinic.superlink`` with the flower-superlink flags the options mean."""
    fleet = args.fleet_address
    host, port = split_address("--control-address", args.control_address)
    command = [
        python, "-m", "fedclinic.superlink",
        "--ssl-ca-certfile", str(files[CA_CERT]),
        "--ssl-certfile", str(files[SERVER_CERT]),
        "--ssl-keyfile", str(files[SERVER_KEY]),
        "--enable-supernode-auth",
        "--fleet-api-address", fleet,
        "--host", host,
        "--port", str(port),
        "--database", str(state / DATABASE),
        # the images carry the app's pinned stack; nothing is installed per run
        "--disable-runtime-dependency-installation",
    ]  # fmt: skip
    if args.health_address:
        command += ["--health-server-address", args.health_address]
    return command


def superlink_environment(
    files: dict[str, Path], state: Path, bin_dir: Path, base: dict[str, str] | None = None
) -> dict[str, str]:
    """Flower's environment (its tools first on PATH) with FLWR_HOME in the state dir and the
    served certificates for the audit log."""
    env = flower_environment(bin_dir, base)
    env["FLWR_HOME"] = str(state / "flwr")
    env[CERTIFICATES_VARIABLE] = os.pathsep.join([str(files[CA_CERT]), str(files[SERVER_CERT])])
    return env


def prepare(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """Check every input, then the SuperLink's command line and environment."""
    files = check_certificates(args.certs)
    for option in ("--fleet-address", "--control-address", "--health-address"):
        value = getattr(args, option[2:].replace("-", "_"))
        if value:
            check_port_free(option, value)
    state = check_state_dir(args.state_dir)
    bin_dir = flower_bin_dir()
    return superlink_command(args, files, state), superlink_environment(files, state, bin_dir)


def run_superlink(command: list[str], env: dict[str, str]) -> int:
    """Run the SuperLink until it exits; SIGTERM/SIGINT are passed on to it once.

    Its own session, so a terminal's Ctrl-C reaches it only through us (Flower's server
    treats a second signal as "force quit"). A stop we passed on that ends the SuperLink is a
    clean stop: exit 0 (uvicorn re-raises the signal, so Flower itself ends with 143).
    """
    child = subprocess.Popen(command, env=env, start_new_session=True)
    stopping: list[int] = []

    def forward(signum: int, frame: FrameType | None) -> None:
        if not stopping:
            stopping.append(signum)
            child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        status = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stopping and status in (0, -stopping[0], 128 + stopping[0]):
        print(f"fedclinic coordinator: stopped ({signal.Signals(stopping[0]).name})",
              file=sys.stderr, flush=True)  # fmt: skip
        return EXIT_OK
    return 128 - status if status < 0 else status


def run_coordinator(args: argparse.Namespace) -> int:
    """``fedclinic coordinator``: check the inputs, then run the SuperLink until it stops."""
    try:
        command, env = prepare(args)
    except FedClinicError as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return EXIT_CONFIG
    print(
        f"fedclinic coordinator: Fleet API {args.fleet_address} (TLS, hospital "
        f"authentication), Control API {args.control_address}, state in {args.state_dir}",
        file=sys.stderr, flush=True,
    )  # fmt: skip
    return run_superlink(command, env)


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Declare ``fedclinic coordinator``."""
    help_text = "run the coordinator: Flower's SuperLink with TLS and hospital authentication"
    parser = subparsers.add_parser("coordinator", help=help_text, description=help_text)
    configure(parser)
    parser.set_defaults(handler=run_coordinator)
