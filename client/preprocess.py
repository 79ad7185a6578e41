"""Tabular preprocessing, fitted on a site's training split only and stored with its models.

Steps, in order: kNN imputation of missing numeric values; z-scores; one-hot encoding of the
clinical categorical fields (a missing category is an all-zero row); optionally PCA over the
wide omics block (the seed's protocol).

What the federation needs to share, and what stays local: the forest and the logistic
baseline are fitted on site, so their preprocessing is local and stored in the vault with
them. The deep model's dense branch is shared, so its inputs must be scaled the same way at
every site: the means and variances for that are sums (count, sum, sum of squares per column)
that the coordinator adds up (:func:`common.tabular.column_moments`, sent in the moments phase and
turned into the one shared scaler there), while imputation neighbours and PCA bases would reveal
patients and are never shared.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.decomposition import PCA
from sklearn.impute import KNNImputer

from client.features import TabularFrame
from common.tabular import column_moments


def moments_to_scaler(moments: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Means and standard deviations from (possibly summed) :func:`column_moments`."""
    count = np.maximum(moments["count"], 1.0)
    mean = moments["sum"] / count
    var = np.maximum(moments["sumsq"] / count - mean**2, 0.0)
    std = np.sqrt(var)
    return mean, np.where(std > 1e-12, std, 1.0)


class TabularPreprocessor(TransformerMixin, BaseEstimator):
    """Impute, scale, one-hot and optionally reduce a :class:`TabularFrame`.

    Parameters
    ----------
    n_neighbors : neighbours for kNN imputation.
    omics_pca : number of PCA components replacing the omics block (None keeps it whole).
    """

    def __init__(self, *, n_neighbors: int = 5, omics_pca: int | None = None) -> None:
        self.n_neighbors = n_neighbors
        self.omics_pca = omics_pca

    def fit(self, frame: TabularFrame, y: Any = None) -> TabularPreprocessor:
        numeric = frame.numeric
        self.imputer_ = None
        if np.isnan(numeric).any():
            self.imputer_ = KNNImputer(n_neighbors=self.n_neighbors, keep_empty_features=True).fit(numeric)
            numeric = self.imputer_.transform(numeric)
        self.mean_, self.scale_ = moments_to_scaler(column_moments(numeric))
        scaled = (numeric - self.mean_) / self.scale_
        self.pca_ = None
        omics = frame.blocks.get("omics")
        if self.omics_pca and omics is not None and omics.stop - omics.start > self.omics_pca:
            self.pca_ = PCA(n_components=self.omics_pca, random_state=0).fit(scaled[:, omics])
        self.categories_ = {name: frame.categories[name] for name in frame.categorical_names}
        self.feature_names_out_ = self._names(frame)
        self.n_features_in_ = frame.width
        return self

    def _names(self, frame: TabularFrame) -> list[str]:
        names = list(frame.numeric_names)
        omics = frame.blocks.get("omics")
        if self.pca_ is not None:
            names = names[:omics.start] + [f"omics:PC{i + 1}" for i in range(self.omics_pca)] + names[omics.stop:]
        for name in frame.categorical_names:
            names += [f"{name}={c}" for c in self.categories_[name]]
        return names

    def transform(self, frame: TabularFrame) -> np.ndarray:
        numeric = frame.numeric
        if self.imputer_ is not None:
            numeric = self.imputer_.transform(numeric)
        numeric = np.nan_to_num(numeric)  # columns the imputer had no data for
        scaled = (numeric - self.mean_) / self.scale_
        omics = frame.blocks.get("omics")
        if self.pca_ is not None:
            scaled = np.hstack([scaled[:, :omics.start], self.pca_.transform(scaled[:, omics]), scaled[:, omics.stop:]])
        onehots = []
        for j, name in enumerate(frame.categorical_names):
            k = len(self.categories_[name])
            codes = frame.categorical[:, j]
            block = np.zeros((len(codes), k))
            ok = codes >= 0
            block[np.flatnonzero(ok), codes[ok]] = 1.0
            onehots.append(block)
        return np.hstack([scaled, *onehots]) if onehots else scaled

    def get_feature_names_out(self, input_features: Any = None) -> np.ndarray:
        return np.asarray(self.feature_names_out_, dtype=object)
