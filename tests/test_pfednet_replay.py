"""pFedNet's two local phases and the shared average, replayed by hand (docs/pfednet.md;
arXiv 2306.14483): the shared phase trains the feature layers with the head frozen and
uploads ``x(before) - x(after)``; the personal phase trains the head with the features
frozen and uploads ``G = z(before) - z(after)``; the server moves ``x`` by the
sample-weighted mean of the hospitals' pseudo-gradients (and averages the shared buffers with
the same weights), and without fusion its personal step leaves each column at the hospital's
own ``z - G`` (PF-2's default eta = N)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from by_hand import (
    assert_same_update,
    clone_state,
    full_batch_run,
    hospital_context,
    sgd_step,
    supervised,
)

from fedclinic.config import RunConfig
from fedclinic.engine import Reply
from fedclinic.models import build_model
from fedclinic.serialization import numpy_to_record
from strategies import pfednet_math as pm
from strategies.pfednet import LayerSplit, PFedNetObjective, PFedNetStrategy

torch.set_num_threads(1)

LR = 0.2
HEAD = "classifier."  # the cnn's personalised component by default


def make_run(local_loss: str = "bsm") -> RunConfig:
    return full_batch_run("pfednet", LR, **{"local-steps": 2, "pfednet.local-loss": local_loss})


def make_objective(run: RunConfig, tmp_path: Path) -> PFedNetObjective:
    return PFedNetObjective(hospital_context(run, tmp_path))


def flat_delta(
    before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], personal: bool
) -> torch.Tensor:
    keys = [k for k in before if k.startswith(HEAD) == personal]
    return torch.cat([(before[k] - after[k]).reshape(-1) for k in keys])


@pytest.mark.parametrize("local_loss", ["bsm", "ce"])
@pytest.mark.parametrize("phase", ["shared", "personal"])
def test_each_phase_trains_only_its_layers_and_uploads_before_minus_after(
    phase: str, local_loss: str, tmp_path: Path
) -> None:
    """Both phases on the balanced softmax (the default; imbalanced classes make it differ
    from CE) and on plain CE."""
    run = make_run(local_loss)
    objective = make_objective(run, tmp_path)
    net = build_model(run, seed=5)
    received = clone_state(net)
    if phase == "shared":
        update = objective.fit(received)
    else:
        update = objective.personal_phase(*objective.resolve(received))
    x, y = objective.context.data.train.inputs, objective.context.data.train.labels
    trained = [p for n, p in net.named_parameters() if n.startswith(HEAD) == (phase == "personal")]
    for _ in range(run.local_steps):
        sgd_step(trained, supervised(local_loss, net(x), y), LR)
    expected = flat_delta(received, clone_state(net), personal=phase == "personal")
    uploaded = update.state[f"{phase}.delta"]
    zero = torch.zeros_like(expected)
    assert_same_update({"delta": zero}, {"delta": uploaded}, {"delta": expected})
    assert update.info["phase"] == phase


def test_shared_layers_move_by_the_sample_weighted_mean_of_the_updates() -> None:
    """``x <- x - sum_n (n_n / n) g_n``: hospitals of 30 and 10 samples weigh 3:1."""
    run = make_run()
    strategy = PFedNetStrategy(run)
    state = {k: v.numpy().copy() for k, v in build_model(run, seed=0).state_dict().items()}
    strategy.state = {k: v.copy() for k, v in state.items()}
    shared = [k for k in state if not k.startswith(HEAD)]
    size = sum(state[k].size for k in shared)
    rng = np.random.default_rng(0)
    updates = [rng.normal(size=size).astype(np.float32) for _ in range(2)]
    replies = [
        Reply(
            node_id=node,
            hospital=name,
            arrays=numpy_to_record({"shared.delta": update}),
            metrics={"num_train": count, "num-examples": count},
            info={},
        )
        for node, name, count, update in zip((1, 2), ("a", "b"), (30, 10), updates, strict=True)
    ]
    strategy._apply_shared(1, replies)
    step = 0.75 * updates[0].astype(np.float64) + 0.25 * updates[1].astype(np.float64)
    offset = 0
    for key in shared:
        count = state[key].size
        expected = state[key].reshape(-1) - step[offset : offset + count]
        np.testing.assert_allclose(strategy.state[key].reshape(-1), expected, rtol=1e-5, atol=1e-6)
        offset += count
    for key in state:
        if key.startswith(HEAD):  # the personal layers are the ADMM's, not the average's
            np.testing.assert_array_equal(strategy.state[key], state[key])


def test_shared_buffers_are_the_sample_weighted_mean_of_the_hospitals_buffers() -> None:
    """Buffers (BatchNorm running statistics) are shared: the server takes their mean weighted
    by training-set size like the shared step (30 and 10 samples: 3:1), and rounds integer
    counters."""
    strategy = PFedNetStrategy(make_run())
    strategy.split = LayerSplit(
        personal=("head.weight",),
        shared=("body.weight",),
        buffers=("norm.running_mean", "norm.num_batches_tracked"),
        shapes={
            "head.weight": (2,),
            "body.weight": (3,),
            "norm.running_mean": (2,),
            "norm.num_batches_tracked": (),
        },
    )
    strategy.state = {
        "head.weight": np.zeros(2, np.float32),
        "body.weight": np.zeros(3, np.float32),
        "norm.running_mean": np.zeros(2, np.float32),
        "norm.num_batches_tracked": np.array(0, np.int64),
    }
    uploads = (("a", 30, [1.0, 2.0], 10), ("b", 10, [5.0, -6.0], 22))
    replies = [
        Reply(
            node_id=node,
            hospital=name,
            arrays=numpy_to_record(
                {
                    "shared.delta": np.zeros(3, np.float32),
                    "buffer.norm.running_mean": np.array(mean, np.float32),
                    "buffer.norm.num_batches_tracked": np.array(batches, np.int64),
                }
            ),
            metrics={"num_train": count, "num-examples": count},
            info={},
        )
        for node, (name, count, mean, batches) in enumerate(uploads, start=1)
    ]
    strategy._apply_shared(1, replies)
    np.testing.assert_allclose(strategy.state["norm.running_mean"], [2.0, 0.0])  # .75 a + .25 b
    assert int(strategy.state["norm.num_batches_tracked"]) == 13  # rint(7.5 + 5.5)


def test_without_fusion_each_column_takes_its_own_full_local_step() -> None:
    """PF-2: the server step size eta is N by default, so with lambda = 0 the server's step
    ``Z <- Z_t - (eta / N) G`` leaves each hospital's column at ``z_n - G_n``, the head it
    trained itself (docs/pfednet.md), whatever the graph."""
    run = full_batch_run("pfednet", LR, **{"pfednet.fusion-lambda": 0.0, "pfednet.knn-k": 1})
    strategy = PFedNetStrategy(run)
    state = {k: v.numpy().copy() for k, v in build_model(run, seed=0).state_dict().items()}
    strategy.state = state
    names = ("a", "b", "c")
    strategy.graph = pm.Graph.build(names, np.array([[0, 1, 2], [1, 0, 1], [2, 1, 0]]), 1)
    z = np.concatenate([state[k].reshape(-1) for k in state if k.startswith(HEAD)])
    strategy.columns = np.repeat(z[:, None].astype(np.float64), len(names), axis=1)
    rng = np.random.default_rng(1)
    updates = [rng.normal(size=z.size) for _ in names]
    replies = [
        Reply(
            node_id=node,
            hospital=name,
            arrays=numpy_to_record({"personal.delta": update.astype(np.float32)}),
            metrics={"num_train": 10 * node, "num-examples": 10 * node},
            info={},
        )
        for node, (name, update) in enumerate(zip(names, updates, strict=True), start=1)
    ]
    strategy._apply_personal(1, replies)
    for column, update in enumerate(updates):
        expected = z - update.astype(np.float32)
        np.testing.assert_allclose(strategy.columns[:, column], expected, rtol=1e-5, atol=1e-6)
