"""Phase 5 on a site: the explanation release (``query.explain``).

A site explains the run's final models on a seeded sample of its validation split and releases,
once per run, clipped sums of its patients' attributions (:mod:`client.explain`):

- ``forest.*``: the site forest's TreeSHAP (probability scale), per explanation feature;
- ``logreg.*``: the federated GLM's exact linear attributions (log-odds), per feature;
- ``site-logreg.*``: the site's own GLM's exact linear attributions (log-odds, its own scaler), per feature;
- ``profile.<track>.*``: the deep model's integrated gradients per track position;
- ``motifs.dna``: those attributions summed per (k-mer, position bin) of the DNA track;
- ``shares``: each base model's absolute contribution to the meta-classifier's log-odds.

Each patient's array is scaled to unit L2 norm per summary (:data:`UNIT`): every patient weighs the
same whatever the scale of a model's output (probability or log-odds), and one patient moves the
whole weighted release by at most :func:`common.explanation.summary_sensitivity`; under DP every
entry gets Gaussian noise for ``explanation-epsilon`` (less on the feature rankings' absolute sums,
:data:`common.explanation.SUMMARY_WEIGHTS`), charged to the ledger before anything is computed.
Per-patient attributions never leave: only these sums do, each declared in the egress contract.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from client.handlers import (
    HandlerReply,
    _base_probabilities,
    _load,
    _model_config,
    _n_classes,
    _noise_share,
    _privacy,
    _scaler,
)
from client.site import SiteRef
from common.settings import RoundFacts, RunSettings

UNIT = 1.0
"""The L2 norm every patient's attributions are scaled to, per summary (the noise is calibrated to it)."""

IG_STEPS = 32
"""Integrated-gradients steps: global sums need less than a single patient's exact completeness,
and 32 steps take about 5 s for 200 sequences of 200 bases here, 64 steps 12-17 s (scratch timing)."""


def explain(site: SiteRef, cnn_weights: dict[str, np.ndarray], shared: dict[str, np.ndarray],
            settings: RunSettings, facts: RoundFacts) -> HandlerReply:
    """The site's explanation release (once per run; asked again, the stored release is sent).

    Raises
    ------
    client.privacy.policy.PolicyRefusal
        The run asks for more than the site's policy allows.
    client.privacy.ledger.PrivacyBudgetExceeded
        Before any work, when the release would exceed the site's budget.
    """
    from client.model_store import run_role
    from client.pipeline import SiteData
    from client.privacy.egress import contract_for
    from client.privacy.ledger import Release
    from common.explanation import motif_layout, summary_noise_sd, summary_sensitivity, summary_shapes

    vault, cohort = _load(site)
    privacy = _privacy(vault, site, cohort, settings, facts)
    k = _n_classes(cohort)
    motifs = motif_layout(cohort.schema, facts.model(), k=settings.motif_k, bins=settings.motif_bins)
    shapes = summary_shapes(cohort.schema, n_classes=k, model_config=facts.model(), motifs=motifs)
    contract = contract_for("query.explain", dp=settings.dp, n_classes=k, summary_shapes=shapes)
    role = run_role(facts.run_id, "explanation-release")
    if again := privacy.stored_release(role, request="one-per-run"):
        return HandlerReply({"summary": ("array", again[0]), "metrics": ("metric", again[1])}, contract, privacy)
    data = SiteData.from_cohort(cohort)
    data.masks["explain"] = _sample(data.masks["validation"], settings.explanation_patients,
                                    seed=privacy.seed(purpose="explanation-sample"))
    metrics: dict[str, Any] = {"num-examples": int(data.masks["explain"].sum()), "epsilon": 0.0, "noise-std": 0.0}
    rng = None
    if settings.dp:
        sigma = privacy.explanation_noise_multiplier()
        release = Release.gaussian(noise_multiplier=sigma, label="explanation", run_id=facts.run_id)
        privacy.refuse_over_budget([release], round=0)
        rng = np.random.default_rng(privacy.release(release, purpose="explanation"))
    sums = _attribution_sums(vault, cohort, data, cnn_weights, shared, settings, facts, privacy, motifs)
    if rng is not None:
        added = sigma * _noise_share(vault, settings, facts, privacy)  # a share of it under distributed noise
        sds = summary_noise_sd(shapes, clip=UNIT, noise_multiplier=added)
        # Under secure sum the coordinator clips the sum: clipping each share would bias it upwards.
        sums = {name: _noised(name, sums[name], sds[name], rng, clip=not facts.secure) for name in sorted(sums)}
        # The noise of a summary of unit weight (the rankings' absolute sums get less: SUMMARY_WEIGHTS).
        metrics |= {"epsilon": float(privacy.ledger.spent_epsilon()),
                    "noise-std": float(added * summary_sensitivity(shapes, clip=UNIT))}
    vault.update({role: privacy.release_blob(sums, metrics, request="one-per-run")})
    return HandlerReply({"summary": ("array", sums), "metrics": ("metric", metrics)}, contract, privacy)


def _sample(mask: np.ndarray, most: int, *, seed: int) -> np.ndarray:
    """At most ``most`` of the rows in ``mask``, chosen with the site's own seed."""
    rows = np.flatnonzero(mask)
    if len(rows) > most:
        rows = np.sort(np.random.default_rng(seed).choice(rows, size=most, replace=False))
    out = np.zeros_like(mask, dtype=bool)
    out[rows] = True
    return out


def _noised(name: str, value: np.ndarray, sd: float, rng: np.random.Generator, *, clip: bool = True) -> np.ndarray:
    out = np.asarray(value, dtype=np.float64) + rng.normal(0.0, sd, size=np.shape(value))
    from common.explanation import clip_nonnegative

    return clip_nonnegative(name, out) if clip else out


