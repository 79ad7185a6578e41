"""Classification metrics from additive sufficient statistics.

A site never sends per-patient scores. It sends :class:`EvalStats`: the confusion matrix of
its argmax predictions and, per class, histograms of that class's predicted probability among
patients of the class and among the others, over a fixed public grid of bins (:func:`bin_index`)
that is uniform in ``sigmoid(logit / GRID_SCALE)``: finest around probability 0.5, where weak
models put their scores and where ties between classes cost AUC, and coarser toward 0 and 1
without losing them (the outermost of :data:`N_BINS` bins starts near logit 15). Statistics from several sites
add up (``a + b``), and :func:`metrics_from_stats` turns a sum into pooled metrics.

Counts-based metrics (accuracy, precision, recall, specificity, F1) are exact. ROC AUC is exact
up to ties inside a bin; the bound on that error is computed from the same histograms and
reported as ``auc_bound`` (half the probability that a positive and a negative share a bin).
PR AUC (average precision) is computed the same way with bins as thresholds.
Multi-class metrics are macro averages over one-vs-rest problems, as scikit-learn's
``average="macro"`` and ``multi_class="ovr"``. Everything here reads the bin count from the
arrays' shapes, so statistics with any (even) number of bins sum and give metrics alike.

Released test statistics
------------------------
With test splits of tens to hundreds of patients, :data:`N_BINS` bins hold about one patient
each, so the histograms would all but list the patients' scores. What a site sends is therefore
the *released form* (:func:`released_arrays`), on at most :data:`MAX_RELEASED_BINS` bins
(:data:`TEST_BINS` by default; :func:`coarsen_stats` turns local ``N_BINS`` statistics into it
exactly), holding nothing that the coordinator can derive itself:

- binary problems: only class 1's histograms ``hist_pos[1]`` and ``hist_neg[1]``. Class 0's are
  their mirror images (``p0 = 1 - p1`` and the grid is symmetric about 0.5, so bin ``b`` of class 1 is
  bin ``B - 1 - b`` of class 0), and the argmax confusion matrix follows from the bin edge at
  logit 0 (``B`` even: bins ``>= B / 2`` are predicted class 1);
- K > 2 classes: the confusion matrix and both histogram sets.

:func:`stats_from_released` rebuilds :class:`EvalStats`; :func:`released_sensitivity` is one
patient's L2 contribution to the released arrays, the sensitivity the Gaussian noise of
:func:`client.privacy.mechanisms.noised_release` is calibrated to; :func:`released_totals` are
the arrays' totals, which follow from the test class counts the census reports, and onto which
a noised release is projected (:func:`project_rows_to_totals`: post-processing, free under DP,
that keeps the patient counts exact instead of adding phantom patients by clipping at 0);
:func:`noise_error` and :func:`noise_bias` measure what that noise does to pooled metrics.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import math

import numpy as np

N_BINS = 2048
"""Bins of the statistics a site computes for its own use (never released)."""
TEST_BINS = 32
"""Bins of a released test-statistics set (see :func:`released_arrays`)."""
MAX_RELEASED_BINS = 64
"""Most bins a released set may have: beyond that, bins hold single patients of a small split."""
GRID_SCALE = 2.0
"""Bins are uniform in ``u = sigmoid(logit / GRID_SCALE)``. A scale of 1 (uniform in probability)
would put every score beyond 0.97 into the last of 32 released bins; uniform in logit (the grid
before) gave weak models' scores two or three of them. At 2, 32 bins are 0.25 logit wide at 0.5
and still 0.6 wide at logit 4."""
METRIC_NAMES = ("auc", "accuracy", "precision", "recall", "specificity", "f1", "auprc")


@dataclass(frozen=True)
class EvalStats:
    """Additive evaluation statistics for K classes.

    Attributes
    ----------
    confusion : (K, K) int64, rows true class, columns predicted class (argmax).
    hist_pos : (K, B) int64, histogram of p_k over patients of class k.
    hist_neg : (K, B) int64, histogram of p_k over patients of other classes.
    """

    confusion: np.ndarray
    hist_pos: np.ndarray
    hist_neg: np.ndarray

    def __add__(self, other: EvalStats) -> EvalStats:
        # numpy would broadcast some mismatched shapes (a one-bin histogram) without complaint.
        if self.confusion.shape != other.confusion.shape or self.hist_pos.shape != other.hist_pos.shape:
            raise ValueError(f"cannot add EvalStats of shapes {self.hist_pos.shape} and {other.hist_pos.shape}"
                             " (different classes or bin counts)")
        return EvalStats(self.confusion + other.confusion, self.hist_pos + other.hist_pos,
                         self.hist_neg + other.hist_neg)

    @property
    def n(self) -> int:
        """Number of patients counted."""
        return int(self.confusion.sum())

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain arrays (for a Flower ArrayRecord or a JSON file)."""
        return {"confusion": self.confusion, "hist_pos": self.hist_pos, "hist_neg": self.hist_neg}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> EvalStats:
        """Inverse of :meth:`to_arrays`, with shape checks."""
        conf = np.asarray(arrays["confusion"], dtype=np.int64)
        pos = np.asarray(arrays["hist_pos"], dtype=np.int64)
        neg = np.asarray(arrays["hist_neg"], dtype=np.int64)
        k = conf.shape[0]
        if conf.shape != (k, k) or pos.ndim != 2 or pos.shape != neg.shape or pos.shape[0] != k:
            raise ValueError(f"inconsistent EvalStats shapes {conf.shape}, {pos.shape}, {neg.shape}")
        return cls(conf, pos, neg)


