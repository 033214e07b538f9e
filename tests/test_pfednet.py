"""pFedNet protocol: layer split, hospital-side state, and whole rounds (two declared
exchanges through the round engine) with the real ClientApp handler on an in-process grid
(the Flower transport is the e2e test's job). Decision IDs: docs/pfednet.md#decisions.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import MessageType
from harness import ScriptedGrid, rows_of, run, synthetic_nodes

from fedclinic.config import parse_hospital_config
from fedclinic.data import DataRequest, load_hospital_data
from fedclinic.datasets import SHARED
from fedclinic.engine import Reply, RoundEngine
from fedclinic.engine.exchange import Transport
from fedclinic.errors import ConfigError, IntegrityError
from fedclinic.models import build_model
from fedclinic.serialization import file_sha256, state_to_record
from fedclinic.site import SiteState
from strategies import load_run_config
from strategies import pfednet_math as pm
from strategies.base import ClientContext
from strategies.pfednet import (
    DEPLOYED_STATE,
    MARKER,
    PERSONAL_STATE,
    LayerSplit,
    PFedNetObjective,
    PFedNetStrategy,
)

HEART = SHARED / "heart_disease"


def run_config(**extra: Any) -> dict[str, Any]:
    return {
        "algorithm": "pfednet",
        "rounds": 2,
        "min-hospitals": 2,
        "batch-size": 16,
        "seed": 3,
        "run-name": "test",
        **extra,
    }


# ------------------------------------------------------------------------------ layer split


def test_default_split_personalises_the_head() -> None:
    run = load_run_config(run_config(model="cnn"))
    split = LayerSplit.of(build_model(run), run)
    assert split.personal == ("classifier.weight", "classifier.bias")
    assert "features.0.weight" in split.shared and split.buffers == ()
    run = load_run_config(run_config(model="logreg"))
    split = LayerSplit.of(build_model(run), run)
    assert split.personal == ("linear.weight", "linear.bias") and split.shared == ()


def test_split_option_globs_and_errors() -> None:
    run = load_run_config(run_config(**{"pfednet.personal-layers": "features.8*, classifier."}))
    split = LayerSplit.of(build_model(run), run)
    assert split.personal == (
        "features.8.weight",
        "features.8.bias",
        "classifier.weight",
        "classifier.bias",
    )
    run = load_run_config(run_config(**{"pfednet.personal-layers": "fc."}))
    with pytest.raises(ConfigError, match=r"'fc\.' matches no parameter"):
        LayerSplit.of(build_model(run), run)


@pytest.mark.parametrize("model_name", ["resnet18", "resnet101"])
def test_resnet_split_keeps_batchnorm_buffers_shared(model_name: str) -> None:
    run = load_run_config(run_config(model=model_name))
    model = build_model(run)
    split = LayerSplit.of(model, run)
    assert split.personal == ("fc.weight", "fc.bias")
    assert "bn1.running_mean" in split.buffers and "bn1.weight" in split.shared
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    flat = split.flatten(state, split.personal)
    back = split.unflatten(flat, split.personal, state)
    np.testing.assert_array_equal(back["fc.weight"], state["fc.weight"])


def test_sketch_epsilon_needs_label_ratio() -> None:
    from strategies.pfednet import resolve_sketch

    assert resolve_sketch(load_run_config(run_config(model="logreg"))) == "label-ratio"
    assert resolve_sketch(load_run_config(run_config())) == "covariance"
    with pytest.raises(ConfigError, match=r"pfednet\.sketch-epsilon"):
        resolve_sketch(load_run_config(run_config(**{"pfednet.sketch-epsilon": 1.0})))


# ------------------------------------------------------------------------- hospital state


def objective_for(tmp_path: Path, name: str, **options: Any) -> PFedNetObjective:
    run = load_run_config(run_config(model="logreg", **{"data-source": "heart-disease", **options}))
    hospital = parse_hospital_config(
        {
            "hospital": name,
            "data-source": "heart-disease",
            "data-path": str(HEART / "processed.hungarian.data"),
            "device": "cpu",
        }
    )
    context = ClientContext(
        run=run,
        hospital=hospital,
        data=load_hospital_data(DataRequest(run, hospital)),
        device=torch.device("cpu"),
        site=SiteState(tmp_path / name),
        server_round=1,
        server_config={},
    )
    return PFedNetObjective(context)


@pytest.mark.skipif(not HEART.is_dir(), reason="heart-disease files not present")
def test_personal_state_persists_and_is_used_without_a_column(tmp_path: Path) -> None:
    run = load_run_config(run_config(model="logreg"))
    base = {k: v.clone() for k, v in build_model(run, seed=0).state_dict().items()}
    mine = {k: v + 1.0 for k, v in base.items()}
    marker = torch.from_numpy(np.frombuffer(b"site-a", dtype=np.uint8).copy())

    # the server's column for this hospital is stored at the site
    state, own = objective_for(tmp_path, "site-a").resolve({**mine, MARKER: marker})
    assert own and MARKER not in state
    saved = SiteState(tmp_path / "site-a").load(PERSONAL_STATE)
    torch.testing.assert_close(saved["linear.weight"], mine["linear.weight"])

    # a later message without this hospital's column (e.g. an unidentified restarted
    # node) gets the stored column back instead of the received one
    state, own = objective_for(tmp_path, "site-a").resolve(base)
    assert not own
    torch.testing.assert_close(state["linear.weight"], mine["linear.weight"])

    # a column marked for another hospital (a message built for site-b: the engine once
    # handed one hospital's record to another) is refused in one line; nothing is kept
    other = torch.from_numpy(np.frombuffer(b"site-b", dtype=np.uint8).copy())
    stored = SiteState(tmp_path / "site-a").versions(PERSONAL_STATE)
    sha = {r: file_sha256(f) for r, f in stored.items()}
    refused = "column of hospital 'site-b', not of 'site-a' (meant for another hospital); refused"
    with pytest.raises(IntegrityError, match=re.escape(refused) + "$"):
        objective_for(tmp_path, "site-a").resolve({**base, MARKER: other})
    assert {r: file_sha256(f) for r, f in stored.items()} == sha
    assert SiteState(tmp_path / "site-a").versions(DEPLOYED_STATE) == {}

    # outside the graph the locally trained z is kept (FedPer-like) and G is uploaded
    objective = objective_for(tmp_path, "site-a", **{"pfednet.compression": "none"})
    state, own = objective.resolve(base)
    update = objective.personal_phase(state, own)
    after = SiteState(tmp_path / "site-a").load(PERSONAL_STATE)
    g = update.state["personal.delta"].double().numpy()
    expected = mine["linear.weight"].double().reshape(-1) - after["linear.weight"].double().reshape(
        -1
    )
    np.testing.assert_allclose(g[:13], expected.numpy(), atol=1e-6)
    assert np.abs(g).sum() > 0

    # with fused-stc the same update travels as ternary codes that decode to G's shape
    objective = objective_for(tmp_path, "site-a", **{"pfednet.compression": "fused-stc"})
    update = objective.personal_phase(*objective.resolve(base))
    arrays = {k: v.numpy() for k, v in update.state.items()}
    assert set(arrays) == {"personal.codes", "personal.levels", "personal.length"}
    decoded = pm.decode_update(arrays, "personal.", 14)
    assert len(np.unique(decoded)) <= 3 and np.abs(decoded).sum() > 0


# ---------------------------------------------------------------- rounds with an in-process grid


def run_rounds(
    tmp_path: Path, flat: dict[str, Any], nodes: dict[int, dict[str, Any]], **grid: Any
) -> tuple[PFedNetStrategy, ScriptedGrid, list[dict[str, Any]]]:
    fake = ScriptedGrid(nodes, flat, **grid)
    engine, _ = run(flat, fake, tmp_path / "out")
    assert isinstance(engine.algorithm, PFedNetStrategy)
    return engine.algorithm, fake, rows_of(tmp_path / "out")


@pytest.mark.usefixtures("task_identity")
def test_cnn_rounds_restart_and_compression(tmp_path: Path, task_identity: None) -> None:
    flat = run_config(
        model="cnn",
        **{
            "local-steps": 2,
            "pfednet.compression": "stc",
            "pfednet.fusion-lambda": 0.001,
            "pfednet.allow-rank-deficient-sketch": True,  # 28 images of 784 pixels each
        },
    )
    nodes = synthetic_nodes(tmp_path, 3)
    # hospital-b (node 101) restarts between rounds 1 and 2 (after the setup query and round
    # 1's shared and personal exchanges): it returns as node 901
    strategy, fake, rows = run_rounds(tmp_path, flat, nodes, renumber=(3, 101, 901))
    names = ["hospital-a", "hospital-b", "hospital-c"]
    assert strategy.graph is not None and list(strategy.graph.hospitals) == names
    assert strategy.graph.edges == ((0, 1), (0, 2), (1, 2))  # k = 3 capped at N - 1 = 2

    # exchanges: setup query; per round shared + personal; the restarted node is asked
    # its name once; then the final evaluation
    kinds = [kind for kind, _ in fake.log]
    assert kinds.count(MessageType.QUERY) == 3 + 1 and (MessageType.QUERY, 901) in fake.log
    assert kinds.count(MessageType.TRAIN) == 2 * 2 * 3
    assert kinds.count(MessageType.EVALUATE) == 3

    # every hospital evaluates its own personalised model each round
    evaluations = [r for r in rows if r["kind"] == "evaluate"]
    assert len(evaluations) == 3 * 3 and {r["model"] for r in evaluations} == {"personal"}
    phases = sorted(r["phase"] for r in rows if r["kind"] == "train")
    assert phases == ["personal"] * 6 + ["shared"] * 6

    # the site keeps exactly the column the server holds, also for the restarted hospital
    for index, name in enumerate(names):
        personal = _site_personal(tmp_path, name)
        column = strategy.split.flatten(personal, strategy.split.personal)
        np.testing.assert_allclose(column, strategy.columns[:, index], atol=1e-6)
    assert not np.allclose(strategy.columns[:, 0], strategy.columns[:, 1])  # personalised

    # byte accounting: one row per round per hospital, compressed uploads beside FedAvg's
    traffic = [r for r in rows if r["kind"] == "communication"]
    per_round = {(r["round"], r["hospital"]) for r in traffic if 1 <= r["round"] <= 2}
    assert per_round == {(r, n) for r in (1, 2) for n in names}
    for row in (r for r in traffic if 1 <= r["round"] <= 2):
        assert row["compression"] == "stc"
        assert 0 < row["personal_upload_bytes"] < row["shared_upload_bytes"]
        assert row["upload_bytes"] == row["shared_upload_bytes"] + row["personal_upload_bytes"]
        assert row["upload_bytes"] < row["fedavg_upload_bytes"] / 4  # ternary + DEFLATE
        # two messages, the second without the column the hospital holds (personal_wire)
        fedavg = row["fedavg_download_bytes"]
        assert fedavg < row["download_bytes"] < 2 * fedavg
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["pfednet"]["edges"] == [[a, b] for a, b in (names[:2], names[::2], names[1:])]
    assert set(summary["hospitals"]) == set(names)
    admm = [r for r in rows if r["kind"] == "pfednet-admm"]
    assert [r["eta"] for r in admm] == [3.0, 3.0]  # PF-2: eta = N by default


def _site_personal(tmp_path: Path, name: str) -> dict[str, torch.Tensor]:
    """The hospital's stored personalised parameters (the state dir is shared in the test)."""
    matches = list((tmp_path / "state").rglob(f"{PERSONAL_STATE}.round-*.pt"))
    for path in matches:
        if name in path.parts:
            return SiteState(path.parent).load(PERSONAL_STATE)  # the newest version
    raise AssertionError(f"no personal state for {name} among {matches}")


