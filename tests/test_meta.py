"""The Newton meta-classifier matches scikit-learn, pooled and from per-site sums."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from common.meta import NewtonSolver, StackingMetaClassifier, newton_terms, positive_evidence


def _scores(seed: int, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Meta-features shaped like two base models' class probabilities."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    feats = []
    for strength in (1.2, 0.8):
        logits = rng.normal(size=(n, k)) + strength * np.eye(k)[y]
        p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        feats.append(p[:, 1:] if k == 2 else p)
    return np.hstack(feats), y


def _sklearn(x: np.ndarray, y: np.ndarray, penalty: str | None, C: float) -> LogisticRegression:
    # C = inf is scikit-learn's way of asking for no penalty.
    return LogisticRegression(solver="newton-cg", tol=1e-12, max_iter=10_000,
                              C=C if penalty == "l2" else np.inf).fit(x, y)


@pytest.mark.parametrize("penalty,C", [(None, 1.0), ("l2", 1.0), ("l2", 0.05)])
def test_binary_matches_sklearn(penalty: str | None, C: float) -> None:
    x, y = _scores(0, 1500, 2)
    ours = StackingMetaClassifier(penalty=penalty, C=C).fit(x, y)
    ref = _sklearn(x, y, penalty, C)
    assert ours.converged_
    np.testing.assert_allclose(ours.coef_, ref.coef_, atol=1e-4)
    np.testing.assert_allclose(ours.intercept_, ref.intercept_, atol=1e-4)


@pytest.mark.parametrize("C", [1.0, 0.1])
def test_multiclass_l2_matches_sklearn(C: float) -> None:
    x, y = _scores(1, 1500, 3)
    ours = StackingMetaClassifier(penalty="l2", C=C).fit(x, y)
    ref = _sklearn(x, y, "l2", C)
    np.testing.assert_allclose(ours.coef_, ref.coef_, atol=1e-4)
    np.testing.assert_allclose(ours.intercept_, ref.intercept_, atol=1e-4)


def test_multiclass_unpenalized_matches_sklearn_probabilities() -> None:
    # Without a penalty the multinomial coefficients are identified only up to a shift per feature,
    # so the comparison is on what the model predicts.
    x, y = _scores(2, 1500, 3)
    ours = StackingMetaClassifier(penalty=None).fit(x, y)
    ref = _sklearn(x, y, None, 1.0)
    np.testing.assert_allclose(ours.predict_proba(x), ref.predict_proba(x), atol=1e-5)


@pytest.mark.parametrize("k", [2, 4])
def test_summed_site_terms_reach_the_pooled_fit(k: int) -> None:
    x, y = _scores(3, 2000, k)
    sites = np.array_split(np.random.default_rng(0).permutation(len(y)), 3)
    solver = NewtonSolver(n_features=x.shape[1], n_classes=k, penalty="l2", C=0.5)
    for _ in range(50):
        terms = [newton_terms(solver.coef, x[idx], y[idx], n_classes=k) for idx in sites]
        solver.step(sum(terms[1:], terms[0]))
        if solver.converged:
            break
    pooled = StackingMetaClassifier(penalty="l2", C=0.5).fit(x, y)
    fed = StackingMetaClassifier().set_coef(solver.best_coef, n_features=x.shape[1])
    assert solver.converged and solver.iterations < 20
    np.testing.assert_allclose(fed.coef_, pooled.coef_, atol=1e-8)


def test_separable_data_does_not_diverge_with_penalty() -> None:
    x = np.array([[0.0], [0.1], [0.9], [1.0]])
    y = np.array([0, 0, 1, 1])
    ours = StackingMetaClassifier(penalty="l2", C=10.0).fit(x, y)
    ref = _sklearn(x, y, "l2", 10.0)
    np.testing.assert_allclose(ours.coef_, ref.coef_, atol=1e-4)


def test_solver_state_round_trip_resumes_identically() -> None:
    x, y = _scores(4, 500, 2)
    a = NewtonSolver(n_features=x.shape[1], n_classes=2)
    a.step(newton_terms(a.coef, x, y, n_classes=2))
    b = NewtonSolver(n_features=x.shape[1], n_classes=2)
    b.load_state_dict(a.state_dict())
    for s in (a, b):
        s.step(newton_terms(s.coef, x, y, n_classes=2))
    np.testing.assert_array_equal(a.coef, b.coef)


def _log_odds_stats(y: np.ndarray, score: np.ndarray):
    """Binary validation statistics, on the released 32 bins, of a model whose log-odds are ``score``."""
    from common.metrics import compute_stats

    p = 1.0 / (1.0 + np.exp(-score))
    return compute_stats(y, np.column_stack([1 - p, p]), n_classes=2, n_bins=32)


def _with_a_contrary_model(seed: int, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Two informative models' log-probabilities and a third whose own evidence, in this sample,
    runs against the label: the unbounded fit gives it negative weight."""
    x, y = _scores(seed, n, k)
    rng = np.random.default_rng(seed + 100)
    contrary = rng.normal(size=(n, 1 if k == 2 else k)) - 0.4 * (np.eye(k)[y][:, 1:] if k == 2 else np.eye(k)[y])
    return np.hstack([np.log(np.clip(x, 1e-6, 1)), contrary]), y


