"""``import_cohort``: read every modality, validate all of it, then build one aligned Cohort.

The patients are the ids of the label file, in its order; every other file is joined to
them by id. Nothing is built until every file has been read and checked: all problems are
collected and raised together, so a vault is written from a whole, valid cohort or not at all.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from client.importers.events import read_events
from client.importers.fasta import encode_records, read_fasta
from client.importers.problems import ProblemLog
from client.importers.tables import LabelData, TableCache, read_clinical, read_groups, read_labels, read_omics, \
    read_sequence_column
from client.importers.vcf import read_variants
from common.cohort import ClinicalTable, Cohort, FeatureMatrix
from common.progress import progress_bar
from common.spec import CohortSpec, with_resolved_features
from common.splits import assign_splits

Advance = Callable[[int], None]


class _Tracker:
    """One progress task per modality; a no-op unless progress was asked for."""

    def __init__(self, bar: Any | None) -> None:
        self.bar = bar

    def task(self, name: str, total: int | None = 1) -> Advance:
        if self.bar is None:
            return lambda n: None
        task_id = self.bar.add_task(name, total=total)
        return lambda n: self.bar.advance(task_id, n)


@contextmanager
def _tracker(show: bool) -> Iterator[_Tracker]:
    if not show:
        yield _Tracker(None)
        return
    with progress_bar() as bar:
        yield _Tracker(bar)


def import_cohort(spec: CohortSpec, *, show_progress: bool = False) -> Cohort:
    """Read and validate every file ``spec`` names and return the aligned :class:`Cohort`.

    The cohort's schema is the spec's with feature lists resolved from the data (variant sites
    in file order, omics columns, the sorted event vocabulary) where the spec left them out.

    Raises
    ------
    CohortImportError
        Listing every problem found in every file (file, line or patient, column, what to do).
    """
    log = ProblemLog()
    tables = TableCache(log)
    with _tracker(show_progress) as progress:
        labels = _read_label_file(spec, tables, progress)
        if labels is None:
            log.raise_if_any()  # without the label file there is no patient list to check against
        groups = _read_group_column(spec, labels, tables)
        parts = {name: _read_modality(name, spec, labels, tables, progress) for name in spec.modalities}
    log.raise_if_any()
    return _build(spec, labels, groups, parts)


def _read_label_file(spec: CohortSpec, tables: TableCache, progress: _Tracker) -> LabelData | None:
    advance = progress.task("labels")
    labels = read_labels(spec.label, spec.label.id_column or spec.id_column, tables)
    advance(1)
    return labels


def _read_group_column(spec: CohortSpec, labels: LabelData, tables: TableCache) -> np.ndarray | None:
    if spec.split.policy != "group" or spec.split.group_column is None:
        return None
    if spec.split.group_file is None or spec.split.group_file == spec.label.file:
        path, id_column = spec.label.file, spec.label.id_column or spec.id_column
    else:
        path, id_column = spec.split.group_file, spec.id_column
    return read_groups(path, id_column, spec.split.group_column, labels.patients, labels.file, tables)


def _read_modality(name: str, spec: CohortSpec, labels: LabelData, tables: TableCache, progress: _Tracker) -> Any:
    """One modality's result aligned to ``labels.patients``, or None (problems logged)."""
    patients, label_file, log = labels.patients, labels.file, tables.log
    part = getattr(spec, name)
    if name == "variants":
        return read_variants(part, patients, label_file, log, progress.task(name, total=None))
    advance = progress.task(name)
    id_column = spec.id_column_for(part)
    if name == "sequences":
        records = read_fasta(part.file, log) if part.format == "fasta" else \
            read_sequence_column(part, id_column, tables)
        result = None if records is None else encode_records(str(part.file), records, patients, part.length,
                                                             label_file, log)
    elif name == "omics":
        result = read_omics(part, id_column, patients, label_file, tables)
    elif name == "clinical":
        result = read_clinical(part, id_column, patients, label_file, tables)
    else:
        result = read_events(part, id_column, patients, label_file, tables)
    advance(1)
    return result


def _build(spec: CohortSpec, labels: LabelData, groups: np.ndarray | None, parts: dict[str, Any]) -> Cohort:
    """The Cohort of validated parts, with the resolved schema, the splits and the import report."""
    resolved = _resolve(spec, parts)
    fractions = (spec.split.train, spec.split.validation, spec.split.test)
    split = assign_splits(labels.codes, fractions=fractions, seed=spec.split.seed, groups=groups)
    cohort = Cohort(patient_ids=np.asarray(labels.patients, dtype=str), labels=labels.codes,
                    classes=tuple(spec.label.classes), split=split, schema=resolved.schema(), groups=groups,
                    report=_report(labels, parts))
    if (seq := parts.get("sequences")) is not None:
        cohort.sequences = seq.codes
    for name in ("variants", "omics", "events"):
        if (part := parts.get(name)) is not None:
            names = part.sites if name == "variants" else part.features
            setattr(cohort, name, FeatureMatrix(values=part.values, features=tuple(names)))
    if (clin := parts.get("clinical")) is not None:
        c = spec.clinical
        cohort.clinical = ClinicalTable(numeric=clin.numeric, numeric_names=tuple(c.numeric),
                                        categorical=clin.categorical, categorical_names=tuple(c.categorical),
                                        categories={k: tuple(v) for k, v in c.categorical.items()})
    return cohort


def _resolve(spec: CohortSpec, parts: dict[str, Any]) -> CohortSpec:
    """The spec with the feature lists the data fixed (variants, omics, events)."""
    features: dict[str, tuple[str, ...]] = {}
    if "variants" in parts:
        features["variants"] = parts["variants"].sites
    for name in ("omics", "events"):
        if name in parts:
            features[name] = parts[name].features
    return with_resolved_features(spec, **features)


def _report(labels: LabelData, parts: dict[str, Any]) -> dict[str, Any]:
    """Import facts with no patient data: counts per modality and what was changed on the way in."""
    report: dict[str, Any] = {"patients": len(labels.patients)}
    for name, part in parts.items():
        report[name] = dict(part.report)
    return report
