"""Secure aggregation (SecAgg+, fedclinic.secagg and fedclinic.engine.secagg): the coordinator
gets the sample-weighted mean of the hospitals' updates within the quantisation error, and
from each hospital only a vector that looks random; dropouts within the threshold are
recovered, beyond it the round fails with the reason; DP composes; bad settings are refused
before anything starts.

Whole runs go through the real ClientApp handler on the in-process grid (tests/harness.py).
The expected models are computed here by hand from a plain FedAvg run of the same
federation (same seeds, so each hospital trains the same local model): the mean
``sum_k n_k w_k / sum_k n_k`` of its replies, independent of the secure path.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from harness import CoordinatorCrash, FakeClock, ScriptedGrid, rows_of, run, synthetic_nodes

from client.app import answer
from fedclinic import messages as keys
from fedclinic import secagg
from fedclinic.bench.grid import task_identity as in_process_identity
from fedclinic.checkpoint import load as load_checkpoint
from fedclinic.errors import ConfigError, FedClinicError
from fedclinic.knowledge import build_knowledge, write_synthetic_public
from fedclinic.models import build_model
from fedclinic.privacy import LEDGER
from fedclinic.serialization import record_to_numpy, state_to_record, unpacked
from strategies import load_run_config

CLIPPING, LEVELS = 8.0, 2**22
#: the largest error per entry of the dequantised weighted mean: one quantisation step
STEP = 2 * CLIPPING / LEVELS
HOSPITALS = {100: "hospital-a", 101: "hospital-b", 102: "hospital-c"}


def fedavg(**extra: Any) -> dict[str, Any]:
    return {
        "algorithm": "fedavg",
        "model": "cnn",
        "rounds": 1,
        "local-steps": 2,
        "batch-size": 16,
        "seed": 3,
        "min-hospitals": 2,
        "round-timeout": 20.0,
        **extra,
    }


def secure(**extra: Any) -> dict[str, Any]:
    return fedavg(**{"secure-aggregation": True, **extra})


def lost_training(node: int) -> list[tuple[int, str, int, int]]:
    """Every copy of round 1's training message to ``node``: it drops after sharing keys."""
    return [(1, "train", node, attempt) for attempt in (1, 2, 3)]


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One plain FedAvg round: the global model sent, each hospital's model and n_k."""
    folder = tmp_path_factory.mktemp("plain")
    flat = fedavg()
    grid = ScriptedGrid(synthetic_nodes(folder, 3), flat)
    with in_process_identity():
        engine, result = run(flat, grid, clock=FakeClock())
    sent = record_to_numpy(state_to_record(engine.algorithm.initial_state()))
    replies = {node: grid.answers[(1, "train", node, 1)] for node in HOSPITALS}
    return {
        "sent": sent,
        "models": {
            n: record_to_numpy(unpacked(m.content.array_records["arrays"]))
            for n, m in replies.items()
        },
        "weights": {n: int(m.content["metrics"][keys.NUM_TRAIN]) for n, m in replies.items()},
        "result": record_to_numpy(result.arrays),
    }


def mean_by_hand(plain: dict[str, Any], nodes: list[int]) -> dict[str, np.ndarray]:
    """``sum_k n_k w_k / sum_k n_k`` over ``nodes``, in float64."""
    total = sum(plain["weights"][n] for n in nodes)
    return {
        key: sum(plain["weights"][n] * plain["models"][n][key].astype(np.float64) for n in nodes)
        / total
        for key in plain["sent"]
    }


def assert_within_quantisation(ours: dict[str, np.ndarray], expected: dict[str, np.ndarray]):
    assert ours.keys() == expected.keys()
    for key, value in expected.items():
        error = np.abs(ours[key].astype(np.float64) - value).max()
        assert error <= STEP + 1e-6 * max(1.0, float(np.abs(value).max())), key


# ------------------------------------------------------------------------------ arithmetic