def _bounded_reference(x: np.ndarray, y: np.ndarray, k: int, C: float, mask: np.ndarray) -> np.ndarray:
    """The penalized optimum under the bounds by an independent optimizer (L-BFGS-B)."""
    from scipy.optimize import minimize

    solver = NewtonSolver(n_features=x.shape[1], n_classes=k, penalty="l2", C=C)

    def fun(c: np.ndarray) -> tuple[float, np.ndarray]:
        solver.coef = c
        obj, grad, _ = solver.objective(newton_terms(c, x, y, n_classes=k))
        return obj, grad

    bounds = [(0.0, None) if m else (None, None) for m in mask]
    res = minimize(fun, np.zeros(mask.shape[0]), jac=True, method="L-BFGS-B", bounds=bounds,
                   options={"ftol": 1e-15, "gtol": 1e-10, "maxiter": 10_000})
    return res.x


@pytest.mark.parametrize("k", [2, 3])
def test_non_negative_stacking_is_the_bounded_optimum_pooled_and_federated(k: int) -> None:
    x, y = _with_a_contrary_model(5, 1200, k)
    free = StackingMetaClassifier(penalty="l2", C=1.0, positive=False).fit(x, y)
    own = positive_evidence(n_models=3, n_classes=k)
    free_flat = np.hstack([free.coef_, free.intercept_[:, None]]).ravel()
    assert (free_flat[own] < -0.05).any()  # the case the bound is for
    bounded = StackingMetaClassifier(penalty="l2", C=1.0).fit(x, y)
    flat = np.hstack([bounded.coef_, bounded.intercept_[:, None]]).ravel()
    assert bounded.converged_ and (flat[own] >= 0).all()
    # Compared through probabilities: K-class intercepts are unpenalized, so only their differences are fixed.
    reference = StackingMetaClassifier().set_coef(_bounded_reference(x, y, k, 1.0, own), n_features=x.shape[1])
    np.testing.assert_allclose(bounded.predict_proba(x), reference.predict_proba(x), atol=1e-4)
    # From the sites' summed terms, as the coordinator runs it.
    sites = np.array_split(np.arange(len(y)), 3)
    solver = NewtonSolver(n_features=x.shape[1], n_classes=k, penalty="l2", C=1.0, positive=own)
    for _ in range(50):
        terms = [newton_terms(solver.coef, x[idx], y[idx], n_classes=k) for idx in sites]
        solver.step(sum(terms[1:], terms[0]))
        if solver.converged:
            break
    assert solver.converged
    np.testing.assert_allclose(solver.result(), flat, atol=1e-8)


@pytest.mark.parametrize("k", [2, 3])
def test_selection_coef_makes_the_stack_one_base_model(k: int) -> None:
    from client.pipeline import meta_features
    from common.meta import META_FEATURE_BOUND, selection_coef

    rng = np.random.default_rng(9)
    probas = [rng.dirichlet(np.ones(k), size=50) for _ in range(3)]
    x = meta_features(*probas)
    inside = (np.abs(x) < META_FEATURE_BOUND).all(axis=1)  # beyond the features' clip, probabilities saturate
    assert inside.sum() > 30
    for index in range(3):
        stack = StackingMetaClassifier().set_coef(selection_coef(n_models=3, n_classes=k, index=index),
                                                  n_features=x.shape[1])
        np.testing.assert_allclose(stack.predict_proba(x)[inside], probas[index][inside], atol=1e-9)


