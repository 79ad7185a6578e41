"""The site GLM's penalty, chosen by cross-validation on the site's own train split."""

from __future__ import annotations

import numpy as np

from client.site_glm import C_GRID, choose_site_glm_c


def _logistic(n: int, d: int, informative: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    beta = np.zeros(d)
    beta[:informative] = 1.5
    y = (rng.random(n) < 1 / (1 + np.exp(-x @ beta))).astype(int)
    return x, y


def test_few_records_and_many_noise_columns_choose_a_strong_penalty() -> None:
    x, y = _logistic(100, 300, 2, seed=0)
    assert choose_site_glm_c(x, y, folds=5, seed=0, default=0.1) <= 0.003


def test_many_records_and_a_few_strong_columns_choose_a_weak_penalty() -> None:
    x, y = _logistic(3000, 5, 5, seed=1)
    assert choose_site_glm_c(x, y, folds=5, seed=0, default=0.1) >= 0.03


def test_the_choice_is_the_grid_point_with_the_lowest_out_of_fold_log_loss() -> None:
    from sklearn.metrics import log_loss

    from client.calibration import out_of_fold_proba
    from common.glm import FederatedGLM

    x, y = _logistic(150, 30, 3, seed=2)
    losses = [log_loss(y, out_of_fold_proba(lambda a, b, c=c: FederatedGLM(C=c).fit(a, b), x, y, folds=5, seed=3))
              for c in C_GRID]
    assert choose_site_glm_c(x, y, folds=5, seed=3, default=0.1) == C_GRID[int(np.argmin(losses))]


def test_a_site_without_folds_for_every_class_keeps_the_default() -> None:
    x, y = _logistic(40, 5, 2, seed=4)
    y[:] = 0
    y[0] = 1  # one case: no two folds can each hold one
    assert choose_site_glm_c(x, y, folds=5, seed=0, default=0.1) == 0.1
    assert choose_site_glm_c(x, np.zeros(40, dtype=int), folds=5, seed=0, default=0.07) == 0.07
