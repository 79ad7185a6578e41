"""What a site does for each phase of a federated run, on plain Python and numpy values.

The ClientApp (``client/client_app.py``) only converts Flower records to and from these
functions, so the protocol logic is testable without Flower. Every function opens the site's
vault, decrypts what it needs in memory, and writes anything it must keep (fitted forest, DP
accountant, privacy ledger, final models) back into the vault. Nothing about a patient leaves:
the return values are model weights, aggregate statistics and counts.

Privacy: under DP every release (DP-SGD updates, noised meta-classifier statistics) is charged
to the site's ledger *before* the reply is returned, and a round that would exceed the site's
budget is refused before any work happens. The randomness of a release is seeded from the vault
key, never from the run config (see :func:`_private_seed`).
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from client.site import SiteRef

MODEL_NAMES = ("hybrid", "cnn", "forest", "logreg")


def _load(site: SiteRef) -> tuple[Any, Any]:
    from client.cohort_store import load_cohort

    vault = site.open_vault()
    return vault, load_cohort(vault)


def _ledger(vault: Any, site: SiteRef, cfg: dict[str, Any]) -> Any:
    from client.ledger import PrivacyLedger

    return PrivacyLedger.open(vault, site=site.name, default_epsilon=float(cfg.get("site-epsilon-budget", 10.0)),
                              default_delta=float(cfg.get("site-delta", 1e-5)))


# ---------------------------------------------------------------------------------------------
# Phase 0: census


def census(site: SiteRef, cfg: dict[str, Any]) -> dict[str, Any]:
    """Schema, counts and privacy budget: what the coordinator checks before any training."""
    vault, cohort = _load(site)
    ledger = _ledger(vault, site, cfg)
    summary = cohort.summary()
    return {"site": site.name, "schema-hash": cohort.schema_hash, "schema-json": json.dumps(cohort.schema),
            "n-train": summary["splits"]["train"]["patients"],
            "n-validation": summary["splits"]["validation"]["patients"],
            "n-test": summary["splits"]["test"]["patients"],
            "class-counts": [int(v) for v in summary["classes"].values()],
            "ledger-spent": float(ledger.spent_epsilon()), "ledger-budget": float(ledger.budget_epsilon),
            "ledger-delta": float(ledger.delta), "ledger-created": ledger.created_at,
            "ledger-revision": int(ledger.revision)}


# ---------------------------------------------------------------------------------------------
# Phase 1: a CNN round


def _site_data(cohort: Any, *, tabular: bool = True) -> tuple[Any, Any]:
    """Model inputs and, when ``tabular``, the tabular preprocessor fitted on the train split."""
    from client.pipeline import SiteData, fit_tabular_preprocessor

    data = SiteData.from_cohort(cohort)
    return data, (fit_tabular_preprocessor(data) if tabular else None)


def _private_seed(vault: Any, ledger: Any, purpose: str, rnd: int) -> int:
    """Seed of one release's randomness (sampling, dropout, DP noise) that only this site knows.

    The run config's seed is known to the coordinator, which could then replay Opacus' Poisson
    sampling and noise and subtract them; a seed derived from the vault key cannot be replayed
    outside the site. The ledger's revision, which every charge advances, makes the seed differ
    for every release whatever run id or round the coordinator sends, while a stopped run that
    resumes draws the same randomness as if it had never stopped.
    """
    return int(vault.derive_seed(f"{purpose}|ledger-{ledger.revision}|round-{rnd}"))


def _model_config(cfg: dict[str, Any]) -> Any:
    from common.models import DeepModelConfig

    return DeepModelConfig.from_dict(json.loads(str(cfg["model-config"])))


def _dp_delta(cfg: dict[str, Any], n_train: int) -> float:
    """The run's delta, or by default min(1e-5, 0.1 / n) for the site's n training records."""
    return float(cfg.get("delta", 0.0)) or min(1e-5, 0.1 / max(n_train, 1))


def _dp_config(cfg: dict[str, Any], n_train: int) -> Any:
    from client.dp_training import DPConfig

    if not bool(cfg.get("dp", True)):
        return None
    return DPConfig(target_epsilon=float(cfg["epsilon"]), target_delta=_dp_delta(cfg, n_train),
                    max_grad_norm=float(cfg.get("max-grad-norm", 1.0)),
                    total_epochs=int(cfg["total-rounds"]) * int(cfg.get("local-epochs", 1)))


def _planned_release(dp: Any, state: dict | None, n_train: int, cfg: dict[str, Any], run_id: str, rnd: int) -> Any:
    """The DP-SGD release this round will make, known before training (for the budget check)."""
    from client.dp_training import calibrate_noise
    from client.ledger import Release

    batch = int(cfg.get("batch-size", 128))
    if state:
        sigma, q = float(state["noise_multiplier"]), float(state["sample_rate"])
    else:
        sigma, q = calibrate_noise(n_train=n_train, dp=dp, batch_size=batch)
    steps = int(cfg.get("local-epochs", 1)) * math.ceil(n_train / batch)
    return Release(kind="dp-sgd", noise_multiplier=sigma, sample_rate=q, steps=steps, label="cnn-update",
                   run_id=run_id, round=rnd)


TRAIN_KEYS = ("model-config", "local-epochs", "batch-size", "lr", "weight-decay", "dp", "epsilon", "delta",
              "max-grad-norm", "total-rounds", "proximal-mu")
"""The settings a CNN round's release depends on (with the run id, the round and the global weights)."""


