"""The run's log: readable lines (stdout and ``RUNDIR/run.log``) and structured events.

Lines name sites, never patients. ``RUNDIR/events.jsonl`` holds one JSON object per event
(census, each round, rejections, failures) for the report and for tests.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

_logger = logging.getLogger("genofed.server")


class RunLog:
    """Append-only run log; every line is flushed at once so a crash loses nothing written."""

    def __init__(self, run_dir: Path | None) -> None:
        self.run_dir = run_dir
        if run_dir is not None:
            run_dir.mkdir(parents=True, exist_ok=True)

    def _append(self, name: str, text: str) -> None:
        if self.run_dir is None:
            return
        with open(self.run_dir / name, "a", encoding="utf-8") as fh:
            fh.write(text + "\n")

    def _line(self, level: str, message: str) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        print(f"[genofed] {message}", flush=True)
        self._append("run.log", f"{stamp} {level} {message}")

    def info(self, message: str) -> None:
        _logger.info(message)
        self._line("INFO", message)

    def warning(self, message: str) -> None:
        _logger.warning(message)
        self._line("WARNING", message)

    def event(self, kind: str, **data: Any) -> None:
        self._append("events.jsonl", json.dumps({"event": kind, "time": time.time(), **data}, default=str))
