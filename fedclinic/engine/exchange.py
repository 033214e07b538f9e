"""Sending one exchange's messages and collecting the replies: polling, retries, deadlines,
and asking a hospital again when its message seems lost.

The same code runs against Flower's grid (a ServerApp under a SuperLink) and the in-process
grid of tests and benchmarks (:class:`fedclinic.bench.grid.InProcessGrid`): both offer
``get_node_ids``, ``push_messages`` and ``pull_messages``.

Asking again (docs/reliability.md, "A hospital that never got its message"): Flower 1.39's
SuperLink marks a message delivered when a SuperNode pulls it, before the answer to that
pull reaches the node; a message lost on the way is never handed out again, and the round
would wait its whole deadline for a reply that cannot come. So a hospital that has not
replied after a bound (:class:`ResendPolicy`) and is still connected gets a fresh copy of its
message (a new message ID; ``attempt`` in the config says which). Replies are matched to the
message they answer by ID; the first reply for a hospital is its answer and any later one is
a duplicate, discarded and counted. Asking twice is safe: a hospital's work for a round
starts from its site state of the round before and from seeds fixed by (run, round,
hospital), so a repeated message computes the same update again.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any, Protocol, TypeVar

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common import log

from fedclinic import messages as keys
from fedclinic.errors import FedClinicError

#: seconds between asks for replies (Flower's own send_and_receive waits 3 s between asks,
#: which adds 1.5 s to every exchange on average)
REPLY_POLL_SECONDS = 0.5

#: consecutive failed calls to the SuperLink an exchange survives (its state database can
#: refuse a request under load: Flower 1.39 answers "database is locked" with an HTTP 500)
SUPERLINK_RETRIES = 5

T = TypeVar("T")


class GridLike(Protocol):
    """The part of Flower's ``Grid`` the engine uses (``InProcessGrid`` has it too)."""

    def get_node_ids(self) -> Iterable[int]: ...

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]: ...

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]: ...


