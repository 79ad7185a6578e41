"""Classification metrics from additive sufficient statistics.

A site never sends per-patient scores. It sends :class:`EvalStats`: the confusion matrix of
its argmax predictions and, per class, histograms of that class's predicted probability among
patients of the class and among the others, over a fixed grid of bins that is uniform in logit
space (so confident scores near 0 and 1 keep their resolution). Statistics from several sites
add up (``a + b``), and :func:`metrics_from_stats` turns a sum into pooled metrics.

Counts-based metrics (accuracy, precision, recall, specificity, F1) are exact. ROC AUC is exact
up to ties inside a bin; the bound on that error is computed from the same histograms and
reported as ``auc_bound`` (half the probability that a positive and a negative share a bin).
PR AUC (average precision) is computed the same way with bins as thresholds.
Multi-class metrics are macro averages over one-vs-rest problems, as scikit-learn's
``average="macro"`` and ``multi_class="ovr"``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

N_BINS = 2048
LOGIT_RANGE = 16.0
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
        if conf.shape != (k, k) or pos.shape != neg.shape or pos.shape[0] != k:
            raise ValueError(f"inconsistent EvalStats shapes {conf.shape}, {pos.shape}, {neg.shape}")
        return cls(conf, pos, neg)


def bin_index(p: np.ndarray, *, n_bins: int = N_BINS) -> np.ndarray:
    """Bin of each probability on a grid uniform in logit over [-LOGIT_RANGE, LOGIT_RANGE]."""
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-300, 1.0)
    with np.errstate(divide="ignore"):
        logit = np.log(p) - np.log1p(-np.minimum(p, 1.0 - 1e-16))
    scaled = (logit + LOGIT_RANGE) / (2 * LOGIT_RANGE) * n_bins
    return np.clip(np.floor(scaled), 0, n_bins - 1).astype(np.int64)


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
    if n_pos == 0 or n_neg == 0:
        return float("nan"), 0.0
    neg_below = np.cumsum(neg) - neg
    wins = (pos * neg_below).sum() + 0.5 * (pos * neg).sum()
    denom = float(n_pos) * float(n_neg)
    return float(wins / denom), float(0.5 * (pos * neg).sum() / denom)


def _ap_from_hist(pos: np.ndarray, neg: np.ndarray) -> float:
    """Average precision with each bin as one threshold, from the highest bin down."""
    n_pos = pos.sum()
    if n_pos == 0:
        return float("nan")
    tp = np.cumsum(pos[::-1])
    fp = np.cumsum(neg[::-1])
    keep = (pos[::-1] + neg[::-1]) > 0
    tp, fp = tp[keep], fp[keep]
    precision = tp / (tp + fp)
    recall = tp / n_pos
    return float(np.sum(np.diff(np.concatenate([[0.0], recall])) * precision))


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.divide(a, b, out=np.zeros_like(a, dtype=np.float64), where=b > 0)


def metrics_from_stats(stats: EvalStats) -> dict[str, float]:
    """Accuracy, precision, recall, specificity, F1, ROC AUC, PR AUC (and ``auc_bound``).

    Binary problems (K = 2) report the positive class (index 1); multi-class problems report
    macro one-vs-rest averages. Classes absent from the statistics are left out of AUC averages.
    """
    conf = stats.confusion.astype(np.float64)
    k, total = conf.shape[0], conf.sum()
    tp = np.diag(conf)
    fp = conf.sum(axis=0) - tp
    fn = conf.sum(axis=1) - tp
    tn = total - tp - fp - fn
    precision, recall = _safe_div(tp, tp + fp), _safe_div(tp, tp + fn)
    specificity = _safe_div(tn, tn + fp)
    f1 = _safe_div(2 * precision * recall, precision + recall)
    aucs = [_auc_from_hist(stats.hist_pos[c], stats.hist_neg[c]) for c in range(k)]
    aps = [_ap_from_hist(stats.hist_pos[c], stats.hist_neg[c]) for c in range(k)]
    classes = [1] if k == 2 else [c for c in range(k) if stats.hist_pos[c].sum() > 0]
    pick = (lambda v: float(v[1])) if k == 2 else (lambda v: float(np.mean([v[c] for c in classes])))
    return {
        "accuracy": float(tp.sum() / total) if total else float("nan"),
        "precision": pick(precision), "recall": pick(recall), "specificity": pick(specificity), "f1": pick(f1),
        "auc": pick([a for a, _ in aucs]), "auc_bound": pick([b for _, b in aucs]),
        "auprc": pick(aps), "n": int(total),
    }


def compute_metrics(y_true: np.ndarray, proba: np.ndarray, *, n_classes: int | None = None) -> dict[str, float]:
    """Metrics of one set of predictions, through the same statistics a site would send."""
    return metrics_from_stats(compute_stats(y_true, proba, n_classes=n_classes))


def bootstrap_ci(y_true: np.ndarray, proba: np.ndarray, *, n_boot: int = 1000, level: float = 0.95,
                 seed: int = 0, n_classes: int | None = None) -> dict[str, list[float]]:
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
        m = compute_metrics(y[idx], p[idx], n_classes=k)
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
