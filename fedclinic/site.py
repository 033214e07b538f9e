"""State a hospital keeps on its own disk across rounds and restarts (never sent anywhere).

Personalised parameters, local-only models and FedHelp's private large models live here,
under ``<state-dir>/<run key>/``. The run key is the run's ``run-name`` when set (so a
resumed run finds its state again), else Flower's run id.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fedclinic.config import HospitalConfig, RunConfig
from fedclinic.serialization import State, load_checkpoint, save_checkpoint


def default_state_dir(hospital: HospitalConfig) -> Path:
    return Path.home() / ".fedclinic" / "state" / hospital.hospital


class SiteState:
    """Named tensor dictionaries persisted atomically at one hospital for one run."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @classmethod
    def for_run(cls, hospital: HospitalConfig, run: RunConfig, run_id: int) -> SiteState:
        root = Path(hospital.state_dir) if hospital.state_dir else default_state_dir(hospital)
        return cls(root / (run.run_name or f"run-{run_id}"))

    def path(self, name: str) -> Path:
        return self.directory / f"{name}.pt"

    def has(self, name: str) -> bool:
        return self.path(name).is_file()

    def load(self, name: str) -> State:
        return load_checkpoint(self.path(name))

    def save(self, name: str, state: dict[str, torch.Tensor]) -> dict[str, str]:
        """Save and return the file and content hashes (reported to the coordinator)."""
        return save_checkpoint(self.path(name), state)