def test_weighted_quantised_mean_by_hand() -> None:
    """Two updates, weights 3 and 1: the dequantised mean is (3u + v) / 4 within one
    quantisation step; an entry beyond the clipping range counts as the range."""
    u = {"w": np.array([0.5, -1.0, 9.0])}
    v = {"w": np.array([-0.5, 1.0, 0.0])}
    a, clipped_a = secagg.quantise_weighted(u, 3, CLIPPING, LEVELS, bytes(32))
    b, clipped_b = secagg.quantise_weighted(v, 1, CLIPPING, LEVELS, bytes(range(32)))
    assert clipped_a == pytest.approx(1 / 3) and clipped_b == 0.0
    secagg.add(a, b)
    mean, weight = secagg.dequantise_mean(a, CLIPPING, LEVELS)
    assert weight == 4
    np.testing.assert_allclose(mean["w"], [(1.5 - 0.5) / 4, (-3 + 1) / 4, 3 * 8.0 / 4], atol=STEP)


def test_pairwise_masks_cancel_and_look_uniform() -> None:
    """x + m (mod 2^64) from one side and y - m from the other sum to x + y; the masks are
    spread over the whole range (AES-CTR keystream) and the seed is symmetric (ECDH)."""
    first, second = secagg.SiteSecrets(1), secagg.SiteSecrets(1)
    secagg._setup(first)
    secagg._setup(second)
    seed = secagg.pair_seed(secagg._unb64(first.sk1), secagg._unb64(second.pk1))
    assert seed == secagg.pair_seed(secagg._unb64(second.sk1), secagg._unb64(first.pk1))
    shapes = {"w": (1000,)}
    m = secagg.mask(seed, shapes)["w"]
    assert 0.45 < float(np.mean(m / 2.0**64)) < 0.55
    x = {"w": np.full(1000, 7, dtype=np.uint64)}
    y = {"w": np.full(1000, 5, dtype=np.uint64)}
    secagg.add(x, {"w": m})
    secagg.add(y, {"w": m}, -1)
    secagg.add(x, y)
    assert (x["w"] == 12).all()


def test_a_hospital_reveals_never_both_shares_of_one_neighbour(tmp_path: Path) -> None:
    """A hospital's side alone: keys, shares for three neighbours, a masked upload; then
    an unmask that asks for the seed share and the key share of the same neighbour is
    refused, and so is the same stage asked again with other inputs, and a new session of
    a round already unmasked."""
    sites = {i: tmp_path / f"site-{i}" for i in (1, 2, 3)}
    public = {i: secagg.site_stage(d, 1, {keys.SECAGG_STAGE: "setup"}) for i, d in sites.items()}
    shares = {}
    for i, directory in sites.items():
        shares[i] = secagg.site_stage(
            directory,
            1,
            {
                keys.SECAGG_STAGE: "share-keys",
                keys.SECAGG_ID: i,
                keys.SECAGG_IDS: [1, 2, 3],
                keys.SECAGG_PK1: [public[j][keys.SECAGG_PK1] for j in (1, 2, 3)],
                keys.SECAGG_PK2: [public[j][keys.SECAGG_PK2] for j in (1, 2, 3)],
                keys.SECAGG_THRESHOLD: 2,
            },
        )
    inbox = [
        (src, ct)
        for src, given in shares.items()
        for dst, ct in zip(
            given[keys.SECAGG_DESTINATIONS], given[keys.SECAGG_CIPHERTEXTS], strict=True
        )
        if dst == 1
    ]
    collect = {
        keys.SECAGG_STAGE: "collect",
        keys.SECAGG_THRESHOLD: 2,
        keys.SECAGG_CLIPPING: CLIPPING,
        keys.SECAGG_LEVELS: LEVELS,
        keys.SECAGG_SOURCES: [s for s, _ in inbox],
        keys.SECAGG_CIPHERTEXTS: [c for _, c in inbox],
    }
    update = {"w": np.linspace(-1, 1, 50)}
    first = secagg.masked_update(sites[1], 1, collect, update, 10)
    again = secagg.masked_update(sites[1], 1, collect, update, 10)  # a repeated message
    np.testing.assert_array_equal(first["w"], again["w"])
    with pytest.raises(secagg.SecAggError, match="both kinds of share"):
        secagg.site_stage(
            sites[1],
            1,
            {keys.SECAGG_STAGE: "unmask", keys.SECAGG_ACTIVE: [1, 2], keys.SECAGG_DEAD: [2, 3]},
        )
    unmask = {keys.SECAGG_STAGE: "unmask", keys.SECAGG_ACTIVE: [1, 2], keys.SECAGG_DEAD: [3]}
    given = secagg.site_stage(sites[1], 1, unmask)
    assert given[keys.SECAGG_OWNERS] == [1, 2, 3]
    assert secagg.site_stage(sites[1], 1, unmask) == given  # asked again: the same answer
    with pytest.raises(secagg.SecAggError, match="asked again with other inputs"):
        secagg.site_stage(
            sites[1],
            1,
            {keys.SECAGG_STAGE: "unmask", keys.SECAGG_ACTIVE: [1, 2, 3], keys.SECAGG_DEAD: []},
        )
    state = json.loads((sites[1] / "secagg" / "round-1.json").read_text())
    assert state["sk1"] == state["sk2"] == state["seed"] == ""  # gone after the unmask
    assert (sites[1] / "secagg" / "round-1.json").stat().st_mode & 0o077 == 0
    # a restarted coordinator's new session: fresh keys where nothing was unmasked yet,
    # refused where this round's sum was already revealed
    restart = {keys.SECAGG_STAGE: "setup", keys.SECAGG_SESSION: "after-a-crash"}
    assert secagg.site_stage(sites[2], 1, restart) != public[2]
    assert secagg.site_stage(sites[3], 1, {keys.SECAGG_STAGE: "setup"}) == public[3]  # re-sent
    with pytest.raises(secagg.SecAggError, match="already unmasked in another session"):
        secagg.site_stage(sites[1], 1, restart)


