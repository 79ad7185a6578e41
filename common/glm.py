"""The federated GLM: penalized logistic (multinomial) regression on the shared tabular features.

It is the "traditional" baseline (the classical polygenic-score style model) and the third base
model of the stack. Its inputs are the shared columns of :mod:`common.tabular`, imputed,
standardized and clipped with the one :class:`~common.tabular.SharedScaler` every site uses, so
one record's design row is bounded (``|x_j| <= CLIP``), which is what its DP release needs.

Without DP it is fitted like the meta-classifier: the sites send the gradient and Hessian of
their log-loss at the coordinator's coefficients (:func:`common.meta.newton_terms`), the
coordinator takes Newton steps on their sum (:class:`common.meta.NewtonSolver`), and the result
is the pooled fit.

Under DP a released Hessian is noise: its sensitivity grows with the square of the row bound
(``d``), its signal only with the site's size, and at a few hundred records a site and 100-odd
columns the noise swamps it. So under DP the sites release one noised gradient at zero
(sensitivity :func:`gradient_bound`), and the coordinator takes one step with a public curvature
in place of the Hessian (:func:`public_curvature`: Boehning's bound with ``X'X = n I``, which the
shared standardization makes true on the diagonal). The result is a ridge-shrunk score of the
columns' marginal associations with the label: the classical polygenic-score construction. Its
scale is not calibrated when columns are correlated; the meta-classifier and the threshold chosen
on validation data do not need it to be.

Of that step the coordinator keeps the ``glm-dp-max-features`` columns with the largest
coefficients and zeroes the rest (:func:`keep_largest`, post-processing: no privacy cost). The
released gradient covers every shared column, so the columns are chosen by their association
with the label, not by a label-blind criterion; most columns of a genomic panel carry no signal,
and keeping only the strongest discards their noise.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

from common.meta import NewtonLogisticRegression, n_params
from common.tabular import CLIP, glm_row_bound

GLM_FEATURE_BOUND = CLIP


class FederatedGLM(NewtonLogisticRegression):
    """Penalized logistic regression over the shared tabular features (scikit-learn contract).

    Parameters
    ----------
    penalty : "l2" or None
    C : inverse regularisation strength, as in scikit-learn (the objective sums the log-loss
        over records, so a fixed ``C`` regularises less as the federation grows).
    max_iter : Newton iterations at most (pooled fit).
    tol : convergence tolerance on the Newton decrement per record.
    """

    def __init__(self, *, penalty: Literal["l2"] | None = "l2", C: float = 0.1, max_iter: int = 100,
                 tol: float = 1e-10) -> None:
        super().__init__(penalty=penalty, C=C, max_iter=max_iter, tol=tol)


def glm_dim(n_features: int, n_classes: int) -> int:
    """Flat coefficient count of the GLM."""
    return n_params(n_features, max(n_classes, 2))


def gradient_bound(*, n_features: int, n_classes: int) -> float:
    """L2 bound of one record's contribution to the GLM's gradient.

    The record adds ``(p - e_y) (x) z`` with ``z = [x, 1]``, ``||x|| <=`` :func:`glm_row_bound`:
    at most ``||z||`` (binary, ``|p - y| <= 1``) or ``sqrt(2) ||z||`` (K classes).
    """
    z = math.sqrt(glm_row_bound(n_features) ** 2 + 1.0)
    return z if n_classes == 2 else math.sqrt(2.0) * z


def keep_largest(coef: np.ndarray, *, n_features: int, n_classes: int, keep: int) -> np.ndarray:
    """``coef`` with all but the ``keep`` columns of largest coefficients set to zero.

    A column's size is the L2 norm of its coefficients over the classes (one coefficient for a
    binary model); the intercepts are always kept. Ties keep the lower column index.
    """
    k = max(n_classes, 2)
    rows = np.asarray(coef, dtype=np.float64).reshape(1 if k == 2 else k, n_features + 1).copy()
    if keep < n_features:
        size = np.linalg.norm(rows[:, :n_features], axis=0)
        drop = np.argsort(-size, kind="stable")[keep:]
        rows[:, drop] = 0.0
    return rows.ravel()


def intercept_only(class_counts: np.ndarray, *, n_features: int, n_classes: int) -> np.ndarray:
    """Flat coefficients of the intercept-only model for ``class_counts`` (every weight zero).

    The DP GLM's one gradient is taken here rather than at zero: its residuals then sum to zero,
    so a column's gradient does not grow with how far the noised shared scaler missed its mean
    times the label's imbalance, which would make mis-centred columns look like strong ones. The
    counts are the census's (already released); half a record is added to each against log 0.
    """
    k = max(n_classes, 2)
    log_counts = np.log(np.asarray(class_counts, dtype=np.float64) + 0.5)
    rows = np.zeros((1 if k == 2 else k, n_features + 1))
    if k == 2:
        rows[0, -1] = log_counts[1] - log_counts[0]
    else:
        rows[:, -1] = log_counts - log_counts.mean()
    return rows.ravel()


def public_curvature(*, n: int, n_features: int, n_classes: int) -> np.ndarray:
    """Boehning's bound on the log-loss Hessian of ``n`` records with ``X'X`` replaced by ``n I``.

    Binary: ``n I / 4``; K classes: ``(I_K - 1 1' / K) / 2 (x) n I``. Computed by the coordinator
    from the records count alone (the census reports it), so the DP GLM releases no Hessian.
    """
    eye = float(n) * np.eye(n_features + 1)
    if n_classes == 2:
        return 0.25 * eye
    return np.kron(0.5 * (np.eye(n_classes) - 1.0 / n_classes), eye)