@pytest.mark.parametrize("k", [2, 3])
def test_a_reduced_stack_is_the_stack_over_the_other_models(k: int) -> None:
    """Zeroing one model's weights gives the stack fitted coefficients over the two others."""
    from client.pipeline import meta_features
    from common.meta import without_model

    rng = np.random.default_rng(10)
    probas = [rng.dirichlet(np.ones(k), size=60) for _ in range(3)]
    x = meta_features(*probas)
    width = x.shape[1] // 3
    coef = rng.normal(size=(1 if k == 2 else k, x.shape[1] + 1))
    for index in range(3):
        reduced = without_model(coef.ravel(), n_models=3, n_classes=k, index=index).reshape(coef.shape)
        keep = [j for j in range(x.shape[1]) if j // width != index]
        two = StackingMetaClassifier().set_coef(np.hstack([coef[:, keep], coef[:, -1:]]).ravel(),
                                                n_features=len(keep))
        full = StackingMetaClassifier().set_coef(reduced.ravel(), n_features=x.shape[1])
        np.testing.assert_allclose(full.predict_proba(x), two.predict_proba(x[:, keep]), atol=1e-12)
        assert np.all(reduced[:, index * width:(index + 1) * width] == 0)


def test_the_stack_without_a_noise_model_is_chosen_when_it_beats_the_rest() -> None:
    """Two good models and one at chance: the full stack is diluted, the stack without the noise
    wins on validation, and the hybrid becomes it (weights zeroed, the rest scaled up to the fitted
    stack's total weight: the same ranking, scores as spread)."""
    from common.settings import RunSettings
    from server.phases import RunState, _stacking_fallback
    from server.report import _model_roles, fallback_note

    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 600)
    a, b, noise = (y - 0.5) + rng.normal(0, 0.9, 600), (y - 0.5) + rng.normal(0, 0.9, 600), rng.normal(0, 3, 600)

    stats = functools.partial(_log_odds_stats, y)

    pooled = {"hybrid": stats(a + b + noise), "cnn": stats(a), "forest": stats(b), "logreg": stats(noise),
              "site-logreg": stats(noise), "hybrid-without-cnn": stats(b + noise),
              "hybrid-without-forest": stats(a + noise), "hybrid-without-logreg": stats(a + b),
              "hybrid-without-site-logreg": stats(a + b + noise)}
    state = RunState(run_id="r", meta_coef=[0.4, 0.3, 0.2, 0.0, -0.1])
    fb = _stacking_fallback(state, pooled, 2, margin_se=0.0, site_average_se=0.0)
    auc = fb["validation_auc"]
    assert fb["model"] == "hybrid-without-logreg" == fb["best_stack"]
    assert auc["hybrid-without-logreg"] > max(auc["cnn"], auc["forest"], auc["hybrid"])
    np.testing.assert_allclose(state.meta_coef, [0.4 * 0.9 / 0.7, 0.3 * 0.9 / 0.7, 0.0, 0.0, -0.1])
    assert fb["fitted_coef"] == [0.4, 0.3, 0.2, 0.0, -0.1]
    assert "the stack without the logreg had a higher validation AUC" in fallback_note({"meta": {"fallback": fb}})
    state.meta_fallback = fb
    fitted = RunSettings(meta_dp_rounds=3)  # a stack fitted under DP (noised Newton rounds)
    assert "but the logreg (its weight set to zero" in _model_roles(state, fitted)["hybrid"]
    # With public weights (DP, meta-dp-rounds = 0, the default) the same choice is said as an average.
    public = _stacking_fallback(RunState(run_id="r", meta_coef=[0.25, 0.25, 0.25, 0.25, 0.0]), pooled, 2,
                                margin_se=0.0, site_average_se=0.0, weights="public")
    assert public["model"] == "hybrid-without-logreg" and public["weights"] == "public"
    assert fallback_note({"meta": {"fallback": public}}).startswith(
        "the average without the logreg had a higher validation AUC")
    state.meta_fallback = public
    assert _model_roles(state, RunSettings())["hybrid"].startswith(
        "the base models below but the logreg, averaged with equal weights on their log-odds")
    # A margin the reduced stack does not clear sends the hybrid to the best base model instead.
    state = RunState(run_id="r", meta_coef=[0.4, 0.3, 0.2, 0.0, -0.1])
    fb = _stacking_fallback(state, pooled, 2, margin_se=50.0, site_average_se=0.0)
    assert fb["model"] in ("cnn", "forest") and state.meta_coef[2] == 0.0
    assert "the best stack, the one without the logreg, reached a validation AUC of" in \
        fallback_note({"meta": {"fallback": fb}})
    state.meta_fallback = fb
    assert _model_roles(state, fitted)["hybrid"].startswith(f"the {fb['model']} below (stacking fallback")
    # Both shared models noise, the site's own two good: the stack of the site models wins.
    c = (y - 0.5) + rng.normal(0, 0.9, 600)
    pooled = {"hybrid": stats(b + c + 2 * noise), "cnn": stats(noise), "forest": stats(b), "logreg": stats(noise),
              "site-logreg": stats(c), "hybrid-without-cnn": stats(b + c + noise),
              "hybrid-without-forest": stats(c + 2 * noise), "hybrid-without-logreg": stats(b + c + noise),
              "hybrid-without-site-logreg": stats(b + 2 * noise), "hybrid-without-cnn-logreg": stats(b + c)}
    # Its two models are averaged with equal weights, not kept at their fitted 0.1 and 0.3 (estimated
    # beside the noise): weight 1/2 each and no intercept, whatever the fitted total (here 1.4).
    state = RunState(run_id="r", meta_coef=[0.6, 0.1, 0.4, 0.3, -0.1])
    fb = _stacking_fallback(state, pooled, 2, margin_se=0.0, site_average_se=0.0)
    assert fb["model"] == "hybrid-without-cnn-logreg"
    np.testing.assert_allclose(state.meta_coef, [0.0, 0.5, 0.0, 0.5, 0.0])
    note = fallback_note({"meta": {"fallback": fb}})
    assert "the stack without the cnn and the logreg had a higher validation AUC" in note
    assert "with the weights of the cnn and the logreg set to zero and the others averaged with equal weights" in note
    state.meta_fallback = fb
    assert ("but the cnn and the logreg (their weights set to zero, the others averaged with equal weights: the "
            "stack without them won") in _model_roles(state, fitted)["hybrid"]