def train_round(site: SiteRef, global_weights: dict[str, np.ndarray], cfg: dict[str, Any]) -> tuple[dict, dict]:
    """Local (DP-)SGD from the global weights; returns the new weights and round metrics.

    Under DP the release is stored in the vault with a digest of the request; the same request
    again (a coordinator resumed from a checkpoint taken before it aggregated this round) gets
    the stored release back, neither trained nor charged again.

    Raises
    ------
    client.ledger.PrivacyBudgetExceeded
        Before any training, when this round's release would exceed the site's budget.
    """
    import torch

    from client.dp_training import TrainConfig
    from client.model_store import get_json, release_blob, request_digest, run_role, stored_release
    from client.pipeline import deep_config, train_deep

    vault, cohort = _load(site)
    run_id, rnd = str(cfg["run-id"]), int(cfg["server-round"])
    release_role = run_role(run_id, "cnn-release")
    if bool(cfg.get("dp", True)):
        request = request_digest({k: cfg.get(k) for k in ("run-id", "server-round") + TRAIN_KEYS}, global_weights)
        if again := stored_release(vault, release_role, request=request):
            return again  # asked again (a resumed coordinator): the same release, charged once
    model_cfg = _model_config(cfg)
    data, pre = _site_data(cohort, tabular=bool(model_cfg.n_tabular))
    if deep_config(data, pre=pre, arch=model_cfg.arch).to_dict()["tracks"] != model_cfg.to_dict()["tracks"]:
        raise ValueError(f"site {site.name}: its data does not fit the coordinator's model")
    n_train = int(data.masks["train"].sum())
    dp = _dp_config(cfg, n_train)
    ledger = _ledger(vault, site, cfg)
    state_role = run_role(run_id, "dpsgd")
    state = get_json(vault, state_role)
    if dp is not None:
        _refuse_if_over_budget(ledger, _planned_release(dp, state, n_train, cfg, run_id, rnd), site, run_id, rnd)
    epochs = int(cfg.get("local-epochs", 1))
    train_cfg = TrainConfig(epochs=epochs, batch_size=int(cfg.get("batch-size", 128)), lr=float(cfg.get("lr", 2e-3)),
                            weight_decay=float(cfg.get("weight-decay", 1e-2)), patience=epochs + 1,
                            seed=_private_seed(vault, ledger, "cnn-round", rnd), select_best=False)
    initial = {k: torch.as_tensor(v) for k, v in global_weights.items()}
    model, result = train_deep(data, cfg=model_cfg, train=train_cfg, dp=dp, initial=initial, accountant_state=state,
                               pre=pre, proximal_mu=float(cfg.get("proximal-mu", 0.0)))
    metrics = {"num-examples": n_train, "train-loss": float(result.history[-1]["train_loss"]),
               "val-loss": float(result.history[-1].get("val_loss", float("nan")))}
    if dp is not None:
        from client.ledger import Release

        # Opacus folds steps with the same (sigma, q) into its last history entry: diff the states.
        releases = Release.from_accountant_state(result.accountant_state, previous=state, label="cnn-update",
                                                 run_id=run_id, round=rnd)
        metrics["epsilon"] = float(ledger.charge(releases))
        metrics["run-epsilon"] = float(result.epsilon)
        metrics["delta"] = float(dp.target_delta)
    weights = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    if dp is not None:  # one atomic write: the accountant and the release it accounted for
        vault.update({state_role: json.dumps(result.accountant_state, sort_keys=True).encode("utf-8"),
                      release_role: release_blob(weights, metrics, request=request)})
    return weights, metrics


