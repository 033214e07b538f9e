"""What the coordinator's run directories say, as JSON views for the dashboard. Read-only.

A run directory (README "What a run writes") holds ``config.json`` (the resolved run config),
``metrics.jsonl`` (rows of :mod:`fedclinic.rows`, each stamped with its ``time``),
``audit.jsonl`` (:mod:`fedclinic.audit`: ``run_start``, one ``round`` event per completed
round, ``final_evaluation``, ``run_end``), and at the end ``summary.json`` and the models.
While a run goes on the files grow; a line half-written when read is skipped and read whole
at the next poll. Views are cached per run until one of its files changes.

Nothing here imports torch: the dashboard runs beside the coordinator without its stack.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedclinic.audit import AUDIT_FILE

CONFIG_FILE, METRICS_FILE, SUMMARY_FILE = "config.json", "metrics.jsonl", "summary.json"
RUN_FILES = (CONFIG_FILE, METRICS_FILE, AUDIT_FILE, SUMMARY_FILE)
#: a run id is one directory name under the runs root: no separators, no leading dot
RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}\.pt$")
#: hospitals holding less than this share of the run's training samples are "small", as in
#: the quality benchmarks (BENCHMARKS.md)
SMALL_SHARE = 0.10
#: config keys that differ between runs of the same study: a local-only run that differs
#: from this one only in these (and in algorithm options, ``<algorithm>.<key>``) is its baseline
RUN_SPECIFIC_KEYS = frozenset({"algorithm", "output-dir", "run-name", "resume", "flower-run-id"})
LOCAL_ONLY = "local-only"
#: a running run whose files have not changed for round-timeout plus this is "stalled"
STALL_MARGIN_SECONDS = 120.0


def clean(value: Any) -> Any:
    """JSON-safe: NaN and infinities become ``None``, recursively (as ``fedclinic.results``
    does for what it writes; that module loads torch, which the dashboard does without)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list | tuple):
        return [clean(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): clean(v) for k, v in value.items()}
    return value


def number(value: Any) -> float | None:
    """A finite float, or ``None`` (booleans, strings, lists and NaN are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # absent, or replaced at this moment (the writers replace atomically)
    return data if isinstance(data, dict) else None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every complete JSON object line; a half-written last line is left for the next read."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return []
    found = []
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            found.append(entry)
    return found


def lower_is_better(metric: str) -> bool:
    return "loss" in metric


class FileHashes:
    """SHA-256 of model files, computed once per (path, size, mtime)."""

    def __init__(self) -> None:
        self._known: dict[Path, tuple[tuple[int, int], str]] = {}
        self._lock = threading.Lock()

    def sha256(self, path: Path) -> str | None:
        try:
            stat = path.stat()
        except OSError:
            return None
        key = (stat.st_size, stat.st_mtime_ns)
        with self._lock:
            known = self._known.get(path)
        if known and known[0] == key:
            return known[1]
        digest = hashlib.sha256()
        try:
            with path.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
        except OSError:
            return None
        with self._lock:
            self._known[path] = (key, digest.hexdigest())
        return digest.hexdigest()


@dataclass(frozen=True)
class RunFiles:
    """One run's files as read at one moment."""

    run_id: str
    directory: Path
    config: dict[str, Any]
    rows: list[dict[str, Any]]
    audit: list[dict[str, Any]]
    summary: dict[str, Any] | None
    updated: float | None  # latest modification time of the run's files

    @classmethod
    def read(cls, run_id: str, directory: Path) -> RunFiles:
        times = []
        for name in RUN_FILES:
            with contextlib.suppress(OSError):
                times.append((directory / name).stat().st_mtime)
        return cls(
            run_id=run_id,
            directory=directory,
            config=read_json(directory / CONFIG_FILE) or {},
            rows=read_jsonl(directory / METRICS_FILE),
            audit=read_jsonl(directory / AUDIT_FILE),
            summary=read_json(directory / SUMMARY_FILE),
            updated=max(times) if times else None,
        )

    # ---------------------------------------------------------------- plain facts
    def config_value(self, key: str) -> Any:
        if key in self.config:
            return self.config[key]
        start = self.start_event()
        return (start or {}).get("config", {}).get(key)

    def start_event(self) -> dict[str, Any] | None:
        starts = [e for e in self.audit if e.get("event") == "run_start"]
        return starts[0] if starts else None

    def end_event(self) -> dict[str, Any] | None:
        """The last ``run_end``, unless the run was resumed after it."""
        event: dict[str, Any]  # reversed() of a list of Any-valued dicts infers as Any
        for event in reversed(self.audit):
            if event.get("event") in ("run_start", "run_resumed"):
                return None
            if event.get("event") == "run_end":
                return event
        return None

    def round_events(self) -> dict[int, dict[str, Any]]:
        """Completed round -> its audit event (``round``, or ``final_evaluation``)."""
        events = {}
        for event in self.audit:
            if event.get("event") in ("round", "final_evaluation") and isinstance(
                event.get("round"), int
            ):
                events[event["round"]] = event
        return events

    def rounds(self) -> int | None:
        value = self.config_value("rounds")
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        return (self.summary or {}).get("rounds")

    def status(self, now: float) -> tuple[str, str]:
        """(status, detail): running, stalled, completed, failed, or waiting (no files yet)."""
        end = self.end_event()
        if end is not None:
            status = str(end.get("status", "ended"))
            return status, str(end.get("reason", ""))
        if self.summary and self.summary.get("status") == "completed":
            return "completed", ""
        if self.updated is None:
            return "waiting", "the run has written nothing yet"
        timeout = number(self.config_value("round-timeout")) or 600.0
        quiet = now - self.updated
        if quiet > timeout + STALL_MARGIN_SECONDS:
            return "stalled", (
                f"no file of this run changed for {quiet / 60:.0f} min (round-timeout "
                f"{timeout:g} s) and it never recorded its end: the coordinator may have stopped"
            )
        return "running", ""


