"""Test-run order: the costliest files first, so that two workers finish together.

``make test`` hands whole files to two worker processes (pytest-xdist, ``--dist loadfile``), in the
order of this collection (``--no-loadscope-reorder``). Longest-first is the classic rule for
spreading jobs over workers: a long file started last would leave the other worker idle. The cost of
a file is read off its marks, not timed: files of end-to-end (``slow``) tests on the real data sets
(``realdata``) first, then by how many of their tests are end-to-end; the order within a file is kept.
"""

from __future__ import annotations

from collections import Counter

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    realdata, slow = Counter(), Counter()
    for item in items:
        is_slow = item.get_closest_marker("slow") is not None
        realdata[item.path] += is_slow and item.get_closest_marker("realdata") is not None
        slow[item.path] += is_slow
    first_seen = {path: i for i, path in reversed(list(enumerate(item.path for item in items)))}
    items.sort(key=lambda item: (-realdata[item.path], -slow[item.path], first_seen[item.path]))