# ------------------------------------------------------------------------------ whole runs


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("secured")
    flat = secure()
    grid = ScriptedGrid(synthetic_nodes(folder, 3), flat)
    with in_process_identity():
        engine, result = run(flat, grid, folder / "out", clock=FakeClock())
    return {"grid": grid, "engine": engine, "result": result, "out": folder / "out"}


def test_the_secure_aggregate_is_fedavg_within_the_quantisation_error(
    plain: dict[str, Any], secured: dict[str, Any]
) -> None:
    expected = mean_by_hand(plain, list(HOSPITALS))
    assert_within_quantisation(plain["result"], expected)  # the plain path, for reference
    assert_within_quantisation(record_to_numpy(secured["result"].arrays), expected)
    summary = json.loads((secured["out"] / "summary.json").read_text())
    assert summary["privacy"]["secure_aggregation"] is True
    assert summary["privacy"]["secagg_clipping_range"] == CLIPPING
    (entry,) = summary["secure_aggregation_rounds"]
    assert entry["summed"] == sorted(HOSPITALS.values()) and entry["recovered"] == []
    assert entry["total_weight"] == sum(plain["weights"].values()) and entry["threshold"] == 2


def test_the_coordinator_receives_no_hospital_s_update(
    plain: dict[str, Any], secured: dict[str, Any]
) -> None:
    """What the ServerApp got from each hospital in the training exchange: uint64 vectors
    uncorrelated with that hospital's update and spread over the whole range; the key
    stages carry no arrays; nothing the coordinator stored holds an update."""
    grid = secured["grid"]
    for node in HOSPITALS:
        received = record_to_numpy(grid.answers[(1, "train", node, 1)].content["arrays"])
        assert set(received) == {*plain["sent"], secagg.WEIGHT_ENTRY}
        update = np.concatenate(
            [(plain["models"][node][k] - plain["sent"][k]).ravel() for k in plain["sent"]]
        ).astype(np.float64)
        masked = np.concatenate([received[k].ravel() for k in plain["sent"]])
        assert masked.dtype == np.uint64
        assert abs(np.corrcoef(masked.astype(np.float64), update)[0, 1]) < 0.05
        assert 0.45 < float(np.mean(masked / 2.0**64)) < 0.55
        assert int(received[secagg.WEIGHT_ENTRY][0]) != plain["weights"][node]
        for stage in ("secagg-setup", "secagg-share-keys", "secagg-unmask"):
            assert not grid.answers[(1, stage, node, 1)].content.array_records
    engine = secured["engine"]
    assert engine.algorithm.current.total is None and engine.algorithm.sent == {}
    out = secured["out"]
    stored = b"".join(p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file())
    largest = max(plain["sent"], key=lambda k: plain["sent"][k].size)
    for node in HOSPITALS:  # the hospitals trained these same models under SecAgg
        model = plain["models"][node][largest]
        assert model.tobytes() not in stored
        assert (model - plain["sent"][largest]).tobytes() not in stored
    saved = load_checkpoint(out)
    assert set(saved.arrays) == set(plain["sent"])  # the global model only
    assert saved.strategy["algorithm"]["history"][0]["round"] == 1


