"""``fedclinic bench system --mode quick`` on real processes: CI's smoke test of the runtime
benchmark (issue #8), not a timed test: nothing here checks a duration.

The quick mode runs three federations, each a real SuperLink and two SuperNodes with TLS and
node authentication: fedclinic FedAvg and the plain Flower app side by side (2 rounds), and one
transfer case (pFedNet with STC compression), after the data-load part (a few hundred generated
PNGs loaded without and with the site's cache; no federation). The two parts run here as two
tests, through the command's ``--no-transfer`` and ``--sizes '' --no-data-load`` options, so
that the suite's workers run them at the same time; together they are exactly the quick mode.
They check that every federation completed, that the measurements are there and sane
(overheads and memory positive, bytes on the wire, STC uploading less than the model), that
the files ``bench report`` reads are written, that the report picks the section up, and that
no process is left behind.

The transfer case is also the suite's pFedNet run on real processes (its two exchanges a
round, shared then personal, through TLS and node authentication): its results directory is
checked as an operator's would be (the one-exchange pattern, in process:
tests/test_pfednet_heart.py). Decision IDs: docs/pfednet.md#decisions.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from harness import check_pfednet_run

from fedclinic.bench.report import RUNTIME_SECTIONS, runtime_sections
from fedclinic.local.supervisor import pids_with_cmdline
from fedclinic.site import SiteState

ROOT = Path(__file__).resolve().parents[1]
# SmallCNN on 1-channel images with 2 classes, float32, counted by hand: two 3x3 convolutions
# (1->16, 16->32), a 512->64 layer and the 64->2 classifier, weights plus biases
CNN_BYTES = 4 * ((1 * 16 * 9 + 16) + (16 * 32 * 9 + 32) + (512 * 64 + 64) + (64 * 2 + 2))
KINDS = ("flower-supernode", "flower-superlink", "flwr-serverapp")


def answering(entry: dict) -> str:
    """The process kind that answers a hospital's messages in this federation: fedclinic's
    site worker (which takes its node's tasks), else one flwr-clientapp per message."""
    return "site-worker" if entry.get("site_worker") else "flwr-clientapp"


def _positive(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


def _run_quick(out: Path, *part: str) -> dict:
    """``bench system --mode quick`` with ``part`` (one half of it); its ``system.json``."""
    command = [sys.executable, "-m", "fedclinic.cli", "bench", "system", "--mode", "quick"]
    command += [*part, "--out", str(out)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1100)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    # every process of its federations is gone (SuperExecs and app processes included)
    assert pids_with_cmdline(str(out), environ=True) == []
    system = json.loads((out / "system.json").read_text())
    assert system["mode"] == "quick" and system["rounds"] == 2
    for entry in system["scale"] + system["transfer"]:
        assert entry["completed"] is True, entry
        assert not entry.get("problems"), entry["problems"]
        # round 1 is left out: rounds 2..R, each a positive overhead in seconds
        assert len(entry["round_overhead_seconds"]) == system["rounds"] - 1, entry
        assert all(_positive(x) for x in entry["round_overhead_seconds"]), entry
        assert _positive(entry["median_round_overhead_seconds"])
        kinds = (*KINDS, answering(entry))
        assert all(_positive(entry["peak_rss_mib"].get(kind)) for kind in kinds), entry
        if entry.get("site_worker"):  # no process per message
            assert "flwr-clientapp" not in entry["peak_rss_mib"], entry
    return system


@pytest.mark.e2e
@pytest.mark.long
@pytest.mark.timeout(1200)  # two federations in a row; a loaded CI box slows each one
def test_system_quick_scale_part_runs_fedclinic_and_plain_flower(tmp_path: Path) -> None:
    results = tmp_path / "results"
    out = results / "system"
    system = _run_quick(out, "--no-transfer")
    scale = system["scale"]
    assert system["transfer"] == []
    assert [(r["app"], r["hospitals"]) for r in scale] == [
        ("fedclinic-fedavg", 2),
        ("plain-flower", 2),
    ]
    # both apps record the machine's load around their run (the table prints it)
    assert all(len(r["load_average_1min"]) == 2 for r in scale), scale
    plain = scale[1]
    assert _positive(plain["model_bytes"])
    assert plain["payload_bytes_per_round"] == {  # TRAIN + EVALUATE down, TRAIN replies up
        "down_bytes": 2 * 2 * plain["model_bytes"],
        "up_bytes": 2 * plain["model_bytes"],
    }
    # what crossed the Fleet API socket: the models plus TLS and gRPC framing (loosely: the
    # socket counters are sampled every 0.5 s and interpolated at the round ends)
    wire = plain["wire_bytes_per_round"]
    assert wire["down_bytes"] > plain["payload_bytes_per_round"]["down_bytes"] / 2
    assert wire["up_bytes"] > plain["payload_bytes_per_round"]["up_bytes"] / 2

    with (out / "system.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["section"], r["app"]) for r in rows] == [
        ("scale", "fedclinic-fedavg"),
        ("scale", "plain-flower"),
    ]
    assert all(r["completed"] == "True" for r in rows)

    section = (out / "system.md").read_text()
    assert section.startswith("**Quick mode: a smoke test")
    assert "`fedclinic bench system --mode quick --no-transfer --out DIR`" in section
    assert "| 2 | fedclinic-fedavg | yes |" in section and "| 2 | plain-flower | yes |" in section

    # the data-load part: both sources, every case measured, the cache written
    loads = system["data_load"]["entries"]
    assert [(e["source"], e["files"]) for e in loads] == [
        ("image-folder", 300),
        ("segmentation-folder", 300),  # 150 image/mask pairs
    ]
    for entry in loads:
        assert all(_positive(entry["seconds"][k]) for k in entry["seconds"]), entry
        assert _positive(entry["cache_megabytes"]), entry
    assert "**Data load per hospital**" in section and "| image-folder | 300 |" in section

    # `fedclinic bench report` takes the section from <results>/system/system.md
    plots = tmp_path / "plots"
    plots.mkdir()
    title = dict(RUNTIME_SECTIONS)["system"]
    lines = runtime_sections(results, plots)
    assert lines[:2] == [f"## {title}", ""] and lines[2] == section.strip()
    assert (plots / "system.md").read_text() == section


@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_system_quick_transfer_part_pfednet_sends_less_with_stc(tmp_path: Path) -> None:
    out = tmp_path / "system"
    system = _run_quick(out, "--sizes", "", "--no-data-load")
    assert system["scale"] == [] and len(system["transfer"]) == 1
    assert system["data_load"] is None
    stc = system["transfer"][0]
    assert (stc["app"], stc["model"], stc["compression"]) == ("fedclinic-pfednet", "cnn", "stc")
    assert stc["model_bytes"] == CNN_BYTES
    payload, wire = stc["payload_bytes_per_round"], stc["wire_bytes_per_round"]
    assert _positive(payload["down_bytes"]) and _positive(payload["up_bytes"])
    assert _positive(wire["down_bytes"]) and _positive(wire["up_bytes"])
    # the compressed uploads of both hospitals, both phases, are smaller than one model
    assert payload["up_bytes"] < stc["model_bytes"]
    assert wire["down_bytes"] > payload["down_bytes"] / 2
    section = (out / "system.md").read_text()
    assert "`fedclinic bench system --mode quick --sizes '' --no-data-load --out DIR`" in section
    assert "| fedclinic-pfednet | stc | float32 | yes |" in section

    # the pFedNet run itself, as its results directory shows it
    run = out / "transfer" / "cnn-pfednet-stc"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run / "summary.json").read_text())
    names = sorted(summary["hospitals"])
    assert len(names) == 2
    check_pfednet_run(rows, summary, names)
    graph = next(r for r in rows if r["kind"] == "pfednet-graph")
    assert graph["sketch"] == "covariance" and graph["hospitals"] == names
    assert len(graph["edges"]) == 1  # k capped at N - 1: the complete graph of 2
    phases = [r["phase"] for r in rows if r["kind"] == "train"]
    assert sorted(phases) == ["personal"] * 4 + ["shared"] * 4  # 2 rounds x 2 hospitals
    for row in (r for r in rows if r["kind"] == "communication" and 1 <= r["round"] <= 2):
        assert row["upload_bytes"] == row["shared_upload_bytes"] + row["personal_upload_bytes"]
        assert row["upload_bytes"] < row["fedavg_upload_bytes"] / 4  # ternary codes + DEFLATE
    for name in names:  # each hospital kept its personalised head and its final model
        (newest,) = {p.parent for p in (run / "state" / name).rglob("pfednet_personal.round-*")}
        personal = SiteState(newest).load("pfednet_personal")
        assert set(personal) == {"classifier.weight", "classifier.bias"}
        assert SiteState(newest).has("pfednet_model")
