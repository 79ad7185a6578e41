"""Import problems: one record per thing wrong with a site's files, collected before failing.

Importers never stop at the first bad cell. Every reader adds what it finds to a
:class:`ProblemLog`; the import raises one :class:`CohortImportError` at the end that lists
them all, so an operator fixes the files in one pass instead of one error per run.

A single bad file can hold millions of identical problems (a VCF with a missing genotype in
every record), so the log lists only the first few of each kind per file and counts the rest.
Problem messages may name patient ids: they are shown to the site's own operator only and are
never logged or sent anywhere.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from common.errors import GenofedError

PER_KIND = 5
"""Problems of one kind in one file that are listed before the rest are only counted."""

MAX_LISTED = 50
"""Problems listed in all; past it only the first problem of a new kind is still listed."""

MISSING_TOKENS = ("", "NA")
"""Cell values that mean "missing" in every table."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with an input file.

    Attributes
    ----------
    file
        Absolute path of the file at fault.
    location
        ``line N``, ``record CHROM:POS``, ``patient ID`` or ``header``; empty for the whole file.
    field
        What within the location, already phrased: ``column 'age'``, ``sample 'P007'``,
        ``record 'P3'``; None when the location says it all.
    message
        What is wrong and, where it is not obvious, what to do about it.
    """

    file: str
    location: str
    field: str | None
    message: str

    def __str__(self) -> str:
        parts = [self.file]
        if self.location:
            parts.append(self.location)
        if self.field:
            parts.append(f" {self.field}")
        return ":".join(parts) + f": {self.message}"


class CohortImportError(GenofedError):
    """A cohort's files failed validation; nothing was written.

    Attributes
    ----------
    problems
        The problems listed (at most a few of each kind per file).
    total
        How many problems were found, listed or not.
    omitted
        ``(file, kind) -> count`` of problems found but not listed.
    """

    def __init__(self, problems: list[Problem], *, total: int | None = None,
                 omitted: dict[tuple[str, str], int] | None = None) -> None:
        self.problems = list(problems)
        self.omitted = dict(omitted or {})
        self.total = total if total is not None else len(self.problems) + sum(self.omitted.values())
        super().__init__(self._render())

    @property
    def files(self) -> list[str]:
        """Files with problems, in the order their first problem was found."""
        seen = dict.fromkeys(p.file for p in self.problems)
        seen.update(dict.fromkeys(f for f, _ in self.omitted))
        return list(seen)

    def _render(self) -> str:
        noun = "problem" if self.total == 1 else "problems"
        lines = [f"import failed: {self.total:,} {noun} in {', '.join(self.files)}"]
        lines.extend(str(p) for p in self.problems)
        for (file, kind), n in self.omitted.items():
            lines.append(f"{file}: ... and {n:,} more {'problem' if n == 1 else 'problems'} like this: {kind}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self._render()


class ProblemLog:
    """Collects problems from every reader; lists a few of each kind and counts the rest.

    ``kind`` is a short phrase naming the sort of problem ("missing genotype"); it groups
    problems for the cap and names the unlisted ones in the error's summary lines.
    """

    def __init__(self, *, per_kind: int = PER_KIND, max_listed: int = MAX_LISTED) -> None:
        self.per_kind, self.max_listed = per_kind, max_listed
        self.listed: list[Problem] = []
        self._seen: Counter[tuple[str, str]] = Counter()
        self._omitted: Counter[tuple[str, str]] = Counter()
        self._per_file: Counter[str] = Counter()
        self._found: set[Problem] = set()

    def add(self, file: object, location: str, field: str | None, message: str, *, kind: str) -> None:
        """Record one problem (listed if there is room for its kind, counted otherwise)."""
        problem = Problem(str(file), location, field, message)
        if problem in self._found:
            return  # the same file read for two purposes (label and clinical) reports it once
        self._found.add(problem)
        key = (problem.file, kind)
        self._per_file[key[0]] += 1
        if self.room(file, kind) > 0:
            self.listed.append(problem)
        else:
            self._omitted[key] += 1
        self._seen[key] += 1

    def room(self, file: object, kind: str) -> int:
        """How many more problems of ``kind`` in ``file`` would be listed now."""
        seen = self._seen[(str(file), kind)]
        if seen == 0:
            return max(1, min(self.per_kind, self.max_listed - len(self.listed)))
        return max(0, min(self.per_kind - seen, self.max_listed - len(self.listed)))

    def count(self, file: object, kind: str, n: int) -> None:
        """Record ``n`` problems of ``kind`` without listing them (the caller listed ``room`` of them)."""
        if n > 0:
            key = (str(file), kind)
            self._seen[key] += n
            self._omitted[key] += n
            self._per_file[key[0]] += n

    def problems_in(self, file: object) -> int:
        """Number of problems found in ``file`` so far."""
        return self._per_file[str(file)]

    @property
    def total(self) -> int:
        """Number of problems found so far, listed or not."""
        return sum(self._per_file.values())

    def __bool__(self) -> bool:
        return self.total > 0

    def error(self) -> CohortImportError:
        """The error to raise for everything collected: by file, and by line within a file."""
        files = {f: i for i, f in enumerate(dict.fromkeys(p.file for p in self.listed))}
        ordered = sorted(enumerate(self.listed), key=lambda ip: (files[ip[1].file], _line_number(ip[1]), ip[0]))
        return CohortImportError([p for _, p in ordered], total=self.total, omitted=dict(self._omitted))

    def raise_if_any(self) -> None:
        """Raise :class:`CohortImportError` if any problem was recorded."""
        if self:
            raise self.error()


def _line_number(problem: Problem) -> int:
    """N of a ``line N`` location; 0 for other locations, which keep the order they were found in."""
    head, _, number = problem.location.partition(" ")
    return int(number) if head == "line" and number.isdigit() else 0


def quote_list(values: list[str] | tuple[str, ...], limit: int = 5) -> str:
    """``'a', 'b', 'c'`` (and ``... (N in all)`` past ``limit``), for messages."""
    shown = ", ".join(repr(v) for v in list(values)[:limit])
    return shown + (f", ... ({len(values):,} in all)" if len(values) > limit else "")


def did_you_mean(value: str, options: tuple[str, ...] | list[str]) -> str:
    """A hint naming an option that differs from ``value`` only in case or surrounding space."""
    folded = value.strip().casefold()
    for option in options:
        if option.casefold() == folded and option != value:
            return f" (did you mean {option!r}?)"
    return ""


# ---------------------------------------------------------------------------------------------
# Patient ids, checked the same way in every file


def is_missing(values: np.ndarray) -> np.ndarray:
    """Boolean mask of missing cells (empty or ``NA``)."""
    values = np.asarray(values, dtype=object)
    return (values == MISSING_TOKENS[0]) | (values == MISSING_TOKENS[1])


def match_ids(file: str, ids: Sequence[str], locations: Sequence[str], field: str | None,
              patients: Sequence[str], log: ProblemLog, *, label_file: str, require_all: bool = True,
              what: str = "row") -> np.ndarray:
    """Map each patient to the row holding its id; -1 where there is none.

    Logs a problem for every empty id, repeated id, id not in the label file and (when
    ``require_all``) every patient without a row.
    """
    first: dict[str, int] = {}
    known = set(patients)
    for row, pid in enumerate(ids):
        if pid in MISSING_TOKENS:
            log.add(file, locations[row], field, f"empty patient id: every {what} needs one", kind="empty id")
        elif pid in first:
            log.add(file, locations[row], field,
                    f"patient id {pid!r} appears again (first at {locations[first[pid]]}): keep one {what} per patient",
                    kind="duplicate id")
        else:
            first[pid] = row
            if pid not in known:
                log.add(file, locations[row], field,
                        f"patient {pid!r} is not in the label file {label_file}: add it there or remove this {what}",
                        kind="unknown patient")
    index = np.array([first.get(p, -1) for p in patients], dtype=np.int64)
    if require_all:
        for p in np.asarray(patients, dtype=object)[index < 0]:
            log.add(file, f"patient {p}", None,
                    f"no {what} for this patient of the label file {label_file}: add one, or remove the patient "
                    "from the label file", kind="missing patient")
    return index
