"""``fedclinic knowledge``: the three sources, the stored probabilities and the hash checks.

Decision IDs (FH-n): docs/fedhelp.md#decisions.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.special import expit, softmax
from torch import nn

from fedclinic.errors import ConfigError, DataError, IntegrityError
from fedclinic.knowledge import (
    add_parser,
    build_knowledge,
    build_network,
    load_shared_knowledge,
    public_inputs,
    read_knowledge,
    read_public_data,
    write_synthetic_public,
)
from fedclinic.serialization import file_sha256

N = 24


@pytest.fixture(scope="module")
def public(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_public(tmp_path_factory.mktemp("pub") / "public.npz", N, 3, seed=1000)


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fedclinic")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(list(argv))


def run_command(*argv: str) -> int:
    args = parse(*argv)
    return int(args.handler(args))


class Tiny(nn.Module):
    """A fixed linear 'foundation model' on 28x28 grey images with 4 outputs."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.linear = nn.Linear(28 * 28, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1)) * 5.0


def expected_probabilities(model: nn.Module, public: Path) -> np.ndarray:
    with torch.no_grad():
        logits = model(public_inputs(read_public_data(public))).numpy()
    return softmax(logits.astype(np.float64), axis=1)


# ------------------------------------------------------------------------------ source (a)


