"""The in-memory cohort: one site's aligned, validated data, and its serialised (blob) form.

Rows are patients, in the same order in every modality. Importers build a :class:`Cohort`;
the vault stores it as a handful of named blobs (``cohort_to_blobs``), and training code reads
it back with ``cohort_from_blobs`` without any plaintext touching disk.

Encodings
---------
sequences   uint8 (n, L) codes into ``common.encoders.DNA_ALPHABET`` ("ACGTN"); N marks ambiguity codes.
variants    int8 (n, m) alternate-allele dosages 0/1/2, -1 for a missing genotype.
omics       float64 (n, p); NaN for a missing value (only where the spec allows it).
clinical    numeric float64 (n, k) with NaN for missing; categorical int16 codes (n, c) into
            each column's categories, -1 for missing.
events      float32 (n, g) flags 0/1; NaN for a patient that was not profiled.
split       int8 (n,) codes into ``SPLIT_NAMES`` (0 train, 1 validation, 2 test).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from common.spec import MODALITIES, SPLIT_NAMES, schema_hash

BLOB_FORMAT = 1


@dataclass
class FeatureMatrix:
    """A dense patients x features matrix with its feature names."""

    values: np.ndarray
    features: tuple[str, ...]


@dataclass
class ClinicalTable:
    """Numeric and categorical clinical fields, aligned to the cohort's rows."""

    numeric: np.ndarray
    numeric_names: tuple[str, ...]
    categorical: np.ndarray
    categorical_names: tuple[str, ...]
    categories: dict[str, tuple[str, ...]]


@dataclass
class Cohort:
    """One site's validated data. See the module docstring for the encodings."""

    patient_ids: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]
    split: np.ndarray
    schema: dict[str, Any]
    groups: np.ndarray | None = None
    sequences: np.ndarray | None = None
    variants: FeatureMatrix | None = None
    omics: FeatureMatrix | None = None
    clinical: ClinicalTable | None = None
    events: FeatureMatrix | None = None
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def n(self) -> int:
        """Number of patients."""
        return int(self.patient_ids.shape[0])

    @property
    def modalities(self) -> tuple[str, ...]:
        """Names of the modalities present, in canonical order."""
        return tuple(m for m in MODALITIES if getattr(self, m) is not None)

    @property
    def schema_hash(self) -> str:
        """Hash of the resolved schema this cohort was imported under."""
        return schema_hash(self.schema)

    def split_mask(self, name: str) -> np.ndarray:
        """Boolean row mask of one split (``train``, ``validation`` or ``test``)."""
        return self.split == SPLIT_NAMES.index(name)

    def summary(self) -> dict[str, Any]:
        """Counts only: patients, classes per split, modality shapes. No patient data."""
        per_split = {}
        for code, name in enumerate(SPLIT_NAMES):
            mask = self.split == code
            per_split[name] = {"patients": int(mask.sum()),
                               "classes": {c: int((self.labels[mask] == i).sum()) for i, c in enumerate(self.classes)}}
        shapes: dict[str, Any] = {}
        if self.sequences is not None:
            shapes["sequences"] = {"length": int(self.sequences.shape[1])}
        for name in ("variants", "omics", "events"):
            part = getattr(self, name)
            if part is not None:
                shapes[name] = {"features": len(part.features)}
        if self.clinical is not None:
            shapes["clinical"] = {"numeric": len(self.clinical.numeric_names),
                                  "categorical": len(self.clinical.categorical_names)}
        return {
            "patients": self.n,
            "classes": {c: int((self.labels == i).sum()) for i, c in enumerate(self.classes)},
            "splits": per_split,
            "modalities": shapes,
            "missing": self.missing_values(),
            "schema_hash": self.schema_hash,
        }

    def missing_values(self) -> dict[str, dict[str, int]]:
        """Per modality, each column some patients lack and how many lack it (counts only).

        Missing is NaN for numbers and for the events of a patient not profiled, -1 for a
        categorical code or a genotype dosage; sequences have none. A column every patient lacks
        shows as ``n``. Column names are the site's own (this stays in its vault and on its screen).
        """
        parts: list[tuple[str, tuple[str, ...], np.ndarray]] = []
        if self.variants is not None:
            parts.append(("variants", self.variants.features, np.asarray(self.variants.values) < 0))
        if self.omics is not None:
            parts.append(("omics", self.omics.features, np.isnan(np.asarray(self.omics.values, dtype=np.float64))))
        if self.events is not None:
            parts.append(("events", self.events.features, np.isnan(np.asarray(self.events.values, dtype=np.float64))))
        if self.clinical is not None:
            c = self.clinical
            parts.append(("clinical", (*c.numeric_names, *c.categorical_names),
                          np.hstack([np.isnan(np.asarray(c.numeric, dtype=np.float64)).reshape(self.n, -1),
                                     (np.asarray(c.categorical) < 0).reshape(self.n, -1)])))
        out = {}
        for modality, names, missing in parts:
            counts = missing.sum(axis=0) if missing.size else np.zeros(len(names), dtype=int)
            columns = {name: int(k) for name, k in zip(names, counts) if k}
            if columns:
                out[modality] = columns
        return out


