"""The project's pinned dependencies, for the images: list them, download a wheelhouse, install.

Standard library only: it runs with a base image's ``python3`` before any venv exists, and on
an online machine to prepare the wheelhouse an air-gapped site builds from.

- ``requirements``: the pins of ``[project] dependencies`` in pyproject.toml, plus what
  building fedclinic itself needs, one per line;
- ``download --dest DIR``: ``pip download`` of those pins into a wheelhouse (``make wheelhouse``);
- ``install --venv DIR --requirements FILE [--wheels DIR]``: a venv with the pins, from the
  wheelhouse when it holds wheels (``--no-index``: nothing is fetched), else from the index.

PyTorch: ``--torch cpu`` adds the PyTorch CPU index (``--torch-index``), whose
``torch==X+cpu`` wheels carry no CUDA libraries (about 4 GB smaller with their dependencies),
when that index answers; when it does not (a network that reaches only PyPI), the fallback to
PyPI's torch, which bundles CUDA, is said in one ``note:`` line instead of happening silently.
``--torch cuda`` always takes PyPI's.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tomllib
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
#: Building fedclinic itself offline (``[build-system] requires``; ``wheel`` for setuptools'
#: bdist_wheel on older releases).
BUILD_REQUIREMENTS = ("setuptools>=68", "wheel")
PROBE_TIMEOUT = 10.0


class DepsError(RuntimeError):
    """One line for the build log: what is wrong and where."""


def pinned_requirements(pyproject: Path) -> list[str]:
    """``[project] dependencies`` of ``pyproject`` and the build requirements."""
    try:
        data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise DepsError(f"cannot read '{pyproject}': {err}") from None
    dependencies = data.get("project", {}).get("dependencies")
    if not isinstance(dependencies, list) or not dependencies:
        raise DepsError(f"'{pyproject}' has no [project] dependencies list")
    requires = data.get("build-system", {}).get("requires", list(BUILD_REQUIREMENTS[:1]))
    build = [r for r in (*requires, *BUILD_REQUIREMENTS[1:]) if r not in dependencies]
    return [*dependencies, *dict.fromkeys(build)]


def index_answers(url: str, timeout: float = PROBE_TIMEOUT) -> bool:
    """Whether the package index at ``url`` answers for torch (a simple-API page)."""
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/torch/", timeout=timeout) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError, ValueError):
        return False


def torch_index_args(variant: str, index: str, probe: bool = True) -> list[str]:
    """pip's extra index for ``variant`` (``cpu``/``cuda``), with the fallback said aloud."""
    if variant == "cuda":
        return []
    if variant != "cpu":
        raise DepsError(f"--torch must be cpu or cuda, not {variant!r}")
    if not probe or index_answers(index):
        print(f"torch: CPU wheels from {index}", file=sys.stderr, flush=True)
        return ["--extra-index-url", index]
    print(
        f"note: the PyTorch CPU index {index} does not answer from here: torch comes from "
        "PyPI, whose wheels bundle the CUDA libraries (gigabytes more; it still runs on CPU)",
        file=sys.stderr,
        flush=True,
    )
    return []


def has_wheels(folder: Path | None) -> bool:
    return folder is not None and folder.is_dir() and any(folder.glob("*.whl"))


def check_wheelhouse_torch(wheels: Path, variant: str) -> None:
    """The wheelhouse's torch must suit the variant: a CUDA image from CPU-only wheels is an
    error; a CPU image from PyPI's CUDA torch is the said fallback."""
    builds = {path.name.split("-")[1] for path in wheels.glob("torch-*.whl")}
    if not builds:
        return
    if variant == "cuda" and all(build.endswith("+cpu") for build in builds):
        raise DepsError(
            f"the wheelhouse '{wheels}' holds CPU-only torch ({', '.join(sorted(builds))}): "
            "make a CUDA one with 'make wheelhouse TORCH_VARIANT=cuda'"
        )
    if variant == "cpu" and not any(build.endswith("+cpu") for build in builds):
        print(
            f"note: the wheelhouse holds PyPI's torch ({', '.join(sorted(builds))}), which "
            "bundles the CUDA libraries: it was made where the PyTorch CPU index did not answer",
            file=sys.stderr,
            flush=True,
        )


