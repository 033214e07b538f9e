"""Packed models on the wire (docs/architecture.md#packed-models): one byte buffer plus its
layout instead of one Flower ``Array`` per tensor, so a ResNet-101 message is a few dozen
Flower objects instead of about 1,300, and nothing about the values changes.

Expected bytes come from numpy and Flower's own serialisation of each array, not from the
packing code; object counts from Flower's own object tree.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common.constant import FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from harness import ScriptedGrid, comparable_rows, run, synthetic_nodes

import client.app
import fedclinic.engine.acceptance
import fedclinic.engine.rounds
from fedclinic import messages as keys
from fedclinic import serialization
from fedclinic.engine import TRAIN
from fedclinic.engine.acceptance import UpdateChecks, accept
from fedclinic.engine.exchange import Delivery
from fedclinic.errors import DataError
from fedclinic.serialization import (
    PACKED_LAYOUT,
    PACKED_PART,
    PACKED_STYPE,
    content_sha256,
    from_wire,
    numpy_to_record,
    packed,
    record_to_numpy,
    to_wire,
    unpacked,
)
from fedclinic.validation import spec_of

MIXED = {
    "conv.weight": np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2) / 7,
    "bn.num_batches_tracked": np.array(123456789, np.int64),
    "scalar": np.array(2.5, np.float32),
    "empty": np.zeros((0, 3), np.float32),
    "mask": np.array([True, False, True]),
    "codes": np.array([-3, 0, 7], np.int8),
}


def same_arrays(a: ArrayRecord, b: ArrayRecord) -> None:
    assert list(a.keys()) == list(b.keys())
    for name in a:
        assert (a[name].dtype, tuple(a[name].shape), a[name].stype, a[name].data) == (
            b[name].dtype,
            tuple(b[name].shape),
            b[name].stype,
            b[name].data,
        ), name


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_unpacked_gives_every_array_back_byte_for_byte(dtype: str) -> None:
    record = to_wire(numpy_to_record(MIXED), dtype)  # bfloat16: fedclinic's own stype
    wire = packed(record)
    assert list(wire.keys()) == [PACKED_LAYOUT, f"{PACKED_PART}00000"]  # one small part
    # the part is every array's own serialisation, in order, and nothing else
    assert wire[f"{PACKED_PART}00000"].data == b"".join(a.data for a in record.values())
    layout = json.loads(wire[PACKED_LAYOUT].data)
    assert [entry[0] for entry in layout] == list(MIXED)
    same_arrays(unpacked(wire), record)
    back = record_to_numpy(from_wire(unpacked(wire), dtype))
    for name, value in record_to_numpy(from_wire(record, dtype)).items():
        assert back[name].dtype == value.dtype and np.array_equal(back[name], value)


def test_a_model_larger_than_a_part_is_cut_into_numbered_parts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Parts of 100 bytes (the real size is four of Flower's chunks): arrays straddle part
    boundaries and every part but the last is full."""
    monkeypatch.setattr(serialization, "PACKED_PART_BYTES", 100)
    record = numpy_to_record(MIXED)
    joined = b"".join(a.data for a in record.values())
    wire = packed(record)
    parts = [wire[f"{PACKED_PART}{i:05d}"] for i in range(len(wire) - 1)]
    assert len(parts) == math.ceil(len(joined) / 100) > 3
    assert [len(p.data) for p in parts[:-1]] == [100] * (len(parts) - 1)
    assert b"".join(p.data for p in parts) == joined
    assert {p.stype for p in parts} == {PACKED_STYPE}
    same_arrays(unpacked(wire), record)


def test_small_and_foreign_records_pass_unchanged() -> None:
    single = numpy_to_record({"w": np.ones(3, np.float32)})
    assert packed(single) is single and unpacked(single) is single
    empty = ArrayRecord()
    assert packed(empty) is empty
    wire = packed(numpy_to_record(MIXED))
    assert packed(wire) is wire  # packing twice changes nothing


def test_a_packed_message_survives_flowers_object_pipeline_as_few_objects() -> None:
    """Deflated and inflated by Flower's own object code (what the SuperLink stores and the
    SuperNode pulls), and counted: one object per array and per 5 MB chunk before, a
    handful after."""
    rng = np.random.default_rng(0)
    state = {f"layer{i}.weight": rng.standard_normal(1000 + i).astype(np.float32)
             for i in range(300)}  # fmt: skip
    record = numpy_to_record(state)
    total = sum(len(a.data) for a in record.values())
    wire = packed(record)
    before = get_all_nested_objects(record)
    after = get_all_nested_objects(wire)
    assert len(before) == 1 + 300 + 300  # the record, each array, each array's one chunk
    chunks = math.ceil(total / FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE)
    assert len(after) == 1 + 2 + chunks + 1  # record, layout + part, the part's chunks, layout's
    contents = {object_id: obj.deflate() for object_id, obj in after.items()}
    inflated = inflate_object_from_contents(wire.object_id, contents)
    assert isinstance(inflated, ArrayRecord)
    same_arrays(unpacked(inflated), record)


def raw(data: bytes) -> Array:
    return Array(dtype="uint8", shape=(len(data),), stype=PACKED_STYPE, data=data)


