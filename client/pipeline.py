"""The site-local learning steps, shared by pooled evaluation and the federation.

A :class:`SiteData` is one cohort (a site's, or several pooled) cut into the model inputs. The
steps below (train the deep model, fit the forest, make meta-features, fit the classical
baseline) are what a site runs; pooled evaluation runs the very same functions on the union of
the sites, which is what makes it the reference for the federation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from client.dp_training import (
    DeepData,
    DPConfig,
    TrainConfig,
    TrainResult,
    predict_proba,
    train_deep_model,
)
from client.features import TabularFrame, deep_tracks, sequence_features, tabular_frame
from common.cohort import Cohort
from common.meta import META_FEATURE_BOUND
from common.model_config import deep_config_for_schema
from common.models import DeepModelConfig, GenomicNet, TrackShape, build_model
from common.tabular import (
    KMER,
    SharedScaler,
    column_moments,
    scaler_from_moments,
    shared_columns,
)

if TYPE_CHECKING:
    # scikit-learn is imported where it is used: a CNN round (a fresh process per message in a
    # deployment) then never pays for it.

    from client.forest import SiteForest
    from client.preprocess import TabularPreprocessor
    from common.glm import FederatedGLM

SPLITS = ("train", "validation", "test")


@dataclass
class SiteData:
    """A cohort cut into model inputs, with its split masks."""

    y: np.ndarray
    classes: tuple[str, ...]
    masks: dict[str, np.ndarray]
    tracks: list[np.ndarray]
    track_shapes: tuple[TrackShape, ...]
    frame: TabularFrame
    seq_features: np.ndarray | None
    seq_feature_names: list[str] = field(default_factory=list)
    orientation_free: bool = False
    schema: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_cohort(cls, cohort: Cohort, *, kmer: int = KMER) -> SiteData:
        tracks, shapes = deep_tracks(cohort)
        seq, seq_names = (None, [])
        if cohort.sequences is not None:
            seq, seq_names = sequence_features(cohort.sequences, k=kmer)
        return cls(y=np.asarray(cohort.labels, dtype=np.int64), classes=tuple(cohort.classes),
                   masks={s: cohort.split_mask(s) for s in SPLITS}, tracks=tracks, track_shapes=shapes,
                   frame=tabular_frame(cohort), seq_features=seq, seq_feature_names=seq_names,
                   orientation_free=cohort.schema.get("sequences", {}).get("strand") == "either",
                   schema=cohort.schema)

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def has_tabular(self) -> bool:
        return self.frame.width > 0


def deep_config(data: SiteData, *, tracks: str = "auto", **arch: Any) -> DeepModelConfig:
    """The deep model for this data: :func:`common.model_config.deep_config_for_schema`.

    Raises
    ------
    ValueError
        If the data does not have the shapes its schema promises (a corrupted vault).
    """
    cfg = deep_config_for_schema(data.schema, tracks=tracks, **arch)
    have = {s.name: s for s in data.track_shapes}
    for t in cfg.tracks:
        if t.name not in have or (have[t.name].channels, have[t.name].length) != (t.channels, t.length):
            raise ValueError(f"track {t.name!r}: the data does not match the schema ({have.get(t.name)} vs {t})")
    width = shared_columns(data.schema).tabular.stop
    if cfg.n_tabular and width != cfg.n_tabular:
        raise ValueError(f"dense branch: {width} shared tabular columns, schema says {cfg.n_tabular}")
    return cfg


def shared_raw(data: SiteData, split: str) -> np.ndarray:
    """Every shared column (:mod:`common.tabular`) of one split, before scaling; NaN where missing.

    Numeric tabular columns, then one-hot clinical categories (a missing category is missing in
    each of its columns), then sequence-derived features.
    """
    mask = data.masks[split]
    frame = data.frame.rows(mask)
    parts = [frame.numeric]
    for j, name in enumerate(frame.categorical_names):
        codes = frame.categorical[:, j]
        block = np.zeros((len(codes), len(frame.categories[name])))
        ok = codes >= 0
        block[np.flatnonzero(ok), codes[ok]] = 1.0
        block[~ok] = np.nan
        parts.append(block)
    if data.seq_features is not None:
        parts.append(data.seq_features[mask])
    return np.hstack(parts).astype(np.float64)


def site_moments(data: SiteData, *, rescaled: bool, clip: bool = True) -> dict[str, np.ndarray]:
    """Additive moments of the shared columns on the train split (rescaled to public ranges under
    DP, clipped to them unless ``clip=False``: :func:`common.tabular.column_moments`)."""
    cols = shared_columns(data.schema)
    raw = shared_raw(data, "train")
    if rescaled:
        return column_moments(raw, low=cols.low, high=cols.high, clip=clip)
    return column_moments(raw)


def fit_shared_scaler(data: SiteData, *, max_glm_columns: int) -> SharedScaler:
    """The shared scaler from this data's exact moments: the pooled reference, or a site alone."""
    return scaler_from_moments(site_moments(data, rescaled=False), shared_columns(data.schema), rescaled=False,
                               max_glm_columns=max_glm_columns)


