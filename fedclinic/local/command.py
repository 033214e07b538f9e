"""``fedclinic local``: validate everything, then run a real federation on this machine.

The pre-flight (:func:`build_local_options`) runs before any file is written or process
started, so a wrong key, value, data path or algorithm setting costs one line and exit 2:
both configs through their schemas, each hospital's data source against the run
(:func:`fedclinic.data.preflight`: paths exist and have the source's shape, nothing is
loaded), the algorithm's own checks (``Algorithm.check``), and that no two hospitals share
a state dir.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path

from rich.console import Console

from fedclinic import checkpoint
from fedclinic.config import RunConfig, Scalar
from fedclinic.dashboard.command import beside_local
from fedclinic.data import preflight
from fedclinic.errors import ConfigError, FedClinicError
from fedclinic.local.configs import (
    HospitalSpec,
    load_hospital_files,
    resolve_run_config,
    resolve_run_values,
    synthetic_hospitals,
)
from fedclinic.local.federation import (
    FederationError,
    FederationOptions,
    LocalFederation,
    check_output_dir,
)
from fedclinic.site import effective_state_dir
from fedclinic.training import select_device


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


def check_hospitals(specs: list[HospitalSpec], run: RunConfig) -> None:
    """Each hospital's data source against the run, and one state dir per hospital.

    Two hospitals sharing a state dir would silently share private state (personalised
    models, FedHelp's large model): refused, also when one lies inside the other's.
    """
    for spec in specs:
        where = f"{spec.source}: " if spec.source else f"hospital {spec.name}: "
        try:
            preflight(spec.config, run)
            select_device(spec.config.device)  # 'cuda' where no GPU is visible: refused now
        except FedClinicError as err:
            raise ConfigError(f"{where}{err}") from None
    dirs = {spec.name: effective_state_dir(spec.config).resolve() for spec in specs}
    names = list(dirs)
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            a, b = dirs[first], dirs[second]
            if a == b or a.is_relative_to(b) or b.is_relative_to(a):
                raise ConfigError(
                    f"hospitals {first} and {second} share the state dir '{a if a == b else b}' "
                    f"({first}: '{a}', {second}: '{b}'): site state is private to one "
                    "hospital; give each its own state-dir"
                )


def build_local_options(args: argparse.Namespace) -> FederationOptions:
    """Resolve and validate everything ``local`` needs; raises :class:`ConfigError`."""
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
    check_hospitals(hospitals, run)
    if run.min_hospitals > len(hospitals):
        raise ConfigError(
            f"run config: key 'min-hospitals' = {run.min_hospitals} is not allowed: this "
            f"local federation has {len(hospitals)} hospital(s)"
        )
    if not 0 < args.timeout < float("inf"):
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
        site_workers=not getattr(args, "no_worker", False),
    )


def run_local(args: argparse.Namespace) -> int:
    """Validate (exit 2 on a bad input), start the federation, run, report, stop everything.

    Errors after the start propagate to :func:`fedclinic.cli.main` (one line, exit 1).
    """
    options = build_local_options(args)
    console = Console()
    if args.insecure and not args.no_node_auth:
        console.print("[yellow]--insecure: node authentication is off too (it needs TLS)[/]")
    federation = LocalFederation(options, console)
    with beside_local(args.dashboard, options.output_dir, federation.cli, console):
        outcome = federation.run()
    return outcome.exit_code
