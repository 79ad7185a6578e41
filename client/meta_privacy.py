"""Differential privacy for the meta-classifier's Newton statistics: the Gaussian mechanism.

Under DP a site releases, in every meta round, the gradient and Hessian of its unpenalised
log-loss at the coordinator's coefficients (:func:`common.meta.newton_terms`) with Gaussian noise
added, and charges that release to its privacy ledger. The unit protected is one record added to
or removed from the site's validation split, as in the DP-SGD accounting.

Sensitivity
-----------
The meta features are base-model log-odds (or log-probabilities) clipped to ``[-B, B]``
(:data:`common.meta.META_FEATURE_BOUND`); they are clipped again here, so the bound holds by
construction. One record's design row ``z = [x, 1]`` has ``||z||^2 <= d B^2 + 1`` and adds

- to the gradient ``(p - e_y) (x) z``: L2 norm at most ``||z||`` (binary, ``|p - y| <= 1``) or
  ``sqrt(2) ||z||`` (K classes, ``||p - e_y|| <= sqrt(2)``);
- to the Hessian ``p (1 - p) z z^T`` (binary: Frobenius norm at most ``||z||^2 / 4``) or
  ``(diag(p) - p p^T) (x) z z^T`` (K classes: at most ``trace(diag(p) - p p^T) ||z||^2 <= ||z||^2``,
  the matrix being positive semi-definite).

Only the upper triangle of the symmetric Hessian is noised (the lower one is its mirror), and its
Frobenius norm is at most the whole matrix's. Dividing the gradient by its bound and the
triangle by its bound gives two blocks of sensitivity 1 each, hence a joint L2 sensitivity of
``sqrt(2)``: one Gaussian release with noise multiplier ``sigma`` adds noise of standard deviation
``sigma * sqrt(2) * bound`` to every entry of each block.

The log-loss itself is not released (its sensitivity grows with the coefficients), so the
coordinator takes plain Newton steps; the count ``n`` is the validation size the census already
reported.
"""

from __future__ import annotations

import math

import numpy as np

from common.meta import NewtonTerms, newton_terms, statistic_bounds


def meta_noise_multiplier(*, epsilon: float, delta: float, rounds: int) -> float:
    """Noise multiplier for ``rounds`` releases that together spend ``epsilon`` at ``delta``."""
    from client.ledger import gaussian_noise_multiplier

    return gaussian_noise_multiplier(epsilon=epsilon, delta=delta, count=rounds)


def private_newton_terms(coef: np.ndarray, x: np.ndarray, y: np.ndarray, *, n_classes: int, bound: float,
                         noise_multiplier: float, rng: np.random.Generator) -> NewtonTerms:
    """Newton terms of clipped features with Gaussian noise; ``loss`` is NaN (not released).

    Parameters
    ----------
    coef : the coordinator's flat coefficients.
    x, y : meta features and labels of the site's validation split.
    n_classes : number of classes.
    bound : clipping bound of the features.
    noise_multiplier : the release's noise multiplier (charged to the ledger by the caller).
    rng : the noise source; seed it from a secret of the site, never from the run config.
    """
    x = np.clip(np.asarray(x, dtype=np.float64), -bound, bound)
    terms = newton_terms(coef, x, y, n_classes=n_classes)
    g_bound, h_bound = statistic_bounds(n_features=x.shape[1], n_classes=n_classes, bound=bound)
    scale = noise_multiplier * math.sqrt(2.0)
    grad = terms.grad + rng.normal(0.0, scale * g_bound, size=terms.grad.shape)
    upper = np.triu(rng.normal(0.0, scale * h_bound, size=terms.hess.shape))
    hess = terms.hess + upper + np.triu(upper, 1).T
    return NewtonTerms(float("nan"), grad, hess, terms.n)

