"""DP for the meta-classifier's Newton statistics: sensitivity bounds, noise scale, safe solving.

The Gaussian mechanism is only as private as its sensitivity bound: the property tests check that
adding one record (any features within the clipping bound, any label, any coefficients) never
moves the gradient or the Hessian further than :func:`common.meta.statistic_bounds` says.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from client.privacy.mechanisms import meta_noise_multiplier, private_newton_terms
from common.meta import META_FEATURE_BOUND, nearest_positive_definite, newton_terms, statistic_bounds

B = META_FEATURE_BOUND


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n_classes=st.sampled_from([2, 3, 5]), n=st.integers(1, 30),
       scale=st.floats(0.0, 50.0))
def test_one_record_moves_the_statistics_at_most_by_the_bounds(seed: int, n_classes: int, n: int,
                                                               scale: float) -> None:
    rng = np.random.default_rng(seed)
    n_features = 2 if n_classes == 2 else 2 * n_classes
    x = rng.uniform(-B, B, size=(n + 1, n_features))
    x[-1] = rng.choice([-B, B], size=n_features)  # the added record sits on the worst corner
    y = rng.integers(0, n_classes, size=n + 1)
    dim = (n_features + 1) * (1 if n_classes == 2 else n_classes)
    coef = rng.normal(0.0, scale, size=dim)
    with_record = newton_terms(coef, x, y, n_classes=n_classes)
    without = newton_terms(coef, x[:-1], y[:-1], n_classes=n_classes)
    g_bound, h_bound = statistic_bounds(n_features=n_features, n_classes=n_classes, bound=B)
    assert np.linalg.norm(with_record.grad - without.grad) <= g_bound * (1 + 1e-9)
    assert np.linalg.norm(np.triu(with_record.hess - without.hess)) <= h_bound * (1 + 1e-9)


def test_features_beyond_the_bound_are_clipped_before_the_statistics() -> None:
    x = np.array([[100.0, -100.0], [0.5, 0.2]])
    y = np.array([1, 0])
    coef = np.array([0.3, -0.2, 0.1])
    noisy = private_newton_terms(coef, x, y, n_classes=2, bound=B, noise_multiplier=1e-12,
                                 rng=np.random.default_rng(0))
    exact = newton_terms(coef, np.clip(x, -B, B), y, n_classes=2)
    np.testing.assert_allclose(noisy.grad, exact.grad, atol=1e-6)
    np.testing.assert_allclose(noisy.hess, exact.hess, atol=1e-6)
    assert math.isnan(noisy.loss) and noisy.n == 2


def test_noise_has_the_calibrated_scale_and_keeps_the_hessian_symmetric() -> None:
    rng = np.random.default_rng(1)
    x, y = rng.uniform(-B, B, size=(50, 2)), rng.integers(0, 2, size=50)
    coef = np.zeros(3)
    exact = newton_terms(coef, x, y, n_classes=2)
    sigma = 0.7
    g_bound, h_bound = statistic_bounds(n_features=2, n_classes=2, bound=B)
    draws = [private_newton_terms(coef, x, y, n_classes=2, bound=B, noise_multiplier=sigma, rng=rng)
             for _ in range(3000)]
    grad_noise = np.stack([d.grad - exact.grad for d in draws])
    hess_noise = np.stack([d.hess - exact.hess for d in draws])
    assert grad_noise.std(axis=0) == pytest.approx([sigma * math.sqrt(2) * g_bound] * 3, rel=0.06)
    assert hess_noise.std(axis=0).ravel() == pytest.approx([sigma * math.sqrt(2) * h_bound] * 9, rel=0.06)
    assert all(np.array_equal(d.hess, d.hess.T) for d in draws[:20])


def test_noise_multiplier_spends_the_meta_epsilon_over_the_rounds() -> None:
    from client.privacy.ledger import gaussian_noise_multiplier

    one = meta_noise_multiplier(epsilon=1.0, delta=1e-5, rounds=1)
    three = meta_noise_multiplier(epsilon=1.0, delta=1e-5, rounds=3)
    assert three > one > 0
    assert three == pytest.approx(gaussian_noise_multiplier(epsilon=1.0, delta=1e-5, count=3))


def test_nearest_positive_definite_floors_the_spectrum_and_keeps_a_good_matrix() -> None:
    rng = np.random.default_rng(2)
    a = rng.normal(size=(4, 4))
    indefinite = a + a.T
    fixed = nearest_positive_definite(indefinite, floor=0.5)
    assert np.linalg.eigvalsh(fixed).min() >= 0.5 - 1e-9
    good = a @ a.T + 10 * np.eye(4)
    np.testing.assert_allclose(nearest_positive_definite(good, floor=0.5), good, atol=1e-9)


@pytest.mark.parametrize("n_classes", [2, 3, 4])
def test_averaging_prior_predicts_the_mean_of_the_base_models_evidence(n_classes: int) -> None:
    from common.meta import StackingMetaClassifier, averaging_prior

    rng = np.random.default_rng(3)
    p_a, p_b = rng.dirichlet(np.ones(n_classes), size=20), rng.dirichlet(np.ones(n_classes), size=20)
    from client.pipeline import meta_features

    x = meta_features(p_a, p_b)
    model = StackingMetaClassifier().set_coef(averaging_prior(n_models=2, n_classes=n_classes), n_features=x.shape[1])
    if n_classes == 2:
        expected = (x[:, 0] + x[:, 1]) / 2
        np.testing.assert_allclose(model.decision_function(x), expected)
    else:
        expected = (x[:, :n_classes] + x[:, n_classes:]) / 2
        np.testing.assert_allclose(model.decision_function(x), expected)