def grid_position(p: np.ndarray) -> np.ndarray:
    """``sigmoid(logit(p) / GRID_SCALE)`` in [0, 1], the coordinate the bins are uniform in."""
    p = np.clip(np.asarray(p, dtype=np.float64), 0.0, 1.0)
    a, b = p ** (1.0 / GRID_SCALE), (1.0 - p) ** (1.0 / GRID_SCALE)
    return a / (a + b)


def grid_probability(u: float) -> float:
    """The probability at grid position ``u`` (inverse of :func:`grid_position`)."""
    a, b = u ** GRID_SCALE, (1.0 - u) ** GRID_SCALE
    return float(a / (a + b))


def bin_index(p: np.ndarray, *, n_bins: int = N_BINS) -> np.ndarray:
    """Bin of each probability on the public grid of ``n_bins`` bins (uniform in :func:`grid_position`)."""
    return np.clip(np.floor(grid_position(p) * n_bins), 0, n_bins - 1).astype(np.int64)


def compute_stats(y_true: np.ndarray, proba: np.ndarray, *, n_classes: int | None = None,
                  n_bins: int = N_BINS) -> EvalStats:
    """Statistics of one set of predictions.

    Parameters
    ----------
    y_true : (n,) int class indices.
    proba : (n, K) class probabilities, or (n,) probability of class 1 for binary problems.
    """
    y = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(proba, dtype=np.float64)
    if p.ndim == 1:
        p = np.column_stack([1.0 - p, p])
    k = n_classes or p.shape[1]
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (y, p.argmax(axis=1)), 1)
    hist_pos = np.zeros((k, n_bins), dtype=np.int64)
    hist_neg = np.zeros((k, n_bins), dtype=np.int64)
    for c in range(k):
        bins = bin_index(p[:, c], n_bins=n_bins)
        is_c = y == c
        hist_pos[c] = np.bincount(bins[is_c], minlength=n_bins)
        hist_neg[c] = np.bincount(bins[~is_c], minlength=n_bins)
    return EvalStats(confusion, hist_pos, hist_neg)


def _auc_from_hist(pos: np.ndarray, neg: np.ndarray) -> tuple[float, float]:
    """AUC with ties inside a bin counted as half, and the bound on its binning error."""
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos <= 0 or n_neg <= 0:
        return float("nan"), 0.0
    neg_below = np.cumsum(neg) - neg
    wins = (pos * neg_below).sum() + 0.5 * (pos * neg).sum()
    denom = float(n_pos) * float(n_neg)
    return float(wins / denom), float(0.5 * (pos * neg).sum() / denom)


def auc_standard_error(stats: EvalStats) -> float:
    """Standard error of the AUC that :func:`metrics_from_stats` reports, from the AUC and the class counts.

    Binary statistics (class 1 vs 0): Hanley and McNeil's (1982) standard error. Multi-class (the
    macro one-vs-rest AUC): the mean of the per-class standard errors, which bounds the standard
    error of the mean AUC whatever the classes' covariances (it is exact when they are perfectly
    correlated), so a difference that clears it is not an artefact of the split. NaN without both
    sides of any class.
    """
    k = stats.hist_pos.shape[0]
    classes = [k - 1] if k == 2 else [c for c in range(k) if np.maximum(stats.hist_pos[c], 0).sum() > 0]
    errors = [_hanley_mcneil(stats.hist_pos[c], stats.hist_neg[c]) for c in classes]
    return float("nan") if not errors or any(math.isnan(e) for e in errors) else float(np.mean(errors))


def _hanley_mcneil(pos: np.ndarray, neg: np.ndarray) -> float:
    """Hanley and McNeil's standard error of one histogram pair's AUC; NaN without both sides."""
    pos = np.maximum(np.asarray(pos, dtype=np.float64), 0)
    neg = np.maximum(np.asarray(neg, dtype=np.float64), 0)
    n1, n0 = float(pos.sum()), float(neg.sum())
    a, _ = _auc_from_hist(pos, neg)
    if n1 < 1 or n0 < 1 or math.isnan(a):
        return float("nan")
    q1, q2 = a / (2.0 - a), 2.0 * a * a / (1.0 + a)
    var = (a * (1 - a) + (n1 - 1) * (q1 - a * a) + (n0 - 1) * (q2 - a * a)) / (n1 * n0)
    return float(math.sqrt(max(var, 0.0)))


