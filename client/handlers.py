"""What a site does for each phase of a federated run, on plain Python and numpy values.

The ClientApp (``client/client_app.py``) parses the run config into :class:`RunSettings` and the
message into :class:`RoundFacts`, calls one function here, checks the reply against its egress
contract, logs it and sends it. Every function opens the site's vault, decrypts what it needs in
memory, and writes anything it must keep (fitted forest, DP accountant, ledger, final models)
back into the vault. Nothing about a patient leaves: the replies are model weights, aggregate
statistics and counts, each declared in :mod:`client.privacy.egress`.

Privacy goes through :class:`client.privacy.facade.SitePrivacy`: every handler checks the run's
settings against the site's policy; every release is charged to the ledger *before* it is
computed, and its randomness is seeded from the vault key, the run id and the charge's sequence
number, never from the run config.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from client.privacy.egress import EgressContract, contract_for
from client.site import SiteRef
from common.settings import RoundFacts, RunSettings
from common.stack import BASE_MODELS, MODEL_NAMES, local_indices, reduced_stacks, reduced_stack_weights, released_models

log = logging.getLogger("genofed.client")


@dataclass
class HandlerReply:
    """A reply before it is sent: records by name, the contract it must keep, the site's façade.

    ``records`` maps a record name to ``("array" | "metric" | "config", {key: value})``.
    """

    records: dict[str, tuple[str, dict[str, Any]]]
    contract: EgressContract
    privacy: Any

    def values(self, record: str) -> dict[str, Any]:
        """The values of one record."""
        return self.records[record][1]


def _load(site: SiteRef) -> tuple[Any, Any]:
    from client.cohort_store import load_cohort

    vault = site.open_vault()
    return vault, load_cohort(vault)


def _privacy(vault: Any, site: SiteRef, cohort: Any, settings: RunSettings, facts: RoundFacts, *,
             check: bool = True) -> Any:
    """The site's privacy façade for this message; refuses settings outside the site's policy."""
    from client.privacy.facade import SitePrivacy

    privacy = SitePrivacy.open(vault, site=site.name, settings=settings, run_id=facts.run_id, n_records=cohort.n)
    if check:
        privacy.check()
    return privacy


def _noise_share(vault: Any, settings: RunSettings, facts: RoundFacts, privacy: Any) -> float:
    """The part of a release's noise this site adds (1 unless the noise is distributed over a secure sum)."""
    from client.secure_release import noise_share

    return noise_share(vault, settings, facts, privacy.policy)


def _n_classes(cohort: Any) -> int:
    return max(len(cohort.classes), 2)


# ---------------------------------------------------------------------------------------------
# Phase 0: census


