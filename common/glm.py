"""The federated GLM: penalized logistic (multinomial) regression on the shared tabular features.

It is the "traditional" baseline (the classical polygenic-score style model) and the third base
model of the stack. Its inputs are the shared columns of :mod:`common.tabular`, imputed,
standardized and clipped with the one :class:`~common.tabular.SharedScaler` every site uses, so
one record's design row is bounded (``|x_j| <= CLIP``), which is what its DP release needs.

It is fitted like the meta-classifier: the sites send the gradient and Hessian of their log-loss
at the coordinator's coefficients (:func:`common.meta.newton_terms`), the coordinator takes
Newton steps on their sum (:class:`common.meta.NewtonSolver`), and without noise the result is
the pooled fit.
"""

from __future__ import annotations

from typing import Literal

from common.meta import NewtonLogisticRegression, n_params
from common.tabular import CLIP

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
