"""The Flower app project a run's FAB is built from, for a checkout and for an installed package.

``flwr run`` bundles a directory holding ``pyproject.toml`` (with ``[tool.flwr.app]``) and the
app's code. In a checkout (or an editable install) that is the repository. A normal install
(``pip install .``, the images) has the code in site-packages and no repository: the wheel
carries a copy of the project's ``pyproject.toml`` as a data file (``share/fedclinic/``, see
``[tool.setuptools.data-files]``), and :func:`assemble_app_dir` lays the installed packages out
next to it, so ``fedclinic submit`` needs no ``--app-dir`` there.
"""

from __future__ import annotations

import importlib.util
import shutil
import tomllib
from importlib import metadata
from pathlib import Path

from fedclinic.errors import ConfigError

DISTRIBUTION = "fedclinic"
#: The packages the FAB carries (``fab-include`` in pyproject.toml picks their ``*.py``).
APP_PACKAGES = ("fedclinic", "server", "client", "strategies")
INSTALLED_PYPROJECT = "share/fedclinic/pyproject.toml"


def is_app_dir(directory: Path) -> bool:
    """Whether ``directory`` holds a ``pyproject.toml`` with a ``[tool.flwr.app]`` table."""
    try:
        data = tomllib.loads((directory / "pyproject.toml").read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
        return False
    return "app" in data.get("tool", {}).get("flwr", {})


def package_dir(name: str) -> Path:
    """Where the importable package ``name`` lives (without importing it)."""
    spec = importlib.util.find_spec(name)
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations:
        raise ConfigError(f"package '{name}' is not installed: reinstall fedclinic")
    return Path(locations[0])


def source_app_dir() -> Path | None:
    """The checkout this code runs from (editable install), if it is one."""
    root = package_dir("fedclinic").parent
    return root if is_app_dir(root) else None


def installed_pyproject() -> Path:
    """The ``pyproject.toml`` a normal install of fedclinic carries."""
    try:
        files = metadata.distribution(DISTRIBUTION).files or []
    except metadata.PackageNotFoundError:
        raise ConfigError("fedclinic is not installed: pass --app-dir") from None
    for file in files:
        if file.as_posix().endswith(INSTALLED_PYPROJECT):
            path = Path(str(file.locate()))
            if path.is_file():
                return path
    raise ConfigError(
        f"this fedclinic install has no {INSTALLED_PYPROJECT}: reinstall it (pip install .) "
        "or pass --app-dir with the project directory"
    )


def assemble_app_dir(destination: Path) -> Path:
    """``destination/fedclinic``: the installed pyproject.toml and packages, ready for ``flwr
    run`` (Flower takes the project name from the directory's name)."""
    app = destination / DISTRIBUTION
    app.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(installed_pyproject(), app / "pyproject.toml")
    for name in APP_PACKAGES:
        shutil.copytree(
            package_dir(name),
            app / name,
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
            dirs_exist_ok=True,
        )
    return app


def default_app_dir(scratch: Path) -> Path:
    """The checkout when running from one, else an app dir assembled under ``scratch``."""
    return source_app_dir() or assemble_app_dir(scratch)