def test_the_stack_falls_back_to_a_better_base_model_on_validation() -> None:
    from common.metrics import compute_stats
    from common.stack import BASE_MODELS
    from server.phases import RunState, _stacking_fallback

    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 400)
    good = np.clip(0.5 + 0.3 * (y - 0.5) + rng.normal(0, 0.2, 400), 0.01, 0.99)
    noise = rng.uniform(0.01, 0.99, 400)

    def stats(p: np.ndarray):
        return compute_stats(y, np.column_stack([1 - p, p]), n_classes=2, n_bins=32)

    better = np.clip(good + 0.15 * (y - 0.5), 0.01, 0.99)
    pooled = {"hybrid": stats(0.5 * good + 0.5 * noise), "cnn": stats(noise), "forest": stats(good),
              "logreg": stats(rng.uniform(0.01, 0.99, 400)), "site-logreg": stats(rng.uniform(0.01, 0.99, 400))}
    state = RunState(run_id="r", meta_coef=[0.3, 0.3, 0.3, 0.3, 0.0])
    fb = _stacking_fallback(state, pooled, 2, margin_se=1.0, site_average_se=0.0)
    assert fb["model"] == "forest" and fb["validation_auc"]["hybrid"] < fb["validation_auc"]["forest"]
    assert state.meta_coef == [0.0, 1.0, 0.0, 0.0, 0.0] and BASE_MODELS.index("forest") == 1
    # As good as the best base model is not enough: the stack must beat it by a standard error ...
    pooled["hybrid"] = stats(good)
    state = RunState(run_id="r", meta_coef=[0.3, 0.3, 0.3, 0.3, 0.0])
    fb = _stacking_fallback(state, pooled, 2, margin_se=1.0, site_average_se=0.0)
    assert fb["chosen"] == "forest" and state.meta_coef[1] == 1.0
    # ... and a stack that does keeps its fit.
    pooled["hybrid"] = stats(better)
    state = RunState(run_id="r", meta_coef=[0.3, 0.3, 0.3, 0.3, 0.0])
    fb = _stacking_fallback(state, pooled, 2, margin_se=1.0, site_average_se=0.0)
    assert fb["model"] == "" and fb["validation_auc"]["hybrid"] > fb["validation_auc"]["forest"] + fb["margin"] > 0
    assert fb["chosen"] == "hybrid"
    assert state.meta_coef == [0.3, 0.3, 0.3, 0.3, 0.0]
    # With stack-forest = false the site's own models are no candidates: the stack beats the rest and keeps its fit.
    pooled["hybrid"] = stats(0.5 * good + 0.5 * noise)
    state = RunState(run_id="r", meta_coef=[0.3, 0.0, 0.3, 0.0, 0.0])
    fb = _stacking_fallback(state, pooled, 2, margin_se=1.0, site_average_se=0.0, candidates=("cnn", "logreg"))
    assert fb["best_base"] in ("cnn", "logreg") and fb["model"] != "forest"


