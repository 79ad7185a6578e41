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
from dataclasses import dataclass

import numpy as np

C_GRID = (0.0003, 0.001, 0.003, 0.01, 0.03, 0.1)
"""The penalties a site chooses from (inverse strengths, as ``glm-c``). Measured on five layouts
(docs/learning.md), the sites' choices fell within 0.0003-0.03; the run's ``glm-c`` (0.1) ends it."""


@dataclass(frozen=True)
class PenaltyChoice:
    """The chosen ``c`` and its GLM's out-of-fold probabilities on the train split (over the classes
    of ``y``; None where folds could not be had and ``c`` is the default). The site's Platt map is
    fitted on these very predictions (:func:`client.calibration.site_model_maps`), so they are
    kept rather than refitted."""

    c: float
    oof_proba: np.ndarray | None


def select_site_glm_penalty(x: np.ndarray, y: np.ndarray, *, folds: int, seed: int, default: float) -> PenaltyChoice:
    """The ``C`` of :data:`C_GRID` with the lowest out-of-fold log-loss on ``(x, y)``, with its
    out-of-fold probabilities.

    ``default`` where out-of-fold predictions cannot be had (a class with fewer records than two
    folds need, or a single class). Ties keep the stronger penalty (the smaller ``C``).
    """
    from sklearn.metrics import log_loss

    from client.calibration import out_of_fold_proba
    from common.glm import FederatedGLM

    best = PenaltyChoice(c=default, oof_proba=None)
    best_loss = np.inf
    for c in C_GRID:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a fold's GLM that does not converge still gives probabilities
            oof = out_of_fold_proba(lambda a, b, c=c: FederatedGLM(C=c).fit(a, b), x, y, folds=folds, seed=seed)
        if oof is None:
            return PenaltyChoice(c=default, oof_proba=None)
        # A fold that never saw a class gives it probability 0: log_loss clips it.
        loss = log_loss(y, oof, labels=np.unique(y))
        if loss < best_loss:
            best_loss, best = loss, PenaltyChoice(c=c, oof_proba=oof)
    return best


def choose_site_glm_c(x: np.ndarray, y: np.ndarray, *, folds: int, seed: int, default: float) -> float:
    """The ``C`` of :func:`select_site_glm_penalty`."""
    return select_site_glm_penalty(x, y, folds=folds, seed=seed, default=default).c
