"""Shared preprocessing: one scaler and one set of imputation values for the federated models.

The models every site shares (the deep model's dense branch, the federated GLM) must see their
inputs transformed the same way everywhere. Their columns, in a fixed order derived from the
agreed schema (:func:`shared_columns`):

    numeric tabular columns (variants, omics, events, clinical numeric)
    | one-hot clinical categories (a missing category is a missing value in each of its columns)
    | sequence-derived features (k-mer counts, positional one-hot)

Each site sends additive moments of its train split per column (count of observed values, sum,
sum of squares: :func:`column_moments`); the coordinator sums them and builds a
:class:`SharedScaler` (:func:`scaler_from_moments`): the mean imputes a missing value, the mean
and standard deviation standardize, and the result is clipped to ``[-CLIP, CLIP]`` so that one
record's part in any statistic of these features is bounded (what the GLM's DP needs).

Under differential privacy every value is first clipped to its column's public range
(:func:`column_ranges`: from the type of the column, or from ``ranges`` declared in the cohort
spec) and the moments are taken of values rescaled to ``[0, 1]``, so that one record changes the
release by at most ``sqrt(3 d)`` in L2 norm (:func:`moments_sensitivity`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from common.model_config import feature_count, tabular_width

CLIP = 4.0
"""Standardized shared features are clipped to [-CLIP, CLIP]."""

GLM_ROW_FACTOR = 1.5
"""A GLM input row is scaled down to L2 norm ``GLM_ROW_FACTOR * sqrt(d)`` at most (:func:`glm_row_bound`).

