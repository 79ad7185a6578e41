"""CSV/TSV readers: the label table, omics matrices, clinical fields, sequences in a column.

Every table is read by pandas as strings only (no type guessing, no silent NaN), with the
header taken as an ordinary row so line numbers stay exact: row ``i`` of the frame is line
``i + 1`` of the file, blank lines included, shifted only by line breaks inside quoted cells
(which are counted). Cells are stripped of surrounding spaces
(the UCI splice file pads its columns). An empty cell or ``NA`` is a missing value; every other
value is parsed here, so each bad cell is reported with its line and column. A numeric value
outside the public range the spec declares for it (clinical ``ranges``, omics ``range``) is
refused the same way.
"""

from __future__ import annotations

import gzip
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from numpy.dtypes import StringDType

from client.importers.fasta import SequenceRecord
from client.importers.problems import MISSING_TOKENS, ProblemLog, did_you_mean, is_missing, match_ids, quote_list
from common.spec import ClinicalSpec, LabelSpec, OmicsSpec, SequencesSpec

_NONFINITE_TOKENS = frozenset({"nan", "+nan", "-nan", "inf", "+inf", "-inf", "infinity", "+infinity", "-infinity"})
_FIELDS_ERROR = re.compile(r"Expected (\d+) fields in line (\d+), saw (\d+)")
_COMPRESSED = (".gz", ".bz2", ".xz", ".zip", ".zst")


def separator_for(path: Path) -> str:
    """Tab for ``.tsv``/``.tab`` (also compressed, e.g. ``.tsv.gz``), comma otherwise."""
    name = path.name.lower()
    for ext in _COMPRESSED:
        name = name.removesuffix(ext)
    return "\t" if name.endswith((".tsv", ".tab")) else ","


def _sep_name(sep: str) -> str:
    return "tab" if sep == "\t" else repr(sep)


@dataclass
class Table:
    """A table's header and data rows as strings, with each row's line number in the file."""

    path: Path
    sep: str
    header: list[str]
    data: np.ndarray
    lines: np.ndarray
    header_line: int = 1

    @property
    def file(self) -> str:
        """The path as shown in problems."""
        return str(self.path)

    def __len__(self) -> int:
        return int(self.lines.shape[0])

    def find(self, name: str, log: ProblemLog, *, named_in: str) -> int | None:
        """Position of column ``name``; logs a problem (and returns None) if it is absent or repeated."""
        hits = [i for i, h in enumerate(self.header) if h == name]
        if len(hits) == 1:
            return hits[0]
        if hits:
            cols = ", ".join(str(i + 1) for i in hits)
            log.add(self.file, self.line_of_header, f"column {name!r}",
                    f"the header names this column {len(hits)} times (columns {cols}): rename or drop the copies",
                    kind="duplicate column")
            return None
        log.add(self.file, self.line_of_header, f"column {name!r}", self._missing_column_message(name, named_in),
                kind="missing column")
        return None

    def _missing_column_message(self, name: str, named_in: str) -> str:
        named = [h for h in self.header if h]
        msg = f"no such column (named in {named_in}); the header has {quote_list(named, 8)}"
        msg += did_you_mean(name, named)
        other = "," if self.sep == "\t" else "\t"
        if len(named) == 1 and other in named[0]:
            msg += (f"; the file looks {_sep_name(other)}-separated but is read as {_sep_name(self.sep)}-separated"
                    " (the separator follows the file name: .tsv/.tab for tabs, anything else for commas)")
        return msg

    def cells(self, col: int, rows: np.ndarray | None = None) -> np.ndarray:
        """Stripped string cells of column ``col`` (all data rows, or ``rows``) as an object array."""
        column = self.data[:, col] if rows is None else self.data[rows, col]
        return np.strings.strip(column.astype(StringDType())).astype(object)

    def line(self, row: int) -> str:
        """``line N`` for data row ``row``."""
        return f"line {int(self.lines[row])}"

    @property
    def line_of_header(self) -> str:
        """``line N`` of the header."""
        return f"line {self.header_line}"


