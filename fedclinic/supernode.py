"""``python -m fedclinic.supernode [flower-supernode flags]``: Flower's own SuperNode, with its
waits shortened while a run is exchanging messages. Every hospital node fedclinic starts runs
through it (``fedclinic hospital``, so the hospital image, and ``fedclinic local``), except a
benchmark's plain Flower app, which keeps ``flower-supernode`` as Flower ships it.

Why: Flower 1.39's SuperNode loop (``flwr/supernode/start_client_internal.py``) pulls a message
from the coordinator, waits for the reply and pushes it, with three fixed waits: **3 s** after
a pull that found no message, **0.5 s** between looks for the reply in its own state, and
**0.5 s** between looks for a reply's objects. Every exchange of a round pays the first on
average half-way (1.5 s) and the reply look a quarter second, whatever the hospital's own
compute; measured with an experiment-only patch, they were most of a 2-hospital round's
overhead (docs/architecture.md, "Processes").

What this changes, in this process only (nothing on disk, no file of Flower's):

- after the node pushed a reply (a run is exchanging: the next message of the round, or of
  the next round, is usually seconds away), the pulls that find nothing wait
  :data:`PULL_RAMP` (0.25, 0.5, 1, 2 s) and then Flower's 3 s again: the next message is seen
  soon after it is sent, for about four more pulls per exchange. A node waiting for a run, or
  between runs, keeps Flower's 3 s. (Each pull is a write transaction in the SuperLink's
  SQLite file, which many hospitals share: docs/reliability.md, "Many hospitals"; a fixed
  faster rate would multiply them.)
- the two local waits (the reply, its objects) become :data:`LOCAL_WAIT`: they look at the
  node's own memory, not the network.

It relies on module-level names of Flower's (``start_client_internal``'s ``time`` and
``_push_messages``, and the three ``time.sleep`` calls of that module, checked in its source),
so it refuses to start on any flwr but :data:`FLWR_VERSION`, or when those are not what it
expects. ``FEDCLINIC_SUPERNODE_PACING=flower`` starts the node with Flower's own waits.
"""

from __future__ import annotations

import inspect
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any

from fedclinic.flower import LauncherError, launch, require_flower

#: the waits of the empty pulls after a reply, then Flower's 3 s
PULL_RAMP = (0.25, 0.5, 1.0, 2.0)
#: the waits for a reply and its objects in the node's own state (Flower: 0.5 s)
LOCAL_WAIT = 0.05
#: Flower 1.39's waits, as they appear in ``start_client_internal.py``
FLOWER_PULL_WAIT, FLOWER_LOCAL_WAIT = 3, 0.5
PACING_ENVIRONMENT = "FEDCLINIC_SUPERNODE_PACING"
PACINGS = ("fedclinic", "flower")


class Pacing:
    """Stands in for the ``time`` module inside Flower's SuperNode loop: every name is the
    real module's but ``sleep``, whose Flower waits it maps (see the module docstring)."""

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        *,
        ramp: tuple[float, ...] = PULL_RAMP,
        local_wait: float = LOCAL_WAIT,
    ) -> None:
        self.clock, self._sleep = clock, sleep
        self.ramp, self.local_wait = ramp, local_wait
        self.last_reply: float | None = None  # when the node last pushed a reply
        self.empty_pulls = len(ramp)  # since the last reply: none yet, so Flower's wait

    def replied(self) -> None:
        self.last_reply = self.clock()
        self.empty_pulls = 0

    def wait_for(self, seconds: float) -> float:
        """What a Flower wait of ``seconds`` becomes now."""
        if seconds == FLOWER_PULL_WAIT:
            if self.empty_pulls >= len(self.ramp):
                return seconds
            self.empty_pulls += 1
            return self.ramp[self.empty_pulls - 1]
        if seconds == FLOWER_LOCAL_WAIT:
            return self.local_wait
        return seconds

    def sleep(self, seconds: float) -> None:
        self._sleep(self.wait_for(seconds))

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def check_flower_version(installed: str | None = None) -> None:
    """Refuse any flwr but :data:`FLWR_VERSION` (``installed`` defaults to the real one)."""
    require_flower(
        "fedclinic.supernode",
        "check the waits of flwr/supernode/start_client_internal.py and update this launcher "
        f"(or start the node with {PACING_ENVIRONMENT}=flower)",
        installed,
    )


def pace(loop: ModuleType, pacing: Pacing) -> None:
    """Install ``pacing`` in Flower's SuperNode loop module ``loop``."""
    source = inspect.getsource(loop)
    expected = {
        "time.sleep(3)": 1,
        "time.sleep(0.5)": 2,
        "_push_messages(": 2,  # its definition and its one call
    }
    found = {text: source.count(text) for text in expected}
    if found != expected or getattr(loop, "time", None) is not time:
        raise LauncherError(
            f"{loop.__name__}: expected {expected} and the time module, found {found}: not "
            "the Flower this launcher was written against"
        )
    push_messages = loop._push_messages

    def push_and_note(*args: Any, **kwargs: Any) -> None:
        push_messages(*args, **kwargs)
        pacing.replied()

    loop.time = pacing  # type: ignore[attr-defined]
    loop._push_messages = push_and_note  # type: ignore[attr-defined]


def pacing_choice(environ: Mapping[str, str]) -> str:
    value = environ.get(PACING_ENVIRONMENT, PACINGS[0])
    if value not in PACINGS:
        raise LauncherError(
            f"{PACING_ENVIRONMENT}={value!r} is not allowed: expected {' or '.join(PACINGS)}"
        )
    return value


def prepare(environ: Mapping[str, str] = os.environ) -> str:
    """Check the Flower version and shorten its waits; returns the pacing in use."""
    choice = pacing_choice(environ)
    if choice == "flower":
        return choice
    check_flower_version()
    from flwr.supernode import start_client_internal

    pace(start_client_internal, Pacing())
    return choice


def start(choice: str) -> None:
    from flwr.supercore.logger import log
    from flwr.supernode.cli import flower_supernode

    if choice == "fedclinic":
        log(logging.INFO, "fedclinic.supernode: the empty pulls after a reply wait %s s, "
            "then Flower's %d s; reply looks every %g s (Flower's %g s)",
            ", ".join(f"{w:g}" for w in PULL_RAMP), FLOWER_PULL_WAIT, LOCAL_WAIT,
            FLOWER_LOCAL_WAIT)  # fmt: skip
    flower_supernode()


def main() -> int:
    return launch("flower-supernode", prepare, start)


if __name__ == "__main__":
    sys.exit(main())
