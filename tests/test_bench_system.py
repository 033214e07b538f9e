"""Arithmetic of ``fedclinic bench system``: overheads, wire bytes, payload, CSV rows.

No federation is started here: ``test_e2e_bench_system.py`` runs the quick mode on real
processes.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rich.console import Console

from fedclinic.bench import dataload, system
from fedclinic.bench.load import LOAD_RUN
from fedclinic.bench.system import (
    MODES,
    PLAIN_APP_DIR,
    SCALE_APPS,
    add_system_parser,
    fedclinic_round_ends,
    flat_row,
    mean_wire,
    parse_ss,
    parse_transfer,
    payload_per_round,
    plain_config,
    plain_ratios,
    plain_round_ends,
    plain_round_overheads,
    scale_plan,
    scale_table,
    sketch_upload,
    system_section,
    value_at,
    wire_per_round,
    write_csv,
)
from fedclinic.local.configs import app_defaults, find_app_dir, synthetic_hospitals

SS_OUTPUT = """\
0      0               127.0.0.1:9092          127.0.0.1:53850
\t bbr wscale:10,10 rto:204 bytes_sent:613 bytes_acked:614 bytes_received:130 segs_out:5
0      0               127.0.0.1:9092          127.0.0.1:53900
\t cubic rto:204 bytes_sent:1000 bytes_received:2000 segs_out:3
"""


def plain_record() -> dict:
    return {
        "round_0_end": 100.0,
        "rounds": [
            {"round": 1, "end": 110.0, "train_seconds": {"0": 3.0}, "eval_seconds": {"0": 1.0}},
            {
                "round": 2,
                "end": 118.0,
                "train_seconds": {"0": 2.0, "1": 4.0},
                "eval_seconds": {"0": 1.5, "1": 0.5},
            },
            {"round": 3, "end": 125.0, "train_seconds": {"0": 1.0}, "eval_seconds": {"0": 1.0}},
        ],
    }


def test_plain_overhead_is_wall_minus_both_phase_maxima_from_round_two() -> None:
    # round 2: 8 s wall - (max train 4 + max eval 1.5) = 2.5; round 3: 7 - 2 = 5
    assert plain_round_overheads(plain_record()) == pytest.approx([2.5, 5.0])
    # round 1 counts when asked: 10 - 4 = 6
    assert plain_round_overheads(plain_record(), first=1)[0] == pytest.approx(6.0)


def test_plain_overhead_skips_rounds_without_replies() -> None:
    record = plain_record()
    record["rounds"][1]["eval_seconds"] = {}
    assert plain_round_overheads(record) == pytest.approx([5.0])


def test_round_ends_of_both_apps() -> None:
    assert plain_round_ends(plain_record()) == {0: 100.0, 1: 110.0, 2: 118.0, 3: 125.0}
    audit = [
        {"event": "run_start", "time": 1.0},
        {"event": "round", "round": 1, "time": 5.0},
        {"event": "round", "round": 2, "time": 9.5},
        {"event": "final_evaluation", "round": 3, "time": 12.0},
    ]
    assert fedclinic_round_ends(audit) == {1: 5.0, 2: 9.5}


def test_parse_ss_reads_counters_per_socket() -> None:
    sockets = parse_ss(SS_OUTPUT)
    assert sockets == {
        "127.0.0.1:9092 127.0.0.1:53850": (613, 130),
        "127.0.0.1:9092 127.0.0.1:53900": (1000, 2000),
    }
    assert parse_ss("") == {}


def test_value_at_interpolates_and_clamps() -> None:
    series = [(10.0, 0, 0), (20.0, 1000, 100)]
    assert value_at(series, 15.0) == pytest.approx((500.0, 50.0))
    assert value_at(series, 5.0) == (0.0, 0.0)
    assert value_at(series, 30.0) == (1000.0, 100.0)
    assert value_at([], 1.0) == (0.0, 0.0)


def test_wire_per_round_differences_between_round_ends() -> None:
    series = [(0.0, 0, 0), (10.0, 1000, 500), (20.0, 3000, 1500)]
    rows = wire_per_round(series, {1: 5.0, 2: 10.0, 3: 20.0})
    assert rows == [
        {"round": 2, "down_bytes": 500.0, "up_bytes": 250.0},
        {"round": 3, "down_bytes": 2000.0, "up_bytes": 1000.0},
    ]
    assert mean_wire(rows) == {"down_bytes": 1250.0, "up_bytes": 625.0}
    assert mean_wire([]) is None


def test_payload_per_round_sums_hospitals_and_skips_final_evaluation() -> None:
    rows = [
        {"kind": "communication", "round": 1, "upload_bytes": 10, "download_bytes": 100},
        {"kind": "communication", "round": 1, "upload_bytes": 20, "download_bytes": 100},
        {"kind": "communication", "round": 2, "upload_bytes": 30, "download_bytes": 200},
        {"kind": "communication", "round": 3, "upload_bytes": 0, "download_bytes": 999},
        {"kind": "train", "round": 1, "hospital": "a"},
    ]
    assert payload_per_round(rows, rounds=2) == {"up_bytes": 30.0, "down_bytes": 200.0}
    assert payload_per_round([{"kind": "train", "round": 1}], rounds=2) is None


def test_the_sketch_is_its_own_column_not_in_the_per_round_payload() -> None:
    rows = [
        {"kind": "communication", "round": 0, "upload_bytes": 7, "sketch_upload_bytes": 7},
        {"kind": "communication", "round": 0, "upload_bytes": 9, "sketch_upload_bytes": 9},
        {"kind": "communication", "round": 1, "upload_bytes": 10, "download_bytes": 100},
    ]
    assert sketch_upload(rows) == 16
    assert payload_per_round(rows, rounds=1) == {"up_bytes": 10.0, "down_bytes": 100.0}
    assert sketch_upload(rows[2:]) is None  # FedAvg, the plain app: no sketch


def test_plain_app_config_uses_the_same_run_settings() -> None:
    config = plain_config("cnn", 4, 3, Path("/tmp/out"))
    assert config["local-steps"] == 1 and config["batch-size"] == 16
    assert config["min-hospitals"] == 4 and config["rounds"] == 3
    assert (PLAIN_APP_DIR / "pyproject.toml").is_file()


def test_csv_row_and_file(tmp_path: Path) -> None:
    entry = {
        "app": "plain-flower",
        "model": "cnn",
        "hospitals": 2,
        "rounds": 3,
        "completed": True,
        "median_round_overhead_seconds": 1.5,
        "payload_bytes_per_round": {"down_bytes": 4, "up_bytes": 2},
        "wire_bytes_per_round": None,
        "peak_rss_mib": {"flwr-clientapp": 300.0},
    }
    row = flat_row("scale", entry)
    assert row["payload_down_bytes"] == 4 and row["wire_down_bytes"] is None
    assert row["peak_rss_clientapp_mib"] == 300.0 and row["compression"] == "none"
    write_csv(tmp_path / "s.csv", {"scale": [entry], "transfer": []})
    assert len((tmp_path / "s.csv").read_text().splitlines()) == 2


def test_parser_and_modes() -> None:
    parser = argparse.ArgumentParser()
    add_system_parser(parser.add_subparsers())
    args = parser.parse_args(["system", "--out", "x", "--mode", "full"])
    assert args.mode == "full" and args.out == Path("x")
    assert MODES["full"].sizes == (2, 4, 8) and MODES["full"].rounds >= 3
    assert args.transfer is None
    # the 100+ MB point runs through fedclinic too, beside the plain app
    for case in (("resnet101", "plain", "none"), ("resnet101", "fedavg", "none"),
                 ("resnet101", "pfednet", "none"), ("resnet101", "pfednet", "stc")):  # fmt: skip
        assert case in MODES["full"].transfer
    args = parser.parse_args(["system", "--out", "x", "--transfer", "resnet101-pfednet-stc"])
    assert args.transfer == (("resnet101", "pfednet", "stc"),)
    assert args.no_data_load is False
    assert parser.parse_args(["system", "--out", "x", "--no-data-load"]).no_data_load
    # quick mode's data-load part stays small (CI runs it): a few hundred files
    assert sum(dataload.COUNTS["quick"]) <= 500 and sum(dataload.COUNTS["full"]) >= 3000


def test_transfer_cases_by_name() -> None:
    assert parse_transfer("resnet101-fedavg-none, cnn-pfednet-fused-stc") == (
        ("resnet101", "fedavg", "none"),
        ("cnn", "pfednet", "fused-stc"),
    )
    assert parse_transfer("") == ()
    for bad in ("resnet101-fedavg", "resnet999-fedavg-none", "logreg-fedavg-none",
                "unet-large-fedavg-none", "cnn-fedprox-none", "resnet18-plain-stc"):  # fmt: skip
        with pytest.raises(argparse.ArgumentTypeError, match="is not allowed"):
            parse_transfer(bad)


def test_section_lists_every_federation_and_says_when_transfer_was_skipped() -> None:
    results = {
        "mode": "full", "rounds": 3, "cpu_count": 2, "wall_seconds": 120.0,
        "settings": {"model": "cnn", "local-steps": 1, "batch-size": 16},
        "scale": [
            {"hospitals": 2, "app": "fedclinic-fedavg", "completed": True,
             "median_round_overhead_seconds": 4.0, "round_overhead_seconds": [3.0, 5.0],
             "peak_rss_mib": {"flwr-clientapp": 990.4, "site-worker": 1021.6}},
            {"hospitals": 2, "app": "plain-flower", "completed": False,
             "median_round_overhead_seconds": None, "round_overhead_seconds": [],
             "peak_rss_mib": {}, "load_average_1min": [1.0, 2.0]},
        ],
        "transfer": [],
    }  # fmt: skip
    text = system_section(results, "fedclinic bench system --mode full --no-transfer")
    assert "`fedclinic bench system --mode full --no-transfer --out DIR` (2 min here)" in text
    # no plain median at 2 hospitals: no ratio either
    # peaks: ClientApp / SuperNode / SuperLink / ServerApp / SuperExec / site worker
    assert (
        "| 2 | fedclinic-fedavg | yes | 4.0 | - | 3.0, 5.0 | 990 / 0 / 0 / 0 / 0 / 1022 | - |"
        in text
    )
    assert "| 2 | plain-flower | NO | - | - |  | 0 / 0 / 0 / 0 / 0 / 0 | 1.0 → 2.0 |" in text
    assert "(not run: `--no-transfer`)" in text
    assert "smoke test" not in text and "no 100+ MB model" not in text
    quick = system_section({**results, "mode": "quick"}, "fedclinic bench system --mode quick")
    assert quick.startswith("**Quick mode: a smoke test, not a benchmark")
    assert "**Data load** (not run: `--no-data-load`)." in text
    seconds = {k: 1.0 for k in dataload.CASES}
    seconds |= {"warm": 0.25, "round_no_worker": 0.25, "round_worker": 0.0125}
    loaded = {
        "image_size": 64, "origin": "synthetic", "source_pixels": 256, "megabytes": 1.5,
        "entries": [{"source": "image-folder", "files": 300, "seconds": seconds,
                     "cpu_seconds": {**seconds, "cold": 2.0}, "cache_megabytes": 4.9,
                     "speedup_warm": 4.0, "speedup_warm_cpu": 8.0}],
    }  # fmt: skip
    text = system_section({**results, "data_load": loaded}, "fedclinic bench system")
    assert (
        "| image-folder | 300 | 1.00 / 2.00 | 1.00 / 1.00 | 0.250 / 0.250 | 1.000 / 1.000 "
        "| 4x, 8x | 0.0125 / 0.0125 | 1.000 / 1.000 | 0.250 / 0.250 | 4.9 |"
    ) in text


def test_data_load_part_measures_every_case_on_generated_folders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dataload, "COUNTS", {"quick": (6, 4)})
    monkeypatch.setattr(dataload, "WARM_REPEATS", 1)
    results = dataload.run_data_load("quick", tmp_path / "data-load")
    assert [(e["source"], e["files"]) for e in results["entries"]] == [
        ("image-folder", 6),
        ("segmentation-folder", 8),  # 4 images + 4 masks
    ]
    for entry in results["entries"]:
        assert set(entry["seconds"]) == set(dataload.CASES) == set(entry["cpu_seconds"])
        assert all(v > 0 for v in entry["seconds"].values()), entry
        assert entry["seconds"]["round_no_worker"] == entry["seconds"]["warm"]
    # the generated files are gone; the two state dirs (the caches) stay for inspection
    assert sorted(p.name for p in (tmp_path / "data-load").iterdir()) == [
        "state-images",
        "state-seg",
    ]
    images = next((tmp_path / "data-load" / "state-images").rglob("rows-*.npy"))
    assert np.load(images).shape == (6, 1, dataload.IMAGE_SIZE, dataload.IMAGE_SIZE)


# ---------------------------------------------- the scale part: with and without the worker

WORKER, NO_WORKER, PLAIN = "fedclinic-fedavg", "fedclinic-fedavg-no-worker", "plain-flower"
#: median round overheads (s) of the faked scale runs, by hospital count and app
OVERHEADS = {
    2: {WORKER: 3.0, NO_WORKER: 9.0, PLAIN: 12.0},
    4: {WORKER: 5.0, NO_WORKER: 16.0, PLAIN: 20.0},
    8: {WORKER: 12.0, NO_WORKER: 36.0, PLAIN: 40.0},
}
#: by hand: fedclinic's median over plain Flower's at the same count, with / without the worker
RATIOS = {2: ("0.25", "0.75"), 4: ("0.25", "0.80"), 8: ("0.30", "0.90")}


def scale_entry(app: str, count: int, overhead: float | None) -> dict[str, Any]:
    return {
        "app": app, "hospitals": count, "model": "cnn", "rounds": 3, "completed": True,
        "problems": [], "round_overhead_seconds": [] if overhead is None else [overhead] * 2,
        "median_round_overhead_seconds": overhead,
        "peak_rss_mib": {"flwr-clientapp": 100.0}, "load_average_1min": [1.0, 1.5],
        "wire_bytes_per_round": {"down_bytes": 1e5, "up_bytes": 5e4},
        "site_worker": SCALE_APPS[app],
    }  # fmt: skip


def test_full_mode_runs_fedclinic_with_and_without_the_worker_quick_mode_does_not() -> None:
    assert set(SCALE_APPS) == {WORKER, NO_WORKER, PLAIN}
    assert SCALE_APPS[WORKER] is True and SCALE_APPS[NO_WORKER] is False
    assert scale_plan(MODES["full"]) == [
        (count, app) for count in (2, 4, 8) for app in (WORKER, NO_WORKER, PLAIN)
    ]
    # CI runs the quick mode: exactly its two federations, the e2e test's list
    assert scale_plan(MODES["quick"]) == [(2, WORKER), (2, PLAIN)]
    assert scale_plan(MODES["full"], (16,)) == [(16, WORKER), (16, NO_WORKER), (16, PLAIN)]
    assert scale_plan(MODES["full"], ()) == []  # --sizes ''


def test_scale_apps_share_run_config_and_hospitals_and_differ_only_in_the_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[dict[str, Any]] = []

    def fake_federation(
        app_dir: Path,
        config: dict,
        hospitals: list,
        out: Path,
        plain: bool,
        site_workers: bool = True,
    ) -> dict[str, Any]:
        calls.append({"app_dir": app_dir, "config": config, "hospitals": hospitals,
                      "out": out, "plain": plain, "site_workers": site_workers})  # fmt: skip
        return {"completed": True, "problems": [], "peak_rss_mib": {}, "wire_series": [],
                "wall_seconds": 1.0, "load_average_1min": [0.0, 0.0]}  # fmt: skip

    monkeypatch.setattr(system, "run_federation", fake_federation)
    entries = {app: system.run_scale(app, 4, 3, tmp_path) for app in (WORKER, NO_WORKER, PLAIN)}
    worker, no_worker, plain = calls
    assert (worker["site_workers"], no_worker["site_workers"]) == (True, False)
    assert not worker["plain"] and not no_worker["plain"] and plain["plain"]
    assert [e["app"] for e in entries.values()] == [WORKER, NO_WORKER, PLAIN]
    assert entries[WORKER]["site_worker"] is True and entries[NO_WORKER]["site_worker"] is False
    assert no_worker["out"] == tmp_path / f"{NO_WORKER}-4" != worker["out"]
    # the same run config (bench load's), apart from where the results go
    same = {k: v for k, v in worker["config"].items() if k != "output-dir"}
    assert same == {k: v for k, v in no_worker["config"].items() if k != "output-dir"}
    assert {k: same[k] for k in LOAD_RUN} == LOAD_RUN
    # exactly bench load's (run_size's), which the scale part ran before the no-worker rows
    load = {**app_defaults(find_app_dir()), **LOAD_RUN, "rounds": 3, "min-hospitals": 4}
    del load["output-dir"]
    assert same == load
    assert same["rounds"] == 3 and same["min-hospitals"] == 4
    for key in system.PLAIN_KEYS:  # the plain app: the same settings
        if key != "output-dir":
            assert plain["config"][key] == same[key], key
    # the same hospitals, each in its own state dir
    flats = [[{k: v for k, v in h.flat.items() if k != "state-dir"} for h in c["hospitals"]]
             for c in calls]  # fmt: skip
    assert flats[0] == flats[1] == flats[2] and len(flats[0]) == 4
    assert len({c["hospitals"][0].flat["state-dir"] for c in calls}) == 3


def test_the_no_worker_flag_reaches_the_federation_options(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    options: list[Any] = []

    class Stop(Exception):
        pass

    def fake_federation(opts: Any, console: Any) -> None:
        options.append(opts)
        raise Stop

    monkeypatch.setattr(system, "LocalFederation", fake_federation)
    hospitals = synthetic_hospitals(2, tmp_path / "state")
    for plain, workers in ((False, True), (False, False), (True, True)):
        with pytest.raises(Stop):
            system.run_federation(tmp_path, {}, hospitals, tmp_path, plain, site_workers=workers)
    assert [o.site_workers for o in options] == [True, False, False]  # plain: never a worker


def test_the_command_runs_the_plan_and_renders_ratios_with_and_without_the_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ran: list[tuple[int, str]] = []

    def fake_scale(app: str, count: int, rounds: int, out: Path) -> dict[str, Any]:
        ran.append((count, app))
        return scale_entry(app, count, OVERHEADS[count][app])

    monkeypatch.setattr(system, "run_scale", fake_scale)
    args = argparse.Namespace(mode="full", out=tmp_path / "full", sizes=None, transfer=None,
                              no_transfer=True, no_data_load=True)  # fmt: skip
    assert system.system_command(args) == 0
    assert ran == scale_plan(MODES["full"])
    results = json.loads((tmp_path / "full" / "system.json").read_text())
    assert [(e["hospitals"], e["app"]) for e in results["scale"]] == ran
    section = (tmp_path / "full" / "system.md").read_text()
    for count, (worker, no_worker) in RATIOS.items():
        o = OVERHEADS[count]
        assert f"| {count} | {WORKER} | yes | {o[WORKER]:.1f} | {worker} |" in section
        assert f"| {count} | {NO_WORKER} | yes | {o[NO_WORKER]:.1f} | {no_worker} |" in section
        assert f"| {count} | {PLAIN} | yes | {o[PLAIN]:.1f} | - |" in section
    assert "at most 0.25 with the worker" in section
    with (tmp_path / "full" / "system.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["site_worker"] for r in rows[:3]] == ["True", "False", ""]

    ran.clear()
    args.mode, args.out = "quick", tmp_path / "quick"
    assert system.system_command(args) == 0
    assert ran == [(2, WORKER), (2, PLAIN)]


def test_terminal_table_shows_the_no_worker_rows_and_ratios() -> None:
    entries = [scale_entry(app, n, OVERHEADS[n][app]) for n in OVERHEADS for app in OVERHEADS[n]]
    assert plain_ratios(entries) == pytest.approx(
        [0.25, 0.75, None, 0.25, 0.8, None, 0.3, 0.9, None]
    )
    console = Console(file=io.StringIO(), width=250)
    console.print(scale_table(entries))
    text = console.file.getvalue()  # type: ignore[attr-defined]
    cells = {(r[1], r[2]): r for r in ([c.strip() for c in x.split("│")] for x in text.splitlines())
             if len(r) > 5}  # fmt: skip
    for count, (worker, no_worker) in RATIOS.items():  # the column after the median
        assert cells[(str(count), WORKER)][4:6] == [f"{OVERHEADS[count][WORKER]:.1f}", worker]
        assert cells[(str(count), NO_WORKER)][5] == no_worker
        assert cells[(str(count), PLAIN)][5] == "-"


def test_a_ratio_needs_both_medians_and_a_positive_plain_one() -> None:
    entries = [
        scale_entry(WORKER, 2, 3.0),
        scale_entry(NO_WORKER, 2, None),  # its run failed
        scale_entry(PLAIN, 2, 6.0),
        scale_entry(WORKER, 4, 3.0),  # no plain row at 4
        scale_entry(WORKER, 8, 3.0),
        scale_entry(PLAIN, 8, 0.0),
    ]
    assert plain_ratios(entries) == [0.5, None, None, None, None, None]


#: a system.json as written before the no-worker rows (and the worker, data-load part, wire
#: dtypes, sketch and site_worker fields): what docs/bench/system.json keeps
OLD_SYSTEM = {
    "mode": "full", "rounds": 3, "cpu_count": 2, "wall_seconds": 3903.1,
    "settings": {"model": "cnn", "local-steps": 1, "batch-size": 16},
    "scale": [
        {"hospitals": 2, "rounds": 3, "completed": True, "problems": [],
         "round_overhead_seconds": [12.4, 12.4], "median_round_overhead_seconds": 12.4,
         "peak_rss_mib": {"flwr-clientapp": 975.0}, "wall_seconds": 73.2,
         "app": "fedclinic-fedavg", "model": "cnn"},
        {"app": "plain-flower", "hospitals": 2, "model": "cnn", "rounds": 3, "completed": True,
         "problems": [], "round_overhead_seconds": [21.5, 21.2],
         "median_round_overhead_seconds": 21.7, "model_bytes": 152072,
         "payload_bytes_per_round": {"down_bytes": 608288, "up_bytes": 304144},
         "wire_bytes_per_round": {"down_bytes": 645218.4, "up_bytes": 415305.1},
         "peak_rss_mib": {"flwr-clientapp": 901.8}, "wall_seconds": 86.2,
         "load_average_1min": [2.75, 2.96]},
    ],
    "transfer": [
        {"app": "fedclinic-pfednet", "model": "cnn", "compression": "stc", "hospitals": 2,
         "rounds": 3, "completed": True, "median_round_overhead_seconds": 21.4,
         "model_bytes": 151000, "payload_bytes_per_round": {"down_bytes": 611000,
                                                            "up_bytes": 7000},
         "wire_bytes_per_round": {"down_bytes": 648000, "up_bytes": 121000}},
    ],
}  # fmt: skip


def test_an_old_system_json_without_no_worker_rows_still_renders(tmp_path: Path) -> None:
    text = system_section(OLD_SYSTEM, "fedclinic bench system --mode full")
    # 12.4 / 21.7 = 0.571...: the one ratio it has; no no-worker row
    assert (
        "| 2 | fedclinic-fedavg | yes | 12.4 | 0.57 | 12.4, 12.4 | 975 / 0 / 0 / 0 / 0 / 0 | - |"
        in text
    )
    assert (
        "| 2 | plain-flower | yes | 21.7 | - | 21.5, 21.2 | 902 / 0 / 0 / 0 / 0 / 0 | 2.75 → 2.96 |"
        in text
    )
    assert "| 2 | fedclinic-fedavg-no-worker |" not in text
    assert "| cnn | 0.151 | fedclinic-pfednet | stc | float32 | yes | 21.4 |" in text
    console = Console(file=io.StringIO(), width=250)
    console.print(scale_table(OLD_SYSTEM["scale"]))
    assert "0.57" in console.file.getvalue()  # type: ignore[attr-defined]
    write_csv(tmp_path / "old.csv", OLD_SYSTEM)
    with (tmp_path / "old.csv").open() as handle:
        assert [r["site_worker"] for r in csv.DictReader(handle)] == ["", "", ""]
    # and the file the report keeps renders, whatever rows it holds
    kept = json.loads((Path(__file__).parents[1] / "docs/bench/system.json").read_text())
    text = system_section(kept, "fedclinic bench system --mode full")
    for entry in kept["scale"]:
        assert f"| {entry['hospitals']} | {entry['app']} |" in text