class TableCache:
    """Reads each table once, so a file used twice (label and clinical) reports its problems once."""

    def __init__(self, log: ProblemLog) -> None:
        self.log = log
        self._tables: dict[tuple[Path, str], Table | None] = {}

    def read(self, path: Path, sep: str | None = None) -> Table | None:
        """The table at ``path`` (None if it cannot be used; the reason is logged)."""
        key = (Path(path), sep or separator_for(Path(path)))
        if key not in self._tables:
            self._tables[key] = read_table(key[0], self.log, sep=key[1])
        return self._tables[key]


# ---------------------------------------------------------------------------------------------
# Reading


def read_table(path: Path, log: ProblemLog, *, sep: str | None = None) -> Table | None:
    """Read a CSV/TSV (optionally compressed) as strings; None if unusable (problem logged).

    The first non-blank line is the header. Empty files and header-only files are problems;
    blank lines are skipped but keep their line numbers.
    """
    sep = sep or separator_for(path)
    frame = _read_frame(path, sep, log)
    if frame is None:
        return None
    cells = frame.to_numpy(dtype=object)
    lines = _line_numbers(path, cells)
    keep = ~_blank_rows(cells)
    cells, lines = cells[keep], lines[keep]
    if cells.shape[0] == 0:
        log.add(str(path), "", None, "the file is empty: it needs a header line and one row per patient",
                kind="empty file")
        return None
    if cells.shape[0] == 1:
        log.add(str(path), "", None, "the file has a header line but no data rows", kind="empty file")
        return None
    header = [str(h).strip() for h in cells[0]]
    return Table(path=path, sep=sep, header=header, data=cells[1:], lines=lines[1:], header_line=int(lines[0]))


def _blank_rows(cells: np.ndarray) -> np.ndarray:
    """Rows whose cells are all empty or spaces; the first cell is checked before the whole row."""
    blank = np.zeros(cells.shape[0], dtype=bool)
    if cells.shape[0] == 0:
        return blank
    maybe = np.flatnonzero(np.strings.strip(cells[:, 0].astype(StringDType())) == "")
    if maybe.size:
        rest = np.strings.strip(cells[maybe].astype(StringDType()))
        blank[maybe[(rest == "").all(axis=1)]] = True
    return blank


def _line_numbers(path: Path, cells: np.ndarray) -> np.ndarray:
    """File line of each row: its index + 1, shifted by line breaks inside quoted cells.

    For a plain file a newline count tells whether any cell spans lines, so the cells are
    scanned only when one does (or when the file is compressed)."""
    rows = np.arange(1, cells.shape[0] + 1, dtype=np.int64)
    if cells.size == 0:
        return rows
    if path.suffix.lower() not in _COMPRESSED:
        try:
            breaks = _count_lines(path)
        except OSError:
            return rows
        if breaks <= cells.shape[0]:
            return rows
    inside = np.strings.count(cells.astype(StringDType()), "\n").sum(axis=1)
    return rows + np.concatenate([[0], np.cumsum(inside)[:-1]])


def _count_lines(path: Path) -> int:
    """Lines in a plain file (a last line without a newline counts), read in 1 MiB chunks."""
    lines, last = 0, b"\n"
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            lines += chunk.count(b"\n")
            last = chunk[-1:]
    return lines + (last != b"\n")


def _read_frame(path: Path, sep: str, log: ProblemLog) -> pd.DataFrame | None:
    """The raw frame (header as row 0), or None with the reason logged; never a pandas exception."""
    file = str(path)
    try:
        return pd.read_csv(path, sep=sep, header=None, dtype=str, keep_default_na=False, na_values=[],
                           skip_blank_lines=False, index_col=False, encoding="utf-8-sig", compression="infer")
    except FileNotFoundError:
        log.add(file, "", None, "file not found (paths in the spec are relative to the spec file)",
                kind="unreadable file")
    except IsADirectoryError:
        log.add(file, "", None, "is a folder, not a file", kind="unreadable file")
    except PermissionError:
        log.add(file, "", None, "cannot be read: permission denied", kind="unreadable file")
    except pd.errors.EmptyDataError:
        if _starts_blank(path):
            log.add(file, "line 1", None, "the first line is blank: the header naming the columns must be line 1",
                    kind="blank header")
        else:
            log.add(file, "", None, "the file is empty: it needs a header line and one row per patient",
                    kind="empty file")
    except (EOFError, zlib.error, gzip.BadGzipFile):
        log.add(file, "", None, "the compressed file is truncated or corrupt: copy or compress it again",
                kind="unreadable file")
    except UnicodeDecodeError as exc:
        sheet = " (a spreadsheet? export it as CSV)" if path.suffix.lower() in (".xls", ".xlsx", ".ods") else ""
        log.add(file, "", None, f"is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start:,})"
                f"{sheet}: save it as UTF-8 CSV/TSV", kind="unreadable file")
    except pd.errors.ParserError as exc:
        _log_parser_error(file, sep, str(exc), log)
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc).strip().splitlines()[0]
        log.add(file, "", None, f"cannot be read as a {_sep_name(sep)}-separated table: {reason}",
                kind="unreadable file")
    return None


