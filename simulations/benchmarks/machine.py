"""Machine-wide measures for benchmarks whose work runs in processes they do not wait for.

A simulation's sites run in Ray's worker processes and the SuperLink's children, so per-process
figures (``resource.getrusage`` of children) miss them; these read the whole machine instead
(Linux ``/proc``), so measure on an otherwise idle machine.
"""

from __future__ import annotations

import threading
from pathlib import Path
from types import TracebackType


def cpu_seconds() -> float:
    """CPU seconds the whole machine has spent busy (``/proc/stat``: all but idle and iowait)."""
    import os

    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    ticks = [int(v) for v in fields]
    busy = sum(ticks) - ticks[3] - (ticks[4] if len(ticks) > 4 else 0)  # minus idle, iowait
    return busy / os.sysconf("SC_CLK_TCK")


def memory_in_use_mb() -> float:
    """Memory the machine has in use, in MB: ``MemTotal - MemAvailable`` (what a new process could not get)."""
    info = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        info[key] = int(rest.split()[0])  # kB
    return (info["MemTotal"] - info["MemAvailable"]) / 1024


class MemoryPeak:
    """Context manager sampling :func:`memory_in_use_mb` every ``interval`` s in a thread.

    ``peak_mb`` is the highest sample minus the level on entry: what the work inside added at
    its worst (page cache is not counted: it stays available).
    """

    def __init__(self, interval: float = 0.2) -> None:
        self.interval, self.base_mb, self.peak_mb = interval, 0.0, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> MemoryPeak:
        self.base_mb = memory_in_use_mb()
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_mb = max(self.peak_mb, memory_in_use_mb() - self.base_mb)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, memory_in_use_mb() - self.base_mb)