def _refuse_if_over_budget(ledger: Any, planned: Any, site: SiteRef, run_id: str, rnd: int) -> None:
    """Refuse the round before training when its planned release would exceed the budget."""
    from client.ledger import PrivacyBudgetExceeded

    after = ledger.would_spend([planned])
    if after > ledger.budget_epsilon:
        raise PrivacyBudgetExceeded(site=site.name, labels=[planned.label], run_id=run_id, round=rnd,
                                    spent=ledger.spent_epsilon(), would_reach=after, budget=ledger.budget_epsilon,
                                    delta=ledger.delta)


# ---------------------------------------------------------------------------------------------
# Phases 2-3: forest, meta-features, Newton terms of the meta-classifier


def _meta_features(site: SiteRef, vault: Any, cohort: Any, cnn_weights: dict | None, cfg: dict[str, Any],
                   split: str) -> tuple[np.ndarray, np.ndarray]:
    """Stacking inputs (CNN and forest log-odds) on one split, fitting the forest once per run."""
    import torch

    from client.model_store import load_forest, save_forest
    from client.pipeline import deep_proba, fit_forest, forest_matrix, meta_features
    from common.models import build_model

    data, pre = _site_data(cohort)
    run_id = str(cfg["run-id"])
    stored = load_forest(vault)
    if stored is None or stored.get("run_id") != run_id:
        forest = fit_forest(data, pre, n_estimators=int(cfg.get("forest-trees", 200)),
                            random_state=int(cfg.get("seed", 0)))
        save_forest(vault, forest, pre, run_id=run_id)
    else:
        forest, pre = stored["forest"], stored["preprocessor"]
    model = build_model(_model_config(cfg))
    model.load_state_dict({k: torch.as_tensor(v) for k, v in cnn_weights.items()})
    x = meta_features(deep_proba(model, data, split, pre), forest.predict_proba(forest_matrix(data, split, pre)))
    return x, data.y[data.masks[split]]


META_KEYS = ("model-config", "dp", "meta-epsilon", "meta-rounds", "delta", "warm-start", "meta-C", "forest-trees",
             "seed")
"""The settings a meta round's release depends on (with the run id, round, coefficients and CNN)."""


def meta_round(site: SiteRef, cnn_weights: dict[str, np.ndarray], cfg: dict[str, Any]) -> dict[str, Any]:
    """Log-loss, gradient and Hessian of the meta-classifier at the coordinator's coefficients.

    On the first meta round the site also fits its forest and, when ``warm-start`` is set
    (never under DP), returns its local penalized fit and that fit's Hessian, from which the
    coordinator builds a starting point close to the pooled solution (so two Newton steps
    usually suffice).

    Under DP (``dp`` true) the gradient and Hessian are released through the Gaussian mechanism
    of :mod:`client.meta_privacy`, charged to the site's ledger first (``meta-epsilon`` over
    ``meta-rounds`` releases), and the loss is not released (NaN).

    Raises
    ------
    client.ledger.PrivacyBudgetExceeded
        Before any work, when this round's release would exceed the site's budget.
    """
    from common.meta import StackingMetaClassifier, flat_coef, newton_terms

    vault, cohort = _load(site)
    k = max(len(cohort.classes), 2)
    coef = np.asarray(cfg["coef"], dtype=np.float64)
    if bool(cfg.get("dp", True)):
        return _private_meta_round(site, vault, cohort, cnn_weights, cfg, coef, k)
    x, y = _meta_features(site, vault, cohort, cnn_weights, cfg, "validation")
    terms = newton_terms(coef, x, y, n_classes=k)
    out = {"loss": terms.loss, "grad": terms.grad, "hess": terms.hess, "n": terms.n}
    if bool(cfg.get("warm-start", False)):
        local = StackingMetaClassifier(penalty="l2", C=float(cfg.get("meta-C", 1.0))).fit(x, y)
        local_coef = flat_coef(local)
        local_terms = newton_terms(local_coef, x, y, n_classes=k)
        out.update(local_coef=local_coef, local_hess=local_terms.hess)
    return out


def _private_meta_round(site: SiteRef, vault: Any, cohort: Any, cnn_weights: dict[str, np.ndarray],
                        cfg: dict[str, Any], coef: np.ndarray, k: int) -> dict[str, Any]:
    """A meta round under DP: the stored release if asked again, else a new one, charged first."""
    from client.model_store import release_blob, request_digest, run_role, stored_release

    request = request_digest({key: cfg.get(key) for key in ("run-id", "server-round", "coef") + META_KEYS},
                             cnn_weights)
    release_role = run_role(str(cfg["run-id"]), "meta-release")
    if again := stored_release(vault, release_role, request=request):
        return {**again[0], **again[1]}  # asked again after a coordinator resumed: same release, charged once
    ledger = _ledger(vault, site, cfg)
    release = _planned_meta_release(ledger, site, cohort, cfg)
    x, y = _meta_features(site, vault, cohort, cnn_weights, cfg, "validation")
    out = _private_meta_terms(vault, ledger, release, coef, x, y, k)
    arrays = {name: np.asarray(out[name]) for name in ("grad", "hess")}
    vault.update({release_role: release_blob(arrays, {n: v for n, v in out.items() if n not in arrays},
                                             request=request)})
    return out