def _starts_blank(path: Path) -> bool:
    """Whether a file pandas found no columns in has text after some blank lines (plain files only)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(1 << 16)
    except OSError:
        return False
    return not head.startswith(b"\x1f\x8b") and bool(head.strip()) and not head.split(b"\n", 1)[0].strip()


def _log_parser_error(file: str, sep: str, text: str, log: ProblemLog) -> None:
    match = _FIELDS_ERROR.search(text)
    if match:
        expected, line, saw = match.groups()
        log.add(file, f"line {line}", None,
                f"has {saw} fields but the header line has {expected}: check the separator "
                f"({_sep_name(sep)}) and quoting of this line", kind="ragged row")
    else:
        reason = text.strip().splitlines()[0] if text.strip() else "parser error"
        log.add(file, "", None, f"cannot be parsed as a {_sep_name(sep)}-separated table: {reason}",
                kind="unreadable file")


# ---------------------------------------------------------------------------------------------
# Patient ids


def _table_ids(table: Table, id_col: int, log: ProblemLog, patients: tuple[str, ...], *, label_file: str,
               require_all: bool = True) -> np.ndarray:
    ids = table.cells(id_col)
    locations = [table.line(r) for r in range(len(table))]
    return match_ids(table.file, ids.tolist(), locations, f"column {table.header[id_col]!r}", patients, log,
                     label_file=label_file, require_all=require_all)


# ---------------------------------------------------------------------------------------------
# Cell parsing


def _strip_block(table: Table, rows: np.ndarray, cols: list[int]) -> np.ndarray:
    """Stripped cells of ``rows`` x ``cols`` as a numpy StringDType array (vectorised in C)."""
    block = table.data[np.ix_(np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64))]
    return np.strings.strip(block.astype(StringDType()))


def _list_cells(table: Table, rows: np.ndarray, cols: list[int], mask: np.ndarray, log: ProblemLog, kind: str,
                message: Callable[[int, int], str]) -> None:
    """Log a problem for the first cells of ``mask`` (row-major) that fit the cap; count the rest."""
    hits = np.argwhere(mask)
    room = min(log.room(table.file, kind), len(hits))
    for r, c in hits[:room]:
        col = cols[c]
        log.add(table.file, table.line(rows[r]), f"column {table.header[col]!r}", message(r, c), kind=kind)
    log.count(table.file, kind, len(hits) - room)


def parse_numeric(table: Table, rows: np.ndarray, cols: list[int], log: ProblemLog, *, allow_missing: bool,
                  missing_hint: str) -> np.ndarray:
    """Parse ``rows`` x ``cols`` as finite numbers; missing cells become NaN (or problems).

    Literal ``nan``/``inf`` are refused: a missing value is an empty cell, and an infinite one
    is a data error. Returns float64 of shape ``(len(rows), len(cols))``.
    """
    cells = _strip_block(table, rows, cols)
    missing = (cells == MISSING_TOKENS[0]) | (cells == MISSING_TOKENS[1])
    values = _to_float(cells, missing)
    bad = ~missing & ~np.isfinite(values)
    if bad.any():
        lowered = np.array([str(v).lower() for v in cells[bad]], dtype=object)
        nonfinite = np.zeros_like(bad)
        nonfinite[bad] = np.isin(lowered, list(_NONFINITE_TOKENS)) | np.isinf(values[bad])
        _list_cells(table, rows, cols, nonfinite, log, "not a finite number",
                    lambda r, c: f"value {cells[r, c]!r} is not a finite number: write an empty cell for a "
                    "missing value")
        _list_cells(table, rows, cols, bad & ~nonfinite, log, "not a number",
                    lambda r, c: f"value {cells[r, c]!r} is not a number{_decimal_hint(cells[r, c])}")
    if not allow_missing and missing.any():
        _list_cells(table, rows, cols, missing, log, "missing value",
                    lambda r, c: f"missing value{'' if cells[r, c] == '' else ' (NA)'}: {missing_hint}")
    values[missing | bad] = np.nan
    return values


def check_ranges(table: Table, rows: np.ndarray, cols: list[int], values: np.ndarray,
                 bounds: list[tuple[float, float] | None], log: ProblemLog, *, named_in: list[str]) -> None:
    """Log every present value of ``values`` (from :func:`parse_numeric`) outside its column's declared range.

    ``bounds[j]`` is the public ``(lo, hi)`` of column ``j`` (inclusive; None: none declared) and
    ``named_in[j]`` says where the spec declares it. Missing values (NaN) are never out of range.
    """
    if not any(b is not None for b in bounds) or values.size == 0:
        return
    lo = np.array([-np.inf if b is None else b[0] for b in bounds])
    hi = np.array([np.inf if b is None else b[1] for b in bounds])
    outside = ~np.isnan(values) & ((values < lo) | (values > hi))
    if not outside.any():
        return

    def message(r: int, c: int) -> str:
        cell = str(table.data[rows[r], cols[c]]).strip()
        a, b = bounds[c]
        return (f"value {cell!r} is outside the declared range [{_number(a)}, {_number(b)}] ({named_in[c]}): "
                "fix the value, or widen the range in the spec (a public bound every site must agree on)")

    _list_cells(table, rows, cols, outside, log, "out of declared range", message)


def _number(x: float) -> str:
    """A bound as written in a spec: ``120`` rather than ``120.0``."""
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else repr(float(x))


def _to_float(cells: np.ndarray, missing: np.ndarray) -> np.ndarray:
    """Floats of the present cells (NaN where missing or unparseable). numpy's C cast parses a
    whole valid block at once; only a block with a bad cell takes pandas' cell-by-cell path."""
    values = np.full(cells.shape, np.nan)
    present = ~missing
    try:
        values[present] = cells[present].astype(np.float64)
    except ValueError:
        parsed = pd.to_numeric(pd.Series(cells[present].astype(object), dtype=object), errors="coerce")
        values[present] = parsed.to_numpy(np.float64)
    # Python's float syntax allows '1_000'; a data file should not.
    values[present & (np.strings.find(cells, "_") >= 0)] = np.nan
    return values


