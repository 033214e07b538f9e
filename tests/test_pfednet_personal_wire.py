"""pFedNet's personal exchange sends only what the hospital does not hold (docs/pfednet.md,
"What is exchanged"): the entries the shared average changed, never the hospital's own
column again; the hospital rebuilds the rest from the model it saved in the shared
exchange, checked by hash. Results are those of resending the full model, bit for bit, and
the byte counts are those of the messages that actually crossed, measured here from the
messages themselves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ArrayRecord, Message
from flwr.common.serde import array_record_to_proto
from harness import ScriptedGrid, rows_of, run, synthetic_nodes

from fedclinic import messages as keys
from fedclinic.engine import Hospital
from fedclinic.serialization import numpy_to_record, unpacked
from strategies import load_run_config
from strategies.pfednet import (
    BASE,
    DEPLOYED_STATE,
    MARKER,
    PERSONAL,
    PFedNetObjective,
    PFedNetStrategy,
)


def config(**extra: Any) -> dict[str, Any]:
    return {
        "algorithm": "pfednet",
        "model": "cnn",
        "rounds": 2,
        "local-steps": 2,
        "batch-size": 8,
        "seed": 4,
        "min-hospitals": 2,
        "pfednet.allow-rank-deficient-sketch": True,  # 40 synthetic images of 784 pixels
        **extra,
    }


class Recorder(ScriptedGrid):
    """Every model message as pushed: (round, exchange, node) -> its ArrayRecord."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sent: dict[tuple[int, str, int], ArrayRecord] = {}
        self.before_personal: Any = None

    def deliver(self, message: Message) -> Message | None:
        content = message.content
        if keys.ARRAYS in content.array_records:
            config = dict(content[keys.CONFIG])
            key = (int(config[keys.SERVER_ROUND]), str(config[keys.EXCHANGE]),
                   message.metadata.dst_node_id)  # fmt: skip
            # the model record as the engine packed it for Flower, unpacked: the payload
            self.sent[key] = unpacked(content.array_records[keys.ARRAYS])
            if key[1] == "personal" and self.before_personal is not None:
                self.before_personal(key)
        return super().deliver(message)


def wire_size(record: ArrayRecord) -> int:
    return len(array_record_to_proto(record).SerializeToString())


def run_recorded(
    tmp_path: Path, flat: dict[str, Any], count: int = 3
) -> tuple[PFedNetStrategy, Recorder, list[dict[str, Any]]]:
    grid = Recorder(synthetic_nodes(tmp_path, count), flat)
    engine, _ = run(flat, grid, tmp_path / "out")
    assert isinstance(engine.algorithm, PFedNetStrategy)
    return engine.algorithm, grid, rows_of(tmp_path / "out")


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("wire", ["float32", "float16"])
def test_personal_message_leaves_out_the_column_and_counts_what_crossed(
    tmp_path: Path, wire: str
) -> None:
    strategy, grid, rows = run_recorded(tmp_path, config(**{"wire-dtype": wire}))
    split = strategy.split
    assert split.personal == ("classifier.weight", "classifier.bias") and not split.buffers
    names = {100: "hospital-a", 101: "hospital-b", 102: "hospital-c"}
    for server_round in (1, 2):
        for node in names:
            shared = grid.sent[(server_round, "shared", node)]
            personal = grid.sent[(server_round, "personal", node)]
            # message 1: the whole personalised model and the name tag
            assert set(shared.keys()) == {*split.shared, *split.personal, MARKER}
            # message 2: the new x only (every shared entry moved), tag and base; no column
            assert set(personal.keys()) == {*split.shared, MARKER, BASE}
            assert not set(personal.keys()) & set(split.personal)
            base = bytes(personal[BASE].numpy()).decode()
            assert len(base) == 64 and int(base, 16) >= 0
            # the bytes counted are those of the two messages that crossed
            row = next(
                r for r in rows
                if r["kind"] == "communication" and r["round"] == server_round
                and r["hospital"] == names[node]
            )  # fmt: skip
            assert row["download_bytes"] == wire_size(shared) + wire_size(personal)
            # protobuf items add up: the shared message less the column, plus the base tag
            column = ArrayRecord({k: shared[k] for k in split.personal})
            tag = ArrayRecord({BASE: personal[BASE]})
            assert wire_size(personal) == wire_size(shared) - wire_size(column) + wire_size(tag)
            if wire != "float32":
                assert {shared[k].dtype for k in (*split.shared, *split.personal)} == {wire}
                assert {personal[k].dtype for k in split.shared} == {wire}
                assert row["fedavg_download_bytes"] < 0.55 * 152_000  # half the cnn's 150 kB
    # the final evaluation still sends the whole personalised model
    final = [k for k in grid.sent if k[1] == "evaluate"]
    assert final and all(set(grid.sent[k].keys()) >= set(split.personal) for k in final)


def recording_resolve(
    monkeypatch: pytest.MonkeyPatch, seen: dict[tuple[str, int, bool], dict[str, np.ndarray]]
) -> None:
    """Record the model each hospital trains from: (hospital, round, personal exchange) ->
    its entries, as the objective resolved them from what it received."""
    resolve = PFedNetObjective.resolve

    def recorded(self: PFedNetObjective, received: dict[str, Any]) -> Any:
        state, own = resolve(self, received)
        key = (self.context.hospital.hospital, self.context.server_round, BASE in received)
        seen[key] = {k: np.array(v.detach().cpu().numpy(), copy=True) for k, v in state.items()}
        return state, own

    monkeypatch.setattr(PFedNetObjective, "resolve", recorded)


