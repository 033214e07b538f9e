"""The Fed-MAS prior: checkpoint layouts, hash refusal, MoCo-v2 pretraining (``prior train``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedclinic.config import HospitalConfig
from fedclinic.errors import ConfigError, DataError, IntegrityError
from fedclinic.prior import (
    MOCO_PREFIX,
    PRIOR_DIMS,
    MocoSettings,
    add_parser,
    build_encoder,
    load_prior,
    prior_content_sha256,
    read_prior_file,
    synthetic_images,
    train_moco,
)
from fedclinic.serialization import file_sha256
from strategies import load_run_config
from strategies.fedmas import hospital_prior

torch.set_num_threads(1)


def official_checkpoint(path: Path, arch: str = "cnn", seed: int = 0) -> dict[str, torch.Tensor]:
    """A file in MoCo's released layout: encoder_q + its MLP head fc.0/fc.2, encoder_k, queue."""
    torch.manual_seed(seed)
    encoder = build_encoder(arch, 3)
    dim = PRIOR_DIMS[arch]
    head = {
        "fc.0.weight": torch.randn(dim, dim),
        "fc.0.bias": torch.randn(dim),
        "fc.2.weight": torch.randn(128, dim),
        "fc.2.bias": torch.randn(128),
    }
    backbone = encoder.state_dict()
    state_dict: dict[str, Any] = {MOCO_PREFIX + k: v for k, v in {**backbone, **head}.items()}
    state_dict.update({"module.encoder_k." + k: v + 1 for k, v in backbone.items()})
    state_dict["module.queue"] = torch.randn(128, 16)
    torch.save({"epoch": 800, "arch": arch, "state_dict": state_dict, "optimizer": {}}, path)
    return backbone


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fedclinic")
    add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(list(argv))


def test_official_layout_loads_encoder_q_and_drops_fc(tmp_path: Path) -> None:
    path = tmp_path / "moco_v2.pth.tar"
    backbone = official_checkpoint(path)
    prior_file = read_prior_file(path)
    assert prior_file.origin == "moco-v2 checkpoint" and prior_file.arch == "cnn"
    assert prior_file.dropped == ["fc.0.bias", "fc.0.weight", "fc.2.bias", "fc.2.weight"]
    assert set(prior_file.state) == set(backbone)  # encoder_q only, no encoder_k / queue
    prior, _ = load_prior(path, "cnn")
    loaded = prior.encoder.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in backbone.items())  # encoder_q, not _k
    assert prior.in_channels == 3 and not prior.training
    # grey images are repeated into the RGB encoder; output is the 64-d pooled feature
    assert prior(torch.rand(2, 1, 28, 28)).shape == (2, PRIOR_DIMS["cnn"])
    # imagenet normalisation: (x - mean) / std per RGB channel before the encoder
    normalised, _ = load_prior(path, "cnn", imagenet=True)
    grey = torch.rand(2, 1, 28, 28)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = normalised.encoder((grey.expand(-1, 3, -1, -1) - mean) / std)
    torch.testing.assert_close(normalised(grey), expected)
    with pytest.raises(DataError, match="expects 3-channel images"):
        prior(torch.rand(2, 2, 28, 28))


def test_plain_state_dict_layout_loads_too(tmp_path: Path) -> None:
    encoder = build_encoder("resnet18", 3)
    state = {
        **encoder.state_dict(),
        "fc.weight": torch.zeros(1000, 512),
        "fc.bias": torch.zeros(1000),
    }
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    prior, prior_file = load_prior(path, "resnet18")
    assert prior_file.origin == "state dict" and prior_file.dropped == ["fc.bias", "fc.weight"]
    assert prior(torch.rand(2, 3, 32, 32)).shape == (2, 512)


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (
            lambda sd: {k.replace("encoder_q", "encoder"): v for k, v in sd.items()},
            "no 'module.encoder_q.' keys",
        ),
        (
            lambda sd: {k: v for k, v in sd.items() if "features.4" not in k},
            "missing keys features.4",
        ),
        (
            lambda sd: {**sd, MOCO_PREFIX + "extra.weight": torch.zeros(1)},
            "unexpected keys extra.weight",
        ),
        (
            lambda sd: {k: v for k, v in sd.items() if "features.0" not in k},
            "key 'features.0.weight' is missing",
        ),
    ],
)
def test_wrong_or_missing_keys_give_one_clear_line(
    tmp_path: Path, mutate: Any, fragment: str
) -> None:
    path = tmp_path / "bad.pth.tar"
    official_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["state_dict"] = mutate(checkpoint["state_dict"])
    torch.save(checkpoint, path)
    with pytest.raises(DataError) as caught:
        load_prior(path, "cnn")
    assert fragment in str(caught.value) and "\n" not in str(caught.value)


def test_wrong_architecture_missing_and_corrupt_files(tmp_path: Path) -> None:
    path = tmp_path / "moco.pth.tar"
    official_checkpoint(path)
    with pytest.raises(DataError, match="holds a 'cnn' encoder; the run expects"):
        load_prior(path, "resnet50")
    with pytest.raises(DataError, match="does not exist"):
        load_prior(tmp_path / "absent.pt", "cnn")
    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="unreadable or corrupt"):
        load_prior(tmp_path / "corrupt.pt", "cnn")


def fedmas_run(**options: Any) -> Any:
    flat = {"algorithm": "fedmas", "fedmas.prior-arch": "cnn"}
    flat.update({f"fedmas.{k}": v for k, v in options.items()})
    return load_run_config(flat)


