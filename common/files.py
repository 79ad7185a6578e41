"""Writing result files so that a reader never sees half of one, and JSON for numpy values."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from common import durable


def write_text_atomic(path: Path, text: str) -> None:
    """Put ``text`` at ``path`` whole or not at all (fsync-ed temporary sibling, then a rename)."""
    durable.write_atomic(path, text)


def json_default(x: Any) -> Any:
    """``json.dumps(default=...)`` for numpy scalars and arrays."""
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON-serialisable: {type(x).__name__}")
