"""Conversion between named numpy arrays and Flower's ArrayRecord, the same on both sides of a message.

A record carries all its arrays in one Flower ``Array``: an uncompressed ``.npz`` buffer (one
``.npy`` entry per name, dtype and shape kept, no pickles). Flower ships every ``Array`` as
objects of its own (the array and its chunks), and in a deployment each object is a round trip
on every hop (ServerApp, SuperLink, SuperNode, ClientApp and back); a deep model of 13 tensors
sent one ``Array`` each made 26 objects each way where one buffer makes 2
(``simulations.benchmarks.deployment_rounds``: docs/federation.md, "Measured").
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord

from common.errors import GenofedError

PACKED = "npz"
"""The one key of a genofed ArrayRecord."""


class RecordError(GenofedError):
    """An ArrayRecord that is not a genofed record (another layout, or a buffer that does not unpack)."""


def to_record(arrays: Mapping[str, Any]) -> ArrayRecord:
    """One ArrayRecord holding every named array (order, dtypes and shapes kept)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for name, value in arrays.items():
            with archive.open(f"{name}.npy", "w") as entry:
                np.lib.format.write_array(entry, np.ascontiguousarray(np.asarray(value)), allow_pickle=False)
    return ArrayRecord({PACKED: Array(np.frombuffer(buffer.getvalue(), dtype=np.uint8))})


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    """The named arrays of a record made by :func:`to_record`; :class:`RecordError` for anything else."""
    if list(record.keys()) != [PACKED]:
        raise RecordError(f"an array record with keys {sorted(record.keys())}, not genofed's one {PACKED!r} buffer")
    data = io.BytesIO(record[PACKED].numpy().tobytes())
    try:
        with zipfile.ZipFile(data) as archive:  # stored entries only: nothing unpacks larger than what came
            if any(i.compress_type != zipfile.ZIP_STORED or i.file_size != i.compress_size for i in archive.infolist()):
                raise ValueError("compressed entries")
        with np.load(data, allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise RecordError(f"an array record that does not unpack: {exc}") from None
