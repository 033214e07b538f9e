"""``fedclinic bench load``: many hospitals on one machine, on the real deployment runtime.

For each federation size it starts a SuperLink and that many SuperNodes (TLS and node
authentication on, like ``fedclinic local``), runs FedAvg with a tiny model and
``min-hospitals`` = every hospital, and measures:

- whether every round completed with every hospital and nothing was lost (a train and an
  evaluate row per hospital and round, no error or rejected row, status completed);
- the round overhead: the round's wall time (between the coordinator's audit events) minus
  the slowest hospital's own compute (evaluation + local training, as the hospital measured
  it) — what the federation runtime adds: message delivery, polling, queueing for the cores;
- the peak resident memory of each kind of process (the hospitals' site workers, ClientApp,
  ServerApp, SuperNode, SuperExec, SuperLink), sampled with ``psutil`` every half second.

Round 1 is left out of the overhead (it includes the ServerApp's start-up); rounds 2..R count.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from rich.console import Console
from rich.table import Table

from fedclinic.audit import AuditLog
from fedclinic.local.configs import (
    HospitalSpec,
    app_defaults,
    find_app_dir,
    synthetic_hospitals,
)
from fedclinic.local.federation import FederationOptions, LocalFederation
from fedclinic.local.supervisor import pids_with_marker

#: the run every size runs: tiny CNN, one local batch, every hospital required
LOAD_RUN: dict[str, Any] = {
    "algorithm": "fedavg",
    "model": "cnn",
    "local-steps": 1,
    "batch-size": 16,
    "round-timeout": 240.0,  # a lost reply fails the size after 4 min, not 15
}
#: hospitals run at a lower CPU priority than the coordinator, standing in for hospitals on
#: their own machines (the coordinator is not queued behind them for the cores). On its own it
#: did not prevent Flower 1.39's SQLite "database is locked" at 16 hospitals; the SuperLink's
#: longer busy timeout (fedclinic.superlink) does: docs/reliability.md
HOSPITAL_NICENESS = 10
PROCESS_KINDS = ("flwr-clientapp", "flwr-serverapp", "flower-superexec", "flower-supernode",
                 "flower-superlink")  # fmt: skip
#: launchers that run a kind in-process under another name (``python -m fedclinic.superlink``);
#: the hospital's site worker (``python -m fedclinic.worker``) is a kind of its own
LAUNCHERS = {
    "fedclinic.superlink": "flower-superlink",
    "fedclinic.supernode": "flower-supernode",
    "fedclinic.worker": "site-worker",
}


def process_kind(cmdline: str) -> str | None:
    """Which of :data:`PROCESS_KINDS` a command line runs, if any."""
    kind = next((k for k in PROCESS_KINDS if k in cmdline), None)
    return kind or next((k for m, k in LAUNCHERS.items() if m in cmdline.split()), None)


@dataclass(eq=False)  # a thread: hashable by identity
class MemorySampler(threading.Thread):
    """Peak RSS (MiB) per process kind among the processes carrying a supervisor token."""

    token: str
    interval: float = 0.5
    peaks: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__(daemon=True)
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            self.sample()
            self.stopped.wait(self.interval)

    def sample(self) -> None:
        for pid in pids_with_marker(self.token):
            try:
                process = psutil.Process(pid)
                kind = process_kind(" ".join(process.cmdline()))
                rss = process.memory_info().rss
            except psutil.Error:
                continue
            if kind:
                self.peaks[kind] = max(self.peaks.get(kind, 0.0), rss / 2**20)


def round_overheads(audit: list[dict[str, Any]], rows: list[dict[str, Any]]) -> list[float]:
    """Seconds per round (2..R) not spent in the slowest hospital's own compute.

    A round's wall time runs from the previous round's audit event to its own; a hospital's
    compute in round r is its evaluation (``eval_seconds``) plus its training (``seconds``).
    """
    ends = {e["round"]: float(e["time"]) for e in audit if e["event"] == "round"}
    compute: dict[int, dict[str, float]] = {}
    for row in rows:
        key = {"evaluate": "eval_seconds", "train": "seconds"}.get(row.get("kind", ""))
        value = row.get(key) if key else None
        if isinstance(value, int | float):
            per_round = compute.setdefault(int(row["round"]), {})
            per_round[row["hospital"]] = per_round.get(row["hospital"], 0.0) + float(value)
    return [
        ends[r] - ends[r - 1] - max(compute[r].values())
        for r in sorted(ends)
        if r - 1 in ends and compute.get(r)
    ]


def lost(rows: list[dict[str, Any]], hospitals: list[str], rounds: int) -> list[str]:
    """What is missing or wrong: every hospital must train and evaluate in every round."""
    problems = [f"{r['kind']} row: {r.get('hospital')} round {r.get('round')}: {r.get('reason')}"
                for r in rows if r["kind"] in ("error", "rejected")]  # fmt: skip
    for kind in ("train", "evaluate"):
        seen = {(r["round"], r["hospital"]) for r in rows if r["kind"] == kind}
        missing = [(n, h) for n in range(1, rounds + 1) for h in hospitals if (n, h) not in seen]
        problems += [f"no {kind} row: {h} round {n}" for n, h in missing]
    return problems


def bench_options(
    app_dir: Path,
    out: Path,
    run_config: dict[str, Any],
    hospitals: list[HospitalSpec],
    site_workers: bool = True,
) -> FederationOptions:
    """A benchmark federation: TLS and node auth on, generous time limits (many hospitals
    starting on few cores come online slowly); ``site_workers`` False for an app that does
    not forward to fedclinic's site worker (the plain Flower app)."""
    return FederationOptions(
        app_dir=app_dir,
        output_dir=out,
        run_config=run_config,
        hospitals=hospitals,
        work_dir=out / "federation",
        timeout=3600,
        startup_timeout=300,
        hospital_niceness=HOSPITAL_NICENESS,
        site_workers=site_workers,
    )


