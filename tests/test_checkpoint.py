"""Checkpoints: exact round trip, atomic writes under failure, fallback from damage, retention."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest

from server import checkpoint as ck
from server.checkpoint import CorruptCheckpoint, list_checkpoints, load_checkpoint, load_latest, save_checkpoint


def _arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"towers.0.body.0.weight": rng.normal(size=(8, 4, 11)).astype(np.float32),
            "out.bias": rng.normal(size=3).astype(np.float32),
            "double": rng.normal(size=(2, 2)),
            "steps": np.array([7], np.int64),
            "scalar": np.array(1.5, np.float16),
            "strided": rng.normal(size=(4, 6)).astype(np.float32)[:, ::2]}


def _state() -> dict[str, object]:
    return {"aggregator": {"name": "fedadam", "step": 3, "m": {"w": np.arange(5, dtype=np.float32) / 3},
                           "v": None, "params": {"server-lr": 0.1}},
            "meta": {"coef": [0.1, -2.5], "best_objective": float("inf"), "direction": None, "converged": False},
            "rounds": {"cnn": 3, "meta": 0}, "seed": 2**40 + 3, "sites": ["a", "b"],
            "epsilon": {"a": 1.25, "b": float("nan")}, "np_scalar": np.float32(0.1), "pair": (1, 2)}


def _assert_arrays_equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert np.ascontiguousarray(a[k]).tobytes() == b[k].tobytes(), k


def test_round_trip_is_exact(tmp_path: Path) -> None:
    arrays, state = _arrays(), _state()
    path = save_checkpoint(tmp_path, phase="cnn", round=3, arrays=arrays, state=state)
    assert path == tmp_path / "checkpoints" / "ckpt-000001-cnn-0003.npz"
    ckpt = load_latest(tmp_path)
    assert ckpt is not None
    assert (ckpt.phase, ckpt.round, ckpt.seq, ckpt.path) == ("cnn", 3, 1, path)
    _assert_arrays_equal(arrays, ckpt.arrays)
    m = ckpt.state["aggregator"]["m"]["w"]
    assert m.dtype == np.float32 and m.tobytes() == state["aggregator"]["m"]["w"].tobytes()  # type: ignore[index]
    assert ckpt.state["meta"]["best_objective"] == float("inf")
    assert np.isnan(ckpt.state["epsilon"]["b"])
    assert ckpt.state["seed"] == 2**40 + 3
    assert ckpt.state["np_scalar"] == float(np.float32(0.1))
    assert ckpt.state["pair"] == [1, 2]  # JSON: tuples come back as lists
    assert ckpt.state["rounds"] == {"cnn": 3, "meta": 0}
    pointer = json.loads((tmp_path / "checkpoints" / "latest.json").read_text())
    assert pointer == {"file": path.name, "seq": 1, "phase": "cnn", "round": 3}


def test_no_pickle_anywhere(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, phase="cnn", round=1, arrays=_arrays(), state=_state())
    with np.load(path, allow_pickle=False) as npz:  # would raise on an object array
        for k in npz.files:
            assert not npz[k].dtype.hasobject
    with pytest.raises(TypeError, match="object arrays"):
        save_checkpoint(tmp_path, phase="cnn", round=2, arrays=_arrays(), state={"x": np.array([{}], dtype=object)})
    with pytest.raises(TypeError, match="cannot be checkpointed"):
        save_checkpoint(tmp_path, phase="cnn", round=2, arrays=_arrays(), state={"x": object()})
    with pytest.raises(TypeError, match="not a string"):
        save_checkpoint(tmp_path, phase="cnn", round=2, arrays=_arrays(), state={1: "a"})  # type: ignore[dict-item]


def test_empty_run_dir(tmp_path: Path) -> None:
    assert load_latest(tmp_path) is None
    assert load_latest(tmp_path / "missing") is None


def test_latest_follows_sequence_across_phases(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, phase="cnn", round=5, arrays=_arrays(1), state={"i": 1})
    save_checkpoint(tmp_path, phase="meta", round=1, arrays=_arrays(2), state={"i": 2})
    ckpt = load_latest(tmp_path)
    assert ckpt is not None and (ckpt.phase, ckpt.round, ckpt.state["i"]) == ("meta", 1, 2)


@pytest.mark.parametrize("fail_on", [1, 2])
def test_failed_replace_keeps_previous_latest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail_on: int) -> None:
    """A write that dies at either rename (checkpoint, then latest.json) leaves the previous one current."""
    save_checkpoint(tmp_path, phase="cnn", round=1, arrays=_arrays(1), state={"round": 1})
    real_replace, calls = os.replace, []

    def dying_replace(src: str, dst: str) -> None:
        calls.append(dst)
        if len(calls) == fail_on:
            raise OSError("killed")
        real_replace(src, dst)

    monkeypatch.setattr(ck.os, "replace", dying_replace)
    with pytest.raises(OSError, match="killed"):
        save_checkpoint(tmp_path, phase="cnn", round=2, arrays=_arrays(2), state={"round": 2})
    monkeypatch.setattr(ck.os, "replace", real_replace)

    ckpt = load_latest(tmp_path)
    assert ckpt is not None and ckpt.round == 1 and ckpt.state == {"round": 1}
    _assert_arrays_equal(_arrays(1), ckpt.arrays)
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
    # The next write after the restart replaces any uncommitted file and becomes current.
    save_checkpoint(tmp_path, phase="cnn", round=2, arrays=_arrays(3), state={"round": 2})
    ckpt = load_latest(tmp_path)
    assert ckpt is not None and ckpt.round == 2
    _assert_arrays_equal(_arrays(3), ckpt.arrays)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-000001-cnn-0001.npz", "ckpt-000002-cnn-0002.npz"]


def test_failed_write_inside_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save_checkpoint(tmp_path, phase="cnn", round=1, arrays=_arrays(1), state={})

    def dying_savez(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(ck.np, "savez", dying_savez)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, phase="cnn", round=2, arrays=_arrays(2), state={})
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["ckpt-000001-cnn-0001.npz", "latest.json"]


def test_kill_leaves_temp_file_that_next_write_cleans(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, phase="cnn", round=1, arrays=_arrays(1), state={})
    stale = tmp_path / "checkpoints" / ".tmp-ckpt-000002-cnn-0002.npz.abc"
    stale.write_bytes(b"half a checkpoint")
    assert load_latest(tmp_path).round == 1  # type: ignore[union-attr]
    save_checkpoint(tmp_path, phase="cnn", round=2, arrays=_arrays(2), state={})
    assert not stale.exists()


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "bitflip":
        data[len(data) // 3] ^= 0xFF  # inside an array's data: only the zip CRC notices
        path.write_bytes(bytes(data))
    elif how == "delete":
        path.unlink()


@pytest.mark.parametrize("how", ["truncate", "empty", "bitflip", "delete"])
def test_damaged_latest_falls_back_to_previous(tmp_path: Path, how: str, caplog: pytest.LogCaptureFixture) -> None:
    save_checkpoint(tmp_path, phase="cnn", round=1, arrays=_arrays(1), state={"round": 1})
    save_checkpoint(tmp_path, phase="cnn", round=2, arrays=_arrays(2), state={"round": 2})
    newest = save_checkpoint(tmp_path, phase="cnn", round=3, arrays=_arrays(3), state={"round": 3})
    _damage(newest, how)
    if how != "delete":
        with pytest.raises(CorruptCheckpoint):
            load_checkpoint(newest)
    with caplog.at_level(logging.WARNING, logger="server.checkpoint"):
        ckpt = load_latest(tmp_path)
    assert ckpt is not None and ckpt.round == 2 and ckpt.state == {"round": 2}
    _assert_arrays_equal(_arrays(2), ckpt.arrays)
    assert "not the latest checkpoint" in caplog.text
    if how != "delete":
        assert f"checkpoint {newest.name} is damaged" in caplog.text


def test_two_damaged_falls_back_further(tmp_path: Path) -> None:
    paths = [save_checkpoint(tmp_path, phase="cnn", round=r, arrays=_arrays(r), state={"round": r})
             for r in range(1, 4)]
    _damage(paths[2], "truncate")
    _damage(paths[1], "bitflip")
    assert load_latest(tmp_path).round == 1  # type: ignore[union-attr]
    _damage(paths[0], "empty")
    assert load_latest(tmp_path) is None


@pytest.mark.parametrize("content", ["", "{not json", '{"file": "other.txt", "seq": 3}',
                                     '{"file": "ckpt-000002-cnn-0002.npz", "seq": 3}'])
def test_unreadable_pointer_uses_newest_readable_file(tmp_path: Path, content: str,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    save_checkpoint(tmp_path, phase="cnn", round=1, arrays=_arrays(1), state={"round": 1})
    save_checkpoint(tmp_path, phase="cnn", round=2, arrays=_arrays(2), state={"round": 2})
    (tmp_path / "checkpoints" / "latest.json").write_text(content)
    with caplog.at_level(logging.WARNING, logger="server.checkpoint"):
        assert load_latest(tmp_path).round == 2  # type: ignore[union-attr]
    assert "pointer" in caplog.text and "unreadable" in caplog.text


def test_uncommitted_newer_file_is_ignored(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, phase="cnn", round=1, arrays=_arrays(1), state={"round": 1})
    d = tmp_path / "checkpoints"
    pointer = (d / "latest.json").read_text()
    save_checkpoint(tmp_path, phase="cnn", round=2, arrays=_arrays(2), state={"round": 2})
    (d / "latest.json").write_text(pointer)  # as if the process died before committing round 2
    assert load_latest(tmp_path).round == 1  # type: ignore[union-attr]


@pytest.mark.parametrize("keep", [1, 3])
def test_retention(tmp_path: Path, keep: int) -> None:
    for r in range(1, 7):
        save_checkpoint(tmp_path, phase="cnn", round=r, arrays=_arrays(r), state={"round": r}, keep=keep)
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == [f"ckpt-{s:06d}-cnn-{s:04d}.npz" for s in range(7 - keep, 7)]
    assert load_latest(tmp_path).round == 6  # type: ignore[union-attr]


def test_default_keeps_three(tmp_path: Path) -> None:
    for r in range(5):
        save_checkpoint(tmp_path, phase="meta", round=r, arrays={}, state={})
    assert len(list_checkpoints(tmp_path)) == 3


@pytest.mark.parametrize("phase,rnd", [("CNN", 1), ("a/b", 1), ("../x", 1), ("", 1), ("cnn", -1), ("cnn", True)])
def test_bad_names(tmp_path: Path, phase: str, rnd: int) -> None:
    with pytest.raises(ValueError):
        save_checkpoint(tmp_path, phase=phase, round=rnd, arrays={}, state={})
