"""The one base class for errors a user can fix (bad input, wrong key, missing file).

The console script prints such an error as a single line, without a traceback, and exits
non-zero. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


def error_text(exc: BaseException) -> str:
    """What a command prints after ``error:`` for a :class:`GenofedError`: its message (a
    multi-problem error keeps one problem per line after the first), or its class name."""
    return str(exc).strip() or exc.__class__.__name__


class GenofedError(Exception):
    """An error caused by input or environment, with a one-line message saying what to do."""

    exit_code: int = 1
