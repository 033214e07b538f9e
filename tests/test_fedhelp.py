"""FedHelp at the hospitals (large and small updates, site state) and at the coordinator.

Decision IDs (FH-n): docs/fedhelp.md#decisions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, RecordDict
from torch import nn

from fedclinic.config import HospitalConfig, RunConfig
from fedclinic.data import DataRequest, load_hospital_data
from fedclinic.engine import Hospital, Reply
from fedclinic.errors import ConfigError, IntegrityError
from fedclinic.knowledge import build_knowledge, write_synthetic_public
from fedclinic.models import build_model
from fedclinic.results import ResultsWriter
from fedclinic.serialization import numpy_to_record, record_to_state, state_to_record
from fedclinic.site import SiteState
from fedclinic.training import make_loader
from strategies import load_run_config
from strategies.base import ClientContext
from strategies.fedhelp import (
    HEADS,
    LARGE_MODEL,
    ROLE_KEY,
    FedHelpObjective,
    FedHelpStrategy,
)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Public data (synthetic, another seed than the hospitals') and a logits-file knowledge."""
    folder = tmp_path_factory.mktemp("shared")
    public = write_synthetic_public(folder / "public.npz", 32, 2, seed=1000)
    logits = np.random.default_rng(0).normal(scale=2.0, size=(32, 2))
    np.save(folder / "api.npy", logits)
    digest, _ = build_knowledge(public, folder / "knowledge.npz", logits_file=folder / "api.npy")
    return {"public": public, "knowledge": folder / "knowledge.npz", "sha": digest}


def make_run(shared: dict[str, Any], **options: Any) -> RunConfig:
    flat: dict[str, Any] = {
        "algorithm": "fedhelp",
        "run-name": "fh-test",
        "local-steps": 2,
        "batch-size": 16,
        "learning-rate": 0.05,
        "fedhelp.large-model": "wide-cnn",
        "fedhelp.knowledge-sha256": shared["sha"],
    }
    flat.update({k if "." in k else f"fedhelp.{k}": v for k, v in options.items()})
    return load_run_config(flat)


def make_objective(
    run: RunConfig,
    shared: dict[str, Any],
    state_dir: Path,
    sent_role: str,
    name: str = "h-1",
    **keys: Any,
) -> FedHelpObjective:
    hospital = HospitalConfig(
        hospital=name,
        data_source="synthetic",
        num_samples=60,
        state_dir=str(state_dir),
        public_data_path=str(shared["public"]),
        knowledge_path=str(shared["knowledge"]),
        **keys,
    )
    context = ClientContext(
        run=run,
        hospital=hospital,
        data=load_hospital_data(DataRequest(run, hospital)),
        device=torch.device("cpu"),
        site=SiteState.for_run(hospital, run, run_id=7),
        server_round=1,
        server_config={"server-round": 1, ROLE_KEY: sent_role},
    )
    if run.dp != "off":  # what the ClientApp's DP release hands over (its own tests: privacy)
        context.released_counts = [float(c) for c in context.data.train.class_counts(2)]
    return FedHelpObjective(context)


def global_state(run: RunConfig) -> dict[str, torch.Tensor]:
    return build_model(run, seed=1).state_dict()


def respond(objective: FedHelpObjective, state: dict[str, torch.Tensor]) -> RecordDict:
    torch.manual_seed(0)
    content = RecordDict({"arrays": state_to_record(state), "config": ConfigRecord({})})
    return objective.respond(content, train=True)


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------ large hospitals


def test_large_hospital_uploads_its_proxy_and_keeps_its_large_model(
    shared: dict[str, Any], tmp_path: Path
) -> None:
    run = make_run(shared)
    received = global_state(run)
    objective = make_objective(run, shared, tmp_path, "large")
    assert objective.deployed_kind == "large"
    reply = respond(objective, received)
    uploaded = record_to_state(reply["arrays"])
    # FH-1: the upload has the global architecture (it is the proxy), and it was trained
    assert {k: v.shape for k, v in uploaded.items()} == {k: v.shape for k, v in received.items()}
    assert not same(uploaded, received)
    info = dict(reply["info"])
    assert info["deployed"] == "large" and info["uploaded"] == "proxy"
    # FH-9: the large model stays on the site, in this hospital's state directory
    site = objective.context.site
    assert site.has(LARGE_MODEL) and site.directory.is_relative_to(tmp_path)
    large = site.load(LARGE_MODEL)
    assert "features.0.weight" in large and large["features.0.weight"].shape[0] == 48  # wide-cnn
    assert not any(v.shape == large["features.0.weight"].shape for v in uploaded.values())
    metrics = dict(reply["metrics"])
    for key in ("train_forward_kl", "train_backward_kl", "train_rank_loss", "train_large_ce"):
        assert np.isfinite(metrics[key])