def _decimal_hint(token: str) -> str:
    try:
        float(token.replace(",", "."))
    except ValueError:
        return ""
    return " (use '.' as the decimal mark)" if "," in token else ""


def parse_categorical(table: Table, rows: np.ndarray, col: int, categories: tuple[str, ...], log: ProblemLog, *,
                      allow_missing: bool, named_in: str, missing_hint: str) -> np.ndarray:
    """Codes (int16) into ``categories``; -1 for a missing cell. Unknown values are problems."""
    cells = _strip_block(table, rows, [col])[:, 0].astype(object)
    missing = is_missing(cells)
    lookup = {c: i for i, c in enumerate(categories)}
    codes = np.array([lookup.get(v, -1) for v in cells], dtype=np.int16)
    unknown = (codes < 0) & ~missing
    shown = ", ".join(map(repr, categories))
    _list_cells(table, rows, [col], unknown[:, None], log, "unknown category",
                lambda r, c: f"value {cells[r]!r} is not one of the categories {shown} ({named_in})"
                f"{did_you_mean(cells[r], categories)}: fix the cell, or add the category to the spec "
                "(every site must agree on it)")
    if not allow_missing and missing.any():
        _list_cells(table, rows, [col], missing[:, None], log, "missing value",
                    lambda r, c: f"missing value: {missing_hint}")
    return codes


# ---------------------------------------------------------------------------------------------
# Label table