def test_a_hospital_dropping_after_its_keys_is_recovered(
    tmp_path: Path, plain: dict[str, Any], task_identity: None
) -> None:
    """Hospital-b shares its keys, then never uploads: its pairwise masks are rebuilt from
    two of three shares (threshold 2) and the result is the mean of a and c."""
    flat = secure()
    grid = ScriptedGrid(synthetic_nodes(tmp_path, 3), flat, lose=lost_training(101))
    _, result = run(flat, grid, tmp_path / "out", clock=FakeClock())
    assert_within_quantisation(record_to_numpy(result.arrays), mean_by_hand(plain, [100, 102]))
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["secure_aggregation_rounds"][0]["recovered"] == ["hospital-b"]
    errors = [r for r in rows_of(tmp_path / "out") if r["kind"] == "error"]
    assert [r["hospital"] for r in errors] == ["hospital-b"]


def test_a_hospital_dropping_before_the_unmask_still_counts(
    tmp_path: Path, plain: dict[str, Any], task_identity: None
) -> None:
    """Hospital-b uploads its masked vector, then never answers the unmask stage: its own
    mask is rebuilt from the two others' shares of its seed, and its update is in the sum."""
    flat = secure()
    lose = [(1, "secagg-unmask", 101, attempt) for attempt in (1, 2, 3)]
    grid = ScriptedGrid(synthetic_nodes(tmp_path, 3), flat, lose=lose)
    _, result = run(flat, grid, tmp_path / "out", clock=FakeClock())
    assert_within_quantisation(record_to_numpy(result.arrays), mean_by_hand(plain, [*HOSPITALS]))


def test_a_dropout_beyond_the_threshold_fails_the_round_with_the_reason(
    tmp_path: Path, task_identity: None
) -> None:
    flat = secure(**{"secagg-reconstruction-threshold": 3})
    grid = ScriptedGrid(synthetic_nodes(tmp_path, 3), flat, lose=lost_training(101))
    with pytest.raises(FedClinicError) as caught:
        run(flat, grid, tmp_path / "out", clock=FakeClock())
    message = str(caught.value)
    assert message == (
        "secure aggregation: round 1 cannot be unmasked: only 2 of hospital-a's neighbours "
        "uploaded (hospital-b dropped after sharing keys); its secrets need 3 shares "
        "(secagg-reconstruction-threshold)"
    )
    audit = [json.loads(x) for x in (tmp_path / "out" / "audit.jsonl").read_text().splitlines()]
    assert audit[-1]["event"] == "run_end" and audit[-1]["status"] == "failed"


