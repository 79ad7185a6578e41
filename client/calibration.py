"""A site's own models calibrated on its own train split before the stack reads them.

The meta-classifier reads every base model's log-odds (binary) or log-probabilities, and under DP
its noised Newton terms keep it close to the averaging prior: about equal weights on every model's
evidence. Equal weights are a neutral start only if the models' outputs are on one scale, and a
site's own models are not: on the synthetic cohort (5 sites of 280-560 train patients) a site's GLM
spreads its log-odds with a standard deviation of 2.0-2.9 over patients and its forest 0.3-0.4
(class-balanced vote fractions), although the two rank about equally well. Averaged as they are, the
GLM's over-confident log-odds drown the forest; and neither says how common the outcome is at the site.

So each site calibrates each of its own models with Platt's (1999) map, a slope and intercepts
fitted on the model's out-of-fold predictions on the site's own train split (the forest's out-of-bag
votes; the GLM refitted on ``FOLDS`` folds): its evidence becomes the log-odds it has earned on
patients it did not see, at the site's own base rate (docs/learning.md measures it).

Only train-split records are used, as for the site's models themselves: the maps are site-local
model parameters, fitted without DP and never sent, covered by the same statement as the forest
(docs/privacy.md). The shared models (deep model, federated GLM) are not recalibrated: they have no
held-out predictions on the train split. The site models' own rows (their released statistics,
``genofed predict``) stay uncalibrated, and so does a hybrid that fell back to one of them
(:func:`client.site_models.hybrid_probabilities`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

FOLDS = 5
"""Folds of the site GLM's out-of-fold predictions (the forest's are its out-of-bag votes)."""

MAX_SCALE = 20.0
"""The largest slope and intercept: a model whose out-of-fold evidence is near zero would otherwise
get a huge slope, and a class a site never saw an intercept of minus infinity."""


def fit_platt(oof_proba: np.ndarray, y: np.ndarray, *, n_classes: int) -> dict[str, Any]:
    """Platt's map of out-of-fold class probabilities: the slope ``a`` and intercepts ``b`` that
    maximize the likelihood of ``softmax(a z + b)`` (``sigmoid(a z + b)`` for two classes), ``z`` the
    stacking inputs of ``oof_proba`` (:func:`client.pipeline.meta_features`: log-odds, or
    log-probabilities over ``n_classes``).

    ``a`` is kept in ``[0, MAX_SCALE]`` (evidence that points the wrong way out of fold counts for
    nothing) and each intercept in ``[-MAX_SCALE, MAX_SCALE]`` (a class a site never saw would
    otherwise run off to minus infinity).
    """
    from scipy.optimize import minimize

    z, binary = _scores(oof_proba, n_classes)
    y = np.asarray(y, dtype=int)
    n_b = 1 if binary else n_classes

    def nll(params: np.ndarray) -> float:
        from scipy.special import log_softmax

        logits = _logits(z, params[0], params[1:], binary)
        return float(-log_softmax(logits, axis=1)[np.arange(len(y)), y].mean())

    bounds = [(0.0, MAX_SCALE)] + [(-MAX_SCALE, MAX_SCALE)] * n_b
    params = minimize(nll, np.r_[1.0, np.zeros(n_b)], method="L-BFGS-B", bounds=bounds).x
    return {"slope": float(params[0]), "intercepts": [float(b) for b in params[1:]]}


def apply_platt(proba: np.ndarray, platt: Mapping[str, Any] | None) -> np.ndarray:
    """Class probabilities after Platt's map ``platt`` (:func:`fit_platt`); unchanged without one."""
    if not platt:
        return proba
    from scipy.special import softmax

    n_classes = np.shape(proba)[1]
    z, binary = _scores(proba, n_classes)
    return softmax(_logits(z, platt["slope"], np.asarray(platt["intercepts"]), binary), axis=1)


def _scores(proba: np.ndarray, n_classes: int) -> tuple[np.ndarray, bool]:
    from client.pipeline import meta_features

    z = meta_features(np.asarray(proba, dtype=np.float64))
    return (z[:, 0], True) if n_classes == 2 else (z, False)


def _logits(z: np.ndarray, a: float, b: np.ndarray, binary: bool) -> np.ndarray:
    if binary:  # class 0's logit is the reference
        return np.column_stack([np.zeros(len(z)), a * z + b[0]])
    return a * z + b


def forest_oof_proba(forest: object) -> tuple[np.ndarray, np.ndarray] | None:
    """The site forest's out-of-bag class probabilities on its train records and which records have
    them (a record in every tree's bootstrap has none); None when the forest kept none."""
    proba = getattr(forest, "oob_proba_", None)
    if proba is None:
        return None
    proba = np.nan_to_num(np.asarray(proba, dtype=np.float64))
    return proba, proba.sum(axis=1) > 0


def out_of_fold_proba(fit: Callable[[np.ndarray, np.ndarray], object], x: np.ndarray, y: np.ndarray, *,
                      folds: int, seed: int) -> np.ndarray | None:
    """Class probabilities of each record from a model ``fit`` on the other folds (stratified), over
    the classes of ``y``; None when a class has fewer records than two folds need."""
    from sklearn.model_selection import StratifiedKFold

    classes, y_idx = np.unique(y, return_inverse=True)
    k = min(folds, int(np.bincount(y_idx).min()))
    if k < 2 or len(classes) < 2:
        return None
    out = np.zeros((len(y), len(classes)))
    for train, held in StratifiedKFold(k, shuffle=True, random_state=seed).split(x, y_idx):
        model = fit(x[train], y[train])
        seen = np.searchsorted(classes, np.asarray(model.classes_))
        out[np.ix_(held, seen)] = model.predict_proba(x[held])
    return out


def site_model_maps(*, forest: object, glm_fit: Callable[[np.ndarray, np.ndarray], object], x_glm: np.ndarray,
                    y: np.ndarray, n_classes: int, folds: int, seed: int,
                    glm_oof: np.ndarray | None = None) -> dict[str, dict[str, Any]]:
    """Each site model's Platt map (``forest``, ``site-logreg``) from its train split ``y`` (class
    indices of the cohort's ``n_classes``); a model whose out-of-fold predictions cannot be had keeps
    its probabilities as they are (it is left out of the result). ``glm_oof``: the GLM's out-of-fold
    probabilities over the classes of ``y`` when already computed (on the same ``folds`` and
    ``seed``, as :func:`client.site_glm.select_site_glm_penalty` does); otherwise ``glm_fit`` is
    refitted on each fold."""
    from client.pipeline import over_all_classes

    if len(np.unique(y)) < 2:
        return {}
    maps = {}
    if (oob := forest_oof_proba(forest)) is not None and oob[1].sum() > 0:
        proba, ok = oob
        proba = over_all_classes(proba, np.asarray(forest.classes_, dtype=int), n_classes)
        maps["forest"] = fit_platt(proba[ok], y[ok], n_classes=n_classes)
    oof = glm_oof
    if oof is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a fold's GLM that does not converge still gives probabilities
            oof = out_of_fold_proba(glm_fit, x_glm, y, folds=folds, seed=seed)
    if oof is not None:
        maps["site-logreg"] = fit_platt(over_all_classes(oof, np.unique(y), n_classes), y, n_classes=n_classes)
    return maps


def stacking_probabilities(base: Mapping[str, np.ndarray], maps: Mapping[str, Any] | None) -> dict[str, np.ndarray]:
    """The base models' probabilities as the stack reads them: each site model's after its Platt map."""
    return {m: apply_platt(p, (maps or {}).get(m)) for m, p in base.items()}