def download_command(
    python: str, requirements: Sequence[str], dest: Path, index_args: Sequence[str]
) -> list[str]:
    """``pip download`` of every pin (and their dependencies) as wheels into ``dest``."""
    return [
        python, "-m", "pip", "download", "--disable-pip-version-check",
        "--only-binary", ":all:", "--dest", str(dest), *index_args, *requirements,
    ]  # fmt: skip


def install_command(
    venv_python: str, requirements: Path, wheels: Path | None, index_args: Sequence[str]
) -> list[str]:
    """``pip install -r`` into the venv: offline from ``wheels`` when it holds wheels."""
    command = [venv_python, "-m", "pip", "install", "--disable-pip-version-check",
               "--no-cache-dir", "--requirement", str(requirements)]  # fmt: skip
    if has_wheels(wheels):
        return [*command, "--no-index", "--find-links", str(wheels)]
    return [*command, *index_args]


def run(command: Sequence[str]) -> None:
    print("+ " + " ".join(command), file=sys.stderr, flush=True)
    done = subprocess.run(list(command), check=False)
    if done.returncode != 0:
        raise DepsError(f"'{' '.join(command[:4])} ...' failed with exit status {done.returncode}")


def cmd_requirements(args: argparse.Namespace) -> None:
    print("\n".join(pinned_requirements(args.pyproject)))


def cmd_download(args: argparse.Namespace) -> None:
    requirements = pinned_requirements(args.pyproject)
    args.dest.mkdir(parents=True, exist_ok=True)
    index_args = torch_index_args(args.torch, args.torch_index)
    run(download_command(sys.executable, requirements, args.dest, index_args))
    count = len(list(args.dest.glob("*.whl")))
    print(f"wheelhouse {args.dest}: {count} wheels for {args.torch} torch", file=sys.stderr)


def cmd_install(args: argparse.Namespace) -> None:
    """A venv (``python3 -m venv``: no base image's Python is modified) with the pins."""
    if has_wheels(args.wheels):
        print(f"offline: installing from the wheelhouse ({args.wheels}), no index",
              file=sys.stderr, flush=True)  # fmt: skip
        check_wheelhouse_torch(args.wheels, args.torch)
        index_args: list[str] = []
    elif args.require_wheels:
        raise DepsError(f"no wheels in '{args.wheels}': run 'make wheelhouse' first")
    else:
        index_args = torch_index_args(args.torch, args.torch_index)
    venv_python = args.venv / "bin" / "python"
    if not venv_python.exists():
        run([sys.executable, "-m", "venv", str(args.venv)])
    run(install_command(str(venv_python), args.requirements, args.wheels, index_args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deps.py", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("requirements", help="print the pins, one per line")
    listing.set_defaults(handler=cmd_requirements)
    download = commands.add_parser("download", help="pip download the pins into a wheelhouse")
    download.add_argument("--dest", type=Path, required=True, metavar="DIR")
    download.set_defaults(handler=cmd_download)
    install = commands.add_parser("install", help="a venv with the pins")
    install.add_argument("--venv", type=Path, required=True, metavar="DIR")
    install.add_argument("--requirements", type=Path, required=True, metavar="FILE")
    install.add_argument("--wheels", type=Path, metavar="DIR", help="a wheelhouse")
    install.add_argument(
        "--require-wheels", action="store_true", help="fail instead of going online"
    )
    install.set_defaults(handler=cmd_install)
    for sub in (listing, download):
        sub.add_argument("--pyproject", type=Path, default=Path("pyproject.toml"))
    for sub in (download, install):
        sub.add_argument("--torch", choices=("cpu", "cuda"), default="cpu")
        sub.add_argument("--torch-index", default=TORCH_CPU_INDEX, metavar="URL")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except DepsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
