"""Show a run as it happens: rows of ``metrics.jsonl`` as they arrive, a round progress bar,
and the final per-hospital table from ``summary.json``.

The ServerApp appends one JSON object per hospital, round and kind to
``<output-dir>/metrics.jsonl`` (``evaluate`` / ``train`` / ``error`` rows) and writes
``summary.json`` at the end. Reading those files (rather than parsing Flower logs) keeps the
runner independent of Flower's log format.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedclinic.tasks import TASKS


def summary_metrics(summary: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    """The final table's metric columns for the run's task (classification when unknown)."""
    task = TASKS.get(str(summary.get("task", "classification")), TASKS["classification"])
    return task.summary_metrics


class MetricsTail:
    """Reads rows appended to a JSON Lines file since the last call.

    Only complete lines are consumed: a row being written is picked up on the next call.
    A malformed line is reported once, as a row of kind ``unreadable``, instead of
    stopping the display.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.rows: list[dict[str, Any]] = []

    def read_new(self) -> list[dict[str, Any]]:
        try:
            with self.path.open("rb") as handle:
                handle.seek(self.offset)
                data = handle.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n")
        if end < 0:
            return []
        self.offset += end + 1
        new = []
        for line in data[: end + 1].splitlines():
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = {"kind": "unreadable", "line": line.decode("utf-8", "replace")[:200]}
            if isinstance(row, dict):
                new.append(row)
        self.rows.extend(new)
        return new


def rounds_completed(rows: list[dict[str, Any]]) -> int:
    """Rounds whose training replies have arrived (the highest round with a train row)."""
    rounds = [int(r["round"]) for r in rows if r.get("kind") == "train" and _is_int(r.get("round"))]
    return max(rounds, default=0)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any, digits: int = 3) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "-" if value is None else str(value)
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def format_row(row: Mapping[str, Any], rounds: int | None = None) -> str:
    """One metrics row as one console line (rich markup).

    With ``rounds`` (the run's), the evaluate-only exchange after the last round (the
    ServerApp numbers it ``rounds + 1``) is shown as ``final``, not as one more round.
    ``n`` is the hospital's training-set size everywhere (as in the final table).
    """
    kind = row.get("kind", "?")
    number = row.get("round", "?")
    label = (
        "final   "
        if rounds is not None and _is_int(number) and number > rounds
        else (f"round {number:>2}")
    )
    head = f"{label} [bold]{row.get('hospital', '?')}[/bold]"
    if kind == "evaluate" and "val_dice" in row:
        return (
            f"{head} eval model r{row.get('model_round', '?')}: "
            f"val Dice {_number(row.get('val_dice'))} IoU {_number(row.get('val_iou'))} | "
            f"test Dice {_number(row.get('test_dice'))} IoU {_number(row.get('test_iou'))}"
            + _flags(row)
        )
    if kind == "evaluate":
        return (
            f"{head} eval model r{row.get('model_round', '?')}: "
            f"val bacc {_number(row.get('val_balanced_accuracy'))} "
            f"AUC {_number(row.get('val_auc'))} | "
            f"test acc {_number(row.get('test_accuracy'))} "
            f"AUC {_number(row.get('test_auc'))}" + _flags(row)
        )
    if kind == "train":
        return (
            f"{head} train: loss {_number(row.get('train_loss'), 4)} "
            f"n={_number(row.get('num_train'))} ({_number(row.get('steps'))} steps) "
            f"{_number(row.get('seconds'), 1)} s on {row.get('device', '?')}"
        )
    if kind == "error":
        return f"{head} [red]error: {escape(str(row.get('reason', '?')))}[/red]"
    # Other kinds (algorithm-specific rows, e.g. aggregation weights): shown compactly.
    extra = {k: v for k, v in row.items() if k not in ("round", "hospital", "kind", "time")}
    text = ", ".join(f"{k}={_number(v)}" for k, v in extra.items())
    return f"[dim]{head} {escape(str(kind))}: {escape(text[:160])}[/dim]"


