"""Scoring a global explanation against a synthetic cohort's planted truth, and against a pooled analysis.

Used by the recovery tests (tests/test_explanation_recovery.py) and ``genofed bench explanation``.
The researcher who made the cohort holds its files, as a site holds its own: names resolved from
them are read here with the site's layout (:func:`common.explanation.feature_layout`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from common.explanation import BASES

PLANTED_PREFIX = {"variants": "variant", "omics": "omics", "events": "events", "clinical": "clinical"}


def planted_features(truth: dict[str, Any]) -> set[str]:
    """The tabular features ``truth.json`` planted, as the site names them (a categorical variable once)."""
    out = {f"{PLANTED_PREFIX[t['modality']]}:{t['feature'].split('=')[0]}" for t in truth["label_model"]["terms"]
           if t["modality"] in PLANTED_PREFIX}
    return out | {f"variant:{truth['interaction']['site']}"}


def label_names(schema: dict[str, Any]) -> dict[str, str]:
    """Public label -> the site's own name, from a site's full schema."""
    from client.handlers import public_schema
    from common.explanation import feature_layout

    return dict(zip(feature_layout(public_schema(schema)).names, feature_layout(schema, named=True).names))


def precision_at(features: list[dict[str, Any]], *, schema: dict[str, Any], truth: dict[str, Any],
                 k: int = 10) -> float:
    """The share of the ranking's top ``k`` that was planted."""
    names, planted = label_names(schema), planted_features(truth)
    return sum(names[f["feature"]] in planted for f in features[:k]) / k


def within_one_mismatch(kmer: str, motif: str) -> bool:
    """Whether ``kmer`` matches part of ``motif`` or of its reverse complement with at most one mismatch."""
    rc = motif[::-1].translate(str.maketrans(BASES, BASES[::-1]))
    return any(sum(a != b for a, b in zip(kmer, s[i:i + len(kmer)])) <= 1
               for s in (motif, rc) for i in range(len(s) - len(kmer) + 1))


def pooled_ranking(cohort: Any, *, shares: dict[str, float], trees: int, glm_c: float,
                   glm_max_features: int = 256) -> list[dict[str, Any]]:
    """The consensus ranking of :func:`pooled_explanation`."""
    return pooled_explanation(cohort, shares=shares, trees=trees, glm_c=glm_c,
                              glm_max_features=glm_max_features)["features"]


def pooled_explanation(cohort: Any, *, shares: dict[str, float], trees: int, glm_c: float,
                       glm_max_features: int = 256) -> dict[str, Any]:
    """The global explanation of the tabular models fitted on pooled data, explained on its
    validation split with the sites' estimator (unit-scaled patients), its consensus ``features``
    weighted by the run's ``shares``: the pooled analysis a federation's explanation should agree
    with, model by model (``models``) and as a whole.

    The models are those whose attributions the federation sums: a forest, the GLM at ``glm_c``
    (the federated GLM's pooled equal) and, for the sites' own GLMs, a GLM whose penalty is chosen
    on the pooled train split by the rule every site applies to its own
    (:func:`client.site_glm.choose_site_glm_c`)."""
    from client.calibration import FOLDS
    from client.explain import attribution_sums, forest_attributions
    from client.handlers import public_schema
    from client.pipeline import (
        SiteData,
        fit_forest,
        fit_shared_scaler,
        fit_tabular_preprocessor,
        forest_matrix,
        glm_matrix,
    )
    from client.site_glm import choose_site_glm_c
    from common.explanation import consensus_ranking, feature_layout, global_explanation

    data = SiteData.from_cohort(cohort)
    layout = feature_layout(cohort.schema, named=True)
    pre = fit_tabular_preprocessor(data)
    forest = fit_forest(data, pre, n_estimators=trees, random_state=0)
    scaler = fit_shared_scaler(data, max_glm_columns=glm_max_features)
    site_c = choose_site_glm_c(glm_matrix(data, "train", scaler), data.y[data.masks["train"]], folds=FOLDS, seed=0,
                               default=glm_c)
    forest_phi = layout.group(forest_attributions(forest, forest_matrix(data, "validation", pre),
                                                  n_classes=len(cohort.classes)))
    sums = {f"forest.{k}": v for k, v in attribution_sums(forest_phi, clip=1.0, normalize=True).items()}
    for model, c in (("logreg", glm_c), ("site-logreg", site_c)):
        phi = _glm_attributions(data, scaler, layout, c=c, n_classes=len(cohort.classes))
        sums |= {f"{model}.{k}": v for k, v in attribution_sums(phi, clip=1.0, normalize=True).items()}
    public = public_schema(cohort.schema)
    pooled = global_explanation(sums, schema=public, classes=list(cohort.classes),
                                patients=int(data.masks["validation"].sum()), motifs=None)
    features = consensus_ranking(pooled["models"], shares, feature_layout(public), pooled["outputs"])
    return {**pooled, "features": features, "shares": dict(shares)}


