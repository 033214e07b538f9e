"""State a hospital keeps on its own disk across rounds and restarts (never sent anywhere).

Personalised parameters, local-only models and FedHelp's private large models live here,
under ``<state-dir>/<site key>/``. The site key comes from the coordinator (``site-key`` in
every round's config: the run's ``run-name``, or the id of the Flower run that started it),
so a run resumed under a new Flower run id finds the same state again.

Every save is versioned by the round that wrote it (``<name>.round-<r>.pt``, the newest
three kept, and the versions of the model round selected on validation data, below). A
message of round ``r`` reads the newest version from a round before ``r``: when a
coordinator crash makes a hospital train round ``r`` a second time, it starts from the same
site state as the first time, so a resumed run equals an uninterrupted one. What a message
saved itself it reads back as saved.

The selected model must outlive the newest three: every message says which model round the
coordinator has selected so far (``selected-round``), and the versions a message of the
round that evaluated it may have deployed stay on disk: the newest version up to that model
round (what it read) and the version of the round after it (what it wrote before
evaluating: pFedNet's personal model).
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import re
from collections.abc import Iterator
from logging import WARNING
from pathlib import Path

import torch
from flwr.common import log

from fedclinic.config import HospitalConfig, RunConfig
from fedclinic.errors import ConfigError
from fedclinic.serialization import State, file_sha256, load_checkpoint, save_checkpoint

#: versions of each entry kept on disk (a retried round needs the one before it)
KEPT_VERSIONS = 3
_VERSION = re.compile(r"^(?P<name>.+)\.round-(?P<round>\d+)\.pt$")


def run_site_key(run_name: str, run_id: int) -> str:
    """The key a run's site state is filed under: the run's ``run-name``, else the id of
    the Flower run that started it. Decided here only; the coordinator sends it in every
    message, and a resumed run keeps the key of the run it resumes."""
    return run_name or f"run-{run_id}"


def default_state_dir(hospital: HospitalConfig) -> Path:
    return Path.home() / ".fedclinic" / "state" / hospital.hospital


def effective_state_dir(hospital: HospitalConfig) -> Path:
    """The hospital's ``state-dir``, or the per-user default when it has none."""
    return (
        Path(hospital.state_dir).expanduser() if hospital.state_dir else default_state_dir(hospital)
    )


LOCK_FILE = ".fedclinic-node.lock"


@contextlib.contextmanager
def state_dir_lock(directory: Path, holder: str) -> Iterator[Path]:
    """Hold an exclusive OS lock on ``directory`` for as long as a hospital node runs.

    Two nodes on one state dir would silently share private state: the second one gets a
    one-line :class:`ConfigError` naming the holder. ``flock`` locks are released by the
    kernel when the process exits, however it exits, so a crash leaves no stale lock.
    """
    try:
        directory.mkdir(parents=True, exist_ok=True)
        handle = (directory / LOCK_FILE).open("a+", encoding="utf-8")
    except OSError as err:
        raise ConfigError(
            f"hospital config: key 'state-dir' = '{directory}' cannot be used: {err.strerror}"
        ) from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            other = handle.read().strip() or "another process"
            raise ConfigError(
                f"state dir '{directory}' is in use by another hospital node ({other}): two "
                "nodes must not share site state; give this one its own state-dir"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{holder}, pid {os.getpid()}\n")
        handle.flush()
        try:
            yield directory
        finally:
            handle.seek(0)
            handle.truncate()
            fcntl.flock(handle, fcntl.LOCK_UN)


class SiteState:
    """Named tensor dictionaries persisted atomically at one hospital for one run.

    ``server_round`` is the round of the message being answered; 0 (outside rounds, and in
    unit tests) reads the newest version of an entry, whichever round wrote it.
    """

    def __init__(self, directory: Path, server_round: int = 0) -> None:
        self.directory = directory
        self.server_round = server_round
        self.written: set[str] = set()
        self.selected_round: int | None = None

    @classmethod
    def for_run(
        cls,
        hospital: HospitalConfig,
        run: RunConfig,
        run_id: int,
        server_round: int = 0,
        site_key: str = "",
    ) -> SiteState:
        root = effective_state_dir(hospital)
        key = site_key or run_site_key(run.run_name, run_id)
        if Path(key).name != key or key in (".", ".."):
            raise ConfigError(f"site key '{key}' from the coordinator is not a plain name")
        return cls(root / key, server_round)

    def versions(self, name: str) -> dict[int, Path]:
        """Every stored version of ``name``: round -> file."""
        found: dict[int, Path] = {}
        if self.directory.is_dir():
            for file in self.directory.glob(f"{glob.escape(name)}.round-*.pt"):
                match = _VERSION.match(file.name)
                if match and match["name"] == name:
                    found[int(match["round"])] = file
        return found

    def path(self, name: str) -> Path:
        """The version this message reads (or would write, when there is none to read)."""
        versions = self.versions(name)
        if name in self.written or self.server_round == 0:
            readable = versions
        else:
            readable = {r: p for r, p in versions.items() if r < self.server_round}
        if readable:
            return readable[max(readable)]
        return self.directory / f"{name}.round-{self.server_round}.pt"

    def has(self, name: str) -> bool:
        return self.path(name).is_file()

    def load(self, name: str) -> State:
        return load_checkpoint(self.path(name))

    def keep_selected(self, model_round: int) -> None:
        """Keep the versions the selected model round deployed (the coordinator's
        ``selected-round``) when older versions are removed."""
        self.selected_round = model_round

    def save(self, name: str, state: dict[str, torch.Tensor]) -> dict[str, str]:
        """Save this round's version and return the file and content hashes (reported to the
        coordinator); versions beyond the newest :data:`KEPT_VERSIONS` are removed, but for
        those of the selected model round."""
        target = self.directory / f"{name}.round-{self.server_round}.pt"
        before = file_sha256(target) if target.is_file() and name not in self.written else None
        saved = save_checkpoint(target, state)
        if before is not None and before != saved["sha256"]:  # another message of this round
            log(WARNING, "site state %s of round %d written again by another message: "
                "SHA-256 %s -> %s", target, self.server_round, before[:12],
                saved["sha256"][:12])  # fmt: skip
        self.written.add(name)
        versions = self.versions(name)
        kept = set(sorted(versions)[-KEPT_VERSIONS:])
        if self.selected_round is not None:
            selected = self.selected_round
            kept |= {max((r for r in versions if r <= selected), default=-1), selected + 1}
        for old in set(versions) - kept:
            versions[old].unlink(missing_ok=True)
        return saved
