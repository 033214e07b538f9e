"""Flower's executables are found the way the OS finds them, wherever pip put them.

The trial on a Debian base image: pip (system Python) put flower-superlink & co. in
/usr/local/bin while the interpreter is /usr/bin/python3; looking next to ``sys.executable``
only failed there. The lookup takes the interpreter's scripts directory (``sysconfig``), the
user scheme's, the interpreter's directory and ``PATH``, and wants all four tools together.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from fedclinic.flower import EXECUTABLES, FlowerNotFound, flower_bin_dir, script_dirs


def tools(directory: Path, names: tuple[str, ...] = EXECUTABLES, mode: int = 0o755) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name in names:
        (directory / name).write_text("#!/bin/sh\n")
        (directory / name).chmod(mode)
    return directory


def no_scripts_dirs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """An interpreter whose scripts dirs and own dir hold nothing (like /usr/bin/python3 with
    the tools in /usr/local/bin, which only PATH names)."""
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setattr(sysconfig, "get_path", lambda *a, **k: str(empty))
    monkeypatch.setattr(sys, "executable", str(empty / "python3"))


def test_the_scripts_dir_comes_first() -> None:
    dirs = script_dirs(path="/usr/local/bin:/usr/bin")
    assert dirs[0] == Path(sysconfig.get_path("scripts"))
    assert Path(sys.executable).parent in dirs
    assert dirs[-2:] == [Path("/usr/local/bin"), Path("/usr/bin")]
    assert len(dirs) == len(set(dirs))


def test_found_on_path_when_not_next_to_the_interpreter(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    no_scripts_dirs(monkeypatch, tmp_path)
    local = tools(tmp_path / "usr-local-bin")
    assert flower_bin_dir(path=f"{tmp_path / 'nothing'}{os.pathsep}{local}") == local


def test_all_four_from_one_directory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A directory with only some of them (an old flwr elsewhere on PATH) is skipped."""
    no_scripts_dirs(monkeypatch, tmp_path)
    partial = tools(tmp_path / "partial", EXECUTABLES[:2])
    not_executable = tools(tmp_path / "noexec", mode=0o644)
    complete = tools(tmp_path / "complete")
    search = os.pathsep.join(map(str, (partial, not_executable, complete)))
    assert flower_bin_dir(path=search) == complete


def test_missing_everywhere_is_one_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    no_scripts_dirs(monkeypatch, tmp_path)
    with pytest.raises(FlowerNotFound) as caught:
        flower_bin_dir(path=str(tools(tmp_path / "partial", EXECUTABLES[:1])))
    message = str(caught.value)
    assert "flower-superlink, flower-supernode, flower-superexec, flwr not found" in message
    assert str(tmp_path / "partial") in message and "flwr==1.39.0" in message


def test_real_lookup_without_the_venv_on_path() -> None:
    """This environment's tools, found with a PATH that does not name the venv."""
    code = "from fedclinic.local.federation import flower_bin_dir; print(flower_bin_dir())"
    done = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    found = Path(done.stdout.strip())
    assert all(os.access(found / name, os.X_OK) for name in EXECUTABLES)
    assert found == Path(sysconfig.get_path("scripts"))
