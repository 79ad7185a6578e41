"""Long-format events (one row per patient and feature, e.g. METABRIC's mutation list) to flags.

A patient's flag for a feature is 1 if any row names both. A patient with no row at all is
not the same as a patient with no event (METABRIC: 121 patients were never sequenced), so
``absent`` decides: ``"missing"`` gives that patient NaN flags (not profiled), ``"zero"``
gives zeros. A ``profiled`` table lists patients known to be profiled: they get zeros.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from client.importers.problems import MISSING_TOKENS, ProblemLog, match_ids
from client.importers.tables import Table, TableCache
from common.spec import EventsSpec


@dataclass
class EventsResult:
    """Flags (n_patients, g) float32 aligned to the cohort, the feature names and import facts."""

    values: np.ndarray
    features: tuple[str, ...]
    report: dict


def read_events(spec: EventsSpec, id_column: str, patients: tuple[str, ...], label_file: str,
                tables: TableCache) -> EventsResult | None:
    """Pivot ``spec.file`` to flags; None if it cannot be used (problems logged)."""
    log = tables.log
    table = tables.read(spec.file)
    if table is None:
        return None
    id_col = table.find(id_column, log, named_in="[modalities.events] id-column or [cohort] id-column")
    feat_col = table.find(spec.feature_column, log, named_in="[modalities.events] feature-column")
    if id_col is None or feat_col is None:
        return None
    ids, feats = table.cells(id_col), table.cells(feat_col)
    usable = _check_rows(table, ids, feats, id_col, feat_col, set(patients), label_file, log)
    features = _vocabulary(table, feats, usable, feat_col, spec, log)
    profiled = _read_profiled(spec, id_column, patients, label_file, tables)
    if log.problems_in(table.file) or (spec.profiled is not None and profiled is None):
        return None
    return _pivot(ids[usable], feats[usable], patients, features, spec, profiled, n_rows=len(table))


def _check_rows(table: Table, ids: np.ndarray, feats: np.ndarray, id_col: int, feat_col: int,
                known: set[str], label_file: str, log: ProblemLog) -> np.ndarray:
    """Mask of rows with a known patient and a feature; a problem for every other row."""
    usable = np.ones(len(table), dtype=bool)
    id_field, feat_field = f"column {table.header[id_col]!r}", f"column {table.header[feat_col]!r}"
    for row, (pid, feat) in enumerate(zip(ids, feats)):
        if pid in MISSING_TOKENS:
            log.add(table.file, table.line(row), id_field, "empty patient id: every row needs one", kind="empty id")
            usable[row] = False
        elif pid not in known:
            log.add(table.file, table.line(row), id_field, f"patient {pid!r} is not in the label file {label_file}: "
                    "add it there or remove this row", kind="unknown patient")
            usable[row] = False
        if feat in MISSING_TOKENS:
            log.add(table.file, table.line(row), feat_field, "empty value: every row needs a feature name",
                    kind="empty feature")
            usable[row] = False
    return usable


def _vocabulary(table: Table, feats: np.ndarray, usable: np.ndarray, feat_col: int, spec: EventsSpec,
                log: ProblemLog) -> tuple[str, ...]:
    """The spec's feature list, or the sorted set observed; values outside a given list are problems."""
    if spec.features is None:
        return tuple(sorted(set(feats[usable].tolist())))
    agreed = set(spec.features)
    field = f"column {table.header[feat_col]!r}"
    for row in np.flatnonzero(usable):
        if feats[row] not in agreed:
            log.add(table.file, table.line(row), field, f"value {feats[row]!r} is not in the agreed list "
                    "([modalities.events] features): remove the row, or add the feature to the list at every site",
                    kind="unknown feature")
    return spec.features


def _read_profiled(spec: EventsSpec, id_column: str, patients: tuple[str, ...], label_file: str,
                   tables: TableCache) -> set[str] | None:
    """Patients listed as profiled (empty set without a ``profiled`` table; None if unusable)."""
    if spec.profiled is None:
        return set()
    table = tables.read(spec.profiled)
    if table is None:
        return None
    id_col = table.find(id_column, tables.log, named_in="[modalities.events] id-column or [cohort] id-column")
    if id_col is None:
        return None
    ids = table.cells(id_col).tolist()
    rows = match_ids(table.file, ids, [table.line(r) for r in range(len(table))], f"column {id_column!r}",
                     patients, tables.log, label_file=label_file, require_all=False)
    return {p for p, r in zip(patients, rows) if r >= 0}


def _pivot(ids: np.ndarray, feats: np.ndarray, patients: tuple[str, ...], features: tuple[str, ...],
           spec: EventsSpec, profiled: set[str], *, n_rows: int) -> EventsResult:
    row_of = {p: i for i, p in enumerate(patients)}
    col_of = {f: j for j, f in enumerate(features)}
    values = np.zeros((len(patients), len(features)), dtype=np.float32)
    rows = np.fromiter((row_of[p] for p in ids), dtype=np.int64, count=len(ids))
    cols = np.fromiter((col_of[f] for f in feats), dtype=np.int64, count=len(feats))
    values[rows, cols] = 1.0
    has_event = np.zeros(len(patients), dtype=bool)
    has_event[rows] = True
    in_profiled = np.array([p in profiled for p in patients], dtype=bool)
    not_profiled = ~has_event & ~in_profiled if spec.absent == "missing" else np.zeros(len(patients), dtype=bool)
    values[not_profiled] = np.nan
    report = {"rows": n_rows, "features": len(features), "patients_with_events": int(has_event.sum()),
              "patients_not_profiled": int(not_profiled.sum()),
              "patients_profiled_without_events": int((~has_event & ~not_profiled).sum())}
    return EventsResult(values=values, features=features, report=report)
