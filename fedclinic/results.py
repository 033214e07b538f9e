"""What a run leaves in its output directory, written by the coordinator as rounds complete.

- ``config.json``: the resolved run config;
- ``metrics.jsonl`` and ``metrics.csv``: one row per hospital per round and kind
  (``evaluate``: the model the hospital received, on its validation and test splits;
  ``train``: its local update; ``error``/``rejected``: a failed reply or a refused update and
  why; the algorithms' own kinds), each kind a schema in :mod:`fedclinic.rows`;
- ``model_final.pt`` / ``model_selected.pt``: global models with their SHA-256;
- ``summary.json``: status, selected round (chosen on validation data) and per-hospital results.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from fedclinic.rows import Row, as_row
from fedclinic.serialization import save_checkpoint


def _clean(value: Any) -> Any:
    """JSON-safe: NaN/inf become null, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _clean(v) for k, v in value.items()}
    return value


def write_json(path: Path, data: Any) -> None:
    """Atomic JSON write: a reader never sees half a file."""
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(json.dumps(_clean(data), indent=2, sort_keys=True) + "\n")
    os.replace(temporary, path)


class ResultsWriter:
    """Appends metric rows and writes models and the summary under one output directory."""

    def __init__(self, output_dir: str | Path) -> None:
        self.directory = Path(output_dir)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.directory / "metrics.jsonl"
        self.csv_path = self.directory / "metrics.csv"
        self.rows: list[dict[str, Any]] = []

    def write_config(self, flat_config: Mapping[str, Any]) -> None:
        write_json(self.directory / "config.json", dict(flat_config))

    def append(self, rows: Sequence[Row | Mapping[str, Any]]) -> None:
        """Add rows to the JSON Lines file (flushed at once) and rewrite the CSV view; each
        row follows the schema of its kind (:mod:`fedclinic.rows`)."""
        stamped = [{"time": round(time.time(), 3), **_clean(as_row(r).dump())} for r in rows]
        with self.metrics_path.open("a", encoding="utf-8") as handle:
            for row in stamped:
                handle.write(json.dumps(row, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.rows.extend(stamped)
        self._write_csv()

    def keep_rows(self, count: int) -> int:
        """Resume: keep the first ``count`` rows of ``metrics.jsonl`` (those of completed
        rounds) and move the rest to ``metrics.discarded.jsonl``; returns how many moved."""
        lines = (
            self.metrics_path.read_text(encoding="utf-8").splitlines()
            if self.metrics_path.is_file()
            else []
        )
        kept, discarded = lines[:count], lines[count:]
        if discarded:
            with (self.directory / "metrics.discarded.jsonl").open("a", encoding="utf-8") as out:
                out.write("".join(line + "\n" for line in discarded))
        temporary = self.metrics_path.with_suffix(".jsonl.tmp")
        temporary.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(temporary, self.metrics_path)
        self.rows = [json.loads(line) for line in kept]
        self._write_csv()
        return len(discarded)

    def _write_csv(self) -> None:
        columns: list[str] = []
        for row in self.rows:
            columns.extend(k for k in row if k not in columns)
        temporary = self.csv_path.with_suffix(".csv.tmp")
        with temporary.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            for row in self.rows:
                writer.writerow(
                    {k: json.dumps(v) if isinstance(v, list) else v for k, v in row.items()}
                )
        os.replace(temporary, self.csv_path)

    def save_model(self, name: str, state: Mapping[str, torch.Tensor]) -> dict[str, str]:
        info = save_checkpoint(self.directory / f"{name}.pt", state)
        return {**info, "path": Path(info["path"]).name}

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        write_json(self.directory / "summary.json", summary)
