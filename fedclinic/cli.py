"""``fedclinic`` command line: one subcommand per job, registered in :data:`COMMANDS`.

- ``fedclinic local``: a real federation on this machine (SuperLink + one SuperNode per
  hospital, TLS and node authentication) running one training run to completion;
- ``fedclinic certs``: provisioning for a real deployment (CA, coordinator certificate,
  hospital key pairs, the CA fingerprint to compare by phone);
- ``fedclinic hospital``: one hospital's node joining a coordinator (the hospital image's
  entrypoint); ``fedclinic register`` / ``submit``: the coordinator operator's commands;
- ``fedclinic knowledge`` / ``prior`` / ``bench``: FedHelp's knowledge file, Fed-MAS's
  prior, the benchmarks.

Only the chosen subcommand's module is imported (each entry names it as
``"module:function"``), so ``fedclinic --help`` and the help of the commands declared here
answer at once, without importing torch.

Exit codes: 0 success; 1 the run or the federation failed; 2 a configuration error (one
line ``error: ...``, nothing started); 130/143 interrupted by Ctrl-C/SIGTERM (every process
stopped; ``hospital`` and ``coordinator`` exit 0 on a SIGTERM their Flower process obeyed in
time). Every handler raises instead of printing: :func:`main` turns a
:class:`~fedclinic.errors.ConfigError` into exit 2, any other
:class:`~fedclinic.errors.FedClinicError` or :class:`OSError` into exit 1, each as one line.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedclinic import __version__
from fedclinic.errors import ConfigError, FedClinicError, Interrupted
from fedclinic.local.supernode import (
    DEFAULT_HEALTH_ADDRESS,
    DEFAULT_RUNTIME_PORT,
    STOP_GRACE_SECONDS,
)

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, [], False, argparse.SUPPRESS):
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """Every (sub)parser shows defaults: ``add_subparsers`` builds nested parsers of the
    parser's own class, so modules declaring their own subcommands get it too."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


@dataclass(frozen=True)
class Command:
    """A subcommand: its one-line help and what declares it.

    Without ``handler``, ``declare`` adds the subcommand's parser to ``subparsers`` and sets
    its ``handler`` default (``"module:add_parser"``: a module declaring its own tree). With
    ``handler``, ``declare`` is ``"module:configure"``, given the subcommand's parser to add
    arguments to. Strings are imported only when that command is chosen.
    """

    help: str
    declare: Callable[[Any], None] | str
    handler: str | None = None


def resolve(target: str) -> Any:
    """``"package.module:name"`` -> the object (imports the module)."""
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def error_line(message: str) -> None:
    """One line on stderr: operators grep for it, CI shows it."""
    print(f"error: {' '.join(message.split())}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- local


def _local_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "local", help=COMMANDS["local"].help, description=COMMANDS["local"].help
    )
    parser.add_argument(
        "--run-config", type=Path, metavar="FILE.toml",
        help="run settings (default: the [tool.flwr.app.config] table of pyproject.toml)",
    )  # fmt: skip
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override one run setting (repeatable; wins over --run-config)",
    )  # fmt: skip
    parser.add_argument(
        "--hospital", action="append", default=[], type=Path, metavar="FILE.toml",
        help="one hospital node's config (repeatable; default: generated synthetic hospitals)",
    )  # fmt: skip
    parser.add_argument(
        "--hospitals", type=int, default=None, metavar="N",
        help="number of generated synthetic hospitals when no --hospital is given (default: 3)",
    )  # fmt: skip
    parser.add_argument(
        "--output-dir", type=Path, metavar="DIR",
        help="where results go (default: runs/<timestamp>-<algorithm>)",
    )  # fmt: skip
    parser.add_argument(
        "--resume", action="store_true",
        help="go on with the interrupted run in --output-dir from its last completed round "
        "(its config.json is the run config; --set may change rounds or round-timeout)",
    )  # fmt: skip
    parser.add_argument(
        "--insecure", action="store_true", help="plaintext gRPC/HTTP (implies --no-node-auth)"
    )
    parser.add_argument(
        "--no-node-auth", action="store_true", help="accept any SuperNode (no hospital keys)"
    )
    parser.add_argument(
        "--timeout", type=float, default=3600.0, metavar="S",
        help="limit for the whole run, in seconds",
    )  # fmt: skip
    parser.add_argument(
        "--app-dir", type=Path, metavar="DIR",
        help="project holding the Flower app's pyproject.toml (default: this checkout)",
    )  # fmt: skip
    parser.add_argument(
        "--dashboard", type=int, nargs="?", const=8080, metavar="PORT",
        help="serve the run's dashboard on 127.0.0.1:PORT while it runs (PORT: 8080 if not given)",
    )  # fmt: skip
    parser.add_argument(
        "--no-worker", action="store_true",
        help="no site workers: every message is answered in its own ClientApp process, which "
        "loads torch and the data each time (also: FEDCLINIC_WORKER=off)",
    )  # fmt: skip
    parser.set_defaults(handler="fedclinic.local.command:run_local")


