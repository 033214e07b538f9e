"""``python -m fedclinic.supernode``: Flower's SuperNode with its waits shortened while a run
exchanges messages (fedclinic/supernode.py). The waits are checked against a fake clock; the
patch against Flower 1.39's real loop module; a real node through the launcher runs in every
real-process test (``make e2e``; its log line is checked in tests/test_e2e_local.py)."""

from __future__ import annotations

import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
from flwr.supernode import start_client_internal

from fedclinic import flower, supernode
from fedclinic.bench.load import process_kind
from fedclinic.flower import LauncherError
from fedclinic.local.supernode import supernode_command
from fedclinic.supernode import (
    LOCAL_WAIT,
    PACING_ENVIRONMENT,
    PULL_RAMP,
    Pacing,
    check_flower_version,
    pace,
    pacing_choice,
)

ROOT = Path(__file__).resolve().parents[1]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_the_empty_pulls_after_a_reply_ramp_back_to_flowers_wait() -> None:
    clock = Clock()
    pacing = Pacing(clock, clock.sleep)
    pacing.sleep(3)  # a node that never replied (waiting for a run): Flower's 3 s
    pacing.sleep(3)
    pacing.replied()
    for _ in range(6):
        pacing.sleep(3)
    pacing.replied()  # the next exchange: the ramp starts over
    pacing.sleep(3)
    assert clock.slept == [3, 3, *PULL_RAMP, 3, 3, PULL_RAMP[0]]
    assert PULL_RAMP == (0.25, 0.5, 1.0, 2.0)


def test_the_local_waits_are_short_and_other_sleeps_untouched() -> None:
    clock = Clock()
    pacing = Pacing(clock, clock.sleep)
    pacing.sleep(0.5)  # the reply, or its objects, in the node's own state
    pacing.sleep(7)
    assert clock.slept == [LOCAL_WAIT, 7]
    assert pacing.monotonic is time.monotonic  # every other name is the time module's


def test_pace_installs_on_flowers_loop_and_notes_each_reply(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[str] = []
    monkeypatch.setattr(start_client_internal, "_push_messages", lambda **kw: calls.append("push"))
    monkeypatch.setattr(start_client_internal, "time", start_client_internal.time)
    clock = Clock()
    pacing = Pacing(clock, clock.sleep)
    pace(start_client_internal, pacing)
    assert start_client_internal.time is pacing
    assert pacing.last_reply is None
    start_client_internal._push_messages(state=None)  # what the loop calls after a message
    assert calls == ["push"] and pacing.last_reply == clock.now


def test_pace_refuses_a_loop_whose_waits_are_not_flower_139s(tmp_path: Path) -> None:
    other = types.ModuleType("other_loop")
    source = tmp_path / "other_loop.py"
    source.write_text("import time\n\ndef _push_messages():\n    time.sleep(1)\n")
    other.__file__ = str(source)
    exec(compile(source.read_text(), str(source), "exec"), other.__dict__)
    with pytest.raises(LauncherError, match="not the Flower this launcher was written against"):
        pace(other, Pacing())


def test_another_flower_or_an_unknown_pacing_is_refused_without_starting(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    check_flower_version()  # this one
    with pytest.raises(LauncherError, match=r"flwr==1\.40\.0.*FEDCLINIC_SUPERNODE_PACING=flower"):
        check_flower_version("1.40.0")
    monkeypatch.setattr(flower.metadata, "version", lambda name: "1.42.0")
    assert supernode.main() == flower.EXIT_REFUSED
    assert "written against flwr==1.39.0, found flwr==1.42.0" in capsys.readouterr().err
    assert pacing_choice({}) == "fedclinic"
    assert pacing_choice({PACING_ENVIRONMENT: "flower"}) == "flower"
    assert supernode.prepare({PACING_ENVIRONMENT: "flower"}) == "flower"  # no version check
    with pytest.raises(LauncherError, match="expected fedclinic or flower"):
        pacing_choice({PACING_ENVIRONMENT: "fast"})


@pytest.mark.parametrize(
    ("launcher", "program", "flags"),
    [
        ("fedclinic.supernode", "flower-supernode", ("--isolation", "--node-config")),
        ("fedclinic.superlink", "flower-superlink", ("--enable-supernode-auth", "--database")),
    ],
)
def test_each_launcher_hands_every_flag_to_flowers_own(
    launcher: str, program: str, flags: tuple[str, ...]
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", launcher, "--help"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: {program}")
    assert all(flag in done.stdout for flag in flags)


def test_every_hospital_node_starts_through_the_launcher(tmp_path: Path) -> None:
    command = supernode_command("127.0.0.1:9092", tmp_path / "h.toml", 9094,
                                root_certificates=None, private_key=None)  # fmt: skip
    assert command[:3] == [sys.executable, "-m", "fedclinic.supernode"]
    assert process_kind(" ".join(command)) == "flower-supernode"  # the benchmarks' view