def test_torchscript_model_file(
    public: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    model = Tiny().eval()
    with pytest.warns(FutureWarning):  # torch.jit is deprecated but still the common format
        torch.jit.save(torch.jit.script(model), str(tmp_path / "fm.pt"))
    out = tmp_path / "knowledge.npz"
    code = run_command(
        "knowledge", "build", "--public-data", str(public), "--output", str(out),
        "--model-file", str(tmp_path / "fm.pt"), "--device", "cpu",
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    digest = file_sha256(out)
    assert f"sha256: {digest}" in printed and "fedhelp.knowledge-sha256" in printed
    assert (tmp_path / "knowledge.npz.sha256").read_text().split()[0] == digest
    knowledge = read_knowledge(out, digest)
    assert knowledge.meta["source"] == "model-file" and knowledge.meta["substitute"] is False
    assert knowledge.meta["public_data_sha256"] == file_sha256(public)
    assert knowledge.meta["model_sha256"] == file_sha256(tmp_path / "fm.pt")
    # FH-4: softmax of the model's logits is stored, not the logits
    np.testing.assert_allclose(
        knowledge.probabilities.numpy(), expected_probabilities(model, public), atol=1e-6
    )


def test_state_dict_with_architecture(public: Path, tmp_path: Path) -> None:
    torch.manual_seed(5)
    network = build_network("cnn", 3, (1, 28, 28)).eval()
    torch.save(network.state_dict(), tmp_path / "weights.pt")
    digest, meta = build_knowledge(
        public, tmp_path / "k.npz", model_file=tmp_path / "weights.pt",
        architecture="fedclinic:cnn", num_outputs=3,
    )  # fmt: skip
    assert meta["architecture"] == "fedclinic:cnn" and meta["num_classes"] == 3
    np.testing.assert_allclose(
        read_knowledge(tmp_path / "k.npz", digest).probabilities.numpy(),
        expected_probabilities(network, public),
        atol=1e-6,
    )
    with pytest.raises(DataError, match="does not fit architecture"):
        build_knowledge(
            public, tmp_path / "k2.npz", model_file=tmp_path / "weights.pt",
            architecture="fedclinic:cnn", num_outputs=5,
        )  # fmt: skip
    with pytest.raises(ConfigError, match="expected torchvision:<name>"):
        build_knowledge(
            public, tmp_path / "k3.npz", model_file=tmp_path / "weights.pt",
            architecture="keras:cnn", num_outputs=3,
        )  # fmt: skip


def test_a_model_file_that_is_not_a_program(public: Path, tmp_path: Path) -> None:
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(DataError, match="TorchScript"):
        build_knowledge(public, tmp_path / "k.npz", model_file=tmp_path / "junk.pt")
    with pytest.raises(DataError, match="does not exist"):
        build_knowledge(public, tmp_path / "k.npz", model_file=tmp_path / "missing.pt")


# ------------------------------------------------------------------------------ source (b)


def test_teacher_substitute_is_marked_as_such(public: Path, tmp_path: Path) -> None:
    digest, meta = build_knowledge(
        public, tmp_path / "k.npz", train_teacher_network="cnn", epochs=1, batch_size=12
    )
    knowledge = read_knowledge(tmp_path / "k.npz", digest)
    assert meta["source"] == "teacher" and meta["substitute"] is True
    assert "FH-2" in meta["note"]
    assert knowledge.probabilities.shape == (N, 3)  # one column per public class
    np.testing.assert_allclose(knowledge.probabilities.sum(1).numpy(), 1.0, atol=1e-5)


def test_teacher_needs_labelled_public_data(tmp_path: Path) -> None:
    np.savez(tmp_path / "unlabelled.npz", images=np.zeros((4, 28, 28), dtype=np.uint8))
    with pytest.raises(DataError, match="has no labels"):
        build_knowledge(
            tmp_path / "unlabelled.npz", tmp_path / "k.npz", train_teacher_network="cnn"
        )


# ------------------------------------------------------------------------------ source (c)


def test_logits_file_npy_is_softmaxed(public: Path, tmp_path: Path) -> None:
    logits = np.random.default_rng(0).normal(scale=3, size=(N, 5))
    np.save(tmp_path / "api.npy", logits)
    digest, meta = build_knowledge(public, tmp_path / "k.npz", logits_file=tmp_path / "api.npy")
    stored = read_knowledge(tmp_path / "k.npz", digest).probabilities.numpy()
    np.testing.assert_allclose(stored, softmax(logits, axis=1), atol=1e-6)
    assert meta["given_as"] == "logits" and meta["logits_sha256"] == file_sha256(
        tmp_path / "api.npy"
    )


def test_logits_file_npz_key_binary_and_probabilities(public: Path, tmp_path: Path) -> None:
    z = np.random.default_rng(1).normal(size=(N, 1))
    np.savez(tmp_path / "api.npz", other=np.zeros(3), scores=z)
    digest, _ = build_knowledge(
        public, tmp_path / "k.npz", logits_file=tmp_path / "api.npz", logits_key="scores"
    )
    stored = read_knowledge(tmp_path / "k.npz", digest).probabilities.numpy()
    np.testing.assert_allclose(stored[:, 1], expit(z[:, 0]), atol=1e-6)  # one logit: sigmoid
    with pytest.raises(DataError, match="--logits-key"):
        build_knowledge(public, tmp_path / "k.npz", logits_file=tmp_path / "api.npz")
    p = softmax(np.random.default_rng(2).normal(size=(N, 3)), axis=1)
    np.save(tmp_path / "p.npy", p)
    digest, _ = build_knowledge(
        public, tmp_path / "k.npz", logits_file=tmp_path / "p.npy", already_probabilities=True
    )
    np.testing.assert_allclose(read_knowledge(tmp_path / "k.npz").probabilities, p, atol=1e-6)
    np.save(tmp_path / "bad_p.npy", p * 0.9)
    with pytest.raises(DataError, match="sums to"):
        build_knowledge(
            public,
            tmp_path / "k.npz",
            logits_file=tmp_path / "bad_p.npy",
            already_probabilities=True,
        )


@pytest.mark.parametrize(
    ("array", "fragment"),
    [
        (np.zeros((N - 1, 3)), f"has {N - 1} rows; the public data has {N} samples"),
        (np.zeros((N,)), "expected (N, C)"),
        (np.zeros((N, 3, 2)), "expected (N, C)"),
        (np.where(np.eye(N, 3) > 0, np.nan, 0.0), "NaN or infinite values (first in row 0)"),
        (np.full((N, 3), np.inf), "NaN or infinite"),
    ],
)
def test_bad_logits_files_are_refused(
    public: Path, tmp_path: Path, array: np.ndarray, fragment: str, capsys: pytest.CaptureFixture
) -> None:
    np.save(tmp_path / "bad.npy", array)
    with pytest.raises(DataError) as caught:
        build_knowledge(public, tmp_path / "k.npz", logits_file=tmp_path / "bad.npy")
    assert fragment in str(caught.value) and "\n" not in str(caught.value)
    code = run_command(
        "knowledge", "build", "--public-data", str(public), "--output", str(tmp_path / "k.npz"),
        "--logits-file", str(tmp_path / "bad.npy"),
    )  # fmt: skip
    assert code == 2
    assert fragment in capsys.readouterr().err
    assert not (tmp_path / "k.npz").exists()


# ------------------------------------------------------------------------------ the file


def test_hash_mismatch_and_tampered_public_data_are_refused(public: Path, tmp_path: Path) -> None:
    np.save(tmp_path / "api.npy", np.zeros((N, 3)))
    digest, _ = build_knowledge(public, tmp_path / "k.npz", logits_file=tmp_path / "api.npy")
    with pytest.raises(IntegrityError, match=r"fedhelp\.knowledge-sha256"):
        read_knowledge(tmp_path / "k.npz", "0" * 64)
    shared = load_shared_knowledge(tmp_path / "k.npz", public, digest, 1, 28)
    assert shared.inputs.shape == (N, 1, 28, 28) and shared.labels is not None
    tampered = tmp_path / "tampered.npz"
    arrays = dict(np.load(public))
    arrays["train_images"] = arrays["train_images"].copy()
    arrays["train_images"][0, 0, 0] ^= 1
    np.savez(tampered, **arrays)
    with pytest.raises(IntegrityError, match="mismatched public data"):
        load_shared_knowledge(tmp_path / "k.npz", tampered, digest, 1, 28)
    assert run_command("knowledge", "check", str(tmp_path / "k.npz"), "--sha256", "1" * 64) == 2
    # a knowledge file in another label space (2 classes) cannot use the 3-class public labels
    np.save(tmp_path / "two.npy", np.zeros((N, 2)))
    other, _ = build_knowledge(public, tmp_path / "k2.npz", logits_file=tmp_path / "two.npy")
    shared = load_shared_knowledge(tmp_path / "k2.npz", public, other, 1, 28)
    assert shared.labels is None and "not used" in shared.note
    assert (
        run_command("knowledge", "check", str(tmp_path / "k.npz"), "--public-data", str(public))
        == 0
    )


def test_public_images_are_converted_to_the_runs_shape(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, size=(3, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "rgb.npz", images=rgb, labels=np.array([[0], [1], [2]]))
    data = read_public_data(tmp_path / "rgb.npz")
    assert data.split == "" and data.labels is not None and data.labels.tolist() == [0, 1, 2]
    x = public_inputs(data, in_channels=3)
    assert x.shape == (3, 3, 8, 8)
    np.testing.assert_allclose(x[1, 2].numpy(), rgb[1, :, :, 2] / 255.0, atol=1e-7)
    grey = public_inputs(data, in_channels=1, image_size=4)
    assert grey.shape == (3, 1, 4, 4)
    assert public_inputs(read_public_data(tmp_path / "rgb.npz"), 1).mean().item() == pytest.approx(
        rgb.mean() / 255.0, rel=1e-5
    )
    with pytest.raises(DataError, match="expected 'images'"):
        np.savez(tmp_path / "other.npz", pixels=rgb)
        read_public_data(tmp_path / "other.npz")


def test_synthetic_public_command(tmp_path: Path) -> None:
    out = tmp_path / "pub.npz"
    assert (
        run_command("knowledge", "synthetic-public", "--output", str(out), "--num-samples", "12")
        == 0
    )
    data = read_public_data(out)
    assert len(data) == 12 and data.split == "train" and data.labels is not None
    assert sorted(np.bincount(data.labels).tolist()) == [6, 6]