def test_dp_and_secure_aggregation_together(tmp_path: Path, task_identity: None) -> None:
    """DP-SGD at the sites under SecAgg: every hospital's ledger is charged, and one at its
    ceiling refuses to train after sharing its keys: a dropout the others' shares recover."""
    nodes = synthetic_nodes(tmp_path, 3)
    nodes[102]["privacy-epsilon"] = 0.01  # below one round's ε
    flat = secure(dp="dp-sgd", **{"dp-noise-multiplier": 1.5, "batch-size": 8})
    _, result = run(flat, ScriptedGrid(nodes, flat), tmp_path / "out", clock=FakeClock())
    assert result.arrays is not None
    for name in ("hospital-a", "hospital-b"):
        ledger = tmp_path / "state" / name / LEDGER
        assert len(ledger.read_text().splitlines()) == 1
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["privacy"]["dp"] == "dp-sgd" and summary["privacy"]["secure_aggregation"]
    assert summary["secure_aggregation_rounds"][0]["recovered"] == ["hospital-c"]
    errors = [r for r in rows_of(tmp_path / "out") if r["kind"] == "error"]
    assert [r["hospital"] for r in errors] == ["hospital-c"]
    assert errors[0]["reason"].startswith("privacy budget:")


@pytest.mark.parametrize(("crash_at", "completes"), [(7, True), (8, False)])
def test_a_resumed_coordinator_restarts_the_round_in_a_new_session(
    tmp_path: Path, task_identity: None, crash_at: int, completes: bool
) -> None:
    """Two rounds, four pushes each. The coordinator dies after round 2's masked uploads
    (push 7): resumed, it restarts round 2 with fresh keys and the run completes, close to
    an uninterrupted one. Dying after round 2's unmask shares were revealed (push 8), the
    hospitals refuse a second session of that round, and the resumed run fails saying so."""
    nodes = synthetic_nodes(tmp_path, 3)
    flat = secure(rounds=2, **{"run-name": "secagg-resume", "output-dir": str(tmp_path / "out")})
    with pytest.raises(CoordinatorCrash):
        run(flat, ScriptedGrid(nodes, flat, crash_at=crash_at), tmp_path / "out", clock=FakeClock())
    resumed = {**flat, "resume": True}
    if not completes:
        with pytest.raises(FedClinicError, match="fewer than min-hospitals"):
            run(resumed, ScriptedGrid(nodes, resumed), tmp_path / "out", clock=FakeClock())
        errors = [r for r in rows_of(tmp_path / "out") if r["kind"] == "error"]
        assert errors and all("already unmasked in another session" in r["reason"] for r in errors)
        return
    _, result = run(resumed, ScriptedGrid(nodes, resumed), tmp_path / "out", clock=FakeClock())
    other = {**flat, "output-dir": str(tmp_path / "uninterrupted")}
    fresh = synthetic_nodes(tmp_path / "fresh", 3)
    _, reference = run(
        other, ScriptedGrid(fresh, other), tmp_path / "uninterrupted", clock=FakeClock()
    )
    ours, theirs = record_to_numpy(result.arrays), record_to_numpy(reference.arrays)
    for key in theirs:  # stochastic rounding differs by session: within a few steps
        np.testing.assert_allclose(ours[key], theirs[key], atol=1e-3, err_msg=key)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [e["round"] for e in summary["secure_aggregation_rounds"]] == [1, 2]


def fedhelp_setting(folder: Path, aggregation: str) -> tuple[dict[str, Any], dict[int, Any]]:
    """One large and one small FedHelp hospital with public data and a knowledge file."""
    folder.mkdir(parents=True, exist_ok=True)
    public = write_synthetic_public(folder / "public.npz", 16, 2, seed=1000)
    np.save(folder / "api.npy", np.random.default_rng(0).normal(scale=2.0, size=(16, 2)))
    digest, _ = build_knowledge(public, folder / "knowledge.npz", logits_file=folder / "api.npy")
    flat = fedavg(
        algorithm="fedhelp",
        **{
            "fedhelp.large-model": "wide-cnn",
            "fedhelp.knowledge-sha256": digest,
            "fedhelp.aggregation": aggregation,
        },
    )
    nodes = synthetic_nodes(folder, 2)
    for node, role in zip(nodes.values(), ("large", "small"), strict=True):
        node.update(
            {"role": role, "public-data-path": str(public),
             "knowledge-path": str(folder / "knowledge.npz")}
        )  # fmt: skip
    return flat, nodes