def _ap_from_hist(pos: np.ndarray, neg: np.ndarray) -> float:
    """Average precision with each bin as one threshold, from the highest bin down."""
    n_pos = pos.sum()
    if n_pos <= 0:
        return float("nan")
    tp = np.cumsum(pos[::-1])
    fp = np.cumsum(neg[::-1])
    keep = (pos[::-1] + neg[::-1]) > 0
    tp, fp = tp[keep], fp[keep]
    precision = tp / (tp + fp)
    recall = tp / n_pos
    return float(np.sum(np.diff(np.concatenate([[0.0], recall])) * precision))


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a / b`` with 0 where ``b`` is 0 (scikit-learn's ``zero_division=0`` for precision)."""
    return np.divide(a, b, out=np.zeros_like(a, dtype=np.float64), where=b > 0)


def _nan_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a / b`` with NaN where ``b`` is 0: a rate over an empty class is undefined, not 0."""
    return np.divide(a, b, out=np.full_like(a, np.nan, dtype=np.float64), where=b > 0)


def _finite_mean(values: list[float]) -> float:
    """Mean of the defined (non-NaN) values; NaN, without a warning, if there are none."""
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    return float(v.mean()) if v.size else float("nan")


def metrics_from_stats(stats: EvalStats) -> dict[str, float]:
    """Accuracy, precision, recall, specificity, F1, ROC AUC, PR AUC (and ``auc_bound``).

    Binary problems (K = 2) report the positive class (index 1); multi-class problems report
    macro one-vs-rest averages over the classes present in the histograms.

    Noised statistics are accepted: negative counts (noise that was not clipped) are read as 0,
    and a metric that is undefined because a class is empty (recall without patients of the
    class, specificity without others, AUC without both) is NaN; multi-class averages leave
    undefined per-class values out. Precision and F1 without any predicted patient of the class
    are 0, as scikit-learn's ``zero_division=0``.
    """
    # np.maximum keeps integer counts integer, so clean statistics give bit-identical results.
    conf = np.maximum(np.asarray(stats.confusion), 0).astype(np.float64)
    hist_pos, hist_neg = np.maximum(np.asarray(stats.hist_pos), 0), np.maximum(np.asarray(stats.hist_neg), 0)
    k, total = conf.shape[0], conf.sum()
    tp = np.diag(conf)
    fp = conf.sum(axis=0) - tp
    fn = conf.sum(axis=1) - tp
    tn = total - tp - fp - fn
    precision, recall = _safe_div(tp, tp + fp), _nan_div(tp, tp + fn)
    specificity = _nan_div(tn, tn + fp)
    defined_recall = np.nan_to_num(recall)
    f1 = _safe_div(2 * precision * defined_recall, precision + defined_recall)
    f1[np.isnan(recall)] = np.nan  # no patients of the class: F1 is as undefined as recall
    aucs = [_auc_from_hist(hist_pos[c], hist_neg[c]) for c in range(k)]
    aps = [_ap_from_hist(hist_pos[c], hist_neg[c]) for c in range(k)]
    classes = [1] if k == 2 else [c for c in range(k) if hist_pos[c].sum() > 0]
    pick = (lambda v: float(v[1])) if k == 2 else (lambda v: _finite_mean([v[c] for c in classes]))
    return {
        "accuracy": float(tp.sum() / total) if total > 0 else float("nan"),
        "precision": pick(precision), "recall": pick(recall), "specificity": pick(specificity), "f1": pick(f1),
        "auc": pick([a for a, _ in aucs]), "auc_bound": pick([b for _, b in aucs]),
        "auprc": pick(aps), "n": int(round(total)),
    }


def compute_metrics(y_true: np.ndarray, proba: np.ndarray, *, n_classes: int | None = None,
                    threshold: Threshold | None = None) -> dict[str, float]:
    """Metrics of one set of predictions, through the same statistics a site would send
    (decisions at ``threshold`` for a binary problem, else argmax)."""
    stats = compute_stats(y_true, proba, n_classes=n_classes)
    return metrics_from_stats(at_threshold(stats, threshold) if threshold is not None else stats)


def bootstrap_ci(y_true: np.ndarray, proba: np.ndarray, *, n_boot: int = 1000, level: float = 0.95,
                 seed: int = 0, n_classes: int | None = None,
                 threshold: Threshold | None = None) -> dict[str, list[float]]:
    """Percentile bootstrap confidence intervals of every metric in ``METRIC_NAMES``.

    Patients are resampled with replacement; a resample missing a class gives NaN for the
    metrics that need it and is left out of that metric's interval.
    """
    y, p = np.asarray(y_true), np.asarray(proba)
    k = n_classes or (p.shape[1] if p.ndim == 2 else 2)
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {m: [] for m in METRIC_NAMES}
    for _ in range(n_boot):
        idx = rng.integers(0, len(y), len(y))
        m = compute_metrics(y[idx], p[idx], n_classes=k, threshold=threshold)
        for name in METRIC_NAMES:
            draws[name].append(m[name])
    return _percentile_intervals(draws, level)


def _percentile_intervals(draws: dict[str, list[float]], level: float) -> dict[str, list[float]]:
    """Percentile intervals of bootstrap draws, ignoring draws where a metric was undefined."""
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    out = {}
    for name, values in draws.items():
        v = np.asarray(values, dtype=np.float64)
        v = v[~np.isnan(v)]
        out[name] = [float(np.percentile(v, lo)), float(np.percentile(v, hi))] if v.size else [float("nan")] * 2
    return out


def paired_tests(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Wilcoxon signed-rank and paired t-test p-values for per-fold scores of two models.

    With fewer than 2 pairs, or identical scores, the p-values are NaN / 1.0 as SciPy defines.
    """
    from scipy import stats

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    diff = a - b
    out = {"mean_difference": float(diff.mean()) if diff.size else float("nan"), "pairs": int(diff.size)}
    if diff.size < 2 or np.allclose(diff, 0):
        out.update(wilcoxon_p=1.0 if diff.size else float("nan"), ttest_p=1.0 if diff.size else float("nan"))
        return out
    out["wilcoxon_p"] = float(stats.wilcoxon(a, b).pvalue)
    out["ttest_p"] = float(stats.ttest_rel(a, b).pvalue)
    return out


def bootstrap_ci_from_stats(stats: EvalStats, *, n_boot: int = 1000, level: float = 0.95,
                            seed: int = 0) -> dict[str, list[float]]:
    """Intervals of every metric from pooled statistics alone (no per-patient scores).

    A parametric bootstrap: the confusion matrix is resampled as one multinomial over its
    cells, and each class's score histograms (patients of the class, the others) as
    multinomials over their bins, all with the observed totals. Confusion and histograms are
    resampled independently, so the count-based and ranking-based metrics each get their own
    valid interval; joint quantities across the two are not modelled.
    """
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {m: [] for m in METRIC_NAMES}
    conf = stats.confusion.ravel()

    def resample(counts: np.ndarray) -> np.ndarray:
        counts = np.maximum(counts, 0)  # noised statistics: a negative count is read as 0
        total = int(counts.sum())
        return rng.multinomial(total, counts / total) if total else counts

    for _ in range(n_boot):
        c = resample(conf).reshape(stats.confusion.shape)
        pos = np.stack([resample(h) for h in stats.hist_pos])
        neg = np.stack([resample(h) for h in stats.hist_neg])
        m = metrics_from_stats(EvalStats(c, pos, neg))
        for name in METRIC_NAMES:
            draws[name].append(m[name])
    return _percentile_intervals(draws, level)


def roc_points(stats: EvalStats, *, klass: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """ROC curve (FPR, TPR) with the bins as thresholds, for one class (default: the positive
    class of a binary problem, class 0 otherwise); starts at (0, 0) and ends at (1, 1)."""
    k = stats.confusion.shape[0]
    c = (1 if k == 2 else 0) if klass is None else klass
    pos, neg = stats.hist_pos[c][::-1], stats.hist_neg[c][::-1]
    tpr = np.concatenate([[0.0], np.cumsum(pos) / max(pos.sum(), 1)])
    fpr = np.concatenate([[0.0], np.cumsum(neg) / max(neg.sum(), 1)])
    return fpr, tpr


def pr_points(stats: EvalStats, *, klass: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Precision-recall curve (recall, precision) with the bins as thresholds, highest first, for
    one class (as :func:`roc_points`); only thresholds that select someone. The step area under it
    is ``auprc`` (:func:`metrics_from_stats`)."""
    k = stats.confusion.shape[0]
    c = (1 if k == 2 else 0) if klass is None else klass
    pos = np.maximum(np.asarray(stats.hist_pos[c]), 0)[::-1]
    neg = np.maximum(np.asarray(stats.hist_neg[c]), 0)[::-1]
    keep = (pos + neg) > 0
    tp, fp = np.cumsum(pos)[keep], np.cumsum(neg)[keep]
    return tp / max(pos.sum(), 1), _safe_div(tp, tp + fp)


def calibration_points(stats: EvalStats, *, klass: int | None = None, min_count: int = 1,
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reliability of one class's probabilities: per bin with at least ``min_count`` patients, the
    bin's centre probability (on the public grid), the observed fraction of the class, and the count."""
    k = stats.confusion.shape[0]
    c = (1 if k == 2 else 0) if klass is None else klass
    pos = np.maximum(np.asarray(stats.hist_pos[c]), 0).astype(np.float64)
    count = pos + np.maximum(np.asarray(stats.hist_neg[c]), 0)
    n_bins = len(pos)
    centre = np.array([grid_probability((i + 0.5) / n_bins) for i in range(n_bins)])
    keep = count >= max(min_count, 1e-9)
    return centre[keep], pos[keep] / count[keep], count[keep]


# ---------------------------------------------------------------------------------------------
# Released test statistics


def coarsen_stats(stats: EvalStats, *, n_bins: int) -> EvalStats:
    """The same statistics on a coarser grid of ``n_bins`` bins (a divisor of the current count).

    The grid is uniform in a fixed coordinate, so summing groups of adjacent bins gives
    exactly what :func:`compute_stats` would give with ``n_bins``: a site can compute
    :data:`N_BINS` statistics once and release :data:`TEST_BINS` ones.

    Raises
    ------
    ValueError
        ``n_bins`` does not divide the current bin count.
    """
    k, b = stats.hist_pos.shape
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1 or b % n_bins:
        raise ValueError(f"n_bins must be a divisor of the current {b} bins, got {n_bins!r}")
    group = b // n_bins
    return EvalStats(stats.confusion.copy(), stats.hist_pos.reshape(k, n_bins, group).sum(axis=2),
                     stats.hist_neg.reshape(k, n_bins, group).sum(axis=2))


def _check_released_bins(n_bins: int) -> None:
    """A released grid is even (a bin edge at p = 0.5, a symmetric grid) and coarse."""
    if not 2 <= n_bins <= MAX_RELEASED_BINS or n_bins % 2:
        raise ValueError(f"released test statistics need an even number of bins from 2 to {MAX_RELEASED_BINS}"
                         f" (finer bins hold single patients of a small test split), got {n_bins}; compute them"
                         f" with n_bins={TEST_BINS} or coarsen_stats")


def _released_keys(n_classes: int) -> tuple[str, ...]:
    return ("hist_pos", "hist_neg") if n_classes == 2 else ("confusion", "hist_pos", "hist_neg")


def released_arrays(stats: EvalStats) -> dict[str, np.ndarray]:
    """The arrays a site releases for one model: nothing the coordinator can derive itself.

    Parameters
    ----------
    stats : statistics of the site's test split on an even grid of at most
        :data:`MAX_RELEASED_BINS` bins (:data:`TEST_BINS` by default; see :func:`coarsen_stats`).

    Returns
    -------
    dict
        Binary problems: ``hist_pos`` and ``hist_neg``, shape ``(B,)``: class 1's score histograms
        among positives and among negatives. K > 2 classes: ``confusion`` ``(K, K)``, ``hist_pos``
        and ``hist_neg`` ``(K, B)``. Copies, with the statistics' dtype.

    Raises
    ------
    ValueError
        The bin count is odd or above :data:`MAX_RELEASED_BINS`.

    Notes
    -----
    Binary tie caveat: :func:`stats_from_released` predicts class 1 for every bin at or above
    logit 0, i.e. for ``p1 >= 0.5``, while the site's argmax confusion matrix predicts class 0
    when ``p0 == p1 == 0.5`` (argmax takes the first). Patients scored exactly 0.5 (common with
    random forests of an even number of trees), or within rounding of it when ``p0 + p1`` is not
    exactly 1, are therefore counted as predicted positive by the coordinator; ranking metrics
    (AUC, PR AUC) are unaffected. The mirrored class-0 histograms are exact except for scores
    on a bin edge (0.5 among them), which no binary metric reads.
    """
    k, b = stats.hist_pos.shape
    _check_released_bins(b)
    if k == 2:
        return {"hist_pos": np.array(stats.hist_pos[1]), "hist_neg": np.array(stats.hist_neg[1])}
    return {"confusion": np.array(stats.confusion), "hist_pos": np.array(stats.hist_pos),
            "hist_neg": np.array(stats.hist_neg)}


def _whole_counts(value: np.ndarray, key: str) -> np.ndarray:
    """An array of whole numbers as int64 (a float transport of counts is accepted)."""
    a = np.asarray(value)
    if a.dtype.kind in "iu":
        return a.astype(np.int64)
    if a.dtype.kind != "f" or not np.all(np.isfinite(a)) or np.any(a != np.round(a)):
        raise ValueError(f"released array {key!r} must hold whole counts, got dtype {a.dtype}")
    return a.astype(np.int64)


def stats_from_released(arrays: dict[str, np.ndarray], *, n_classes: int) -> EvalStats:
    """Rebuild :class:`EvalStats` from a released set (one site's, or several sites' summed).

    Parameters
    ----------
    arrays : the output of :func:`released_arrays`, or of
        :func:`client.privacy.mechanisms.noised_release` applied to it; releases of several
        sites may be summed key by key first (the derivation is linear).
    n_classes : number of classes K (>= 2), known to the coordinator from the run.

    Returns
    -------
    EvalStats
        For binary problems class 0's histograms are class 1's mirrored and the confusion matrix
        splits class 1's histograms at bin ``B / 2`` (see the tie caveat of
        :func:`released_arrays`). Negative counts, possible only if noise was not clipped, are
        read as 0 first, so that derived and released counts agree.

    Raises
    ------
    ValueError
        ``n_classes`` below 2, keys other than the release's, arrays of the wrong shape or bin
        count, or values that are not whole counts.
    """
    if isinstance(n_classes, bool) or not isinstance(n_classes, int) or n_classes < 2:
        raise ValueError(f"n_classes must be an int >= 2, got {n_classes!r}")
    keys = _released_keys(n_classes)
    if set(arrays) != set(keys):
        raise ValueError(f"a released set for {n_classes} classes holds exactly {list(keys)}, got {sorted(arrays)}")
    a = {key: np.maximum(_whole_counts(arrays[key], key), 0) for key in keys}
    pos, neg = a["hist_pos"], a["hist_neg"]
    if n_classes == 2:
        if pos.ndim != 1 or pos.shape != neg.shape:
            raise ValueError("a binary release has hist_pos and hist_neg of one shape (B,),"
                             f" got {pos.shape}, {neg.shape}")
        _check_released_bins(pos.shape[0])
        half = pos.shape[0] // 2
        # Rows are the true class: negatives (class 0) then positives; columns the prediction.
        confusion = np.array([[neg[:half].sum(), neg[half:].sum()], [pos[:half].sum(), pos[half:].sum()]],
                             dtype=np.int64)
        # Class 0's positives are class 1's negatives, at mirrored bins (p0 = 1 - p1).
        return EvalStats(confusion, np.stack([neg[::-1], pos]), np.stack([pos[::-1], neg]))
    conf = a["confusion"]
    if conf.shape != (n_classes, n_classes) or pos.ndim != 2 or pos.shape != neg.shape or pos.shape[0] != n_classes:
        raise ValueError(f"a release for {n_classes} classes has confusion ({n_classes}, {n_classes}) and histograms"
                         f" ({n_classes}, B), got {conf.shape}, {pos.shape}, {neg.shape}")
    _check_released_bins(pos.shape[1])
    return EvalStats(conf, pos, neg)


def released_sensitivity(*, n_classes: int, n_models: int) -> float:
    """L2 norm of the change one patient makes to the released arrays of ``n_models`` models.

    A patient added to or removed from the test split (the unit the privacy ledger protects)
    changes, for each model, by exactly 1: in a binary release one histogram entry (``hist_pos``
    if positive, ``hist_neg`` otherwise), so ``sqrt(n_models)`` in all; with K > 2 classes one
    confusion entry and K histogram entries (its own class's ``hist_pos``, the K - 1 others'
    ``hist_neg``), so ``sqrt(n_models * (K + 1))``. Replacing a patient by another would double
    the squared norm; the ledger's unit is addition or removal.

    Raises
    ------
    ValueError
        ``n_classes`` below 2 or ``n_models`` below 1.
    """
    for name, value, low in (("n_classes", n_classes, 2), ("n_models", n_models, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    per_model = 1 if n_classes == 2 else n_classes + 1
    return math.sqrt(n_models * per_model)


def released_totals(class_counts: Sequence[int]) -> dict[str, int | np.ndarray]:
    """Known totals of the arrays :func:`released_arrays` gives for one model, from test class counts.

    Every patient of the test split is counted once in each row that concerns its class, so the
    totals follow from the class counts alone, which the coordinator has from the census (outside
    the DP guarantee). :func:`client.privacy.mechanisms.noised_release` projects noised arrays
    onto these totals.

    Parameters
    ----------
    class_counts : patients of each class in the test split, K >= 2 entries.

    Returns
    -------
    dict
        Binary: ``hist_pos`` = n_1 and ``hist_neg`` = n_0 (ints). K > 2: ``confusion`` and
        ``hist_pos`` row totals = the class counts, ``hist_neg`` row totals = n - the class counts
        (int64 arrays of shape (K,)).

    Raises
    ------
    ValueError
        Fewer than two counts, or counts that are not whole numbers >= 0.
    """
    counts = np.asarray(class_counts)
    if counts.ndim != 1 or counts.size < 2 or counts.dtype.kind not in "iu" or np.any(counts < 0):
        raise ValueError(f"class_counts must be K >= 2 whole numbers >= 0, got {class_counts!r}")
    counts = counts.astype(np.int64)
    if counts.size == 2:
        return {"hist_pos": int(counts[1]), "hist_neg": int(counts[0])}
    return {"confusion": counts.copy(), "hist_pos": counts.copy(), "hist_neg": counts.sum() - counts}


def simplex_projection_rows(values: np.ndarray, *, totals: np.ndarray) -> np.ndarray:
    """Euclidean projection of each row of ``values`` onto ``{x >= 0, sum(x) = total}``.

    The sort-based algorithm of Duchi, Shalev-Shwartz, Singer and Chandra (ICML 2008),
    vectorised over rows: row ``i``'s projection is ``max(v_i - theta_i, 0)`` for the one shift
    ``theta_i`` that gives its total. No checks (callers validate): see
    :func:`client.privacy.mechanisms.simplex_projection` for one vector.

    Parameters
    ----------
    values : (m, B) finite floats.
    totals : (m,) finite totals >= 0.

    Returns
    -------
    np.ndarray
        (m, B) float64, >= 0; rows of total 0 are 0.
    """
    v = np.asarray(values, dtype=np.float64)
    totals = np.asarray(totals, dtype=np.float64)
    m, b = v.shape
    u = -np.sort(-v, axis=1)
    excess = np.cumsum(u, axis=1) - totals[:, None]
    # rho, the number of entries left positive, is the last j with u_j > (sum of the j largest -
    # total) / j. With a total > 0 that holds at j = 1, so rho >= 1; rows of total 0 are zeroed.
    keep = u - excess / np.arange(1, b + 1) > 0
    rho = b - np.argmax(keep[:, ::-1], axis=1)
    theta = excess[np.arange(m), rho - 1] / rho
    out = np.maximum(v - theta[:, None], 0.0)
    out[totals <= 0] = 0.0
    return out


def project_rows_to_totals(values: np.ndarray, *, totals: np.ndarray) -> np.ndarray:
    """Nearest non-negative whole counts to each row of ``values`` with the row's known total.

    The post-processing of :func:`client.privacy.mechanisms.noised_release` for arrays of known
    totals, and of its simulation here (:func:`noise_bias`): :func:`simplex_projection_rows`,
    then floors plus one count for the entries of the largest fractional parts until each row's
    total is reached (largest remainders; ties go to the lower index). No checks (callers
    validate): see :func:`client.privacy.mechanisms.project_to_total` for one vector.

    Parameters
    ----------
    values : (m, B) finite floats, e.g. noised histograms.
    totals : (m,) whole totals >= 0.

    Returns
    -------
    np.ndarray
        (m, B) int64, >= 0, each row summing exactly to its total.
    """
    totals = np.asarray(totals, dtype=np.int64)
    x = simplex_projection_rows(values, totals=totals)
    m, b = x.shape
    whole = np.floor(x)
    # Counts still missing per row: the fractional parts sum to a whole number up to rounding
    # error, from 0 to B; clipped, so that rounding error can never ask for an impossible count.
    missing = np.clip(totals - whole.sum(axis=1).astype(np.int64), 0, b)
    # Rank of each entry's fractional part in its row, largest first (stable: ties to the lower index).
    order = np.argsort(whole - x, axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.broadcast_to(np.arange(b), (m, b)), axis=1)
    return (whole + (rank < missing[:, None])).astype(np.int64)


def _site_shares(stats: EvalStats, *, n_sites: int, project: bool) -> tuple[dict[str, np.ndarray],
                                                                            dict[str, np.ndarray] | None]:
    """Each site's assumed share of the released arrays, and with ``project`` each site's totals.

    The simulations need the sites' own counts, which pooled statistics do not hold: each site is
    assumed to hold an equal share of every entry. Projection needs whole totals per site, so
    with ``project`` the class counts are split into whole near-equal parts (largest remainders,
    the extra patients to the first sites) and each row of a site's share is the pooled row scaled
    to that site's total; with divisible counts this is the plain equal share.

    Returns
    -------
    tuple
        Key to (n_sites, *shape) float shares; and, with ``project``, key to (n_sites, rows) int64
        totals (rows = 1 for a 1-D array), else None.
    """
    pooled = released_arrays(stats)
    if not project:
        return {key: np.broadcast_to(value.astype(np.float64) / n_sites, (n_sites, *value.shape))
                for key, value in pooled.items()}, None
    counts = stats.confusion.sum(axis=1)
    per_site = counts // n_sites + (np.arange(n_sites)[:, None] < counts % n_sites)  # (n_sites, K)
    site_totals = [released_totals(per_site[s]) for s in range(n_sites)]
    pooled_totals = released_totals(counts)
    shares, totals = {}, {}
    for key, value in pooled.items():
        rows = value.reshape(-1, value.shape[-1]).astype(np.float64)
        t = np.stack([np.atleast_1d(site_totals[s][key]) for s in range(n_sites)]).astype(np.int64)
        whole = np.atleast_1d(pooled_totals[key]).astype(np.float64)
        fraction = np.divide(t, whole, out=np.zeros(t.shape), where=whole > 0)  # (n_sites, rows)
        shares[key] = (fraction[:, :, None] * rows[None]).reshape(n_sites, *value.shape)
        totals[key] = t
    return shares, totals


def _noised_metric_draws(stats: EvalStats, *, noise_std_per_site: float, n_sites: int, draws: int,
                         seed: int, project: bool) -> dict[str, np.ndarray]:
    """Every metric of ``draws`` simulated noised releases of ``stats`` (see :func:`noise_error`)."""
    if not math.isfinite(noise_std_per_site) or noise_std_per_site < 0:
        raise ValueError(f"noise_std_per_site must be a finite number >= 0, got {noise_std_per_site!r}")
    for name, value, low in (("n_sites", n_sites, 1), ("draws", draws, 2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    k = stats.confusion.shape[0]
    shares, totals = _site_shares(stats, n_sites=n_sites, project=project)
    rng = np.random.default_rng(seed)
    out = {name: np.empty(draws) for name in METRIC_NAMES}
    for d in range(draws):
        noised = {}
        for key, share in shares.items():
            # One draw per entry of every site, in the same order with or without projection,
            # so that the two modes see the same noise for the same seed.
            value = share + rng.normal(0.0, noise_std_per_site, size=share.shape)
            if totals is None:
                # The post-processing of noised_release without totals: round, clip at 0 per site.
                site = np.maximum(np.rint(value), 0).astype(np.int64)
            else:
                # noised_release with totals: every site's rows projected onto its known totals.
                rows = value.reshape(-1, value.shape[-1])
                site = project_rows_to_totals(rows, totals=totals[key].ravel()).reshape(value.shape)
            noised[key] = site.sum(axis=0)
        m = metrics_from_stats(stats_from_released(noised, n_classes=k))
        for name in METRIC_NAMES:
            out[name][d] = m[name]
    return out


def noise_error(stats: EvalStats, *, noise_std_per_site: float, n_sites: int, draws: int = 200,
                seed: int = 0, project: bool = True) -> dict[str, float]:
    """Standard deviation that the noise of ``n_sites`` released test-statistics sets adds to
    each metric of :data:`METRIC_NAMES`: the error that test-statistics noise adds to pooled metrics.

    Simulated: the released arrays of ``stats`` are split evenly over the sites, every entry of
    every site's share gets N(0, ``noise_std_per_site``^2) and is post-processed as
    :func:`client.privacy.mechanisms.noised_release` does (with ``project``, projected onto the
    site's known totals, :func:`released_totals`; without, rounded and clipped at 0), the sites'
    results are summed and turned into metrics, ``draws`` times. This is the noise's own spread;
    the sampling error of the test split comes on top, and post-processing also shifts metrics
    (see :func:`noise_bias`).

    Parameters
    ----------
    stats : pooled statistics of all sites, on a released grid (see :func:`released_arrays`).
    noise_std_per_site : noise standard deviation of each released entry at one site
        (noise multiplier times :func:`released_sensitivity`).
    n_sites : number of sites whose releases are summed.
    draws : number of simulated releases (>= 2).
    seed : seed of the simulation.
    project : simulate releases projected onto the sites' known totals (``noised_release``
        with ``totals``); ``False`` simulates rounding and clipping (``totals=None``). Per-site
        class counts are the pooled ones split into whole near-equal parts.

    Returns
    -------
    dict
        Metric name to the standard deviation over the draws where the metric is defined (NaN
        if fewer than two are).
    """
    values = _noised_metric_draws(stats, noise_std_per_site=noise_std_per_site, n_sites=n_sites,
                                  draws=draws, seed=seed, project=project)
    out = {}
    for name, v in values.items():
        v = v[~np.isnan(v)]
        out[name] = float(v.std(ddof=1)) if v.size >= 2 else float("nan")
    return out


def noise_bias(stats: EvalStats, *, noise_std_per_site: float, n_sites: int, draws: int = 200,
               seed: int = 0, project: bool = True) -> dict[str, float]:
    """Mean shift that the noise of ``n_sites`` released sets adds to each metric.

    The same simulation as :func:`noise_error` (same arguments, same draws for the same seed).
    Noise is unbiased, but post-processing is not: clipping each site's noised counts at 0
    (``project=False``) adds phantom patients to sparse bins and pulls ranking metrics toward
    chance; projecting onto the known totals (``project=True``) keeps the patient counts exact
    and shrinks that shift, but does not remove it: where the noise is far above the counts per
    bin (100 test patients per site at epsilon 1 on 32 bins), the bins a projection keeps are
    chosen largely by the noise, and pooled AUC stays about 0.2 below its value. This reports by
    how much on average.

    Returns
    -------
    dict
        Metric name to ``mean(noised metric) - metric of stats`` over the draws where the
        metric is defined (NaN if none is, or if it is undefined on ``stats``).
    """
    values = _noised_metric_draws(stats, noise_std_per_site=noise_std_per_site, n_sites=n_sites,
                                  draws=draws, seed=seed, project=project)
    clean = metrics_from_stats(stats)
    out = {}
    for name, v in values.items():
        v = v[~np.isnan(v)]
        out[name] = float(v.mean() - clean[name]) if v.size else float("nan")
    return out


# ---------------------------------------------------------------------------------------------
# Operating thresholds (binary problems)


@dataclass(frozen=True)
class Threshold:
    """A binary operating threshold: predict class 1 when the score falls in bin ``bin`` or above.

    ``bin`` counts on the public grid of ``n_bins`` bins (:func:`bin_index`); bins at
    different resolutions share their edges, so a threshold chosen on released (coarse)
    statistics applies exactly to any statistics with a multiple of its bins.
    """

    bin: int
    n_bins: int
    rule: str

    @property
    def probability(self) -> float:
        """The threshold as a probability of class 1 (the bin edge)."""
        return grid_probability(self.bin / self.n_bins)

    def to_dict(self) -> dict[str, float | int | str]:
        return {"bin": self.bin, "n_bins": self.n_bins, "rule": self.rule, "probability": self.probability}

    @classmethod
    def default(cls, n_bins: int = TEST_BINS) -> Threshold:
        """Probability 0.5 (logit 0): what argmax does."""
        return cls(n_bins // 2, n_bins, "default (probability 0.5)")


def choose_threshold(stats: EvalStats, *, target_sensitivity: float = 0.0) -> Threshold:
    """The operating threshold on (validation) statistics of a binary problem.

    Youden's J (the bin edge maximising sensitivity + specificity - 1) when
    ``target_sensitivity`` is 0; else the highest edge whose sensitivity is at least the target.
    Ties go to the edge nearest probability 0.5. Statistics without positives or negatives give
    the default threshold.
    """
    pos = np.maximum(np.asarray(stats.hist_pos[1], dtype=np.float64), 0.0)
    neg = np.maximum(np.asarray(stats.hist_neg[1], dtype=np.float64), 0.0)
    n_bins = pos.shape[0]
    if pos.sum() <= 0 or neg.sum() <= 0:
        return Threshold.default(n_bins)
    # Edge b predicts class 1 for bins >= b: sensitivity = positives at or above b.
    tpr = np.append(np.cumsum(pos[::-1])[::-1], 0.0) / pos.sum()
    fpr = np.append(np.cumsum(neg[::-1])[::-1], 0.0) / neg.sum()
    edges = np.arange(n_bins + 1)
    if target_sensitivity > 0:
        ok = np.flatnonzero(tpr >= target_sensitivity - 1e-12)
        return Threshold(int(ok.max()), n_bins, f"sensitivity >= {target_sensitivity:g} on validation")
    j = tpr - fpr
    best = np.flatnonzero(j >= j.max() - 1e-12)
    b = int(best[np.argmin(np.abs(edges[best] - n_bins / 2))])
    return Threshold(b, n_bins, "Youden's J on validation")


def at_threshold(stats: EvalStats, threshold: Threshold) -> EvalStats:
    """Binary statistics with the confusion matrix of ``threshold`` in place of argmax's.

    Raises
    ------
    ValueError
        Not a binary problem, or a bin grid the threshold's edge is not on.
    """
    if stats.confusion.shape != (2, 2):
        raise ValueError("an operating threshold applies to binary problems only (multi-class keeps argmax)")
    n_bins = stats.hist_pos.shape[1]
    if (threshold.bin * n_bins) % threshold.n_bins:
        raise ValueError(f"threshold edge {threshold.bin}/{threshold.n_bins} is not an edge of {n_bins} bins")
    b = threshold.bin * n_bins // threshold.n_bins
    pos, neg = np.asarray(stats.hist_pos[1]), np.asarray(stats.hist_neg[1])
    confusion = np.array([[neg[:b].sum(), neg[b:].sum()], [pos[:b].sum(), pos[b:].sum()]], dtype=np.int64)
    return EvalStats(confusion, stats.hist_pos, stats.hist_neg)
