"""Durable file writes: a reader (or a crash) never sees half of a file.

One set of primitives for everything genofed writes that must survive a crash whole: the vault,
checkpoints, certificates, the ledger registry, reports and specs.

- :func:`write_new`: create a file that must not exist yet, with its mode from the first instant
  (whatever the umask), write it and fsync it; on any failure it is removed.
- :func:`write_atomic`: write a temporary sibling, fsync it, ``os.replace`` it over the target
  and fsync the folder (the rename is data too); on any failure the target is untouched.
- :func:`fsync_dir`: make a folder's entries (creations, renames, deletions) durable.
- :func:`directory_lock`: an exclusive ``flock`` on a folder, with a wait limit.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import BinaryIO

Content = bytes | str | Callable[[BinaryIO], None]
"""What :func:`write_atomic` writes: bytes, text (UTF-8), or a function that fills the file."""


def write_new(path: Path, *chunks: bytes, mode: int = 0o600) -> None:
    """Create ``path`` (it must not exist) with ``mode``, write ``chunks`` and fsync it.

    Raises ``FileExistsError`` if ``path`` exists; on any other failure the partial file is removed.
    """
    _create(path, lambda f: f.writelines(chunks), mode=mode)


def _create(path: Path, fill: Callable[[BinaryIO], object], *, mode: int) -> None:
    """Create ``path`` exclusively with exactly ``mode`` (whatever the umask), fill and fsync it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            fill(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with suppress(OSError):
            os.unlink(path)
        raise


def fsync_dir(path: Path, *, quiet: bool = False) -> None:
    """Make a folder's entries durable; ``quiet`` ignores a file system that cannot (some cannot)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        if not quiet:
            raise


def write_atomic(path: Path, content: Content, *, mode: int = 0o644, tmp_prefix: str | None = None) -> None:
    """Put ``content`` at ``path`` whole or not at all (the old file, or none, stays on failure).

    The temporary sibling is ``tmp_prefix`` + a random suffix (default ``.<name>.tmp-``), so that a
    folder's reader can recognise and skip or clean one left by a crash.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{tmp_prefix or f'.{path.name}.tmp-'}{secrets.token_hex(6)}")
    try:
        if callable(content):
            _create(tmp, content, mode=mode)
        else:
            write_new(tmp, content.encode("utf-8") if isinstance(content, str) else content, mode=mode)
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent, quiet=True)


@contextmanager
def directory_lock(path: Path, *, wait_s: float) -> Iterator[bool]:
    """Hold an exclusive flock on a folder; yields ``False`` if it stayed busy for ``wait_s`` seconds."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    yield False
                    return
                time.sleep(0.05)
        yield True
    finally:
        os.close(fd)
