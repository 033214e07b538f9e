"""Suite-wide ordering: the real-process runs (marked ``e2e``) are collected first, longest first.

They are CPU-bound and take one to six minutes each in the full suite; started first (and handed
out one test at a time, ``--maxschedchunk 1`` in the Makefile), they overlap across the xdist
workers instead of queueing behind each other at the end of one worker, and the longest going
first keeps a long one from starting last. ``@pytest.mark.e2e(minutes=N)`` is a test's rough
duration in the full suite (1 when not given); it orders the tests and checks nothing.
"""

from __future__ import annotations

import pytest


def _e2e_minutes(item: pytest.Item) -> float:
    """The test's rough duration in minutes if it is an e2e test, else 0 (it goes last)."""
    marker = item.get_closest_marker("e2e")
    if marker is None:
        return 0.0
    return float(marker.kwargs.get("minutes", 1))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: -_e2e_minutes(item))  # stable: order kept otherwise
