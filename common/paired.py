"""Paired comparisons of two models on the same patients.

McNemar's test needs only the discordant counts: patients the first model classifies right and the
second wrong, and the reverse. They are additive over sites, so a site can release them (noised,
as part of its test statistics) and the coordinator sums them: a paired test without any
per-patient score leaving a site.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from common.stack import BASE_MODELS

PAIRED_WEIGHT = 0.5
"""The discordant counts' weight in a noised test-statistics release: with four pairs the
histograms' noise grows by sqrt(1 + 4 x 0.25 / 5) = 1.10 times (binary, five models) instead of
1.34 at weight 1, and the counts carry twice the histograms' noise (McNemar is then approximate)."""

PAIRED_WITH = BASE_MODELS
"""The hybrid is compared, patient by patient, with each base model."""


def paired_key(other: str) -> str:
    """The released array of the hybrid's discordant counts against ``other``."""
    return f"paired.hybrid-vs-{other}"


def predictions(proba: np.ndarray, *, threshold: float | None) -> np.ndarray:
    """Class decisions: class 1 at or above ``threshold`` (binary, a probability of class 1), else argmax."""
    p = np.asarray(proba, dtype=np.float64)
    if threshold is not None and p.shape[1] == 2:
        return (p[:, 1] >= threshold).astype(np.int64)
    return np.argmax(p, axis=1)


def discordant_counts(y: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray) -> np.ndarray:
    """``[a right and b wrong, a wrong and b right]`` as int64. One patient adds 1 to at most one entry."""
    a_ok, b_ok = np.asarray(pred_a) == np.asarray(y), np.asarray(pred_b) == np.asarray(y)
    return np.array([np.sum(a_ok & ~b_ok), np.sum(~a_ok & b_ok)], dtype=np.int64)


def mcnemar(counts: Any) -> dict[str, float]:
    """McNemar's exact test (two-sided binomial on the discordant pairs) of two models' accuracy.

    ``counts`` are ``[first only right, second only right]`` (noised and rounded counts are fine:
    the test is then approximate). Returns both counts, the difference in accuracy per discordant
    pair, and the p-value (1.0 without discordant pairs).
    """
    b, c = (max(int(round(float(v))), 0) for v in counts)
    n = b + c
    p = 1.0 if n == 0 else min(1.0, 2.0 * _binomial_cdf(min(b, c), n))
    return {"first_only": b, "second_only": c, "p": p}


def _binomial_cdf(k: int, n: int) -> float:
    """P(X <= k) for X ~ Binomial(n, 1/2), in log space (n may be thousands)."""
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2.0)
            for i in range(k + 1)]
    top = max(logs)
    return float(math.exp(top) * sum(math.exp(v - top) for v in logs))


# ---------------------------------------------------------------------------------------------
# DeLong's test: two correlated ROC AUCs on the same patients (pooled data, per-patient scores)


def delong_test(y: Any, score_a: Any, score_b: Any) -> dict[str, float]:
    """DeLong's test of two ROC AUCs measured on the same patients (DeLong, DeLong & Clarke-Pearson 1988).

    The AUCs are Mann-Whitney statistics of the raw scores (ties count one half), so they can
    differ from the binned AUC of :func:`common.metrics.metrics_from_stats` by at most its
    ``auc_bound``. Their covariance comes from each patient's structural components, computed with
    midranks in O(n log n) (Sun & Xu 2014).

    Parameters
    ----------
    y : (n,) binary labels, 1 the positive class, 0 the rest.
    score_a, score_b : (n,) scores of the two models (higher: more likely positive).

    Returns
    -------
    dict
        ``auc_a``, ``auc_b``, ``difference`` (a - b), its standard error ``se``, ``z`` and the
        two-sided normal ``p``; ``n_pos``, ``n_neg``. With a standard error of 0 (both models'
        components constant, e.g. identical scores), ``z`` is NaN and ``p`` is 1.0 if the AUCs are
        equal, else 0.0.

    Raises
    ------
    ValueError
        Labels other than 0 and 1, scores of another length, or fewer than 2 patients of either
        label (the variance needs two).
    """
    pos = _binary_labels(y)
    a, b = _scores(score_a, len(pos)), _scores(score_b, len(pos))
    auc_a, psi_a = _auc_components(pos, a)
    auc_b, psi_b = _auc_components(pos, b)
    out = _z_test(auc_a, auc_b, psi_a - psi_b)
    return {**out, "n_pos": int(pos.sum()), "n_neg": int((~pos).sum())}


