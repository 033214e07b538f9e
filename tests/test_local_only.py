"""Local-only: the hospital's own model persists at the site across rounds and restarts,
nothing is uploaded, and the coordinator keeps no global model."""

from __future__ import annotations

from pathlib import Path

import torch
from flwr.app import ConfigRecord, RecordDict

from fedclinic.config import HospitalConfig, RunConfig
from fedclinic.data.base import HospitalData, Split
from fedclinic.engine import Reply
from fedclinic.models import build_model
from fedclinic.serialization import file_sha256, record_to_state, state_to_record
from fedclinic.site import SiteState
from strategies import get_algorithm
from strategies.base import ClientContext
from strategies.local_only import LOCAL_MODEL


def data() -> HospitalData:
    generator = torch.Generator().manual_seed(0)

    def split(n: int) -> Split:
        inputs = torch.rand(n, 1, 28, 28, generator=generator)
        return Split(inputs, (inputs.mean((1, 2, 3)) > 0.5).long())

    return HospitalData(split(40), split(10), split(10))


def respond(tmp_path: Path, server_round: int, received: dict[str, torch.Tensor]) -> RecordDict:
    run = RunConfig(algorithm="local-only", run_name="study")
    hospital = HospitalConfig(hospital="st-mary", state_dir=str(tmp_path))
    context = ClientContext(
        run, hospital, data(), torch.device("cpu"),
        SiteState.for_run(hospital, run, 1, server_round=server_round), server_round,
    )  # fmt: skip
    objective = get_algorithm("local-only").objective(context)
    content = RecordDict(
        {"arrays": state_to_record(received), "config": ConfigRecord({"server-round": 1})}
    )
    return objective.respond(content, train=True)


def test_local_model_persists_and_never_leaves_the_site(tmp_path: Path) -> None:
    initial = build_model(RunConfig(), seed=1).state_dict()
    first = respond(tmp_path, 1, initial)
    saved = tmp_path / "study" / f"{LOCAL_MODEL}.round-1.pt"  # versioned by round
    assert saved.is_file()
    assert dict(first["info"])["model_sha256"] == file_sha256(saved)
    assert len(first.array_records["arrays"]) == 0  # nothing uploaded

    # A new process (restart) with a different "received" model still trains its own model:
    stored = torch.load(saved, weights_only=True)
    other = {k: torch.zeros_like(v) for k, v in initial.items()}
    second = respond(tmp_path, 2, other)
    # it evaluated its stored model, not the zeros it received
    zero_model_loss = respond(tmp_path / "fresh", 2, other)
    assert dict(second["metrics"])["val_loss"] != dict(zero_model_loss["metrics"])["val_loss"]
    after = torch.load(tmp_path / "study" / f"{LOCAL_MODEL}.round-2.pt", weights_only=True)
    assert any(not torch.equal(stored[k], after[k]) for k in stored)  # trained further


def test_local_only_server_keeps_no_global_model() -> None:
    run = RunConfig(algorithm="local-only")
    strategy = get_algorithm("local-only").strategy(run, None)
    reply = Reply(1, "st-mary", state_to_record({}), {"num-examples": 40}, {})
    assert strategy.aggregate(1, [reply]) is None
    assert strategy.has_global_model is False
    assert record_to_state(state_to_record({})) == {}