@pytest.mark.parametrize("aggregation", ["mean", "weighted"])
def test_fedhelp_under_secure_aggregation_is_its_mean(
    tmp_path: Path, task_identity: None, aggregation: str
) -> None:
    """FedHelp's aggregate is a mean of the large hospital's proxy and the small one's
    surrogate (equal weights, or by training-set size): under SecAgg it is the same mean,
    by hand from the plain run's uploads, within one quantisation step; its per-hospital
    aggregation rows are still written."""
    flat, nodes = fedhelp_setting(tmp_path / "plain", aggregation)
    grid = ScriptedGrid(nodes, flat)
    engine, _ = run(flat, grid, clock=FakeClock())
    sent = record_to_numpy(state_to_record(engine.algorithm.initial_state()))
    models = {
        n: record_to_numpy(
            unpacked(grid.answers[(1, "train", n, 1)].content.array_records["arrays"])
        )
        for n in nodes
    }
    weights = {
        n: float(grid.answers[(1, "train", n, 1)].content["metrics"][keys.NUM_TRAIN])
        if aggregation == "weighted"
        else 1.0
        for n in nodes
    }
    expected = {
        key: sum(weights[n] * models[n][key].astype(np.float64) for n in nodes)
        / sum(weights.values())
        for key in sent
    }
    flat, nodes = fedhelp_setting(tmp_path / "secure", aggregation)
    flat = {**flat, "secure-aggregation": True}
    _, result = run(flat, ScriptedGrid(nodes, flat), tmp_path / "out", clock=FakeClock())
    assert_within_quantisation(record_to_numpy(result.arrays), expected)
    rows = [r for r in rows_of(tmp_path / "out") if r["kind"] == "fedhelp-aggregate"]
    assert sorted(r["role"] for r in rows) == ["large", "small"]


def test_a_hospital_never_uploads_in_the_clear_in_a_secure_run(
    tmp_path: Path, task_identity: None
) -> None:
    """A training message without the masked stage, in a run with secure aggregation (a
    coordinator that skips the protocol): the hospital answers one line and no arrays."""
    flat = secure(rounds=1)
    model = build_model(load_run_config(flat))
    content = RecordDict(
        {"arrays": state_to_record(model.state_dict()),
         "config": ConfigRecord({keys.SERVER_ROUND: 1})}
    )  # fmt: skip
    node = synthetic_nodes(tmp_path, 1)[100]
    context = Context(run_id=1, node_id=100, node_config=node, state=RecordDict(), run_config=flat)
    answered = answer(Message(content, dst_node_id=100, message_type="train"), context, True)
    assert not answered.content.array_records
    assert answered.content["info"]["error"] == (
        "secure aggregation: this run uploads masked updates only; a training message "
        "without the collect stage is refused"
    )


# ------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ({"algorithm": "fedmas"}, "not allowed with algorithm = 'fedmas': Fed-MAS weights"),
        ({"algorithm": "pfednet"}, "not allowed with algorithm = 'pfednet': pFedNet's ADMM"),
        ({"algorithm": "local-only"}, "nothing to aggregate"),
        ({"secagg-num-shares": 2}, "'secagg-num-shares' = 2 is not allowed"),
        ({"secagg-reconstruction-threshold": 1}, "one share would reveal"),
        (
            {"secagg-num-shares": 3, "secagg-reconstruction-threshold": 4},
            "cannot need more shares than there are",
        ),
        ({"secagg-clipping-range": 0.0}, "secagg-clipping-range"),
        ({"secagg-quantization-range": 2**31}, "secagg-quantization-range"),
        ({"secure-aggregation": "yes"}, "secure-aggregation"),
    ],
)
def test_bad_secure_aggregation_settings_are_refused(extra: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_run_config(secure(**extra))
    assert needle in str(caught.value) and "\n" not in str(caught.value)


def test_fedprox_is_accepted() -> None:
    assert load_run_config(secure(algorithm="fedprox")).secure_aggregation
