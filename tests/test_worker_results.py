"""Same results through the site worker: the real strategy, driven twice on CPU.

Once with every message answered directly by the ClientApp handler (``client.app.answer``,
the benchmarks' in-process grid), once with every message going through the forwarder
ClientApp, a real Unix socket and a real worker process per hospital. The final model,
every hospital's site-state files and every result row (timings aside) must be equal bit
for bit: the worker keeps data and code in memory, so a state leak between messages (data
changed in place, an RNG drawn outside the seeded generators, a stale memo) would show.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Message
from test_resume import setting
from test_worker import WorkerProcess, worker_threads  # noqa: F401 (a fixture)

from fedclinic.bench.grid import InProcessGrid, run_in_process
from fedclinic.engine import RunResult
from fedclinic.serialization import record_to_numpy
from fedclinic.site import run_site_key
from fedclinic.worker import forwarder

HOSPITALS = ("hospital-a", "hospital-b")


class WorkerGrid(InProcessGrid):
    """The in-process grid whose hospitals answer through the forwarder and their worker."""

    def deliver(self, message: Message) -> Message | None:
        node = message.metadata.dst_node_id
        if node not in self.nodes:
            return None
        self.messages += 1
        return forwarder.forward(message, self.context(node))


@pytest.fixture(scope="module")
def worker_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One worker per hospital for the whole module (each run uses its own site key)."""
    root = tmp_path_factory.mktemp("through-worker")
    workers = [
        WorkerProcess.start(
            {
                "hospital": name,
                "data-source": "synthetic",
                "state-dir": str(root / "state" / name),
            },
            root,
        )
        for name in HOSPITALS
    ]
    try:
        for worker in workers:
            worker.wait_for("serving ")
        yield root
    finally:
        for worker in workers:
            worker.stop()
    answered = sum(w.text().count(": answered ") for w in workers)
    assert answered > 0


def run_once(flat: dict[str, Any], grid: InProcessGrid) -> tuple[RunResult, InProcessGrid]:
    _, result = run_in_process(flat, grid, Path(flat["output-dir"]))
    return result, grid


def rows(output_dir: Path) -> list[dict[str, Any]]:
    """Result rows without wall-clock fields, in a stable order."""
    found = []
    for line in (output_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        found.append(
            {k: v for k, v in row.items() if k not in ("time", "seconds")
             and not k.endswith("_seconds")}
        )  # fmt: skip
    return sorted(found, key=lambda r: json.dumps(r, sort_keys=True))


def site_state(root: Path, site_key: str) -> dict[str, dict[str, torch.Tensor]]:
    """Every saved version of every site-state entry, by hospital and file name."""
    return {
        f"{name}/{file.name}": torch.load(file, weights_only=True)
        for name in HOSPITALS
        for file in sorted((root / "state" / name / site_key).glob("*.pt"))
    }


@pytest.mark.usefixtures("worker_threads")
@pytest.mark.parametrize("algorithm", ["fedavg", "pfednet", "fedhelp", "fedmas"])
def test_a_run_through_the_worker_equals_the_direct_run(
    tmp_path: Path, worker_root: Path, algorithm: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    flat, nodes = setting(algorithm, tmp_path / "direct")
    flat["run-name"] = f"same-{algorithm}"  # its own site key in the module's workers
    site_key = run_site_key(flat["run-name"], 1)
    direct, direct_grid = run_once(flat, InProcessGrid(nodes, flat))

    # the same inputs (FedHelp's public and knowledge files too); only where results and
    # site state go differs
    flat = {**flat, "output-dir": str(tmp_path / "worker" / "out")}
    nodes = {
        node: {**config, "state-dir": str(worker_root / "state" / config["hospital"])}
        for node, config in nodes.items()
    }

    def never(message: Any, context: Any) -> Any:
        raise AssertionError("a message was answered in process, not by the worker")

    monkeypatch.setattr(forwarder, "in_process", never)
    worker, worker_grid = run_once(flat, WorkerGrid(nodes, flat))

    assert worker_grid.messages == direct_grid.messages > 0
    ours, theirs = record_to_numpy(worker.arrays), record_to_numpy(direct.arrays)
    assert list(ours) == list(theirs)
    for key in ours:
        np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)
        assert ours[key].dtype == theirs[key].dtype
    ours_site = site_state(worker_root, site_key)
    theirs_site = site_state(tmp_path / "direct", site_key)
    assert ours_site.keys() == theirs_site.keys()
    if algorithm != "fedavg":
        assert ours_site, "the algorithm keeps site state: the comparison must cover it"
    for entry, state in ours_site.items():
        assert state.keys() == theirs_site[entry].keys()
        for key in state:
            assert torch.equal(state[key], theirs_site[entry][key]), (entry, key)
    assert rows(tmp_path / "worker" / "out") == rows(tmp_path / "direct" / "out")
    summary = json.loads((tmp_path / "worker" / "out" / "summary.json").read_text())
    assert summary["status"] == "completed"
