"""The Newton meta-classifier matches scikit-learn, pooled and from per-site sums."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from common.meta import NewtonSolver, StackingMetaClassifier, newton_terms


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
