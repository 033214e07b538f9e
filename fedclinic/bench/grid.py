"""Federated rounds in one process: the real ServerApp strategy talking to the real ClientApp.

Why: a quality sweep is dozens of runs; starting a SuperLink and one SuperNode per hospital
for each would cost minutes of process start-up and gRPC per run and measure nothing the
quality benchmark is about. The strategy (``strategies.get_algorithm(name).strategy``) and
the hospital handler (``client.app.answer``) are the exact code a deployment runs; only the
transport is replaced by :class:`InProcessGrid`, which hands each message to the handler
with that hospital's node config, as a SuperNode would.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client.app import answer
from fedclinic.results import ResultsWriter
from fedclinic.serialization import state_to_record
from strategies import get_algorithm, load_run_config

#: node ids start here; hospital i of a run is node ``FIRST_NODE_ID + i``
FIRST_NODE_ID = 1000


class InProcessGrid:
    """A Flower ``Grid`` stand-in that delivers every message to ``client.app.answer``."""

    def __init__(self, nodes: dict[int, dict[str, Any]], run_config: dict[str, Any]) -> None:
        self.nodes = dict(nodes)
        self.run_config = dict(run_config)
        self.messages = 0

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def send_and_receive(
        self, messages: Iterable[Message], timeout: float | None = None
    ) -> list[Message]:
        """Answer each message in turn with a fresh context, like one ClientApp process each."""
        replies = []
        for message in messages:
            node = message.metadata.dst_node_id
            context = Context(
                run_id=1,
                node_id=node,
                node_config=self.nodes[node],
                state=RecordDict(),
                run_config=self.run_config,
            )
            kind = message.metadata.message_type
            train = {MessageType.TRAIN: True, MessageType.EVALUATE: False}.get(kind)
            replies.append(answer(message, context, train))
            self.messages += 1
        return replies


@contextmanager
def task_identity() -> Iterator[None]:
    """Flower's ``Message`` needs a task identity, which a real process gets from its runtime."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = 1, 0, 0
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


@contextmanager
def quiet_flower() -> Iterator[None]:
    """Flower's per-round INFO lines would tear the progress bar; warnings still show."""
    logger = logging.getLogger("flwr")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def run_federation(flat: dict[str, Any], hospitals: list[dict[str, Any]], output_dir: Path) -> Path:
    """Run one federated training run in process; return its results directory.

    ``flat`` is the run config (as ``--run-config`` would give it), ``hospitals`` the node
    configs. The strategy writes ``metrics.jsonl`` and ``summary.json`` exactly as under a
    SuperLink.
    """
    run = load_run_config(flat)
    results = ResultsWriter(output_dir)
    results.write_config(run.to_flat())
    strategy = get_algorithm(run.algorithm).strategy(run, results)
    nodes = {FIRST_NODE_ID + i: dict(node) for i, node in enumerate(hospitals)}
    grid = InProcessGrid(nodes, flat)
    with task_identity(), quiet_flower():
        strategy.start(  # type: ignore[arg-type]
            grid=grid, initial_arrays=state_to_record(strategy.initial_state())
        )
    return output_dir
