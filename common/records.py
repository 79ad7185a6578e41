"""Conversion between numpy arrays and Flower's ArrayRecord, the same on both sides of a message."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord


def to_record(arrays: Mapping[str, Any]) -> ArrayRecord:
    """An ArrayRecord keeping the names (contiguous copies where needed)."""
    return ArrayRecord({k: Array(np.ascontiguousarray(np.asarray(v))) for k, v in arrays.items()})


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Named numpy arrays from an ArrayRecord."""
    return {k: v.numpy() for k, v in record.items()}
