"""The SuperLink's node list, for the dashboard's hospitals table.

Read through Flower's documented Control API client, ``flwr supernode list --format json``
(node ID, status online/offline/registered, when it came online or went offline), via
:class:`fedclinic.local.flwr_cli.FlowerCli`. Each call is a ``flwr`` process (about a
CPU-second), so the list is asked in the background at most every ``every`` seconds, and
only while a page asks for it: an idle dashboard costs nothing.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from fedclinic.local.flwr_cli import FlowerCli, FlowerCliError


class SuperLinkNodes:
    """A cached ``flwr supernode list``; :meth:`snapshot` never waits for the SuperLink."""

    def __init__(
        self,
        cli: FlowerCli,
        every: float = 15.0,
        ready: Callable[[], bool] = lambda: True,
    ) -> None:
        self.cli = cli
        self.every = every
        #: whether asking makes sense yet (``fedclinic local``: once the CLI is configured)
        self.ready = ready
        self._lock = threading.Lock()
        self._nodes: list[dict[str, Any]] = []
        self._error: str | None = "not asked yet"
        self._checked: float | None = None
        self._asking = False

    def snapshot(self) -> dict[str, Any]:
        """The last list (``nodes``, ``error``, ``checked``); starts a refresh when stale."""
        with self._lock:
            stale = self._checked is None or time.time() - self._checked >= self.every
            if stale and not self._asking:
                self._asking = True
                threading.Thread(target=self._refresh, name="superlink-nodes", daemon=True).start()
            return {"nodes": list(self._nodes), "error": self._error, "checked": self._checked}

    def _refresh(self) -> None:
        nodes, error = self._nodes, None
        try:
            if not self.ready():
                error = "the SuperLink is not up yet"
            else:
                nodes = self.cli.supernodes()
        except (FlowerCliError, OSError) as err:
            error = f"the SuperLink's node list is unavailable: {err}"
        with self._lock:
            self._nodes, self._error = nodes, error
            self._checked = time.time()
            self._asking = False