def test_a_site_model_that_barely_leads_gives_way_to_the_site_models_averaged() -> None:
    """Where the hybrid would fall back to the forest, it becomes the forest and the site GLM
    averaged unless the forest leads that average by more than site-average-margin standard
    errors; a shared model that leads is kept, and with no margin any lead keeps the forest."""
    from common.settings import RunSettings
    from server.phases import RunState, _stacking_fallback
    from server.report import _model_roles, fallback_note

    rng = np.random.default_rng(7)
    y = rng.integers(0, 2, 400)
    b, c, noise = (y - 0.5) + rng.normal(0, 0.8, 400), (y - 0.5) + rng.normal(0, 1.2, 400), rng.normal(0, 3, 400)

    stats = functools.partial(_log_odds_stats, y)

    def pooled_with(average: np.ndarray) -> dict:
        return {"hybrid": stats(b + noise), "cnn": stats(noise), "forest": stats(b), "logreg": stats(noise),
                "site-logreg": stats(c), "hybrid-without-cnn": stats(b + noise),
                "hybrid-without-forest": stats(c + noise), "hybrid-without-logreg": stats(b + noise),
                "hybrid-without-site-logreg": stats(b + noise), "hybrid-without-cnn-logreg": stats(average)}

    close = pooled_with(b + 0.1 * noise)  # 0.008 below the forest, under half its standard error (0.021)
    state = RunState(run_id="r", meta_coef=[0.4, 0.1, 0.2, 0.3, -0.1])
    fb = _stacking_fallback(state, close, 2, margin_se=0.0, site_average_se=0.5)
    auc = fb["validation_auc"]
    assert fb["best_base"] == "forest" and 0 < auc["forest"] - auc["hybrid-without-cnn-logreg"] <= fb["site_average_margin"]
    assert fb["model"] == fb["chosen"] == "hybrid-without-cnn-logreg" and fb["reason"] == "site-average"
    np.testing.assert_allclose(state.meta_coef, [0.0, 0.5, 0.0, 0.5, 0.0])
    assert fb["site_average_margin"] == pytest.approx(0.5 * fb["standard_error"])
    note = fallback_note({"meta": {"fallback": fb}})
    assert "did not lead the site's own forest and GLM averaged with equal weights" in note
    assert "won on validation" not in note
    state.meta_fallback = fb
    assert _model_roles(state, RunSettings())["hybrid"].startswith("the site's own forest and GLM averaged")
    # Without a margin the same lead keeps the forest.
    state = RunState(run_id="r", meta_coef=[0.4, 0.1, 0.2, 0.3, -0.1])
    assert _stacking_fallback(state, close, 2, margin_se=0.0, site_average_se=0.0)["chosen"] == "forest"
    # A forest far ahead of the average (a site GLM at chance) stays the hybrid.
    state = RunState(run_id="r", meta_coef=[0.4, 0.1, 0.2, 0.3, -0.1])
    far = _stacking_fallback(state, pooled_with(b + 3 * noise), 2, margin_se=0.0, site_average_se=0.5)
    assert far["chosen"] == "forest" and "reason" not in far and state.meta_coef == [0.0, 1.0, 0.0, 0.0, 0.0]
    # A shared model that leads is not replaced by the site models' average.
    shared = pooled_with(b + 0.1 * noise)
    shared["cnn"] = stats(3 * b)
    state = RunState(run_id="r", meta_coef=[0.4, 0.1, 0.2, 0.3, -0.1])
    fb = _stacking_fallback(state, shared, 2, margin_se=0.0, site_average_se=100.0)
    assert fb["best_base"] == "cnn" and fb["chosen"] == "cnn"


def test_a_multiclass_stack_falls_back_on_its_macro_auc() -> None:
    """Three classes: the stack is judged on the macro one-vs-rest AUC of the summed validation
    statistics, and falling back selects the best model's evidence for every class."""
    from common.meta import selection_coef
    from common.metrics import auc_standard_error, compute_stats, metrics_from_stats
    from server.phases import RunState, _stacking_fallback

    rng = np.random.default_rng(5)
    y = rng.integers(0, 3, 600)

    def proba(signal: float) -> np.ndarray:
        logits = signal * np.eye(3)[y] + rng.normal(0, 1, (600, 3))
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    pooled = {name: compute_stats(y, proba(s), n_classes=3, n_bins=32)
              for name, s in (("hybrid", 0.8), ("cnn", 0.2), ("forest", 2.0), ("logreg", 1.0), ("site-logreg", 0.5))}
    se = auc_standard_error(pooled["forest"])
    assert 0.005 < se < 0.05
    state = RunState(run_id="r", meta_coef=[0.1] * 39)
    fb = _stacking_fallback(state, pooled, 3, margin_se=1.0, site_average_se=0.0)
    assert fb["model"] == "forest" and fb["margin"] == se
    assert fb["validation_auc"]["forest"] == metrics_from_stats(pooled["forest"])["auc"]
    np.testing.assert_array_equal(state.meta_coef, selection_coef(n_models=4, n_classes=3, index=1))
    pooled["hybrid"] = compute_stats(y, proba(4.0), n_classes=3, n_bins=32)
    state = RunState(run_id="r", meta_coef=[0.1] * 39)
    fb = _stacking_fallback(state, pooled, 3, margin_se=1.0, site_average_se=0.0)
    assert fb["model"] == "" and state.meta_coef == [0.1] * 39


def test_the_multiclass_auc_standard_error_bounds_the_bootstrap() -> None:
    """The mean of the per-class errors is at least the macro AUC's bootstrap spread, and not
    wildly above it (the classes' AUCs are positively correlated)."""
    import sklearn.metrics as skm

    from common.metrics import auc_standard_error, compute_stats

    rng = np.random.default_rng(8)
    n = 450
    y = rng.integers(0, 3, n)
    logits = 1.0 * np.eye(3)[y] + rng.normal(0, 1, (n, 3))
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    se = auc_standard_error(compute_stats(y, p, n_classes=3))
    boot = []
    for _ in range(300):
        i = rng.integers(0, n, n)
        boot.append(skm.roc_auc_score(y[i], p[i], multi_class="ovr", average="macro"))
    assert np.std(boot) * 0.9 <= se <= 2.5 * np.std(boot)