# ---------------------------------------------------------------------------------------------
# Blob form: role -> bytes. Arrays go through .npz with allow_pickle=False (no code on load).


def _npz(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _load_npz(blob: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(blob), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("utf-8")


def cohort_to_blobs(cohort: Cohort) -> dict[str, bytes]:
    """Serialise ``cohort`` to vault blobs keyed by role (``cohort/<part>``)."""
    meta = {"format": BLOB_FORMAT, "classes": list(cohort.classes), "schema": cohort.schema,
            "modalities": list(cohort.modalities), "report": cohort.report}
    index = {"patient_ids": cohort.patient_ids.astype(str), "labels": cohort.labels.astype(np.int64),
             "split": cohort.split.astype(np.int8)}
    if cohort.groups is not None:
        index["groups"] = cohort.groups.astype(str)
    blobs = {"cohort/meta": _json(meta), "cohort/index": _npz(**index)}
    if cohort.sequences is not None:
        blobs["cohort/sequences"] = _npz(codes=cohort.sequences.astype(np.uint8))
    for name in ("variants", "omics", "events"):
        part: FeatureMatrix | None = getattr(cohort, name)
        if part is not None:
            blobs[f"cohort/{name}"] = _npz(values=part.values, features=np.asarray(part.features, dtype=str))
    if (c := cohort.clinical) is not None:
        blobs["cohort/clinical"] = _npz(numeric=c.numeric.astype(np.float64),
                                        numeric_names=np.asarray(c.numeric_names, dtype=str),
                                        categorical=c.categorical.astype(np.int16),
                                        categorical_names=np.asarray(c.categorical_names, dtype=str),
                                        categories=np.asarray(json.dumps({k: list(v) for k, v in c.categories.items()})))
    return blobs


def cohort_from_blobs(blobs: dict[str, bytes]) -> Cohort:
    """Rebuild a :class:`Cohort` from the blobs written by :func:`cohort_to_blobs`."""
    meta = json.loads(blobs["cohort/meta"].decode("utf-8"))
    if meta.get("format") != BLOB_FORMAT:
        raise ValueError(f"cohort/meta: unsupported cohort format {meta.get('format')!r} (expected {BLOB_FORMAT})")
    index = _load_npz(blobs["cohort/index"])
    cohort = Cohort(patient_ids=index["patient_ids"], labels=index["labels"], classes=tuple(meta["classes"]),
                    split=index["split"], schema=meta["schema"], groups=index.get("groups"),
                    report=meta.get("report", {}))
    if "cohort/sequences" in blobs:
        cohort.sequences = _load_npz(blobs["cohort/sequences"])["codes"]
    for name in ("variants", "omics", "events"):
        if f"cohort/{name}" in blobs:
            z = _load_npz(blobs[f"cohort/{name}"])
            setattr(cohort, name, FeatureMatrix(values=z["values"], features=tuple(z["features"].tolist())))
    if "cohort/clinical" in blobs:
        z = _load_npz(blobs["cohort/clinical"])
        cats = json.loads(str(z["categories"]))
        cohort.clinical = ClinicalTable(numeric=z["numeric"], numeric_names=tuple(z["numeric_names"].tolist()),
                                        categorical=z["categorical"],
                                        categorical_names=tuple(z["categorical_names"].tolist()),
                                        categories={k: tuple(v) for k, v in cats.items()})
    return cohort



def concat_cohorts(cohorts: list[Cohort]) -> Cohort:
    """Pool several sites' cohorts (same schema) into one, keeping each patient's stored split.

    Raises
    ------
    ValueError
        If the schema hashes differ: pooling incompatible sites would silently misalign features.
    """
    if not cohorts:
        raise ValueError("no cohorts to pool")
    first = cohorts[0]
    for c in cohorts[1:]:
        if c.schema_hash != first.schema_hash:
            raise ValueError(f"cannot pool cohorts with different schemas ({first.schema_hash[:12]} vs "
                             f"{c.schema_hash[:12]})")

    def cat(get):  # noqa: ANN001, ANN202 - small local helper
        parts = [get(c) for c in cohorts]
        return None if parts[0] is None else np.concatenate(parts)

    pooled = Cohort(patient_ids=cat(lambda c: c.patient_ids), labels=cat(lambda c: c.labels), classes=first.classes,
                    split=cat(lambda c: c.split), schema=first.schema,
                    groups=cat(lambda c: c.groups) if all(c.groups is not None for c in cohorts) else None,
                    sequences=cat(lambda c: c.sequences),
                    report={"pooled_from": len(cohorts), "site_sizes": [int(c.n) for c in cohorts]})
    for name in ("variants", "omics", "events"):
        part = getattr(first, name)
        if part is not None:
            setattr(pooled, name, FeatureMatrix(np.concatenate([getattr(c, name).values for c in cohorts]),
                                                part.features))
    if first.clinical is not None:
        cl = first.clinical
        pooled.clinical = ClinicalTable(np.concatenate([c.clinical.numeric for c in cohorts]), cl.numeric_names,
                                        np.concatenate([c.clinical.categorical for c in cohorts]),
                                        cl.categorical_names, cl.categories)
    return pooled
