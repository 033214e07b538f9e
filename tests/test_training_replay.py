"""The shared local loop (FedAvg) and FedProx's proximal term, replayed by hand.

FedAvg: ``E`` steps of the task loss from the received model. FedProx: the same plus
``(mu/2) ||w - w_received||^2``, whose gradient ``mu (w - w_received)`` is zero at the first
step and pulls back towards the received model afterwards: two full-batch steps with a large
``mu`` tell a wrong sign or a wrong anchor apart from the right term.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from by_hand import assert_same_update, clone_state, full_batch_run, hospital_context, sgd_step
from torch.utils.data import DataLoader, TensorDataset

from fedclinic.config import RunConfig
from fedclinic.models import build_model
from fedclinic.training import OptimizerSettings, Updater
from strategies import get_algorithm
from strategies.base import ClientContext

torch.set_num_threads(1)

LR = 0.2
MU = 2.0


def make_run(algorithm: str, **extra: Any) -> RunConfig:
    return full_batch_run(algorithm, LR, **{"local-steps": 3, **extra})


def make_context(run: RunConfig, tmp_path: Path) -> ClientContext:
    return hospital_context(run, tmp_path)


@pytest.mark.parametrize("algorithm", ["fedavg", "fedprox"])
def test_local_steps_match_the_objective_by_hand(algorithm: str, tmp_path: Path) -> None:
    run = make_run(algorithm, **({"fedprox.proximal-mu": MU} if algorithm == "fedprox" else {}))
    context = make_context(run, tmp_path)
    net = build_model(run, seed=5)
    received = clone_state(net)
    update = get_algorithm(algorithm).objective(context).fit(received)
    x, y = context.data.train.inputs, context.data.train.labels
    losses = []
    for _ in range(run.local_steps):
        loss = F.cross_entropy(net(x), y)
        losses.append(float(loss.detach()))
        if algorithm == "fedprox":  # (mu/2) ||w - w_received||^2 over the parameters
            loss = loss + MU / 2 * sum(
                ((p - received[n]) ** 2).sum() for n, p in net.named_parameters()
            )
        sgd_step(net.parameters(), loss, LR)
    assert_same_update(received, update.state, clone_state(net))
    assert update.steps == run.local_steps and update.num_examples == run.local_steps * len(y)
    if algorithm == "fedavg":
        assert update.loss == pytest.approx(sum(losses) / len(losses), rel=1e-5)


@pytest.mark.parametrize(
    ("steps", "epochs", "batch_size"), [(5, 1, 16), (0, 2, 16), (0, 1, 64), (7, 1, 10)]
)
def test_step_budget_counts_batches_across_epochs(
    steps: int, epochs: int, batch_size: int, tmp_path: Path
) -> None:
    """``local-steps`` batches when set (passes over the data restart as needed), else
    ``local-epochs`` full passes; the last batch of a pass may be smaller."""
    run = make_run(
        "fedavg", **{"local-steps": steps, "local-epochs": epochs, "batch-size": batch_size}
    )
    context = make_context(run, tmp_path)
    n = len(context.data.train)
    sizes = [min(batch_size, n - start) for start in range(0, n, batch_size)]  # one pass
    expected = sizes * epochs if steps == 0 else (sizes * steps)[:steps]
    update = get_algorithm("fedavg").objective(context).fit(clone_state(build_model(run)))
    assert (update.steps, update.num_examples) == (len(expected), sum(expected))


@pytest.mark.parametrize("clip", [0.0, 0.05])
def test_a_scaled_step_unscales_before_clipping(clip: float) -> None:
    """Mixed precision multiplies the loss by a large scale before backward; the update must
    be the unscaled one, and clipping must see the unscaled gradients (a scaler runs on the
    CPU here, as on CUDA with ``amp``)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    before = clone_state(model)
    by_hand = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    by_hand.load_state_dict(before)
    settings = OptimizerSettings("sgd", LR, momentum=0.0)
    updater = Updater(settings.build(model.parameters()), True, clip, device_type="cpu")
    assert updater.scaler.get_scale() > 1  # the loss really is scaled
    updater.step(F.cross_entropy(model(x), y))
    norm = sgd_step(by_hand.parameters(), F.cross_entropy(by_hand(x), y), LR, clip)
    assert clip == 0 or norm > clip  # the clipped case clips
    assert_same_update(before, clone_state(model), clone_state(by_hand))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_mixed_precision_on_cuda_follows_the_float32_step(tmp_path: Path) -> None:
    """On a GPU with ``amp``: the same steps as in float32 up to half-precision rounding,
    every weight back on the CPU in float32."""
    states = {}
    for amp in (False, True):
        run = make_run("fedavg", amp=amp)
        context = make_context(run, tmp_path / str(amp))
        context.device = torch.device("cuda")
        update = (
            get_algorithm("fedavg").objective(context).fit(clone_state(build_model(run, seed=5)))
        )
        values = update.state.values()
        assert all(v.device.type == "cpu" and v.dtype == torch.float32 for v in values)
        states[amp] = update.state
    for key, value in states[False].items():
        torch.testing.assert_close(states[True][key], value, atol=2e-2, rtol=2e-2)


def test_the_loop_is_the_textbook_loop_bit_for_bit(tmp_path: Path) -> None:
    """Adam over two shuffled passes of several batches: the shared loop gives exactly the
    weights of the plain PyTorch loop (same batches, same order, same optimiser state)."""
    run = make_run(
        "fedavg",
        **{
            "optimizer": "adam",
            "learning-rate": 0.01,
            "batch-size": 8,
            "local-steps": 0,
            "local-epochs": 2,
        },
    )
    context = make_context(run, tmp_path)
    objective = get_algorithm("fedavg").objective(context)
    net = build_model(run, seed=5)
    update = objective.fit(clone_state(net))
    train = context.data.train
    loader = DataLoader(
        TensorDataset(train.inputs, train.labels),
        batch_size=8,
        shuffle=True,
        generator=objective.generator(),
    )
    optimizer = torch.optim.Adam(net.parameters(), lr=0.01)
    for _ in range(2):
        for x, y in loader:
            optimizer.zero_grad()
            F.cross_entropy(net(x), y).backward()
            optimizer.step()
    assert len(loader) > 2
    assert all(torch.equal(update.state[k], v) for k, v in net.state_dict().items())