def glm_matrix(data: SiteData, split: str, scaler: SharedScaler) -> np.ndarray:
    """The GLM's inputs on one split."""
    return scaler.glm_matrix(shared_raw(data, split))


def fit_glm(data: SiteData, scaler: SharedScaler, *, C: float) -> FederatedGLM:
    """The GLM fitted on this data's train split (pooled reference, or a site alone)."""
    from common.glm import FederatedGLM

    return FederatedGLM(C=C).fit(glm_matrix(data, "train", scaler), data.y[data.masks["train"]])


def over_all_classes(proba: np.ndarray, classes: Sequence[int], n_classes: int, *, floor: float = 1e-6) -> np.ndarray:
    """Probabilities over the ``classes`` a site-local model saw, spread over all ``n_classes``: a
    class its train split lacked gets ``floor`` (then renormalized), not a missing column."""
    seen = np.asarray(classes, dtype=int)
    if len(seen) == n_classes:
        return proba
    out = np.full((len(proba), n_classes), floor)
    out[:, seen] = proba
    return out / out.sum(axis=1, keepdims=True)


def site_forest_proba(forest: SiteForest, data: SiteData, split: str, pre: TabularPreprocessor | None) -> np.ndarray:
    """A site's forest on one split, over every class of the cohort (:func:`over_all_classes`): a
    multi-class site's train split may lack a class, and the stack reads one column per class."""
    return over_all_classes(forest.predict_proba(forest_matrix(data, split, pre)), forest.classes_, data.n_classes)


def site_glm_proba(glm: FederatedGLM, scaler: SharedScaler, data: SiteData, split: str, *,
                   classes: Sequence[int]) -> np.ndarray:
    """A site's own GLM (fitted on its train split with its own scaler) on one split, over every
    class of the cohort (:func:`over_all_classes`)."""
    return over_all_classes(glm.predict_proba(glm_matrix(data, split, scaler)), classes, data.n_classes)


def deep_data(data: SiteData, split: str, cfg: DeepModelConfig, scaler: SharedScaler | None) -> DeepData:
    """Inputs of the deep model for one split (the tracks ``cfg`` reads, in its order; the dense
    branch's columns scaled with the shared scaler)."""
    mask = data.masks[split]
    by_name = {s.name: t for s, t in zip(data.track_shapes, data.tracks)}
    tab = None
    if cfg.n_tabular:
        if scaler is None:
            raise ValueError("the deep model has a dense branch: it needs the shared scaler")
        columns = slice(0, cfg.n_tabular)
        tab = scaler.transform(shared_raw(data, split)[:, columns], columns).astype(np.float32)
    return DeepData(tracks=[by_name[s.name][mask] for s in cfg.tracks], tabular=tab, y=data.y[mask])


def forest_matrix(data: SiteData, split: str, pre: TabularPreprocessor | None,
                  embedding: GenomicNet | None = None, scaler: SharedScaler | None = None) -> np.ndarray:
    """The forest's features: preprocessed tabular columns plus sequence-derived features.

    With ``embedding`` (a trained deep model), its penultimate-layer embedding of the split is
    appended: the seed's "CNN features into a forest" variant (``scaler`` prepares its dense
    inputs).
    """
    mask = data.masks[split]
    parts = []
    if pre is not None:
        parts.append(pre.transform(data.frame.rows(mask)))
    if data.seq_features is not None:
        parts.append(data.seq_features[mask])
    if embedding is not None:
        parts.append(deep_embedding(embedding, data, split, scaler))
    return np.hstack(parts)


@torch.no_grad()
def deep_embedding(model: GenomicNet, data: SiteData, split: str, scaler: SharedScaler | None) -> np.ndarray:
    """The deep model's penultimate embedding of one split."""
    model.eval()
    d = deep_data(data, split, model.cfg, scaler)
    inputs = [torch.as_tensor(t, dtype=torch.float32) for t in d.tracks]
    if d.tabular is not None:
        inputs.append(torch.as_tensor(d.tabular, dtype=torch.float32))
    return model.embed(*inputs).numpy().astype(np.float64)