def evaluation_metrics(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """The scalar ``val_*``/``test_*`` metrics the evaluate rows carry, sorted."""
    names: set[str] = set()
    for row in rows:
        if row.get("kind") == "evaluate":
            names.update(
                k
                for k, v in row.items()
                if k.startswith(("val_", "test_")) and number(v) is not None
            )
    return sorted(names)


def headline_metric(files: RunFiles, metrics: list[str]) -> str | None:
    """The test-split twin of the run's selection metric (what the benchmarks report)."""
    selection = (files.summary or {}).get("selection_metric") or files.config_value(
        "selection-metric"
    )
    candidates = []
    if isinstance(selection, str) and selection.startswith("val_"):
        candidates.append("test_" + selection[len("val_") :])
    candidates += ["test_balanced_accuracy", "test_dice", "test_accuracy"]
    for name in candidates:
        if name in metrics:
            return name
    tests = [m for m in metrics if m.startswith("test_")]
    return tests[0] if tests else (metrics[0] if metrics else None)


def final_scores(files: RunFiles, metric: str) -> dict[str, float | None]:
    """Each hospital's score on ``metric``: the summary's selected model when the run is
    done, else the latest model it evaluated."""
    if files.summary and isinstance(files.summary.get("hospitals"), dict):
        return {
            name: number((entry.get("selected") or entry.get("final") or {}).get(metric))
            for name, entry in files.summary["hospitals"].items()
            if isinstance(entry, dict)
        }
    latest: dict[str, tuple[int, float | None]] = {}
    for row in files.rows:
        if row.get("kind") != "evaluate" or not isinstance(row.get("hospital"), str):
            continue
        model_round = row.get("model_round", -1)
        if row["hospital"] not in latest or model_round >= latest[row["hospital"]][0]:
            latest[row["hospital"]] = (model_round, number(row.get(metric)))
    return {name: value for name, (_, value) in latest.items()}


def comparable_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config without what differs between the runs of one study (see
    :data:`RUN_SPECIFIC_KEYS`) and without algorithm options."""
    return {k: v for k, v in config.items() if k not in RUN_SPECIFIC_KEYS and "." not in k}


def fingerprints(files: RunFiles) -> dict[str, str]:
    found: dict[str, str] = {}
    for row in files.rows:
        if row.get("kind") == "train" and row.get("data_fingerprint"):
            found[str(row.get("hospital"))] = str(row["data_fingerprint"])
    return found


# ---------------------------------------------------------------------------- the view


class RunView:
    """One run as the dashboard shows it; :meth:`build` returns the JSON document."""

    def __init__(
        self,
        files: RunFiles,
        nodes: Mapping[str, Any] | None,
        baseline: RunFiles | None,
        hashes: FileHashes,
        now: float,
    ) -> None:
        self.files = files
        self.nodes = nodes
        self.baseline = baseline
        self.hashes = hashes
        self.now = now
        self.completed_rounds = self.files.round_events()

    def build(self) -> dict[str, Any]:
        files = self.files
        status, detail = files.status(self.now)
        metrics = evaluation_metrics(files.rows)
        headline = headline_metric(files, metrics)
        start = files.start_event() or {}
        rounds = files.rounds()
        done = [r for r in self.completed_rounds if rounds is None or r <= rounds]
        built: dict[str, Any] = clean(  # clean() keeps the dict a dict
            {
                "id": files.run_id,
                "status": status,
                "status_detail": detail,
                "algorithm": files.config_value("algorithm"),
                "task": files.config_value("task"),
                "rounds": rounds,
                "completed_rounds": max(done, default=0),
                "started": start.get("time"),
                "updated": files.updated,
                "config": files.config,
                "config_sha256": start.get("config_sha256"),
                "code": start.get("code"),
                "selection": {
                    "metric": (files.summary or {}).get("selection_metric"),
                    "round": (files.summary or {}).get("selected_round"),
                    "note": (files.summary or {}).get("selection_note"),
                },
                "headline_metric": headline,
                "hospitals": self.hospitals(),
                "superlink": self.superlink(),
                "timeline": self.timeline(),
                "curves": self.curves(metrics),
                "events": self.events(),
                "equity": self.equity(headline),
                "models": self.models(),
            }
        )
        return built

    # ---------------------------------------------------------------- hospitals
    def outcome_in(self, event: Mapping[str, Any], name: str) -> str | None:
        if name in event.get("accepted", []):
            return "accepted"
        if name in (event.get("rejected") or {}):
            return "refused"
        if name in (event.get("failed") or {}):
            return "failed"
        if name in event.get("asked", []):
            return "asked"
        return None

    def hospitals(self) -> list[dict[str, Any]]:
        table: dict[str, dict[str, Any]] = {}
        for row in self.files.rows:
            name = row.get("hospital")
            if not isinstance(name, str) or row.get("kind") not in (
                "evaluate",
                "train",
                "error",
                "rejected",
            ):
                continue
            entry = table.setdefault(
                name,
                {
                    "name": name,
                    "node_id": None,
                    "last_seen": None,
                    "last_round": None,
                    "num_train": None,
                    "device": None,
                    "data_source": None,
                    "refusals": 0,
                    "failures": 0,
                    "last_problem": None,
                },
            )
            if isinstance(row.get("node_id"), int):
                entry["node_id"] = row["node_id"]
            kind = row["kind"]
            if kind in ("evaluate", "train", "rejected"):  # the hospital answered
                seen = number(row.get("time"))
                if seen is not None and (entry["last_seen"] is None or seen > entry["last_seen"]):
                    entry["last_seen"] = seen
                entry["last_round"] = max(entry["last_round"] or 0, int(row.get("round", 0)))
            if kind == "train":
                for key in ("num_train", "device", "data_source"):
                    if row.get(key) is not None:
                        entry[key] = row[key]
            elif kind in ("error", "rejected"):
                entry["refusals" if kind == "rejected" else "failures"] += 1
                entry["last_problem"] = {"round": row.get("round"), "reason": row.get("reason")}
        total = sum(e["num_train"] or 0 for e in table.values())
        last = max(self.completed_rounds, default=None)
        nodes = self.node_index()
        for name, entry in table.items():
            entry["share"] = (entry["num_train"] or 0) / total if total else None
            event = self.completed_rounds.get(last) if last is not None else None
            entry["last_outcome"] = self.outcome_in(event, name) if event else None
            entry["outcome_round"] = last
            node = nodes.get(entry["node_id"]) if entry["node_id"] is not None else None
            entry["superlink_status"] = node.get("status") if node else None
            entry["online_since"] = node.get("online-at") if node else None
        return sorted(table.values(), key=lambda e: e["name"])

    def node_index(self) -> dict[int, dict[str, Any]]:
        index = {}
        for node in (self.nodes or {}).get("nodes", []):
            try:
                index[int(node.get("node-id"))] = node
            except (TypeError, ValueError):
                continue
        return index

    def superlink(self) -> dict[str, Any]:
        """The SuperLink's node list, each node named by the hospital it was in this run."""
        if self.nodes is None:
            return {"configured": False, "nodes": [], "error": None, "checked": None}
        names = {}
        for row in self.files.rows:
            if isinstance(row.get("node_id"), int) and isinstance(row.get("hospital"), str):
                names[row["node_id"]] = row["hospital"]
        listed = []
        for node_id, node in sorted(self.node_index().items()):
            listed.append(
                {
                    "node_id": node_id,
                    "hospital": names.get(node_id),
                    "status": node.get("status"),
                    "online_at": node.get("online-at"),
                    "offline_at": node.get("offline-at"),
                }
            )
        return {
            "configured": True,
            "nodes": listed,
            "error": self.nodes.get("error"),
            "checked": self.nodes.get("checked"),
        }

    # ---------------------------------------------------------------- rounds
    def timeline(self) -> list[dict[str, Any]]:
        """One entry per round (and the final evaluation): when it started and ended (the
        audit log's events) and each hospital's own seconds (training, evaluation)."""
        files = self.files
        rounds = files.rounds() or 0
        per_round: dict[int, dict[str, dict[str, Any]]] = {}
        for row in files.rows:
            name, server_round = row.get("hospital"), row.get("round")
            if not isinstance(name, str) or not isinstance(server_round, int):
                continue
            cell = per_round.setdefault(server_round, {}).setdefault(
                name, {"train_seconds": None, "eval_seconds": None, "outcome": None}
            )
            kind = row.get("kind")
            if kind == "train" and number(row.get("seconds")) is not None:
                cell["train_seconds"] = (cell["train_seconds"] or 0.0) + row["seconds"]
            elif kind == "evaluate" and number(row.get("eval_seconds")) is not None:
                cell["eval_seconds"] = (cell["eval_seconds"] or 0.0) + row["eval_seconds"]
            if kind in ("evaluate", "train"):
                cell["outcome"] = cell["outcome"] or "answered"
            elif kind == "error":
                cell["outcome"] = "failed"
            elif kind == "rejected":
                cell["outcome"] = "refused"
        starts = {}
        previous = None
        for audited in files.audit:
            kind = audited.get("event")
            if kind in ("run_start", "run_resumed"):
                previous = number(audited.get("time"))
                if isinstance(audited.get("from_round"), int):
                    starts[audited["from_round"]] = previous
            elif kind in ("round", "final_evaluation") and isinstance(audited.get("round"), int):
                starts.setdefault(audited["round"], previous)
                previous = number(audited.get("time"))
                starts.setdefault(audited["round"] + 1, previous)
        status, _ = files.status(self.now)
        last_round = max([*per_round, *self.completed_rounds, 0])
        entries = []
        for server_round in range(1, max(rounds + 1, last_round) + 1):
            event = self.completed_rounds.get(server_round)
            cells = per_round.get(server_round, {})
            if event is not None:
                for name in event.get("asked", []):
                    cell = cells.setdefault(
                        name, {"train_seconds": None, "eval_seconds": None, "outcome": None}
                    )
                    cell["outcome"] = self.outcome_in(event, name)
            started = starts.get(server_round)
            ended = number(event.get("time")) if event else None
            if event is not None:
                state = "done"
            elif status == "running" and started is not None:
                state = "running"
            elif started is not None or cells:
                state = "unfinished"
            else:
                continue
            entries.append(
                {
                    "round": server_round,
                    "final": server_round > rounds,
                    "state": state,
                    "started": started,
                    "ended": ended,
                    "seconds": ended - started if ended is not None and started else None,
                    "hospitals": cells,
                }
            )
        return entries

    # ---------------------------------------------------------------- curves
    def curves(self, metrics: list[str]) -> dict[str, Any]:
        """Per metric and hospital, the score of the model of each round (``model_round``:
        0 is the initial model, R the final one)."""
        rows = [r for r in self.files.rows if r.get("kind") == "evaluate"]
        x = sorted({int(r["model_round"]) for r in rows if isinstance(r.get("model_round"), int)})
        position = {value: i for i, value in enumerate(x)}
        hospitals = sorted({str(r.get("hospital")) for r in rows})
        values: dict[str, dict[str, list[float | None]]] = {
            m: {h: [None] * len(x) for h in hospitals} for m in metrics
        }
        for row in rows:
            if not isinstance(row.get("model_round"), int):
                continue
            i = position[row["model_round"]]
            for metric in metrics:
                values[metric][str(row.get("hospital"))][i] = number(row.get(metric))
        return {"x": x, "hospitals": hospitals, "metrics": metrics, "values": values}

    # ---------------------------------------------------------------- audit
    def events(self) -> list[dict[str, Any]]:
        """Refusals, failures (dropouts), messages sent again, late duplicates, and how the
        run ended, from the audit log; the round in progress from its error rows."""
        found: list[dict[str, Any]] = []
        for event in self.files.audit:
            kind = event.get("event")
            if kind in ("round", "final_evaluation"):
                server_round, when = event.get("round"), event.get("time")
                for name, reason in (event.get("rejected") or {}).items():
                    found.append(
                        {"round": server_round, "time": when, "hospital": name,
                         "what": "refused", "reason": reason}
                    )  # fmt: skip
                for name, reason in (event.get("failed") or {}).items():
                    found.append(
                        {"round": server_round, "time": when, "hospital": name,
                         "what": "failed", "reason": reason}
                    )  # fmt: skip
                for name, count in (event.get("resent") or {}).items():
                    found.append(
                        {"round": server_round, "time": when, "hospital": name,
                         "what": "asked again", "reason": f"{count} message(s) sent again"}
                    )  # fmt: skip
                for name, count in (event.get("duplicates") or {}).items():
                    found.append(
                        {"round": server_round, "time": when, "hospital": name,
                         "what": "duplicate", "reason": f"{count} late duplicate(s) discarded"}
                    )  # fmt: skip
            elif kind == "run_end" and event.get("status") != "completed":
                found.append(
                    {"round": None, "time": event.get("time"), "hospital": None,
                     "what": f"run {event.get('status')}", "reason": event.get("reason")}
                )  # fmt: skip
        audited = max(self.completed_rounds, default=0)
        for row in self.files.rows:
            if row.get("kind") in ("error", "rejected") and int(row.get("round", 0)) > audited:
                found.append(
                    {"round": row.get("round"), "time": row.get("time"),
                     "hospital": row.get("hospital"),
                     "what": "refused" if row["kind"] == "rejected" else "failed",
                     "reason": row.get("reason")}
                )  # fmt: skip
        return sorted(found, key=lambda e: number(e.get("time")) or 0.0, reverse=True)

    # ---------------------------------------------------------------- equity
    def equity(self, metric: str | None) -> dict[str, Any]:
        """The worst hospital on the headline metric, and each hospital's gain over training
        alone when a local-only run of the same config and data is there."""
        if metric is None:
            return {"metric": None, "worst": None, "hospitals": [], "baseline": None}
        scores = final_scores(self.files, metric)
        shares = {e["name"]: e["share"] for e in self.hospitals()}
        valid = {h: v for h, v in scores.items() if v is not None}
        worst = None
        if valid:
            pick = max if lower_is_better(metric) else min
            name = pick(valid, key=lambda h: valid[h])
            worst = {"hospital": name, "value": valid[name]}
        baseline_scores: dict[str, float | None] = {}
        note = None
        if self.files.config_value("algorithm") == LOCAL_ONLY:
            note = "this run is the local-only baseline"
        elif self.baseline is None:
            note = (
                "no completed local-only run of the same config in this runs directory: run "
                "the same config with algorithm = local-only to see the gain over training alone"
            )
        else:
            baseline_scores = final_scores(self.baseline, metric)
            ours, theirs = fingerprints(self.files), fingerprints(self.baseline)
            differ = sorted(h for h in ours if h in theirs and ours[h] != theirs[h])
            for name in differ:
                baseline_scores.pop(name, None)
            if differ:
                note = f"left out, trained on other data in the baseline: {', '.join(differ)}"
        sign = -1.0 if lower_is_better(metric) else 1.0
        table: list[dict[str, Any]] = []
        for name in sorted(scores):
            share = shares.get(name)
            base = baseline_scores.get(name)
            value = scores[name]
            gain = sign * (value - base) if value is not None and base is not None else None
            table.append(
                {
                    "hospital": name,
                    "share": share,
                    "small": share is not None and share < SMALL_SHARE,
                    "value": value,
                    "local_only": base,
                    "gain": gain,
                }
            )
        small_gains = [e["gain"] for e in table if e["small"] and e["gain"] is not None]
        return {
            "metric": metric,
            "lower_is_better": lower_is_better(metric),
            "worst": worst,
            "hospitals": table,
            "small_share": SMALL_SHARE,
            "small_gain": sum(small_gains) / len(small_gains) if small_gains else None,
            "baseline": self.baseline.run_id if self.baseline else None,
            "note": note,
        }

    # ---------------------------------------------------------------- models
    def models(self) -> dict[str, Any]:
        """Global models named in the summary (with their recorded and actual SHA-256) and
        the hashes of models kept at the sites (weights never leave a site)."""
        summary = self.files.summary or {}
        listed = []
        for role, key in (("final", "model"), ("selected", "selected_model")):
            info = summary.get(key)
            if not isinstance(info, dict) or not isinstance(info.get("path"), str):
                continue
            name = Path(info["path"]).name
            path = self.files.directory / name
            actual = self.hashes.sha256(path) if path.is_file() else None
            listed.append(
                {
                    "role": role,
                    "name": name,
                    "sha256": info.get("sha256"),
                    "content_sha256": info.get("content_sha256"),
                    "size": path.stat().st_size if path.is_file() else None,
                    "present": path.is_file(),
                    "verified": actual is not None and actual == info.get("sha256"),
                }
            )
        sites = []
        for name, entry in sorted((summary.get("hospitals") or {}).items()):
            for key, digest in sorted(((entry or {}).get("site_models") or {}).items()):
                sites.append({"hospital": name, "model": key, "sha256": digest})
        return {"global": listed, "site": sites}


def model_files(summary: Mapping[str, Any] | None) -> set[str]:
    """The model files a summary names: the only files of a run the dashboard serves."""
    names = set()
    for key in ("model", "selected_model"):
        info = (summary or {}).get(key)
        if isinstance(info, dict) and isinstance(info.get("path"), str):
            name = Path(info["path"]).name
            if MODEL_NAME.match(name):
                names.add(name)
    return names


# ---------------------------------------------------------------------------- the runs root


class RunsRoot:
    """The directory of run directories (the coordinator's ``/runs``), read with a cache.

    A run id must name a directory directly under the root (no separators, no ``..``, no
    symbolic link leading out): nothing outside the root is ever read.
    """

    def __init__(self, root: Path, nodes: Callable[[], Mapping[str, Any] | None] = lambda: None):
        self.root = root.expanduser().resolve()
        self.nodes = nodes
        self.hashes = FileHashes()
        self._cache: dict[str, tuple[tuple[Any, ...], RunFiles]] = {}
        self._lock = threading.Lock()

    def directory(self, run_id: str) -> Path | None:
        """The run's directory when ``run_id`` is a safe name of one (it may not exist yet)."""
        if not RUN_ID.match(run_id) or ".." in run_id:
            return None
        candidate = self.root / run_id
        if candidate.exists() and candidate.resolve().parent != self.root:
            return None  # a link leading out of the root
        return candidate

    def run_ids(self) -> list[str]:
        """Run directories, newest change first."""
        found = []
        try:
            children = list(self.root.iterdir())
        except OSError:
            return []
        for child in children:
            if self.directory(child.name) is None or not child.is_dir():
                continue
            if any((child / name).is_file() for name in RUN_FILES):
                found.append(child.name)
        return sorted(found, key=lambda r: self.files(r).updated or 0.0, reverse=True)

    def signature(self, directory: Path) -> tuple[Any, ...]:
        stats: list[tuple[str, int | None, int | None]] = []
        for name in RUN_FILES:
            try:
                stat = (directory / name).stat()
                stats.append((name, stat.st_size, stat.st_mtime_ns))
            except OSError:
                stats.append((name, None, None))
        return tuple(stats)

    def files(self, run_id: str) -> RunFiles:
        directory = self.directory(run_id)
        if directory is None:
            raise KeyError(run_id)
        signature = self.signature(directory)
        with self._lock:
            cached = self._cache.get(run_id)
        if cached and cached[0] == signature:
            return cached[1]
        files = RunFiles.read(run_id, directory)
        with self._lock:
            self._cache[run_id] = (signature, files)
        return files

    def baseline_for(self, files: RunFiles) -> RunFiles | None:
        """The newest completed local-only run of the same config, if any."""
        if not files.config or files.config_value("algorithm") == LOCAL_ONLY:
            return None
        wanted = comparable_config(files.config)
        for run_id in self.run_ids():
            if run_id == files.run_id:
                continue
            other = self.files(run_id)
            if (
                other.config_value("algorithm") == LOCAL_ONLY
                and other.summary is not None
                and comparable_config(other.config) == wanted
            ):
                return other
        return None

    def view(self, run_id: str, now: float | None = None) -> dict[str, Any] | None:
        """The run's view, or ``None`` when no such directory exists (yet)."""
        directory = self.directory(run_id)
        if directory is None or not directory.is_dir():
            return None
        files = self.files(run_id)
        baseline = self.baseline_for(files)
        now = time.time() if now is None else now
        return RunView(files, self.nodes(), baseline, self.hashes, now).build()

    def listing(self, now: float | None = None) -> list[dict[str, Any]]:
        """One line per run for the runs page."""
        now = time.time() if now is None else now
        lines = []
        for run_id in self.run_ids():
            files = self.files(run_id)
            status, detail = files.status(now)
            metric = headline_metric(files, evaluation_metrics(files.rows))
            scores = (
                [v for v in final_scores(files, metric).values() if v is not None]
                if (metric)
                else []
            )
            done = [r for r in files.round_events() if r <= (files.rounds() or r)]
            lines.append(
                clean(
                    {
                        "id": run_id,
                        "status": status,
                        "status_detail": detail,
                        "algorithm": files.config_value("algorithm"),
                        "task": files.config_value("task"),
                        "rounds": files.rounds(),
                        "completed_rounds": max(done, default=0),
                        "hospitals": len(
                            {
                                r.get("hospital")
                                for r in files.rows
                                if isinstance(r.get("hospital"), str)
                            }
                        ),
                        "started": (files.start_event() or {}).get("time"),
                        "updated": files.updated,
                        "metric": metric,
                        "client_average": sum(scores) / len(scores) if scores else None,
                    }
                )
            )
        return lines