def test_the_fallback_margin_is_counted_in_standard_errors() -> None:
    from common.metrics import auc_standard_error, compute_stats
    from server.phases import RunState, _stacking_fallback

    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 400)
    good = np.clip(0.5 + 0.3 * (y - 0.5) + rng.normal(0, 0.2, 400), 0.01, 0.99)

    def stats(p: np.ndarray):
        return compute_stats(y, np.column_stack([1 - p, p]), n_classes=2, n_bins=32)

    pooled = {"hybrid": stats(np.clip(good + 0.04 * (y - 0.5), 0.01, 0.99)), "cnn": stats(rng.uniform(size=400)),
              "forest": stats(good), "logreg": stats(rng.uniform(size=400)), "site-logreg": stats(rng.uniform(size=400))}
    se = auc_standard_error(pooled["forest"])
    decided = {}
    for margin_se in (0.0, 0.5, 1.0, 2.0):
        fb = _stacking_fallback(RunState(run_id="r", meta_coef=[0.3] * 5), pooled, 2, margin_se=margin_se,
                                site_average_se=0.0)
        assert fb["margin"] == pytest.approx(margin_se * se) and fb["margin_se"] == margin_se
        assert fb["standard_error"] == se
        lead = fb["validation_auc"]["hybrid"] - fb["validation_auc"]["forest"]
        decided[margin_se] = fb["model"]
        assert (fb["model"] == "") == (lead > margin_se * se)
    assert decided[0.0] == "" and decided[2.0] == "forest"  # the stack leads, by less than two errors


def test_the_fallback_note_states_the_margin_it_was_decided_on() -> None:
    from server.report import fallback_note

    fb = {"validation_auc": {"hybrid": 0.69, "forest": 0.70}, "best_base": "forest", "model": "forest",
          "standard_error": 0.03, "margin": 0.0, "margin_se": 0.0}
    note = fallback_note({"meta": {"fallback": fb}})
    assert "did not beat the forest's (0.700), so the hybrid is the forest" in note and "more than" not in note
    note = fallback_note({"meta": {"fallback": {**fb, "margin": 0.03, "margin_se": 1.0}}})
    assert "by more than its standard error (0.030)" in note
    assert fallback_note({"meta": {"fallback": {**fb, "model": ""}}}) == ""


def test_an_unconverged_fit_is_said_in_metrics_md_and_why_under_dp() -> None:
    """Item 8 of issue 9: converged false is shown, not only stored; under DP the sentence says the
    rounds were fixed by the budget (no objective released), not that the solver ran out of them."""
    from server.report import convergence_notes

    doc = {"glm": {"rounds": 8, "converged": True, "noised": False},
           "meta": {"rounds": 8, "converged": False, "noised": False}}
    assert convergence_notes(doc) == ["the meta-classifier did not converge in 8 Newton rounds (converged: false); "
                                      "its coefficients are the last iterate."]
    doc = {"glm": {"rounds": 1, "converged": False, "noised": True},
           "meta": {"rounds": 3, "converged": False, "noised": True}}
    glm, meta = convergence_notes(doc)
    assert glm.startswith("under DP the GLM takes 1 Newton round(s) on noised statistics")
    assert "meta-classifier takes 3" in meta and "convergence is not judged (converged: false)" in meta
    assert convergence_notes({"meta": {"rounds": 4, "converged": True, "noised": False}}) == []


@pytest.mark.parametrize("k", [2, 3])
def test_a_warm_start_worse_than_its_origin_gives_way_to_the_newton_step(k: int) -> None:
    """Sound local fits are taken as the warm start; wild ones (nearly separable sites extrapolate)
    are evaluated once, rejected, and the plain Newton step from the origin replaces them. Either
    way the solver reaches the pooled fit."""
    from common.meta import newton_terms

    rng = np.random.default_rng(7)
    x = rng.normal(size=(300, 3))
    y = (x @ np.array([1.0, -0.5, 0.3]) + rng.normal(size=300) > 0).astype(int) if k == 2 else \
        np.argmax(x + rng.normal(size=(300, 3)), axis=1)
    parts = np.array_split(np.arange(300), 3)
    ref = NewtonSolver(n_features=3, n_classes=k, C=1.0)
    for _ in range(30):
        ref.step(newton_terms(ref.coef, x, y, n_classes=k))
    pooled = ref.result()

    def total(coef: np.ndarray):
        return newton_terms(coef, x, y, n_classes=k)

    local = [NewtonSolver(n_features=3, n_classes=k, C=1.0) for _ in parts]
    for s, idx in zip(local, parts):
        for _ in range(30):
            s.step(newton_terms(s.coef, x[idx], y[idx], n_classes=k))
    coefs = [s.result() for s in local]
    hessians = [newton_terms(c, x[idx], y[idx], n_classes=k).hess for c, idx in zip(coefs, parts)]
    for scale, accepted in ((1.0, True), (60.0, False)):
        solver = NewtonSolver(n_features=3, n_classes=k, C=1.0)
        origin = solver.coef.copy()
        proposal = solver.warm_start(total(solver.coef), [scale * c for c in coefs], hessians)
        newton = solver.fallback.copy()
        after = solver.step(total(proposal))
        if accepted:
            np.testing.assert_array_equal(solver.best_coef, proposal)
        else:
            np.testing.assert_array_equal(solver.best_coef, origin)
            np.testing.assert_allclose(after, origin + newton)
        for _ in range(30):
            if solver.converged:
                break
            solver.step(total(solver.coef))
        np.testing.assert_allclose(solver.result(), pooled, atol=1e-4)
    # The guard survives a checkpoint between the proposal and its evaluation.
    solver = NewtonSolver(n_features=3, n_classes=k, C=1.0)
    solver.warm_start(total(solver.coef), [60.0 * c for c in coefs], hessians)
    restored = NewtonSolver(n_features=3, n_classes=k, C=1.0)
    restored.load_state_dict(solver.state_dict())
    np.testing.assert_array_equal(restored.step(total(restored.coef)), solver.step(total(solver.coef)))