def public_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` with feature lists the site resolved from its own data replaced by their counts.

    The coordinator needs only the layout (how many variant sites, omics and event features) to
    build the models; the names found in one hospital's files stay there. Sites whose lists
    differ still differ in their schema hash.
    """
    out = json.loads(json.dumps(schema))
    for kind, key in (("variants", "sites"), ("omics", "features"), ("events", "features")):
        if kind in out and isinstance(out[kind].get(key), list):
            out[kind][key] = len(out[kind][key])
    return out


def census(site: SiteRef, settings: RunSettings, facts: RoundFacts) -> HandlerReply:
    """Schema hash, counts, privacy budget and whether the run's whole plan fits the site's policy."""
    from client.privacy.policy import PolicyRefusal

    vault, cohort = _load(site)
    privacy = _privacy(vault, site, cohort, settings, facts, check=False)
    summary = cohort.summary()
    n_train = summary["splits"]["train"]["patients"]
    refusal, plan_eps = "", 0.0
    try:
        privacy.check()
        plan_eps = privacy.check_run(privacy.plan_run(n_train=n_train))
    except PolicyRefusal as exc:
        refusal = "; ".join(exc.reasons)
    ledger = privacy.ledger
    info = {"site": site.name, "schema-hash": cohort.schema_hash,
            "schema-json": json.dumps(public_schema(cohort.schema), sort_keys=True),
            "n-train": n_train, "n-validation": summary["splits"]["validation"]["patients"],
            "n-test": summary["splits"]["test"]["patients"],
            "class-counts": [int(v) for v in summary["classes"].values()],
            "test-class-counts": [int(v) for v in summary["splits"]["test"]["classes"].values()],
            "validation-class-counts": [int(v) for v in summary["splits"]["validation"]["classes"].values()],
            "ledger-spent": float(ledger.spent_epsilon()), "ledger-budget": float(ledger.budget_epsilon),
            "ledger-delta": float(ledger.delta), "ledger-created": ledger.created_at,
            "ledger-revision": int(ledger.revision), "plan-epsilon": float(plan_eps), "refusal": refusal}
    return HandlerReply({"census": ("config", info), "metrics": ("metric", {"num-examples": int(n_train)})},
                        contract_for("query.census", dp=settings.dp, n_classes=len(cohort.classes)), privacy)


# ---------------------------------------------------------------------------------------------
# Phase 0b: the shared preprocessing's moments


def moments(site: SiteRef, settings: RunSettings, facts: RoundFacts) -> HandlerReply:
    """Additive moments of the shared columns on the train split (common/tabular.py).

    Under DP every value is clipped to its column's public range and rescaled to [0, 1], and
    the count, sum and sum of squares are released together through the Gaussian mechanism
    (sensitivity ``sqrt(3 d)``), charged first. Once per run: asked again, the site sends the
    stored release.
    """
    from client.model_store import run_role
    from client.pipeline import SiteData, site_moments
    from client.privacy.ledger import Release
    from client.privacy.mechanisms import noised_moments
    from common.tabular import moments_sensitivity, shared_columns

    vault, cohort = _load(site)
    privacy = _privacy(vault, site, cohort, settings, facts)
    n_columns = shared_columns(cohort.schema).width
    contract = contract_for("query.moments", dp=settings.dp, n_classes=len(cohort.classes), n_columns=n_columns)
    role = run_role(facts.run_id, "moments-release")
    if again := privacy.stored_release(role, request="one-per-run"):
        return HandlerReply({"moments": ("array", again[0]), "metrics": ("metric", again[1])}, contract, privacy)
    data = SiteData.from_cohort(cohort)
    metrics: dict[str, Any] = {"num-examples": int(data.masks["train"].sum())}
    if settings.dp:
        sigma = privacy.moments_noise_multiplier()
        release = Release.gaussian(noise_multiplier=sigma, label="moments", run_id=facts.run_id)
        rng = np.random.default_rng(privacy.release(release, purpose="moments"))
        added = sigma * _noise_share(vault, settings, facts, privacy)
        arrays = noised_moments(site_moments(data, rescaled=True), sensitivity=moments_sensitivity(n_columns),
                                noise_multiplier=added, rng=rng)
        metrics |= {"epsilon": float(privacy.ledger.spent_epsilon()), "noise-multiplier": float(added)}
    else:
        # A secure sum's fixed point needs moderate values: rescaled, not clipped (undone by the coordinator).
        arrays = site_moments(data, rescaled=settings.secure_sum, clip=False)
    vault.update({role: privacy.release_blob(arrays, metrics, request="one-per-run")})
    return HandlerReply({"moments": ("array", arrays), "metrics": ("metric", metrics)}, contract, privacy)


def _scaler(shared: dict[str, np.ndarray]) -> Any:
    from common.tabular import SharedScaler

    return SharedScaler.from_arrays(shared)


# ---------------------------------------------------------------------------------------------
# Phase 1: a CNN round


def _model_config(facts: RoundFacts) -> Any:
    from common.models import DeepModelConfig

    return DeepModelConfig.from_dict(facts.model())


def _dp_config(settings: RunSettings, delta: float) -> Any:
    from client.dp_training import DPConfig

    if not settings.dp:
        return None
    return DPConfig(target_epsilon=settings.epsilon, target_delta=delta, max_grad_norm=settings.max_grad_norm,
                    total_epochs=settings.cnn_rounds * settings.local_epochs)


def _planned_release(dp: Any, state: dict | None, n_train: int, settings: RunSettings, run_id: str,
                     rnd: int) -> Any:
    """The DP-SGD release this round will make, known before training."""
    from client.dp_training import calibrate_noise
    from client.privacy.ledger import Release

    if state:
        sigma, q = float(state["noise_multiplier"]), float(state["sample_rate"])
    else:
        sigma, q = calibrate_noise(n_train=n_train, dp=dp, batch_size=settings.batch_size)
    steps = settings.local_epochs * math.ceil(n_train / settings.batch_size)
    return Release(kind="dp-sgd", noise_multiplier=sigma, sample_rate=q, steps=steps, label="cnn-update",
                   run_id=run_id, round=rnd)


def _beyond(actual: list[Any], planned: Any) -> list[Any]:
    """The part of ``actual`` releases that the charged ``planned`` one does not cover."""
    from dataclasses import replace

    extra = []
    for r in actual:
        same = (r.noise_multiplier, r.sample_rate) == (planned.noise_multiplier, planned.sample_rate)
        if not same:
            extra.append(r)
        elif r.steps > planned.steps:
            extra.append(replace(r, steps=r.steps - planned.steps))
    return extra


def _model_shapes(model_cfg: Any) -> dict[str, tuple[int, ...]]:
    from common.models import build_model

    return {k: tuple(v.shape) for k, v in build_model(model_cfg).state_dict().items()}


def train_round(site: SiteRef, global_weights: dict[str, np.ndarray], shared: dict[str, np.ndarray],
                settings: RunSettings, facts: RoundFacts) -> HandlerReply:
    """Local (DP-)SGD from the global weights; returns the new weights and round metrics.

    Under DP the round's release is charged before training (its seed comes from the charge)
    and stored in the vault with a digest of the request; the same request again (a coordinator
    resumed from a checkpoint taken before it aggregated this round) gets the stored release
    back, neither trained nor charged again. No loss leaves under DP.

    Raises
    ------
    client.privacy.policy.PolicyRefusal
        The run asks for more than the site's policy allows.
    client.privacy.ledger.PrivacyBudgetExceeded
        Before any training, when this round's release would exceed the site's budget.
    """
    import torch

    from client.dp_training import TrainConfig
    from client.model_store import (
        get_json,
        request_digest,
        run_role,
        save_start_weights,
    )
    from client.pipeline import SiteData, deep_config, train_deep
    from client.privacy.ledger import Release

    vault, cohort = _load(site)
    privacy = _privacy(vault, site, cohort, settings, facts)
    model_cfg = _model_config(facts)
    contract = contract_for("train", dp=settings.dp, n_classes=len(cohort.classes),
                            model_shapes=_model_shapes(model_cfg))
    run_id, rnd = facts.run_id, facts.server_round
    release_role = run_role(run_id, "cnn-release")
    request = request_digest({"settings": settings.release_settings(), "facts": facts.to_config()}, global_weights)
    if settings.dp and (again := privacy.stored_release(release_role, request=request)):
        return _train_reply(again[0], again[1], site, contract, privacy)  # charged once, sent again
    data = SiteData.from_cohort(cohort)
    if deep_config(data, arch=model_cfg.arch).to_dict()["tracks"] != model_cfg.to_dict()["tracks"]:
        raise ValueError(f"site {site.name}: its data does not fit the coordinator's model")
    n_train = int(data.masks["train"].sum())
    if rnd == 1:
        save_start_weights(vault, global_weights, run_id=run_id)
    dp = _dp_config(settings, privacy.delta)
    state_role = run_role(run_id, "dpsgd")
    state = get_json(vault, state_role)
    planned = None
    if dp is not None:
        planned = _planned_release(dp, state, n_train, settings, run_id, rnd)
        seed = privacy.release(planned, purpose="cnn-round")
    else:
        seed = privacy.seed(purpose="cnn-round", round=rnd)
    train_cfg = TrainConfig(epochs=settings.local_epochs, batch_size=settings.batch_size, lr=settings.lr,
                            weight_decay=settings.weight_decay, patience=settings.local_epochs + 1, seed=seed,
                            select_best=False)
    initial = {k: torch.as_tensor(v) for k, v in global_weights.items()}
    model, result = train_deep(data, cfg=model_cfg, train=train_cfg, dp=dp, initial=initial, accountant_state=state,
                               scaler=_scaler(shared), proximal_mu=settings.fedprox_mu)
    metrics: dict[str, Any] = {"num-examples": n_train}
    if dp is None:
        metrics |= {"train-loss": float(result.history[-1]["train_loss"]),
                    "val-loss": float(result.history[-1].get("val_loss", float("nan")))}
    else:
        # Opacus folds steps with the same (sigma, q) into its last history entry: diff the states.
        actual = Release.from_accountant_state(result.accountant_state, previous=state, label="cnn-update",
                                               run_id=run_id, round=rnd)
        if extra := _beyond(actual, planned):
            privacy.release(extra, purpose="cnn-round-extra")  # more steps than planned: charged before sending
        metrics |= {"epsilon": float(privacy.ledger.spent_epsilon()), "run-epsilon": float(result.epsilon),
                    "delta": float(dp.target_delta)}
    weights = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    if dp is not None:  # one atomic write: the accountant and the release it accounted for
        vault.update({state_role: json.dumps(result.accountant_state, sort_keys=True).encode("utf-8"),
                      release_role: privacy.release_blob(weights, metrics, request=request)})
    return _train_reply(weights, metrics, site, contract, privacy)


def _train_reply(weights: dict, metrics: dict, site: SiteRef, contract: EgressContract, privacy: Any) -> HandlerReply:
    return HandlerReply({"arrays": ("array", weights), "metrics": ("metric", dict(metrics)),
                         "site": ("config", {"site": site.name})}, contract, privacy)


# ---------------------------------------------------------------------------------------------
# Phases 2-3: the GLM's and the meta-classifier's Newton terms (the forest is fitted on the way)


def glm_dim_of(shared: dict[str, np.ndarray], n_classes: int) -> int:
    """Flat coefficient count of the GLM over the coordinator's chosen columns."""
    from common.glm import glm_dim

    return glm_dim(len(shared["glm_columns"]), n_classes)


def glm_round(site: SiteRef, shared: dict[str, np.ndarray], settings: RunSettings,
              facts: RoundFacts) -> HandlerReply:
    """Gradient and Hessian of the GLM's log-loss on the train split at the coordinator's coefficients.

    The inputs are the shared columns, imputed, standardized and clipped with the coordinator's
    shared scaler (so one record's design row is bounded). The coordinator starts from zero (no
    local fit is asked for). Under DP the site releases only a noised gradient, in the one GLM round a DP run has
    (``glm-epsilon``; :mod:`common.glm` says why), charged first.

    Raises
    ------
    client.privacy.policy.PolicyRefusal
        The run asks for more than the site's policy allows.
    client.privacy.ledger.PrivacyBudgetExceeded
        Before any work, when this round's release would exceed the site's budget.
    """
    from client.pipeline import SiteData, glm_matrix
    from client.privacy.mechanisms import private_glm_gradient

    vault, cohort = _load(site)
    privacy = _privacy(vault, site, cohort, settings, facts)
    k = _n_classes(cohort)
    dim = glm_dim_of(shared, k)
    contract = contract_for("train.glm", dp=settings.dp, n_classes=k, glm_dim=dim, warm_start=False)

    def inputs() -> tuple[np.ndarray, np.ndarray]:
        data = SiteData.from_cohort(cohort)
        return glm_matrix(data, "train", _scaler(shared)), data.y[data.masks["train"]]

    def mechanism(coef: np.ndarray, x: np.ndarray, y: np.ndarray, noise: float, rng: Any) -> dict[str, np.ndarray]:
        return {"grad": private_glm_gradient(coef, x, y, n_classes=k, noise_multiplier=noise, rng=rng)}

    records = _newton_records(vault, privacy, settings, facts, inputs, shared, n_classes=k, warm=False,
                              mechanism=mechanism, sigma=privacy.glm_noise_multiplier, label="glm", local=None)
    return HandlerReply(records, contract, privacy)


def _newton_records(vault: Any, privacy: Any, settings: RunSettings, facts: RoundFacts, inputs: Any,
                    request_arrays: dict[str, np.ndarray], *, n_classes: int, warm: bool, mechanism: Any,
                    sigma: Any, label: str, local: Any) -> dict[str, tuple[str, dict[str, Any]]]:
    """One round's Newton terms of a federated logistic fit: exact, or a charged Gaussian release.

    Under DP ``mechanism(coef, x, y, noise_multiplier, rng)`` makes the released arrays. The
    release is stored with a digest of the request; the same request again (a coordinator
    resumed from a checkpoint) gets the stored release back, charged once.
    """
    from client.model_store import (
        request_digest,
        run_role,
    )
    from client.privacy.ledger import Release
    from common.meta import flat_coef, newton_terms

    coef = np.asarray(facts.coef, dtype=np.float64)
    if not settings.dp:
        x, y = inputs()
        terms = newton_terms(coef, x, y, n_classes=n_classes)
        arrays = {"grad": terms.grad, "hess": terms.hess}
        if warm:
            # A site whose split lacks a class of the cohort cannot fit the stack alone over every
            # class: it offers the starting point instead, which leaves the warm start to the others.
            local_coef = flat_coef(local().fit(x, y)) if len(np.unique(y)) == n_classes else coef
            arrays |= {"local_coef": local_coef, "local_hess": newton_terms(local_coef, x, y,
                                                                            n_classes=n_classes).hess}
        return {"terms": ("array", arrays),
                "metrics": ("metric", {"num-examples": int(terms.n), "loss": float(terms.loss)})}
    request = request_digest({"settings": settings.release_settings(), "facts": facts.to_config()}, request_arrays)
    release_role = run_role(facts.run_id, f"{label}-release")
    if again := privacy.stored_release(release_role, request=request):
        return {"terms": ("array", again[0]), "metrics": ("metric", again[1])}
    noise = sigma()
    release = Release.gaussian(noise_multiplier=noise, label=f"{label}-statistics", run_id=facts.run_id,
                               round=facts.server_round)
    privacy.refuse_over_budget([release], round=facts.server_round)  # before fitting anything for nothing
    x, y = inputs()
    rng = np.random.default_rng(privacy.release(release, purpose=f"{label}-noise"))
    added = noise * _noise_share(vault, settings, facts, privacy)
    arrays = mechanism(coef, x, y, added, rng)
    metrics = {"num-examples": int(len(y)), "epsilon": float(privacy.ledger.spent_epsilon()),
               "noise-multiplier": float(added)}
    vault.update({release_role: privacy.release_blob(arrays, metrics, request=request)})
    return {"terms": ("array", arrays), "metrics": ("metric", metrics)}


def _base_probabilities(vault: Any, data: Any, cnn_weights: dict, shared: dict[str, np.ndarray],
                        settings: RunSettings, facts: RoundFacts, privacy: Any,
                        split: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The base models' class probabilities on one split, and the site's own models (forest, GLM
    and their Platt maps for the stack: :mod:`client.calibration`) that gave them, fitted once per
    run (:func:`_local_models`); callers read the maps with ``local.get("calibration") or {}``."""
    import torch

    from client.pipeline import deep_proba, glm_matrix, site_forest_proba, site_glm_proba
    from common.glm import FederatedGLM
    from common.models import build_model

    local = _local_models(vault, data, settings, facts, privacy)
    scaler = _scaler(shared)
    model = build_model(_model_config(facts))
    model.load_state_dict({k: torch.as_tensor(v) for k, v in cnn_weights.items()})
    x_glm = glm_matrix(data, split, scaler)
    glm = FederatedGLM().set_coef(np.asarray(facts.glm_coef, dtype=np.float64), n_features=x_glm.shape[1])
    proba = {"cnn": deep_proba(model, data, split, scaler),
             "forest": site_forest_proba(local["forest"], data, split, local["preprocessor"]),
             "logreg": glm.predict_proba(x_glm),
             "site-logreg": site_glm_proba(local["site_glm"], local["site_scaler"], data, split,
                                           classes=local["site_glm_classes"])}
    return proba, local


def _local_models(vault: Any, data: Any, settings: RunSettings, facts: RoundFacts, privacy: Any) -> dict[str, Any]:
    """The site's forest and its own GLM (with its own scaler), fitted on its train split once per
    run and kept in its vault: like a hospital alone, without DP; they never leave the site."""
    from client.model_store import load_local_models, save_local_models
    from client.pipeline import fit_local_models

    stored = load_local_models(vault)
    if stored is not None and stored.get("run_id") == facts.run_id and "site_glm" in stored:
        return stored
    seed = privacy.seed(purpose="forest") % (2**31)
    local = fit_local_models(data, forest_trees=settings.forest_trees, glm_c=settings.glm_c,
                             glm_max_features=settings.glm_max_features,
                             calibrate=settings.calibrate_site_models, seed=seed)
    save_local_models(vault, run_id=facts.run_id, **local)
    return {**local, "run_id": facts.run_id}


def meta_dim(n_classes: int) -> int:
    """Flat coefficient count of the meta-classifier over the base models' scores."""
    from common.meta import n_params

    return n_params(len(BASE_MODELS) * (1 if n_classes == 2 else n_classes), n_classes)


def meta_round(site: SiteRef, cnn_weights: dict[str, np.ndarray], shared: dict[str, np.ndarray],
               settings: RunSettings, facts: RoundFacts) -> HandlerReply:
    """Gradient and Hessian of the meta-classifier's log-loss at the coordinator's coefficients.

    Its features are the base models' log-odds on the validation split (the deep model, the
    site's forest, the federated GLM). On the first meta round the site also fits its forest
    and, when ``warm-start`` is set (never under DP), returns its local penalized fit and that
    fit's Hessian, from which the coordinator builds a starting point close to the pooled
    solution. Under DP the terms are released through the Gaussian mechanism (``meta-epsilon``
    over ``meta-dp-rounds``), charged first; the loss is not released.

    Raises
    ------
    client.privacy.policy.PolicyRefusal
        The run asks for more than the site's policy allows.
    client.privacy.ledger.PrivacyBudgetExceeded
        Before any work, when this round's release would exceed the site's budget.
    """
    from client.calibration import stacking_probabilities
    from client.pipeline import meta_features
    from client.privacy.mechanisms import private_newton_terms
    from common.meta import META_FEATURE_BOUND, StackingMetaClassifier, without_model_features

    vault, cohort = _load(site)
    privacy = _privacy(vault, site, cohort, settings, facts)
    k = _n_classes(cohort)
    warm = facts.warm_start and not settings.dp
    contract = contract_for("train.meta", dp=settings.dp, n_classes=k, meta_dim=meta_dim(k), warm_start=warm)

    def inputs() -> tuple[np.ndarray, np.ndarray]:
        from client.pipeline import SiteData

        data = SiteData.from_cohort(cohort)
        proba, local = _base_probabilities(vault, data, cnn_weights, shared, settings, facts, privacy,
                                           "validation")
        proba = stacking_probabilities(proba, local.get("calibration") or {})
        x = meta_features(*(proba[m] for m in BASE_MODELS))
        if not settings.stack_forest:  # nothing its own models (fitted without DP) say enters the meta statistics
            x = without_model_features(x, n_models=len(BASE_MODELS), n_classes=k,
                                       index=local_indices(stack_local=False))
        return x, data.y[data.masks["validation"]]

    def mechanism(coef: np.ndarray, x: np.ndarray, y: np.ndarray, noise: float, rng: Any) -> dict[str, np.ndarray]:
        terms = private_newton_terms(coef, x, y, n_classes=k, bound=META_FEATURE_BOUND, noise_multiplier=noise,
                                     rng=rng)
        return {"grad": np.asarray(terms.grad), "hess": np.asarray(terms.hess)}

    records = _newton_records(vault, privacy, settings, facts, inputs, {**cnn_weights, **shared}, n_classes=k,
                              warm=warm, mechanism=mechanism, sigma=privacy.meta_noise_multiplier, label="meta",
                              local=lambda: StackingMetaClassifier(penalty="l2", C=settings.meta_c,
                                                                   positive=settings.meta_positive))
    return HandlerReply(records, contract, privacy)


# ---------------------------------------------------------------------------------------------
# Phase 4: evaluation and the final models


def stats_shapes(n_classes: int, *, test_statistics: str, models: tuple[str, ...] = MODEL_NAMES,
                 paired: bool = False) -> dict[str, tuple[int, ...]]:
    """The released statistics arrays of ``models`` (none when ``test-statistics = none``), and with
    ``paired`` (the test split) the hybrid's discordant counts against each base model."""
    from common.metrics import TEST_BINS
    from common.paired import PAIRED_WITH, paired_key

    if test_statistics == "none":
        return {}
    per_model = {"hist_pos": (TEST_BINS,), "hist_neg": (TEST_BINS,)} if n_classes == 2 else \
        {"confusion": (n_classes, n_classes), "hist_pos": (n_classes, TEST_BINS), "hist_neg": (n_classes, TEST_BINS)}
    shapes = {f"{m}.{key}": shape for m in models for key, shape in per_model.items()}
    return shapes | ({paired_key(m): (2,) for m in PAIRED_WITH} if paired else {})


def validation(site: SiteRef, cnn_weights: dict[str, np.ndarray], shared: dict[str, np.ndarray],
               settings: RunSettings, facts: RoundFacts) -> HandlerReply:
    """Validation-split statistics of every model, from which the coordinator chooses the
    operating thresholds (binary problems). Released once per run like the test statistics, as
    the site's policy says (``test-statistics`` and ``test-epsilon`` govern both)."""
    return _statistics_reply(site, cnn_weights, shared, settings, facts, split="validation")


def evaluate(site: SiteRef, cnn_weights: dict[str, np.ndarray], shared: dict[str, np.ndarray],
             settings: RunSettings, facts: RoundFacts) -> HandlerReply:
    """Test-split statistics of every model, released once per run as the site's policy says.

    ``test-statistics = exact`` releases the binned statistics as they are (outside the
    guarantee); ``noised`` adds Gaussian noise calibrated to one patient's contribution to all
    models' statistics together, charged to the ledger; ``none`` releases only the count. A
    second request in the same run gets the stored release. Also stores the final global models
    and the operating thresholds in the vault: this message is the one that hands them to the site.
    """
    return _statistics_reply(site, cnn_weights, shared, settings, facts, split="test")


def _statistics_reply(site: SiteRef, cnn_weights: dict[str, np.ndarray], shared: dict[str, np.ndarray],
                      settings: RunSettings, facts: RoundFacts, *, split: str) -> HandlerReply:
    from client.model_store import run_role

    vault, cohort = _load(site)
    privacy = _privacy(vault, site, cohort, settings, facts)
    k = _n_classes(cohort)
    message_type = "evaluate" if split == "test" else "query.validation"
    contract = contract_for(message_type, dp=settings.dp, n_classes=k,
                            stats_shapes=stats_shapes(k, test_statistics=settings.test_statistics,
                                                      models=released_models(site_alone=settings.releases_site_alone,
                                                                             split=split,
                                                                             stack_local=settings.stack_forest),
                                                      paired=split == "test" and settings.paired_tests),
                            stats_dtype="f" if facts.secure else "i")
    role = run_role(facts.run_id, "evaluate-release" if split == "test" else "validation-release")
    if again := privacy.stored_release(role, request="one-per-run"):
        return HandlerReply({"stats": ("array", again[0]), "metrics": ("metric", again[1])}, contract, privacy)
    arrays, metrics = _released_statistics(vault, cohort, cnn_weights, shared, settings, facts, privacy, k,
                                           split=split)
    if split == "test":
        _store_final_models(vault, cohort, cnn_weights, shared, facts)
    vault.update({role: privacy.release_blob(arrays, metrics, request="one-per-run")})
    return HandlerReply({"stats": ("array", arrays), "metrics": ("metric", metrics)}, contract, privacy)


def _released_statistics(vault: Any, cohort: Any, cnn_weights: dict[str, np.ndarray], shared: dict[str, np.ndarray],
                         settings: RunSettings, facts: RoundFacts, privacy: Any, k: int, *,
                         split: str) -> tuple[dict, dict]:
    from client.pipeline import SiteData
    from client.privacy.ledger import Release
    from client.privacy.mechanisms import noised_release
    from common.metrics import (
        TEST_BINS,
        compute_stats,
        released_arrays,
        released_sensitivity,
        released_totals,
    )

    data = SiteData.from_cohort(cohort)
    y = data.y[data.masks[split]]
    metrics: dict[str, Any] = {"num-examples": int(len(y)), "epsilon": 0.0, "noise-std": 0.0}
    if settings.test_statistics == "none":
        return {}, metrics
    proba = _probabilities(vault, data, cnn_weights, shared, settings, facts, privacy, cohort, split)
    if settings.releases_site_alone:
        proba |= _alone_probabilities(vault, data, facts, split)
    models = tuple(m for m in released_models(site_alone=settings.releases_site_alone, split=split,
                                              stack_local=settings.stack_forest) if m in proba)
    arrays = {f"{name}.{key}": value for name in models
              for key, value in released_arrays(compute_stats(y, proba[name], n_classes=k, n_bins=TEST_BINS)).items()}
    paired = _discordant_counts(y, proba, facts) if split == "test" and settings.paired_tests else {}
    if settings.test_statistics == "noised":
        from common.paired import PAIRED_WEIGHT

        sigma = privacy.test_noise_multiplier()
        # One patient adds 1 to at most one discordant count per pair; the counts enter the one
        # release at PAIRED_WEIGHT, so they cost the histograms little and carry 1 / weight of their noise.
        sensitivity = math.sqrt(released_sensitivity(n_classes=k, n_models=len(models)) ** 2
                                + len(paired) * PAIRED_WEIGHT**2)
        seed = privacy.release(Release.gaussian(noise_multiplier=sigma, label=f"{split}-statistics",
                                                run_id=facts.run_id), purpose=f"{split}-statistics")
        rng = np.random.default_rng(seed)
        if facts.secure:
            share = _noise_share(vault, settings, facts, privacy)
            arrays, metrics = _secure_noised(arrays, paired, rng=rng, std=sigma * sensitivity * share, metrics=metrics)
            return arrays, metrics | {"epsilon": float(privacy.ledger.spent_epsilon())}
        # Post-processing with the class counts the census already released: each noised
        # histogram is projected onto the counts it must hold (fewer phantom patients than clipping).
        per_model = released_totals(np.bincount(y, minlength=k))
        totals = {f"{name}.{key}": total for name in models for key, total in per_model.items()}
        arrays = noised_release(arrays, sensitivity=sensitivity, noise_multiplier=sigma, rng=rng, totals=totals)
        paired = {name: np.maximum(np.rint(c + rng.normal(0.0, sigma * sensitivity / PAIRED_WEIGHT, size=c.shape)), 0)
                  for name, c in sorted(paired.items())}
        metrics |= {"epsilon": float(privacy.ledger.spent_epsilon()), "noise-std": float(sigma * sensitivity)}
    arrays |= paired
    dtype = np.float64 if facts.secure else np.int64  # a secure sum adds floats (common/summands.py)
    return {name: np.asarray(a, dtype=dtype) for name, a in arrays.items()}, metrics


def _secure_noised(arrays: dict[str, np.ndarray], paired: dict[str, np.ndarray], *, rng: np.random.Generator,
                   std: float, metrics: dict[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The statistics with this site's noise and nothing else, for the secure sum.

    Rounding, clipping and the projection onto the class counts are post-processing of a DP
    release only when applied to the release itself: with the noise distributed over the sites no
    site's own values are that release, so the coordinator post-processes the unmasked sum instead.
    """
    from common.paired import PAIRED_WEIGHT

    out = {name: np.asarray(a, dtype=np.float64) + rng.normal(0.0, std, size=np.shape(a))
           for name, a in sorted(arrays.items())}
    out |= {name: np.asarray(c, dtype=np.float64) + rng.normal(0.0, std / PAIRED_WEIGHT, size=np.shape(c))
            for name, c in sorted(paired.items())}
    return out, metrics | {"noise-std": float(std)}


def _discordant_counts(y: np.ndarray, proba: dict[str, np.ndarray], facts: RoundFacts) -> dict[str, np.ndarray]:
    """The hybrid's discordant counts against each base model, at the run's operating thresholds
    (binary; argmax otherwise): what McNemar's paired test needs, additive over sites."""
    from common.paired import PAIRED_WITH, discordant_counts, paired_key, predictions

    threshold = dict(zip(MODEL_NAMES, facts.thresholds))
    hybrid = predictions(proba["hybrid"], threshold=threshold.get("hybrid"))
    return {paired_key(m): discordant_counts(y, hybrid, predictions(proba[m], threshold=threshold.get(m)))
            for m in PAIRED_WITH}


def train_alone(site: SiteRef, settings: RunSettings, facts: RoundFacts) -> HandlerReply:
    """Train the site's own deep model on its data alone, once per run, and store it.

    Its own exchange (``train.alone``), so that the longest local work of a run (the federation's
    total epochs of deep-model training) has a timeout of its own and never costs the site its
    evaluation. Releases only the train count the census already released; asked again, the
    site answers from the stored models.
    """
    from client.model_store import load_alone_models, save_alone_models
    from client.pipeline import SiteData

    vault, cohort = _load(site)
    privacy = _privacy(vault, site, cohort, settings, facts)
    contract = contract_for("train.alone", dp=settings.dp, n_classes=len(cohort.classes))
    data = SiteData.from_cohort(cohort)
    if load_alone_models(vault, run_id=facts.run_id) is None:
        save_alone_models(vault, _train_alone_models(data, settings, facts, privacy, vault), run_id=facts.run_id)
    return HandlerReply({"metrics": ("metric", {"num-examples": int(data.masks["train"].sum())})}, contract, privacy)


def _train_alone_models(data: Any, settings: RunSettings, facts: RoundFacts, privacy: Any,
                        vault: Any) -> dict[str, Any]:
    """The site's own scaler and deep model, trained on its data alone (its own GLM and forest
    are base models of the stack, fitted once per run: :func:`_local_models`).

    They never leave the site and need no DP of their own (only their released statistics do):
    a hospital alone would train without noise, which is the comparison a consortium must win.
    The deep model trains for the federation's total epochs with early stopping on validation,
    from the run's starting weights (a warm start's public weights help the site alone too).
    """
    import torch

    from client.dp_training import TrainConfig
    from client.model_store import load_start_weights
    from client.pipeline import fit_shared_scaler, train_deep

    scaler = fit_shared_scaler(data, max_glm_columns=settings.glm_max_features)
    epochs = settings.cnn_rounds * settings.local_epochs
    train_cfg = TrainConfig(epochs=epochs, batch_size=settings.batch_size, lr=settings.lr,
                            weight_decay=settings.weight_decay, patience=max(3, epochs // 4),
                            seed=privacy.seed(purpose="alone-deep-model"), select_best=True)
    start = load_start_weights(vault, run_id=facts.run_id)  # a warm start's public weights, if any
    initial = {k: torch.as_tensor(v) for k, v in start.items()} if start is not None else None
    model, _ = train_deep(data, cfg=_model_config(facts), train=train_cfg, dp=None, scaler=scaler, initial=initial)
    return {"scaler": scaler, "cnn": {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}}


def _alone_probabilities(vault: Any, data: Any, facts: RoundFacts, split: str) -> dict[str, np.ndarray]:
    """The site's own deep model (stored by :func:`train_alone`) on one split; none when the site
    did not train it in this run (its site-alone rows are then left out)."""
    import torch

    from client.model_store import load_alone_models
    from client.pipeline import deep_proba
    from common.models import build_model

    stored = load_alone_models(vault, run_id=facts.run_id)
    if stored is None:
        log.warning("run %s: this site's own models alone were not trained; their statistics are not released",
                    facts.run_id)
        return {}
    model = build_model(_model_config(facts))
    model.load_state_dict({k: torch.as_tensor(v) for k, v in stored["cnn"].items()})
    return {"alone-cnn": deep_proba(model, data, split, stored["scaler"])}


def _probabilities(vault: Any, data: Any, cnn_weights: dict[str, np.ndarray], shared: dict[str, np.ndarray],
                   settings: RunSettings, facts: RoundFacts, privacy: Any, cohort: Any,
                   split: str) -> dict[str, np.ndarray]:
    """Every model's class probabilities on ``split``: the base models, the hybrid, and on the
    validation split the reduced stacks (the hybrid without each base model)."""
    from client.site_models import hybrid_probabilities

    base, local = _base_probabilities(vault, data, cnn_weights, shared, settings, facts, privacy, split)
    calibration = local.get("calibration") or {}
    k = len(cohort.classes)
    coef = np.asarray(facts.coef, dtype=np.float64)
    proba = {**base, "hybrid": hybrid_probabilities(base, coef, n_classes=k, calibration=calibration)}
    if split == "validation":
        for name in reduced_stacks(stack_local=settings.stack_forest):
            proba[name] = hybrid_probabilities(base, reduced_stack_weights(name, coef, n_classes=k),
                                               n_classes=k, calibration=calibration)
    return proba


def _store_final_models(vault: Any, cohort: Any, cnn_weights: dict[str, np.ndarray], shared: dict[str, np.ndarray],
                        facts: RoundFacts) -> None:
    from client.model_store import save_final_models

    save_final_models(vault, cnn=cnn_weights, cnn_config=facts.model(), shared=shared,
                      meta={"coef": [float(c) for c in facts.coef], "glm_coef": [float(c) for c in facts.glm_coef],
                            "base_models": list(BASE_MODELS), "classes": list(cohort.classes),
                            "thresholds": dict(zip(MODEL_NAMES, facts.thresholds))},
                      run_id=facts.run_id, explanation=_explanation_of(facts))


def _explanation_of(facts: RoundFacts) -> dict[str, Any] | None:
    """The global explanation the evaluation carries, if it is one (it comes from the coordinator)."""
    from common.explanation import FORMAT

    if not facts.explanation:
        return None
    try:
        doc = json.loads(facts.explanation)
    except ValueError:
        doc = None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        log.warning("run %s: the global explanation sent with the evaluation is not a %s; not stored",
                    facts.run_id, FORMAT)
        return None
    return doc
