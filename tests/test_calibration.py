"""The site models' stacking scales (client/calibration.py): Platt's slope out of fold."""

from __future__ import annotations

import numpy as np
import pytest

from client.calibration import MAX_SCALE, out_of_fold_proba, site_model_scales, stacking_scale, stacking_scales
from common.stack import BASE_MODELS


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.mark.parametrize(("k", "slope"), [(2, 0.4), (2, 2.5), (3, 0.5), (4, 1.8)])
def test_the_scale_is_the_slope_that_makes_over_or_under_confident_evidence_honest(k: int, slope: float) -> None:
    """A model whose log-odds are 1 / slope times what the outcome follows gets back that slope."""
    rng = np.random.default_rng(k)
    raw = rng.normal(scale=1.5, size=(20000, k))
    proba = _softmax(raw)  # what the model says
    truth = _softmax(slope * np.log(proba))  # what the outcome follows
    y = np.array([rng.choice(k, p=p) for p in truth])
    assert stacking_scale(proba, y, n_classes=k) == pytest.approx(slope, rel=0.08)


def test_evidence_that_points_the_wrong_way_out_of_fold_counts_for_nothing() -> None:
    rng = np.random.default_rng(1)
    p = rng.uniform(0.05, 0.95, size=4000)
    y = (rng.uniform(size=4000) < 1 - p).astype(int)
    assert stacking_scale(np.column_stack([1 - p, p]), y, n_classes=2) == 0.0
    assert MAX_SCALE >= 1.0


def test_out_of_fold_predictions_never_see_their_own_record() -> None:
    """A 1-nearest-neighbour model is perfect in sample; out of fold it is as good as the signal."""
    from sklearn.neighbors import KNeighborsClassifier

    rng = np.random.default_rng(2)
    x = rng.normal(size=(300, 3))
    y = rng.integers(0, 2, size=300)  # no signal at all
    oof = out_of_fold_proba(lambda a, b: KNeighborsClassifier(1).fit(a, b), x, y, folds=5, seed=0)
    assert oof.shape == (300, 2) and 0.35 < float(np.mean(oof.argmax(axis=1) == y)) < 0.65
    assert out_of_fold_proba(lambda a, b: KNeighborsClassifier(1).fit(a, b), x, np.r_[1, np.zeros(299, int)],
                             folds=5, seed=0) is None  # one record of a class: no folds


def test_a_small_sites_over_confident_glm_is_scaled_down_to_the_forests_spread() -> None:
    """The mechanism's claim: at a site of a few hundred records with many columns the GLM's log-odds
    spread several times the forest's; after scaling their spreads are comparable."""
    from client.forest import SiteForest
    from client.pipeline import meta_features
    from common.glm import FederatedGLM

    rng = np.random.default_rng(3)
    x = rng.normal(size=(700, 60))
    y = (rng.uniform(size=700) < 1 / (1 + np.exp(-(x[:, 0] + x[:, 1] - x[:, 2])))).astype(int)
    train, test = slice(0, 350), slice(350, None)
    forest = SiteForest(n_estimators=150, random_state=0).fit(x[train], y[train])
    glm = FederatedGLM(C=0.1).fit(x[train], y[train])
    scales = site_model_scales(forest=forest, glm_fit=lambda a, b: FederatedGLM(C=0.1).fit(a, b), x_glm=x[train],
                               y=y[train], folds=5, seed=0)
    raw_f = meta_features(forest.predict_proba(x[test]))[:, 0]
    raw_g = meta_features(glm.predict_proba(x[test]))[:, 0]
    assert raw_g.std() > 3 * raw_f.std()
    assert scales["site-logreg"] < 1.0 < scales["forest"]
    ratio = (scales["site-logreg"] * raw_g.std()) / (scales["forest"] * raw_f.std())
    assert 1 / 2.5 < ratio < 2.5, (scales, raw_f.std(), raw_g.std())


def test_the_forest_keeps_its_out_of_bag_votes_and_the_same_trees() -> None:
    from sklearn.ensemble import RandomForestClassifier

    from client.forest import SiteForest

    rng = np.random.default_rng(4)
    x = rng.normal(size=(200, 5))
    y = (x[:, 0] > 0).astype(int)
    forest = SiteForest(n_estimators=30, random_state=7).fit(x, y)
    assert forest.oob_proba_.shape == (200, 2)
    plain = RandomForestClassifier(n_estimators=30, class_weight="balanced", random_state=7,
                                   **forest.best_params_).fit(x, y)
    np.testing.assert_array_equal(forest.predict_proba(x), plain.predict_proba(x))


def test_models_without_a_scale_keep_their_evidence_as_it_is() -> None:
    assert stacking_scales(None) == (1.0,) * len(BASE_MODELS)
    got = stacking_scales({"forest": 2.0, "site-logreg": 0.25})
    assert got == tuple({"forest": 2.0, "site-logreg": 0.25}.get(m, 1.0) for m in BASE_MODELS)
