"""Released test statistics: minimal arrays, one patient's sensitivity, and their Gaussian noise."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from sklearn import metrics as skm

from client.privacy.ledger import gaussian_noise_multiplier
from client.privacy.mechanisms import noised_release, project_to_total, simplex_projection
from common.metrics import (MAX_RELEASED_BINS, METRIC_NAMES, N_BINS, TEST_BINS, EvalStats, compute_stats,
                            metrics_from_stats, noise_bias, noise_error, released_arrays, released_sensitivity,
                            released_totals, stats_from_released)


def _predictions(rng: np.random.Generator, n: int, k: int, signal: float) -> tuple[np.ndarray, np.ndarray]:
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k)) + signal * np.eye(k)[y]
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    return y, p / p.sum(axis=1, keepdims=True)


def _same_stats(a: EvalStats, b: EvalStats) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a.to_arrays().values(), b.to_arrays().values(), strict=True))


def test_released_grid_is_coarse_and_even() -> None:
    assert TEST_BINS % 2 == 0 and TEST_BINS <= MAX_RELEASED_BINS <= 64 < N_BINS


@pytest.mark.parametrize("n_bins", [2, 16, TEST_BINS, MAX_RELEASED_BINS])
@pytest.mark.parametrize("vector", [False, True])
def test_binary_release_holds_two_histograms_and_rebuilds_everything(n_bins: int, vector: bool) -> None:
    y, p = _predictions(np.random.default_rng(n_bins), 600, 2, 1.2)
    stats = compute_stats(y, p[:, 1] if vector else p, n_bins=n_bins)
    released = released_arrays(stats)
    assert sorted(released) == ["hist_neg", "hist_pos"]
    assert released["hist_pos"].shape == released["hist_neg"].shape == (n_bins,)
    assert released["hist_pos"].sum() == (y == 1).sum() and released["hist_neg"].sum() == (y == 0).sum()
    rebuilt = stats_from_released(released, n_classes=2)
    # Continuous scores never sit on a bin edge: mirrored histograms and the argmax split are exact.
    assert _same_stats(rebuilt, stats)
    assert metrics_from_stats(rebuilt) == metrics_from_stats(stats)


def test_binary_tie_at_one_half_is_counted_as_predicted_positive() -> None:
    # The documented caveat: argmax calls p0 == p1 == 0.5 class 0, the released form class 1.
    rng = np.random.default_rng(3)
    y, p = _predictions(rng, 400, 2, 1.0)
    tie = rng.random(len(y)) < 0.1
    p[tie] = 0.5
    stats = compute_stats(y, p, n_bins=TEST_BINS)
    rebuilt = stats_from_released(released_arrays(stats), n_classes=2)
    moved = np.array([np.sum(tie & (y == 0)), np.sum(tie & (y == 1))])
    assert moved.min() > 0
    assert np.array_equal(rebuilt.confusion[:, 1] - stats.confusion[:, 1], moved)
    assert np.array_equal(rebuilt.confusion.sum(axis=1), stats.confusion.sum(axis=1))
    ours, theirs = metrics_from_stats(rebuilt), metrics_from_stats(stats)
    for name in ("auc", "auc_bound", "auprc", "n"):
        assert ours[name] == theirs[name], name
    assert ours["recall"] > theirs["recall"]


@pytest.mark.parametrize("k", [3, 5])
def test_multiclass_release_round_trips(k: int) -> None:
    y, p = _predictions(np.random.default_rng(k), 500, k, 1.5)
    stats = compute_stats(y, p, n_bins=TEST_BINS)
    released = released_arrays(stats)
    assert {key: v.shape for key, v in released.items()} == {"confusion": (k, k), "hist_pos": (k, TEST_BINS),
                                                             "hist_neg": (k, TEST_BINS)}
    assert _same_stats(stats_from_released(released, n_classes=k), stats)


def test_release_refuses_fine_or_odd_grids_and_malformed_arrays() -> None:
    y, p = _predictions(np.random.default_rng(4), 200, 2, 1.0)
    for n_bins in (N_BINS, 128, 66, 31):
        with pytest.raises(ValueError, match="even number of bins"):
            released_arrays(compute_stats(y, p, n_bins=n_bins))
    good = released_arrays(compute_stats(y, p, n_bins=TEST_BINS))
    bad: list[tuple[dict[str, np.ndarray], int, str]] = [
        ({**good, "confusion": np.eye(2, dtype=np.int64)}, 2, "holds exactly"),
        ({"hist_pos": good["hist_pos"]}, 2, "holds exactly"),
        ({"hist_pos": good["hist_pos"], "hist_neg": good["hist_neg"][:-2]}, 2, "one shape"),
        ({"hist_pos": np.stack([good["hist_pos"]] * 2), "hist_neg": np.stack([good["hist_neg"]] * 2)}, 2, "one shape"),
        ({"hist_pos": np.zeros(2 * N_BINS, np.int64), "hist_neg": np.zeros(2 * N_BINS, np.int64)}, 2, "even number"),
        ({**good, "hist_pos": good["hist_pos"] + 0.5}, 2, "whole counts"),
        ({**good, "hist_pos": np.where(good["hist_pos"] > 0, np.nan, 0.0)}, 2, "whole counts"),
        (good, 3, "holds exactly"),
        ({"confusion": np.eye(3, dtype=np.int64), "hist_pos": np.zeros((2, 32), np.int64),
          "hist_neg": np.zeros((2, 32), np.int64)}, 3, r"\(3, B\)"),
    ]
    for arrays, k, message in bad:
        with pytest.raises(ValueError, match=message):
            stats_from_released(arrays, n_classes=k)
    with pytest.raises(ValueError, match="n_classes"):
        stats_from_released(good, n_classes=1)
    # Whole counts carried as floats (a JSON file) are fine.
    floats = {key: v.astype(np.float64) for key, v in good.items()}
    assert _same_stats(stats_from_released(floats, n_classes=2), stats_from_released(good, n_classes=2))


@pytest.mark.parametrize("k", [2, 3, 4])
def test_sensitivity_is_one_patients_largest_l2_change(k: int) -> None:
    # Brute force: drop each patient in turn and measure the change of every released array of
    # several models, concatenated.
    rng = np.random.default_rng(10 + k)
    n, n_models = 40, 3
    y = rng.integers(0, k, n)
    probas = [_predictions(rng, n, k, s)[1] for s in (0.5, 1.0, 3.0)]

    def concatenated(keep: np.ndarray) -> np.ndarray:
        parts = []
        for p in probas:
            released = released_arrays(compute_stats(y[keep], p[keep], n_classes=k, n_bins=TEST_BINS))
            parts += [released[key].ravel() for key in sorted(released)]
        return np.concatenate(parts).astype(np.float64)

    full = concatenated(np.ones(n, bool))
    changes = np.array([np.linalg.norm(full - concatenated(np.arange(n) != i)) for i in range(n)])
    bound = released_sensitivity(n_classes=k, n_models=n_models)
    assert changes.max() <= bound + 1e-12
    assert np.isclose(changes.max(), bound)
    assert bound == pytest.approx(math.sqrt(n_models) if k == 2 else math.sqrt(n_models * (k + 1)))
    with pytest.raises(ValueError, match="n_models"):
        released_sensitivity(n_classes=2, n_models=0)


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("signal", [0.3, 1.5, 4.0])
def test_pooled_released_auc_is_within_its_bound_of_sklearn(k: int, signal: float) -> None:
    rng = np.random.default_rng(int(10 * signal) + k)
    sites = [_predictions(rng, n, k, signal) for n in (60, 150, 400)]
    summed: dict[str, np.ndarray] = {}
    for y, p in sites:
        for key, value in released_arrays(compute_stats(y, p, n_classes=k, n_bins=TEST_BINS)).items():
            summed[key] = summed.get(key, 0) + value
    ours = metrics_from_stats(stats_from_released(summed, n_classes=k))
    y = np.concatenate([s[0] for s in sites])
    p = np.concatenate([s[1] for s in sites])
    ref = skm.roc_auc_score(y, p[:, 1]) if k == 2 else skm.roc_auc_score(y, p, multi_class="ovr", average="macro")
    assert ours["n"] == len(y)
    assert ours["accuracy"] == pytest.approx(skm.accuracy_score(y, p.argmax(axis=1)), abs=1e-12)
    assert abs(ours["auc"] - ref) <= ours["auc_bound"] + 1e-12


def test_noised_release_adds_noise_of_the_calibrated_std() -> None:
    # Counts far from zero and a large sensitivity: neither clipping nor rounding (variance 1/12
    # against 4000^2) shows, so the spread measured is the Gaussian noise's own.
    base = {"hist_pos": np.full(100_000, 10**6, np.int64), "hist_neg": np.full((2, 25_000), 10**6, np.int64)}
    sensitivity, multiplier = 1000.0, 4.0
    out = noised_release(base, sensitivity=sensitivity, noise_multiplier=multiplier, rng=np.random.default_rng(0))
    noise = np.concatenate([(out[key] - base[key]).ravel() for key in base]).astype(np.float64)
    std = multiplier * sensitivity
    assert noise.std() == pytest.approx(std, rel=0.02)
    assert abs(noise.mean()) < 5 * std / math.sqrt(noise.size)
    # Independent entries: neighbouring entries' noise is uncorrelated.
    assert abs(np.corrcoef(noise[:-1], noise[1:])[0, 1]) < 0.02


def test_noised_release_is_whole_nonnegative_counts_of_the_same_shapes() -> None:
    y, p = _predictions(np.random.default_rng(5), 100, 3, 1.0)
    released = released_arrays(compute_stats(y, p, n_bins=TEST_BINS))
    before = {key: v.copy() for key, v in released.items()}
    out = noised_release(released, sensitivity=released_sensitivity(n_classes=3, n_models=4),
                         noise_multiplier=4.0, rng=np.random.default_rng(1))
    assert {key: (v.shape, v.dtype) for key, v in out.items()} == {key: (v.shape, np.dtype(np.int64))
                                                                  for key, v in released.items()}
    assert all((v >= 0).all() for v in out.values())
    assert any((out[key] != released[key]).any() for key in out)
    assert all(np.array_equal(released[key], before[key]) for key in released)
    # Clipping at zero shows where counts are zero: about half of those entries stay zero.
    zeros = released["hist_pos"] == 0
    assert 0.3 < np.mean(out["hist_pos"][zeros] == 0) < 0.7
    # Metrics of a noised release are computable.
    m = metrics_from_stats(stats_from_released(out, n_classes=3))
    assert set(METRIC_NAMES) <= set(m)
    for kwargs in ({"sensitivity": 0.0, "noise_multiplier": 1.0}, {"sensitivity": 1.0, "noise_multiplier": 0.0},
                   {"sensitivity": 1.0, "noise_multiplier": float("inf")}):
        with pytest.raises(ValueError, match="finite number > 0"):
            noised_release(released, rng=np.random.default_rng(0), **kwargs)


def _binary_site(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """30% positives, calibrated scores of a model with AUC about 0.8 (binormal)."""
    d = math.sqrt(2) * 0.8416
    y = (rng.random(n) < 0.3).astype(np.int64)
    x = rng.normal(d * y, 1.0)
    return y, 1 / (1 + np.exp(-(math.log(0.3 / 0.7) + d * x - d * d / 2)))


@pytest.mark.parametrize("project", [False, True])
def test_noise_error_matches_summed_noised_releases(project: bool) -> None:
    # Sites with identical statistics make noise_error's even split exact; the reference is the
    # mechanism itself (noised_release at each site, with the site's totals when projecting,
    # summed), independent of noise_error's code.
    y, p = _binary_site(np.random.default_rng(6), 100)
    site = compute_stats(y, p, n_bins=TEST_BINS)
    n_sites, multiplier, sensitivity, draws = 3, 4.0, 2.0, 400
    pooled = site + site + site
    kwargs = {"noise_std_per_site": multiplier * sensitivity, "n_sites": n_sites, "draws": draws, "project": project}
    error, bias = noise_error(pooled, **kwargs), noise_bias(pooled, **kwargs)
    totals = released_totals(np.bincount(y, minlength=2)) if project else None
    rng = np.random.default_rng(100)
    values: dict[str, list[float]] = {"auc": [], "accuracy": []}
    for _ in range(draws):
        releases = [noised_release(released_arrays(site), sensitivity=sensitivity, noise_multiplier=multiplier,
                                   rng=rng, totals=totals) for _ in range(n_sites)]
        summed = {key: sum(r[key] for r in releases) for key in releases[0]}
        m = metrics_from_stats(stats_from_released(summed, n_classes=2))
        for name in values:
            values[name].append(m[name])
    clean = metrics_from_stats(pooled)
    for name, v in values.items():
        v = np.asarray(v)
        # The spread estimates of 400 draws each have about 3.5% relative error.
        assert error[name] == pytest.approx(v.std(ddof=1), rel=0.2), name
        assert bias[name] == pytest.approx(v.mean() - clean[name], abs=4 * v.std() / math.sqrt(draws)), name


def test_noise_error_is_zero_without_noise_and_grows_with_it() -> None:
    y, p = _binary_site(np.random.default_rng(7), 300)
    stats = compute_stats(y, p, n_bins=TEST_BINS)
    quiet = noise_error(stats, noise_std_per_site=0.0, n_sites=1, draws=20)
    assert set(quiet) == set(METRIC_NAMES) and all(v < 1e-12 for v in quiet.values())
    assert all(abs(v) < 1e-12 for v in noise_bias(stats, noise_std_per_site=0.0, n_sites=1, draws=20).values())
    small, large = (noise_error(stats, noise_std_per_site=s, n_sites=3, draws=200) for s in (0.5, 5.0))
    for name in ("auc", "accuracy"):
        assert 0 < small[name] < large[name], name
    with pytest.raises(ValueError, match="even number of bins"):
        noise_error(compute_stats(y, p), noise_std_per_site=1.0, n_sites=3)
    with pytest.raises(ValueError, match="n_sites"):
        noise_error(stats, noise_std_per_site=1.0, n_sites=0)


# ---------------------------------------------------------------------------------------------
# Projection of noised releases onto their known totals


def _whole_count_vectors(n_bins: int, total: int) -> np.ndarray:
    """Every vector of ``n_bins`` non-negative whole counts summing to ``total`` (stars and bars)."""
    out = []
    for bars in itertools.combinations(range(total + n_bins - 1), n_bins - 1):
        edges = np.array([-1, *bars, total + n_bins - 1])
        out.append(np.diff(edges) - 1)
    return np.array(out, dtype=np.int64)


def test_project_to_total_is_the_nearest_whole_count_vector() -> None:
    # Brute force over the whole-count simplex: no vector of the right total is nearer.
    rng = np.random.default_rng(20)
    for trial in range(60):
        n_bins, total = int(rng.integers(2, 6)), int(rng.integers(0, 9))
        h = rng.normal(total / n_bins, 3.0, n_bins) if trial % 3 else rng.normal(0.0, 5.0, n_bins)
        x = project_to_total(h, total=total)
        assert x.dtype == np.int64 and x.shape == h.shape and (x >= 0).all() and x.sum() == total
        candidates = _whole_count_vectors(n_bins, total)
        best = np.min(np.sum((candidates - h) ** 2, axis=1))
        assert np.sum((x - h) ** 2) == pytest.approx(best, abs=1e-9), (h, total, x)


def test_simplex_projection_solves_the_quadratic_programme() -> None:
    from scipy.optimize import minimize

    rng = np.random.default_rng(21)
    for _ in range(20):
        n_bins, total = int(rng.integers(2, 8)), float(rng.uniform(0.5, 20.0))
        v = rng.normal(0.0, 6.0, n_bins)
        x = simplex_projection(v, total)
        ref = minimize(lambda z: np.sum((z - v) ** 2), np.full(n_bins, total / n_bins), jac=lambda z: 2 * (z - v),
                       bounds=[(0, None)] * n_bins, method="SLSQP", options={"ftol": 1e-12, "maxiter": 500},
                       constraints=[{"type": "eq", "fun": lambda z: z.sum() - total, "jac": lambda z: np.ones_like(z)}])
        assert ref.success
        assert (x >= 0).all() and x.sum() == pytest.approx(total, rel=1e-12)
        assert np.allclose(x, ref.x, atol=1e-6), (v, total, x, ref.x)
        # Optimality (KKT): one common shift theta, x = v - theta where x > 0 and v <= theta where x = 0.
        theta = (v - x)[x > 0]
        assert np.allclose(theta, theta[0]) and (v[x == 0] <= theta[0] + 1e-12).all()


def test_projection_leaves_valid_counts_unchanged_and_refuses_bad_input() -> None:
    rng = np.random.default_rng(22)
    for n_bins in (1, 2, 7, TEST_BINS):
        h = rng.poisson(rng.uniform(0, 4), n_bins).astype(np.int64)
        assert np.array_equal(project_to_total(h, total=int(h.sum())), h)
        assert np.array_equal(project_to_total(h.astype(np.float64), total=int(h.sum())), h)
        assert np.array_equal(simplex_projection(h, float(h.sum())), h)
        # Idempotent on its own output, whatever the input.
        x = project_to_total(rng.normal(0, 8, n_bins), total=5)
        assert np.array_equal(project_to_total(x, total=5), x)
    assert np.array_equal(project_to_total(np.array([3.5, -2.0, 9.0]), total=0), np.zeros(3, np.int64))
    assert np.array_equal(project_to_total(np.array([-5.0, -9.0]), total=3), [3, 0])
    for h, total in ((np.ones((2, 2)), 1), (np.array([]), 0), (np.array([1.0, np.nan]), 1)):
        with pytest.raises(ValueError, match="1-D"):
            project_to_total(h, total=total)
    for total in (-1, 2.0, True):
        with pytest.raises(ValueError, match="total"):
            project_to_total(np.ones(3), total=total)  # type: ignore[arg-type]


@pytest.mark.parametrize("k", [2, 3])
def test_released_totals_are_the_released_arrays_totals(k: int) -> None:
    y, p = _predictions(np.random.default_rng(30 + k), 150, k, 1.0)
    released = released_arrays(compute_stats(y, p, n_classes=k, n_bins=TEST_BINS))
    totals = released_totals(np.bincount(y, minlength=k).tolist())
    assert set(totals) == set(released)
    for key, value in released.items():
        assert np.array_equal(value.sum(axis=-1), totals[key]), key
    for bad in ([5], [[1, 2], [3, 4]], [3, -1], [1.5, 2.0]):
        with pytest.raises(ValueError, match="class_counts"):
            released_totals(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("k", [2, 3])
def test_noised_release_with_totals_keeps_them_exactly(k: int) -> None:
    y, p = _predictions(np.random.default_rng(40 + k), 60, k, 1.0)
    released = released_arrays(compute_stats(y, p, n_classes=k, n_bins=TEST_BINS))
    totals = released_totals(np.bincount(y, minlength=k))
    args = {"sensitivity": released_sensitivity(n_classes=k, n_models=4), "noise_multiplier": 4.0}
    for seed in range(5):
        out = noised_release(released, rng=np.random.default_rng(seed), totals=totals, **args)
        assert {key: (v.shape, v.dtype) for key, v in out.items()} == {key: (v.shape, np.dtype(np.int64))
                                                                      for key, v in released.items()}
        for key, value in out.items():
            assert (value >= 0).all() and np.array_equal(value.sum(axis=-1), totals[key]), key
        assert stats_from_released(out, n_classes=k).n == len(y)  # no phantom (or lost) patients
    # Only the arrays named get projected; the others are rounded and clipped from the same noise.
    partial = noised_release(released, rng=np.random.default_rng(7), totals={"hist_pos": totals["hist_pos"]}, **args)
    plain = noised_release(released, rng=np.random.default_rng(7), **args)
    assert np.array_equal(partial["hist_pos"].sum(axis=-1), totals["hist_pos"])
    assert not np.array_equal(plain["hist_pos"].sum(axis=-1), totals["hist_pos"])
    assert all(np.array_equal(partial[key], plain[key]) for key in released if key != "hist_pos")
    wrong_shape = np.append(np.atleast_1d(totals["hist_pos"]), 1)
    bad = [({"nope": 3}, "not released"), ({"hist_pos": wrong_shape}, "int for a 1-D array"),
           ({"hist_pos": np.asarray(totals["hist_pos"]) + 1}, "differ"),
           ({"hist_pos": np.asarray(totals["hist_pos"]) * 0.5}, "whole numbers")]
    for given_totals, message in bad:
        with pytest.raises(ValueError, match=message):
            noised_release(released, rng=np.random.default_rng(0), totals=given_totals, **args)


def test_projection_shrinks_the_pooled_noise_bias() -> None:
    # The measured problem: 3 sites of 100 test patients (30% positive, AUC about 0.8), 4 models'
    # statistics released at epsilon 1. Clipping each site's noised bins at 0 adds phantom patients
    # and drags pooled AUC towards 0.5; projecting onto the known totals keeps the patient counts.
    # At 32 bins the noise (about 8 counts per bin and site) still swamps the 1-3 patients a bin
    # holds, so the biases shrink only partly (measured: AUC -0.211 -> -0.189, accuracy, the
    # split at p = 0.5, -0.182 -> -0.140).
    rng = np.random.default_rng(50)
    sites = [compute_stats(*_binary_site(rng, 100), n_bins=TEST_BINS) for _ in range(3)]
    pooled = sites[0] + sites[1] + sites[2]
    std = gaussian_noise_multiplier(epsilon=1.0, delta=1e-5) * released_sensitivity(n_classes=2, n_models=4)
    assert 7.5 < std < 8.5
    clipped, projected = (noise_bias(pooled, noise_std_per_site=std, n_sites=3, draws=300, seed=1, project=project)
                          for project in (False, True))
    report = f"bias clipped {clipped['auc']:+.3f} / {clipped['accuracy']:+.3f}, projected " \
             f"{projected['auc']:+.3f} / {projected['accuracy']:+.3f} (AUC / accuracy)"
    assert clipped["auc"] < -0.15 and clipped["accuracy"] < -0.1, report
    assert abs(projected["auc"]) < 0.95 * abs(clipped["auc"]), report
    assert abs(projected["accuracy"]) < 0.85 * abs(clipped["accuracy"]), report


def test_a_model_whose_scores_share_one_released_bin_is_named_unresolved_in_the_report() -> None:
    """An under-confident model (probabilities within 0.002 of the class shares) ranks patients
    well, but at the released 32 bins its AUC reads about 0.5: the report must say that the bins
    do not resolve it, with an interval that holds its true AUC; a spread-out model is not named."""
    from sklearn.metrics import roc_auc_score

    from common.metrics import coarsen_stats, compute_stats, metrics_from_stats
    from server.report import bins_mark, unresolved_note

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    score = y + rng.normal(0.0, 1.0, 400)
    flat = 0.4 + 0.001 * score  # ranks as `score` does, all within 0.01
    spread = 1.0 / (1.0 + np.exp(-2.0 * score))
    true_auc = roc_auc_score(y, score)
    models = {}
    for name, p in (("cnn", flat), ("forest", spread)):
        stats = coarsen_stats(compute_stats(y, np.column_stack([1 - p, p]), n_classes=2), n_bins=32)
        m = metrics_from_stats(stats)
        models[name] = {**m, "ci": {k: [m[k], m[k]] for k in m}}
    assert models["cnn"]["auc_bound"] >= 0.05 > models["forest"]["auc_bound"]
    assert abs(models["cnn"]["auc"] - 0.5) < 0.05 < true_auc - 0.5
    note = unresolved_note({"models": models})
    low, high = (float(v) for v in note.split("anywhere in [")[1].split("]")[0].split(", "))
    assert "cnn" in note and "forest" not in note and low <= true_auc <= high
    assert unresolved_note({"models": {"forest": models["forest"]}}) == ""
    assert bins_mark(models["cnn"]) == f" (bins \u00b1{models['cnn']['auc_bound']:.3f})"
    assert bins_mark(models["forest"]) == ""


def test_each_site_reports_how_much_its_test_noise_moves_an_auc_there() -> None:
    """With noised test statistics every per-site figure carries the site's own noise: metrics.json
    gives its standard deviation on an AUC (larger at a smaller site) and the report says it; exact
    statistics carry none."""
    from common.metrics import coarsen_stats
    from server.report import _site_metrics, site_noise_note

    rng = np.random.default_rng(1)

    def site(n: int, noise_std: float) -> dict:
        y = rng.integers(0, 2, n)
        p = 1.0 / (1.0 + np.exp(-(2.0 * y - 1.0 + rng.normal(0.0, 1.0, n))))
        stats = coarsen_stats(compute_stats(y, np.column_stack([1 - p, p]), n_classes=2), n_bins=TEST_BINS)
        return {"n": n, "noise_std": noise_std, "stats": {"hybrid": stats, "forest": stats}}

    small, large = (_site_metrics(site(n, 5.0), {}, seed=0) for n in (30, 600))
    assert 0.0 < large["auc_noise_sd"] < small["auc_noise_sd"]
    exact = _site_metrics(site(30, 0.0), {}, seed=0)
    assert "auc_noise_sd" not in exact
    note = site_noise_note({"sites": {"site-a": small, "site-b": large}})
    assert "site-a" in note and f"{small['auc_noise_sd']:.3f}" in note
    assert site_noise_note({"sites": {"site-a": exact}}) == ""
