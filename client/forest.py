"""The site forest: a random forest with class weights, tuned by stratified CV on the train split.

It is fitted on site and never leaves it (it encodes patient data); only its scores on the
validation and test splits feed the stacking meta-classifier and the evaluation statistics.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.ensemble import RandomForestClassifier
from sklearn.model_selection import GridSearchCV, StratifiedKFold

DEFAULT_GRID: dict[str, list[Any]] = {"max_features": ["sqrt", 0.2], "min_samples_leaf": [1, 4]}


class SiteForest(ClassifierMixin, BaseEstimator):
    """RandomForestClassifier with ``class_weight`` and a stratified-CV grid search.

    Parameters
    ----------
    n_estimators : trees in the final forest.
    param_grid : grid searched by ``cv``-fold stratified cross-validation (ROC AUC, macro OvR).
    cv : folds; reduced automatically when the smallest class is smaller.
    class_weight : passed to the forest ("balanced" for imbalanced cohorts).
    random_state, n_jobs : as in scikit-learn.
    """

    def __init__(self, *, n_estimators: int = 200, param_grid: dict[str, list[Any]] | None = None, cv: int = 3,
                 class_weight: str | dict | None = "balanced", random_state: int = 0, n_jobs: int | None = None) -> None:
        self.n_estimators = n_estimators
        self.param_grid = param_grid
        self.cv = cv
        self.class_weight = class_weight
        self.random_state = random_state
        self.n_jobs = n_jobs

    def fit(self, X: np.ndarray, y: np.ndarray) -> SiteForest:
        X, y = np.asarray(X, dtype=np.float64), np.asarray(y)
        self.classes_ = np.unique(y)
        base = RandomForestClassifier(n_estimators=self.n_estimators, class_weight=self.class_weight,
                                      random_state=self.random_state, n_jobs=self.n_jobs)
        grid = DEFAULT_GRID if self.param_grid is None else self.param_grid
        folds = min(self.cv, int(np.bincount(np.searchsorted(self.classes_, y)).min()))
        if folds >= 2 and any(len(v) > 1 for v in grid.values()):
            scoring = "roc_auc" if len(self.classes_) == 2 else "roc_auc_ovr"
            search = GridSearchCV(base, grid, scoring=scoring, refit=False, n_jobs=self.n_jobs,
                                  cv=StratifiedKFold(folds, shuffle=True, random_state=self.random_state))
            search.fit(X, y)
            self.best_params_, self.cv_score_ = search.best_params_, search.best_score_
        else:
            # Too few samples per class for CV: the first grid point, fitted directly.
            self.best_params_, self.cv_score_ = {k: v[0] for k, v in grid.items()}, float("nan")
        # The refit keeps its out-of-bag votes (the same trees as without them): the stack's
        # calibration reads them (client/calibration.py).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "some inputs do not have OOB scores": their rows stay zero
            self.forest_ = clone(base).set_params(**self.best_params_, oob_score=True).fit(X, y)
        self.oob_proba_ = self.forest_.oob_decision_function_
        self.n_features_in_ = X.shape[1]
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return self.forest_.predict_proba(np.asarray(X, dtype=np.float64))

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.classes_[self.predict_proba(X).argmax(axis=1)]

    @property
    def feature_importances_(self) -> np.ndarray:
        return self.forest_.feature_importances_