def run_size(count: int, rounds: int, work: Path, console: Console) -> dict[str, Any]:
    """One federation of ``count`` hospitals; its outcome, overheads and memory peaks."""
    out = work / f"hospitals-{count}"
    hospitals = synthetic_hospitals(count, out / "hospital-state")
    run_config = {**app_defaults(find_app_dir()), **LOAD_RUN, "rounds": rounds,
                  "min-hospitals": count, "output-dir": str(out)}  # fmt: skip
    federation = LocalFederation(bench_options(find_app_dir(), out, run_config, hospitals), console)
    started = time.monotonic()
    with federation.supervisor:
        sampler = MemorySampler(federation.supervisor.token)
        sampler.start()
        try:
            federation.prepare()
            federation.start_superlink()
            federation.start_hospitals()
            outcome = federation.report(federation.follow(federation.submit()))
        finally:
            sampler.stopped.set()
    metrics = out / "metrics.jsonl"  # absent when the run failed before round 1 ended
    lines = metrics.read_text().splitlines() if metrics.exists() else []
    rows = [json.loads(x) for x in lines if x]
    overheads = round_overheads(AuditLog(out).read(), rows)
    problems = lost(rows, [h.name for h in hospitals], rounds)
    if outcome.exit_code != 0:
        reason = (outcome.details.splitlines() or [""])[0][:300]
        problems.insert(0, f"run ended {outcome.status}: {reason}")
    return {
        "hospitals": count,
        "rounds": rounds,
        "completed": outcome.exit_code == 0 and not problems,
        "problems": problems,
        "round_overhead_seconds": overheads,
        "median_round_overhead_seconds": statistics.median(overheads) if overheads else None,
        "peak_rss_mib": {k: round(v, 1) for k, v in sorted(sampler.peaks.items())},
        "wall_seconds": round(time.monotonic() - started, 1),
    }


def load_command(args: argparse.Namespace) -> int:
    """Run every size, print the table, write ``load.json``; exit 1 if anything was lost."""
    console = Console()
    sizes = [int(v) for v in args.hospitals.split(",") if v.strip()]
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for count in sizes:
        console.print(f"[bold]{count} hospitals[/], {args.rounds} rounds ...")
        results.append(run_size(count, args.rounds, args.out.resolve(), Console(quiet=True)))
        (args.out / "load.json").write_text(json.dumps(results, indent=2) + "\n")
    console.print(load_table(results))
    command = f"fedclinic bench load --hospitals {args.hospitals} --rounds {args.rounds}"
    (args.out / "load.md").write_text(load_section(results, command))
    return 0 if all(r["completed"] for r in results) else 1


