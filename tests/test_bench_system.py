"""Arithmetic of ``fedclinic bench system``: overheads, wire bytes, payload, CSV rows.

No federation is started here: ``test_e2e_bench_system.py`` runs the quick mode on real
processes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest

from fedclinic.bench import dataload
from fedclinic.bench.system import (
    MODES,
    PLAIN_APP_DIR,
    add_system_parser,
    fedclinic_round_ends,
    flat_row,
    mean_wire,
    parse_ss,
    parse_transfer,
    payload_per_round,
    plain_config,
    plain_round_ends,
    plain_round_overheads,
    sketch_upload,
    value_at,
    wire_per_round,
    write_csv,
)

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
    from fedclinic.bench.system import system_section

    results = {
        "mode": "full", "rounds": 3, "cpu_count": 2, "wall_seconds": 120.0,
        "settings": {"model": "cnn", "local-steps": 1, "batch-size": 16},
        "scale": [
            {"hospitals": 2, "app": "fedclinic-fedavg", "completed": True,
             "median_round_overhead_seconds": 4.0, "round_overhead_seconds": [3.0, 5.0],
             "peak_rss_mib": {"flwr-clientapp": 990.4}},
            {"hospitals": 2, "app": "plain-flower", "completed": False,
             "median_round_overhead_seconds": None, "round_overhead_seconds": [],
             "peak_rss_mib": {}, "load_average_1min": [1.0, 2.0]},
        ],
        "transfer": [],
    }  # fmt: skip
    text = system_section(results, "fedclinic bench system --mode full --no-transfer")
    assert "`fedclinic bench system --mode full --no-transfer --out DIR` (2 min here)" in text
    assert "| 2 | fedclinic-fedavg | yes | 4.0 | 3.0, 5.0 | 990 / 0 / 0 / 0 / 0 | - |" in text
    assert "| 2 | plain-flower | NO | - |  | 0 / 0 / 0 / 0 / 0 | 1.0 → 2.0 |" in text
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
