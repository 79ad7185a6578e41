"""Progress display for long work (imports, training rounds), on stderr.

Rich renders a live bar on a terminal and stays quiet otherwise, so logs and CI output are
not flooded. ``GENOFED_NO_PROGRESS=1`` turns it off entirely.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


def _enabled() -> bool:
    return os.environ.get("GENOFED_NO_PROGRESS", "") not in ("1", "true", "yes")


@contextmanager
def progress_bar() -> Iterator[Progress]:
    """A rich ``Progress`` on stderr; add tasks with ``.add_task(description, total=n)``."""
    console = Console(stderr=True)
    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), console=console, transient=False, disable=not _enabled())
    with bar:
        yield bar