@pytest.mark.parametrize("k", [2, 3])
def test_a_fixed_model_keeps_exactly_zero_weight_and_the_rest_is_the_fit_without_it(k: int) -> None:
    """``fixed`` (stack-forest = false): the left-out model's weights stay exactly 0, even on noised
    terms, and the others reach the pooled fit on the other models' features alone."""
    from common.meta import model_mask, without_model_features

    x, y = _scores(5, 1500, k)
    cols = 1 if k == 2 else k
    x3 = np.hstack([x, np.random.default_rng(1).normal(size=(len(y), cols))])  # a third "model"
    fixed = model_mask(n_models=3, n_classes=k, index=1)
    xs = without_model_features(x3, n_models=3, n_classes=k, index=1)
    solver = NewtonSolver(n_features=x3.shape[1], n_classes=k, penalty="l2", C=0.5, fixed=fixed)
    rng = np.random.default_rng(0)
    for _ in range(30):
        t = newton_terms(solver.coef, xs, y, n_classes=k)
        t.grad = t.grad + rng.normal(0, 1e-3, t.grad.shape)  # noised terms move every coordinate
        solver.step(t)
        assert np.all(solver.coef[fixed] == 0.0)
        if solver.converged:
            break
    keep = np.r_[0:cols, 2 * cols:3 * cols]
    pooled = StackingMetaClassifier(penalty="l2", C=0.5, positive=False).fit(x3[:, keep], y)
    got = StackingMetaClassifier().set_coef(solver.result(), n_features=x3.shape[1]).coef_
    np.testing.assert_allclose(np.delete(got, np.r_[cols:2 * cols], axis=-1), pooled.coef_, atol=1e-3)


@pytest.mark.parametrize("k", [2, 3])
def test_leaving_out_several_models_is_leaving_out_each(k: int) -> None:
    """stack-forest = false leaves out both site-local models: a sequence of indices zeroes exactly
    the union of what each index alone zeroes (weights, features, mask)."""
    from common.meta import model_mask, n_params, without_model, without_model_features
    from common.stack import BASE_MODELS, LOCAL_MODELS, local_indices

    n = len(BASE_MODELS)
    both = local_indices(stack_local=False)
    assert [BASE_MODELS[i] for i in both] == list(LOCAL_MODELS) and local_indices(stack_local=True) == ()
    rng = np.random.default_rng(3)
    coef = rng.normal(size=n_params(n * (1 if k == 2 else k), k))
    x = rng.normal(size=(7, n * (1 if k == 2 else k)))
    one_by_one, features = coef, x
    for i in both:
        one_by_one = without_model(one_by_one, n_models=n, n_classes=k, index=i)
        features = without_model_features(features, n_models=n, n_classes=k, index=i)
    np.testing.assert_array_equal(without_model(coef, n_models=n, n_classes=k, index=both), one_by_one)
    np.testing.assert_array_equal(without_model_features(x, n_models=n, n_classes=k, index=both), features)
    mask = model_mask(n_models=n, n_classes=k, index=both)
    assert np.array_equal(mask, (one_by_one == 0.0) & (coef != 0.0)) and 0 < mask.sum() < len(coef)


@pytest.mark.parametrize("stack_local", [True, False])
def test_a_run_releases_only_the_reduced_stacks_that_differ_from_the_hybrid_and_keep_a_model(stack_local: bool) -> None:
    """A reduced stack equal to the fitted stack (it leaves out only models the hybrid does not read)
    or with every weight at zero would add noise to the validation release and tell nothing."""
    from common.meta import n_params, without_model
    from common.stack import BASE_MODELS, REDUCED_STACKS, local_indices, reduced_stacks, released_models

    n, k = len(BASE_MODELS), 2
    coef = without_model(np.random.default_rng(5).normal(size=n_params(n, k)), n_models=n, n_classes=k,
                         index=local_indices(stack_local=stack_local))
    kept = reduced_stacks(stack_local=stack_local)
    for name, left_out in REDUCED_STACKS.items():
        reduced = without_model(coef, n_models=n, n_classes=k, index=[BASE_MODELS.index(m) for m in left_out])
        informative = not np.array_equal(reduced, coef) and np.any(reduced[:n] != 0.0)
        assert (name in kept) == informative, name
    assert len(kept) == (5 if stack_local else 2)
    validation = released_models(site_alone=False, split="validation", stack_local=stack_local)
    assert set(validation) - set(released_models(site_alone=False)) == set(kept)


