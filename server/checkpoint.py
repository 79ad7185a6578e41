"""Crash-safe checkpoints of the ServerApp's state after every completed step.

Layout under the run directory::

    RUNDIR/checkpoints/ckpt-<seq:06d>-<phase>-<round:04d>.npz   one per completed step
    RUNDIR/checkpoints/latest.json                               {"file": ..., "seq": ..., ...}

Each ``.npz`` (written without pickle, read with ``allow_pickle=False``) holds the global
weights as ``w0, w1, ...``, every numpy array found inside ``state`` as ``s0, s1, ...``,
and a JSON header as the 0-d string array ``__meta__`` (format, phase, round, seq, the
weight names in order, and ``state`` with each array replaced by ``{"__ndarray__": "s<i>"}``).
Arrays therefore round-trip bit-exactly with their dtypes (e.g. FedAdam's float32 moments),
and the rest of ``state`` is JSON (Python's dialect: NaN and Infinity allowed; tuples come
back as lists; keys must be strings).

Writes are atomic: a temp file in the same directory, flushed and fsynced, then
``os.replace`` and an fsync of the directory, first for the checkpoint and then for
``latest.json``. ``latest.json`` is the commit point: a checkpoint is current only once it
points at it. The sequence number orders checkpoints across phases ("cnn" round 5 comes
before "meta" round 1). After a successful write only the newest ``keep`` checkpoints stay.

:func:`load_latest` reads what ``latest.json`` names; if that file is damaged (truncated,
bad CRC, unreadable header) it falls back, with a warning, to the newest older checkpoint
that reads cleanly. Checkpoints newer than ``latest.json`` were never committed (the process
died between the two renames) and are skipped, unless ``latest.json`` itself is unreadable.
"""

from __future__ import annotations

import json
import logging
import os
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common import durable

log = logging.getLogger(__name__)

FORMAT = 1
CHECKPOINT_DIR = "checkpoints"
LATEST = "latest.json"
_NAME = re.compile(r"^ckpt-(\d{6,})-([a-z0-9_]+(?:-[a-z0-9_]+)*)-(\d{4,})\.npz$")
_PHASE = re.compile(r"^[a-z0-9_]+(?:-[a-z0-9_]+)*$")
_ARRAY_REF = "__ndarray__"
_TMP_PREFIX = ".tmp-"


@dataclass(frozen=True)
class Checkpoint:
    """One loaded checkpoint.

    Attributes
    ----------
    phase : the step's phase name (e.g. ``"cnn"``).
    round : the completed round within the phase.
    arrays : the global weights, in the order they were saved.
    state : the JSON state with its numpy arrays restored.
    seq : position in the run's sequence of checkpoints.
    path : the file it came from.
    """

    phase: str
    round: int
    arrays: dict[str, np.ndarray]
    state: dict[str, Any]
    seq: int
    path: Path


class CorruptCheckpoint(Exception):
    """A checkpoint file that cannot be read back completely."""


def checkpoint_dir(run_dir: str | os.PathLike[str]) -> Path:
    """``RUNDIR/checkpoints``."""
    return Path(run_dir) / CHECKPOINT_DIR


# ----------------------------------------------------------------------------- state encoding

def _encode_state(value: Any, arrays: dict[str, np.ndarray], where: str = "state") -> Any:
    """``value`` as JSON-able data, moving numpy arrays into ``arrays`` (named ``s<i>``)."""
    if isinstance(value, np.ndarray):
        if value.dtype.hasobject:
            raise TypeError(f"{where}: object arrays cannot be checkpointed without pickle")
        key = f"s{len(arrays)}"
        arrays[key] = value
        return {_ARRAY_REF: key}
    if isinstance(value, np.generic):
        return value.item()  # numpy scalars: JSON has no float32, the value itself is exact
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: key {k!r} is not a string (JSON would turn it into one)")
            if k == _ARRAY_REF:
                raise ValueError(f"{where}: the key {_ARRAY_REF!r} is reserved")
            out[k] = _encode_state(v, arrays, f"{where}.{k}")
        return out
    if isinstance(value, (list, tuple)):
        return [_encode_state(v, arrays, f"{where}[{i}]") for i, v in enumerate(value)]
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    raise TypeError(f"{where}: {type(value).__name__} cannot be checkpointed (use JSON data or numpy arrays)")


