"""What crosses an exchange: genofed's array records (one buffer each) and the bytes each way per site."""

from __future__ import annotations

import io
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from common.records import PACKED, RecordError, from_record, to_record
from server.exchange import ExchangeResult, payload_bytes


def _deflated_npz() -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, w=np.zeros(100_000))
    return buffer.getvalue()


def test_payload_bytes_counts_the_arrays_once_and_the_rest_small() -> None:
    weights = np.arange(100_000, dtype=np.float32).reshape(1000, 100)
    one = RecordDict({"arrays": ArrayRecord([weights]), "config": ConfigRecord({"round": 1})})
    assert weights.nbytes < payload_bytes(one) < weights.nbytes + 2_000
    # The same array under two records is one object on the wire (content-addressed ids).
    twice = RecordDict({"a": ArrayRecord([weights]), "b": ArrayRecord([weights])})
    assert payload_bytes(twice) < 1.01 * payload_bytes(RecordDict({"a": ArrayRecord([weights])})) + 200
    other = RecordDict({"a": ArrayRecord([weights]), "b": ArrayRecord([weights + 1])})
    assert payload_bytes(other) > 2 * weights.nbytes


def test_cost_means_bytes_over_the_sites_that_replied() -> None:
    res = ExchangeResult(seconds=1.234, bytes_sent={1: 100, 2: 300, 3: 900}, bytes_received={1: 10, 2: 30})
    res.replies = {1: _reply(0.5), 2: _reply(0.75)}
    assert res.cost() == {"seconds": 1.23, "handler_s": 0.75, "bytes_down": 200, "bytes_up": 20}
    assert ExchangeResult().cost() == {"seconds": 0.0, "handler_s": 0.0, "bytes_down": 0, "bytes_up": 0}


def _reply(handler_seconds: float) -> SimpleNamespace:
    return SimpleNamespace(content=RecordDict({"metrics": MetricRecord({"handler-seconds": handler_seconds})}))


def test_a_record_is_one_buffer_that_keeps_names_dtypes_and_shapes() -> None:
    arrays = {"conv.weight": np.arange(24, dtype=np.float32).reshape(2, 3, 4), "count": np.array([5], dtype=np.int64),
              "mask": np.array([True, False]), "file": np.zeros(3)}
    record = to_record(arrays)
    assert list(record.keys()) == [PACKED]
    back = from_record(record)
    assert list(back) == list(arrays)
    for name, value in arrays.items():
        assert back[name].dtype == value.dtype and np.array_equal(back[name], value)


@pytest.mark.parametrize("record", [
    ArrayRecord({"w": Array(np.zeros(3))}),  # a plain Flower record, not genofed's layout
    ArrayRecord({PACKED: Array(np.frombuffer(b"not a zip at all", dtype=np.uint8))}),
    ArrayRecord({PACKED: Array(np.frombuffer(_deflated_npz(), dtype=np.uint8))}),  # could unpack to any size
])
def test_a_record_that_does_not_unpack_is_one_clear_error(record: ArrayRecord) -> None:
    with pytest.raises(RecordError, match="array record"):
        from_record(record)