@pytest.mark.parametrize("k", [2, 3])
def test_a_reduced_stack_ranks_as_the_zeroed_one_and_keeps_the_full_stacks_spread(k: int) -> None:
    """Scaling the kept weights up changes no ranking, and keeps a stack of two of four models near
    the averaging prior from squeezing its scores into a few released bins."""
    from common.meta import StackingMetaClassifier, averaging_prior, n_params, reduced_stack_coef, without_model

    n, w = 4, 1 if k == 2 else k
    rng = np.random.default_rng(k)
    x = rng.normal(size=(400, n * w))
    coef = averaging_prior(n_models=n, n_classes=k) + rng.normal(0, 0.02, size=n_params(n * w, k))
    zeroed = without_model(coef, n_models=n, n_classes=k, index=[0, 2])
    scaled = reduced_stack_coef(coef, n_models=n, n_classes=k, index=[0, 2])
    assert np.all((scaled == 0.0) == (zeroed == 0.0))

    def scores(c: np.ndarray) -> np.ndarray:
        return StackingMetaClassifier().set_coef(c, n_features=x.shape[1]).decision_function(x)

    if k == 2:
        assert np.array_equal(np.argsort(scores(zeroed) - zeroed[-1]), np.argsort(scores(scaled) - scaled[-1]))
        assert scores(scaled).std() > 1.7 * scores(zeroed).std()
    rows = scaled.reshape(w, -1)[:, :-1]
    np.testing.assert_allclose(np.abs(rows).sum(axis=1), np.abs(coef.reshape(w, -1)[:, :-1]).sum(axis=1))


@pytest.mark.parametrize("k", [2, 3])
def test_the_averaged_stack_is_the_plain_average_of_the_site_models(k: int) -> None:
    """The stack without both shared models averages the site's two: weight 1/2 on each one's own
    evidence, nothing on the others, no intercept, whatever was fitted (the scale of one site model
    selected alone); the site and the coordinator build the same coefficients by name."""
    from common.meta import n_params, selection_coef
    from common.stack import BASE_MODELS, reduced_stack_weights

    n, w = 4, 1 if k == 2 else k
    coef = np.random.default_rng(k).normal(size=n_params(n * w, k))
    averaged = reduced_stack_weights("hybrid-without-cnn-logreg", coef, n_classes=k)
    halves = 0.5 * sum(selection_coef(n_models=n, n_classes=k, index=BASE_MODELS.index(m))
                       for m in ("forest", "site-logreg"))
    np.testing.assert_array_equal(averaged, halves)
    np.testing.assert_array_equal(averaged, reduced_stack_weights("hybrid-without-cnn-logreg", 3 * coef, n_classes=k))
    assert not np.allclose(reduced_stack_weights("hybrid-without-cnn", coef, n_classes=k), averaged)


@pytest.mark.parametrize("k", [2, 4])
def test_the_newton_direction_is_the_least_norm_solution_of_the_penalized_system(k: int) -> None:
    """One LU solve with the multinomial intercepts' null direction added gives what least squares
    gives, on the singular Hessian of a penalized multinomial model too."""
    from common.meta import newton_direction

    rng = np.random.default_rng(k)
    x = rng.normal(size=(300, 6))
    y = rng.integers(0, k, size=300)
    solver = NewtonSolver(n_features=6, n_classes=k, C=0.5)
    solver.coef = rng.normal(scale=0.3, size=solver.coef.shape)
    _, grad, hess = solver.objective(newton_terms(solver.coef, x, y, n_classes=k))
    free = np.ones(solver.coef.shape[0], dtype=bool)
    null = solver._null_direction(free)
    if k == 2:
        assert null is None
    else:  # the one direction the penalized multinomial Hessian does not see
        assert np.linalg.matrix_rank(hess) == hess.shape[0] - 1
        np.testing.assert_allclose(hess @ null, 0.0, atol=1e-9)
    expected = np.linalg.lstsq(hess, grad, rcond=None)[0]
    np.testing.assert_allclose(newton_direction(hess, grad, null=null), expected, rtol=1e-8, atol=1e-10)


def test_the_newton_direction_falls_back_to_least_squares_when_the_null_direction_is_wrong() -> None:
    from common.meta import newton_direction

    rng = np.random.default_rng(0)
    a = rng.normal(size=(5, 3))
    hess = a @ a.T  # rank 3: two null directions, not one
    grad = hess @ rng.normal(size=5)
    wrong = np.eye(5)[0]
    expected = np.linalg.lstsq(hess, grad, rcond=None)[0]
    np.testing.assert_allclose(newton_direction(hess, grad, null=wrong), expected, rtol=1e-8, atol=1e-10)