def _attribution_sums(vault: Any, cohort: Any, data: Any, cnn_weights: dict[str, np.ndarray],
                      shared: dict[str, np.ndarray], settings: RunSettings, facts: RoundFacts, privacy: Any,
                      motifs: Any) -> dict[str, np.ndarray]:
    """Every summary of the release, exact (the caller adds the noise)."""
    from common.explanation import feature_layout

    clip = UNIT
    layout = feature_layout(cohort.schema, named=True)
    # Fits (and stores) the run's forest if this site has none yet, and gives the meta-features.
    proba, local = _base_probabilities(vault, data, cnn_weights, shared, settings, facts, privacy, "explain")
    sums = {}
    sums |= _prefixed("forest", _forest_sums(local, data, layout, clip))
    sums |= _prefixed("logreg", _glm_sums(data, shared, facts, layout, cohort, clip))
    sums |= _prefixed("site-logreg", _site_glm_sums(local, data, layout, cohort, clip))
    sums |= _deep_sums(cohort, data, cnn_weights, shared, facts, motifs, clip)
    sums["shares"] = _share_sums(proba, facts, _n_classes(cohort), clip, calibration=local.get("calibration") or {})
    return sums


def _prefixed(model: str, sums: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {f"{model}.{key}": value for key, value in sums.items()}


def _forest_sums(stored: dict[str, Any], data: Any, layout: Any, clip: float) -> dict[str, np.ndarray]:
    """The site forest's attributions per feature (``stored``: the site's local models)."""
    from client.explain import attribution_sums, forest_attributions
    from client.pipeline import forest_matrix

    x = forest_matrix(data, "explain", stored["preprocessor"])
    phi = forest_attributions(stored["forest"], x, n_classes=data.n_classes)
    return attribution_sums(layout.group(phi), clip=clip, normalize=True)


def _glm_sums(data: Any, shared: dict[str, np.ndarray], facts: RoundFacts, layout: Any, cohort: Any,
              clip: float) -> dict[str, np.ndarray]:
    """The federated GLM's attributions per feature."""
    return _linear_sums(np.asarray(facts.glm_coef, dtype=np.float64), _scaler(shared), data, layout, cohort, clip)


def _site_glm_sums(stored: dict[str, Any], data: Any, layout: Any, cohort: Any, clip: float) -> dict[str, np.ndarray]:
    """The site's own GLM's attributions per feature (on its own scaler's columns; ``stored``: the
    site's local models)."""
    from client.explain import site_glm_rows

    coef = site_glm_rows(stored["site_glm"], classes=stored["site_glm_classes"], n_classes=_n_classes(cohort))
    return _linear_sums(coef, stored["site_scaler"], data, layout, cohort, clip)


def _linear_sums(coef: np.ndarray, scaler: Any, data: Any, layout: Any, cohort: Any,
                 clip: float) -> dict[str, np.ndarray]:
    """A GLM's attributions on its columns, placed among all shared columns, per feature."""
    from client.explain import attribution_sums, linear_attributions
    from client.pipeline import glm_matrix

    phi = linear_attributions(coef, glm_matrix(data, "explain", scaler), n_classes=_n_classes(cohort))
    full = np.zeros((*phi.shape[:2], len(layout.column_feature)))
    full[:, :, scaler.glm_columns] = phi
    return attribution_sums(layout.group(full), clip=clip, normalize=True)


def _deep_sums(cohort: Any, data: Any, cnn_weights: dict[str, np.ndarray], shared: dict[str, np.ndarray],
               facts: RoundFacts, motifs: Any, clip: float) -> dict[str, np.ndarray]:
    """Integrated gradients of the global deep model: per-track position profiles and DNA motifs."""
    import torch

    from client.explain import attribution_sums, deep_attributions, motif_sums, position_profile
    from client.pipeline import deep_data
    from common.models import build_model

    cfg = _model_config(facts)
    model = build_model(cfg)
    model.load_state_dict({k: torch.as_tensor(v) for k, v in cnn_weights.items()})
    d = deep_data(data, "explain", cfg, _scaler(shared))
    inputs = [*d.tracks, *([d.tabular] if d.tabular is not None else [])]
    attributions = deep_attributions(model, inputs, steps=IG_STEPS, batch_size=8)
    sums = {}
    for track, phi in zip(cfg.tracks, attributions):
        profile = position_profile(phi)
        sums |= _prefixed(f"profile.{track.name}", attribution_sums(profile, clip=clip, normalize=True))
        if track.name == "dna" and motifs is not None:
            codes = cohort.sequences[data.masks["explain"]]
            sums["motifs.dna"] = motif_sums(codes, profile, motifs, clip=clip, normalize=True)
    return sums


def _share_sums(proba: dict[str, np.ndarray], facts: RoundFacts, n_classes: int, clip: float, *,
                calibration: dict[str, Any]) -> np.ndarray:
    """Per base model, the clipped sum of its absolute contribution to the meta-classifier's log-odds."""
    from client.calibration import stacking_probabilities
    from client.explain import clip_patients, linear_attributions
    from client.pipeline import meta_features
    from common.explanation import BASE_SHARE_MODELS

    read = stacking_probabilities(proba, calibration)
    x = meta_features(*(read[m] for m in BASE_SHARE_MODELS))
    phi = np.abs(linear_attributions(np.asarray(facts.coef, dtype=np.float64), x, n_classes=n_classes))
    per_model = phi.sum(axis=1).reshape(len(x), len(BASE_SHARE_MODELS), -1).sum(axis=2)  # (n, models)
    return clip_patients(per_model, clip=clip, normalize=True).sum(axis=0)
