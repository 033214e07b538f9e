"""``fedclinic stats``: federated statistics of the hospitals' data, as a run of its own.

- ``fedclinic stats local``: on this machine, with real processes as ``fedclinic local``
  (SuperLink, one SuperNode per ``--hospital`` config, TLS and node authentication);
- ``fedclinic stats submit``: to a running coordinator, as ``fedclinic submit`` (the report
  is written on the coordinator, in the run's output directory);
- ``fedclinic stats report``: render a ``stats.json`` again (HTML and PNG plots).

The run is ``run-kind = stats``: the ServerApp asks every hospital through the round engine
(QUERY exchanges, :mod:`fedclinic.engine.survey`) and writes ``stats.json``,
``summary.json`` and ``report.html`` (:mod:`fedclinic.stats.report`). docs/statistics.md
says what each hospital discloses.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from fedclinic.cli import _local_parser
from fedclinic.errors import ConfigError
from fedclinic.local.command import build_local_options, default_output_dir
from fedclinic.local.configs import resolve_run_config, write_flat_toml
from fedclinic.local.federation import LocalFederation
from fedclinic.local.flwr_cli import RunStatus
from fedclinic.local.follow import RunFollower, RunOutcome
from fedclinic.local.supervisor import ProcessSupervisor
from fedclinic.operate import _cli, _connection_arguments
from fedclinic.stats.report import REPORT_FILE, STATS_FILE, load_statistics, render

STATS_RUN = "run-kind=stats"


def statistics_table(result: Mapping[str, Any]) -> Table:
    """Per hospital: cases (per class) of each split, and its flags."""
    hospitals: dict[str, dict[str, Any]] = result["hospitals"]
    flags: list[dict[str, str]] = result["flags"]
    splits = [s for s in ("train", "val", "test") if s in result["pooled"]]
    table = Table(
        title="federated statistics",
        caption="cases (per class); '<k': below the "
        "hospital's minimum cell size; 'hidden': withheld to protect such a cell",
    )
    table.add_column("hospital", style="bold", no_wrap=True)
    for split in splits:
        table.add_column(split, justify="right")
    table.add_column("flags")
    for name in sorted(hospitals):
        parts = hospitals[name]["splits"]
        cells = []
        for split in splits:
            part = parts.get(split, {})
            classes = "/".join(str(c) for c in part.get("classes", []))
            cells.append(f"{part.get('cases', '-')} ({classes})")
        mine = [f"{f['flag']}: {f['detail']}" for f in flags if f["hospital"] == name]
        table.add_row(name, *cells, "[red]" + "\n".join(mine) + "[/red]" if mine else "")
    return table


def show(console: Console, output_dir: Path, outcome: RunOutcome) -> RunOutcome:
    """After a completed run: the table and where the report is; exit 1 without stats.json."""
    path = output_dir / STATS_FILE
    try:
        result = load_statistics(path)
    except ConfigError as err:
        console.print(f"[red]run {outcome.run_id} completed but {err}[/red]", soft_wrap=True)
        outcome.exit_code = 1
        return outcome
    console.print(statistics_table(result))
    console.print(f"report: {output_dir / REPORT_FILE}\nstatistics: {path}", highlight=False)
    outcome.exit_code = 0
    return outcome


class StatsFederation(LocalFederation):
    """``fedclinic local``'s federation, reporting a statistics run instead of a training run."""

    def report(self, status: RunStatus) -> RunOutcome:
        if not status.completed:
            return super().report(status)
        outcome = RunOutcome(0, status.status, status.run_id, status.details)
        outcome.node_ids = dict(self.node_ids)
        return show(self.console, self.options.output_dir, outcome)


def run_stats_local(args: argparse.Namespace) -> int:
    """Validate (exit 2 on bad input), run the statistics job on real processes, report."""
    if args.resume:
        raise ConfigError("--resume is not allowed: a statistics run has no rounds to resume")
    args.set = [*args.set, STATS_RUN]
    if args.output_dir is None:
        args.output_dir = default_output_dir("stats")
    options = build_local_options(args)
    return StatsFederation(options, Console()).run().exit_code


def run_stats_submit(args: argparse.Namespace) -> int:
    """Submit a statistics run to a coordinator and follow it to its final status."""
    console = Console()
    app_dir, merged, run = resolve_run_config(args.app_dir, args.run_config, [*args.set, STATS_RUN])
    output_dir = Path(run.output_dir or "runs")
    with tempfile.TemporaryDirectory() as home, ProcessSupervisor() as supervisor:
        cli = _cli(args, supervisor, Path(home))
        run_toml = write_flat_toml(Path(home) / "run.toml", merged)
        run_id = cli.submit(app_dir, run_toml)
        console.print(f"run {run_id} submitted: federated statistics")
        follower = RunFollower(cli, console, output_dir, 1, args.timeout, summary_required=False)
        status = follower.follow(run_id)
        if status.completed and (output_dir / STATS_FILE).is_file():  # a shared output dir
            return show(console, output_dir, RunOutcome(0, status.status, run_id)).exit_code
        return follower.report(status).exit_code


def run_stats_report(args: argparse.Namespace) -> int:
    """Render a ``stats.json`` into ``report.html`` and PNG plots."""
    result = load_statistics(args.stats)
    out = args.out or args.stats.parent
    path = render(out, result)
    Console().print(f"report: {path}", highlight=False)
    return 0


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Declare ``fedclinic stats local|submit|report``."""
    stats = subparsers.add_parser(
        "stats", help="federated statistics of the hospitals' data (stats.json, HTML report)"
    )
    commands = stats.add_subparsers(dest="stats_command", required=True, metavar="COMMAND")

    _local_parser(commands)  # fedclinic local's options: hospitals, TLS, node auth, timeout
    local = commands.choices["local"]
    local.description = "federated statistics on this machine, real processes (as fedclinic local)"
    local.set_defaults(handler=run_stats_local)

    submit = commands.add_parser("submit", help="to a running coordinator (as fedclinic submit)")
    _connection_arguments(submit)
    submit.add_argument(
        "--run-config", type=Path, metavar="FILE.toml",
        help="run settings: the model's input settings as for training (the data loaders need "
        "them), stats-bins, stats-features",
    )  # fmt: skip
    submit.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override one setting"
    )
    submit.add_argument("--app-dir", type=Path, default=None, help="the Flower app project")
    submit.add_argument(
        "--timeout",
        type=float,
        default=3600.0,
        metavar="S",
        help="how long to follow the run, in seconds",
    )
    submit.set_defaults(handler=run_stats_submit)

    report = commands.add_parser("report", help="render a stats.json into HTML and PNG plots")
    report.add_argument(
        "--stats",
        type=Path,
        required=True,
        metavar="stats.json",
        help="a statistics run's stats.json",
    )
    report.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="DIR",
        help="where report.html and plots/ go (default: beside stats.json)",
    )
    report.set_defaults(handler=run_stats_report)
