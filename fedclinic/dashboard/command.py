"""``fedclinic dashboard``, and the dashboard ``fedclinic local --dashboard`` runs beside a run.

Binds to 127.0.0.1 unless told otherwise; any other address needs a token (``--token-file``
or ``$FEDCLINIC_DASHBOARD_TOKEN``), refused otherwise with one line before anything starts.
The operator reaches a coordinator's dashboard through an SSH tunnel
(``ssh -L 8080:127.0.0.1:8080 coordinator``, docs/operators.md).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import ssl
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from rich.console import Console

from fedclinic.dashboard.app import Settings, allowed_hosts, create_app, is_loopback
from fedclinic.dashboard.nodes import SuperLinkNodes
from fedclinic.dashboard.runs import RunsRoot
from fedclinic.errors import ConfigError, Interrupted
from fedclinic.local.flwr_cli import FlowerCli
from fedclinic.local.supervisor import ProcessSupervisor

TOKEN_VARIABLE = "FEDCLINIC_DASHBOARD_TOKEN"
DEFAULT_PORT = 8080
MIN_TOKEN_LENGTH = 16
DESCRIPTION = (
    "the coordinator's runs in a browser, live and read-only: hospitals, rounds, metric "
    "curves, refusals, equity, models"
)


def add_parser(subparsers: Any) -> None:
    """Declares ``fedclinic dashboard`` (:data:`fedclinic.cli.COMMANDS`)."""
    parser = subparsers.add_parser("dashboard", help=DESCRIPTION, description=DESCRIPTION)
    configure(parser)
    parser.set_defaults(handler=run_dashboard)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--runs", type=Path, default=Path("runs"), metavar="DIR",
        help="the coordinator's directory of run directories (the output-dir of each run "
        "lies in it; /runs in the coordinator image)",
    )  # fmt: skip
    parser.add_argument(
        "--host", default="127.0.0.1",
        help="address to listen on; anything but loopback needs a token",
    )  # fmt: skip
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port to listen on")
    parser.add_argument(
        "--token-file", type=Path, metavar="FILE",
        help=f"file holding the access token (its first line; default: ${TOKEN_VARIABLE})",
    )  # fmt: skip
    parser.add_argument(
        "--tls-cert", type=Path, metavar="FILE.pem",
        help="serve HTTPS with this certificate (e.g. the coordinator's server.pem)",
    )  # fmt: skip
    parser.add_argument("--tls-key", type=Path, metavar="FILE.key", help="its private key")
    parser.add_argument(
        "--client-ca", type=Path, metavar="FILE.crt",
        help="with --tls-cert: accept only browsers holding a client certificate this CA "
        "signed (the consortium CA); stands in for the token off loopback",
    )  # fmt: skip
    parser.add_argument(
        "--allowed-host", action="append", default=[], metavar="NAME",
        help="a host name browsers reach the dashboard by, besides localhost and 127.0.0.1 "
        "(repeatable; with a token and no --allowed-host, any name is answered)",
    )  # fmt: skip
    parser.add_argument(
        "--superlink", default=os.environ.get("FEDCLINIC_SUPERLINK"), metavar="HOST:PORT",
        help="the coordinator's Control API, for the hospitals' node status "
        "($FEDCLINIC_SUPERLINK; without it, status comes from the run's files only)",
    )  # fmt: skip
    parser.add_argument(
        "--ca", type=Path, default=Path("certs/ca.crt"), metavar="FILE.crt",
        help="the consortium CA certificate, to verify the Control API",
    )  # fmt: skip
    parser.add_argument(
        "--insecure", action="store_true", help="plaintext Control API (tests only)"
    )
    parser.add_argument(
        "--nodes-every", type=float, default=15.0, metavar="S",
        help="ask the SuperLink for its node list at most this often, only while a page is open",
    )  # fmt: skip
    parser.add_argument(
        "--poll", type=float, default=2.0, metavar="S",
        help="seconds between a page's checks for new results while a run goes on",
    )  # fmt: skip


def read_token(token_file: Path | None) -> str | None:
    """The token from ``--token-file`` (first line) or the environment; ``None`` if neither."""
    if token_file is not None:
        try:
            lines = token_file.read_text(encoding="utf-8").splitlines()
        except OSError as err:
            raise ConfigError(
                f"--token-file '{token_file}' is unreadable: {err.strerror}"
            ) from None
        token = lines[0].strip() if lines else ""
        where = f"--token-file '{token_file}'"
    else:
        token = os.environ.get(TOKEN_VARIABLE, "").strip()
        where = f"${TOKEN_VARIABLE}"
        if not token:
            return None
    if len(token) < MIN_TOKEN_LENGTH:
        raise ConfigError(
            f"{where}: the token is shorter than {MIN_TOKEN_LENGTH} characters; make one with "
            "'openssl rand -hex 32'"
        )
    return token


@dataclass(frozen=True)
class Tls:
    """HTTPS, and optionally client certificates signed by ``client_ca``."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Tls | None:
        if args.tls_cert is None and args.tls_key is None:
            if args.client_ca is not None:
                raise ConfigError("--client-ca needs HTTPS: add --tls-cert and --tls-key")
            return None
        if args.tls_cert is None or args.tls_key is None:
            raise ConfigError("--tls-cert and --tls-key go together")
        for option, path in (("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key),
                             ("--client-ca", args.client_ca)):  # fmt: skip
            if path is not None and not path.is_file():
                raise ConfigError(f"{option} '{path}' does not exist")
        return cls(args.tls_cert, args.tls_key, args.client_ca)


@dataclass
class Dashboard:
    """A bound socket and the uvicorn server that will serve the app on it."""

    server: uvicorn.Server
    sock: socket.socket
    url: str

    @classmethod
    def bind(cls, settings: Settings, host: str, port: int, tls: Tls | None = None) -> Dashboard:
        """Bind now (a taken port, an unusable certificate: one clear line, before anything
        starts)."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as err:
            sock.close()
            raise ConfigError(
                f"dashboard: cannot listen on {host}:{port}: {err.strerror}"
            ) from None
        sock.listen(128)
        sock.setblocking(False)
        config = uvicorn.Config(
            create_app(settings),
            log_level="warning",
            access_log=False,  # a URL may carry ?token=...: nothing logs requests
            timeout_graceful_shutdown=2,
            lifespan="off",
            ssl_certfile=tls.cert if tls else None,
            ssl_keyfile=tls.key if tls else None,
            ssl_ca_certs=tls.client_ca if tls else None,
            ssl_cert_reqs=ssl.CERT_REQUIRED if tls and tls.client_ca else ssl.CERT_NONE,
        )
        try:
            config.load()  # builds the TLS context now
        except (OSError, ssl.SSLError) as err:
            sock.close()
            raise ConfigError(f"dashboard: the TLS certificate or key is unusable: {err}") from None
        shown = f"[{host}]" if ":" in host else host
        scheme = "https" if tls else "http"
        return cls(uvicorn.Server(config), sock, f"{scheme}://{shown}:{sock.getsockname()[1]}")

    def serve(self) -> None:
        """Serve until stopped (Ctrl-C / SIGTERM when run in the main thread)."""
        try:
            self.server.run(sockets=[self.sock])
        finally:
            self.sock.close()

    @contextlib.contextmanager
    def in_background(self) -> Iterator[Dashboard]:
        """Serve from a thread while the block runs; stop it after."""
        thread = threading.Thread(target=self.serve, name="dashboard", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self.server.should_exit = True
            thread.join(timeout=10)


def superlink_nodes(args: argparse.Namespace, home: Path) -> SuperLinkNodes | None:
    """The node list of ``--superlink`` through a ``flwr`` CLI configured in ``home``."""
    if not args.superlink:
        return None
    if not args.insecure and not args.ca.is_file():
        raise ConfigError(
            f"--ca '{args.ca}' does not exist: pass the consortium CA certificate (needed "
            "with --superlink)"
        )
    # the flwr next to this interpreter (a venv's bin), without importing the local runner
    # (it pulls in torch; the dashboard needs none of it)
    executable = Path(sys.executable).parent / "flwr"
    if not executable.is_file():
        raise ConfigError(f"--superlink needs Flower's flwr CLI, not found at '{executable}'")
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    cli = FlowerCli(executable, home, ProcessSupervisor(), env)
    cli.configure(args.superlink, None if args.insecure else args.ca)
    return SuperLinkNodes(cli, every=args.nodes_every)


def run_dashboard(args: argparse.Namespace) -> int:
    """Check the options, bind, serve until Ctrl-C/SIGTERM."""
    token = read_token(args.token_file)
    tls = Tls.from_args(args)
    client_certificates = tls is not None and tls.client_ca is not None
    if not is_loopback(args.host) and token is None and not client_certificates:
        raise ConfigError(
            f"--host {args.host} is not loopback: the dashboard then needs a token "
            f"(--token-file FILE or ${TOKEN_VARIABLE}) or client certificates (--tls-cert, "
            "--tls-key, --client-ca); or keep 127.0.0.1 and open it through an SSH tunnel"
        )
    if not 0 < args.poll <= 600 or not 0 < args.nodes_every <= 3600:
        raise ConfigError("--poll and --nodes-every take seconds > 0 (--poll at most 600)")
    runs_dir = args.runs.expanduser()
    if not runs_dir.is_dir():
        raise ConfigError(f"--runs '{runs_dir}' is not a directory")
    logging.getLogger("fedclinic.dashboard").setLevel(logging.INFO)
    with tempfile.TemporaryDirectory(prefix="fedclinic-dashboard-") as home:
        nodes = superlink_nodes(args, Path(home))
        settings = Settings(
            runs=RunsRoot(runs_dir, nodes.snapshot if nodes else lambda: None),
            token=token,
            allowed_hosts=allowed_hosts(
                args.host, args.allowed_host, token is not None or client_certificates
            ),
            poll_seconds=args.poll,
            secure_cookie=tls is not None,
        )
        dashboard = Dashboard.bind(settings, args.host, args.port, tls)
        guards = [g for g, on in (("token", token), ("client certificate", client_certificates))
                  if on]  # fmt: skip
        guard = " and ".join(guards) + " required" if guards else "no token (loopback only)"
        source = f"node status from {args.superlink}" if nodes else "no SuperLink node list"
        Console(soft_wrap=True).print(
            f"dashboard: {dashboard.url}/ · runs in {runs_dir.resolve()} · {guard} · {source} "
            "· read-only; Ctrl-C stops it",
            highlight=False,
        )
        # uvicorn stops gracefully on Ctrl-C / SIGTERM, then raises the signal again: ours
        # turns it into exit 130 / 143 with one line (fedclinic.cli.main)
        previous = {s: signal.signal(s, _interrupted) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            dashboard.serve()
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)
    return 0


def _interrupted(signum: int, frame: object) -> None:
    raise Interrupted(signum)


@contextlib.contextmanager
def beside_local(
    port: int | None, output_dir: Path, cli: FlowerCli, console: Console
) -> Iterator[None]:
    """``fedclinic local --dashboard[=PORT]``: the dashboard of ``output_dir``'s parent, on
    loopback, with the local SuperLink's node list, for as long as the run goes on."""
    if port is None:
        yield
        return
    config = cli.home / "config.toml"  # written once the local SuperLink is up
    nodes = SuperLinkNodes(cli, every=10.0, ready=config.is_file)
    settings = Settings(runs=RunsRoot(output_dir.parent, nodes.snapshot))
    dashboard = Dashboard.bind(settings, "127.0.0.1", port)
    with dashboard.in_background():
        console.print(
            f"dashboard: {dashboard.url}/runs/{output_dir.name} (stops with the run; "
            f"afterwards: fedclinic dashboard --runs {output_dir.parent})",
            highlight=False,
        )
        yield