def test_large_model_persists_across_rounds_and_restarts(
    shared: dict[str, Any], tmp_path: Path
) -> None:
    run = make_run(shared)
    first = make_objective(run, shared, tmp_path, "large")
    initial = first.large_model().state_dict()
    respond(first, global_state(run))
    after_round_1 = first.context.site.load(LARGE_MODEL)
    assert not same(after_round_1, initial)
    # a restart: a new process, new objects, the same hospital config and run name
    restarted = make_objective(run, shared, tmp_path, "large")
    assert same(restarted.deployed_model(global_state(run)).state_dict(), after_round_1)
    respond(restarted, global_state(run))
    after_round_2 = restarted.context.site.load(LARGE_MODEL)
    assert not same(after_round_2, after_round_1)
    # and the large model is what the hospital evaluates (its deployed model)
    third = make_objective(run, shared, tmp_path, "large")
    assert same(third.deployed_model(global_state(run)).state_dict(), after_round_2)


def test_each_large_hospital_has_its_own_large_model(
    shared: dict[str, Any], tmp_path: Path
) -> None:
    run = make_run(shared)
    a = make_objective(run, shared, tmp_path / "a", "large", name="h-a")
    b = make_objective(run, shared, tmp_path / "b", "large", name="h-b", data_seed=3)
    respond(a, global_state(run))
    respond(b, global_state(run))
    state_a, state_b = a.context.site.load(LARGE_MODEL), b.context.site.load(LARGE_MODEL)
    assert a.context.site.directory != b.context.site.directory
    assert not same(state_a, state_b)


def test_large_models_ce_has_a_gradient(shared: dict[str, Any], tmp_path: Path) -> None:
    """FH-7: with both distillation terms off, CE alone must still train the large model."""
    run = make_run(shared, **{"backward-kd-weight": 0.0, "rank-weight": 0.0})
    objective = make_objective(run, shared, tmp_path, "large")
    initial = objective.large_model().state_dict()
    respond(objective, global_state(run))
    assert not same(objective.context.site.load(LARGE_MODEL), initial)


# ------------------------------------------------------------------------------ small hospitals


def test_small_hospital_uploads_the_surrogate_with_its_private_head(
    shared: dict[str, Any], tmp_path: Path
) -> None:
    run = make_run(shared)
    received = global_state(run)
    objective = make_objective(run, shared, tmp_path, "small")
    assert objective.deployed_kind == "global"
    reply = respond(objective, received)
    uploaded = record_to_state(reply["arrays"])
    # FH-6: global keys and shapes; the public head (C_pub outputs) is not uploaded
    assert {k: v.shape for k, v in uploaded.items()} == {k: v.shape for k, v in received.items()}
    assert not same(uploaded, received)
    info, metrics = dict(reply["info"]), dict(reply["metrics"])
    assert info["deployed"] == "global" and info["uploaded"] == "surrogate"
    assert info["knowledge_sha256"] == shared["sha"]
    assert metrics["train_public_kl"] > 0 and metrics["train_public_ce"] > 0  # FH-5: labelled
    assert objective.context.site.has(HEADS)  # default head-init = global: public head kept
    assert not objective.context.site.has(LARGE_MODEL)


def test_public_ce_can_be_switched_off_and_heads_kept(
    shared: dict[str, Any], tmp_path: Path
) -> None:
    run = make_run(shared, **{"public-ce": False, "head-init": "kept"})
    objective = make_objective(run, shared, tmp_path, "small")
    reply = respond(objective, global_state(run))
    assert dict(reply["metrics"])["train_public_ce"] == 0.0
    heads = objective.context.site.load(HEADS)
    assert heads["public.weight"].shape == (2, 64) and heads["private.weight"].shape == (2, 64)
    uploaded = record_to_state(reply["arrays"])
    assert torch.equal(uploaded["classifier.weight"], heads["private.weight"])
    # next round starts from the kept heads, not fresh ones
    again = make_objective(run, shared, tmp_path, "small")
    private, public = again.heads(nn.Linear(64, 2), 2)
    assert torch.equal(private.weight.detach(), heads["private.weight"])
    assert torch.equal(public.weight.detach(), heads["public.weight"])


