"""Suite-wide ordering: the real-process runs (marked ``e2e``) are collected first.

They are CPU-bound and take a minute or two each; started first (and handed out one test at a
time, ``--maxschedchunk 1`` in the Makefile), they overlap across the xdist workers instead of
queueing behind each other at the end of one worker.
"""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.get_closest_marker("e2e") is None)  # stable: order kept