def train_deep(data: SiteData, *, cfg: DeepModelConfig, train: TrainConfig, dp: DPConfig | None,
               initial: dict | None = None, accountant_state: dict | None = None, seed: int = 0,
               scaler: SharedScaler | None = None, proximal_mu: float = 0.0,
               on_epoch: Any = None) -> tuple[GenomicNet, TrainResult]:
    """Train the deep model on the train split (early stopping on validation)."""
    model = build_model(cfg, seed=seed)
    if initial is not None:
        model.load_state_dict(initial)
    # Reverse-complement augmentation only where the spec says orientation carries no meaning.
    rc = next((i for i, t in enumerate(cfg.tracks) if t.name == "dna"), None) if data.orientation_free else None
    tc = TrainConfig(**{**train.__dict__, "reverse_complement_track": rc})
    result = train_deep_model(model, deep_data(data, "train", cfg, scaler),
                              val=deep_data(data, "validation", cfg, scaler),
                              config=tc, dp=dp, accountant_state=accountant_state, proximal_mu=proximal_mu,
                              on_epoch=on_epoch)
    return model, result


def fit_tabular_preprocessor(data: SiteData, **kw: Any) -> TabularPreprocessor | None:
    """Preprocessing fitted on the train split (None when the cohort has no tabular features)."""
    from client.preprocess import TabularPreprocessor

    if not data.has_tabular:
        return None
    return TabularPreprocessor(**kw).fit(data.frame.rows(data.masks["train"]))


def fit_forest(data: SiteData, pre: TabularPreprocessor | None, *, embedding: GenomicNet | None = None,
               scaler: SharedScaler | None = None, **kw: Any) -> SiteForest:
    """The site forest on the train split (optionally with the deep model's embedding as features)."""
    from client.forest import SiteForest

    x = forest_matrix(data, "train", pre, embedding, scaler)
    return SiteForest(**kw).fit(x, data.y[data.masks["train"]])


def fit_local_models(data: SiteData, *, forest_trees: int, glm_c: float, glm_max_features: int,
                     calibrate: bool, seed: int) -> dict[str, Any]:
    """A site's own models on its train split, as a hospital alone fits them (without DP): the forest
    with its preprocessing, the GLM with the site's own scaler, the classes it saw and its penalty
    chosen by cross-validation (:mod:`client.site_glm`; ``glm_c`` where folds cannot be had), and
    (with ``calibrate``) both models' Platt maps for the stack (:mod:`client.calibration`). The keys
    are the vault's ``model/local`` record's (:func:`client.model_store.save_local_models`)."""
    from client.calibration import FOLDS, site_model_maps
    from client.site_glm import select_site_glm_penalty
    from common.glm import FederatedGLM

    pre = fit_tabular_preprocessor(data)
    forest = fit_forest(data, pre, n_estimators=forest_trees, random_state=seed)
    scaler = fit_shared_scaler(data, max_glm_columns=glm_max_features)
    y = data.y[data.masks["train"]]
    x_glm = glm_matrix(data, "train", scaler)
    penalty = select_site_glm_penalty(x_glm, y, folds=FOLDS, seed=seed, default=glm_c)
    c = penalty.c
    maps = site_model_maps(forest=forest, glm_fit=lambda x, t: FederatedGLM(C=c).fit(x, t), x_glm=x_glm, y=y,
                           n_classes=data.n_classes, folds=FOLDS, seed=seed,
                           glm_oof=penalty.oof_proba) if calibrate else {}
    return {"forest": forest, "preprocessor": pre, "site_glm": FederatedGLM(C=c).fit(x_glm, y), "site_scaler": scaler,
            "site_glm_classes": np.unique(y).tolist(), "calibration": maps}


def meta_features(*probas: np.ndarray) -> np.ndarray:
    """Stacking inputs from base-model class probabilities: log-odds (binary) or log-probabilities.

    Working on the logit scale makes the meta-classifier a proper combination of evidence
    (a weighted sum of log-odds) rather than of probabilities. Values are clipped to
    ``[-META_FEATURE_BOUND, META_FEATURE_BOUND]``.
    """
    cols = []
    for p in probas:
        p = np.clip(p, 1e-12, 1.0)
        cols.append(np.log(p[:, 1:2] / p[:, 0:1]) if p.shape[1] == 2 else np.log(p))
    return np.clip(np.hstack(cols), -META_FEATURE_BOUND, META_FEATURE_BOUND)


def deep_proba(model: GenomicNet, data: SiteData, split: str, scaler: SharedScaler | None) -> np.ndarray:
    """Deep model probabilities on one split."""
    return predict_proba(model, deep_data(data, split, model.cfg, scaler))