def delong_test_proba(y: Any, proba_a: Any, proba_b: Any) -> dict[str, Any]:
    """:func:`delong_test` for two models' class probabilities, as :mod:`common.metrics` reports AUC.

    Binary problems (two columns): the test of class 1's probabilities. Multi-class problems: the
    macro one-vs-rest AUC (the mean over classes, the AUC ``metrics.json`` reports), each class's
    AUC a U-statistic of its own patients against the rest; the variance of the macro difference
    sums every patient's structural components over the classes, so the classes' covariances
    (through their shared patients) are counted. Classes with fewer than 2 patients, or fewer than
    2 others, are left out of the mean. The one-vs-rest test of every class is added under
    ``per_class`` (keyed by class index), with ``classes``, the indices averaged.

    Parameters
    ----------
    y : (n,) class indices.
    proba_a, proba_b : (n, K) class probabilities of the two models, or (n,) scores of class 1.
    """
    pa, pb = _proba(proba_a), _proba(proba_b)
    labels = np.asarray(y, dtype=np.int64)
    if pa.shape != pb.shape or pa.shape[0] != labels.shape[0]:
        raise ValueError(f"probabilities of shapes {pa.shape} and {pb.shape} for {labels.shape[0]} labels")
    if pa.shape[1] == 2:
        return delong_test(labels == 1, pa[:, 1], pb[:, 1])
    classes = [c for c in range(pa.shape[1]) if 2 <= int(np.sum(labels == c)) <= len(labels) - 2]
    if not classes:
        raise ValueError("no class has 2 patients and 2 others: AUCs cannot be compared")
    parts = [(_auc_components(labels == c, pa[:, c]), _auc_components(labels == c, pb[:, c])) for c in classes]
    psi = sum(pa_c[1] - pb_c[1] for pa_c, pb_c in parts) / len(classes)
    out = _z_test(float(np.mean([p[0][0] for p in parts])), float(np.mean([p[1][0] for p in parts])), psi)
    per_class = {str(c): delong_test(labels == c, pa[:, c], pb[:, c]) for c in classes}
    return {**out, "average": "macro one-vs-rest", "classes": classes, "per_class": per_class}


def _binary_labels(y: Any) -> np.ndarray:
    """Labels as a boolean positive mask, checked binary with 2 patients of each label at least."""
    labels = np.asarray(y)
    if labels.ndim != 1 or not np.isin(labels, (0, 1)).all():
        raise ValueError("DeLong's test needs binary labels (0 and 1) in one dimension")
    pos = labels.astype(bool)
    if min(int(pos.sum()), int((~pos).sum())) < 2:
        raise ValueError(f"DeLong's test needs 2 positives and 2 negatives at least ({int(pos.sum())} and "
                         f"{int((~pos).sum())} given)")
    return pos


def _scores(score: Any, n: int) -> np.ndarray:
    s = np.asarray(score, dtype=np.float64)
    if s.shape != (n,):
        raise ValueError(f"scores of shape {s.shape} for {n} labels")
    return s


def _proba(proba: Any) -> np.ndarray:
    """(n, K) probabilities; a one-dimensional score becomes the binary two columns."""
    p = np.asarray(proba, dtype=np.float64)
    return np.column_stack([1.0 - p, p]) if p.ndim == 1 else p


def _auc_components(pos: np.ndarray, score: np.ndarray) -> tuple[float, np.ndarray]:
    """The AUC and each patient's centred structural component, scaled so that their squares sum
    to DeLong's variance: ``(V10 - auc) / sqrt(m (m - 1))`` for a positive, ``(V01 - auc) /
    sqrt(n (n - 1))`` for a negative (m positives, n negatives; midranks, Sun & Xu 2014)."""
    from scipy.stats import rankdata

    m, n = int(pos.sum()), int((~pos).sum())
    ranks = rankdata(score)
    v10 = (ranks[pos] - rankdata(score[pos])) / n  # share of negatives below each positive (ties half)
    v01 = 1.0 - (ranks[~pos] - rankdata(score[~pos])) / m  # share of positives above each negative
    auc = float(v10.mean())
    psi = np.empty(len(score))
    psi[pos] = (v10 - auc) / math.sqrt(m * (m - 1))
    psi[~pos] = (v01 - auc) / math.sqrt(n * (n - 1))
    return auc, psi


def _z_test(auc_a: float, auc_b: float, psi: np.ndarray) -> dict[str, float]:
    """The normal test of ``auc_a - auc_b`` with the variance the sum of squared components."""
    diff = auc_a - auc_b
    se = math.sqrt(float(np.sum(psi ** 2)))
    if se <= 1e-12:
        return {"auc_a": auc_a, "auc_b": auc_b, "difference": diff, "se": 0.0, "z": float("nan"),
                "p": 1.0 if abs(diff) <= 1e-12 else 0.0}
    z = diff / se
    return {"auc_a": auc_a, "auc_b": auc_b, "difference": diff, "se": se, "z": z,
            "p": float(math.erfc(abs(z) / math.sqrt(2.0)))}
