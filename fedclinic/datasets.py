"""The public data the benchmarks use: where it is, and fetching it from its publisher.

Why: the benchmarks and some tests read PneumoniaMNIST and the UCI heart-disease files;
a newcomer cloning the repository has neither. ``fedclinic datasets fetch NAME`` downloads
them from their official sources and checks them against checksums recorded here, so a
benchmark number always comes from known bytes; ``fedclinic datasets path NAME`` says where
a data set is and, with ``--verify``, which recorded version it is.

Where (:func:`dataset_path`): ``$FEDCLINIC_DATA`` (default: the per-user data folder,
``~/.local/share/fedclinic`` on Linux), then ``../shared/data`` beside the repository
checkout (``$FEDCLINIC_SHARED_DATA`` elsewhere); the layout is the same in both
(``pneumoniamnist.npz``, ``heart_disease/``).

What is verified how (the checksums below):

* heart-disease: the four ``processed.*.data`` files of the UCI Machine Learning
  Repository's Heart Disease data set, by SHA-256. The values were computed from the copies
  this project's CI reads; UCI publishes no checksum, so "official" here means "the same
  bytes as the copies the recorded results come from".
* pneumoniamnist: MedMNIST v2/v3's ``pneumoniamnist.npz`` (28x28) on Zenodo (record
  10519652), by the MD5 that MedMNIST itself records for it (``medmnist/info.py`` of the
  medmnist 3.0.2 package: ``28209eda62fecd6e6a2d98b1501bb15f``; Zenodo also lists MD5s). No
  SHA-256 of the official file is recorded because none was published and the file could
  not be downloaded where this was written; ``fetch`` prints the SHA-256 it computed. The
  copy beside this project's CI is *not* that file: exact duplicate images were merged
  (4690/524/621 images instead of 4708/524/624); ``path --verify`` recognises it by its
  SHA-256 and says so.

A download goes to a temporary name in the destination folder and is moved into place only
once every file matches its checksum: a corrupted or interrupted download leaves nothing at
the final path.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from platformdirs import user_data_dir

from fedclinic.errors import ConfigError, FedClinicError, IntegrityError

ENVIRONMENT = "FEDCLINIC_DATA"
SHARED_ENVIRONMENT = "FEDCLINIC_SHARED_DATA"
#: ``../shared/data`` beside the repository checkout (where CI keeps its copies), read in
#: place and never copied; ``$FEDCLINIC_SHARED_DATA`` points elsewhere (a git worktree, a
#: benchmark machine whose copies live somewhere else)
SHARED = Path(
    os.environ.get(
        SHARED_ENVIRONMENT, Path(__file__).resolve().parents[1].parent / "shared" / "data"
    )
)
TIMEOUT_S = 60.0
UCI = "https://archive.ics.uci.edu/ml/machine-learning-databases/heart-disease/"
ZENODO = "https://zenodo.org/records/10519652/files/"


@dataclass(frozen=True)
class RemoteFile:
    """One published file and the checksum it is verified by."""

    name: str
    url: str
    sha256: str = ""
    md5: str = ""  # only where the publisher records no SHA-256

    def check(self, path: Path) -> str:
        """Empty when ``path`` matches, else why not."""
        if self.sha256:
            actual = file_digest(path, "sha256")
            return "" if actual == self.sha256 else f"SHA-256 {actual}, expected {self.sha256}"
        actual = file_digest(path, "md5")
        return "" if actual == self.md5 else f"MD5 {actual}, expected {self.md5}"


@dataclass(frozen=True)
class PublicDataset:
    """A data set: its place under a data folder and its files."""

    name: str
    path: str  # a file, or a folder holding ``files``
    files: tuple[RemoteFile, ...]
    source: str
    #: other recorded versions: SHA-256 of the file at ``path`` -> what it is
    variants: tuple[tuple[str, str], ...] = ()

    @property
    def is_folder(self) -> bool:
        return self.path != self.files[0].name


DATASETS: dict[str, PublicDataset] = {
    "pneumoniamnist": PublicDataset(
        "pneumoniamnist",
        "pneumoniamnist.npz",
        (
            RemoteFile(
                "pneumoniamnist.npz",
                ZENODO + "pneumoniamnist.npz?download=1",
                md5="28209eda62fecd6e6a2d98b1501bb15f",  # MedMNIST 3.0.2 info.py
            ),
        ),
        "MedMNIST v2 (Yang et al., Scientific Data 2023) on Zenodo, CC BY 4.0",
        variants=(
            (
                "8d9bfd5e39e062eefc802dac8a1ace1d90b89a113a130d1547ac3a9634a5d367",
                "this project's CI copy: exact duplicate images merged (train/val/test "
                "4690/524/621, official 4708/524/624); not the Zenodo file",
            ),
        ),
    ),
    "heart-disease": PublicDataset(
        "heart-disease",
        "heart_disease",
        tuple(
            RemoteFile(f"processed.{centre}.data", f"{UCI}processed.{centre}.data", sha256)
            for centre, sha256 in (
                ("cleveland", "a74b7efa387bc9d108d7d0115d831fe9b414b29ae7124f331b622b4efa0427c8"),
                ("hungarian", "d1ad108f785768cd3d7e82dc522e6f5a61eea93cccfb3a46ee8076f73fc3d796"),
                ("switzerland", "834a405ccf5b66ab4056bb77794adc8df0b7125186454c0a1d002d33c6c3b314"),
                ("va", "e7c93d8d0d2acdadfa4c5e8de768e2191e7f618b952e29623f1f0d5949ff6b8f"),
            )
        ),
        "UCI Machine Learning Repository, Heart Disease (Janosi et al., 1988), CC BY 4.0",
    ),
}


def file_digest(path: Path, algorithm: str) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, algorithm).hexdigest()


def _dataset(name: str) -> PublicDataset:
    if name not in DATASETS:
        raise ConfigError(
            f"unknown data set {name!r}: expected one of {', '.join(sorted(DATASETS))}"
        )
    return DATASETS[name]


def data_home() -> Path:
    """``$FEDCLINIC_DATA``, else the per-user data folder (where ``fetch`` writes)."""
    configured = os.environ.get(ENVIRONMENT, "")
    return Path(configured).expanduser() if configured else Path(user_data_dir("fedclinic"))


def data_roots() -> list[Path]:
    """Where data sets are looked for, in order."""
    return [data_home(), SHARED]


def dataset_path(name: str) -> Path:
    """Where data set ``name`` is (its file or folder); what benchmarks and tests call."""
    dataset = _dataset(name)
    for root in data_roots():
        candidate = root / dataset.path
        if candidate.exists():
            return candidate
    places = " or ".join(str(r / dataset.path) for r in data_roots())
    raise FedClinicError(
        f"data set {name!r} not found at {places}: run 'fedclinic datasets fetch {name}' "
        f"(or set {ENVIRONMENT} to the folder that holds it)"
    )


def verify(name: str, path: Path) -> str:
    """One line: which recorded version the data set at ``path`` is (raises when none)."""
    dataset = _dataset(name)
    if not dataset.is_folder and dataset.variants:
        digest = file_digest(path, "sha256")
        for sha256, what in dataset.variants:
            if digest == sha256:
                return f"{path}: {what}"
    problems = []
    for file in dataset.files:
        target = path / file.name if dataset.is_folder else path
        if not target.is_file():
            problems.append(f"{file.name} is missing")
        elif why := file.check(target):
            problems.append(f"{file.name} has {why}")
    if problems:
        raise IntegrityError(f"{path}: not a recorded version of {name}: {'; '.join(problems)}")
    return f"{path}: the published files ({dataset.source}), checksums match"


def _download(url: str, handle: BinaryIO) -> None:
    """Stream ``url`` into ``handle``; a short body (connection lost) is an error."""
    request = urllib.request.Request(url, headers={"User-Agent": "fedclinic"})
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
        expected = response.headers.get("Content-Length")
        copied = 0
        while block := response.read(1 << 20):
            handle.write(block)
            copied += len(block)
        if expected is not None and copied != int(expected):
            raise OSError(f"the download stopped after {copied} of {expected} bytes")


def fetch(name: str, directory: Path | None = None, mirror: str = "") -> Path:
    """Download data set ``name`` into ``directory`` (default :func:`data_home`), verified.

    ``mirror``: a base URL serving the same file names (a hospital's proxy, the tests' local
    server) instead of the official addresses. Already there and matching: nothing is
    downloaded. Returns the data set's path.
    """
    dataset = _dataset(name)
    home = (directory or data_home()).expanduser()
    final = home / dataset.path
    if final.exists():
        verify(name, final)  # raises when it is something else: never overwritten
        return final
    home.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dataset.path}.", suffix=".part", dir=home))
    try:
        for file in dataset.files:
            url = f"{mirror.rstrip('/')}/{file.name}" if mirror else file.url
            target = staging / file.name
            try:
                with target.open("wb") as handle:
                    _download(url, handle)
            except (OSError, ValueError) as err:
                raise FedClinicError(
                    f"{name}: downloading {file.name} from {url} failed ({err}); nothing was "
                    f"kept at {final}"
                ) from None
            if why := file.check(target):
                raise IntegrityError(
                    f"{name}: the downloaded {file.name} has {why}: not the published file; "
                    f"nothing was kept at {final}"
                )
        if dataset.is_folder:
            os.replace(staging, final)
        else:
            os.replace(staging / dataset.files[0].name, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


# ---------------------------------------------------------------------------- command line


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``fedclinic datasets fetch NAME`` and ``fedclinic datasets path NAME``."""
    parser = subparsers.add_parser(
        "datasets",
        help="public benchmark data: fetch it with checksums, or say where it is",
        description="Download the public data the benchmarks use from its publishers, its "
        f"checksums verified, or say where it is (${ENVIRONMENT}, default the per-user data "
        "folder, then ../shared/data beside the checkout).",
    )
    commands = parser.add_subparsers(dest="datasets_command", required=True)
    get = commands.add_parser(
        "fetch", help="download a data set from its publisher and verify its checksums"
    )
    get.add_argument("name", choices=sorted(DATASETS))
    get.add_argument(
        "--dir", type=Path, metavar="DIR",
        help=f"where to put it (default: ${ENVIRONMENT}, else the per-user data folder)",
    )  # fmt: skip
    get.add_argument(
        "--mirror", default="", metavar="URL",
        help="a base URL serving the same file names instead of the official source",
    )  # fmt: skip
    get.set_defaults(handler=_run_fetch)
    where = commands.add_parser("path", help="print where a data set is")
    where.add_argument("name", choices=sorted(DATASETS))
    where.add_argument(
        "--verify", action="store_true", help="also say which recorded version it is"
    )
    where.set_defaults(handler=_run_path)


def _run_fetch(args: argparse.Namespace) -> int:
    path = fetch(args.name, args.dir, args.mirror)
    print(verify(args.name, path))
    dataset = DATASETS[args.name]
    for file in dataset.files:
        target = path / file.name if dataset.is_folder else path
        print(f"  {file.name}: sha256 {file_digest(target, 'sha256')}")
    return 0


def _run_path(args: argparse.Namespace) -> int:
    path = dataset_path(args.name)
    print(verify(args.name, path) if args.verify else path)
    sys.stdout.flush()
    return 0
