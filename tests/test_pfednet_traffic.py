"""pFedNet's one-time sketch counts in its byte totals and in every comparison with FedAvg
(docs/pfednet.md, "What is recorded"), checked against a hand count of the protobuf that
carries it."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest
from harness import ScriptedGrid, rows_of, run, synthetic_nodes

from fedclinic.config import parse_hospital_config
from fedclinic.data import DataRequest, load_hospital_data
from strategies import load_run_config
from strategies import pfednet_math as pm


def varint(value: int) -> bytes:
    """Protocol buffers' base-128 varint."""
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def sketch_record_by_hand(values: list[float]) -> bytes:
    """Flower's MetricRecord {"sketch": [floats]} on the wire, from its .proto by hand:
    MetricRecord.items (1) -> Item{key (1), value (2)} -> MetricRecordValue.double_list (21)
    -> DoubleList.vals (1, packed little-endian doubles)."""
    doubles = struct.pack(f"<{len(values)}d", *values)
    double_list = b"\x0a" + varint(len(doubles)) + doubles
    value = varint((21 << 3) | 2) + varint(len(double_list)) + double_list
    item = b"\x0a" + varint(6) + b"sketch" + b"\x12" + varint(len(value)) + value
    return b"\x0a" + varint(len(item)) + item


def test_the_hand_count_formula() -> None:
    """Two values: 16 bytes of doubles, 17 bytes of tags and lengths."""
    assert len(sketch_record_by_hand([3.0, 25.0])) == 33
    # 136 values (a 16-pixel covariance): lengths of two varint bytes
    assert len(sketch_record_by_hand([0.0] * 136)) == 136 * 8 + 1 + 2 + 2 + 2 + 8 + 1 + 2 + 1 + 2


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("sketch", ["label-ratio", "covariance"])
def test_the_sketch_is_in_the_rows_and_the_totals(tmp_path: Path, sketch: str) -> None:
    flat: dict[str, Any] = {
        "algorithm": "pfednet",
        "model": "cnn",
        "rounds": 2,
        "local-steps": 1,
        "batch-size": 16,
        "seed": 3,
        "min-hospitals": 2,
        "pfednet.sketch": sketch,
        "pfednet.sketch-image-size": 4,  # 16 pixels: 136 covariance entries, full rank
    }
    nodes = synthetic_nodes(tmp_path, 2)
    run(flat, ScriptedGrid(nodes, flat), tmp_path / "out")
    rows = rows_of(tmp_path / "out")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    totals = summary["pfednet"]["communication"]
    graph = next(r for r in rows if r["kind"] == "pfednet-graph")
    run_config = load_run_config(flat)
    for index, node in enumerate(nodes.values()):
        name = node["hospital"]
        train = load_hospital_data(DataRequest(run_config, parse_hospital_config(node))).train
        if sketch == "label-ratio":
            values = [float(c) for c in train.class_counts(2)]
        else:
            values = [float(v) for v in pm.covariance_sketch(train.inputs, 4)]
        wire = sketch_record_by_hand(values)
        deflated = len(zlib.compress(wire, 6))
        assert graph["sketch_bytes"][index] == len(wire)

        mine = [r for r in rows if r["kind"] == "communication" and r["hospital"] == name]
        traffic = sorted(mine, key=lambda r: r["round"])
        assert [r["round"] for r in traffic] == [0, 1, 2, 3]
        setup = traffic[0]  # the sketch, once; FedAvg has no setup exchange
        assert setup["sketch_upload_bytes"] == setup["upload_bytes"] == len(wire)
        assert setup["upload_deflate_bytes"] == deflated
        assert setup["download_bytes"] == setup["shared_upload_bytes"] == 0
        assert setup["fedavg_upload_bytes"] == setup["fedavg_download_bytes"] == 0
        assert setup["fedavg_upload_deflate_bytes"] == 0
        for later in traffic[1:]:
            assert later["sketch_upload_bytes"] == 0

        total = totals[name]
        assert total["sketch_upload_bytes"] == len(wire)
        rounds = traffic[1:]
        assert total["upload_bytes"] == len(wire) + sum(r["upload_bytes"] for r in rounds)
        assert total["upload_deflate_bytes"] == deflated + sum(
            r["upload_deflate_bytes"] for r in rounds
        )
        for key in ("download_bytes", "fedavg_upload_bytes", "fedavg_download_bytes"):
            assert total[key] == sum(r[key] for r in traffic), key
        # FedAvg's side: two training rounds of the full model up, three messages down
        fedavg_up = traffic[1]["fedavg_upload_bytes"]
        assert fedavg_up > 0 and total["fedavg_upload_bytes"] == 2 * fedavg_up
