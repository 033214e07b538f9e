"""Shared test harness: in-process runs of the real round engine and ClientApp handler, an
in-process grid with scripted faults (lost, held, duplicated replies; failing pulls; node
restarts; a coordinator crash), a clock that only pretends to wait, and synthetic hospitals.

Fixtures built on these live in ``conftest.py``; tests import the classes from here.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Message
from PIL import Image

from fedclinic import messages as keys
from fedclinic.bench.grid import InProcessGrid, run_in_process
from fedclinic.engine import Clock
from fedclinic.local.supervisor import ANSI_ESCAPE

#: (server round, exchange, node, attempt) of a message: which one a fault applies to
Key = tuple[int, str, int, int]


class FakeClock(Clock):
    """Time that passes only when the engine sleeps: deadlines without waiting."""

    def __init__(self) -> None:
        self.time = 0.0
        self.slept = 0.0

    def now(self) -> float:
        return self.time

    def sleep(self, seconds: float) -> None:
        self.time += seconds
        self.slept += seconds


class CoordinatorCrash(BaseException):
    """Stands for SIGKILL: nothing after it runs in the coordinator."""


class ScriptedGrid(InProcessGrid):
    """The in-process grid with faults, each keyed by (round, exchange, node, attempt) of a
    message (:data:`Key`).

    - ``lose``: these messages vanish at the SuperNode (never answered), as when the answer
      to a pull is lost after Flower marked the message delivered;
    - ``hold``: these replies are held back until the same node's next message of the
      exchange was answered, then both are handed out in one pull (a slow reply overtaken);
    - ``leave``: nodes that leave the grid once their message is pushed;
    - ``fail_pulls``: how many pulls fail first (a SuperLink under load);
    - ``renumber`` = (after how many pushes, old node, new node): a SuperNode restart;
    - ``crash_at``: the push after whose answers the coordinator dies (CoordinatorCrash);
    - ``edit``: a function applied to every reply (tamper, add info).
    """

    def __init__(
        self,
        nodes: dict[int, dict[str, Any]],
        run_config: dict[str, Any],
        *,
        lose: Iterable[Key] = (),
        hold: Iterable[Key] = (),
        leave: Iterable[int] = (),
        fail_pulls: int = 0,
        renumber: tuple[int, int, int] | None = None,
        crash_at: int | None = None,
        edit: Callable[[Message], None] | None = None,
    ) -> None:
        super().__init__(nodes, run_config)
        self.lose, self.hold, self.leave = set(lose), set(hold), set(leave)
        self.fail_pulls = fail_pulls
        self.renumber = renumber
        self.crash_at = crash_at
        self.edit = edit
        self.pushes = 0
        self.pulls = 0
        self.held: list[tuple[str, Message, Key]] = []
        #: every reply a hospital produced, by (round, exchange, node, attempt)
        self.answers: dict[Key, Message] = {}

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        messages = list(messages)
        ids = super().push_messages(messages)
        self.pushes += 1
        for message in messages:
            if message.metadata.dst_node_id in self.leave:
                self.nodes.pop(message.metadata.dst_node_id, None)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        self.pulls += 1
        if self.fail_pulls > 0:
            self.fail_pulls -= 1
            raise RuntimeError("Server error '500 Internal Server Error'\ndatabase is locked")
        self.work()
        if self.crash_at is not None and self.pushes == self.crash_at:
            raise CoordinatorCrash
        if self.renumber and self.pushes == self.renumber[0]:
            _, old, new = self.renumber
            self.nodes[new] = self.nodes.pop(old)
            self.renumber = None
        return super().pull_messages(message_ids)

    def work(self) -> None:
        while self.queued:
            message_id = next(iter(self.queued))
            message = self.queued.pop(message_id)
            key = key_of(message)
            if key in self.lose:
                continue
            reply = self.deliver(message)
            if reply is None:
                continue
            if self.edit is not None:
                self.edit(reply)
            self.answers[key] = reply
            if key in self.hold:
                self.held.append((message_id, reply, key))
                continue
            self.replies[message_id] = reply
            overtaken = [h for h in self.held if h[2][:3] == key[:3]]
            for entry in overtaken:  # both are handed out now, the older first
                self.held.remove(entry)
                self.replies = {entry[0]: entry[1], **self.replies}


def key_of(message: Message) -> Key:
    records = message.content.config_records
    config: dict[str, Any] = dict(records[keys.CONFIG]) if keys.CONFIG in records else {}
    return (
        int(config.get(keys.SERVER_ROUND, 0)),
        str(config.get(keys.EXCHANGE, "query")),
        message.metadata.dst_node_id,
        int(config.get(keys.ATTEMPT, 1)),
    )


def synthetic_nodes(tmp_path: Path, count: int) -> dict[int, dict[str, Any]]:
    """Synthetic hospitals with different label priors and acquisition shifts, nodes 100.."""
    priors = ["0.8,0.2", "0.5,0.5", "0.2,0.8", "0.7,0.3"]
    return {
        100 + i: {
            "hospital": f"hospital-{'abcd'[i]}",
            "data-source": "synthetic",
            "num-samples": 40,
            "class-priors": priors[i],
            "acquisition-shift": 0.3 * i,
            "data-seed": i,
            "device": "cpu",
            "state-dir": str(tmp_path / "state" / f"hospital-{'abcd'[i]}"),
        }
        for i in range(count)
    }


#: one in-process run of a flat run config against a grid: (engine, result)
run = run_in_process


def rows_of(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def comparable_rows(out: Path) -> list[dict[str, Any]]:
    """A run's rows without what differs between equal runs (times, durations, hashes)."""
    drop = ("seconds", "time", "sha256")
    return [{k: v for k, v in row.items() if not any(d in k for d in drop)} for row in rows_of(out)]


