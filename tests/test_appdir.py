"""``fedclinic submit`` without ``--app-dir`` on a normal install (the coordinator image): the
FAB is built from the installed files and is the very FAB the checkout builds.

A real wheel of this project is built and installed (not editable) into a fresh venv that sees
the dependencies of ours; from there the app dir is assembled, and Flower's own FAB builder
bundles both it and the checkout.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

from flwr.cli.build import build_fab_from_disk

from fedclinic.appdir import default_app_dir, source_app_dir

ROOT = Path(__file__).resolve().parents[1]


def fab_files(app: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(build_fab_from_disk(app))) as fab:
        return {name: fab.read(name) for name in fab.namelist()}


def run(command: list[str], cwd: Path) -> str:
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout


def test_the_checkout_is_its_own_app_dir(tmp_path: Path) -> None:
    assert source_app_dir() == ROOT
    assert default_app_dir(tmp_path) == ROOT
    assert not any(tmp_path.iterdir())  # nothing assembled


def test_a_normal_install_builds_the_checkouts_fab(tmp_path: Path) -> None:
    source = tmp_path / "source"  # a copy: building in place would leave build/ behind
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for package in ("fedclinic", "server", "client", "strategies"):
        shutil.copytree(ROOT / package, source / package,
                        ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), "."],
        source)  # fmt: skip
    wheel = next(tmp_path.glob("fedclinic-*.whl"))
    venv = tmp_path / "venv"
    run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", "--without-pip",
         str(venv)], tmp_path)  # fmt: skip
    python = venv / "bin" / "python"
    site = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                    tmp_path).strip())  # fmt: skip
    (site / "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")  # ours
    run([*pip, "--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel)],
        tmp_path)  # fmt: skip

    code = (
        "import sys; from pathlib import Path; import fedclinic.appdir as a; "
        "assert a.source_app_dir() is None, 'not a checkout'; "
        "print(a.package_dir('fedclinic')); print(a.default_app_dir(Path(sys.argv[1])))"
    )
    installed, app = run([str(python), "-c", code, str(tmp_path / "scratch")],
                         tmp_path).split()  # fmt: skip
    assert Path(installed).is_relative_to(site)  # the wheel's files, not the checkout's
    assert Path(app).name == "fedclinic"
    assert fab_files(Path(app)) == fab_files(ROOT)
