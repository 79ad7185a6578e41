"""The site's own GLM: its L2 penalty chosen by cross-validation on the site's train split.

The objective sums the log-loss over records, so one fixed ``C`` regularises a site of 30 patients
far more than one of 1,000, and neither by what its data need. Each site therefore picks ``C`` from
a public grid by the out-of-fold log-loss of the GLM on its own train split (the folds its Platt
map uses, :mod:`client.calibration`), as a hospital alone would tune its model. Like the site GLM
itself, the choice is local, made without DP and never sent (docs/privacy.md); the federated GLM
keeps the run's ``glm-c``. docs/learning.md measures what it changes.
"""

from __future__ import annotations

import warnings

import numpy as np

C_GRID = (0.0003, 0.001, 0.003, 0.01, 0.03, 0.1)
"""The penalties a site chooses from (inverse strengths, as ``glm-c``). Measured on five layouts
(docs/learning.md), the sites' choices fell within 0.0003-0.03; the run's ``glm-c`` (0.1) ends it."""

_FLOOR = 1e-12


def choose_site_glm_c(x: np.ndarray, y: np.ndarray, *, folds: int, seed: int, default: float) -> float:
    """The ``C`` of :data:`C_GRID` with the lowest out-of-fold log-loss on ``(x, y)``.

    ``default`` where out-of-fold predictions cannot be had (a class with fewer records than two
    folds need, or a single class). Ties keep the stronger penalty (the smaller ``C``).
    """
    from client.calibration import out_of_fold_proba
    from common.glm import FederatedGLM

    _, y_idx = np.unique(y, return_inverse=True)
    best_loss, best_c = np.inf, default
    for c in C_GRID:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a fold's GLM that does not converge still gives probabilities
            oof = out_of_fold_proba(lambda a, b, c=c: FederatedGLM(C=c).fit(a, b), x, y, folds=folds, seed=seed)
        if oof is None:
            return default
        loss = _log_loss(oof, y_idx)
        if loss < best_loss:
            best_loss, best_c = loss, c
    return best_c


def _log_loss(proba: np.ndarray, y_idx: np.ndarray) -> float:
    """Mean log-loss; a fold that never saw a class gives it probability 0, floored here."""
    p = np.clip(proba, _FLOOR, None)
    p = p / p.sum(axis=1, keepdims=True)
    return float(-np.mean(np.log(p[np.arange(len(y_idx)), y_idx])))