@pytest.mark.usefixtures("task_identity")
def test_the_model_trained_from_is_that_of_resending_the_full_model_bit_for_bit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every hospital trains from the same bits under both protocols (the delta laid over its
    saved model, or the whole model again); what follows (training, the coordinator's ADMM)
    is then the same computation on the same inputs. Its results are compared to float
    precision: numpy's and torch's float reductions may round differently from one array
    allocation to another (SIMD paths depend on memory alignment), which once moved the
    coordinator's columns by 1e-7 between two runs in one process."""
    flat = config(**{"pfednet.compression": "stc"})
    delta_models: dict[tuple[str, int, bool], dict[str, np.ndarray]] = {}
    recording_resolve(monkeypatch, delta_models)
    strategy, _, rows = run_recorded(tmp_path / "delta", flat)
    # the old protocol: the personal message carries the whole model again
    full_models: dict[tuple[str, int, bool], dict[str, np.ndarray]] = {}
    recording_resolve(monkeypatch, full_models)
    monkeypatch.setattr(PFedNetStrategy, "personal_delta", lambda self, state, held: state)
    full, grid, full_rows = run_recorded(tmp_path / "full", flat)
    assert BASE not in grid.sent[(1, "personal", 100)]
    personal = [k for k in delta_models if k[2]]
    assert len(personal) == 6  # 3 hospitals x 2 rounds took the delta
    assert delta_models.keys() == {(h, r, False) for h, r, _ in delta_models} | set(personal)
    for hospital, server_round, took_delta in delta_models:
        key = (hospital, server_round, took_delta)
        twin = full_models[(hospital, server_round, False)] if took_delta else full_models[key]
        assert delta_models[key].keys() == twin.keys(), key
        for name, value in delta_models[key].items():
            np.testing.assert_array_equal(value, twin[name], err_msg=f"{key} {name}")
    np.testing.assert_allclose(strategy.columns, full.columns, rtol=1e-5, atol=1e-8)
    for key in strategy.state:
        np.testing.assert_allclose(strategy.state[key], full.state[key], rtol=1e-5, atol=1e-8)

    def scores(found: list[dict[str, Any]]) -> list[Any]:
        return [
            (r["round"], r["hospital"], r.get("val_loss"), r.get("test_accuracy"))
            for r in found
            if r["kind"] in ("evaluate", "train")
        ]

    mine, theirs = scores(rows), scores(full_rows)
    assert [m[:2] for m in mine] == [t[:2] for t in theirs]
    for m, t in zip(mine, theirs, strict=True):
        for value, twin in zip(m[2:], t[2:], strict=True):
            assert (value is None and twin is None) or value == pytest.approx(twin, rel=1e-5)
    down = sum(r["download_bytes"] for r in rows if r["kind"] == "communication")
    full_down = sum(r["download_bytes"] for r in full_rows if r["kind"] == "communication")
    assert down < full_down  # the columns, 3 hospitals x 2 rounds, are not sent again


def test_unchanged_shared_entries_are_left_out_too() -> None:
    """Entries the shared average did not change (here: the same array objects, and an
    equal copy) are not sent; a changed one is."""
    run_config = load_run_config(config())
    strategy = PFedNetStrategy(run_config)
    state = {k: v.numpy() for k, v in strategy.initial_state().items()}
    strategy.state = dict(state)
    strategy.columns = np.zeros((strategy.split.size(strategy.split.personal), 1))
    strategy.sent_shared = dict(state)
    moved, copied = strategy.split.shared[0], strategy.split.shared[1]
    strategy.state[moved] = state[moved] + 1.0
    strategy.state[copied] = state[copied].copy()
    strategy.held = {"h": "ab" * 32}
    record = strategy.arrays_for(Hospital(1, "h"), numpy_to_record({}), PERSONAL)
    assert set(record.keys()) == {moved, BASE}
    np.testing.assert_array_equal(record[moved].numpy(), state[moved] + 1.0)


@pytest.mark.usefixtures("task_identity")
def test_a_hospital_that_lost_its_saved_model_says_so(tmp_path: Path) -> None:
    flat = config(rounds=1, **{"min-hospitals": 2})
    grid = Recorder(synthetic_nodes(tmp_path, 3), flat)

    def lose(key: tuple[int, str, int]) -> None:
        if key[2] == 100:  # hospital-a's saved model of this round is gone
            for path in (tmp_path / "state" / "hospital-a").rglob(f"{DEPLOYED_STATE}.round-*"):
                path.unlink()

    grid.before_personal = lose
    run(flat, grid, tmp_path / "out")
    errors = [r for r in rows_of(tmp_path / "out") if r["kind"] == "error"]
    assert [(e["hospital"], e["round"]) for e in errors] == [("hospital-a", 1)]
    assert "saved in the round's shared exchange" in errors[0]["reason"]
    assert "is missing" in errors[0]["reason"]
