"""The federated GLM: a pooled fit to 1e-4 from per-site sums, and scikit-learn's estimator contract."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.utils.validation import check_is_fitted

from common.glm import FederatedGLM
from common.meta import NewtonSolver, StackingMetaClassifier, newton_terms


def _data(seed: int, n: int, d: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = np.clip(rng.normal(size=(n, d)), -4, 4)
    w = rng.normal(size=(d, k))
    y = (x @ w + rng.gumbel(size=(n, k))).argmax(axis=1)
    return x, y


@pytest.mark.parametrize("k", [2, 3])
def test_federated_glm_equals_pooled_sklearn_fit(k: int) -> None:
    x, y = _data(0, 1200, 12, k)
    sites = np.array_split(np.random.default_rng(1).permutation(len(y)), 3)
    solver = NewtonSolver(n_features=x.shape[1], n_classes=k, penalty="l2", C=0.1)
    for _ in range(30):
        parts = [newton_terms(solver.coef, x[i], y[i], n_classes=k) for i in sites]
        solver.step(sum(parts[1:], parts[0]))
        if solver.converged:
            break
    assert solver.converged
    fed = FederatedGLM(C=0.1).set_coef(solver.result(), n_features=x.shape[1], converged=True)
    ref = LogisticRegression(C=0.1, tol=1e-12, max_iter=10_000, solver="newton-cg").fit(x, y)
    np.testing.assert_allclose(fed.coef_, ref.coef_, atol=1e-4)
    np.testing.assert_allclose(fed.intercept_, ref.intercept_, atol=1e-4)
    np.testing.assert_allclose(fed.predict_proba(x), ref.predict_proba(x), atol=1e-5)


@pytest.mark.parametrize("cls", [FederatedGLM, StackingMetaClassifier])
def test_estimator_contract(cls: type) -> None:
    est = cls(C=0.5)
    extra = {"positive": True} if cls is StackingMetaClassifier else {}
    assert est.get_params() == {"C": 0.5, "max_iter": 100, "penalty": "l2", "tol": 1e-10, **extra}
    twin = clone(est)
    assert twin is not est and twin.get_params() == est.get_params()
    with pytest.raises(ValueError, match="invalid parameter"):
        est.set_params(alpha=1.0)
    x, y = _data(2, 300, 4, 2)
    labels = np.array(["no", "yes"])[y]
    fitted = est.fit(x, labels)
    assert fitted is est
    check_is_fitted(est)
    assert list(est.classes_) == ["no", "yes"] and est.converged_ is True and est.n_iter_ > 0
    assert set(est.predict(x)) <= {"no", "yes"}


def test_classes_after_a_federated_fit() -> None:
    multi = StackingMetaClassifier().set_coef(np.zeros(3 * 5), n_features=4, classes=["a", "b", "c"])
    assert list(multi.classes_) == ["a", "b", "c"]
    binary = FederatedGLM().set_coef(np.zeros(5), n_features=4)
    assert list(binary.classes_) == [0, 1] and binary.converged_ is None
    with pytest.raises(ValueError, match="classes"):
        FederatedGLM().set_coef(np.zeros(5), n_features=4, classes=["a", "b", "c"])


# ---------------------------------------------------------------------------------------------
# The DP GLM: row-clipped inputs, one noised gradient, a public curvature


def test_glm_rows_are_clipped_to_the_row_bound() -> None:
    from common.tabular import clip_rows, glm_row_bound

    x = np.vstack([np.full(16, 4.0), np.full(16, 0.5), np.zeros(16)])
    bound = glm_row_bound(16)
    assert bound == pytest.approx(6.0)
    out = clip_rows(x, bound)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), [6.0, 2.0, 0.0])
    np.testing.assert_array_equal(out[1:], x[1:])  # rows within the bound are untouched


@pytest.mark.parametrize("k", [2, 3])
def test_dp_glm_gradient_sensitivity_and_noise(k: int) -> None:
    from client.privacy.mechanisms import private_glm_gradient
    from common.glm import gradient_bound
    from common.tabular import clip_rows, glm_row_bound

    rng = np.random.default_rng(3)
    d = 10
    x, y = _data(4, 200, d, k)
    x[:20] *= 10.0  # rows far beyond the bound: the release clips them itself
    coef = rng.normal(size=(d + 1) * (1 if k == 2 else k))
    bound = gradient_bound(n_features=d, n_classes=k)
    clipped = clip_rows(x, glm_row_bound(d))
    full = newton_terms(coef, clipped, y, n_classes=k).grad
    # Removing any one record moves the gradient by at most the bound (brute force over records).
    worst = max(np.linalg.norm(full - newton_terms(coef, np.delete(clipped, i, 0), np.delete(y, i), n_classes=k).grad)
                for i in range(len(y)))
    assert worst <= bound + 1e-9 and worst > 0.5 * bound  # tight: outlying rows reach it
    draws = np.array([private_glm_gradient(coef, x, y, n_classes=k, noise_multiplier=2.0,
                                           rng=np.random.default_rng(s)) for s in range(400)])
    np.testing.assert_allclose(draws.mean(axis=0), full, atol=6 * 2.0 * bound / np.sqrt(400))
    assert np.std(draws - full) == pytest.approx(2.0 * bound, rel=0.03)


def test_dp_glm_step_is_a_shrunk_marginal_score() -> None:
    """One step from zero with the public curvature: each column's weight is its summed gradient
    over n / 4 + 1 / C (binary), the sites' noised gradients simply added."""
    from common.glm import public_curvature

    x, y = _data(5, 900, 6, 2)
    sites = np.array_split(np.arange(len(y)), 3)
    solver = NewtonSolver(n_features=6, n_classes=2, penalty="l2", C=0.1)
    grads = [newton_terms(solver.coef, x[i], y[i], n_classes=2).grad for i in sites]
    hess = sum(public_curvature(n=len(i), n_features=6, n_classes=2) for i in sites)
    from common.meta import NewtonTerms

    coef = solver.step(NewtonTerms(float("nan"), sum(grads), hess, len(y)))
    g = sum(grads)
    np.testing.assert_allclose(coef[:-1], -g[:-1] / (len(y) / 4 + 10.0))
    np.testing.assert_allclose(coef[-1], -g[-1] / (len(y) / 4))
    # The score ranks like the marginal associations it is built from.
    assert np.corrcoef(coef[:-1], [np.cov(x[:, j], y)[0, 1] for j in range(6)])[0, 1] > 0.99
    multi = public_curvature(n=10, n_features=2, n_classes=3)
    assert multi.shape == (9, 9) and np.allclose(multi, multi.T) and np.linalg.eigvalsh(multi).min() > -1e-12


