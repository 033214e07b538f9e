"""Suite-wide ordering and the shared fixtures (the harness itself is tests/harness.py).

Ordering: the real-process runs (marked ``e2e``) are collected first, then the tests of a
minute or more (marked ``long``). They are CPU-bound; started first (and handed out one test at
a time, ``--maxschedchunk 1`` in the Makefile), they overlap across the xdist workers with the
short tests instead of one of them running alone at the end.
"""

from __future__ import annotations

import os

# Every process of the suite, and every process it starts (site workers, ClientApps,
# ServerApps), runs torch on one thread. The xdist workers and the real-process federations
# share CI's 2 cores, where OpenMP's extra threads only spin while they wait: a 2-hospital
# federation's site workers used 26.6 CPU-s with torch's default 2 threads and 12.9 CPU-s
# with 1 (tests/test_e2e_local.py, measured). Outside the suite a hospital keeps torch's
# default. Set before anything imports torch (OpenMP reads it once).
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path

import pytest
from flwr.supercore.task_identity import TaskIdentity
from harness import FakeClock

from fedclinic.config import HospitalConfig
from fedclinic.data import cache


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(  # stable: order kept within each group
        key=lambda item: (
            item.get_closest_marker("e2e") is None,
            item.get_closest_marker("long") is None,
        )
    )


@pytest.fixture
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower's ``Message`` needs a task identity, which a real process gets from its runtime."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 0)


@pytest.fixture
def clock() -> FakeClock:
    """A clock for the engine that does not wait: deadlines and re-sends in no time."""
    return FakeClock()


@pytest.fixture(autouse=True)
def _default_state_dir_in_tmp(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A hospital config without ``state-dir`` caches decoded images in the user's default
    state dir (``~/.fedclinic/state``); in-process tests use a temporary one instead."""
    root = tmp_path_factory.getbasetemp() / "default-state"

    def default_state_dir(hospital: HospitalConfig) -> Path:
        return root / hospital.hospital

    monkeypatch.setattr(cache, "default_state_dir", default_state_dir)