def _glm_attributions(data: Any, scaler: Any, layout: Any, *, c: float, n_classes: int) -> np.ndarray:
    """A GLM fitted at ``c`` on the train split, attributed on the validation split, per feature."""
    from client.explain import linear_attributions
    from client.pipeline import fit_glm, glm_matrix
    from common.meta import flat_coef

    phi = linear_attributions(flat_coef(fit_glm(data, scaler, C=c)), glm_matrix(data, "validation", scaler),
                              n_classes=n_classes)
    full = np.zeros((*phi.shape[:2], len(layout.column_feature)))
    full[:, :, scaler.glm_columns] = phi
    return layout.group(full)


def spearman_top(reference: list[dict[str, Any]], federated: list[dict[str, Any]], *, top: int = 20) -> float:
    """Spearman correlation of the importances over the reference ranking's ``top`` features."""
    from scipy.stats import spearmanr

    fed = {f["feature"]: f["importance"] for f in federated}
    head = reference[:top]
    return float(spearmanr([f["importance"] for f in head], [fed[f["feature"]] for f in head]).statistic)


def noised_explanation(sites: list[tuple[str, Path, Path]], *, run_id: str, settings: Any) -> dict[str, Any]:
    """Every site's real explanation release of its stored final models (charged to its ledger), summed
    and read as the coordinator reads them. ``sites``: (name, vault, key file)."""
    from client.cohort_store import load_cohort
    from client.explain_release import explain
    from client.handlers import public_schema
    from client.model_store import CNN_ROLE, META_ROLE, SHARED_ROLE, arrays_from_bytes
    from client.site import SiteRef
    from client.vault import KeySource, Vault
    from common.explanation import global_explanation, motif_layout
    from common.settings import RoundFacts

    total: dict[str, np.ndarray] = {}
    patients, schema, config = 0, None, None
    for name, vault_path, key in sites:
        vault = Vault.open(vault_path, KeySource.from_key_file(key))
        cnn, meta = arrays_from_bytes(vault.read(CNN_ROLE))
        coefs = json.loads(vault.read(META_ROLE))
        facts = RoundFacts(run_id=run_id, model_config=json.dumps(meta["config"]), coef=tuple(coefs["coef"]),
                           glm_coef=tuple(coefs["glm_coef"]))
        reply = explain(SiteRef(name=name, vault=vault_path, key_file=key), cnn,
                        arrays_from_bytes(vault.read(SHARED_ROLE))[0], settings, facts)
        for k, v in reply.values("summary").items():
            total[k] = total.get(k, 0.0) + v
        patients += int(reply.values("metrics")["num-examples"])
        schema, config, classes = public_schema(load_cohort(vault).schema), meta["config"], coefs["classes"]
    motifs = motif_layout(schema, config, k=settings.motif_k, bins=settings.motif_bins)
    return global_explanation(total, schema=schema, classes=classes, patients=patients, motifs=motifs)
