"""The scale of a site's own models' evidence in the stack, fitted on its own train split.

The meta-classifier reads every base model's log-odds (binary) or log-probabilities, and under DP
its noised Newton terms keep it close to the averaging prior: about equal weights on every model's
evidence. Equal weights are a neutral start only if the models' outputs are on one scale, and a
site's own models are not: on the synthetic cohort (5 sites of 280-560 train patients) a site's GLM
spreads its log-odds with a standard deviation of 2.0-2.9 over patients and its forest 0.3-0.4
(vote fractions), although the two rank about equally well. Averaged as they are, the GLM's
over-confident log-odds drown the forest.

So each site rescales each of its own models' stacking inputs by one slope: Platt's (1999) slope
of the model's out-of-fold predictions on the site's own train split (the forest's out-of-bag
votes; the GLM refitted on ``folds`` folds), the one factor that turns its raw evidence into the
log-odds it has earned on patients it did not see. After it, the forest's and the GLM's spreads
are comparable (0.5-1.1 on the same sites), and their plain average ranks better than either
alone on validation and test data (docs/learning.md).

Only train-split records are used, as for the site's models themselves: the slopes are site-local
model parameters, fitted without DP and never sent, covered by the same statement as the forest
(docs/privacy.md). The shared models (deep model, federated GLM) are not rescaled: they have no
held-out predictions on the train split.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping

import numpy as np

from common.stack import BASE_MODELS

FOLDS = 5
"""Folds of the site GLM's out-of-fold predictions (the forest's are its out-of-bag votes)."""

MAX_SCALE = 20.0
"""The largest slope: a model whose out-of-fold evidence is near zero would otherwise get a huge one."""


def stacking_scale(oof_proba: np.ndarray, y: np.ndarray, *, n_classes: int) -> float:
    """Platt's slope of out-of-fold class probabilities: the ``a`` that maximizes the likelihood of
    ``softmax(a z + b)`` (``sigmoid`` for two classes) with ``z`` the stacking inputs of
    ``oof_proba`` (:func:`client.pipeline.meta_features`) and free intercepts ``b``.

    ``a`` is kept in ``[0, MAX_SCALE]``: evidence that points the wrong way out of fold counts for nothing.
    """
    from scipy.optimize import minimize
    from scipy.special import log_softmax

    from client.pipeline import meta_features

    z = meta_features(np.asarray(oof_proba, dtype=np.float64))
    y = np.asarray(y, dtype=int)
    binary = n_classes == 2
    if binary:
        z = np.column_stack([np.zeros(len(z)), z[:, 0]])  # class 0's score is the reference

    def nll(params: np.ndarray) -> float:
        a, b = params[0], params[1:]
        scores = a * z + (np.r_[0.0, b] if binary else b)
        return float(-log_softmax(scores, axis=1)[np.arange(len(y)), y].mean())

    start = np.r_[1.0, np.zeros(1 if binary else n_classes)]
    bounds = [(0.0, MAX_SCALE)] + [(None, None)] * (len(start) - 1)
    return float(minimize(nll, start, method="L-BFGS-B", bounds=bounds).x[0])


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


def site_model_scales(*, forest: object, glm_fit: Callable[[np.ndarray, np.ndarray], object], x_glm: np.ndarray,
                      y: np.ndarray, folds: int, seed: int) -> dict[str, float]:
    """Each site model's stacking scale (``forest``, ``site-logreg``) from its train split ``y``; a model
    whose out-of-fold predictions cannot be had keeps scale 1 (it is left out of the result)."""
    classes = np.unique(y)
    if len(classes) < 2:
        return {}
    y_idx = np.searchsorted(classes, y)
    scales = {}
    if (oob := forest_oof_proba(forest)) is not None and oob[1].sum() > 0:
        proba, ok = oob
        scales["forest"] = stacking_scale(proba[ok], y_idx[ok], n_classes=len(classes))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a fold's GLM that does not converge still gives probabilities
        oof = out_of_fold_proba(glm_fit, x_glm, y, folds=folds, seed=seed)
    if oof is not None:
        scales["site-logreg"] = stacking_scale(oof, y_idx, n_classes=len(classes))
    return scales


def stacking_scales(scales: Mapping[str, float] | None) -> tuple[float, ...]:
    """Per base model in :data:`common.stack.BASE_MODELS` order, the factor on its stacking inputs (1 if none)."""
    return tuple(float((scales or {}).get(m, 1.0)) for m in BASE_MODELS)
