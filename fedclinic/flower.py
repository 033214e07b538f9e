"""Flower's executables, found the way the OS finds them, and the environment they run in.

Standard library only: ``fedclinic coordinator``, ``hospital``, ``register``/``submit`` and the
local federation all need it before anything else, and none of them should pay for torch to
find a program.

Where pip puts ``flower-superlink`` & co. depends on the install: a venv's ``bin`` (next to
``sys.executable``), ``/usr/local/bin`` for a Debian system Python (``sysconfig``'s
``posix_local`` scheme; the interpreter is ``/usr/bin/python3``), ``~/.local/bin`` for ``pip
install --user``. Looking only next to ``sys.executable`` failed on a Debian base image.
"""

from __future__ import annotations

import contextlib
import os
import sys
import sysconfig
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import TypeVar

from fedclinic.errors import FedClinicError

T = TypeVar("T")

EXECUTABLES = ("flower-superlink", "flower-supernode", "flower-superexec", "flwr")
#: the Flower release whose private names fedclinic's launchers (:mod:`fedclinic.superlink`,
#: :mod:`fedclinic.supernode`) and the site worker's executor rely on
FLWR_VERSION = "1.39.0"
EXIT_REFUSED = 2


class LauncherError(FedClinicError):
    """This Flower is not the one a launcher was written against; nothing was started."""


def require_flower(what: str, check: str, installed: str | None = None) -> None:
    """Refuse any flwr but :data:`FLWR_VERSION` (``installed`` defaults to the real one):
    ``what`` relies on its private names, ``check`` says what to re-read before moving."""
    version = metadata.version("flwr") if installed is None else installed
    if version != FLWR_VERSION:
        raise LauncherError(
            f"{what} was written against flwr=={FLWR_VERSION}, found flwr=={version}: {check}"
        )


def launch(program: str, prepare: Callable[[], T], start: Callable[[T], None]) -> int:
    """A launcher's ``main``: ``prepare()`` (a :class:`LauncherError` is one ``error:`` line
    and exit 2, nothing started), then ``start`` with what it returned, as ``program`` (the
    name Flower's argparse uses in its messages)."""
    try:
        prepared = prepare()
    except LauncherError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_REFUSED
    sys.argv[0] = program
    start(prepared)
    return 0


class FlowerNotFound(FedClinicError):
    """Flower's executables are not installed where this Python (or PATH) can find them."""


def flower_environment(bin_dir: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for every Flower process: offline, unbuffered, Flower's tools first.

    The daemons start ``flower-superexec`` and ``flwr-*app`` by name, so the directory that
    holds them (and our code's interpreter) must come first on ``PATH``.
    """
    env = dict(os.environ if base is None else base)
    env.update(
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        PYTHONUNBUFFERED="1",
        PATH=os.pathsep.join([str(bin_dir), env.get("PATH", "")]).rstrip(os.pathsep),
    )
    return env


def script_dirs(path: str | None = None) -> list[Path]:
    """Where Flower's executables may be, in the order the OS and pip put them there.

    The running interpreter's scripts directory first (``sysconfig``: a venv's ``bin``, or
    ``/usr/local/bin`` for a Debian system Python), then its user-scheme one (``pip install
    --user``), the interpreter's own directory (not resolved: a venv's ``python`` is a symlink
    to the base interpreter, whose directory does not hold the venv's scripts), then ``PATH``.
    """
    candidates = [sysconfig.get_path("scripts")]
    with contextlib.suppress(KeyError):
        candidates.append(sysconfig.get_path("scripts", f"{os.name}_user"))
    candidates.append(str(Path(sys.executable).parent))
    search = os.environ.get("PATH", "") if path is None else path
    candidates += [entry for entry in search.split(os.pathsep) if entry]
    return list(dict.fromkeys(Path(c) for c in candidates if c))


def flower_bin_dir(path: str | None = None) -> Path:
    """The first of :func:`script_dirs` that holds all of Flower's executables.

    All from one directory: the daemons start ``flower-superexec`` and ``flwr-*app`` by name,
    so :func:`flower_environment` puts this directory first on their ``PATH``.
    """
    dirs = script_dirs(path)
    for directory in dirs:
        if all(os.access(directory / name, os.X_OK) for name in EXECUTABLES):
            return directory
    raise FlowerNotFound(
        f"{', '.join(EXECUTABLES)} not found together in the interpreter's scripts "
        f"directory, next to {sys.executable} or on PATH (looked in "
        f"{', '.join(map(str, dirs[:4]))}{', ...' if len(dirs) > 4 else ''}); install "
        "flwr==1.39.0 into this Python environment"
    )
