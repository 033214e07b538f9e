"""``fedclinic bench``: the command line of the benchmarks (each command's module loads only
when that command runs, so ``--help`` needs no torch)."""

from __future__ import annotations

import argparse
from pathlib import Path

from fedclinic.bench.suites import SUITES


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``fedclinic bench quality`` and ``fedclinic bench report``."""
    bench = subparsers.add_parser(
        "bench", help="quality benchmarks on real medical data and their report"
    )
    commands = bench.add_subparsers(dest="bench_command", required=True)

    quality = commands.add_parser(
        "quality",
        help="run a quality suite (seeds x algorithms, in process) into a results directory",
    )
    quality.add_argument(
        "--suite", choices=(*SUITES, "all"), required=True,
        help="which benchmark (heart-federated: Heart with normalisation = federated)",
    )  # fmt: skip
    quality.add_argument(
        "--mode",
        choices=("quick", "full"),
        default="quick",
        help="quick: a smoke test in seconds; full: the documented protocol",
    )
    quality.add_argument("--out", type=Path, required=True, help="results directory")
    quality.add_argument(
        "--rounds",
        type=int,
        default=0,
        help="cut every run to N rounds (a reduced run, labelled as such in the report)",
    )
    quality.add_argument(
        "--jobs", type=int, default=1, metavar="N",
        help="runs at a time, each in its own process with one torch thread (default 1; the "
        "numbers do not depend on it: every run is seeded)",
    )  # fmt: skip
    quality.add_argument(
        "--methods", default="", metavar="A,B",
        help="run only these of the suite's methods (comma-separated, as in its results), "
        "with their tuning; the report covers those",
    )  # fmt: skip
    quality.add_argument(
        "--resume", action="store_true",
        help="keep the runs an interrupted call of the same suite into the same --out "
        "finished, run the rest, then aggregate",
    )  # fmt: skip

    def run_quality(args: argparse.Namespace) -> int:
        from fedclinic.bench.quality import quality_command

        return quality_command(args)

    quality.set_defaults(handler=run_quality)

    report = commands.add_parser(
        "report", help="render a results directory into BENCHMARKS.md tables and PNG plots"
    )
    report.add_argument("--results", type=Path, required=True, help="results directory")
    report.add_argument(
        "--out", type=Path, default=Path("BENCHMARKS.md"), help="the report to write"
    )
    report.add_argument(
        "--plots",
        type=Path,
        default=None,
        help="folder for the PNG plots (default: docs/bench next to --out)",
    )

    def run_report(args: argparse.Namespace) -> int:
        from fedclinic.bench.report import report_command

        return report_command(args)

    report.set_defaults(handler=run_report)

    # the runtime benchmarks (real SuperLink/SuperNode processes) declare their own options
    gate = commands.add_parser(
        "gate",
        help="short accuracy gate on the real data: exit 1 when a method falls below its floor",
    )
    gate.add_argument(
        "--out", type=Path, default=None, help="also write <out>/gate/gate.md and gate.json"
    )

    def run_gate(args: argparse.Namespace) -> int:
        from fedclinic.bench.gate import gate_command

        return gate_command(args)

    gate.set_defaults(handler=run_gate)

    from fedclinic.bench.load import add_load_parser
    from fedclinic.bench.system import add_system_parser

    add_load_parser(commands)
    add_system_parser(commands)