@pytest.mark.usefixtures("task_identity")
@pytest.mark.skipif(not HEART.is_dir(), reason="heart-disease files not present")
def test_logreg_heart_disease_single_exchange_rounds(tmp_path: Path) -> None:
    flat = run_config(
        model="logreg",
        **{"data-source": "heart-disease", "learning-rate": 0.05, "pfednet.fusion-lambda": 0.0},
    )
    nodes = {
        200 + i: {
            "hospital": centre,
            "data-source": "heart-disease",
            "data-path": str(HEART / f"processed.{centre}.data"),
            "device": "cpu",
            "state-dir": str(tmp_path / "state" / centre),
        }
        for i, centre in enumerate(["cleveland", "hungarian"])
    }
    strategy, fake, rows = run_rounds(tmp_path, flat, nodes)
    kinds = [kind for kind, _ in fake.log]
    assert kinds.count(MessageType.TRAIN) == 2 * 2  # no shared part: one exchange per round
    assert {r["phase"] for r in rows if r["kind"] == "train"} == {"personal"}
    graph = next(r for r in rows if r["kind"] == "pfednet-graph")
    assert graph["sketch"] == "label-ratio" and graph["edges"] == [["cleveland", "hungarian"]]
    # lambda = 0 and eta = N: each column is exactly that hospital's local result
    for index, centre in enumerate(["cleveland", "hungarian"]):
        personal = _site_personal(tmp_path, centre)
        column = strategy.split.flatten(personal, strategy.split.personal)
        np.testing.assert_allclose(column, strategy.columns[:, index], atol=1e-6)
    assert not np.allclose(strategy.columns[:, 0], strategy.columns[:, 1])
    assert all(
        r["upload_bytes"] > 0 for r in rows if r["kind"] == "communication" and r["round"] <= 2
    )