class Clock:
    """Monotonic time and sleeping; tests substitute a clock that only pretends to wait."""

    def now(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


def with_retries(what: str, call: Callable[[], T], clock: Clock | None = None) -> T:
    """``call()``, retried with backoff when the SuperLink fails a request transiently."""
    clock = clock or Clock()
    for attempt in range(1, SUPERLINK_RETRIES + 1):
        try:
            return call()
        except Exception as err:  # httpx/grpc raise many types for a failed request
            if attempt == SUPERLINK_RETRIES:
                raise
            log(
                WARNING,
                "%s failed (%s: %s); retry %d of %d",
                what,
                type(err).__name__,
                (str(err).splitlines() or [""])[0][:200],
                attempt,
                SUPERLINK_RETRIES - 1,
            )
            clock.sleep(min(2.0**attempt, 15.0))
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class ResendPolicy:
    """When a hospital without a reply is asked again.

    After ``factor`` x the slowest reply this hospital has given so far in the run (at least
    ``floor`` seconds), and never later than half the exchange's deadline; a hospital not
    heard from yet in the run waits half the deadline. At most ``max_asks`` messages per
    hospital and exchange. Slow hospitals thus are not asked twice for nothing, and a lost
    message is re-sent while half the deadline is left.
    """

    factor: float = 3.0
    floor: float = 30.0
    max_asks: int = 3

    def wait(self, timeout: float, slowest: float | None) -> float:
        half = timeout / 2
        if slowest is None:
            return half
        return min(half, max(self.floor, self.factor * slowest))


@dataclass
class Delivery:
    """What one exchange's transport produced, by node ID."""

    asked: list[int]
    #: the reply taken for each node that answered (the first to arrive)
    replies: dict[int, Message] = field(default_factory=dict)
    #: nodes without any reply by the deadline
    missing: list[int] = field(default_factory=list)
    #: nodes asked again, and how often
    resent: dict[int, int] = field(default_factory=dict)
    #: later replies for nodes that had already answered, discarded
    duplicates: dict[int, int] = field(default_factory=dict)
    #: seconds from the first message to the reply, per node
    seconds: dict[int, float] = field(default_factory=dict)


def ask_again(message: Message, attempt: int) -> Message:
    """A fresh copy of an instruction message (new creation time, so a new message ID)."""
    content = message.content
    records: dict[str, Any] = dict(content.items())
    config: dict[str, Any] = (
        dict(content.config_records[keys.CONFIG]) if keys.CONFIG in content.config_records else {}
    )
    records[keys.CONFIG] = ConfigRecord({**config, keys.ATTEMPT: attempt})
    return Message(
        content=RecordDict(records),
        message_type=message.metadata.message_type,
        dst_node_id=message.metadata.dst_node_id,
        group_id=message.metadata.group_id,
    )


class Transport:
    """One grid, one clock, one re-send policy for a whole run; remembers how long each
    hospital took to reply, for the re-send bound."""

    def __init__(
        self, grid: GridLike, clock: Clock | None = None, policy: ResendPolicy | None = None
    ) -> None:
        self.grid = grid
        self.clock = clock or Clock()
        self.policy = policy or ResendPolicy()
        self.slowest: dict[int, float] = {}

    def node_ids(self) -> list[int]:
        return sorted(with_retries("asking for hospitals", self.grid.get_node_ids, self.clock))

    def wait_for_hospitals(self, minimum: int, timeout: float) -> list[int]:
        """All connected hospitals, once at least ``minimum`` are connected."""
        deadline = self.clock.now() + timeout
        while True:
            nodes = self.node_ids()
            if len(nodes) >= minimum:
                return nodes
            if self.clock.now() > deadline:
                raise FedClinicError(
                    f"only {len(nodes)} hospital(s) connected after {timeout:.0f} s; the run "
                    f"needs min-hospitals = {minimum}"
                )
            log(INFO, "waiting for hospitals: %d/%d connected", len(nodes), minimum)
            self.clock.sleep(1.0)

    def push(self, messages: list[Message]) -> list[str | None]:
        """Push, retried on failure with fresh copies (a push that failed half-way may have
        stored some messages: their replies are never asked for, and a hospital that gets
        both computes the same answer twice)."""
        tries = 0

        def call() -> list[str | None]:
            nonlocal tries
            tries += 1
            batch = messages if tries == 1 else [ask_again(m, _attempt_of(m)) for m in messages]
            return list(self.grid.push_messages(batch))

        return with_retries("sending messages", call, self.clock)

    def pull(self, message_ids: list[str]) -> list[Message]:
        """The replies that arrived for ``message_ids`` (each is handed out once)."""
        if not message_ids:
            return []
        return list(
            with_retries(
                "asking for replies", lambda: self.grid.pull_messages(message_ids), self.clock
            )
        )

    def exchange(self, messages: Mapping[int, Message], timeout: float) -> Delivery:
        """Send one message per node and wait until each node replied or ``timeout``."""
        return _Exchange(self, dict(messages), timeout).run()


class _Exchange:
    """The state of one exchange while it runs."""

    def __init__(self, transport: Transport, messages: dict[int, Message], timeout: float) -> None:
        self.transport = transport
        self.clock = transport.clock
        self.timeout = timeout
        self.started = self.clock.now()
        self.deadline = self.started + timeout
        self.latest = messages  # node -> the last message it was sent
        self.owner: dict[str, int] = {}  # message ID -> node
        self.answered: set[str] = set()  # message IDs whose reply arrived
        self.last_sent: dict[int, float] = {}
        self.asks: dict[int, int] = {}
        self.delivery = Delivery(asked=sorted(messages))

    def run(self) -> Delivery:
        self.send(self.latest)
        while True:
            self.collect()
            waiting = [n for n in self.delivery.asked if n not in self.delivery.replies]
            if not waiting or self.clock.now() >= self.deadline:
                self.delivery.missing = waiting
                return self.delivery
            self.ask_again(waiting)
            self.clock.sleep(min(REPLY_POLL_SECONDS, max(self.deadline - self.clock.now(), 0.0)))

    def send(self, batch: dict[int, Message]) -> None:
        ids = self.transport.push(list(batch.values()))
        for node, message_id in zip(batch, ids, strict=True):
            self.last_sent[node] = self.clock.now()
            self.asks[node] = self.asks.get(node, 0) + 1
            if message_id:  # Flower answers None for a message it could not store
                self.owner[message_id] = node

    def collect(self) -> None:
        """Pull; the first reply for a node is its answer, a later one a duplicate."""
        pending = [m for m in self.owner if m not in self.answered]
        delivery = self.delivery
        for reply in self.transport.pull(pending):
            replied_to = reply.metadata.reply_to_message_id
            node = self.owner.get(replied_to)
            if node is None or replied_to in self.answered:
                log(WARNING, "a reply to message %r was not asked for; ignored", replied_to)
                continue
            self.answered.add(replied_to)
            if node in delivery.replies:
                delivery.duplicates[node] = delivery.duplicates.get(node, 0) + 1
                continue
            delivery.replies[node] = reply
            took = self.clock.now() - self.started
            delivery.seconds[node] = took
            slowest = self.transport.slowest
            slowest[node] = max(slowest.get(node, 0.0), took)

    def ask_again(self, waiting: list[int]) -> None:
        """Re-send to waiting nodes whose bound has passed, if they are still connected."""
        now, policy, slowest = self.clock.now(), self.transport.policy, self.transport.slowest
        due = [
            n
            for n in waiting
            if self.asks[n] < policy.max_asks
            and now - self.last_sent[n] >= policy.wait(self.timeout, slowest.get(n))
        ]
        if not due:
            return
        connected = set(self.transport.node_ids())
        again = {}
        for node in due:
            if node in connected:
                attempt = self.asks[node] + 1
                log(
                    WARNING,
                    "no reply from node %d after %.0f s; asking it again (attempt %d)",
                    node,
                    now - self.started,
                    attempt,
                )
                self.latest[node] = again[node] = ask_again(self.latest[node], attempt)
                self.delivery.resent[node] = self.delivery.resent.get(node, 0) + 1
        if again:
            self.send(again)


def _attempt_of(message: Message) -> int:
    content = message.content
    if keys.CONFIG in content.config_records:
        return int(content[keys.CONFIG].get(keys.ATTEMPT, 1))  # type: ignore[arg-type]
    return 1
