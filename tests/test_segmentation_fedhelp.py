"""FedHelp on segmentation: the per-pixel distillation terms (FH-11) against hand computations,
the dense knowledge file, and the large and small hospitals' updates. Decision IDs:
docs/fedhelp.md#decisions.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, RecordDict
from scipy.stats import entropy

# the FedHelp tests' hospital builder (same ClientContext, 60 synthetic samples)
from test_fedhelp import make_objective

from fedclinic.config import RunConfig
from fedclinic.errors import ConfigError, DataError
from fedclinic.knowledge import (
    add_parser,
    build_knowledge,
    load_shared_knowledge,
    read_knowledge,
    read_public_data,
    write_synthetic_public,
)
from fedclinic.models import build_model
from fedclinic.serialization import record_to_state, state_to_record
from strategies import get_algorithm, load_run_config
from strategies.fedhelp import LARGE_MODEL, FedHelpObjective
from strategies.fedhelp_math import class_log_probs, kl_divergence, ranking_loss

SEGMENTATION = {"task": "segmentation", "model": "unet", "image-size": 32}


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


# ------------------------------------------------------------------------------ FH-11 maths


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_one_channel_kl_is_the_per_pixel_bernoulli_kl(temperature: float) -> None:
    rng = np.random.default_rng(0)
    teacher, student = rng.normal(size=(2, 1, 3, 4)), rng.normal(size=(2, 1, 3, 4))
    p, q = sigmoid(teacher / temperature), sigmoid(student / temperature)
    bernoulli = p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q))
    got = kl_divergence(
        class_log_probs(torch.tensor(teacher), temperature),
        class_log_probs(torch.tensor(student), temperature),
    )
    assert got.item() == pytest.approx(bernoulli.mean(), rel=1e-5)  # mean over pixels, images
    # the reference's softmax over one channel is identically 1: its KL would be zero
    one = torch.softmax(torch.tensor(teacher), dim=1)
    assert torch.equal(one, torch.ones_like(one))


def test_multiclass_kl_is_the_softmax_kl_per_pixel() -> None:
    rng = np.random.default_rng(1)
    teacher, student = rng.normal(size=(2, 3, 2, 2)), rng.normal(size=(2, 3, 2, 2))
    p = np.exp(teacher) / np.exp(teacher).sum(axis=1, keepdims=True)
    q = np.exp(student) / np.exp(student).sum(axis=1, keepdims=True)
    per_pixel = entropy(p, q, axis=1)  # scipy: sum_c p log(p / q)
    t_log, s_log = class_log_probs(torch.tensor(teacher)), class_log_probs(torch.tensor(student))
    assert kl_divergence(t_log, s_log).item() == pytest.approx(per_pixel.mean(), rel=1e-6)
    # "mean" divides by every element, B*C*H*W, as nn.KLDivLoss() would
    assert kl_divergence(t_log, s_log, "mean").item() == pytest.approx(
        per_pixel.sum() / teacher.size, rel=1e-6
    )


def test_ranking_per_pixel_is_the_sample_ranking_averaged_over_pixels() -> None:
    rng = np.random.default_rng(2)
    large, proxy = rng.normal(size=(2, 4, 3, 3)), rng.normal(size=(2, 4, 3, 3))
    expected = 0.0
    for image in range(2):
        pixels = []
        for row, col in itertools.product(range(3), range(3)):
            zl, zp = large[image, :, row, col], proxy[image, :, row, col]
            top = set(np.argsort(-zp)[:1].tolist())
            pixels.append(
                sum(max(0.0, 0.5 - (zl[a] - zl[b])) for a in top for b in set(range(4)) - top) / 2
            )
        expected += float(np.mean(pixels))
    got = ranking_loss(torch.tensor(large), torch.tensor(proxy), 1, margin=0.5)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    assert ranking_loss(
        torch.tensor(large), torch.tensor(proxy), 1, 0.5, reduction="mean"
    ).item() == pytest.approx(expected / 2, rel=1e-6)


def test_one_channel_ranking_asks_the_large_model_to_agree_with_the_proxy() -> None:
    """With [0, z] a binary pixel has two classes, so the top-1 hinge is not empty (FH-11)."""
    proxy = torch.tensor([[[[3.0, -3.0]]]])  # pixel 0: foreground, pixel 1: background
    large = torch.tensor([[[[-1.0, -1.0]]]])
    # pixel 0: max(0, 0 - (zL_fg - zL_bg)) = max(0, -(-1 - 0)) = 1; pixel 1: max(0, -(0 + 1)) = 0
    assert ranking_loss(large, proxy, 1).item() == pytest.approx((1 / 2 + 0) / 2)


# ------------------------------------------------------------------------------ knowledge


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Segmentation public data (masks) and a dense knowledge file from a logits file."""
    folder = tmp_path_factory.mktemp("seg-shared")
    public = write_synthetic_public(
        folder / "public.npz", 12, 2, image_size=32, seed=1000, task="segmentation"
    )
    logits = np.random.default_rng(0).normal(size=(12, 1, 32, 32)).astype(np.float32)
    np.save(folder / "api.npy", logits)
    digest, _ = build_knowledge(public, folder / "knowledge.npz", logits_file=folder / "api.npy")
    knowledge = folder / "knowledge.npz"
    return {"public": public, "knowledge": knowledge, "sha": digest, "logits": logits}


