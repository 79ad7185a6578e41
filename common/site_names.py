"""How site names sort wherever people read them: naturally, so that site-2 comes before site-10."""

from __future__ import annotations

import re

_NUMBER = re.compile(r"(\d+)")


def natural_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key for a site name: its digit runs compare as numbers, the rest as text.

    >>> sorted(["site-10", "site-2", "north", "site-1"], key=natural_key)
    ['north', 'site-1', 'site-2', 'site-10']
    """
    # (0, number) and (1, text) keep the key's parts comparable when one name has a number
    # where another has text.
    return tuple((0, int(part)) if part.isdigit() else (1, part) for part in _NUMBER.split(name) if part)
