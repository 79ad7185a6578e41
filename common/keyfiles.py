"""Private key files must be readable by their owner only, or genofed refuses to use them.

A private key that other local users can read (mode 0644, the usual default for a copied
file) is a key that is no longer private: the SuperNode authentication key lets anyone
holding it join the federation as that hospital, the SuperLink's TLS key lets them
impersonate the coordinator, and a vault key opens the site's patient data. OpenSSH refuses
such keys; so does every genofed command that hands one to Flower (``genofed supernode``, the
SuperLink launcher of :mod:`simulations.superlink`) or opens a vault with one
(:meth:`client.vault.KeySource.from_key_file` and ``from_passphrase_file``: every ``vault``,
``ledger``, ``predict`` and ``evaluate`` command), with one line naming the file and the fix.
"""

from __future__ import annotations

import stat
from collections.abc import Iterable
from pathlib import Path

from common.errors import GenofedError

LOOSE_BITS = 0o077
"""Any permission for the group or for others makes a private file loose (as OpenSSH judges keys)."""


class KeyFilePermissionError(GenofedError):
    """A private key file is readable or writable by users other than its owner."""


def loose_mode(path: Path | str) -> int | None:
    """The permission bits of ``path`` if group or others have any access to it, else ``None``.

    A missing file is not judged here (``None``): the command that reads it names it.
    """
    try:
        mode = stat.S_IMODE(Path(path).stat().st_mode)
    except OSError:
        return None
    return mode if mode & LOOSE_BITS else None


def check_private_file(path: Path | str, what: str) -> None:
    """Raise :class:`KeyFilePermissionError` if ``path`` (described as ``what``) is not owner-only.

    Parameters
    ----------
    path : path
        The private key (or passphrase) file.
    what : str
        What the file is, for the message, e.g. ``"SuperNode authentication key"``.

    Raises
    ------
    KeyFilePermissionError
        One line: the file, its mode, and the command that fixes it (``chmod 600 FILE``).
    """
    mode = loose_mode(path)
    if mode is not None:
        raise KeyFilePermissionError(
            f"{path}: {what} is accessible by other users (mode {mode:04o}); refusing to use it: "
            f"run `chmod 600 {path}`")


def check_private_files(files: Iterable[tuple[Path | str, str]]) -> None:
    """:func:`check_private_file` for each ``(path, what)``; the first loose one raises."""
    for path, what in files:
        check_private_file(path, what)
