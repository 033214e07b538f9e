"""``fedclinic`` command line: one subcommand per job, registered in :data:`SUBCOMMANDS`.

- ``fedclinic local``: a real federation on this machine (SuperLink + one SuperNode per
  hospital, TLS and node authentication) running one training run to completion;
- ``fedclinic certs``: provisioning for a real deployment (CA, coordinator certificate,
  hospital key pairs);
- ``fedclinic hospital``: one hospital's node joining a coordinator (the hospital image's
  entrypoint); ``fedclinic register`` / ``submit``: the coordinator operator's commands.

Exit codes: 0 success; 1 the run or the federation failed; 2 a configuration error (one
line ``error: ...``, nothing started); 130/143 interrupted by Ctrl-C/SIGTERM (every process
stopped).
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from flwr.common.typing import Scalar
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fedclinic import checkpoint, coordinator, hospital
from fedclinic.config import RunConfig
from fedclinic.errors import ConfigError, FedClinicError
from fedclinic.local.configs import (
    load_hospital_files,
    resolve_run_config,
    resolve_run_values,
    synthetic_hospitals,
)
from fedclinic.local.federation import (
    FederationError,
    FederationOptions,
    Interrupted,
    LocalFederation,
    check_output_dir,
)
from fedclinic.pki import (
    DEFAULT_DNS_NAMES,
    DEFAULT_IP_ADDRESSES,
    check_hospital_names,
    create_hospital_keys,
    fingerprint,
    provision,
    public_key_fingerprint,
)

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2


@dataclass(frozen=True)
class Subcommand:
    """A subcommand: how to declare its arguments and the function that runs it."""

    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    handler: Callable[[argparse.Namespace], int]


SUBCOMMANDS: dict[str, Subcommand] = {}
ParserHook = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]
PARSER_HOOKS: list[ParserHook] = []


def register(subcommand: Subcommand) -> Subcommand:
    """Add a subcommand (later features plug in here without touching :func:`main`)."""
    SUBCOMMANDS[subcommand.name] = subcommand
    return subcommand


def register_parser_hook(hook: ParserHook) -> ParserHook:
    """Add a module's ``add_parser(subparsers)`` (it declares its own subcommand tree and
    sets ``handler`` defaults), for commands with nested subcommands like ``prior``."""
    PARSER_HOOKS.append(hook)
    return hook


def _error(message: str) -> None:
    """One line on stderr: operators grep for it, CI shows it."""
    print(f"error: {' '.join(message.split())}", file=sys.stderr)


# ---------------------------------------------------------------------------- local


def _configure_local(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-config", type=Path, metavar="FILE.toml", help="run settings")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one run setting (repeatable; wins over --run-config)",
    )
    parser.add_argument(
        "--hospital",
        action="append",
        default=[],
        type=Path,
        metavar="FILE.toml",
        help="one hospital node's config (repeatable); default: synthetic hospitals",
    )
    parser.add_argument(
        "--hospitals",
        type=int,
        default=None,
        metavar="N",
        help="number of synthetic hospitals when no --hospital is given (default 3)",
    )
    parser.add_argument("--output-dir", type=Path, help="default: runs/<timestamp>-<algorithm>")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="go on with the interrupted run in --output-dir from its last completed round "
        "(its config.json is the run config; --set may change rounds or round-timeout)",
    )
    parser.add_argument(
        "--insecure", action="store_true", help="plaintext gRPC/HTTP (implies --no-node-auth)"
    )
    parser.add_argument(
        "--no-node-auth", action="store_true", help="accept any SuperNode (no hospital keys)"
    )
    parser.add_argument(
        "--timeout", type=float, default=3600.0, metavar="S", help="limit for the whole run"
    )
    parser.add_argument(
        "--app-dir",
        type=Path,
        help="project holding the Flower app's pyproject.toml (default: this checkout)",
    )


def default_output_dir(algorithm: str, root: Path | None = None) -> Path:
    """``runs/<timestamp>-<algorithm>`` under the current directory, never an existing one."""
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = (root or Path.cwd()) / "runs" / f"{stamp}-{algorithm}"
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate.resolve()


def resumed_run_config(args: argparse.Namespace) -> tuple[Path, dict[str, Scalar], RunConfig]:
    """``local --resume``: the interrupted run's own config (its ``config.json``), then
    ``--set``, with ``resume = true``."""
    if args.output_dir is None:
        raise ConfigError("--resume needs --output-dir: the directory of the run to resume")
    if args.run_config is not None:
        raise ConfigError("--resume takes the run config from --output-dir; drop --run-config")
    output_dir = args.output_dir.expanduser().resolve()
    saved = output_dir / "config.json"
    try:
        original = json.loads(saved.read_text())
    except FileNotFoundError:
        raise ConfigError(
            f"--resume: '{saved}' does not exist (is it a run's output dir?)"
        ) from None
    except (OSError, ValueError) as err:
        raise ConfigError(f"--resume: '{saved}' is unreadable: {err}") from None
    original.pop("flower-run-id", None)
    original["output-dir"] = str(output_dir)
    return resolve_run_values(args.app_dir, original, [*args.set, "resume=true"])


def build_local_options(args: argparse.Namespace) -> FederationOptions:
    """Resolve and validate everything ``local`` needs; raises :class:`ConfigError`.

    Runs before any file is written or process started, so a wrong key costs one line.
    """
    if getattr(args, "resume", False):
        app_dir, merged, run = resumed_run_config(args)
    else:
        app_dir, merged, run = resolve_run_config(args.app_dir, args.run_config, args.set)

    if args.output_dir is not None:
        output_dir = args.output_dir.expanduser().resolve()
    elif run.output_dir:
        output_dir = Path(run.output_dir).expanduser().resolve()
    else:
        output_dir = default_output_dir(run.algorithm)
    merged["output-dir"] = str(output_dir)
    work_dir = output_dir / "federation"
    if run.resume:
        checkpoint.load(output_dir)  # one clear line when there is nothing to resume
    else:
        try:
            check_output_dir(output_dir)
        except FederationError as err:
            raise ConfigError(str(err)) from None

    if args.hospital:
        if args.hospitals is not None:
            raise ConfigError("use either --hospital FILE ... or --hospitals N, not both")
        hospitals = load_hospital_files(args.hospital)
    else:
        if run.data_source != "synthetic":
            raise ConfigError(
                f"run config: key 'data-source' = {run.data_source!r}: generated hospitals "
                "are synthetic; pass --hospital FILE.toml (with data-path) per hospital"
            )
        count = 3 if args.hospitals is None else args.hospitals
        # beside the work dir (remade at every start), so a resumed run finds the site state
        hospitals = synthetic_hospitals(count, output_dir / "hospital-state")
    if run.min_hospitals > len(hospitals):
        raise ConfigError(
            f"run config: key 'min-hospitals' = {run.min_hospitals} is not allowed: this "
            f"local federation has {len(hospitals)} hospital(s)"
        )
    if args.timeout <= 0:
        raise ConfigError(f"--timeout = {args.timeout} is not allowed: expected seconds > 0")
    return FederationOptions(
        app_dir=app_dir,
        output_dir=output_dir,
        run_config=merged,
        hospitals=hospitals,
        work_dir=work_dir,
        tls=not args.insecure,
        node_auth=not (args.insecure or args.no_node_auth),
        timeout=args.timeout,
    )


def run_local(args: argparse.Namespace) -> int:
    """``fedclinic local``: validate, start the federation, run, report, stop everything."""
    try:
        options = build_local_options(args)
    except FedClinicError as err:
        _error(str(err))
        return EXIT_CONFIG
    console = Console()
    if args.insecure and not args.no_node_auth:
        console.print("[yellow]--insecure: node authentication is off too (it needs TLS)[/]")
    try:
        outcome = LocalFederation(options, console).run()
    except Interrupted as stop:
        console.print(f"[yellow]interrupted ({stop}); every process was stopped[/yellow]")
        return 128 + stop.signum
    except FedClinicError as err:
        console.print(f"[red]error:[/red] {escape(str(err))}", highlight=False)
        return EXIT_FAILED
    return outcome.exit_code


# ---------------------------------------------------------------------------- certs


def _configure_certs(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, metavar="DIR")
    parser.add_argument(
        "--hospital",
        action="append",
        default=[],
        required=True,
        metavar="NAME",
        help="a hospital to create a key pair for (repeatable)",
    )
    parser.add_argument(
        "--san",
        action="append",
        default=[],
        metavar="HOST",
        help="DNS name or IP hospitals use to reach the coordinator (repeatable; "
        "localhost, 127.0.0.1 and ::1 are always included)",
    )
    parser.add_argument(
        "--keys-only",
        action="store_true",
        help="only the hospitals' key pairs, no CA (run at the hospital: the private key "
        "never leaves it; send the .pub to the coordinator operator)",
    )


def split_sans(hosts: Sequence[str]) -> tuple[list[str], list[str]]:
    """Default loopback SANs plus ``hosts``, split into DNS names and IP addresses."""
    dns, ips = list(DEFAULT_DNS_NAMES), list(DEFAULT_IP_ADDRESSES)
    for host in hosts:
        try:
            ip = str(ipaddress.ip_address(host))
        except ValueError:
            if host not in dns:
                dns.append(host)
        else:
            if ip not in ips:
                ips.append(ip)
    return dns, ips


def run_hospital_keys(args: argparse.Namespace) -> int:
    """``fedclinic certs --keys-only``: a site makes its own key pair (no CA, no server)."""
    if args.san:
        _error("--san names the coordinator certificate, which --keys-only does not make")
        return EXIT_CONFIG
    try:
        names = check_hospital_names(args.hospital)
        made = [create_hospital_keys(args.out.resolve() / "hospitals", n) for n in names]
    except FedClinicError as err:
        _error(str(err))
        return EXIT_CONFIG
    table = Table(title=f"hospital keys in {args.out.resolve() / 'hospitals'}")
    table.add_column("file")
    table.add_column("goes to")
    for keys in made:
        table.add_row(keys.public_key.name, "the coordinator operator (fedclinic register)")
        table.add_row(keys.private_key.name, "nowhere: it stays on this site (secret)")
    console = Console(soft_wrap=True)
    console.print(table)
    for keys in made:  # read it to the operator on another channel; register prints it too
        console.print(f"{keys.public_key.name}: {public_key_fingerprint(keys.public_key)}")
    return EXIT_OK


def run_certs(args: argparse.Namespace) -> int:
    """``fedclinic certs``: write CA, server certificate and hospital keys; say what goes where."""
    if args.keys_only:
        return run_hospital_keys(args)
    dns, ips = split_sans(args.san)
    try:
        done = provision(args.out, args.hospital, dns, ips)
    except FedClinicError as err:
        _error(str(err))
        return EXIT_CONFIG
    table = Table(title=f"provisioned in {done.directory}")
    table.add_column("file")
    table.add_column("goes to")
    table.add_column("used as")
    table.add_row(
        done.ca_cert.name,
        "coordinator, every hospital, operators",
        "--ssl-ca-certfile (SuperLink); --root-certificates (SuperNode); "
        "root-certificates in the flwr CLI config",
    )
    table.add_row(done.server_cert.name, "coordinator only", "--ssl-certfile (SuperLink)")
    table.add_row(done.server_key.name, "coordinator only (secret)", "--ssl-keyfile (SuperLink)")
    table.add_row(
        done.ca_key.name,
        "nobody: keep offline (secret)",
        "only to issue a new server certificate",
    )
    for name, keys in done.hospitals.items():
        rel_pub = keys.public_key.relative_to(done.directory)
        rel_key = keys.private_key.relative_to(done.directory)
        table.add_row(str(rel_pub), "coordinator", f"flwr supernode register {rel_pub} <conn>")
        table.add_row(
            str(rel_key),
            f"{name} only (secret)",
            "--auth-supernode-private-key (SuperNode)",
        )
    console = Console()
    console.print(table)
    console.print(f"server certificate SANs: {', '.join(dns + ips)}")
    console.print(f"CA SHA-256 fingerprint:     {fingerprint(done.ca_cert)}")
    console.print(f"server SHA-256 fingerprint: {fingerprint(done.server_cert)}")
    return EXIT_OK


register(Subcommand("local", "run a real federation on this machine", _configure_local, run_local))
register(Subcommand("certs", "create CA, coordinator certificate, hospital keys",
                    _configure_certs, run_certs))  # fmt: skip
register(Subcommand("hospital", "run this hospital's node: join a coordinator (SuperNode)",
                    hospital.configure, hospital.run_hospital))  # fmt: skip


register_parser_hook(coordinator.add_parser)  # fedclinic coordinator: the SuperLink


@register_parser_hook
def _prior_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``fedclinic prior ...``: Fed-MAS's shared frozen prior (train once, hash)."""
    from fedclinic.prior import add_parser

    add_parser(subparsers)


@register_parser_hook
def _operator_parsers(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``fedclinic register`` / ``fedclinic submit``: a real coordinator's operator."""
    from fedclinic.operate import add_parser

    add_parser(subparsers)


@register_parser_hook
def _knowledge_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``fedclinic knowledge ...``: FedHelp's one-time foundation-model knowledge file."""
    from fedclinic.knowledge import add_parser

    add_parser(subparsers)


@register_parser_hook
def _bench_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``fedclinic bench quality|report``: quality benchmarks and BENCHMARKS.md."""
    from fedclinic.bench import add_parser

    add_parser(subparsers)


# ---------------------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedclinic", description="Federated learning across hospitals on Flower."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for sub in SUBCOMMANDS.values():
        sub_parser = subparsers.add_parser(sub.name, help=sub.help, description=sub.help)
        sub.configure(sub_parser)
        sub_parser.set_defaults(handler=sub.handler)
    for hook in PARSER_HOOKS:
        hook(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedclinic`` script; returns the exit code."""
    args = build_parser().parse_args(argv)
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
