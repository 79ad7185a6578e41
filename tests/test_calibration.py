"""The site models' Platt maps for the stack (client/calibration.py), fitted out of fold on the train split."""

from __future__ import annotations

import numpy as np
import pytest

from client.calibration import apply_platt, fit_platt, out_of_fold_proba, site_model_maps, stacking_probabilities


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.mark.parametrize(("k", "slope", "shift"), [(2, 0.4, 1.0), (2, 2.5, -0.5), (3, 0.5, 0.8), (4, 1.8, 0.0)])
def test_the_map_recovers_the_slope_and_base_rate_that_make_a_models_evidence_honest(
        k: int, slope: float, shift: float) -> None:
    """A model whose log-odds are 1 / slope times what the outcome follows, at another base rate,
    gets back that slope, and its calibrated probabilities are the outcome's."""
    rng = np.random.default_rng(k)
    proba = _softmax(rng.normal(scale=1.5, size=(20000, k)))  # what the model says
    offset = np.r_[0.0, shift, np.zeros(k - 2)]
    truth = _softmax(slope * np.log(proba) + offset)  # what the outcome follows
    y = np.array([rng.choice(k, p=p) for p in truth])
    platt = fit_platt(proba, y, n_classes=k)
    assert platt["slope"] == pytest.approx(slope, rel=0.08)
    assert np.abs(apply_platt(proba, platt) - truth).mean() < 0.02


def test_evidence_that_points_the_wrong_way_out_of_fold_counts_for_nothing() -> None:
    rng = np.random.default_rng(1)
    p = rng.uniform(0.05, 0.95, size=4000)
    y = (rng.uniform(size=4000) < 1 - p).astype(int)
    platt = fit_platt(np.column_stack([1 - p, p]), y, n_classes=2)
    assert platt["slope"] == 0.0
    calibrated = apply_platt(np.column_stack([1 - p, p]), platt)[:, 1]
    assert np.ptp(calibrated) < 1e-9 and calibrated[0] == pytest.approx(y.mean(), abs=0.01)  # the base rate


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


def test_a_small_sites_over_confident_glm_is_brought_down_to_the_forests_spread() -> None:
    """The mechanism's claim: at a site of a few hundred records with many columns the GLM's log-odds
    spread several times the forest's; read through their maps, their spreads are comparable."""
    from client.forest import SiteForest
    from client.pipeline import meta_features
    from common.glm import FederatedGLM

    rng = np.random.default_rng(3)
    x = rng.normal(size=(700, 60))
    y = (rng.uniform(size=700) < 1 / (1 + np.exp(-(x[:, 0] + x[:, 1] - x[:, 2])))).astype(int)
    train, test = slice(0, 350), slice(350, None)
    forest = SiteForest(n_estimators=150, random_state=0).fit(x[train], y[train])
    glm = FederatedGLM(C=0.1).fit(x[train], y[train])
    maps = site_model_maps(forest=forest, glm_fit=lambda a, b: FederatedGLM(C=0.1).fit(a, b), x_glm=x[train],
                           y=y[train], n_classes=2, folds=5, seed=0)
    base = {"forest": forest.predict_proba(x[test]), "site-logreg": glm.predict_proba(x[test]),
            "cnn": np.full((350, 2), 0.5)}
    read = stacking_probabilities(base, maps)
    raw_f, raw_g = (meta_features(base[m])[:, 0].std() for m in ("forest", "site-logreg"))
    cal_f, cal_g = (meta_features(read[m])[:, 0].std() for m in ("forest", "site-logreg"))
    assert raw_g > 3 * raw_f
    assert maps["site-logreg"]["slope"] < 1.0 < maps["forest"]["slope"]
    assert 1 / 2.5 < cal_g / cal_f < 2.5, (maps, raw_f, raw_g)
    assert read["cnn"] is base["cnn"]  # a shared model is read as it is


def test_a_multiclass_site_that_never_saw_a_class_gets_a_map_over_every_class() -> None:
    from client.forest import SiteForest
    from common.glm import FederatedGLM

    rng = np.random.default_rng(5)
    x = rng.normal(size=(300, 4))
    y = np.where(x[:, 0] > 0.3, 2, 0)  # class 1 of three never occurs at this site
    forest = SiteForest(n_estimators=40, random_state=0).fit(x, y)
    maps = site_model_maps(forest=forest, glm_fit=lambda a, b: FederatedGLM(C=0.1).fit(a, b), x_glm=x, y=y,
                           n_classes=3, folds=5, seed=0)
    assert set(maps) == {"forest", "site-logreg"} and all(len(m["intercepts"]) == 3 for m in maps.values())
    from client.pipeline import over_all_classes

    proba = over_all_classes(forest.predict_proba(x[:10]), forest.classes_, 3)  # the floor for class 1
    out = apply_platt(proba, maps["forest"])
    assert out.shape == (10, 3) and np.allclose(out.sum(axis=1), 1.0) and np.all(out[:, 1] < 0.01)


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


@pytest.mark.parametrize("k", [2, 3])
def test_a_hybrid_that_fell_back_to_a_site_model_is_that_model_uncalibrated(k: int) -> None:
    from client.site_models import hybrid_probabilities
    from common.meta import selection_coef
    from common.stack import BASE_MODELS

    rng = np.random.default_rng(k)
    base = {m: _softmax(rng.normal(size=(20, k))) for m in BASE_MODELS}
    maps = {"forest": {"slope": 0.3, "intercepts": [0.5] * (1 if k == 2 else k)}}
    coef = selection_coef(n_models=len(BASE_MODELS), n_classes=k, index=BASE_MODELS.index("forest"))
    np.testing.assert_array_equal(hybrid_probabilities(base, coef, n_classes=k, calibration=maps), base["forest"])
    stacked = hybrid_probabilities(base, coef * 0.999, n_classes=k, calibration=maps)  # a fitted stack reads the map
    assert not np.allclose(stacked, base["forest"], atol=1e-3)