def test_noised_moments_never_shrink_a_scale_below_what_the_noise_can_measure() -> None:
    """A column whose variance is below what the noise can measure gets the scale at that floor
    (it is compressed, not clipped away); one the noise leaves measurable keeps its estimate."""
    from common.tabular import SharedColumns, scaler_from_moments

    n = 1000.0
    width = 2
    cols = SharedColumns(n_numeric=width, n_onehot=0, n_sequence=0, low=np.zeros(width), high=np.full(width, 10.0),
                         clinical=np.zeros(width, dtype=bool))
    # Rescaled moments: column a has sd 0.01 (of its range), b sd 0.3; means 0.5.
    moments = {"count": np.full(width, n), "sum": np.full(width, 0.5 * n),
               "sumsq": n * (0.25 + np.array([0.01, 0.3]) ** 2)}
    exact = scaler_from_moments(moments, cols, rescaled=True, max_glm_columns=2)
    np.testing.assert_allclose(exact.scale, [0.1, 3.0])
    noised = scaler_from_moments(moments, cols, rescaled=True, max_glm_columns=2, noise_sd=10.0)
    # floor: 2 * 10 / 1000 = 0.02 in variance (of the rescaled column): a's 1e-4 is below it, b's 0.09 is not.
    np.testing.assert_allclose(noised.scale, [10.0 * np.sqrt(0.02), 3.0])
    raw = np.array([[5.0, 5.0], [5.6, 8.0]])  # 0.6 off column a's noised mean: 6 of its exact sds
    assert np.abs(noised.transform(raw)).max() < 4.0 and np.abs(exact.transform(raw)).max() == 4.0


