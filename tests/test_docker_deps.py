"""docker/deps.py: the images' pins, the wheelhouse and the install, offline or online.

The PyTorch CPU index is probed for real (a local HTTP server that answers, a port nobody
listens on); pip itself is not run here (`make compose-test` builds both images offline).
"""

from __future__ import annotations

import http.server
import importlib.util
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from fedclinic.local.ports import pick_free_ports

ROOT = Path(__file__).resolve().parents[1]


def load_deps() -> ModuleType:
    spec = importlib.util.spec_from_file_location("deps", ROOT / "docker" / "deps.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


deps = load_deps()


@pytest.fixture
def index() -> Iterator[str]:
    """A package index that answers ``/torch/`` (and 404 elsewhere)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            found = self.path == "/whl/cpu/torch/"
            self.send_response(200 if found else 404)
            self.end_headers()
            self.wfile.write(b"<html></html>" if found else b"")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/whl/cpu"
    server.shutdown()
    server.server_close()


def test_requirements_are_the_pins_and_what_builds_fedclinic() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = deps.pinned_requirements(ROOT / "pyproject.toml")
    assert listed[: len(project["project"]["dependencies"])] == project["project"]["dependencies"]
    assert "flwr==1.39.0" in listed and "torch==2.14.1" in listed
    assert listed[-2:] == ["setuptools>=68", "wheel"]  # offline --no-build-isolation install


def test_a_pyproject_without_dependencies_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\n')
    with pytest.raises(deps.DepsError, match="has no \\[project\\] dependencies list"):
        deps.pinned_requirements(tmp_path / "pyproject.toml")


def test_cpu_torch_from_the_cpu_index_when_it_answers(
    index: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert deps.torch_index_args("cpu", index) == ["--extra-index-url", index]
    assert f"CPU wheels from {index}" in capsys.readouterr().err


def test_the_fallback_to_pypi_torch_is_said(capsys: pytest.CaptureFixture[str]) -> None:
    unreachable = f"http://127.0.0.1:{pick_free_ports(1)[0]}/whl/cpu"
    assert deps.torch_index_args("cpu", unreachable) == []
    err = capsys.readouterr().err
    assert err.startswith(f"note: the PyTorch CPU index {unreachable} does not answer")
    assert "bundle the CUDA libraries" in err


def test_cuda_takes_pypi_and_nothing_else_is_a_variant(index: str) -> None:
    assert deps.torch_index_args("cuda", index) == []
    with pytest.raises(deps.DepsError, match="cpu or cuda"):
        deps.torch_index_args("rocm", index)


def test_install_is_offline_exactly_when_the_wheelhouse_holds_wheels(tmp_path: Path) -> None:
    wheels = tmp_path / "wheelhouse"
    wheels.mkdir()
    (wheels / "README.md").write_text("no wheels yet")
    online = deps.install_command("py", Path("r.txt"), wheels, ["--extra-index-url", "X"])
    assert "--no-index" not in online and online[-2:] == ["--extra-index-url", "X"]
    (wheels / "torch-2.14.1-cp311-cp311-manylinux_2_28_x86_64.whl").write_bytes(b"")
    offline = deps.install_command("py", Path("r.txt"), wheels, ["--extra-index-url", "X"])
    assert offline[-3:] == ["--no-index", "--find-links", str(wheels)]
    assert "--extra-index-url" not in offline


def test_required_wheels_missing_stop_before_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "wheels").mkdir()
    args = ["install", "--venv", str(tmp_path / "venv"), "--requirements", "r.txt",
            "--wheels", str(tmp_path / "wheels"), "--require-wheels"]  # fmt: skip
    assert deps.main(args) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: no wheels in '{tmp_path / 'wheels'}': run 'make wheelhouse' first"
    )
    assert not (tmp_path / "venv").exists()


def test_download_takes_wheels_only() -> None:
    command = deps.download_command("py", ["torch==2.14.1"], Path("w"), [])
    assert command[:4] == ["py", "-m", "pip", "download"]
    assert command[command.index("--only-binary") + 1] == ":all:"
    assert command[-1] == "torch==2.14.1"


def test_the_wheelhouse_torch_must_suit_the_variant(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cpu = tmp_path / "cpu"
    cpu.mkdir()
    (cpu / "torch-2.14.1+cpu-cp311-cp311-manylinux_2_28_x86_64.whl").write_bytes(b"")
    deps.check_wheelhouse_torch(cpu, "cpu")
    with pytest.raises(deps.DepsError, match=r"CPU-only torch \(2\.14\.1\+cpu\)"):
        deps.check_wheelhouse_torch(cpu, "cuda")
    pypi = tmp_path / "pypi"
    pypi.mkdir()
    (pypi / "torch-2.14.1-cp311-cp311-manylinux_2_28_x86_64.whl").write_bytes(b"")
    deps.check_wheelhouse_torch(pypi, "cuda")
    assert capsys.readouterr().err == ""
    deps.check_wheelhouse_torch(pypi, "cpu")
    err = capsys.readouterr().err
    assert "holds PyPI's torch (2.14.1), which bundles the CUDA libraries" in err
