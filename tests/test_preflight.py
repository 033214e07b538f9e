"""Issue 17 items 1, 2 and 5: a wrong key, value, data path or algorithm setting of either
config stops ``fedclinic local`` and ``fedclinic hospital`` before anything starts, with one
line naming it; no hospital trains on anything its own config does not name; a state dir
belongs to one hospital node (refused on one machine, locked at a site).

In process, through ``fedclinic.cli.main`` (the real processes are in
``test_e2e_data_source.py``).
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from fedclinic.cli import main
from fedclinic.config import parse_hospital_config
from fedclinic.data import preflight
from fedclinic.errors import ConfigError, DataError
from fedclinic.local.configs import write_flat_toml
from fedclinic.pki import provision
from fedclinic.site import state_dir_lock
from strategies import load_run_config

ROOT = Path(__file__).resolve().parents[1]
GOOD_ROW = "63.0,1.0,1.0,145.0,233.0,1.0,2.0,150.0,0.0,2.3,3.0,0.0,6.0,0"


def local_fails(capsys: pytest.CaptureFixture[str], tmp_path: Path, *argv: str) -> str:
    """``fedclinic local`` exits 2 with one ``error:`` line and starts nothing."""
    out = tmp_path / "out"
    code = main(["local", "--output-dir", str(out), *argv])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), captured
    assert not (out / "federation").exists()
    return lines[0]


def hospital_file(tmp_path: Path, name: str, **keys: Any) -> str:
    flat = {"hospital": name, "state-dir": str(tmp_path / "state" / name), **keys}
    return str(write_flat_toml(tmp_path / f"{name}.toml", flat))


def two_hospitals(tmp_path: Path, **keys: Any) -> list[str]:
    """``--hospital`` arguments: a good synthetic hospital and one with ``keys``."""
    good = hospital_file(tmp_path, "good", **{"data-source": "synthetic"})
    return ["--hospital", good, "--hospital", hospital_file(tmp_path, "other", **keys)]


def write_images(root: Path, classes: dict[str, int]) -> Path:
    rng = np.random.default_rng(0)
    for name, count in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            pixels = (rng.random((28, 28)) * 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i:03d}.png")
    return root


# ---------------------------------------------------------------------------- 17.1


def test_local_refuses_a_hospital_without_a_data_source(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    images = write_images(tmp_path / "export", {"benign": 4, "malignant": 4})
    line = local_fails(capsys, tmp_path, *two_hospitals(tmp_path, **{"data-path": str(images)}))
    assert "other.toml: hospital config: key 'data-source' is required but missing" in line


def test_no_data_source_means_no_data_even_in_code() -> None:
    """The data layer has no fallback to the run's data-source key either."""
    from fedclinic.config import HospitalConfig
    from fedclinic.data import DataRequest, load_hospital_data

    run = load_run_config({"data-source": "synthetic"})
    with pytest.raises(ConfigError, match="key 'data-source' is required"):
        load_hospital_data(DataRequest(run, HospitalConfig(hospital="a")))


# ---------------------------------------------------------------------------- 17.2


@pytest.mark.parametrize(
    ("keys", "fragment"),
    [
        ({"data-source": "synthetc"}, "'data-source' = 'synthetc' is not allowed"),
        (
            {"data-source": "synthetic", "data-path": "/srv/chest"},
            "'data-path' = '/srv/chest' is not allowed with data-source = 'synthetic'",
        ),
        (
            {"data-source": "image-folder", "data-path": "/nowhere/export"},
            "/nowhere/export: image folder not found",
        ),
        ({"data-source": "image-folder"}, "key 'data-path' is empty"),
        ({"data-source": "medmnist", "data-path": "<dir>"}, "MedMNIST file not found"),
        ({"data-source": "medmnist", "data-path": "<npz-missing-keys>"}, "missing key(s)"),
        ({"data-source": "heart-disease", "data-path": "<heart-bad-name>"}, "the centre"),
        ({"data-source": "heart-disease", "data-path": "<heart-label-7>"}, "'num' = 7"),
        ({"data-source": "image-folder", "data-path": "<images-3-classes>"}, "3 class folder"),
        ({"data-source": "image-folder", "data-path": "<file>"}, "image folder not found"),
        (
            {"data-source": "segmentation-folder", "data-path": "<images>"},
            "'segmentation-folder' is not allowed with task = 'classification'",
        ),
        ({"data-source": "synthetic", "class-priors": "0.2,0.3,0.5"}, "expected 2 numbers"),
        ({"data-source": "synthetic", "prior-path": "/nowhere/prior.pt"}, "'prior-path'"),
        ({"data-source": "synthetic", "knowledge-path": "/no/k.npz"}, "'knowledge-path'"),
        ({"data-source": "synthetic", "num-samples": True}, "expected a number, not true"),
        ({"data-source": "synthetic", "label-skew-alpha": float("nan")}, "finite number"),
        ({"data-source": "synthetic", "device": "gpu"}, "expected auto, cpu, cuda"),
    ],
)
def test_local_checks_every_hospital_key_before_start(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, keys: dict[str, Any], fragment: str
) -> None:
    (tmp_path / "a-dir").mkdir()
    np.savez(tmp_path / "partial.npz", train_images=np.zeros((2, 28, 28), np.uint8))
    (tmp_path / "heart.csv").write_text(GOOD_ROW + "\n")
    (tmp_path / "processed.va.data").write_text((GOOD_ROW + "\n") * 3 + GOOD_ROW[:-1] + "7\n")
    (tmp_path / "file.png").write_bytes(b"x")
    paths = {
        "<dir>": tmp_path / "a-dir",
        "<npz-missing-keys>": tmp_path / "partial.npz",
        "<heart-bad-name>": tmp_path / "heart.csv",
        "<heart-label-7>": tmp_path / "processed.va.data",
        "<images-3-classes>": write_images(tmp_path / "three", {"a": 2, "b": 2, "c": 2}),
        "<images>": write_images(tmp_path / "images", {"a": 2}),
        "<file>": tmp_path / "file.png",
    }
    keys = {k: str(paths.get(v, v)) if isinstance(v, str) else v for k, v in keys.items()}
    assert fragment in local_fails(capsys, tmp_path, *two_hospitals(tmp_path, **keys))


