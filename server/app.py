"""The coordinator's ServerApp: validate the run config, hand the algorithm to the round engine.

It runs under the SuperLink (in a ``flwr-serverapp`` process). A bad run config fails the
run at once with one line naming the key; the run's status then says why.
"""

from __future__ import annotations

from logging import INFO
from pathlib import Path

from flwr.app import Context
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from fedclinic.engine import RoundEngine
from fedclinic.engine.survey import run_statistics
from fedclinic.results import ResultsWriter
from fedclinic.site import run_site_key
from fedclinic.stats.report import write_statistics
from strategies import get_algorithm, load_run_config

app = ServerApp()


def output_directory(configured: str, run_id: int) -> Path:
    """The configured output directory, or ``./runs/run-<id>`` when none is set."""
    if configured:
        return Path(configured).expanduser().resolve()
    return Path.cwd() / "runs" / f"run-{run_id}"


@app.main()
def main(grid: Grid, context: Context) -> None:
    run = load_run_config(context.run_config)
    algorithm = get_algorithm(run.algorithm)
    results = ResultsWriter(output_directory(run.output_dir, context.run_id))
    results.write_config({**run.to_flat(), "flower-run-id": context.run_id})
    log(
        INFO,
        "fedclinic: %s, %d rounds, results in %s",
        algorithm.name,
        run.rounds,
        results.directory,
    )
    engine = RoundEngine(
        run, algorithm.strategy(run, results), results, run_site_key(run.run_name, context.run_id)
    )
    if run.run_kind == "stats":  # federated statistics of the hospitals' data, no training
        written = write_statistics(results.directory, run_statistics(engine, grid))
        log(INFO, "fedclinic: statistics written: %s", ", ".join(str(p) for p in written))
        return
    engine.start(grid)
    log(INFO, "fedclinic: run finished; summary in %s", results.directory / "summary.json")