# ---------------------------------------------------------------------------- certs


def _certs_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "certs", help=COMMANDS["certs"].help, description=COMMANDS["certs"].help
    )
    parser.add_argument(
        "--out", type=Path, metavar="DIR",
        help="directory to write into (created; nothing in it is ever overwritten)",
    )  # fmt: skip
    parser.add_argument(
        "--hospital", action="append", default=[], metavar="NAME",
        help="a hospital to make a key pair for (repeatable; optional without --keys-only: "
        "in production each hospital makes its own with --keys-only)",
    )  # fmt: skip
    parser.add_argument(
        "--san", action="append", default=[], metavar="HOST",
        help="DNS name or IP address hospitals and operators dial to reach the coordinator "
        "(repeatable; localhost, 127.0.0.1 and ::1 are always included)",
    )  # fmt: skip
    parser.add_argument(
        "--keys-only", action="store_true",
        help="only the hospitals' key pairs, no CA (run at the hospital: the private key "
        "never leaves it; send the .pub to the coordinator operator)",
    )  # fmt: skip
    parser.add_argument(
        "--fingerprint", type=Path, metavar="FILE.crt",
        help="print a certificate's SHA-256 fingerprint as 'openssl x509 -noout -fingerprint "
        "-sha256' does (compare ca.crt's by phone) and write nothing",
    )  # fmt: skip
    parser.set_defaults(handler="fedclinic.certs:run_certs")


# ---------------------------------------------------------------------------- hospital


def _hospital_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "hospital", help=COMMANDS["hospital"].help, description=COMMANDS["hospital"].help
    )
    parser.add_argument(
        "--superlink", required=True, metavar="HOST:PORT",
        help="the coordinator's Fleet API (port 9092), e.g. coordinator.example.org:9092",
    )  # fmt: skip
    parser.add_argument(
        "--ca", type=Path, metavar="FILE.crt",
        help="the consortium CA certificate (required; default inside the hospital "
        "container: /certs/ca.crt)",
    )  # fmt: skip
    parser.add_argument(
        "--key", type=Path, metavar="FILE.key",
        help="this hospital's private key, OpenSSH ECDSA, never leaves the site (required; "
        "default inside the hospital container: /keys/hospital.key)",
    )  # fmt: skip
    parser.add_argument(
        "--config", type=Path, metavar="FILE.toml",
        help="this hospital's config, fedclinic.config.HospitalConfig (required; default "
        "inside the hospital container: /config/hospital.toml)",
    )  # fmt: skip
    parser.add_argument(
        "--runtime-port", type=int, default=DEFAULT_RUNTIME_PORT, metavar="PORT",
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
        "--retry-wait", type=float, default=20.0, metavar="S",
        help="pause between attempts, in seconds",
    )  # fmt: skip
    parser.add_argument(
        "--stop-timeout", type=float, default=STOP_GRACE_SECONDS, metavar="S",
        help="on SIGTERM, how long the SuperNode and the site worker (stopped together) may take "
        "to stop before they are killed; keep it under the container's stop timeout (docker: 10 s)",
    )  # fmt: skip
    parser.add_argument(
        "--no-worker", action="store_true",
        help="no site worker: every message is answered in its own ClientApp process, which "
        "loads torch and the data each time (also: FEDCLINIC_WORKER=off)",
    )  # fmt: skip
    parser.add_argument(
        "--worker-timeout", type=float, default=180.0, metavar="S",
        help="how long the site worker may take to start serving (it imports torch)",
    )  # fmt: skip
    parser.set_defaults(handler="fedclinic.hospital:run_hospital")


