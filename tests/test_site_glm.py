"""The site GLM's penalty, chosen by cross-validation on the site's own train split."""

from __future__ import annotations

import numpy as np

from client.site_glm import C_GRID, choose_site_glm_c, select_site_glm_penalty


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


def test_the_chosen_penalty_s_out_of_fold_predictions_are_the_platt_map_s() -> None:
    """The site's Platt map reads the choice's out-of-fold probabilities instead of refitting the
    folds: the map is the one a refit gives."""
    from client.calibration import out_of_fold_proba, site_model_maps
    from client.forest import SiteForest
    from common.glm import FederatedGLM

    x, y = _logistic(200, 20, 3, seed=5)
    choice = select_site_glm_penalty(x, y, folds=5, seed=7, default=0.1)
    fit = lambda a, b: FederatedGLM(C=choice.c).fit(a, b)  # noqa: E731
    np.testing.assert_array_equal(choice.oof_proba, out_of_fold_proba(fit, x, y, folds=5, seed=7))
    forest = SiteForest(n_estimators=20, random_state=0).fit(x, y)
    kept = site_model_maps(forest=forest, glm_fit=fit, x_glm=x, y=y, n_classes=2, folds=5, seed=7,
                           glm_oof=choice.oof_proba)
    refit = site_model_maps(forest=forest, glm_fit=fit, x_glm=x, y=y, n_classes=2, folds=5, seed=7)
    assert kept.keys() == refit.keys() == {"forest", "site-logreg"}
    for model in kept:
        for key, value in kept[model].items():
            np.testing.assert_array_equal(np.asarray(value), np.asarray(refit[model][key]))


def test_without_folds_the_choice_has_no_out_of_fold_predictions() -> None:
    x, y = _logistic(40, 5, 2, seed=4)
    choice = select_site_glm_penalty(x, np.zeros(40, dtype=int), folds=5, seed=0, default=0.07)
    assert choice.c == 0.07 and choice.oof_proba is None