def _planned_meta_release(ledger: Any, site: SiteRef, cohort: Any, cfg: dict[str, Any]) -> Any:
    """The Gaussian release of this meta round, refused before any work if over budget."""
    from client.ledger import Release
    from client.meta_privacy import meta_noise_multiplier

    delta = _dp_delta(cfg, int(cohort.summary()["splits"]["train"]["patients"]))
    sigma = meta_noise_multiplier(epsilon=float(cfg.get("meta-epsilon", 1.0)), delta=delta,
                                  rounds=int(cfg.get("meta-rounds", 3)))
    run_id, rnd = str(cfg["run-id"]), int(cfg["server-round"])
    release = Release.gaussian(noise_multiplier=sigma, label="meta-statistics", run_id=run_id, round=rnd)
    _refuse_if_over_budget(ledger, release, site, run_id, rnd)
    return release


def _private_meta_terms(vault: Any, ledger: Any, release: Any, coef: np.ndarray, x: np.ndarray, y: np.ndarray,
                        k: int) -> dict[str, Any]:
    """Charge ``release`` to the ledger, then the noised Newton terms it pays for."""
    from client.meta_privacy import private_newton_terms
    from common.meta import META_FEATURE_BOUND

    rng = np.random.default_rng(_private_seed(vault, ledger, "meta-noise", int(release.round or 0)))
    spent = ledger.charge(release)  # charged before anything leaves the site
    terms = private_newton_terms(coef, x, y, n_classes=k, bound=META_FEATURE_BOUND,
                                 noise_multiplier=release.noise_multiplier, rng=rng)
    return {"loss": terms.loss, "grad": terms.grad, "hess": terms.hess, "n": terms.n, "epsilon": float(spent),
            "noise-multiplier": release.noise_multiplier}


# ---------------------------------------------------------------------------------------------
# Phase 4: evaluation and the final models


def evaluate(site: SiteRef, cnn_weights: dict[str, np.ndarray], cfg: dict[str, Any]) -> tuple[dict, dict]:
    """Test-split statistics of every model (additive) and this site's own metrics.

    Also stores the final global models in the vault: this message is the one that hands them
    to the site.
    """
    import torch

    from client.model_store import load_forest, save_final_models
    from client.pipeline import deep_proba, fit_logreg, forest_matrix, meta_features
    from common.meta import StackingMetaClassifier
    from common.metrics import compute_metrics, compute_stats
    from common.models import build_model

    vault, cohort = _load(site)
    data, _ = _site_data(cohort)
    stored = load_forest(vault)
    forest, pre = stored["forest"], stored["preprocessor"]
    model = build_model(_model_config(cfg))
    model.load_state_dict({k: torch.as_tensor(v) for k, v in cnn_weights.items()})
    k = len(cohort.classes)
    n_feat = 2 * (1 if k == 2 else k)
    meta = StackingMetaClassifier().set_coef(np.asarray(cfg["coef"], dtype=np.float64), n_features=n_feat)
    y = data.y[data.masks["test"]]
    proba = {"cnn": deep_proba(model, data, "test", pre),
             "forest": forest.predict_proba(forest_matrix(data, "test", pre))}
    proba["hybrid"] = meta.predict_proba(meta_features(proba["cnn"], proba["forest"]))
    proba["logreg"] = fit_logreg(data, pre).predict_proba(forest_matrix(data, "test", pre))
    arrays, metrics = {}, {"num-examples": int(len(y))}
    for name in MODEL_NAMES:
        stats = compute_stats(y, proba[name], n_classes=k)
        for key, value in stats.to_arrays().items():
            arrays[f"{name}.{key}"] = value
        for metric, value in compute_metrics(y, proba[name], n_classes=k).items():
            if metric != "n":
                metrics[f"{name}.{metric}"] = float(value)
    save_final_models(vault, cnn=cnn_weights, cnn_config=json.loads(str(cfg["model-config"])),
                      meta={"coef": list(map(float, cfg["coef"])), "classes": list(cohort.classes)},
                      run_id=str(cfg["run-id"]))
    return arrays, metrics