def test_dense_knowledge_stores_per_pixel_probabilities(shared: dict[str, Any]) -> None:
    knowledge = read_knowledge(shared["knowledge"], shared["sha"])
    assert tuple(knowledge.probabilities.shape) == (12, 2, 32, 32) and knowledge.num_classes == 2
    positive = torch.sigmoid(torch.from_numpy(shared["logits"][:, 0]))
    torch.testing.assert_close(knowledge.probabilities[:, 1], positive, atol=1e-6, rtol=0)
    loaded = load_shared_knowledge(shared["knowledge"], shared["public"], shared["sha"], 1, 48)
    assert tuple(loaded.knowledge.probabilities.shape[-2:]) == (48, 48)  # resized with the images
    assert torch.allclose(loaded.knowledge.probabilities.sum(dim=1), torch.ones(12, 48, 48))
    assert loaded.labels is not None and tuple(loaded.labels.shape) == (12, 48, 48)
    assert set(loaded.labels.unique().tolist()) == {0, 1}


def test_a_unet_teacher_is_trained_on_the_public_masks(
    shared: dict[str, Any], tmp_path: Path
) -> None:
    digest, meta = build_knowledge(
        shared["public"], tmp_path / "k.npz", train_teacher_network="unet", epochs=1, batch_size=6
    )
    assert meta["substitute"] and meta["num_classes"] == 2 and meta["teacher"] == "unet"
    assert read_knowledge(tmp_path / "k.npz", digest).probabilities.ndim == 4
    assert 0 <= meta["teacher_public_accuracy"] <= 1  # pixel accuracy on the public masks
    with pytest.raises(ConfigError, match="--train-teacher cnn: the public labels are masks"):
        build_knowledge(shared["public"], tmp_path / "x.npz", train_teacher_network="cnn")


# ------------------------------------------------------------------------------ FedHelp


def fedhelp_run(shared: dict[str, Any], **extra: Any) -> RunConfig:
    flat = {
        **SEGMENTATION,
        "algorithm": "fedhelp",
        "run-name": "seg",
        "local-steps": 1,
        "batch-size": 8,
        "fedhelp.large-model": "unet-large",
        "fedhelp.knowledge-sha256": shared["sha"],
        **extra,
    }
    return load_run_config(flat)


def train_once(objective: FedHelpObjective, run: RunConfig) -> RecordDict:
    state = build_model(run, seed=1).state_dict()
    content = RecordDict({"arrays": state_to_record(state), "config": ConfigRecord({})})
    return objective.respond(content, train=True)


def test_fedhelp_large_hospital_distils_per_pixel_and_uploads_the_proxy(
    shared: dict[str, Any], tmp_path: Path
) -> None:
    run = fedhelp_run(shared)
    objective = make_objective(run, shared, tmp_path, "large", name="h-large")
    reply = train_once(objective, run)
    uploaded = record_to_state(reply["arrays"])
    expected = build_model(run).state_dict()
    assert {k: v.shape for k, v in uploaded.items()} == {k: v.shape for k, v in expected.items()}
    metrics, info = dict(reply["metrics"]), dict(reply["info"])
    assert info["uploaded"] == "proxy" and info["deployed"] == "large"
    assert metrics["train_forward_kl"] > 0 and metrics["train_rank_loss"] > 0  # FH-11: not empty
    assert "val_dice" in metrics and "test_dice_c1" in metrics
    large = objective.context.site.load(LARGE_MODEL)
    assert large["final_conv.weight"].shape == (1, 32, 1, 1)  # unet-large, one channel


def test_fedhelp_small_hospital_uploads_the_surrogate_with_its_conv_head(
    shared: dict[str, Any], tmp_path: Path
) -> None:
    run = fedhelp_run(shared)
    reply = train_once(make_objective(run, shared, tmp_path, "small", name="h-small"), run)
    uploaded = record_to_state(reply["arrays"])
    assert set(uploaded) == set(build_model(run).state_dict())  # no public head travels
    assert uploaded["final_conv.weight"].shape == (1, 16, 1, 1)
    metrics = dict(reply["metrics"])
    assert metrics["train_public_kl"] > 0 and metrics["train_public_ce"] > 0
    assert dict(reply["info"])["uploaded"] == "surrogate"


def test_fedhelp_refuses_a_per_image_knowledge_file_and_a_classification_large_model(
    shared: dict[str, Any], tmp_path: Path
) -> None:
    public = write_synthetic_public(tmp_path / "p.npz", 8, 2, image_size=32, seed=3)
    logits = np.zeros((8, 2), dtype=np.float32)
    np.save(tmp_path / "l.npy", logits)
    digest, _ = build_knowledge(public, tmp_path / "k.npz", logits_file=tmp_path / "l.npy")
    flat = {"public": public, "knowledge": tmp_path / "k.npz", "sha": digest}
    run = fedhelp_run(flat)
    objective = make_objective(run, flat, tmp_path / "state", "small")
    with pytest.raises(DataError, match="holds per-image probabilities; a segmentation run"):
        train_once(objective, run)
    with pytest.raises(ConfigError) as caught:  # refused at the coordinator, before round 1
        get_algorithm("fedhelp").strategy(fedhelp_run(shared, **{"fedhelp.large-model": "cnn"}))
    message = str(caught.value)
    assert "'fedhelp.large-model' = 'cnn' is not allowed with task = 'segmentation'" in message


def test_synthetic_public_command_writes_masks(tmp_path: Path, capsys: Any) -> None:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))

    def run(*argv: str) -> int:
        args = parser.parse_args(["knowledge", "synthetic-public", *argv])
        return int(args.handler(args))

    out = tmp_path / "public.npz"
    assert run("--output", str(out), "--task", "segmentation", "--num-classes", "3",
               "--num-samples", "6", "--image-size", "32") == 0  # fmt: skip
    public = read_public_data(out)
    assert public.labels is not None and public.labels.shape == (6, 32, 32)
    assert set(np.unique(public.labels).tolist()) <= {0, 1, 2} and public.labels.max() > 0
    assert run("--output", str(out), "--task", "segmentation", "--num-classes", "8") == 2
    assert "--num-classes must be 2..7" in capsys.readouterr().err
