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
