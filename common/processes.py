"""Child processes that do not outlive their parent (Linux ``PR_SET_PDEATHSIG``)."""

from __future__ import annotations

import contextlib
import ctypes
import signal
import sys

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Have the kernel SIGKILL this process when the thread that started it exits (Linux; else nothing).

    Used as ``preexec_fn`` (between fork and exec) or first thing in a forked worker.
    """
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


PREEXEC = die_with_parent if sys.platform.startswith("linux") else None
"""``preexec_fn`` for :class:`subprocess.Popen` (``None`` where it would do nothing)."""
