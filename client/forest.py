"""The site forest: a random forest with class weights, its grid point chosen on the train split.

It is fitted on site and never leaves it (it encodes patient data); only its scores on the
validation and test splits feed the stacking meta-classifier and the evaluation statistics.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.ensemble import RandomForestClassifier
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import GridSearchCV, ParameterGrid, StratifiedKFold

DEFAULT_GRID: dict[str, list[Any]] = {"max_features": ["sqrt", 0.2], "min_samples_leaf": [1, 4]}
SELECTIONS = ("oob", "cv")


class SiteForest(ClassifierMixin, BaseEstimator):
    """RandomForestClassifier with ``class_weight``, its grid point chosen on out-of-bag or CV AUC.

    Parameters
    ----------
    n_estimators : trees in the final forest.
    param_grid : the grid searched (``DEFAULT_GRID`` when None).
    selection : "oob" scores every grid point's forest, fitted on the whole train split, by the ROC
        AUC (macro OvR) of its out-of-bag votes and keeps the best forest as it is; "cv" runs a
        ``cv``-fold stratified grid search and refits the best point. Out-of-bag selection fits one
        forest per grid point instead of ``cv`` plus a refit, and every train record still counts.
    cv : folds for ``selection="cv"``; reduced automatically when the smallest class is smaller.
    class_weight : passed to the forest ("balanced" for imbalanced cohorts).
    random_state, n_jobs : as in scikit-learn.
    """

    def __init__(self, *, n_estimators: int = 200, param_grid: dict[str, list[Any]] | None = None,
                 selection: str = "oob", cv: int = 3, class_weight: str | dict | None = "balanced",
                 random_state: int = 0, n_jobs: int | None = None) -> None:
        self.n_estimators = n_estimators
        self.param_grid = param_grid
        self.selection = selection
        self.cv = cv
        self.class_weight = class_weight
        self.random_state = random_state
        self.n_jobs = n_jobs

    def fit(self, X: np.ndarray, y: np.ndarray) -> SiteForest:
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")
        X, y = np.asarray(X, dtype=np.float64), np.asarray(y)
        self.classes_ = np.unique(y)
        # Every forest keeps its out-of-bag votes (the same trees as without them): out-of-bag
        # selection scores them, and the stack's calibration reads them (client/calibration.py).
        base = RandomForestClassifier(n_estimators=self.n_estimators, class_weight=self.class_weight,
                                      random_state=self.random_state, n_jobs=self.n_jobs, oob_score=True)
        grid = DEFAULT_GRID if self.param_grid is None else self.param_grid
        if self.selection == "oob":
            self.best_params_, self.selection_score_, self.forest_ = self._oob_search(base, grid, X, y)
        else:
            self.best_params_, self.selection_score_ = self._cv_search(base, grid, X, y)
            self.forest_ = _fit_quietly(clone(base).set_params(**self.best_params_), X, y)
        self.oob_proba_ = self.forest_.oob_decision_function_
        self.n_features_in_ = X.shape[1]
        return self

    def _oob_search(self, base: RandomForestClassifier, grid: dict[str, list[Any]], X: np.ndarray,
                    y: np.ndarray) -> tuple[dict[str, Any], float, RandomForestClassifier]:
        """The grid point whose forest's out-of-bag AUC is highest (the first on ties), with that forest."""
        best: tuple[dict[str, Any], float, RandomForestClassifier] | None = None
        for params in ParameterGrid(grid):
            forest = _fit_quietly(clone(base).set_params(**params), X, y)
            score = _oob_auc(forest.oob_decision_function_, y, self.classes_)
            if best is None or score > best[1]:
                best = (params, score, forest)
            if np.isnan(score):
                # Too few out-of-bag votes to compare (every grid point draws the same bootstraps,
                # so the others would have no more): the first grid point, as fitted.
                break
        assert best is not None
        return best

    def _cv_search(self, base: RandomForestClassifier, grid: dict[str, list[Any]], X: np.ndarray,
                   y: np.ndarray) -> tuple[dict[str, Any], float]:
        folds = min(self.cv, int(np.bincount(np.searchsorted(self.classes_, y)).min()))
        if folds < 2 or all(len(v) <= 1 for v in grid.values()):
            # Too few samples per class for CV: the first grid point, fitted directly.
            return {k: v[0] for k, v in grid.items()}, float("nan")
        scoring = "roc_auc" if len(self.classes_) == 2 else "roc_auc_ovr"
        cv = StratifiedKFold(folds, shuffle=True, random_state=self.random_state)
        search = GridSearchCV(clone(base).set_params(oob_score=False), grid, scoring=scoring, refit=False,
                              n_jobs=self.n_jobs, cv=cv)
        search.fit(X, y)
        return search.best_params_, float(search.best_score_)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A forest pickled into a vault before out-of-bag selection was chosen by CV, and named its
        # score ``cv_score_``: read so, it keeps predicting and reports what it was.
        if "selection" not in state:
            state = {**state, "selection": "cv"}
            if "cv_score_" in state:
                state["selection_score_"] = state.pop("cv_score_")
        super().__setstate__(state)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return self.forest_.predict_proba(np.asarray(X, dtype=np.float64))

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.classes_[self.predict_proba(X).argmax(axis=1)]

    @property
    def feature_importances_(self) -> np.ndarray:
        return self.forest_.feature_importances_


def _fit_quietly(forest: RandomForestClassifier, X: np.ndarray, y: np.ndarray) -> RandomForestClassifier:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "some inputs do not have OOB scores": their rows stay zero
        return forest.fit(X, y)


def _oob_auc(votes: np.ndarray, y: np.ndarray, classes: np.ndarray) -> float:
    """ROC AUC (macro OvR) of out-of-bag votes over the records that have any; NaN when those
    records lack a class."""
    voted = np.nan_to_num(votes).sum(axis=1) > 0
    y, votes = y[voted], np.nan_to_num(votes[voted])
    if len(classes) < 2 or not np.array_equal(np.unique(y), classes):
        return float("nan")
    if len(classes) == 2:
        return float(roc_auc_score(y, votes[:, 1]))
    return float(roc_auc_score(y, votes / votes.sum(axis=1, keepdims=True), labels=classes, multi_class="ovr"))