def test_heart_disease_source_needs_a_tabular_run(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (tmp_path / "processed.va.data").write_text((GOOD_ROW + "\n") * 4)
    path = str(tmp_path / "processed.va.data")
    args = two_hospitals(tmp_path, **{"data-source": "heart-disease", "data-path": path})
    assert "'model' = 'cnn' is not allowed with data source 'heart-disease'" in local_fails(
        capsys, tmp_path, *args
    )


@pytest.mark.parametrize(
    ("settings", "fragment"),
    [
        (["algorithm=fedmas", "fedmas.prior-arch=cnn"], "'fedmas.prior-sha256' is empty"),
        (["algorithm=fedhelp", "fedhelp.rank-k=3"], "'fedhelp.rank-k' = 3 is not allowed"),
        (
            ["algorithm=pfednet", "pfednet.sketch-epsilon=1.0"],
            "'pfednet.sketch-epsilon' = 1.0 is not allowed",
        ),
        (["round-timeout=inf"], "'round-timeout' = inf is not allowed"),
        (["learning-rate=nan"], "'learning-rate' = nan is not allowed: Input should be a finite"),
        (["rounds=true"], "'rounds' = true is not allowed"),
    ],
)
def test_local_runs_the_algorithm_checks_before_start(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, settings: list[str], fragment: str
) -> None:
    argv = [arg for setting in settings for arg in ("--set", setting)]
    assert fragment in local_fails(capsys, tmp_path, *argv)


def test_a_good_image_folder_passes_preflight(tmp_path: Path) -> None:
    images = write_images(tmp_path / "export", {"benign": 3, "malignant": 3})
    hospital = parse_hospital_config(
        {"hospital": "a", "data-source": "image-folder", "data-path": str(images)}
    )
    preflight(hospital)  # what fedclinic hospital checks
    preflight(hospital, load_run_config({}))  # what fedclinic local adds
    (images / "malignant" / "001.png").write_bytes(b"not a png")  # read only at load time
    preflight(hospital, load_run_config({}))
    with pytest.raises(DataError, match="2 class folder"):
        preflight(hospital, load_run_config({"num-classes": 3}))
    (images / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="expected only class folders"):
        preflight(hospital)


# ---------------------------------------------------------------------------- 17.5


def test_local_refuses_hospitals_sharing_a_state_dir(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    shared = str(tmp_path / "state")
    one = hospital_file(tmp_path, "one", **{"data-source": "synthetic", "state-dir": shared})
    two = hospital_file(tmp_path, "two", **{"data-source": "synthetic", "state-dir": shared})
    line = local_fails(capsys, tmp_path, "--hospital", one, "--hospital", two)
    assert "hospitals one and two share the state dir" in line
    nested = hospital_file(
        tmp_path, "two", **{"data-source": "synthetic", "state-dir": shared + "/inner"}
    )
    line = local_fails(capsys, tmp_path, "--hospital", one, "--hospital", nested)
    assert "share the state dir" in line


def test_a_state_dir_is_locked_by_one_node(tmp_path: Path) -> None:
    state = tmp_path / "state"
    holder = subprocess.Popen(
        [
            sys.executable, "-c",
            "import sys, time; from pathlib import Path; from fedclinic.site import "
            "state_dir_lock\nwith state_dir_lock(Path(sys.argv[1]), 'hospital st-mary'):\n"
            "    print('locked', flush=True); time.sleep(60)",
            str(state),
        ],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError) as caught, state_dir_lock(state, "hospital county"):
            pass
        message = str(caught.value)
        assert "is in use by another hospital node (hospital st-mary, pid" in message
        assert "\n" not in message
    finally:
        holder.kill()
        holder.wait()
    with state_dir_lock(state, "hospital county"):  # released when its holder died
        assert "hospital county" in (state / ".fedclinic-node.lock").read_text()


# ---------------------------------------------------------------------------- hospital


@pytest.fixture
def site(tmp_path: Path) -> dict[str, str]:
    pki = provision(tmp_path / "pki", ["st-mary"])
    return {"ca": str(pki.ca_cert), "key": str(pki.hospitals["st-mary"].private_key)}


def free_port() -> int:
    """A port nothing listens on now (the defaults may be taken by a concurrent test's node)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def hospital_fails(
    capsys: pytest.CaptureFixture[str], site: dict[str, str], config: str, *extra: str
) -> str:
    argv = ["hospital", "--superlink", "coordinator:9092", "--ca", site["ca"]]
    code = main([*argv, "--key", site["key"], "--config", config, *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err, err
    return err


@pytest.mark.parametrize(
    ("keys", "fragment"),
    [
        ({}, "key 'data-source' is required but missing"),
        ({"data-source": "synthetc"}, "did you mean 'synthetic'"),
        ({"data-source": "medmnist", "data-path": "<dir>"}, "MedMNIST file not found"),
        ({"data-source": "synthetic", "data-path": "<dir>"}, "not allowed with data-source"),
        ({"data-source": "segmentation-folder", "data-path": "<dir>"}, "images/ and masks/"),
    ],
)
def test_hospital_checks_its_config_before_start(
    capsys: pytest.CaptureFixture[str],
    site: dict[str, str],
    tmp_path: Path,
    keys: dict[str, str],
    fragment: str,
) -> None:
    (tmp_path / "d").mkdir()
    keys = {k: str(tmp_path / "d") if v == "<dir>" else v for k, v in keys.items()}
    config = hospital_file(tmp_path, "st-mary", **keys)
    assert fragment in hospital_fails(capsys, site, config)


def test_hospital_names_a_port_in_use_and_the_option(
    capsys: pytest.CaptureFixture[str], site: dict[str, str], tmp_path: Path
) -> None:
    config = hospital_file(tmp_path, "st-mary", **{"data-source": "synthetic"})
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        health = f"--health-server-address=127.0.0.1:{free_port()}"
        line = hospital_fails(capsys, site, config, f"--runtime-port={port}", health)
        assert f"--runtime-port: port {port} on 127.0.0.1 is in use" in line
        assert "with --runtime-port" in line
        runtime = f"--runtime-port={free_port()}"
        line = hospital_fails(
            capsys, site, config, runtime, f"--health-server-address=127.0.0.1:{port}"
        )
        assert f"--health-server-address: port {port} on 127.0.0.1 is in use" in line


def test_container_paths_are_defaults_only_in_a_container(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEDCLINIC_CONTAINER", "0")
    assert main(["hospital", "--superlink", "coordinator:9092"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--ca is required outside the hospital container" in err and "/certs/ca.crt" in err
    monkeypatch.setenv("FEDCLINIC_CONTAINER", "1")
    assert main(["hospital", "--superlink", "coordinator:9092"]) == 2
    err = capsys.readouterr().err.strip()
    assert "hospital config file '/config/hospital.toml' does not exist" in err


def test_hospital_lock_is_held_while_the_node_runs(tmp_path: Path) -> None:
    """A second ``fedclinic hospital`` on a state dir in use stops with one line."""
    state = tmp_path / "state"
    with state_dir_lock(state, "hospital st-mary"):
        pki = provision(tmp_path / "pki", ["county"])
        config = hospital_file(tmp_path, "county", **{"data-source": "synthetic"})
        flat = {"hospital": "county", "data-source": "synthetic", "state-dir": str(state)}
        write_flat_toml(Path(config), flat)
        done = subprocess.run(
            [
                sys.executable, "-m", "fedclinic.cli", "hospital", "--superlink", "127.0.0.1:1",
                "--ca", str(pki.ca_cert), "--key", str(pki.hospitals["county"].private_key),
                "--config", config, f"--runtime-port={free_port()}",
                f"--health-server-address=127.0.0.1:{free_port()}",
            ],
            cwd=ROOT, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: state dir '{state}' is in use by another hospital node")
    assert "hospital st-mary" in last and "joining" not in done.stderr  # nothing started


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_refused_before_start(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    args = two_hospitals(tmp_path, **{"data-source": "synthetic", "device": "cuda"})
    assert "'device' = 'cuda' is not allowed: no CUDA GPU is visible" in local_fails(
        capsys, tmp_path, *args
    )