# ---------------------------------------------------------------------------- registry

#: name -> command, in the order ``fedclinic --help`` lists them
COMMANDS: dict[str, Command] = {
    "local": Command("run a real federation on this machine", _local_parser),
    "certs": Command(
        "create CA, coordinator certificate, hospital keys; print a CA fingerprint",
        _certs_parser,
    ),
    "hospital": Command(
        "run this hospital's node: join a coordinator (SuperNode)", _hospital_parser
    ),
    "register": Command(
        "register hospitals' public keys with the coordinator", "fedclinic.operate:add_parser"
    ),
    "submit": Command(
        "submit a run to a coordinator and exit with its real status",
        "fedclinic.operate:add_parser",
    ),
    "knowledge": Command(
        "FedHelp: one-time foundation-model probabilities on public data (+ SHA-256)",
        "fedclinic.knowledge:add_parser",
    ),
    "prior": Command(
        "the shared frozen self-supervised prior of Fed-MAS (train once, hash)",
        "fedclinic.prior:add_parser",
    ),
    "stats": Command("statistics of the hospitals' data", "fedclinic.stats.command:add_parser"),
    "bench": Command(
        "quality benchmarks on real medical data and their report",
        "fedclinic.bench.command:add_parser",
    ),
    "coordinator": Command(
        "run the coordinator: the SuperLink with TLS and hospital authentication",
        "fedclinic.coordinator:configure",
        "fedclinic.coordinator:run_coordinator",
    ),
    "datasets": Command(
        "public benchmark data: fetch with checksums, or where it is",
        "fedclinic.datasets:add_parser",
    ),
    "privacy": Command(
        "a hospital's differential-privacy ledger (epsilon spent per data set)",
        "fedclinic.privacy:add_parser",
    ),
    "dashboard": Command(
        "the runs in a browser, live and read-only", "fedclinic.dashboard.command:add_parser"
    ),
}


ALL = "*"


def _declare(subparsers: Any, name: str) -> None:
    entry = COMMANDS[name]
    declare = resolve(entry.declare) if isinstance(entry.declare, str) else entry.declare
    if entry.handler is None:
        declare(subparsers)
    else:
        sub = subparsers.add_parser(name, help=entry.help, description=entry.help)
        declare(sub)
        sub.set_defaults(handler=entry.handler)


def build_parser(command: str | None = ALL) -> argparse.ArgumentParser:
    """The parser with ``command``'s declaration loaded, the others only listed; every
    command's by default (tests, tools), none for ``command=None`` (``fedclinic --help``)."""
    parser = Parser(prog="fedclinic", description="Federated learning across hospitals on Flower.")
    parser.add_argument("--version", action="version", version=f"fedclinic {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    if command in COMMANDS:  # first: its module may declare more than one (register, submit)
        _declare(subparsers, command)
    for name, entry in COMMANDS.items():
        if name in subparsers.choices:
            continue
        if command == ALL:
            _declare(subparsers, name)
        else:
            subparsers.add_parser(name, help=entry.help, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedclinic`` script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command if command in COMMANDS else None).parse_args(argv)
    handler = resolve(args.handler) if isinstance(args.handler, str) else args.handler
    try:
        return int(handler(args))
    except ConfigError as err:
        error_line(str(err))
        return EXIT_CONFIG
    except FedClinicError as err:
        error_line(str(err))
        return EXIT_FAILED
    except OSError as err:
        where = f"'{err.filename}': " if err.filename else ""
        error_line(f"{where}{err.strerror or err}")
        return EXIT_FAILED
    except Interrupted as stop:
        print(f"interrupted ({stop}); every process was stopped", file=sys.stderr)
        return 128 + stop.signum


if __name__ == "__main__":
    sys.exit(main())
