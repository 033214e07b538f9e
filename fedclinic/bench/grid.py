"""Federated rounds in one process: the real round engine talking to the real ClientApp.

Why: a quality sweep is dozens of runs; starting a SuperLink and one SuperNode per hospital
for each would cost minutes of process start-up and gRPC per run and measure nothing the
quality benchmark is about. The round engine (:class:`fedclinic.engine.RoundEngine`) with the
algorithm's server half, and the hospital handler (``client.app.answer``), are the exact code
a deployment runs; only the transport is replaced by :class:`InProcessGrid`, which offers the
same ``push_messages`` / ``pull_messages`` / ``get_node_ids`` as Flower's grid (so the
engine's polling, retries and re-sends run here too) and hands each message to the handler
with that hospital's node config, as a SuperNode would.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client.app import answer
from fedclinic.engine import Clock, ResendPolicy, RoundEngine, RunResult
from fedclinic.results import ResultsWriter
from fedclinic.site import run_site_key
from strategies import get_algorithm, load_run_config

#: node ids start here; hospital i of a run is node ``FIRST_NODE_ID + i``
FIRST_NODE_ID = 1000
#: the Flower run id every in-process run has (the ClientApp's context says so too)
RUN_ID = 1


class HospitalCrash(BaseException):
    """A hospital's handler raised (a bug, not a reported failure). A SuperNode would turn
    it into an error reply; in process it stops the run at once, with the traceback, rather
    than being retried as a failed pull and waited for until the deadline."""


class InProcessGrid:
    """A Flower ``Grid`` stand-in whose SuperNodes are ``client.app.answer`` in this process.

    ``push_messages`` queues messages (each gets a message ID); ``pull_messages`` first lets
    every hospital answer what was queued for it, in push order, then hands out the replies
    to the IDs asked for, each once, as the SuperLink does. Tests subclass it and override
    :meth:`deliver` to lose, delay or alter a message.
    """

    def __init__(self, nodes: dict[int, dict[str, Any]], run_config: dict[str, Any]) -> None:
        self.nodes = dict(nodes)
        self.run_config = dict(run_config)
        self.messages = 0  # messages the hospitals answered
        self.queued: dict[str, Message] = {}  # pushed, not answered yet (in push order)
        self.replies: dict[str, Message] = {}  # answered, not pulled yet
        #: (message type, node) of every message pushed
        self.log: list[tuple[str, int]] = []

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for message in messages:
            message_id = uuid.uuid4().hex
            message.metadata.__dict__["_message_id"] = message_id  # as Flower's grid sets it
            self.queued[message_id] = message
            self.log.append((message.metadata.message_type, message.metadata.dst_node_id))
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        self.work()
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]

    def work(self) -> None:
        """Every hospital answers what was queued for it."""
        while self.queued:
            message_id = next(iter(self.queued))
            reply = self.deliver(self.queued.pop(message_id))
            if reply is not None:
                self.replies[message_id] = reply

    def context(self, node: int) -> Context:
        """The fresh context a ClientApp process of ``node`` gets for one message."""
        return Context(
            run_id=RUN_ID,
            node_id=node,
            node_config=self.nodes[node],
            state=RecordDict(),
            run_config=self.run_config,
        )

    def deliver(self, message: Message) -> Message | None:
        """Answer one message with a fresh context, like one ClientApp process each; a node
        that left the grid answers nothing."""
        node = message.metadata.dst_node_id
        if node not in self.nodes:
            return None
        kind = message.metadata.message_type
        train = {MessageType.TRAIN: True, MessageType.EVALUATE: False}.get(kind)
        self.messages += 1
        try:
            return answer(message, self.context(node), train)
        except Exception as err:
            raise HospitalCrash(f"node {node}: {type(err).__name__}: {err}") from err


@contextmanager
def task_identity() -> Iterator[None]:
    """Flower's ``Message`` needs a task identity, which a real process gets from its runtime."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = RUN_ID, 0, 0
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


def run_in_process(
    flat: dict[str, Any],
    grid: InProcessGrid,
    output_dir: Path | None = None,
    clock: Clock | None = None,
    resend: ResendPolicy | None = None,
) -> tuple[RoundEngine, RunResult]:
    """One run of the engine against ``grid``; results in ``output_dir`` when given.

    ``flat`` is the run config (as ``--run-config`` would give it). The engine writes
    ``metrics.jsonl``, ``audit.jsonl``, checkpoints and ``summary.json`` exactly as under a
    SuperLink.
    """
    run = load_run_config(flat)
    results = ResultsWriter(output_dir) if output_dir is not None else None
    if results is not None and not run.resume:
        results.write_config(run.to_flat())
    algorithm = get_algorithm(run.algorithm).strategy(run, results)
    site_key = run_site_key(run.run_name, RUN_ID)
    engine = RoundEngine(run, algorithm, results, site_key, clock=clock, resend=resend)
    with task_identity():
        return engine, engine.start(grid)


def run_federation(flat: dict[str, Any], hospitals: list[dict[str, Any]], output_dir: Path) -> Path:
    """Run one federated training run in process; return its results directory.

    ``hospitals`` are the node configs, node ``FIRST_NODE_ID + i`` each.
    """
    nodes = {FIRST_NODE_ID + i: dict(node) for i, node in enumerate(hospitals)}
    with quiet_flower():
        run_in_process(flat, InProcessGrid(nodes, flat), output_dir)
    return output_dir