def test_head_init_global_starts_the_private_head_from_the_global_classifier(
    shared: dict[str, Any], tmp_path: Path
) -> None:
    run = make_run(shared, **{"head-init": "global"})
    objective = make_objective(run, shared, tmp_path, "small")
    global_head = nn.Linear(64, 2)
    private, _ = objective.heads(global_head, 2)
    assert torch.equal(private.weight.detach(), global_head.weight.detach())
    assert private is not global_head
    respond(objective, global_state(run))
    kept = objective.context.site.load(HEADS)
    private, public = make_objective(run, shared, tmp_path, "small").heads(global_head, 2)
    assert torch.equal(public.weight.detach(), kept["public.weight"])  # public head kept
    assert torch.equal(private.weight.detach(), global_head.weight.detach())  # not the kept one
    run = make_run(shared, **{"head-init": "fresh"})
    fresh = make_objective(run, shared, tmp_path, "small").heads(global_head, 2)
    assert not torch.equal(fresh[0].weight.detach(), global_head.weight.detach())  # reference


def test_without_public_data_the_small_hospital_trains_on_its_own_data_only(
    shared: dict[str, Any], tmp_path: Path
) -> None:
    run = make_run(shared, **{"knowledge": "none", "knowledge-sha256": "", "head-init": "global"})
    objective = make_objective(run, shared, tmp_path, "small")
    objective.context.hospital = objective.context.hospital.model_copy(
        update={"knowledge_path": "", "public_data_path": ""}  # nothing public to read
    )
    received = global_state(run)
    reply = respond(objective, received)
    uploaded = record_to_state(reply["arrays"])
    assert {k: v.shape for k, v in uploaded.items()} == {k: v.shape for k, v in received.items()}
    metrics, info = dict(reply["metrics"]), dict(reply["info"])
    assert "train_public_kl" not in metrics and metrics["train_private_loss"] > 0
    assert info["uploaded"] == "surrogate" and info["knowledge_source"] == "none"
    # the same steps by hand: the received model, its classifier kept (head-init = global),
    # trained with the default balanced softmax (CE of the logits shifted by the log of this
    # hospital's training class frequencies) on the same batches with the run's optimiser
    by_hand = build_model(run)
    by_hand.load_state_dict(received)
    optimizer = torch.optim.Adam(by_hand.parameters(), lr=run.learning_rate)
    train = objective.context.data.train
    counts = torch.bincount(train.labels, minlength=run.num_classes).double()
    log_prior = torch.log(counts / counts.sum() + 1e-12).float()
    loader = make_loader(train, run.batch_size, shuffle=True, generator=objective.generator())
    batches = iter(loader)
    for _ in range(run.local_steps):  # within the first pass over the data
        x, y = next(batches)
        loss = nn.functional.cross_entropy(by_hand(x) + log_prior, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for key, value in by_hand.state_dict().items():
        torch.testing.assert_close(uploaded[key], value)
    # the private head is kept at the site; no public head exists
    assert set(objective.context.site.load(HEADS)) == {"private.weight", "private.bias"}


def test_without_public_data_the_coordinator_needs_no_knowledge_file(
    shared: dict[str, Any],
) -> None:
    run = make_run(shared, **{"knowledge": "none", "knowledge-sha256": ""})
    strategy = FedHelpStrategy(run)
    queried = [reply(1, "a", {}, 10), reply(2, "b", {}, 20)]
    strategy.setup(queried, numpy_to_record({}))
    assert strategy.roles == {1: "small", 2: "large"}
    assert strategy.summary_extra()["fedhelp"]["knowledge"] == "none"


def test_small_hospital_refuses_a_knowledge_file_with_another_hash(
    shared: dict[str, Any], tmp_path: Path
) -> None:
    run = make_run(shared, **{"knowledge-sha256": "ab" * 32})
    objective = make_objective(run, shared, tmp_path, "small")
    with pytest.raises(IntegrityError, match="refusing a file that differs"):
        respond(objective, global_state(run))


def test_small_hospital_without_knowledge_paths_is_a_config_error(
    shared: dict[str, Any], tmp_path: Path
) -> None:
    run = make_run(shared)
    objective = make_objective(run, shared, tmp_path, "small")
    objective.context.hospital = objective.context.hospital.model_copy(
        update={"knowledge_path": ""}
    )
    with pytest.raises(ConfigError, match="knowledge-path"):
        respond(objective, global_state(run))


def test_role_falls_back_to_the_hospital_config(shared: dict[str, Any], tmp_path: Path) -> None:
    run = make_run(shared)
    objective = make_objective(run, shared, tmp_path, "", role="large")
    assert objective.role == "large"
    assert make_objective(run, shared, tmp_path, "").role == "small"


# ------------------------------------------------------------------------------ coordinator


def reply(
    node: int, name: str, state: dict[str, np.ndarray], num_train: int, role: str = ""
) -> Reply:
    return Reply(
        node_id=node,
        hospital=name,
        arrays=numpy_to_record(state),
        metrics={"num_train": num_train, "num-examples": num_train, "fedhelp_has_knowledge": 1.0},
        info={"hospital": name, "role": role},
    )


def test_setup_assigns_roles_sends_them_and_records_them(
    shared: dict[str, Any], tmp_path: Path
) -> None:
    run = make_run(shared)
    results = ResultsWriter(tmp_path / "out")
    strategy = FedHelpStrategy(run, results)
    queried = [
        reply(11, "hospital-a", {}, 100),
        reply(12, "hospital-b", {}, 400),
        reply(13, "hospital-c", {}, 50, role="large"),
    ]
    strategy.setup(queried, numpy_to_record({}))
    assert strategy.roles == {11: "small", 12: "small", 13: "large"}  # num-large = 1, taken by c
    config = ConfigRecord({"server-round": 1})
    assert strategy.setup_query() == {}  # the engine asks every hospital to describe itself
    assert strategy.config_for(Hospital(13, "hospital-c"), config)[ROLE_KEY] == "large"
    assert strategy.config_for(Hospital(11, "hospital-a"), config)[ROLE_KEY] == "small"
    assert ROLE_KEY not in config  # the shared config is not changed
    rows = [r for r in results.rows if r["kind"] == "fedhelp-role"]
    assert {r["hospital"]: (r["role"], r["role_source"]) for r in rows} == {
        "hospital-a": ("small", "size-rank"),
        "hospital-b": ("small", "size-rank"),
        "hospital-c": ("large", "config"),
    }
    extra = strategy.summary_extra()["fedhelp"]
    assert extra["roles"] == {"hospital-a": "small", "hospital-b": "small", "hospital-c": "large"}


def test_setup_refuses_small_hospitals_without_knowledge(shared: dict[str, Any]) -> None:
    strategy = FedHelpStrategy(make_run(shared, **{"knowledge-sha256": ""}))
    queried = [reply(1, "a", {}, 10), reply(2, "b", {}, 20)]
    with pytest.raises(ConfigError, match=r"fedhelp\.knowledge-sha256"):
        strategy.setup(queried, numpy_to_record({}))
    strategy = FedHelpStrategy(make_run(shared))
    queried[0].metrics["fedhelp_has_knowledge"] = 0.0
    with pytest.raises(ConfigError, match=r"small hospital\(s\) a: the hospital config lacks"):
        strategy.setup(queried, numpy_to_record({}))


@pytest.mark.parametrize(
    ("aggregation", "expected"),
    [("mean", (1.0 + 4.0) / 2), ("weighted", (1.0 * 100 + 4.0 * 300) / 400)],
)
def test_aggregation_mean_or_weighted(
    shared: dict[str, Any], tmp_path: Path, aggregation: str, expected: float
) -> None:
    """FH-10: the reference's unweighted mean, or sample-size weights."""
    strategy = FedHelpStrategy(make_run(shared, aggregation=aggregation), ResultsWriter(tmp_path))
    strategy.roles = {1: "large", 2: "small"}
    replies = [
        reply(1, "big", {"w": np.array([1.0], dtype=np.float32)}, 100),
        reply(2, "small", {"w": np.array([4.0], dtype=np.float32)}, 300),
    ]
    merged = record_to_state(strategy.aggregate(1, replies))  # type: ignore[arg-type]
    assert merged["w"].item() == pytest.approx(expected)
    rows = [r for r in strategy.results.rows if r["kind"] == "fedhelp-aggregate"]  # type: ignore[union-attr]
    assert [r["uploaded"] for r in rows] == ["proxy", "surrogate"]


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"num-classes": 2, "rank-k": 2}, "fedhelp.rank-k"),
        ({"model": "logreg", "data-source": "heart-disease"}, "fedhelp.large-model"),
    ],
)
def test_impossible_options_are_refused_at_the_coordinator(
    shared: dict[str, Any], options: dict[str, Any], fragment: str
) -> None:
    renamed = {
        (k if k in ("num-classes", "model", "data-source") else f"fedhelp.{k}"): v
        for k, v in options.items()
    }
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        FedHelpStrategy(make_run(shared, **renamed))