def _flags(row: Mapping[str, Any]) -> str:
    """An evaluation's flags (a one-class model or split), as a warning after its scores."""
    flags = row.get("flags")
    if not flags or not isinstance(flags, list):
        return ""
    return f" [yellow]FLAGGED: {escape(', '.join(str(f) for f in flags))}[/yellow]"


class ProgressView:
    """A progress bar of rounds plus one printed line per metrics row."""

    def __init__(self, console: Console, total_rounds: int) -> None:
        self.console = console
        self.total_rounds = total_rounds
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("rounds"),
            TimeElapsedColumn(),
            TextColumn("{task.fields[status]}"),
            console=console,
            transient=False,
        )
        self.task = self.progress.add_task("federated run", total=total_rounds, status="")

    def __enter__(self) -> ProgressView:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def rows(self, rows: list[dict[str, Any]], all_rows: list[dict[str, Any]]) -> None:
        for row in rows:
            self.progress.console.print(format_row(row, self.total_rounds), highlight=False)
        done = min(rounds_completed(all_rows), self.total_rounds)
        self.progress.update(self.task, completed=done)

    def status(self, text: str) -> None:
        self.progress.update(self.task, status=text)


def summary_table(summary: Mapping[str, Any]) -> Table:
    """Per hospital: training size, the final model's metrics, the selected model's."""
    selected = summary.get("selected_round", "?")
    metrics = summary_metrics(summary)
    hospitals = summary.get("hospitals") or {}
    flagged = any(_flag_list(info or {}) for info in hospitals.values())
    table = Table(
        title=(
            f"{summary.get('algorithm', '?')}: {summary.get('rounds', '?')} rounds; "
            f"selected: round {selected} by {summary.get('selection_metric', '?')}"
        ),
        caption="train n = the hospital's training-set size; final = model after the last "
        "round; sel = the selected round's model"
        + (
            "; flags: model 1-class = the final or selected model predicts one class for "
            "every sample of that split, split 1-class = the split holds one class; balanced "
            "accuracy and AUC mean little there (summary.json: flags)"
            if flagged
            else ""
        ),
    )
    table.add_column("hospital", style="bold", no_wrap=True)
    table.add_column("train n", justify="right")
    for _, label in metrics:
        table.add_column(f"final\n{label}", justify="right")
    for _, label in metrics[:2]:
        table.add_column(f"sel\n{label}", justify="right")
    if flagged:
        table.add_column("flags", style="yellow", overflow="fold")
    for name in sorted(hospitals):
        info = hospitals[name] or {}
        final = info.get("final") or {}
        chosen = info.get("selected") or {}
        table.add_row(
            name,
            _number(info.get("num_train")),
            *(_number(final.get(key)) for key, _ in metrics),
            *(_number(chosen.get(key)) for key, _ in metrics[:2]),
            *([_flag_cell(_flag_list(info))] if flagged else []),
        )
    return table


def _flag_list(info: Mapping[str, Any]) -> list[str]:
    flags = info.get("flags")
    return [str(f) for f in flags] if isinstance(flags, list) else []


def _flag_cell(flags: list[str]) -> str:
    """``predicts-one-class-on-val``, ``test-split-one-class``.. as ``model 1-class: val`` and
    ``split 1-class: test`` (the caption says what they mean)."""
    model = [f.removeprefix("predicts-one-class-on-") for f in flags if f.startswith("predicts")]
    split = [f.removesuffix("-split-one-class") for f in flags if f.endswith("-split-one-class")]
    other = [f for f in flags if not f.startswith("predicts") and not f.endswith("-one-class")]
    lines = [f"{what} 1-class: {','.join(splits)}" for what, splits in
             (("model", model), ("split", split)) if splits] + other  # fmt: skip
    return escape("\n".join(lines))