def test_keep_largest_zeroes_all_but_the_strongest_columns() -> None:
    from common.glm import keep_largest

    binary = np.array([0.1, -3.0, 0.5, 2.0, 0.0, -1.0])  # five columns and the intercept
    np.testing.assert_array_equal(keep_largest(binary, n_features=5, n_classes=2, keep=2),
                                  [0.0, -3.0, 0.0, 2.0, 0.0, -1.0])
    np.testing.assert_array_equal(keep_largest(binary, n_features=5, n_classes=2, keep=9), binary)
    # Three classes: a column's size is its norm over the classes; every intercept stays.
    multi = np.array([[1.0, 0.0, 0.2, 5.0],
                      [-1.0, 0.1, 0.2, 6.0],
                      [0.0, 0.0, -0.2, 7.0]])
    kept = keep_largest(multi.ravel(), n_features=3, n_classes=3, keep=1).reshape(3, 4)
    np.testing.assert_array_equal(kept[:, 0], multi[:, 0])
    assert not kept[:, 1:3].any() and (kept[:, 3] == multi[:, 3]).all()


@pytest.mark.parametrize("counts", [[30, 70], [10, 50, 40]])
def test_the_dp_gradient_is_taken_at_the_intercept_only_model(counts: list[int]) -> None:
    """There the residuals sum to zero: shifting a column (a noised scaler's missed mean) leaves
    its gradient unchanged, so an imbalanced label cannot make a mis-centred column look strong."""
    from common.glm import intercept_only
    from common.meta import newton_terms

    k = len(counts)
    coef = intercept_only(np.asarray(counts), n_features=2, n_classes=k)
    logits = coef.reshape(-1, 3)[:, -1]
    proba = 1 / (1 + np.exp(-logits[0])) if k == 2 else np.exp(logits) / np.exp(logits).sum()
    np.testing.assert_allclose(proba, counts[1] / sum(counts) if k == 2 else np.asarray(counts) / sum(counts),
                               atol=0.01)
    y = np.repeat(np.arange(k), counts)
    x = np.random.default_rng(0).normal(size=(len(y), 2))
    exact = intercept_only(np.asarray(counts) - 0.5, n_features=2, n_classes=k)  # no half-record prior
    g = newton_terms(exact, x, y, n_classes=k).grad
    shifted = newton_terms(exact, x + np.array([3.0, -2.0]), y, n_classes=k).grad
    np.testing.assert_allclose(g, shifted, atol=1e-9)
    zero = np.zeros_like(exact)
    if k == 2:  # ... where at zero it does not
        assert not np.allclose(newton_terms(zero, x, y, n_classes=k).grad,
                               newton_terms(zero, x + np.array([3.0, -2.0]), y, n_classes=k).grad, atol=1.0)


def test_the_dp_glm_benchmark_replays_the_mechanism(tmp_path) -> None:
    """The benchmark's DP GLM reaches its no-noise fit when the noise vanishes, and a larger
    glm-epsilon is charged as a larger composed run epsilon."""
    from common.settings import RunSettings
    from simulations.benchmarks.dp_glm import run
    from simulations.site_layout import split_cohort
    from simulations.synthetic import write_synthetic_cohort

    write_synthetic_cohort(out=tmp_path / "cohort", patients=300, seed=4)
    split_cohort(spec_path=tmp_path / "cohort" / "spec.toml", sites=2, by="iid", out=tmp_path / "sites", seed=0,
                 vaults=True, show_progress=False)
    result = run(sites_dir=tmp_path / "sites", glm_epsilons=[1.0, 1e6], moments_epsilons=[1e6], epsilon=8.0,
                 delta=1e-5, draws=1, widths=[256])
    weak, exact = result["rows"]
    assert exact["auc_exact_scaler"][0] == pytest.approx(result["auc_exact_scaler_no_noise"], abs=0.01)
    assert result["auc_exact_scaler_no_noise"] > 0.6
    assert weak["run_epsilon"] < exact["run_epsilon"]
    # Each width is replayed with its own scaler: without noise each row reaches its own no-noise fit.
    widths = run(sites_dir=tmp_path / "sites", glm_epsilons=[1e6], moments_epsilons=[1e6], epsilon=8.0, delta=1e-5,
                 draws=1, widths=[4, 256])
    assert [r["glm_max_features"] for r in widths["rows"]] == [4, 256]
    for row in widths["rows"]:
        assert row["auc_exact_scaler"][0] == pytest.approx(row["auc_exact_scaler_no_noise"], abs=0.01)
    assert widths["rows"][1]["auc_exact_scaler_no_noise"] == pytest.approx(result["auc_exact_scaler_no_noise"])
    # Without widths, the run's own width under DP.
    default = run(sites_dir=tmp_path / "sites", glm_epsilons=[1e6], moments_epsilons=[1e6], epsilon=8.0, delta=1e-5,
                  draws=1)
    assert [r["glm_max_features"] for r in default["rows"]] == [RunSettings().glm_width] == \
        [RunSettings().glm_dp_columns]