def text(path: Path) -> str:
    """A real process's log without colour codes ('' before it exists)."""
    return ANSI_ESCAPE.sub("", path.read_text(errors="replace")) if path.exists() else ""


def wait_for(what: str, check: Callable[[], Any], seconds: float, logs: list[Path]) -> None:
    """Until ``check()`` holds; else fail with the tails of ``logs`` (real-process tests)."""
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {p}:\n{text(p)[-3000:]}" for p in logs)
            pytest.fail(f"{what}: not within {seconds:.0f} s\n{tails}")
        time.sleep(0.2)


def check_pfednet_run(
    rows: list[dict[str, Any]], summary: dict[str, Any], names: list[str]
) -> None:
    """What every 2-round pFedNet run shows: personal models evaluated at rounds 0..2, the
    ADMM rows with eta = N (PF-2, docs/pfednet.md#decisions), per-hospital traffic rows, a
    completed summary."""
    evaluated = [r for r in rows if r["kind"] == "evaluate"]
    assert {(r["hospital"], r["model_round"]) for r in evaluated} == {
        (name, model_round) for name in names for model_round in (0, 1, 2)
    }
    assert {r["model"] for r in evaluated} == {"personal"}
    assert not [r for r in rows if r["kind"] == "error"]
    admm = [r for r in rows if r["kind"] == "pfednet-admm"]
    assert [r["round"] for r in admm] == [1, 2]
    assert all(r["eta"] == float(len(names)) for r in admm)  # PF-2 default eta = N
    traffic = [r for r in rows if r["kind"] == "communication" and 1 <= r["round"] <= 2]
    assert sorted((r["round"], r["hospital"]) for r in traffic) == sorted(
        (server_round, name) for server_round in (1, 2) for name in names
    )
    assert all(r["upload_bytes"] > 0 and r["fedavg_upload_bytes"] > 0 for r in traffic)
    assert summary["status"] == "completed" and summary["algorithm"] == "pfednet"
    assert set(summary["hospitals"]) == set(names)
    assert set(summary["pfednet"]["communication"]) == set(names)


def write_image_folder(images: Path, per_class: int = 12) -> None:
    """An image-folder export: ``benign/`` and ``malignant/`` of random 28x28 grey PNGs."""
    rng = np.random.default_rng(0)
    for label in ("benign", "malignant"):
        (images / label).mkdir(parents=True)
        for index in range(per_class):
            pixels = (rng.random((28, 28)) * 255).astype(np.uint8)
            Image.fromarray(pixels).save(images / label / f"{index:03d}.png")
