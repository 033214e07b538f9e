"""The arithmetic of ``fedclinic bench load`` (the benchmark itself starts real federations and
is run by hand: see BENCHMARKS.md)."""

from __future__ import annotations

import pytest

from fedclinic.bench.load import load_markdown, lost, round_overheads


def test_round_overhead_is_wall_time_minus_the_slowest_hospitals_compute() -> None:
    audit = [{"event": "run_start", "time": 0.0}] + [
        {"event": "round", "round": r, "time": t} for r, t in ((1, 20.0), (2, 31.0), (3, 40.5))
    ]
    rows = [
        # round 2: a = 1 + 4 = 5 s, b = 2 + 6 = 8 s -> overhead 11 - 8 = 3
        {"kind": "evaluate", "round": 2, "hospital": "a", "eval_seconds": 1.0},
        {"kind": "train", "round": 2, "hospital": "a", "seconds": 4.0},
        {"kind": "evaluate", "round": 2, "hospital": "b", "eval_seconds": 2.0},
        {"kind": "train", "round": 2, "hospital": "b", "seconds": 6.0},
        # round 3: only a reported times: 9.5 - 2.5 = 7
        {"kind": "evaluate", "round": 3, "hospital": "a", "eval_seconds": 0.5},
        {"kind": "train", "round": 3, "hospital": "a", "seconds": 2.0},
        {"kind": "aggregation", "round": 3, "hospital": "a", "seconds": 99.0},
    ]
    assert round_overheads(audit, rows) == pytest.approx([3.0, 7.0])  # round 1: start-up


def test_lost_names_every_missing_or_failed_reply() -> None:
    rows = [
        {"kind": "train", "round": 1, "hospital": "a"},
        {"kind": "evaluate", "round": 1, "hospital": "a"},
        {"kind": "evaluate", "round": 1, "hospital": "b"},
        {"kind": "error", "round": 1, "hospital": "b", "reason": "NODE_UNAVAILABLE"},
    ]
    assert lost(rows, ["a", "b"], 1) == [
        "error row: b round 1: NODE_UNAVAILABLE",
        "no train row: b round 1",
    ]
    assert lost(rows[:2], ["a"], 1) == []


def test_markdown_table_shows_losses_and_per_round_overheads() -> None:
    results = [
        {"hospitals": 2, "completed": True, "problems": [], "round_overhead_seconds": [3.0, 5.0],
         "median_round_overhead_seconds": 4.0,
         "peak_rss_mib": {"site-worker": 870.6, "flwr-clientapp": 900.4, "flower-superlink": 170},
         "wall_seconds": 61.2},
        {"hospitals": 16, "completed": False, "problems": ["no train row: h round 2"],
         "round_overhead_seconds": [], "median_round_overhead_seconds": None,
         "peak_rss_mib": {}, "wall_seconds": 300.0},
    ]  # fmt: skip
    lines = load_markdown(results).splitlines()
    assert "site worker / ClientApp / ServerApp / SuperNode / SuperExec / SuperLink" in lines[0]
    assert lines[2] == "| 2 | yes | 4.0 (3.0, 5.0) | 871 / 900 / 0 / 0 / 0 / 170 | 61 |"
    assert lines[3].startswith("| 16 | NO: no train row: h round 2 | - () |")