A standardized row of d columns has norm about ``sqrt(d)``, so few rows are touched; the bound
(not ``CLIP * sqrt(d)``, the per-column clip's worst case) is what one record can move the GLM's
gradient by, hence the noise its DP release needs: 2.7 times less."""

DEFAULT_RANGE = (-1.0e3, 1.0e3)
"""Public clipping range of a numeric column the spec gives no range for (wide, so imprecise under DP)."""

POSITIONAL_MAX_LENGTH = 100
KMER = 3


@dataclass(frozen=True)
class SharedColumns:
    """The shared columns' layout: how many of each kind, and their public ranges."""

    n_numeric: int        # numeric tabular columns
    n_onehot: int         # one-hot clinical categories
    n_sequence: int       # sequence-derived features
    low: np.ndarray
    high: np.ndarray
    clinical: np.ndarray  # bool: a clinical column (always kept in the GLM)

    @property
    def width(self) -> int:
        return self.n_numeric + self.n_onehot + self.n_sequence

    @property
    def tabular(self) -> slice:
        """The columns of the deep model's dense branch (numeric and one-hot, no sequence features)."""
        return slice(0, self.n_numeric + self.n_onehot)


def sequence_feature_count(schema: dict[str, Any]) -> int:
    """k-mer counts, plus positional one-hot for short sequences (client/features.py builds them)."""
    if "sequences" not in schema:
        return 0
    length = int(schema["sequences"]["length"])
    return 4**KMER + (4 * length if length <= POSITIONAL_MAX_LENGTH else 0)


def shared_columns(schema: dict[str, Any]) -> SharedColumns:
    """The shared columns of cohorts with ``schema``, with their public value ranges."""
    low, high, clinical = [], [], []

    def add(n: int, lo: float, hi: float, is_clinical: bool = False) -> None:
        low.extend([lo] * n)
        high.extend([hi] * n)
        clinical.extend([is_clinical] * n)

    if "variants" in schema and schema["variants"].get("sites") is not None:
        add(feature_count(schema["variants"]["sites"]), 0.0, 2.0)
    if "omics" in schema and schema["omics"].get("features") is not None:
        add(feature_count(schema["omics"]["features"]), *schema["omics"].get("range", DEFAULT_RANGE))
    if "events" in schema and schema["events"].get("features") is not None:
        add(feature_count(schema["events"]["features"]), 0.0, 1.0)
    n_cat = 0
    if "clinical" in schema:
        ranges = schema["clinical"].get("ranges", {})
        for name in schema["clinical"]["numeric"]:
            add(1, *ranges.get(name, DEFAULT_RANGE), is_clinical=True)
        n_cat = sum(len(v) for v in schema["clinical"]["categorical"].values())
    n_numeric = len(low)
    add(n_cat, 0.0, 1.0, is_clinical=True)
    n_seq = sequence_feature_count(schema)
    if n_seq:
        length = int(schema["sequences"]["length"])
        add(4**KMER, 0.0, float(2 * max(length - KMER + 1, 1)))
        add(n_seq - 4**KMER, 0.0, 1.0)
    cols = SharedColumns(n_numeric, n_cat, n_seq, np.asarray(low, dtype=np.float64),
                         np.asarray(high, dtype=np.float64), np.asarray(clinical, dtype=bool))
    if cols.n_numeric + cols.n_onehot != tabular_width(schema):
        raise ValueError("shared columns disagree with the schema's tabular width")
    return cols


def column_moments(raw: np.ndarray, *, low: np.ndarray | None = None,
                   high: np.ndarray | None = None, clip: bool = True) -> dict[str, np.ndarray]:
    """Additive moments of each column over its observed (non-NaN) values.

    With ``low`` and ``high`` (under DP), values are clipped to the range and rescaled to
    ``[0, 1]`` first, so one record adds at most 1 to each entry. With ``clip=False`` they are
    only rescaled (a secure sum's fixed point needs moderate values; :func:`raw_moments` undoes it).
    """
    x = np.asarray(raw, dtype=np.float64)
    observed = ~np.isnan(x)
    if low is not None and high is not None:
        x = ((np.clip(x, low, high) if clip else x) - low) / _span(low, high)
    filled = np.where(observed, x, 0.0)
    return {"count": observed.sum(axis=0).astype(np.float64), "sum": filled.sum(axis=0),
            "sumsq": (filled**2).sum(axis=0)}


def _span(low: np.ndarray, high: np.ndarray) -> np.ndarray:
    span = np.asarray(high, dtype=np.float64) - np.asarray(low, dtype=np.float64)
    return np.where(span > 0, span, 1.0)


def raw_moments(unit: dict[str, np.ndarray], columns: SharedColumns) -> dict[str, np.ndarray]:
    """The moments of the values from (summed) moments of the unclipped rescaled values."""
    low, span = np.asarray(columns.low, dtype=np.float64), _span(columns.low, columns.high)
    count, total, sumsq = (np.asarray(unit[k], dtype=np.float64) for k in ("count", "sum", "sumsq"))
    return {"count": count, "sum": low * count + span * total,
            "sumsq": low**2 * count + 2.0 * low * span * total + span**2 * sumsq}


def moments_sensitivity(n_columns: int) -> float:
    """L2 norm of one record's part in the rescaled moments of ``n_columns`` columns."""
    return math.sqrt(3.0 * max(n_columns, 1))


@dataclass
class SharedScaler:
    """Imputation value, centre and scale of every shared column, and the GLM's columns.

    Attributes
    ----------
    mean : (d,) imputation value and centre.
    scale : (d,) standard deviation (at least a small public floor).
    glm_columns : (g,) indices of the columns the GLM reads.
    """

    mean: np.ndarray
    scale: np.ndarray
    glm_columns: np.ndarray

    def transform(self, raw: np.ndarray, columns: slice | np.ndarray | None = None) -> np.ndarray:
        """Impute, standardize and clip ``raw`` (all shared columns), keeping ``columns``."""
        x = np.asarray(raw, dtype=np.float64)
        mean, scale = self.mean, self.scale
        if columns is not None:
            x, mean, scale = x[:, columns], mean[columns], scale[columns]
        x = np.where(np.isnan(x), mean, x)
        return np.clip((x - mean) / scale, -CLIP, CLIP)

    def glm_matrix(self, raw: np.ndarray) -> np.ndarray:
        """The GLM's inputs: the GLM's columns transformed, each row clipped to :func:`glm_row_bound`."""
        x = self.transform(raw, self.glm_columns)
        return clip_rows(x, glm_row_bound(x.shape[1]))

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"mean": self.mean, "scale": self.scale, "glm_columns": self.glm_columns.astype(np.int64)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> SharedScaler:
        return cls(np.asarray(arrays["mean"], dtype=np.float64), np.asarray(arrays["scale"], dtype=np.float64),
                   np.asarray(arrays["glm_columns"], dtype=np.int64))


def glm_row_bound(n_features: int) -> float:
    """Largest L2 norm of one GLM input row (:data:`GLM_ROW_FACTOR` ``* sqrt(d)``)."""
    return GLM_ROW_FACTOR * math.sqrt(max(n_features, 1))


def clip_rows(x: np.ndarray, bound: float) -> np.ndarray:
    """``x`` with every row of L2 norm above ``bound`` scaled down to it."""
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x * np.minimum(1.0, bound / np.maximum(norms, 1e-300))


def scaler_from_moments(moments: dict[str, np.ndarray], columns: SharedColumns, *, rescaled: bool,
                        max_glm_columns: int, noise_sd: float = 0.0) -> SharedScaler:
    """The shared scaler from summed :func:`column_moments` (noised or exact).

    Post-processing of the released sums (no privacy cost): counts are floored at 1, means are
    kept within the column's range, variances within ``[floor, (range / 2)^2]``. For exact
    moments the floor is 1e-12. For rescaled (noised) ones it is what the noise leaves
    measurable: twice the noise ``noise_sd`` of the summed sums of squares over the count (and at
    least 1e-4). An underestimated scale would clip most of a column's values at the standardized
    clip, which destroys it; an overestimated one only compresses it, which a linear model undoes.
    Where the noise swamps everything the scale becomes half the column's public range.

    ``max_glm_columns`` caps the GLM's width: every clinical column is kept, the rest are the
    highest-variance columns relative to their range.
    """
    count = np.maximum(np.asarray(moments["count"], dtype=np.float64), 1.0)
    mean = moments["sum"] / count
    var = moments["sumsq"] / count - mean**2
    span = columns.high - columns.low
    if rescaled:
        mean = np.clip(mean, 0.0, 1.0)
        floor = np.clip(2.0 * noise_sd / count, 1e-4, 0.25)
        std = np.sqrt(np.clip(var, floor, 0.25))
        mean, std, rel_var = columns.low + mean * span, std * span, std**2
    else:
        std = np.sqrt(np.maximum(var, 0.0))
        std = np.where(std > 1e-12, std, 1.0)
        rel_var = np.where(span > 0, np.maximum(var, 0.0) / span**2, 0.0)
    return SharedScaler(mean, std, glm_columns(columns, rel_var, max_columns=max_glm_columns))


def glm_columns(columns: SharedColumns, rel_var: np.ndarray, *, max_columns: int) -> np.ndarray:
    """Indices of the GLM's columns (sorted): all clinical ones, then the most variable of the rest."""
    if columns.width <= max_columns:
        return np.arange(columns.width)
    keep = list(np.flatnonzero(columns.clinical))
    others = np.flatnonzero(~columns.clinical)
    room = max(max_columns - len(keep), 0)
    order = others[np.argsort(-rel_var[others], kind="stable")]
    return np.sort(np.asarray(keep + list(order[:room]), dtype=np.int64))
