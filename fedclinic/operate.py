"""Operator commands against a running coordinator (a real deployment, or the compose one).

- ``fedclinic register``: register hospitals' public keys with the SuperLink, so their
  SuperNodes are accepted (node authentication). Run by the coordinator operator once per
  hospital, with the ``.pub`` file the hospital sent; the private key never leaves the site.
- ``fedclinic submit``: submit a run over the Control API (TLS, verified with the consortium
  CA), follow it, print the per-hospital table, and exit non-zero unless it completed
  (``flwr run`` alone exits 0 even when the run failed).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from rich.console import Console

from fedclinic.appdir import default_app_dir
from fedclinic.errors import ConfigError
from fedclinic.flower import flower_bin_dir, flower_environment
from fedclinic.local.configs import resolve_run_config, write_flat_toml
from fedclinic.local.flwr_cli import FlowerCli, FlowerCliError
from fedclinic.local.follow import RunFollower
from fedclinic.local.supervisor import ProcessSupervisor
from fedclinic.pki import public_key_fingerprint

EXIT_OK = 0


def _cli(args: argparse.Namespace, supervisor: ProcessSupervisor, home: Path) -> FlowerCli:
    """A ``flwr`` CLI configured for the coordinator's Control API (TLS unless --insecure)."""
    if not args.insecure and not args.ca.is_file():
        raise ConfigError(f"--ca '{args.ca}' does not exist: pass the consortium CA certificate")
    bin_dir = flower_bin_dir()
    cli = FlowerCli(bin_dir / "flwr", home, supervisor, flower_environment(bin_dir))
    cli.configure(args.superlink, None if args.insecure else args.ca)
    return cli


def _connection_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--superlink",
        default=os.environ.get("FEDCLINIC_SUPERLINK", "127.0.0.1:8000"),
        metavar="HOST:PORT",
        help="the coordinator's Control API ($FEDCLINIC_SUPERLINK when set)",
    )
    parser.add_argument(
        "--ca", type=Path, default=Path("certs/ca.crt"), metavar="FILE.crt",
        help="the consortium CA certificate",
    )  # fmt: skip
    parser.add_argument("--insecure", action="store_true", help="plaintext (tests only)")


def run_register(args: argparse.Namespace) -> int:
    """Register each ``--key NAME=FILE.pub``; an already registered key is not an error."""
    console = Console(soft_wrap=True, emoji=False)  # a fingerprint's ":AB:" is no emoji
    with tempfile.TemporaryDirectory() as home, ProcessSupervisor() as supervisor:
        cli = _cli(args, supervisor, Path(home))
        for assignment in args.key:
            name, _, path = assignment.partition("=")
            public_key = Path(path)
            if not name or not public_key.is_file():
                raise ConfigError(
                    f"--key {assignment!r}: expected NAME=FILE.pub with an existing file"
                )
            try:
                node_id = cli.register_supernode(public_key, name)
            except FlowerCliError as err:
                if "already in use" not in str(err):  # Flower's [code: 23]
                    raise
                console.print(
                    f"{name}: already registered (key {public_key_fingerprint(public_key)})"
                )
                continue
            console.print(
                f"{name}: registered as node {node_id} (key {public_key_fingerprint(public_key)})"
            )
    return EXIT_OK


def run_submit(args: argparse.Namespace) -> int:
    """Validate the run config, submit it, follow it to its final status.

    Without ``--app-dir`` the FAB is built from this checkout, or, on a normal install (the
    coordinator image), from the installed packages (:func:`fedclinic.appdir.default_app_dir`).
    """
    console = Console()
    with tempfile.TemporaryDirectory() as home, ProcessSupervisor() as supervisor:
        app_dir = args.app_dir or default_app_dir(Path(home) / "app")
        app_dir, merged, run = resolve_run_config(app_dir, args.run_config, args.set)
        output_dir = Path(run.output_dir or "runs")
        cli = _cli(args, supervisor, Path(home))
        run_toml = Path(home) / "run.toml"
        write_flat_toml(run_toml, merged)
        run_id = cli.submit(app_dir, run_toml)
        console.print(f"run {run_id} submitted: {run.algorithm}, {run.rounds} rounds")
        # The metrics and summary are visible when the output dir is shared with the
        # coordinator (the compose volume); otherwise only the status is followed.
        follower = RunFollower(
            cli, console, output_dir, run.rounds, args.timeout, summary_required=False
        )
        outcome = follower.report(follower.follow(run_id))
    return outcome.exit_code


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Declare ``fedclinic register`` and ``fedclinic submit``."""
    register = subparsers.add_parser(
        "register", help="register hospitals' public keys with the coordinator"
    )
    _connection_arguments(register)
    register.add_argument(
        "--key", action="append", required=True, metavar="NAME=FILE.pub",
        help="a hospital's name and OpenSSH public key (repeatable)",
    )  # fmt: skip
    register.set_defaults(handler=run_register)

    submit = subparsers.add_parser(
        "submit", help="submit a run to a coordinator and exit with its real status"
    )
    _connection_arguments(submit)
    submit.add_argument("--run-config", type=Path, metavar="FILE.toml", help="run settings")
    submit.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override one setting"
    )
    submit.add_argument(
        "--app-dir", type=Path, default=None, metavar="DIR",
        help="the Flower app project (default: this checkout, or the installed fedclinic)",
    )  # fmt: skip
    submit.add_argument(
        "--timeout", type=float, default=24 * 3600.0, metavar="S",
        help="how long to follow the run before stopping it, in seconds",
    )  # fmt: skip
    submit.set_defaults(handler=run_submit)
