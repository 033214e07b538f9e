"""The coordinator's checkpoint: everything a run needs to go on after a crash.

After every completed round the round engine replaces ``checkpoint.pkl`` in the run's output
directory (temporary file + rename, so a crash mid-write leaves the previous checkpoint): the
round number, the global model, the engine's state (hospital names, model selection so far)
and the algorithm's (pFedNet's personalised columns and graph, Fed-MAS's weight history,
FedHelp's roles, ...), how many metric rows were written, the RNG states, and the site key
hospitals file their state under.

A run started with ``resume = true`` and the same ``output-dir`` loads it and goes on from the
next round. Only settings that cannot change the arithmetic may differ from the checkpointed
run (:data:`MAY_CHANGE_ON_RESUME`); anything else is refused with the key named.

The file is a Python pickle written by the coordinator for itself, in its own output
directory; it is never received from a hospital. Loading runs pickle, so protect the output
directory like the coordinator's code.
"""

from __future__ import annotations

import os
import pickle
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedclinic.errors import ConfigError, IntegrityError

CHECKPOINT_FILE = "checkpoint.pkl"
#: 2: ``strategy`` holds ``{"engine": ..., "algorithm": ...}`` (the round engine's layout)
FORMAT = 2
#: run-config keys a resumed run may set differently (more rounds, patience, where to resume)
MAY_CHANGE_ON_RESUME = frozenset({"rounds", "resume", "round-timeout", "min-hospitals"})
#: keys newer than some checkpoints, with the value a run before them had: a checkpoint
#: without the key is compared as if it had that value
ADDED_KEYS: dict[str, Any] = {"wire-dtype": "float32"}


@dataclass
class Checkpoint:
    """The coordinator's state after ``round`` completed rounds."""

    round: int
    arrays: dict[str, np.ndarray]
    config: dict[str, Any]
    site_key: str
    rows: int
    strategy: dict[str, Any] = field(default_factory=dict)
    rng: dict[str, Any] = field(default_factory=dict)
    format: int = FORMAT


def rng_states() -> dict[str, Any]:
    """Python's, NumPy's and torch's global generators."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.random.get_rng_state(),
    }


def restore_rng(states: dict[str, Any]) -> None:
    if "python" in states:
        random.setstate(states["python"])
    if "numpy" in states:
        np.random.set_state(states["numpy"])
    if "torch" in states:
        torch.random.set_rng_state(states["torch"])


def save(directory: Path, checkpoint: Checkpoint) -> Path:
    """Atomically replace ``<directory>/checkpoint.pkl``."""
    target = Path(directory) / CHECKPOINT_FILE
    temporary = target.with_suffix(".pkl.tmp")
    with temporary.open("wb") as handle:
        pickle.dump(checkpoint, handle, protocol=pickle.HIGHEST_PROTOCOL)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, target)
    return target


def load(directory: Path) -> Checkpoint:
    """The checkpoint in ``directory``, or one clear error naming the file."""
    path = Path(directory) / CHECKPOINT_FILE
    if not path.is_file():
        raise ConfigError(
            f"run config: resume = true, but '{path}' does not exist; set output-dir to the "
            "directory of the run to resume (it writes a checkpoint after every round)"
        )
    try:
        with path.open("rb") as handle:
            checkpoint = pickle.load(handle)
    except Exception as err:  # pickle raises many types for a damaged file
        raise IntegrityError(f"checkpoint '{path}' is unreadable or corrupt: {err}") from None
    if not isinstance(checkpoint, Checkpoint):
        raise IntegrityError(f"checkpoint '{path}' is not a fedclinic checkpoint")
    if checkpoint.format != FORMAT:
        raise IntegrityError(
            f"checkpoint '{path}' has format {checkpoint.format}; this coordinator resumes "
            f"format {FORMAT} only (resume with the fedclinic version that wrote it)"
        )
    return checkpoint


def check_same_run(saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse to resume under a config that would compute something else."""
    for key in sorted(set(saved) | set(current)):
        if key in MAY_CHANGE_ON_RESUME:
            continue
        before = saved.get(key, ADDED_KEYS.get(key, "<unset>"))
        now = current.get(key, "<unset>")
        if before != now:
            raise ConfigError(
                f"run config: key '{key}' is {now!r}, but the checkpointed run used {before!r}; "
                f"resume with the run's own config (only {', '.join(sorted(MAY_CHANGE_ON_RESUME))}"
                " may change)"
            )
