"""Wire precision (run key ``wire-dtype``, docs/architecture.md#wire-precision): float32
weights and updates travel as float16 or bfloat16, integers never change, every receiver
widens back to float32 before any maths, and the default float32 path is the code without
the option, bit for bit.

Expected values are computed independently: float16 by numpy, bfloat16 by rounding the
float32 bit patterns to nearest even by hand (no torch), means by hand in float64.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from harness import ScriptedGrid, comparable_rows, rows_of, run, synthetic_nodes

import client.app
import fedclinic.engine.acceptance
import fedclinic.engine.rounds
from fedclinic import messages as keys
from fedclinic.audit import AuditLog
from fedclinic.bench.system import MODES, effective_mb_per_s, model_size_bytes, parse_transfer
from fedclinic.checkpoint import check_same_run
from fedclinic.engine import TRAIN
from fedclinic.engine.acceptance import UpdateChecks, accept
from fedclinic.engine.exchange import Delivery
from fedclinic.errors import ConfigError
from fedclinic.serialization import (
    BFLOAT16_STYPE,
    content_sha256,
    from_wire,
    numpy_to_record,
    record_to_numpy,
    to_wire,
    unpacked,
    wire_round_trip,
)
from fedclinic.validation import spec_of
from strategies import load_run_config
from strategies import pfednet_math as pm
from strategies.fedavg import FedAvgStrategy


def bfloat16_by_hand(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 -> float32: the top 16 bits, rounded to nearest even."""
    bits = np.asarray(values, np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return (rounded.astype(np.uint32) << 16).view(np.float32)


MIXED = {
    "weight": np.array([[0.0, 1.0, -2.0], [0.5, 2.0**-14, 65504.0]], np.float32),
    "third": np.array([1 / 3, -1 / 3, 0.1], np.float32),
    "scalar": np.array(2.5, np.float32),
    "num_batches_tracked": np.array(123456789, np.int64),
    "mask": np.array([True, False]),
    "tag": np.frombuffer(b"st-mary", np.uint8).copy(),
    "double": np.array([1 / 3], np.float64),
}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_round_trip_exact_where_representable_and_integers_untouched(dtype: str) -> None:
    back = record_to_numpy(wire_round_trip(numpy_to_record(MIXED), dtype))
    assert set(back) == set(MIXED)
    for key in ("weight", "third", "scalar"):
        assert back[key].dtype == np.float32 and back[key].shape == MIXED[key].shape
    if dtype == "float16":
        # every entry of "weight" is a float16 value (2^-14: the smallest normal, 65504: max)
        np.testing.assert_array_equal(back["weight"], MIXED["weight"])
        expected = MIXED["third"].astype(np.float16).astype(np.float32)
    else:
        # bfloat16 keeps 8 significant bits: 65504 is not one of its values
        exact = MIXED["weight"].copy()
        exact[1, 2] = 65536.0  # 65504 = 0x477FE000 rounds up to 0x4780 -> 2^16
        np.testing.assert_array_equal(back["weight"], exact)
        expected = bfloat16_by_hand(MIXED["third"])
        assert back["third"][0] == np.float32(0.333984375)  # 0x3EAAAAAB -> 0x3EAB
    np.testing.assert_array_equal(back["third"], expected)
    assert back["scalar"] == np.float32(2.5)
    # integers, booleans, bytes and other float types travel as they are, bit for bit
    for key in ("num_batches_tracked", "mask", "tag", "double"):
        assert back[key].dtype == MIXED[key].dtype
        assert back[key].tobytes() == MIXED[key].tobytes()


def test_what_travels_is_narrow_and_casting_twice_changes_nothing() -> None:
    record = numpy_to_record(MIXED)
    half = to_wire(record, "float16")
    assert half["weight"].dtype == "float16" and half["num_batches_tracked"].dtype == "int64"
    brain = to_wire(record, "bfloat16")
    assert brain["weight"].dtype == "bfloat16" and brain["weight"].stype == BFLOAT16_STYPE
    assert len(brain["weight"].data) == 2 * 6  # raw 16-bit patterns, no header
    for dtype, wire in (("float16", half), ("bfloat16", brain)):
        again = to_wire(wire, dtype)
        assert all(again[k].data == wire[k].data for k in wire)
    # about half the bytes for a large float32 array
    big = numpy_to_record({"w": np.linspace(-1, 1, 100_000, dtype=np.float32)})
    full, _ = pm.record_bytes(big)
    for dtype in ("float16", "bfloat16"):
        narrow, _ = pm.record_bytes(to_wire(big, dtype))
        assert 0.49 * full < narrow < 0.51 * full


def test_float32_is_the_record_itself() -> None:
    record = numpy_to_record(MIXED)
    assert to_wire(record, "float32") is record
    assert from_wire(record, "float32") is record


def test_float16_overflow_travels_in_float32_and_nan_stays_nan() -> None:
    record = numpy_to_record(
        {"big": np.array([1.0, 70000.0], np.float32), "bad": np.array([np.nan, 1.0], np.float32)}
    )
    wire = to_wire(record, "float16")
    assert wire["big"].dtype == "float32"  # 70000 > 65504: not rounded to inf
    assert wire["bad"].dtype == "float16"
    back = record_to_numpy(from_wire(wire, "float16"))
    np.testing.assert_array_equal(back["big"], [1.0, 70000.0])
    assert np.isnan(back["bad"][0]) and back["bad"][1] == 1.0


def test_a_truncated_bfloat16_array_is_refused() -> None:
    wire = to_wire(numpy_to_record({"w": np.ones(4, np.float32)}), "bfloat16")
    wire["w"].data = wire["w"].data[:6]
    with pytest.raises(Exception, match="carries 6 bytes; expected 8"):
        from_wire(wire, "bfloat16")


# ---------------------------------------------------------------------------- config


@pytest.mark.parametrize("value", ["float64", "fp16", "int8", "", 16, True])
def test_bad_wire_dtype_is_one_line(value: object) -> None:
    with pytest.raises(ConfigError) as caught:
        load_run_config({"wire-dtype": value})
    message = str(caught.value)
    assert "\n" not in message and "'wire-dtype'" in message
    if isinstance(value, str):
        assert "'float32', 'float16' or 'bfloat16'" in message


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_wire_dtype_values(dtype: str) -> None:
    assert load_run_config({"wire-dtype": dtype}).wire_dtype == dtype
    assert load_run_config({}).wire_dtype == "float32"


# ---------------------------------------------------------------------------- aggregation


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_uploads_are_widened_before_the_checks_and_the_average(dtype: str) -> None:
    """Sixteen hospitals upload 1 + i * u (u: the wire's unit in the last place at 1, so
    every value is exact on the wire); their mean 1 + 7.5 u is not a wire value but is a
    float32 one. Averaged in the wire dtype it would come out as 1 + 7 u or 1 + 8 u, and
    the layout check would refuse narrow arrays outright."""
    ulp = 2.0**-10 if dtype == "float16" else 2.0**-7
    count = 16
    model = {"w": np.zeros(3, np.float32), "num_batches_tracked": np.array(0, np.int64)}

    def sent(node: int) -> Message:
        return Message(RecordDict({}), dst_node_id=node, message_type=MessageType.TRAIN)

    replies = {}
    for i in range(count):
        state = {
            "w": np.array([1 + i * ulp, -(1 + i * ulp), 1e-3 * (i + 1)], np.float32),
            "num_batches_tracked": np.array(2 * i, np.int64),
        }
        content = RecordDict(
            {
                keys.ARRAYS: to_wire(numpy_to_record(state), dtype),
                keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: 10, keys.NUM_TRAIN: 10}),
                keys.INFO: ConfigRecord({keys.HOSPITAL: f"h{i:02d}"}),
            }
        )
        assert content[keys.ARRAYS]["w"].dtype == dtype
        replies[i + 1] = Message(content, reply_to=sent(i + 1))
    delivery = Delivery(asked=list(replies), replies=replies)
    checks = UpdateChecks(spec=spec_of(model), wire_dtype=dtype)
    outcome = accept(1, TRAIN, delivery, {}, checks, 60.0)
    assert len(outcome.accepted) == count and not outcome.rejected
    assert all(r.received is not None and r.received["w"].dtype == dtype for r in outcome.accepted)
    run = load_run_config({"wire-dtype": dtype})
    merged = record_to_numpy(FedAvgStrategy(run).aggregate(1, outcome.accepted))
    assert merged["w"].dtype == np.float32 and merged["num_batches_tracked"].dtype == np.int64
    assert merged["w"][0] == np.float32(1 + 7.5 * ulp)  # exact in float32, not on the wire
    assert merged["w"][1] == np.float32(-(1 + 7.5 * ulp))
    wire_values = [np.float32(1e-3 * (i + 1)) for i in range(count)]
    if dtype == "float16":
        wire_values = [float(np.float16(v)) for v in wire_values]
    else:
        wire_values = [float(bfloat16_by_hand(np.array([v]))[0]) for v in wire_values]
    assert merged["w"][2] == np.float32(sum(wire_values) / count)
    assert merged["num_batches_tracked"] == 15  # mean of 0, 2, ..., 30

    # the same uploads without widening: refused by the layout check (dtype)
    narrow = accept(1, TRAIN, delivery, {}, UpdateChecks(spec=spec_of(model)), 60.0)
    assert not narrow.accepted and len(narrow.rejected) == count