@pytest.mark.usefixtures("task_identity")
def test_label_sketch_graph_from_counts(tmp_path: Path) -> None:
    """The server divides class counts by the federation's total (convex code) and links
    hospitals with similar label ratios (the setup query through the engine)."""
    flat = run_config(**{"pfednet.knn-k": 1, "pfednet.sketch": "label-ratio"})
    nodes = synthetic_nodes(tmp_path, 4)
    nodes[101]["class-priors"] = "0.75,0.25"  # a and b alike, c and d alike
    nodes[103]["class-priors"] = "0.25,0.75"
    run = load_run_config(flat)
    strategy = PFedNetStrategy(run)
    engine = RoundEngine(run, strategy, None, site_key="test")
    initial = state_to_record(build_model(run, seed=0).state_dict())
    engine.setup(Transport(ScriptedGrid(nodes, flat)), initial)
    assert strategy.graph is not None
    assert strategy.graph.named_edges() == [
        ["hospital-a", "hospital-b"],
        ["hospital-c", "hospital-d"],
    ]
    np.testing.assert_array_equal(strategy.graph.q, pm.incidence_matrix(4, [(0, 1), (2, 3)]))


def test_covariance_graph_uses_the_full_matrix_l1_distance() -> None:
    """PF-1: a hospital sends the upper triangle of its pixel covariance; the graph's distance
    is the L1 distance of the full symmetric matrices (each off-diagonal entry counts twice,
    as in the deep code), recomputed here from the matrices. The four 2x2 covariances are
    chosen so that the triangles' plain L1 distance would link other hospitals (a-c, b-d)."""
    run = load_run_config(run_config(**{"pfednet.knn-k": 1}))
    strategy = PFedNetStrategy(run)
    triangles = {"a": [0.0, 0.0, 0.0], "b": [3.0, 0.0, 0.0], "c": [0.0, 2.0, 0.0]}
    triangles["d"] = [3.0, 2.0, 0.0]  # (s_00, s_01, s_11)
    replies = [
        Reply(node_id=i + 1, hospital=name, arrays=None, metrics={"sketch": t}, info={})
        for i, (name, t) in enumerate(triangles.items())
    ]
    strategy.setup(replies, state_to_record(build_model(run, seed=0).state_dict()))

    full = {n: np.array([[t[0], t[1]], [t[1], t[2]]]) for n, t in triangles.items()}
    names = sorted(full)
    nearest = {  # k = 1, no ties in this case
        n: min((m for m in names if m != n), key=lambda m: np.abs(full[n] - full[m]).sum())
        for n in names
    }
    expected = sorted({tuple(sorted(pair)) for pair in nearest.items()})
    assert expected == [("a", "b"), ("c", "d")]
    assert strategy.graph is not None
    assert strategy.graph.named_edges() == [list(pair) for pair in expected]