@dataclass
class LabelData:
    """The cohort as the label file defines it: patient ids in file order and class codes."""

    file: str
    patients: tuple[str, ...]
    codes: np.ndarray
    rows: np.ndarray


def read_labels(spec: LabelSpec, id_column: str, tables: TableCache) -> LabelData | None:
    """The label table's patients and labels; None if the file or its columns are unusable."""
    log = tables.log
    table = tables.read(spec.file)
    if table is None:
        return None
    id_col = table.find(id_column, log, named_in="[label] id-column or [cohort] id-column")
    label_col = table.find(spec.column, log, named_in="[label] column")
    if id_col is None or label_col is None:
        return None
    ids = table.cells(id_col)
    valid = ~is_missing(ids)
    patients = tuple(dict.fromkeys(ids[valid].tolist()))
    rows = match_ids(table.file, ids.tolist(), [table.line(r) for r in range(len(table))],
                     f"column {id_column!r}", patients, log, label_file=table.file)
    codes = parse_categorical(table, rows, label_col, spec.classes, log, allow_missing=False,
                              named_in="[label] classes",
                              missing_hint=f"every patient needs a label ({', '.join(spec.classes)}); "
                                           "fill it in or remove the patient's row")
    return LabelData(file=table.file, patients=patients, codes=codes.astype(np.int64), rows=rows)


def read_groups(path: Path, id_column: str, group_column: str, patients: tuple[str, ...], label_file: str,
                tables: TableCache) -> np.ndarray | None:
    """Each patient's group (policy = "group"); a missing group value is a problem."""
    log = tables.log
    table = tables.read(path)
    if table is None:
        return None
    id_col = table.find(id_column, log, named_in="[cohort] id-column")
    group_col = table.find(group_column, log, named_in="[split] group-column")
    if id_col is None or group_col is None:
        return None
    rows = _table_ids(table, id_col, log, patients, label_file=label_file)
    present = rows >= 0
    groups = np.full(len(patients), "", dtype=object)
    groups[present] = table.cells(group_col, rows[present])
    missing = is_missing(groups) & present
    _list_cells(table, rows, [group_col], missing[:, None], log, "missing group",
                lambda r, c: f"missing group value: with policy = \"group\" every patient needs a group in "
                f"column {group_column!r}")
    return groups.astype(str)


# ---------------------------------------------------------------------------------------------
# Omics and clinical


@dataclass
class MatrixResult:
    """A numeric matrix aligned to the cohort's patients."""

    values: np.ndarray
    features: tuple[str, ...]
    report: dict = field(default_factory=dict)


def read_omics(spec: OmicsSpec, id_column: str, patients: tuple[str, ...], label_file: str,
               tables: TableCache) -> MatrixResult | None:
    """A wide numeric matrix, one row per patient; features are the spec's or the file's columns."""
    log = tables.log
    table = tables.read(spec.file)
    if table is None:
        return None
    id_col = table.find(id_column, log, named_in="[modalities.omics] id-column or [cohort] id-column")
    if id_col is None:
        return None
    cols = _omics_columns(table, id_col, spec, log)
    if cols is None:
        return None
    rows = _table_ids(table, id_col, log, patients, label_file=label_file)
    present = rows >= 0
    values = np.full((len(patients), len(cols)), np.nan)
    values[present] = parse_numeric(
        table, rows[present], cols, log, allow_missing=spec.allow_missing,
        missing_hint="set allow-missing = true in [modalities.omics] to keep missing values (imputed in training)")
    check_ranges(table, rows[present], cols, values[present], [spec.range] * len(cols), log,
                 named_in=["range in [modalities.omics]"] * len(cols))
    features = tuple(table.header[c] for c in cols)
    ignored = len(table.header) - 1 - len(cols)
    report = {"features": len(features), "missing_values": int(np.isnan(values[present]).sum()),
              "columns_ignored": ignored}
    return MatrixResult(values=values, features=features, report=report)