@pytest.mark.slow
def test_the_fedavg_gap_benchmark_scores_every_round_of_every_variant(tmp_path) -> None:
    """Each variant has one score per round; the IID sites deal every train record exactly once,
    in the layout's site sizes."""
    from simulations.benchmarks.fedavg_gap import VARIANTS, _iid_sites, _sites, run
    from simulations.site_layout import split_cohort
    from simulations.synthetic import write_synthetic_cohort

    write_synthetic_cohort(out=tmp_path / "cohort", patients=240, seed=4)
    split_cohort(spec_path=tmp_path / "cohort" / "spec.toml", sites=2, by="iid", out=tmp_path / "sites", seed=0,
                 vaults=True, show_progress=False)
    result = run(sites_dir=tmp_path / "sites", rounds=2, local_epochs=1, variants=list(VARIANTS))
    for name in VARIANTS:
        assert [r["round"] for r in result["curves"][name]] == [1, 2]
        assert all(0.0 <= r[s] <= 1.0 for r in result["curves"][name] for s in ("validation", "test"))
    sites, pooled = _sites(tmp_path / "sites")
    sizes = [int(s.masks["train"].sum()) for s in sites]
    dealt = _iid_sites(pooled, sizes, seed=3)
    assert [int(s.masks["train"].sum()) for s in dealt] == sizes
    assert np.array_equal(np.sum([s.masks["train"] for s in dealt], axis=0), pooled.masks["train"])
    # A server step of 0 never moves the global model; 1 without momentum is plain FedAvg.
    frozen = run(sites_dir=tmp_path / "sites", rounds=2, local_epochs=1, variants=["fedavg"], server_lr=0.0)
    assert frozen["curves"]["fedavg"][0] == {**frozen["curves"]["fedavg"][1], "round": 1}
    plain = run(sites_dir=tmp_path / "sites", rounds=2, local_epochs=1, variants=["fedavg"], server_lr=1.0,
                server_momentum=0.0)
    assert plain["curves"]["fedavg"] == result["curves"]["fedavg"]
    # FedAdam through the run's own aggregator moves the model otherwise; another seed starts elsewhere.
    adam = run(sites_dir=tmp_path / "sites", rounds=2, local_epochs=1, variants=["fedavg"], strategy="fedadam")
    assert adam["strategy"] == "fedadam" and adam["curves"]["fedavg"] != result["curves"]["fedavg"]
    reseeded = run(sites_dir=tmp_path / "sites", rounds=2, local_epochs=1, variants=["fedavg"], init_seed=1)
    assert reseeded["init_seed"] == 1 and reseeded["curves"]["fedavg"] != result["curves"]["fedavg"]


@pytest.mark.slow
def test_the_site_glm_stack_benchmark_scores_each_way_of_using_the_site_models(tmp_path) -> None:
    """Every way of using a site's forest and GLM is scored pooled and per site; a class a site's
    train split lacks gets a probability floor, not a missing column."""
    from client.pipeline import over_all_classes
    from simulations.benchmarks.site_glm_stack import SCORES, run
    from simulations.site_layout import split_cohort
    from simulations.synthetic import write_synthetic_cohort

    padded = over_all_classes(np.array([[0.25, 0.75]]), np.array([0, 2]), 3)
    assert padded.shape == (1, 3) and padded[0, 1] < 1e-5 and padded.sum() == pytest.approx(1.0)
    assert padded[0, 2] / padded[0, 0] == pytest.approx(3.0)
    write_synthetic_cohort(out=tmp_path / "cohort", patients=300, seed=4)
    split_cohort(spec_path=tmp_path / "cohort" / "spec.toml", sites=2, by="iid", out=tmp_path / "sites", seed=0,
                 vaults=True, show_progress=False)
    result = run(sites_dir=tmp_path / "sites")
    assert set(result["pooled_test_auc"]) == set(SCORES)
    assert all(0.0 <= v <= 1.0 for v in result["pooled_test_auc"].values())
    assert np.shape(result["stack_coef"]) == (1, 2)  # binary: one weight per site-local model
    for row in result["per_site"]:
        assert row["best_alone_auc"] == row[row["best_alone"]]
    assert result["site_mean_test_auc"]["stack"] == pytest.approx(np.mean([r["stack"] for r in result["per_site"]]),
                                                                  abs=1e-4)
