"""Benchmarks: each module is runnable with ``python -m simulations.benchmarks.<name> --help``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def emit(result: dict[str, Any], json_path: str | Path | None) -> None:
    """Print a benchmark's result as JSON, and also write it to ``json_path`` when given."""
    text = json.dumps(result, indent=2)
    print(text)
    if json_path:
        Path(json_path).write_text(text, encoding="utf-8")
