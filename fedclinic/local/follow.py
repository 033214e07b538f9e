"""Following a submitted run to its final status, and reporting it to the operator.

Shared by ``fedclinic local`` (which also watches its own SuperNode processes) and
``fedclinic submit`` (a run on a remote coordinator). Flower's ``flwr run`` exits 0 even
when the run failed, so the status comes from ``flwr ls --run-id`` until it is final.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from fedclinic.audit import AUDIT_FILE
from fedclinic.errors import FedClinicError
from fedclinic.local.flwr_cli import FlowerCli, FlowerCliError, RunStatus
from fedclinic.local.progress import MetricsTail, ProgressView, summary_table


class RunError(FedClinicError):
    """The run's status could not be read, or it did not finish in time."""


@dataclass
class RunOutcome:
    """How the run ended; ``exit_code`` is what the command returns."""

    exit_code: int
    status: str
    run_id: int | None = None
    details: str = ""
    summary: dict[str, Any] | None = None
    node_ids: dict[str, int] = field(default_factory=dict)


#: status polls once the ServerApp has written its run_end (the final status is seconds away)
ENDING_POLL_SECONDS = 1.0


class RunFollower:
    """Polls a run's status, shows metric rows as they arrive, reports the outcome.

    Each status poll is a ``flwr ls`` process (about a CPU-second), so the status is asked
    every ``poll_interval`` seconds, and every :data:`ENDING_POLL_SECONDS` once the run's
    audit log says the ServerApp has finished (when the output directory is visible here).
    """

    def __init__(
        self,
        cli: FlowerCli,
        console: Console,
        output_dir: Path,
        rounds: int,
        timeout: float,
        poll_interval: float = 10.0,
        check: Callable[[], None] = lambda: None,
        summary_required: bool = True,
    ) -> None:
        self.cli = cli
        self.console = console
        self.output_dir = output_dir
        self.rounds = rounds
        self.timeout = timeout
        self.poll_interval = poll_interval
        self.check = check  # raises when something the run depends on has died
        # False when the coordinator's output directory is not visible from here (a remote
        # submit): a completed status is then the whole answer.
        self.summary_required = summary_required
        self._audit_size, self._audit_ended = -1, False

    def follow(self, run_id: int) -> RunStatus:
        """Show progress until the run reaches a final status, a process dies, or time runs out."""
        tail = MetricsTail(self.output_dir / "metrics.jsonl")
        deadline = time.monotonic() + self.timeout
        next_poll = last_poll = 0.0
        failures = 0
        status = RunStatus(run_id, "pending", "", None)
        with ProgressView(self.console, self.rounds) as view:
            while True:
                view.rows(tail.read_new(), tail.rows)
                self.check()
                now = time.monotonic()
                if self._serverapp_ended():
                    next_poll = min(next_poll, last_poll + ENDING_POLL_SECONDS)
                if now >= next_poll:
                    last_poll = now
                    try:
                        status = self.cli.status(run_id)
                        failures = 0
                    except FlowerCliError as err:
                        failures += 1
                        if failures >= 5:
                            raise RunError(f"cannot read the run status: {err}") from None
                    view.status(status.status)
                    if status.finished:
                        break
                    next_poll = time.monotonic() + self.poll_interval
                if now >= deadline:
                    self._stop_run(run_id)
                    raise RunError(
                        f"run {run_id} did not finish within {self.timeout:.0f} s "
                        f"(status {status.status}); stopped it\n{self._serverapp_log(run_id)}"
                    )
                time.sleep(0.5)
            view.rows(tail.read_new(), tail.rows)
        return status

    def _serverapp_ended(self) -> bool:
        """Whether the audit log holds the ServerApp's ``run_end`` (completed or failed)."""
        path = self.output_dir / AUDIT_FILE
        try:
            size = path.stat().st_size
        except OSError:
            return False
        if size != self._audit_size:
            self._audit_size = size
            tail = path.read_bytes()[-4096:]
            self._audit_ended = b'"event": "run_end"' in tail.splitlines()[-1] if tail else False
        return self._audit_ended

    def _stop_run(self, run_id: int) -> None:
        with contextlib.suppress(FlowerCliError):
            self.cli.stop(run_id)

    def _serverapp_log(self, run_id: int, lines: int = 40) -> str:
        text = self.cli.logs(run_id)
        body = "\n".join(text.splitlines()[-lines:]) or "(no ServerApp log)"
        return f"--- ServerApp log (last {lines} lines, `flwr log {run_id} --show`):\n{body}"

    # ------------------------------------------------------------------ 5. outcome

    def report(self, status: RunStatus) -> RunOutcome:
        """Final table on success; Flower's reason and the ServerApp log tail otherwise."""
        outcome = RunOutcome(
            exit_code=1,
            status=status.status,
            run_id=status.run_id,
            details=status.details,
        )
        if not status.completed:
            # soft_wrap: the reason stays one line (paths in it must not be broken up).
            self.console.print(
                f"[red]run {status.run_id} {status.status}: {escape(status.details)}[/red]",
                soft_wrap=True,
            )
            self.console.print(
                escape(self._serverapp_log(status.run_id)), highlight=False, soft_wrap=True
            )
            return outcome
        summary_path = self.output_dir / "summary.json"
        if not self.summary_required and not summary_path.is_file():
            self.console.print(
                f"[green]run {status.run_id} completed[/green] (results stay on the coordinator)"
            )
            outcome.exit_code = 0
            return outcome
        try:
            outcome.summary = json.loads(summary_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            self.console.print(
                f"[red]run {status.run_id} completed but {summary_path} is missing or "
                f"unreadable ({err})[/red]"
            )
            self.console.print(escape(self._serverapp_log(status.run_id)), highlight=False)
            return outcome
        if not isinstance(outcome.summary, dict):
            self.console.print(f"[red]{summary_path} is not a JSON object[/red]")
            return outcome
        self.console.print(summary_table(outcome.summary))
        model = outcome.summary.get("model") or {}
        if model:
            path = self.output_dir / str(model.get("path", "?"))  # absolute stays
            self.console.print(f"model: {path}\n  sha256 {model.get('sha256')}", highlight=False)
        self.console.print(
            f"[green]run {status.run_id} completed[/green]; results in {self.output_dir}"
        )
        outcome.exit_code = 0
        return outcome
