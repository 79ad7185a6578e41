"""Metrics from sufficient statistics agree with scikit-learn and add up across sites."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn import metrics as skm

from common.metrics import EvalStats, compute_metrics, compute_stats, metrics_from_stats


def _predictions(rng: np.random.Generator, n: int, k: int, signal: float) -> tuple[np.ndarray, np.ndarray]:
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k)) + signal * np.eye(k)[y]
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    return y, p / p.sum(axis=1, keepdims=True)


def _sklearn(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    k = p.shape[1]
    pred = p.argmax(axis=1)
    if k == 2:
        cm = skm.confusion_matrix(y, pred, labels=[0, 1])
        return {"accuracy": skm.accuracy_score(y, pred), "precision": skm.precision_score(y, pred, zero_division=0),
                "recall": skm.recall_score(y, pred, zero_division=0), "f1": skm.f1_score(y, pred, zero_division=0),
                "specificity": cm[0, 0] / cm[0].sum(), "auc": skm.roc_auc_score(y, p[:, 1]),
                "auprc": skm.average_precision_score(y, p[:, 1])}
    onehot = np.eye(k)[y]
    spec = []
    for c in range(k):
        neg = y != c
        spec.append(np.mean(pred[neg] != c))
    return {"accuracy": skm.accuracy_score(y, pred),
            "precision": skm.precision_score(y, pred, average="macro", zero_division=0),
            "recall": skm.recall_score(y, pred, average="macro", zero_division=0),
            "f1": skm.f1_score(y, pred, average="macro", zero_division=0), "specificity": float(np.mean(spec)),
            "auc": skm.roc_auc_score(y, p, multi_class="ovr", average="macro"),
            "auprc": skm.average_precision_score(onehot, p, average="macro")}


@pytest.mark.parametrize("k", [2, 3, 5])
@pytest.mark.parametrize("signal", [0.3, 1.5, 6.0])
def test_matches_sklearn(k: int, signal: float) -> None:
    y, p = _predictions(np.random.default_rng(k * 10 + int(signal)), 3000, k, signal)
    ours, ref = compute_metrics(y, p), _sklearn(y, p)
    for name in ("accuracy", "precision", "recall", "f1", "specificity"):
        assert ours[name] == pytest.approx(ref[name], abs=1e-12), name
    assert abs(ours["auc"] - ref["auc"]) <= 0.002
    assert abs(ours["auc"] - ref["auc"]) <= ours["auc_bound"] + 1e-12
    assert abs(ours["auprc"] - ref["auprc"]) <= 0.002


def test_binary_probability_vector_is_accepted() -> None:
    y, p = _predictions(np.random.default_rng(0), 500, 2, 1.0)
    assert compute_metrics(y, p[:, 1]) == compute_metrics(y, p)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), cut=st.floats(0.05, 0.95), k=st.integers(2, 4))
def test_site_statistics_add_up_to_pooled(seed: int, cut: float, k: int) -> None:
    y, p = _predictions(np.random.default_rng(seed), 400, k, 1.0)
    m = int(len(y) * cut)
    summed = compute_stats(y[:m], p[:m], n_classes=k) + compute_stats(y[m:], p[m:], n_classes=k)
    pooled = compute_stats(y, p, n_classes=k)
    assert np.array_equal(summed.confusion, pooled.confusion)
    assert np.array_equal(summed.hist_pos, pooled.hist_pos)
    assert metrics_from_stats(summed) == metrics_from_stats(pooled)


def test_round_trip_through_arrays() -> None:
    y, p = _predictions(np.random.default_rng(1), 200, 3, 1.0)
    s = compute_stats(y, p)
    assert metrics_from_stats(EvalStats.from_arrays(s.to_arrays())) == metrics_from_stats(s)
    with pytest.raises(ValueError, match="inconsistent"):
        EvalStats.from_arrays({"confusion": s.confusion, "hist_pos": s.hist_pos[:2], "hist_neg": s.hist_neg})


def test_extreme_scores_keep_resolution() -> None:
    # Confident models: probabilities within 1e-5 of 0 or 1 must not collapse into one bin.
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 2000)
    logit = np.where(y == 1, 13.0, 11.0) + rng.normal(scale=0.5, size=2000)
    p = 1 / (1 + np.exp(-logit))
    ours = compute_metrics(y, p)
    assert abs(ours["auc"] - skm.roc_auc_score(y, p)) <= 0.002


def test_bootstrap_interval_covers_the_point_estimate() -> None:
    from common.metrics import bootstrap_ci

    y, p = _predictions(np.random.default_rng(5), 400, 2, 1.0)
    ci = bootstrap_ci(y, p, n_boot=200)
    point = compute_metrics(y, p)
    for name, (lo, hi) in ci.items():
        assert lo <= point[name] <= hi, name
        assert hi - lo < 0.25


def test_paired_tests_agree_with_scipy() -> None:
    from scipy import stats

    from common.metrics import paired_tests

    a = np.array([0.81, 0.84, 0.79, 0.88, 0.83])
    b = np.array([0.78, 0.80, 0.80, 0.84, 0.79])
    out = paired_tests(a, b)
    assert out["wilcoxon_p"] == stats.wilcoxon(a, b).pvalue
    assert out["ttest_p"] == stats.ttest_rel(a, b).pvalue
    assert out["mean_difference"] == pytest.approx(np.mean(a - b))
    assert paired_tests(a, a)["wilcoxon_p"] == 1.0


def test_interval_from_statistics_is_close_to_the_patient_bootstrap() -> None:
    from common.metrics import bootstrap_ci, bootstrap_ci_from_stats

    y, p = _predictions(np.random.default_rng(6), 1500, 2, 1.0)
    from_stats = bootstrap_ci_from_stats(compute_stats(y, p), n_boot=300)
    from_patients = bootstrap_ci(y, p, n_boot=300)
    point = compute_metrics(y, p)
    for name in ("auc", "accuracy", "recall", "f1"):
        lo, hi = from_stats[name]
        assert lo <= point[name] <= hi
        width, ref = hi - lo, from_patients[name][1] - from_patients[name][0]
        assert 0.6 * ref <= width <= 1.6 * ref, (name, width, ref)


@pytest.mark.parametrize("n_bins", [2, 16, 32, 64])
@pytest.mark.parametrize("k", [2, 3])
def test_any_even_bin_count_keeps_counts_exact_and_auc_within_its_bound(n_bins: int, k: int) -> None:
    # Everything reads the bin count from the arrays: coarse grids change only the AUC, by at
    # most the bound they report.
    y, p = _predictions(np.random.default_rng(20 + n_bins + k), 1500, k, 1.5)
    stats = compute_stats(y, p, n_bins=n_bins)
    assert stats.hist_pos.shape == (k, n_bins)
    ours, ref = metrics_from_stats(stats), _sklearn(y, p)
    for name in ("accuracy", "precision", "recall", "f1", "specificity"):
        assert ours[name] == pytest.approx(ref[name], abs=1e-12), name
    assert abs(ours["auc"] - ref["auc"]) <= ours["auc_bound"] + 1e-12


def test_coarsened_statistics_equal_statistics_binned_coarsely() -> None:
    from common.metrics import N_BINS, TEST_BINS, coarsen_stats

    y, p = _predictions(np.random.default_rng(21), 800, 3, 2.0)
    fine = compute_stats(y, p, n_bins=N_BINS)
    for n_bins in (TEST_BINS, 16, 2):
        coarse, direct = coarsen_stats(fine, n_bins=n_bins), compute_stats(y, p, n_bins=n_bins)
        assert np.array_equal(coarse.hist_pos, direct.hist_pos) and np.array_equal(coarse.hist_neg, direct.hist_neg)
        assert np.array_equal(coarse.confusion, direct.confusion)
    with pytest.raises(ValueError, match="divisor"):
        coarsen_stats(fine, n_bins=48)


def test_statistics_on_different_grids_do_not_add() -> None:
    y, p = _predictions(np.random.default_rng(22), 100, 2, 1.0)
    # A 1-bin histogram would otherwise broadcast silently onto the 32-bin one.
    with pytest.raises(ValueError, match="bin counts"):
        compute_stats(y, p, n_bins=32) + compute_stats(y, p, n_bins=1)
    with pytest.raises(ValueError, match="bin counts"):
        compute_stats(y, p, n_bins=32) + compute_stats(y, p, n_bins=16)


def test_noised_statistics_give_nan_not_exceptions(recwarn: pytest.WarningsRecorder) -> None:
    rng = np.random.default_rng(23)
    y, p = _predictions(rng, 200, 2, 1.0)
    clean = compute_stats(y, p, n_bins=32)
    # Negative counts (noise left unclipped) are read as zero.
    noise = rng.integers(-3, 4, size=clean.hist_pos.shape)
    noisy = EvalStats(clean.confusion - 200 * np.eye(2, dtype=np.int64), clean.hist_pos + noise, clean.hist_neg - noise)
    clipped = EvalStats(*(np.maximum(a, 0) for a in (noisy.confusion, noisy.hist_pos, noisy.hist_neg)))
    assert (noisy.confusion < 0).any() and (noisy.hist_neg < 0).any()
    assert metrics_from_stats(noisy) == metrics_from_stats(clipped)
    # No positives at all: every metric that needs one is NaN; specificity and accuracy are not.
    zero = np.zeros_like(clean.hist_pos[1])
    no_pos = EvalStats(np.array([[50, 10], [0, 0]]), np.stack([clean.hist_pos[0], zero]),
                       np.stack([zero, clean.hist_neg[1]]))
    m = metrics_from_stats(no_pos)
    for name in ("recall", "f1", "auc", "auprc"):
        assert np.isnan(m[name]), name
    assert m["specificity"] == pytest.approx(50 / 60) and m["accuracy"] == pytest.approx(50 / 60)
    # Nothing at all (every count noised down to zero), binary and three classes.
    for k in (2, 3):
        empty = np.zeros((k, 32), np.int64)
        m = metrics_from_stats(EvalStats(np.zeros((k, k), np.int64), empty, empty))
        for name in ("accuracy", "recall", "specificity", "f1", "auc", "auprc"):
            assert np.isnan(m[name]), (k, name)
        assert m["n"] == 0
    # Three classes, one of them empty: averaged over the other two.
    y3, p3 = _predictions(rng, 300, 2, 1.5)
    s3 = compute_stats(y3, np.column_stack([p3, np.zeros(len(y3))]), n_classes=3, n_bins=32)
    m3, m2 = metrics_from_stats(s3), metrics_from_stats(compute_stats(y3, p3, n_bins=32))
    assert m3["recall"] == pytest.approx(np.mean([m2["specificity"], m2["recall"]]))
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_youden_threshold_and_metrics_at_it() -> None:
    from common.metrics import N_BINS, TEST_BINS, Threshold, at_threshold, choose_threshold, coarsen_stats

    rng = np.random.default_rng(0)
    y = (rng.random(4000) < 0.15).astype(int)
    p = 1 / (1 + np.exp(-(rng.normal(size=y.size) + 1.5 * y - 2.5)))  # a low-prevalence, shifted score
    stats = compute_stats(y, p, n_bins=N_BINS)
    default = metrics_from_stats(stats)
    th = choose_threshold(coarsen_stats(stats, n_bins=TEST_BINS))
    assert th.probability < 0.5 and th.rule.startswith("Youden")
    at = metrics_from_stats(at_threshold(stats, th))
    # The same edge applied by hand to the patients' scores.
    pred = p >= th.probability
    assert at["recall"] == pytest.approx(pred[y == 1].mean()) and at["specificity"] == pytest.approx(1 - pred[y == 0].mean())
    assert at["recall"] > default["recall"] and at["recall"] + at["specificity"] > default["recall"] + default["specificity"]
    assert at["auc"] == default["auc"]  # threshold-free metrics do not move
    target = choose_threshold(stats, target_sensitivity=0.9)
    assert metrics_from_stats(at_threshold(stats, target))["recall"] >= 0.9
    assert choose_threshold(compute_stats(np.zeros(5, int), np.full(5, 0.2), n_bins=32)) == Threshold.default(32)
    with pytest.raises(ValueError, match="not an edge"):
        at_threshold(compute_stats(y, p, n_bins=48), Threshold(1, 32, "x"))


def test_auc_standard_error_matches_the_bootstrap() -> None:
    from common.metrics import auc_standard_error

    rng = np.random.default_rng(11)
    y = rng.integers(0, 2, 300)
    p = 1 / (1 + np.exp(-(1.2 * (y - 0.5) + rng.normal(size=300))))
    se = auc_standard_error(compute_stats(y, np.column_stack([1 - p, p]), n_classes=2))
    boot = []
    for _ in range(400):
        i = rng.integers(0, 300, 300)
        boot.append(skm.roc_auc_score(y[i], p[i]))
    assert se == pytest.approx(np.std(boot), rel=0.15)
    one_class = compute_stats(np.zeros(10, dtype=int), np.full((10, 2), 0.5), n_classes=2)
    assert np.isnan(auc_standard_error(one_class))


def test_pr_curve_from_binned_statistics_has_the_released_auprc_and_matches_scikit_learn() -> None:
    from sklearn.metrics import average_precision_score

    from common.metrics import pr_points

    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 800)
    p = np.clip(0.35 * y + 0.65 * rng.random(800), 0, 1)
    stats = compute_stats(y, np.c_[1 - p, p], n_classes=2)
    recall, precision = pr_points(stats)
    assert recall[-1] == 1.0 and np.all(np.diff(recall) >= 0) and np.all((0 <= precision) & (precision <= 1))
    assert precision[-1] == pytest.approx(y.mean())  # everyone called: precision is the class share
    area = float(np.sum(np.diff(np.concatenate([[0.0], recall])) * precision))
    assert area == pytest.approx(metrics_from_stats(stats)["auprc"], abs=1e-12)
    assert area == pytest.approx(average_precision_score(y, p), abs=0.01)  # binning costs little


def test_calibration_of_calibrated_probabilities_follows_the_diagonal() -> None:
    from common.metrics import TEST_BINS, calibration_points

    rng = np.random.default_rng(5)
    p = rng.random(40_000)
    y = (rng.random(40_000) < p).astype(int)  # y ~ Bernoulli(p): perfectly calibrated
    released = compute_stats(y, np.c_[1 - p, p], n_classes=2, n_bins=TEST_BINS)  # the report's bins
    centre, observed, count = calibration_points(released, min_count=500)
    assert count.sum() <= 40_000 and len(centre) >= 10
    assert np.max(np.abs(observed - centre)) < 0.08  # bins are narrow on the public grid except near 0.5
