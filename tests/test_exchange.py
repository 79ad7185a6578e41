"""What crosses an exchange: genofed's array records (one buffer each) and the bytes each way per site."""

from __future__ import annotations

import io
import time
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from common.records import PACKED, RecordError, from_record, to_record
from server.exchange import ExchangeResult, exchange, payload_bytes


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


class _StalledGrid:
    """Site 3 died mid-upload: the first pull blocks past the deadline (Flower retrying its objects),
    then returns its error; sites 1 and 2 replied while that pull was blocked."""

    def __init__(self, stall_s: float) -> None:
        self.stall_s, self.pulls, self.ids = stall_s, 0, {}

    def push_messages(self, messages):
        self.ids = {f"m{msg.metadata.dst_node_id}": msg.metadata.dst_node_id for msg in messages}
        return list(self.ids)

    def pull_messages(self, message_ids):
        self.pulls += 1
        if self.pulls == 1:
            time.sleep(self.stall_s)
            return [_stub_reply("m3", error=True)] if "m3" in message_ids else []
        return [_stub_reply(mid) for mid in message_ids if mid != "m3"]


def _stub_reply(mid: str, *, error: bool = False) -> SimpleNamespace:
    return SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=mid), content=RecordDict(),
                           has_error=lambda: error, error=SimpleNamespace(code=3, reason="object-push session expired"))


def test_replies_that_land_during_a_pull_blocked_past_the_deadline_are_kept() -> None:
    import tests.local_grid  # noqa: F401 - sets the TaskIdentity a bare Message needs

    grid = _StalledGrid(stall_s=0.5)
    result = exchange(grid, [1, 2, 3], lambda node: RecordDict(), message_type="query", group_id="g", timeout=0.2)
    assert set(result.replies) == {1, 2}
    assert set(result.failures) == {3} and "session expired" in result.failures[3]
    assert grid.pulls == 2


def test_a_site_still_silent_after_the_last_pull_is_named() -> None:
    import tests.local_grid  # noqa: F401 - sets the TaskIdentity a bare Message needs

    grid = _StalledGrid(stall_s=0.0)
    grid.pull_messages = lambda ids: []  # nobody ever replies
    result = exchange(grid, [1, 2], lambda node: RecordDict(), message_type="query", group_id="g", timeout=0.3)
    assert result.replies == {} and result.failures == {1: "no reply within 0 s", 2: "no reply within 0 s"}  # 0.3 s, rounded