def _omics_columns(table: Table, id_col: int, spec: OmicsSpec, log: ProblemLog) -> list[int] | None:
    if spec.features is not None:
        cols = [table.find(f, log, named_in="[modalities.omics] features") for f in spec.features]
        return None if any(c is None for c in cols) else cols
    # An unnamed column with no values is a trailing separator (spreadsheet exports): not a feature.
    cols = [i for i in range(len(table.header))
            if i != id_col and (table.header[i] or (table.data[:, i] != "").any())]
    ok = True
    first: dict[str, int] = {}
    for i in cols:
        name = table.header[i]
        if not name:
            log.add(table.file, table.line_of_header, f"column {i + 1}", "column has no name in the header: name it or remove it",
                    kind="unnamed column")
            ok = False
        elif name in first:
            log.add(table.file, table.line_of_header, f"column {name!r}",
                    f"the header names this column again (columns {first[name] + 1} and {i + 1}): "
                    "feature names must be unique", kind="duplicate column")
            ok = False
        else:
            first[name] = i
    if not cols:
        log.add(table.file, table.line_of_header, None, "no feature columns besides the id column", kind="no features")
        ok = False
    return cols if ok else None


@dataclass
class ClinicalResult:
    """Numeric and categorical clinical fields aligned to the cohort's patients."""

    numeric: np.ndarray
    categorical: np.ndarray
    report: dict = field(default_factory=dict)


def read_clinical(spec: ClinicalSpec, id_column: str, patients: tuple[str, ...], label_file: str,
                  tables: TableCache) -> ClinicalResult | None:
    """The spec's numeric and categorical columns; other columns of the file are ignored."""
    log = tables.log
    table = tables.read(spec.file)
    if table is None:
        return None
    id_col = table.find(id_column, log, named_in="[modalities.clinical] id-column or [cohort] id-column")
    num_cols = [table.find(c, log, named_in="[modalities.clinical] numeric") for c in spec.numeric]
    cat_cols = {name: table.find(name, log, named_in="[modalities.clinical] categorical")
                for name in spec.categorical}
    if id_col is None or None in num_cols or None in cat_cols.values():
        return None
    rows = _table_ids(table, id_col, log, patients, label_file=label_file)
    present = rows >= 0
    hint = "set allow-missing = true in [modalities.clinical] to keep missing values"
    numeric = np.full((len(patients), len(num_cols)), np.nan)
    if num_cols:
        numeric[present] = parse_numeric(table, rows[present], num_cols, log, allow_missing=spec.allow_missing,
                                         missing_hint=hint)
        check_ranges(table, rows[present], num_cols, numeric[present], [spec.ranges.get(c) for c in spec.numeric],
                     log, named_in=[f"ranges.{c} in [modalities.clinical]" for c in spec.numeric])
    categorical = np.full((len(patients), len(cat_cols)), -1, dtype=np.int16)
    for j, (name, col) in enumerate(cat_cols.items()):
        categorical[present, j] = parse_categorical(
            table, rows[present], col, spec.categorical[name], log, allow_missing=spec.allow_missing,
            named_in=f"categorical.{name} in [modalities.clinical]", missing_hint=hint)
    report = {"numeric": len(num_cols), "categorical": len(cat_cols),
              "missing_values": int(np.isnan(numeric[present]).sum() + (categorical[present] < 0).sum())}
    return ClinicalResult(numeric=numeric, categorical=categorical, report=report)


# ---------------------------------------------------------------------------------------------
# Sequences in a column


def read_sequence_column(spec: SequencesSpec, id_column: str, tables: TableCache) -> list[SequenceRecord] | None:
    """One :class:`SequenceRecord` per row of a CSV/TSV with an id and a sequence column."""
    log = tables.log
    table = tables.read(spec.file, "\t" if spec.format == "tsv" else ",")
    if table is None:
        return None
    id_col = table.find(id_column, log, named_in="[modalities.sequences] id-column or [cohort] id-column")
    seq_col = table.find(spec.column or "", log, named_in="[modalities.sequences] column")
    if id_col is None or seq_col is None:
        return None
    ids, seqs = table.cells(id_col), table.cells(seq_col)
    field_name, id_field = f"column {table.header[seq_col]!r}", f"column {table.header[id_col]!r}"
    return [SequenceRecord(id=str(pid), sequence=str(seq), location=table.line(r), field=field_name,
                           lines=[(int(table.lines[r]), 0)], empty_message="empty cell: every patient needs a sequence",
                           id_field=id_field, unit="row")
            for r, (pid, seq) in enumerate(zip(ids, seqs))]