def corrupt(record: ArrayRecord, layout: Any = None, buffer: bytes | None = None) -> ArrayRecord:
    wire = packed(record)
    if layout is not None:
        text = layout if isinstance(layout, bytes) else json.dumps(layout).encode()
        wire[PACKED_LAYOUT] = raw(text)
    if buffer is not None:
        wire[f"{PACKED_PART}00000"] = raw(buffer)
    return wire


def test_parts_and_a_layout_that_do_not_fit_together_are_one_line() -> None:
    record = numpy_to_record(MIXED)
    layout = json.loads(packed(record)[PACKED_LAYOUT].data)
    part = packed(record)[f"{PACKED_PART}00000"].data
    gap = packed(record)
    gap[f"{PACKED_PART}00002"] = raw(b"")  # part 1 missing
    foreign = packed(record)
    foreign[f"{PACKED_PART}00000"] = Array(np.frombuffer(part, np.uint8).copy())  # numpy stype
    cases = {
        "truncated part": corrupt(record, buffer=part[:-1]),
        "a part missing": gap,
        "a part of another type": foreign,
        "not JSON": corrupt(record, layout=b"{not json"),
        "short entry": corrupt(record, layout=[entry[:4] for entry in layout]),
        "duplicate name": corrupt(record, layout=[layout[0], layout[0], *layout[2:]]),
        "negative size": corrupt(record, layout=[[*layout[0][:4], -1], *layout[1:]]),
    }
    for name, wire in cases.items():
        with pytest.raises(DataError) as info:
            unpacked(wire)
        assert str(info.value).startswith("packed model: ") and "\n" not in str(info.value), name


@pytest.mark.usefixtures("task_identity")
def test_a_corrupt_packed_upload_is_rejected_and_the_others_kept() -> None:
    model = {"w": np.zeros(3, np.float32), "num_batches_tracked": np.array(0, np.int64)}

    def reply(node: int, arrays: ArrayRecord) -> Message:
        sent = Message(RecordDict({}), dst_node_id=node, message_type=MessageType.TRAIN)
        content = RecordDict(
            {
                keys.ARRAYS: arrays,
                keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: 10, keys.NUM_TRAIN: 10}),
                keys.INFO: ConfigRecord({keys.HOSPITAL: f"h{node}"}),
            }
        )
        return Message(content, reply_to=sent)

    good = {"w": np.array([1.0, 2.0, 3.0], np.float32), "num_batches_tracked": np.array(4)}
    part = packed(numpy_to_record(good))[f"{PACKED_PART}00000"].data
    replies = {
        1: reply(1, packed(numpy_to_record(good))),
        2: reply(2, corrupt(numpy_to_record(good), buffer=part[:-8])),
    }
    outcome = accept(1, TRAIN, Delivery(asked=[1, 2], replies=replies), {},
                     UpdateChecks(spec=spec_of(model)), 60.0)  # fmt: skip
    assert [r.hospital for r in outcome.accepted] == ["h1"]
    received = outcome.accepted[0].received
    assert received is not None and np.array_equal(received["w"].numpy(), good["w"])
    assert list(outcome.rejected) == ["h2"]
    assert outcome.rejected["h2"].startswith("unreadable update: packed model: the layout ")


class PackLog(ScriptedGrid):
    """Keeps the entry names of every model that crossed, both ways."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.crossed: list[set[str]] = []

    def deliver(self, message: Message) -> Message | None:
        if keys.ARRAYS in message.content.array_records:
            self.crossed.append(set(message.content.array_records[keys.ARRAYS].keys()))
        reply = super().deliver(message)
        if reply is not None and keys.ARRAYS in reply.content.array_records:
            self.crossed.append(set(reply.content.array_records[keys.ARRAYS].keys()))
        return reply


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("algorithm", ["fedavg", "pfednet"])
def test_packing_changes_no_value_of_a_whole_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, algorithm: str
) -> None:
    """Models cross packed both ways; the same run with packing replaced by nothing at all
    gives the same final model and the same rows, bit for bit."""
    flat = {"model": "cnn", "rounds": 2, "local-steps": 2, "batch-size": 8, "seed": 5,
            "min-hospitals": 2, "algorithm": algorithm}  # fmt: skip
    if algorithm == "pfednet":
        flat["pfednet.allow-rank-deficient-sketch"] = True
    grid = PackLog(synthetic_nodes(tmp_path / "a", 2), flat)
    _, first = run(flat, grid, tmp_path / "a" / "out")
    # every model of several arrays crosses packed (pFedNet uploads one flat delta array)
    packed_names = {PACKED_LAYOUT, f"{PACKED_PART}00000"}  # the cnn: one part
    assert all(names == packed_names or len(names) == 1 for names in grid.crossed)
    assert packed_names in grid.crossed

    def untouched(record: Any) -> Any:
        return record

    for module in (client.app, fedclinic.engine.rounds, fedclinic.engine.acceptance):
        for name in ("packed", "unpacked"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, untouched)
    plain = PackLog(synthetic_nodes(tmp_path / "b", 2), flat)
    _, second = run(flat, plain, tmp_path / "b" / "out")
    assert plain.crossed and not any(PACKED_LAYOUT in names for names in plain.crossed)
    assert content_sha256(record_to_numpy(first.arrays)) == content_sha256(
        record_to_numpy(second.arrays)
    )
    assert comparable_rows(tmp_path / "a" / "out") == comparable_rows(tmp_path / "b" / "out")