# ---------------------------------------------------------------------------- whole runs


class WireLog(ScriptedGrid):
    """Keeps the dtypes of every model that crossed, both ways."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.down: list[dict[str, str]] = []
        self.up: list[dict[str, str]] = []

    def deliver(self, message: Message) -> Message | None:
        if keys.ARRAYS in message.content.array_records:
            down = unpacked(message.content.array_records[keys.ARRAYS])
            self.down.append({k: a.dtype for k, a in down.items()})
        reply = super().deliver(message)
        if reply is not None and keys.ARRAYS in reply.content.array_records:
            up = unpacked(reply.content.array_records[keys.ARRAYS])
            self.up.append({k: a.dtype for k, a in up.items()})
        return reply


def fedavg_config(**extra: Any) -> dict[str, Any]:
    return {"model": "cnn", "rounds": 2, "local-steps": 2, "batch-size": 8, "seed": 5,
            "min-hospitals": 2, **extra}  # fmt: skip


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_a_narrow_run_sends_narrow_both_ways_and_hashes_what_hospitals_hold(
    tmp_path: Path, dtype: str
) -> None:
    flat = fedavg_config(**{"wire-dtype": dtype})
    grid = WireLog(synthetic_nodes(tmp_path, 2), flat)
    _, result = run(flat, grid, tmp_path / "out")
    assert grid.down and grid.up
    for dtypes in grid.down + grid.up:
        assert set(dtypes.values()) == {dtype}, dtypes  # the cnn: float32 weights only
    final = record_to_numpy(result.arrays)
    assert {a.dtype for a in final.values()} == {np.dtype(np.float32)}
    # the aggregate is float32: not every entry is a wire value
    assert not np.array_equal(
        np.concatenate([a.reshape(-1) for a in final.values()]),
        np.concatenate(
            [a.reshape(-1) for a in record_to_numpy(wire_round_trip(result.arrays, dtype)).values()]
        ),
    )
    events = [e for e in AuditLog(tmp_path / "out").read() if e["event"] == "round"]
    held = content_sha256(record_to_numpy(wire_round_trip(result.arrays, dtype)))
    assert events[-1]["model_sha256"] == content_sha256(final)
    assert events[-1]["wire_model_sha256"] == held != events[-1]["model_sha256"]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert any(r["kind"] == "evaluate" for r in rows_of(tmp_path / "out"))


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("algorithm", ["fedavg", "pfednet"])
def test_float32_is_the_path_without_the_option_bit_for_bit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, algorithm: str
) -> None:
    """The same run with the casts replaced by nothing at all (the code before the option):
    the same final model and the same rows, bit for bit."""
    flat = fedavg_config(algorithm=algorithm)
    if algorithm == "pfednet":
        flat["pfednet.allow-rank-deficient-sketch"] = True
    nodes = synthetic_nodes(tmp_path / "a", 2)
    _, first = run(flat, WireLog(nodes, flat), tmp_path / "a" / "out")

    def untouched(record: Any, dtype: str) -> Any:
        assert dtype == "float32"
        return record

    for module in (client.app, fedclinic.engine.rounds, fedclinic.engine.acceptance):
        for name in ("to_wire", "from_wire"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, untouched)
    nodes = synthetic_nodes(tmp_path / "b", 2)
    _, second = run(flat, WireLog(nodes, flat), tmp_path / "b" / "out")
    assert content_sha256(record_to_numpy(first.arrays)) == content_sha256(
        record_to_numpy(second.arrays)
    )
    assert comparable_rows(tmp_path / "a" / "out") == comparable_rows(tmp_path / "b" / "out")


# ---------------------------------------------------------------------------- benchmark


def test_bench_transfer_cases_name_a_wire_dtype() -> None:
    assert parse_transfer("resnet18-fedavg-none-float16, cnn-pfednet-fused-stc-bfloat16") == (
        ("resnet18", "fedavg", "none", "float16"),
        ("cnn", "pfednet", "fused-stc", "bfloat16"),
    )
    assert parse_transfer("resnet18-fedavg-none-float32") == (("resnet18", "fedavg", "none"),)
    with pytest.raises(argparse.ArgumentTypeError, match="plain Flower app sends float32"):
        parse_transfer("resnet18-plain-none-float16")
    # quick mode (CI) stays one float32 case; full mode runs both narrow precisions
    assert MODES["quick"].transfer == (("cnn", "pfednet", "stc"),)
    for model in ("resnet18", "resnet101"):
        for wire in ("float16", "bfloat16"):
            assert (model, "fedavg", "none", wire) in MODES["full"].transfer


def test_bench_model_bytes_and_effective_rate_by_hand() -> None:
    # the cnn: 38,786 float32 parameters (tests/test_e2e_bench_system.py counts them)
    params = (1 * 16 * 9 + 16) + (16 * 32 * 9 + 32) + (512 * 64 + 64) + (64 * 2 + 2)
    config = {"model": "cnn"}
    assert model_size_bytes(config) == 4 * params
    assert model_size_bytes(config, "float16") == model_size_bytes(config, "bfloat16") == 2 * params
    # 2 hospitals, 10 MB model sent as 5 MB each way: 20 MB of float32 moved in 4 s
    entry = {
        "payload_bytes_per_round": {"down_bytes": 10e6, "up_bytes": 10e6},
        "median_round_overhead_seconds": 4.0,
        "model_bytes": 10e6,
        "wire_model_bytes": 5e6,
    }
    assert effective_mb_per_s(entry) == pytest.approx(40e6 / 1e6 / 4.0)
    assert effective_mb_per_s({**entry, "median_round_overhead_seconds": None}) is None


def test_resume_keeps_the_wire_dtype_and_reads_older_checkpoints() -> None:
    """A checkpoint written before the key existed was a float32 run; changing the wire
    dtype on resume is refused in one line like any key that changes the computation."""
    check_same_run({"seed": 1}, {"seed": 1, "wire-dtype": "float32"})
    with pytest.raises(ConfigError, match=r"key 'wire-dtype' is 'float16'.*used 'float32'"):
        check_same_run({"seed": 1}, {"seed": 1, "wire-dtype": "float16"})
    with pytest.raises(ConfigError, match=r"key 'wire-dtype' is 'float32'.*used 'bfloat16'"):
        check_same_run({"wire-dtype": "bfloat16"}, {"wire-dtype": "float32"})


def test_narrow_wire_with_secure_aggregation_is_refused_in_one_line() -> None:
    """SecAgg uploads are masked integer vectors: a narrowed wire has no meaning there."""
    with pytest.raises(ConfigError, match="wire-dtype = 'float16' is not allowed with secure"):
        load_run_config({"wire-dtype": "float16", "secure-aggregation": True})
    assert load_run_config({"secure-aggregation": True}).wire_dtype == "float32"