def load_section(results: list[dict[str, Any]], command: str) -> str:
    """The BENCHMARKS.md section: what ran, the table, how to read it."""
    cores = os.cpu_count() or 0
    load = os.getloadavg()[0]
    return (
        f"Command: `{command} --out DIR`, FedAvg on a tiny CNN (one local batch of 16), "
        "min-hospitals = every hospital, TLS and node authentication on: every hospital is a "
        "real SuperNode process dialling a real SuperLink over gRPC on this machine "
        f"({cores} CPU cores, no GPU; 1-minute load average {load:.1f} when it ended).\n\n"
        + load_markdown(results)
        + "\nRound overhead = a round's wall time (between the coordinator's audit events) "
        "minus the slowest hospital's own evaluation + training time; round 1 (ServerApp "
        "start-up) is left out. Each hospital's site worker takes its SuperNode's messages "
        "itself, with data and code loaded once (no ClientApp process: its column stays 0; "
        "the one SuperExec is the coordinator's, which starts the ServerApp). On one 2-core "
        "machine hosting every hospital, the hospitals' "
        "evaluation, training and polling, the SuperNodes' and the SuperLink's work queue for "
        "the same cores, so the overhead grows with the hospital count; in a real consortium "
        "each hospital computes on its own machine, in parallel.\n"
    )


def load_markdown(results: list[dict[str, Any]]) -> str:
    """The table for BENCHMARKS.md."""
    lines = [
        "| hospitals | every round, nothing lost | round overhead s (median; per round) "
        "| peak RSS MiB: site worker / ClientApp / ServerApp / SuperNode / SuperExec / "
        "SuperLink | wall s |",
        "|---:|---|---|---|---:|",
    ]
    kinds = ("site-worker", "flwr-clientapp", "flwr-serverapp", "flower-supernode",
             "flower-superexec", "flower-superlink")  # fmt: skip
    for r in results:
        median = r["median_round_overhead_seconds"]
        per_round = ", ".join(f"{v:.1f}" for v in r["round_overhead_seconds"])
        peaks = " / ".join(f"{r['peak_rss_mib'].get(k, 0):.0f}" for k in kinds)
        lost_text = "yes" if r["completed"] else "NO: " + "; ".join(r["problems"][:3])
        median_text = "-" if median is None else f"{median:.1f}"
        lines.append(
            f"| {r['hospitals']} | {lost_text} | {median_text} ({per_round}) | {peaks} "
            f"| {r['wall_seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


SHOWN_PROCESSES = ("site-worker", "flwr-clientapp", "flower-supernode", "flower-superlink")


def load_table(results: list[dict[str, Any]]) -> Table:
    table = Table(title="fedclinic bench load: round overhead against the hospital count")
    for column in ("hospitals", "all rounds, nothing lost", "round overhead s (median)",
                   "peak RSS MiB: site worker / ClientApp / SuperNode / SuperLink",
                   "wall s"):  # fmt: skip
        table.add_column(column, justify="right")
    for r in results:
        peaks = r["peak_rss_mib"]
        median = r["median_round_overhead_seconds"]
        table.add_row(
            str(r["hospitals"]),
            "yes" if r["completed"] else f"NO: {len(r['problems'])} problem(s)",
            "-" if median is None else f"{median:.1f}",
            " / ".join(f"{peaks.get(k, 0):.0f}" for k in SHOWN_PROCESSES),
            f"{r['wall_seconds']:.0f}",
        )
    return table


def add_load_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``fedclinic bench load``."""
    load = commands.add_parser(
        "load", help="real federations of 2..16 hospitals: every round complete, round overhead"
    )
    load.add_argument("--hospitals", default="2,4,8,16", help="sizes, comma-separated")
    load.add_argument("--rounds", type=int, default=3, help="rounds per federation (>= 2)")
    load.add_argument("--out", type=Path, required=True, help="results directory")
    load.set_defaults(handler=load_command)