def test_hospital_refuses_a_prior_whose_hash_differs(tmp_path: Path) -> None:
    shared, other = tmp_path / "shared.pt", tmp_path / "other.pt"
    official_checkpoint(shared, seed=0)
    official_checkpoint(other, seed=1)
    digest = file_sha256(shared)
    run = fedmas_run(**{"prior-sha256": digest})
    good = HospitalConfig(hospital="hospital-a", prior_path=str(shared))
    prior, info = hospital_prior(run, good)
    assert info["prior_sha256"] == digest and info["prior_origin"] == "moco-v2 checkpoint"
    assert info["prior_content_sha256"] == prior_content_sha256(prior)
    bad = HospitalConfig(hospital="hospital-b", prior_path=str(other))
    with pytest.raises(IntegrityError) as caught:
        hospital_prior(run, bad)
    message = str(caught.value)
    assert "hospital-b" in message and digest in message and file_sha256(other) in message
    assert "\n" not in message
    # the run-level path is the fallback; the hospital's own key wins
    fallback = fedmas_run(**{"prior-sha256": digest, "prior-path": str(other)})
    with pytest.raises(IntegrityError):
        hospital_prior(fallback, HospitalConfig(hospital="hospital-c"))
    assert hospital_prior(fallback, good)[1]["prior_sha256"] == digest


def test_missing_path_or_hash_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="prior-path"):
        hospital_prior(fedmas_run(**{"prior-sha256": "0" * 64}), HospitalConfig(hospital="a"))
    with pytest.raises(ConfigError, match=r"fedmas\.prior-sha256"):
        hospital_prior(fedmas_run(), HospitalConfig(hospital="a", prior_path="x.pt"))
    with pytest.raises(DataError, match="does not exist"):
        hospital_prior(
            fedmas_run(**{"prior-sha256": "0" * 64}),
            HospitalConfig(hospital="a", prior_path=str(tmp_path / "absent.pt")),
        )


def test_random_prior_is_bit_identical_by_seed_and_checked() -> None:
    run = fedmas_run(**{"prior-source": "random", "prior-seed": 7})
    first = hospital_prior(run, HospitalConfig(hospital="a"))[1]["prior_content_sha256"]
    second = hospital_prior(run, HospitalConfig(hospital="b"))[1]["prior_content_sha256"]
    assert first == second
    other = fedmas_run(**{"prior-source": "random", "prior-seed": 8})
    assert hospital_prior(other, HospitalConfig(hospital="a"))[1]["prior_content_sha256"] != first
    pinned = fedmas_run(**{"prior-source": "random", "prior-seed": 8, "prior-sha256": first})
    with pytest.raises(IntegrityError, match="random prior"):
        hospital_prior(pinned, HospitalConfig(hospital="a"))


def test_moco_training_updates_the_query_encoder_reproducibly() -> None:
    images = torch.rand(16, 1, 12, 12)
    settings = MocoSettings(arch="cnn", steps=2, batch_size=8, queue_size=8, seed=0)
    state, stats = train_moco(images, settings)
    torch.manual_seed(settings.seed)
    initial = build_encoder("cnn", 1).state_dict()
    assert {k for k in state if k.startswith("fc.")} == {
        "fc.0.weight",
        "fc.0.bias",
        "fc.2.weight",
        "fc.2.bias",
    }
    assert state["fc.2.weight"].shape == (128, 64)
    assert not torch.equal(state["features.0.weight"], initial["features.0.weight"])
    assert stats["steps"] == 2 and np.isfinite(stats["final_loss"])
    assert stats["queue_size"] == 8  # capped: max(batch, min(queue, N // 4))
    again, _ = train_moco(images, settings)
    assert all(torch.equal(v, again[k]) for k, v in state.items())  # reproducible by seed


def test_prior_train_command_on_synthetic_images(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``prior train`` on an .npz of the synthetic generator's images, then ``prior hash``."""
    images = synthetic_images(40, 1, 28, seed=0)
    assert images.shape[1:] == (1, 28, 28)
    npz = tmp_path / "public.npz"
    np.savez(npz, images=images.numpy())
    output = tmp_path / "prior" / "prior.pt"
    args = parse(
        "prior", "train", "--images", str(npz), "--output", str(output), "--steps", "2",
        "--batch-size", "8", "--device", "cpu",
    )  # fmt: skip
    assert args.handler(args) == 0
    printed = capsys.readouterr().out
    digest = file_sha256(output)
    assert f"sha256: {digest}" in printed and "fedmas.prior-sha256" in printed
    assert Path(str(output) + ".sha256").read_text().split()[0] == digest
    prior_file = read_prior_file(output)
    assert prior_file.origin == "fedclinic prior train" and prior_file.arch == "cnn"
    assert prior_file.meta["num_images"] == 40 and prior_file.meta["method"] == "moco-v2"
    assert all(
        k.startswith(MOCO_PREFIX) for k in torch.load(output, weights_only=True)["state_dict"]
    )
    prior, _ = load_prior(output, "cnn")
    assert prior.in_channels == 1
    args = parse("prior", "hash", str(output), "--arch", "cnn")
    assert args.handler(args) == 0 and digest in capsys.readouterr().out
    # a hospital with this file and hash is accepted
    run = fedmas_run(**{"prior-sha256": digest})
    assert hospital_prior(run, HospitalConfig(hospital="a", prior_path=str(output)))[1]


def test_prior_commands_report_bad_input_as_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    npz = tmp_path / "bad.npz"
    np.savez(npz, images=np.zeros((5,), dtype=np.float32))
    args = parse("prior", "train", "--images", str(npz), "--output", str(tmp_path / "p.pt"))
    assert args.handler(args) == 2
    error = capsys.readouterr().err
    assert "bad.npz" in error and "expected (N>=2, C, H, W)" in error
    args = parse("prior", "hash", str(tmp_path / "absent.pt"))
    assert args.handler(args) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse("prior", "train", "--images", str(npz), "--output", "p.pt", "--batch-size", "2")
