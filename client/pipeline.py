"""The site-local learning steps, shared by pooled evaluation and the federation.

A :class:`SiteData` is one cohort (a site's, or several pooled) cut into the model inputs. The
steps below (train the deep model, fit the forest, make meta-features, fit the classical
baseline) are what a site runs; pooled evaluation runs the very same functions on the union of
the sites, which is what makes it the reference for the federation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from client.dp_training import DeepData, DPConfig, TrainConfig, TrainResult, predict_proba, train_deep_model
from client.features import TabularFrame, deep_tracks, sequence_features, tabular_frame
from common.cohort import Cohort
from common.meta import META_FEATURE_BOUND
from common.model_config import deep_config_for_schema
from common.models import DeepModelConfig, GenomicNet, TrackShape, build_model

if TYPE_CHECKING:
    # scikit-learn is imported where it is used: a CNN round (a fresh process per message in a
    # deployment) then never pays for it.
    from sklearn.pipeline import Pipeline

    from client.forest import SiteForest
    from client.preprocess import TabularPreprocessor

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
    def from_cohort(cls, cohort: Cohort, *, kmer: int = 3) -> SiteData:
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


def deep_config(data: SiteData, *, pre: TabularPreprocessor | None = None, tracks: str = "auto",
                **arch: Any) -> DeepModelConfig:
    """The deep model for this data: :func:`common.model_config.deep_config_for_schema`.

    Raises
    ------
    ValueError
        If the data does not have the shapes its schema promises (a corrupted vault, or a
        preprocessor fitted on other columns).
    """
    cfg = deep_config_for_schema(data.schema, tracks=tracks, **arch)
    have = {s.name: s for s in data.track_shapes}
    for t in cfg.tracks:
        if t.name not in have or (have[t.name].channels, have[t.name].length) != (t.channels, t.length):
            raise ValueError(f"track {t.name!r}: the data does not match the schema ({have.get(t.name)} vs {t})")
    if cfg.n_tabular and pre is not None and len(pre.feature_names_out_) != cfg.n_tabular:
        raise ValueError(f"dense branch: {len(pre.feature_names_out_)} preprocessed columns, schema says {cfg.n_tabular}")
    return cfg


def deep_data(data: SiteData, split: str, cfg: DeepModelConfig, pre: TabularPreprocessor | None) -> DeepData:
    """Inputs of the deep model for one split (the tracks ``cfg`` reads, in its order)."""
    mask = data.masks[split]
    by_name = {s.name: t for s, t in zip(data.track_shapes, data.tracks)}
    tab = pre.transform(data.frame.rows(mask)).astype(np.float32) if cfg.n_tabular else None
    return DeepData(tracks=[by_name[s.name][mask] for s in cfg.tracks], tabular=tab, y=data.y[mask])


def forest_matrix(data: SiteData, split: str, pre: TabularPreprocessor | None,
                  embedding: GenomicNet | None = None, embedding_pre: TabularPreprocessor | None = None) -> np.ndarray:
    """The forest's features: preprocessed tabular columns plus sequence-derived features.

    With ``embedding`` (a trained deep model), its penultimate-layer embedding of the split is
    appended: the seed's "CNN features into a forest" variant (``embedding_pre`` prepares its
    dense inputs when they differ from the forest's, e.g. with omics PCA; default ``pre``).
    """
    mask = data.masks[split]
    parts = []
    if pre is not None:
        parts.append(pre.transform(data.frame.rows(mask)))
    if data.seq_features is not None:
        parts.append(data.seq_features[mask])
    if embedding is not None:
        parts.append(deep_embedding(embedding, data, split, embedding_pre or pre))
    return np.hstack(parts)


@torch.no_grad()
def deep_embedding(model: GenomicNet, data: SiteData, split: str, pre: TabularPreprocessor | None) -> np.ndarray:
    """The deep model's penultimate embedding of one split."""
    model.eval()
    d = deep_data(data, split, model.cfg, pre)
    inputs = [torch.as_tensor(t, dtype=torch.float32) for t in d.tracks]
    if d.tabular is not None:
        inputs.append(torch.as_tensor(d.tabular, dtype=torch.float32))
    return model.embed(*inputs).numpy().astype(np.float64)


def train_deep(data: SiteData, *, cfg: DeepModelConfig, train: TrainConfig, dp: DPConfig | None,
               initial: dict | None = None, accountant_state: dict | None = None, seed: int = 0,
               pre: TabularPreprocessor | None = None, proximal_mu: float = 0.0,
               on_epoch: Any = None) -> tuple[GenomicNet, TrainResult]:
    """Train the deep model on the train split (early stopping on validation)."""
    model = build_model(cfg, seed=seed)
    if initial is not None:
        model.load_state_dict(initial)
    # Reverse-complement augmentation only where the spec says orientation carries no meaning.
    rc = next((i for i, t in enumerate(cfg.tracks) if t.name == "dna"), None) if data.orientation_free else None
    tc = TrainConfig(**{**train.__dict__, "reverse_complement_track": rc})
    result = train_deep_model(model, deep_data(data, "train", cfg, pre), val=deep_data(data, "validation", cfg, pre),
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
               embedding_pre: TabularPreprocessor | None = None, **kw: Any) -> SiteForest:
    """The site forest on the train split (optionally with the deep model's embedding as features)."""
    from client.forest import SiteForest

    x = forest_matrix(data, "train", pre, embedding, embedding_pre)
    return SiteForest(**kw).fit(x, data.y[data.masks["train"]])


def fit_logreg(data: SiteData, pre: TabularPreprocessor | None, *, C: float = 0.1) -> Pipeline:
    """The classical baseline: L2-penalized logistic regression on the forest's features.

    That is the tabular genomic and clinical features (the polygenic-score style model) and,
    for a cohort with sequences, the same k-mer / positional features the forest sees.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=5000))
    return model.fit(forest_matrix(data, "train", pre), data.y[data.masks["train"]])


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


def deep_proba(model: GenomicNet, data: SiteData, split: str, pre: TabularPreprocessor | None) -> np.ndarray:
    """Deep model probabilities on one split."""
    return predict_proba(model, deep_data(data, split, model.cfg, pre))