def _decode_state(value: Any, arrays: Mapping[str, np.ndarray]) -> Any:
    if isinstance(value, dict):
        if set(value) == {_ARRAY_REF}:
            return arrays[value[_ARRAY_REF]]
        return {k: _decode_state(v, arrays) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode_state(v, arrays) for v in value]
    return value


# ----------------------------------------------------------------------------- atomic writes

def _atomic_write(path: Path, write: Any) -> None:
    """Write ``path`` whole or not at all; ``write(fileobj)`` fills it (common.durable)."""
    durable.write_atomic(path, write, tmp_prefix=_TMP_PREFIX + path.name + ".")


# ----------------------------------------------------------------------------- listing

def _parse_name(name: str) -> tuple[int, str, int] | None:
    m = _NAME.match(name)
    return None if m is None else (int(m.group(1)), m.group(2), int(m.group(3)))


def list_checkpoints(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Checkpoint files in ``RUNDIR/checkpoints``, oldest first (by sequence number)."""
    d = checkpoint_dir(run_dir)
    if not d.is_dir():
        return []
    found = [(parsed[0], p) for p in d.iterdir() if (parsed := _parse_name(p.name)) is not None]
    return [p for _, p in sorted(found)]


def _read_latest_pointer(d: Path) -> int | None:
    """The committed sequence number from ``latest.json``; ``None`` if absent or unreadable."""
    path = d / LATEST
    if not path.exists():
        return None
    try:
        pointer = json.loads(path.read_text(encoding="utf-8"))
        parsed = _parse_name(pointer["file"])
        if parsed is None or parsed[0] != int(pointer["seq"]):
            raise ValueError(f"names {pointer['file']!r} with seq {pointer['seq']!r}")
        return parsed[0]
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("checkpoint pointer %s is unreadable (%s); using the newest readable checkpoint", path, e)
        return None


# ----------------------------------------------------------------------------- save / load

def save_checkpoint(run_dir: str | os.PathLike[str], *, phase: str, round: int,  # noqa: A002 (the contract's name)
                    arrays: Mapping[str, np.ndarray], state: Mapping[str, Any], keep: int = 3) -> Path:
    """Write a checkpoint for a completed step and make it the latest.

    Parameters
    ----------
    run_dir : the run directory; ``checkpoints/`` is created inside it.
    phase : phase name: lower-case letters, digits, ``_`` and single ``-`` (e.g. ``"cnn"``).
    round : the round just completed (>= 0).
    arrays : the global weights (name -> array); names and order are kept.
    state : JSON-able data, possibly with numpy arrays anywhere inside (stored exactly).
    keep : how many checkpoints to keep (>= 1); older ones are deleted after the write.

    Returns
    -------
    Path
        The new checkpoint file.
    """
    if not _PHASE.match(phase):
        raise ValueError(f"phase {phase!r} must be lower-case letters, digits, '_' and single '-'")
    if isinstance(round, bool) or not isinstance(round, (int, np.integer)) or round < 0:
        raise ValueError(f"round must be a whole number >= 0, got {round!r}")
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    d = checkpoint_dir(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    existing = _drop_uncommitted(d, list_checkpoints(run_dir))
    seq = (_seq(existing[-1]) + 1) if existing else 1
    path = d / f"ckpt-{seq:06d}-{phase}-{int(round):04d}.npz"

    members = _members(phase=phase, round=int(round), seq=seq, arrays=arrays, state=state)
    _atomic_write(path, lambda f: np.savez(f, **members))
    pointer = {"file": path.name, "seq": seq, "phase": phase, "round": int(round)}
    _atomic_write(d / LATEST, lambda f: f.write(json.dumps(pointer, indent=1).encode("utf-8")))
    _prune(d, keep=keep)
    return path


def _seq(path: Path) -> int:
    parsed = _parse_name(path.name)
    assert parsed is not None, path
    return parsed[0]


def _drop_uncommitted(d: Path, files: list[Path]) -> list[Path]:
    """Delete checkpoints newer than ``latest.json`` (a write died before its commit).

    Otherwise a resumed run would keep them among the fallbacks, interleaved with its own.
    With no readable pointer nothing is deleted: then every file may be the newest state.
    """
    committed = _read_latest_pointer(d)
    if committed is None:
        return files
    kept = []
    for p in files:
        if _seq(p) > committed:
            log.info("removing uncommitted checkpoint %s", p.name)
            p.unlink(missing_ok=True)
        else:
            kept.append(p)
    return kept


def _members(*, phase: str, round: int, seq: int, arrays: Mapping[str, np.ndarray],  # noqa: A002
             state: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The npz members: weights ``w<i>``, state arrays ``s<i>`` and the JSON header."""
    state_arrays: dict[str, np.ndarray] = {}
    encoded = _encode_state(dict(state), state_arrays)
    weights = {f"w{i}": np.asarray(a) for i, a in enumerate(arrays.values())}
    for k, a in weights.items():
        if a.dtype.hasobject:
            raise TypeError(f"array {list(arrays)[int(k[1:])]!r} is an object array; it cannot be saved without pickle")
    meta = {"format": FORMAT, "phase": phase, "round": round, "seq": seq,
            "names": list(arrays), "state": encoded}
    return {**weights, **state_arrays, "__meta__": np.array(json.dumps(meta))}


def _prune(d: Path, *, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints, and temp files left by a killed writer.

    Runs only after a successful write, and one ServerApp writes a run directory, so no temp
    file here can belong to a write in progress.
    """
    files = list_checkpoints(d.parent)
    for old in files[:-keep]:
        old.unlink(missing_ok=True)
    for tmp in d.glob(_TMP_PREFIX + "*"):
        tmp.unlink(missing_ok=True)


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Read one checkpoint file completely.

    Raises
    ------
    CorruptCheckpoint
        The file is truncated, fails its CRC, or its header is missing or inconsistent.
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            members = {k: npz[k] for k in npz.files}  # reads every member, so CRCs are checked
        meta = json.loads(str(members.pop("__meta__")))
        if meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT}")
        names = list(meta["names"])
        arrays = {name: members[f"w{i}"] for i, name in enumerate(names)}
        state = _decode_state(meta["state"], members)
        return Checkpoint(phase=str(meta["phase"]), round=int(meta["round"]), arrays=arrays, state=state,
                          seq=int(meta["seq"]), path=path)
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as e:
        raise CorruptCheckpoint(f"{path.name}: {type(e).__name__}: {e}") from e


def load_latest(run_dir: str | os.PathLike[str]) -> Checkpoint | None:
    """The latest committed checkpoint that reads cleanly, or ``None`` if there is none.

    Tries the file ``latest.json`` names, then older checkpoints newest first, logging a
    warning for each damaged one skipped. Without a readable ``latest.json`` it tries all
    checkpoints newest first.
    """
    d = checkpoint_dir(run_dir)
    files = list_checkpoints(run_dir)
    if not files:
        return None
    committed = _read_latest_pointer(d)
    candidates = list(reversed(files))
    if committed is not None:
        newer = [p for p in candidates if _seq(p) > committed]
        for p in newer:
            log.info("ignoring checkpoint %s: written after %s but never committed", p.name, LATEST)
        candidates = [p for p in candidates if p not in newer]
    for i, path in enumerate(candidates):
        try:
            ckpt = load_checkpoint(path)
        except CorruptCheckpoint as e:
            log.warning("checkpoint %s is damaged (%s); falling back to an older one", path.name, e)
            continue
        if i > 0 or (committed is not None and ckpt.seq != committed):
            log.warning("resuming from %s, not the latest checkpoint", path.name)
        return ckpt
    log.warning("no readable checkpoint in %s", d)
    return None
