"""The coordinator's phases (DESIGN: "The federated run"), one function each.

Exchanges per run: census (1) + moments of the shared preprocessing (1) + CNN rounds (R) + GLM
rounds (Newton steps from zero until converged, at most 8 by default) + meta rounds (3 by
default: a warm start and two Newton steps) + the sites' own models alone (1, with ``site-alone``)
+ validation statistics (1) + explanations (1, with ``explain``; :mod:`server.explanation_phase`)
+ evaluation with distribution of the final models and the global explanation (1).

All server state lives in :class:`RunState`, checkpointed after every completed exchange;
``resume`` restarts from the last checkpoint with the same genofed run id, so sites continue
the same DP accountant and ledger.
"""

from __future__ import annotations

import json
import math
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, RecordDict
from flwr.serverapp import Grid

from common.errors import GenofedError
from common.records import from_record, to_record
from common.settings import RoundFacts, RunSettings
from common.site_names import natural_key
from common.spec import diff_schemas
from server.exchange import TooFewSitesError, exchange, wait_for_nodes
from server.runlog import RunLog

from common.stack import (
    ALONE_MODELS,
    BASE_MODELS,
    REDUCED_STACKS,
    SITE_ALONE_ROWS,
    SITE_AVERAGE,
    choose_stack,
    fallback_words,
    local_indices,
    reduced_stack_weights,
    stacked_models,
)
from common.stack import MODEL_NAMES as MODELS


class CensusError(GenofedError):
    """Sites cannot federate (schema mismatch, exhausted budget, too few sites)."""


@dataclass
class RunState:
    """Everything the coordinator knows between exchanges (checkpointed as plain data)."""

    run_id: str
    phase: str = "census"
    sites: dict[str, str] = field(default_factory=dict)          # node id (str) -> site name
    census: dict[str, dict] = field(default_factory=dict)         # site -> census reply
    schema: dict[str, Any] = field(default_factory=dict)
    model_config: dict[str, Any] = field(default_factory=dict)
    cnn_round: int = 0
    aggregator: dict[str, Any] = field(default_factory=dict)
    shared: dict[str, list] = field(default_factory=dict)         # the shared scaler (mean, scale, glm_columns)
    glm_round: int = 0
    glm_solver: dict[str, Any] = field(default_factory=dict)
    glm_coef: list[float] = field(default_factory=list)
    meta_round: int = 0
    meta_solver: dict[str, Any] = field(default_factory=dict)
    meta_coef: list[float] = field(default_factory=list)
    thresholds: dict[str, dict[str, Any]] = field(default_factory=dict)  # model -> Threshold.to_dict()
    site_thresholds: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)  # site -> its own models'
    site_validation_auc: dict[str, dict[str, float]] = field(default_factory=dict)  # site -> own model -> AUC
    meta_fallback: dict[str, Any] = field(default_factory=dict)  # the base model the stack fell back to, and why
    explanation: dict[str, Any] = field(default_factory=dict)    # the global explanation (explanation.json)
    secure: dict[str, Any] = field(default_factory=dict)         # the secure sum's roster and sealed shares

    rounds: list[dict[str, Any]] = field(default_factory=list)    # per exchange: sites, rejections, epsilon
    excluded: dict[str, str] = field(default_factory=dict)        # site -> why it left the run
    alone_missing: dict[str, str] = field(default_factory=dict)   # site -> why it has no models alone
    refusals: dict[str, str] = field(default_factory=dict)        # site -> why its policy refused the run
    held_out: str = ""                                            # a site that only joins the evaluation
    init_from: str = ""                                           # the earlier model the deep model started from
    init_origin: dict[str, Any] = field(default_factory=dict)     # how that model was made (genofed pretrain)

    def active_nodes(self, *, training: bool = True) -> list[int]:
        """Nodes still in the run; ``training`` leaves out the held-out site."""
        return sorted(int(n) for n, s in self.sites.items()
                      if s not in self.excluded and not (training and s == self.held_out))

    def site_of(self, node: int) -> str:
        return self.sites.get(str(node), f"node-{node}")

    def site_order(self, node: int) -> tuple[tuple[int, int | str], ...]:
        """Sort key: nodes in the natural order of their site names (site-2 before site-10)."""
        return natural_key(self.site_of(node))


def _note_failures(state: RunState, log: RunLog, failures: dict[int, str], where: str) -> None:
    for node, reason in failures.items():
        site = state.site_of(node)
        state.excluded.setdefault(site, f"{where}: {reason}")
        log.warning(f"{where}: site {site} failed and leaves the run: {reason}")


def excluded_words(excluded: dict[str, str]) -> str:
    """Why sites left, one clause per reason: sites that left for the same reason are named together
    (a policy that refuses the run at twelve sites is said once), in their natural order."""
    by_reason: dict[str, list[str]] = {}
    for site in sorted(excluded, key=natural_key):
        by_reason.setdefault(excluded[site], []).append(site)
    return "; ".join(f"{', '.join(sites)}: {reason}" for reason, sites in by_reason.items())


def _require_quorum(state: RunState, settings: RunSettings, where: str, *, training: bool = True) -> list[int]:
    """The nodes to ask (``training``: without the held-out site), at least ``min-sites`` of them training."""
    nodes = state.active_nodes(training=training)
    if len(state.active_nodes()) < settings.min_sites:
        gone = excluded_words(state.excluded)
        raise TooFewSitesError(f"{where}: only {len(nodes)} site(s) left, min-sites is {settings.min_sites} ({gone})")
    return nodes


# ---------------------------------------------------------------------------------------------
# Phase 0


def run_census(grid: Grid, settings: RunSettings, state: RunState, log: RunLog) -> dict[str, np.ndarray]:
    """Who is there, do their schemas agree, do they have budget left; returns the initial weights."""
    from common.model_config import deep_config_for_schema
    from common.models import build_model

    nodes = wait_for_nodes(grid, minimum=settings.min_sites, timeout=settings.wait_timeout)
    cfg = ConfigRecord(RoundFacts(run_id=state.run_id).to_config())
    res = exchange(grid, nodes, lambda n: RecordDict({"config": cfg}), message_type="query.census",
                   group_id=f"{state.run_id}-census", timeout=settings.round_timeout)
    for node, reason in res.failures.items():
        log.warning(f"census: node {node} did not answer: {reason}")
    infos = {node: dict(r.content.config_records["census"]) for node, r in res.replies.items()}
    if settings.ledger_registry:
        infos = _drop_rolled_back_ledgers(infos, settings, state, log)
    infos = _drop_refusals(infos, state, log)
    if len(infos) < settings.min_sites:
        gone = f"; {excluded_words(state.excluded)}" if state.excluded else ""
        raise CensusError(f"census: {len(infos)} site(s) can take part, min-sites is {settings.min_sites}{gone}")
    _check_schemas(infos)
    state.rounds.append({"phase": "census", **res.cost(),
                         "sites": sorted((str(i["site"]) for i in infos.values()), key=natural_key)})
    state.sites = {str(n): str(i["site"]) for n, i in infos.items()}
    state.census = {str(i["site"]): {k: v for k, v in i.items() if k != "schema-json"} for i in infos.values()}
    state.schema = json.loads(next(iter(infos.values()))["schema-json"])
    if settings.hold_out_site:
        if settings.hold_out_site not in state.sites.values():
            raise CensusError(f"census: hold-out-site {settings.hold_out_site!r} is not among the sites that answered "
                              f"({', '.join(sorted(state.sites.values()))})")
        state.held_out = settings.hold_out_site
        log.info(f"census: site {state.held_out} is held out: it does not train and joins only the evaluation")
    model_cfg = deep_config_for_schema(state.schema, arch=settings.arch)
    state.model_config = model_cfg.to_dict()
    state.phase = "moments"
    if settings.ledger_registry:
        remember_ledgers(settings, state)
    log.info(f"census: {len(infos)} sites agree on schema {next(iter(infos.values()))['schema-hash'][:12]}: "
             + ", ".join(f"{i['site']} ({i['n-train']} train)"
                         for i in sorted(infos.values(), key=lambda i: natural_key(str(i["site"])))))
    log.event("census", sites={i["site"]: {k: i[k] for k in ("n-train", "n-validation", "n-test", "ledger-spent",
                                                            "ledger-budget")} for i in infos.values()},
              seconds=res.seconds)
    weights = {k: v.detach().numpy() for k, v in build_model(model_cfg, seed=settings.seed).state_dict().items()}
    if settings.init_from:
        from server.warm_start import load_initial_weights

        weights, state.init_origin = load_initial_weights(settings.init_from, model_config=state.model_config,
                                                          expected=weights)
        state.init_from = settings.init_from
        log.info(f"census: the deep model starts from {settings.init_from} (warm start; layout checked)")
    return weights


def _drop_rolled_back_ledgers(infos: dict[int, dict], settings: RunSettings, state: RunState,
                              log: RunLog) -> dict[int, dict]:
    """Sites whose ledger is older than the registry remembers leave the run before any training."""
    from server.ledger_registry import load_registry, went_backwards

    seen = load_registry(Path(settings.ledger_registry))
    kept = {}
    for node, info in infos.items():
        site = str(info["site"])
        reason = went_backwards(seen.get(site), info)
        if reason is None:
            kept[node] = info
            continue
        state.excluded[site] = f"census: {reason}; its privacy officer must check the vault (remove the site " \
                               f"from {settings.ledger_registry} to accept this ledger)"
        log.warning(f"census: site {site} leaves the run: {state.excluded[site]}")
    return kept


def remember_ledgers(settings: RunSettings, state: RunState, spent: dict[str, float] | None = None) -> None:
    """Record every site's ledger as seen at the census, or with ``spent`` after the run."""
    from server.ledger_registry import remember

    marks = {site: {"ledger-created": str(c["ledger-created"]), "revision": int(c["ledger-revision"]),
                    "spent": float((spent or {}).get(site, c["ledger-spent"]))}
             for site, c in state.census.items() if site not in state.excluded and "ledger-created" in c}
    remember(Path(settings.ledger_registry), marks, run_id=state.run_id)


def _drop_refusals(infos: dict[int, dict], state: RunState, log: RunLog) -> dict[int, dict]:
    """Sites whose own policy refuses the run leave it before anything is spent, named with why."""
    kept = {}
    for node, info in infos.items():
        site, refusal = str(info["site"]), str(info.get("refusal", ""))
        if not refusal:
            kept[node] = info
            continue
        state.refusals[site] = refusal
        state.excluded[site] = f"census: refused by the site's privacy policy: {refusal}"
        log.warning(f"census: site {site} refuses the run: {refusal}")
    return kept


def _check_schemas(infos: dict[int, dict]) -> None:
    by_hash: dict[str, list[dict]] = {}
    for info in infos.values():
        by_hash.setdefault(str(info["schema-hash"]), []).append(info)
    if len(by_hash) == 1:
        return
    groups = sorted(by_hash.values(), key=len, reverse=True)
    ref, other = groups[0][0], groups[1][0]
    lines = diff_schemas(json.loads(ref["schema-json"]), json.loads(other["schema-json"]),
                         names=(str(ref["site"]), str(other["site"])))
    if not lines:  # the names differ, and sites send only their counts
        lines = ["their feature lists, resolved from each site's own files and not sent, differ: pin them in the "
                 "cohort spec"]
    raise CensusError(f"census: sites do not share one schema ({len(by_hash)} different hashes); "
                      f"{ref['site']} vs {other['site']}: " + "; ".join(lines[:5]))


# ---------------------------------------------------------------------------------------------
# Phase 0b


def run_moments(grid: Grid, settings: RunSettings, state: RunState, log: RunLog) -> None:
    """The shared preprocessing: sum the sites' moments into one scaler (common/tabular.py)."""
    from common.tabular import moments_sensitivity, scaler_from_moments, shared_columns

    columns = shared_columns(state.schema)
    nodes = _require_quorum(state, settings, "moments")
    if settings.secure_sum and not state.secure:
        from server.secure_phase import setup

        setup(grid, settings, state, nodes, log)
        nodes = _require_quorum(state, settings, "moments")
    label = f"{state.run_id}-moments"
    cfg = ConfigRecord(RoundFacts(run_id=state.run_id, secure=_secure_request(state, label, nodes)).to_config())
    res = exchange(grid, nodes, lambda n: RecordDict({"config": cfg}), message_type="query.moments",
                   group_id=label, timeout=settings.round_timeout)
    _note_failures(state, log, res.failures, "moments")
    total: dict[str, np.ndarray] = {}
    noise_var = 0.0  # of the summed sums, from each site's noise multiplier (public) and the sensitivity
    summed = []
    if state.secure:
        total, summed = _secure_sum(grid, settings, state, log, res, label=label, nodes=nodes,
                                    message_type="query.moments", where="moments")
        if not all(np.shape(total.get(k)) == (columns.width,) for k in ("count", "sum", "sumsq")):
            raise TooFewSitesError("moments: the summed moments do not have the shared columns' shape")
        if not settings.dp:  # sent rescaled (not clipped) for the fixed point: back to the values' moments
            from common.tabular import raw_moments

            total = raw_moments(total, columns)
    for node in summed:
        sigma = float(res.replies[node].content.metric_records["metrics"].get("noise-multiplier", 0.0))
        noise_var += (sigma * moments_sensitivity(columns.width)) ** 2
    for node in [] if state.secure else sorted(res.replies, key=state.site_order):
        arrays = from_record(res.replies[node].content.array_records["moments"])
        bad = [k for k in ("count", "sum", "sumsq") if np.shape(arrays.get(k)) != (columns.width,)
               or not np.isfinite(arrays[k]).all()]
        if bad:
            site = state.site_of(node)
            state.excluded.setdefault(site, f"moments: malformed {', '.join(bad)}")
            log.warning(f"moments: site {site} sent malformed {', '.join(bad)} and leaves the run")
            continue
        for key in ("count", "sum", "sumsq"):
            total[key] = total.get(key, 0.0) + np.asarray(arrays[key], dtype=np.float64)
        sigma = float(res.replies[node].content.metric_records["metrics"].get("noise-multiplier", 0.0))
        noise_var += (sigma * moments_sensitivity(columns.width)) ** 2
    _require_quorum(state, settings, "moments")
    scaler = scaler_from_moments(total, columns, rescaled=settings.dp, max_glm_columns=settings.glm_width,
                                 noise_sd=math.sqrt(noise_var))
    state.shared = {k: v.tolist() for k, v in scaler.to_arrays().items()}
    record = {"phase": "moments", **res.cost(),
              "sites": sorted((state.site_of(n) for n in (summed if state.secure else res.replies)),
                              key=natural_key)}
    spent = {state.site_of(n): float(r.content.metric_records["metrics"]["epsilon"])
             for n, r in res.replies.items() if "epsilon" in r.content.metric_records["metrics"]}
    if spent:
        record["epsilon"] = dict(sorted(spent.items()))
    state.rounds.append(record)
    log.event("moments", seconds=res.seconds)
    log.info(f"moments: one scaler for {columns.width} shared columns from {len(res.replies)} sites"
             + (" (noised)" if settings.dp else "") + f"; the GLM reads {len(scaler.glm_columns)} of them")
    state.phase = "cnn"


def _secure_request(state: RunState, label: str, nodes: list[int]) -> str:
    """``RoundFacts.secure`` for an additive exchange ("" without secure sum)."""
    from server.secure_phase import request

    return request(state, label, nodes)


def _secure_sum(grid: Grid, settings: RunSettings, state: RunState, log: RunLog, res: Any, **kwargs: Any) -> Any:
    from server.secure_phase import unmask_sum

    return unmask_sum(grid, settings, state, log, res, **kwargs)


def shared_record(state: RunState) -> Any:
    """The shared scaler as the array record every later message carries."""
    return to_record({k: np.asarray(v, dtype=np.int64 if k == "glm_columns" else np.float64)
                      for k, v in state.shared.items()})


# ---------------------------------------------------------------------------------------------
# Phase 1


def run_cnn_rounds(grid: Grid, settings: RunSettings, state: RunState, log: RunLog,
                   weights: dict[str, np.ndarray], checkpoint: Any) -> dict[str, np.ndarray]:
    """FedAvg (or the configured strategy) over validated DP-SGD updates, one checkpoint per round."""
    from server.validation import validate_update

    agg = _aggregator(settings)
    if state.aggregator:
        agg.load_state_dict(state.aggregator)
    model_json = json.dumps(state.model_config)
    while state.cnn_round < settings.cnn_rounds:
        rnd = state.cnn_round + 1
        nodes = _require_quorum(state, settings, f"CNN round {rnd}")
        label = f"{state.run_id}-cnn-{rnd}"
        content = RecordDict({"arrays": to_record(weights), "shared": shared_record(state), "config": ConfigRecord(
            RoundFacts(run_id=state.run_id, server_round=rnd, model_config=model_json,
                       secure=_secure_request(state, label, nodes)).to_config())})
        res = exchange(grid, nodes, lambda n: content, message_type="train", group_id=label,
                       timeout=settings.round_timeout)
        _note_failures(state, log, res.failures, f"CNN round {rnd}")
        accepted, record = [], {"phase": "cnn", "round": rnd, **res.cost(), "sites": {}, "rejected": {}}
        if state.secure:
            accepted = _secure_update(grid, settings, state, log, res, weights, record, label=label, nodes=nodes)
        for node in [] if state.secure else sorted(res.replies, key=state.site_order):
            site, reply = state.site_of(node), res.replies[node]
            arrays, metrics = from_record(reply.content.array_records["arrays"]), dict(reply.content.metric_records["metrics"])
            verdict = validate_update(_site_spec(weights, settings, state, site), global_arrays=weights,
                                      update_arrays=arrays,
                                      num_examples=metrics.get("num-examples"))
            if not verdict.ok:
                record["rejected"][site] = verdict.reason
                log.warning(f"CNN round {rnd}: update of site {site} rejected: {verdict.reason}")
                continue
            accepted.append((arrays, int(metrics["num-examples"])))
            record["sites"][site] = {k: metrics[k] for k in ("train-loss", "epsilon", "run-epsilon", "num-examples")
                                     if k in metrics}
        if accepted:
            weights = agg.aggregate(weights, accepted)
        else:
            log.warning(f"CNN round {rnd}: no valid update; the global model is unchanged")
        state.cnn_round, state.aggregator = rnd, agg.state_dict()
        state.rounds.append(record)
        eps = ", ".join(f"{s} {v['epsilon']:.3f}" for s, v in record["sites"].items() if "epsilon" in v)
        log.info(f"CNN round {rnd}/{settings.cnn_rounds}: "
                 + (f"the secure sum of {len(record['sites'])} updates {'aggregated' if accepted else 'rejected'} "
                    if state.secure else f"{len(accepted)} updates aggregated ")
                 + f"({res.seconds:.1f} s)" + (f"; epsilon spent per site: {eps}" if eps else ""))
        log.event("cnn-round", **record)
        checkpoint(weights)
    state.phase = "glm"
    return weights


def _secure_update(grid: Grid, settings: RunSettings, state: RunState, log: RunLog, res: Any,
                   weights: dict[str, np.ndarray], record: dict[str, Any], *, label: str,
                   nodes: list[int]) -> list[tuple[dict[str, np.ndarray], int]]:
    """The round's mean update from the secure sum, as the one update the aggregator combines.

    Each site's update is hidden, so validation sees the mean only: finite, the model's layout,
    within the largest of the survivors' norm bounds and their census counts. A rejected mean
    leaves the global model unchanged (no site can be named).
    """
    from server.validation import UpdateSpec, Verdict, validate_update

    sums, summed = _secure_sum(grid, settings, state, log, res, label=label, nodes=nodes, message_type="train",
                               where=f"CNN round {record['round']}")
    metrics = {state.site_of(n): dict(res.replies[n].content.metric_records["metrics"]) for n in summed}
    n_total = sum(int(m["num-examples"]) for m in metrics.values())
    mean = {k: (sums[k] / max(n_total, 1)).astype(np.asarray(g).dtype) if k in sums else np.asarray(g)
            for k, g in weights.items()}
    specs = [_site_spec(weights, settings, state, site) for site in metrics]
    norms = [s.max_norm for s in specs if s.max_norm is not None]
    spec = UpdateSpec.from_arrays(weights, max_norm=max(norms) if len(norms) == len(specs) else None,
                                  max_examples=sum(s.max_examples or 0 for s in specs) or None)
    verdict = validate_update(spec, global_arrays=weights, update_arrays=mean, num_examples=n_total)
    over = [site for (site, m), s in zip(metrics.items(), specs)
            if s.max_examples is not None and int(m["num-examples"]) > s.max_examples]
    if over:  # FedAvg weights by the counts: one inflated count would own the mean
        verdict = Verdict(ok=False, reason=f"num-examples above the census count at {', '.join(over)}")
    for site, m in metrics.items():
        record["sites"][site] = {k: m[k] for k in ("epsilon", "run-epsilon", "num-examples") if k in m}
    if "metric.train-loss" in sums:
        record["train_loss"] = float(sums["metric.train-loss"][0]) / max(n_total, 1)
    record["secure_sum"] = True
    if not verdict.ok:
        record["rejected"]["secure sum"] = verdict.reason
        log.warning(f"CNN round {record['round']}: the summed update was rejected: {verdict.reason}")
        return []
    return [(mean, n_total)]


def _site_spec(weights: dict[str, np.ndarray], settings: RunSettings, state: RunState, site: str) -> Any:
    """What a valid update of ``site`` looks like: the model's layout, at most its census count of
    examples, and a norm bound derived from the run's settings (``max-update-norm`` overrides it)."""
    from server.validation import UpdateSpec, is_float_array, site_update_norm_bound

    n_train = int(state.census.get(site, {}).get("n-train", 0)) or None
    bound = settings.max_update_norm or site_update_norm_bound(
        lr=settings.lr, local_epochs=settings.local_epochs, batch_size=settings.batch_size,
        n_train=n_train or 1, n_params=sum(int(np.size(w)) for w in weights.values() if is_float_array(np.asarray(w))))
    return UpdateSpec.from_arrays(weights, max_norm=bound, max_examples=n_train)


def _aggregator(settings: RunSettings) -> Any:
    from dataclasses import asdict

    from server.aggregation import make_aggregator, params_from_run_config

    kebab = {k.replace("_", "-"): v for k, v in asdict(settings).items()}
    return make_aggregator(settings.strategy, **params_from_run_config(settings.strategy, kebab))


# ---------------------------------------------------------------------------------------------
# Phases 2-3


def run_glm_rounds(grid: Grid, settings: RunSettings, state: RunState, log: RunLog,
                   weights: dict[str, np.ndarray], checkpoint: Any) -> list[float]:
    """Federated Newton on the GLM over the shared columns the scaler chose for it; under DP (at
    most ``glm-dp-columns`` of them) one step from the sites' noised gradients with a public
    curvature, of which the ``glm-dp-max-features`` largest columns are kept (:mod:`common.glm`)."""
    from common.glm import GLM_FEATURE_BOUND, intercept_only, keep_largest, public_curvature
    from common.meta import NewtonSolver

    k = max(len(state.schema["label"]["classes"]), 2)
    n_features = len(state.shared["glm_columns"])
    solver = NewtonSolver(n_features=n_features, n_classes=k, penalty="l2", C=settings.glm_c)
    if state.glm_solver:
        solver.load_state_dict(state.glm_solver)
    elif settings.dp:
        solver.coef = solver.best_coef = intercept_only(_train_class_counts(state), n_features=n_features, n_classes=k)
    content = {"shared": shared_record(state)}
    # No warm start: local fits over hundreds of columns at one site overfit, and Newton from zero
    # (under DP, from the intercept-only model) on the penalized objective converges in a few rounds
    # anyway (and releases less).
    curvature = (lambda n: public_curvature(n=n, n_features=n_features, n_classes=k)) if settings.dp else None
    _newton_rounds(grid, settings, state, log, solver, content, kind="glm", rounds=settings.glm_fit_rounds,
                   bound=GLM_FEATURE_BOUND, max_n="n-train", facts={}, warm_start=False,
                   checkpoint=lambda: checkpoint(weights), public_curvature=curvature)
    coef = solver.result()
    if settings.dp:
        coef = keep_largest(coef, n_features=n_features, n_classes=k, keep=settings.glm_dp_max_features)
    state.glm_coef = [float(c) for c in coef]
    state.phase = "meta"
    return state.glm_coef


def _train_class_counts(state: RunState) -> np.ndarray:
    """The training sites' train-split class counts, summed from their census replies."""
    total = 0
    for node in state.active_nodes():
        c = state.census[state.site_of(node)]
        total = total + (np.asarray(c["class-counts"]) - np.asarray(c["test-class-counts"])
                         - np.asarray(c["validation-class-counts"]))
    return np.maximum(np.asarray(total, dtype=np.float64), 0.0)


def run_meta_rounds(grid: Grid, settings: RunSettings, state: RunState, log: RunLog,
                    weights: dict[str, np.ndarray], checkpoint: Any) -> list[float]:
    """Federated Newton on the stacking meta-classifier (the first round also fits the forests).

    With public weights (DP, ``meta-dp-rounds = 0``) there is no round: the coefficients are the
    averaging prior, and each site fits its forest and GLM in the first exchange that needs them.
    """
    from common.meta import META_FEATURE_BOUND, NewtonSolver, averaging_prior, model_mask, positive_evidence

    k = len(state.schema["label"]["classes"])
    n_models = len(BASE_MODELS)
    positive = positive_evidence(n_models=n_models, n_classes=max(k, 2)) if settings.meta_positive else None
    left_out = local_indices(stack_local=settings.stack_forest)
    fixed = model_mask(n_models=n_models, n_classes=max(k, 2), index=left_out) if left_out else None
    solver = NewtonSolver(n_features=n_models * (1 if k == 2 else k), n_classes=max(k, 2), penalty="l2",
                          C=settings.meta_c, tol=settings.meta_tol, positive=positive, fixed=fixed)
    if state.meta_solver:
        solver.load_state_dict(state.meta_solver)
    elif settings.dp:
        # Noised steps from zero can land anywhere, sign flips included; from the plain average of
        # the base models' log-odds (public, needs no data) a noisy step can only refine.
        solver.coef = solver.best_coef = averaging_prior(n_models=n_models, n_classes=max(k, 2), left_out=left_out)
    if settings.public_meta_weights:
        log.info("meta-classifier: public weights (DP, meta-dp-rounds = 0): the base models' log-odds averaged "
                 "with equal weights; no meta statistics are released")
    content = {"cnn": to_record(weights), "shared": shared_record(state)}
    _newton_rounds(grid, settings, state, log, solver, content, kind="meta", rounds=settings.meta_fit_rounds,
                   bound=META_FEATURE_BOUND, max_n="n-validation", warm_start=not settings.dp,
                   facts={"glm_coef": tuple(state.glm_coef)}, checkpoint=lambda: checkpoint(weights))
    state.meta_coef = [float(c) for c in solver.result()]
    state.phase = "alone"
    return state.meta_coef


def run_site_alone(grid: Grid, settings: RunSettings, state: RunState, log: RunLog) -> None:
    """Every site (the held-out one too) trains its own models alone, once per run, for the
    site-alone comparison; nothing but a count leaves.

    It is the longest local work of a run (the federation's total epochs, without DP), so its
    timeout is ``round-timeout`` times ``cnn-rounds``; a site that fails or does not answer in time
    stays in the run and is evaluated, without its site-alone rows.
    """
    state.phase = "threshold"
    if not settings.releases_site_alone or settings.test_statistics == "none":
        return
    nodes = _require_quorum(state, settings, "site alone", training=False)
    timeout = settings.round_timeout * max(1, settings.cnn_rounds)
    log.info(f"site alone: each site trains its own models on its data alone "
             f"({settings.cnn_rounds * settings.local_epochs} epochs, no DP, nothing leaves; up to {timeout:.0f} s)")
    cfg = ConfigRecord(RoundFacts(run_id=state.run_id, model_config=json.dumps(state.model_config)).to_config())
    res = exchange(grid, nodes, lambda n: RecordDict({"config": cfg}), message_type="train.alone",
                   group_id=f"{state.run_id}-alone", timeout=timeout)
    for node, reason in res.failures.items():
        state.alone_missing[state.site_of(node)] = reason
        log.warning(f"site alone: site {state.site_of(node)} has no models alone ({reason}); it stays in the run "
                    f"without its site-alone rows")
    state.rounds.append({"phase": "alone", **res.cost(),
                         "sites": sorted((state.site_of(n) for n in res.replies), key=natural_key)})
    log.event("alone", seconds=res.seconds, sites=sorted((state.site_of(n) for n in res.replies), key=natural_key))


def _newton_rounds(grid: Grid, settings: RunSettings, state: RunState, log: RunLog, solver: Any,
                   content: dict[str, Any], *, kind: str, rounds: int, bound: float, max_n: str,
                   facts: dict[str, Any], warm_start: bool, checkpoint: Any,
                   public_curvature: Any = None) -> None:
    """Federated Newton rounds of one logistic fit (``kind`` "glm" or "meta"), checkpointed each round.

    With ``public_curvature(n)``, the sites send gradients only and each one's Hessian is that
    public matrix for its record count (the DP GLM).
    """
    from common.meta import NewtonTerms, nearest_positive_definite, noise_floor

    name = "GLM" if kind == "glm" else "meta"
    k = max(len(state.schema["label"]["classes"]), 2)
    while getattr(state, f"{kind}_round") < rounds and not solver.converged:
        rnd = getattr(state, f"{kind}_round") + 1
        nodes = _require_quorum(state, settings, f"{name} round {rnd}")
        warm = rnd == 1 and warm_start and not settings.dp  # a local fit has no DP mechanism: never under DP
        label = f"{state.run_id}-{kind}-{rnd}"
        cfg = ConfigRecord(RoundFacts(run_id=state.run_id, server_round=rnd, model_config=json.dumps(state.model_config),
                                      coef=tuple(float(c) for c in solver.coef), warm_start=warm,
                                      secure=_secure_request(state, label, nodes), **facts).to_config())
        res = exchange(grid, nodes, lambda n: RecordDict({**content, "config": cfg}), message_type=f"train.{kind}",
                       group_id=label, timeout=settings.round_timeout)
        _note_failures(state, log, res.failures, f"{name} round {rnd}")
        local: dict[str, np.ndarray] = {}  # the warm start's sums (secure sum)
        if state.secure:
            replies, total, local = _secure_newton_terms(grid, settings, state, log, res, label=label, nodes=nodes,
                                                  kind=kind, where=f"{name} round {rnd}", dim=solver.coef.shape[0],
                                                  max_n=max_n, public_curvature=public_curvature)
        else:
            replies, rejected = _valid_newton_replies(res, state, log, f"{name} round {rnd}",
                                                      dim=solver.coef.shape[0], max_n=max_n,
                                                      public_curvature=public_curvature)
            if len(replies) < settings.min_sites:
                raise TooFewSitesError(f"{name} round {rnd}: {len(replies)} site(s) sent valid terms"
                                       + "".join(f"; {s}: {r}" for s, r in rejected.items()))
            terms = [NewtonTerms(float(r.get("loss", np.nan)), r["grad"], r["hess"], int(r["num-examples"]))
                     for r in replies]
            total = sum(terms[1:], terms[0])
        if settings.dp and public_curvature is None:  # a released, noised Hessian
            floor = noise_floor(dim=total.hess.shape[0], n_classes=k, bound=bound,
                                noise_multipliers=[float(r.get("noise-multiplier", 0.0)) for r in replies])
            total.hess = nearest_positive_definite(total.hess, floor=floor)
        if warm and state.secure:
            solver.warm_start_from_sums(total, coef_sum=local["local_coef"], hess_sum=local["local_hess"],
                                        hess_coef_sum=local["local_hess_coef"], holders=len(replies))
            log.info(f"{name} round 1: {'forests fitted and ' if kind == 'meta' else ''}warm start from the sum of "
                     f"{len(replies)} sites' local fits")
        elif warm:
            solver.warm_start(total, [r["local_coef"] for r in replies], [r["local_hess"] for r in replies])
            log.info(f"{name} round 1: {'forests fitted and ' if kind == 'meta' else ''}warm start from "
                     f"{len(replies)} sites' local fits")
        else:
            solver.step(total)
            log.info(f"{name} round {rnd}: Newton step" + (
                " on noised statistics (no objective released)" if settings.dp
                else f", objective {solver.best_objective:.6f}") + (" (converged)" if solver.converged else ""))
        setattr(state, f"{kind}_round", rnd)
        setattr(state, f"{kind}_solver", solver.state_dict())
        record = {"phase": kind, "round": rnd, **res.cost(),
                  "sites": sorted((state.site_of(n) for n in res.replies), key=natural_key),
                  "converged": solver.converged}
        spent = {state.site_of(n): float(r.content.metric_records["metrics"]["epsilon"])
                 for n, r in res.replies.items() if "epsilon" in r.content.metric_records["metrics"]}
        if spent:
            record["epsilon"] = dict(sorted(spent.items()))
            log.info(f"{name} round {rnd}: epsilon spent per site: "
                     + ", ".join(f"{s} {e:.3f}" for s, e in record["epsilon"].items()))
        state.rounds.append(record)
        log.event(f"{kind}-round", round=rnd, seconds=res.seconds, converged=solver.converged)
        checkpoint()


def _secure_newton_terms(grid: Grid, settings: RunSettings, state: RunState, log: RunLog, res: Any, *, label: str,
                         nodes: list[int], kind: str, where: str, dim: int, max_n: str,
                         public_curvature: Any = None) -> tuple[list[dict[str, Any]], Any, dict[str, np.ndarray]]:
    """The summed Newton terms from the secure sum, checked as a whole (finite, shapes, symmetric,
    within the survivors' census counts); returns the survivors' plain metrics, the terms, and the
    warm start's sums (local fits, Hessians and their products)."""
    from common.meta import NewtonTerms
    from server.validation import check_newton_terms

    sums, summed = _secure_sum(grid, settings, state, log, res, label=label, nodes=nodes,
                               message_type=f"train.{kind}", where=where)
    replies = [dict(res.replies[n].content.metric_records["metrics"]) for n in summed]
    counts = [int(state.census.get(state.site_of(n), {}).get(max_n, 0)) for n in summed]
    n = sum(int(r["num-examples"]) for r in replies)
    hess = sums.get("hess")
    if public_curvature is not None:
        hess = None if "hess" in sums else sum(public_curvature(c) for c in counts)
    why = check_newton_terms(sums.get("grad"), hess, dim=dim, n=n, max_n=sum(counts) or None)
    if why is None and any(int(r["num-examples"]) > c for r, c in zip(replies, counts) if c):
        why = "num-examples above the census count"
    if why is not None:
        raise TooFewSitesError(f"{where}: the summed terms were rejected: {why}")
    total = NewtonTerms(float(sums["metric.loss"][0]) if "metric.loss" in sums else float("nan"), sums["grad"], hess, n)
    local = {k: sums[k] for k in ("local_coef", "local_hess", "local_hess_coef") if k in sums}
    return replies, total, local


def _valid_newton_replies(res: Any, state: RunState, log: RunLog, where: str, *, dim: int, max_n: str,
                          public_curvature: Any = None) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """The sites' Newton terms that are finite, of the right shapes, symmetric and within their census count
    (with ``public_curvature``, each site's Hessian is that public matrix at its census count)."""
    from server.validation import check_newton_terms

    replies, rejected = [], {}
    for node, reply in sorted(res.replies.items(), key=lambda kv: state.site_order(kv[0])):
        site = state.site_of(node)
        r = from_record(reply.content.array_records["terms"]) | dict(reply.content.metric_records["metrics"])
        n_val = int(state.census.get(site, {}).get(max_n, 0)) or None
        if public_curvature is not None:
            r["hess"] = None if "hess" in r else public_curvature(n_val or 0)  # a sent Hessian is out of contract
        why = check_newton_terms(r.get("grad"), r.get("hess"), dim=dim, n=r.get("num-examples"), max_n=n_val)
        if why is None and "local_coef" in r:
            why = check_newton_terms(r["local_coef"], r.get("local_hess"), dim=dim, n=r.get("num-examples"),
                                     max_n=n_val)
        if why is not None:
            rejected[site] = why
            state.excluded.setdefault(site, f"{where}: terms rejected: {why}")
            log.warning(f"{where}: terms of site {site} rejected: {why}")
            continue
        replies.append(r)
    return replies, rejected


# ---------------------------------------------------------------------------------------------
# Phase 4


def run_thresholds(grid: Grid, settings: RunSettings, state: RunState, log: RunLog,
                   weights: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    """Each model's operating threshold, and the stacking fallback, from the sites' summed
    validation statistics.

    Thresholds are for binary problems only (multi-class decisions stay argmax): Youden's J by
    default, or the highest threshold reaching ``target-sensitivity``; probability 0.5 where no
    validation statistics are released (``test-statistics = none``). The stacking fallback
    (:func:`_stacking_fallback`) and each site's choice of its best model alone use the same
    statistics for any number of classes.
    """
    from common.metrics import metrics_from_stats

    k = len(state.schema["label"]["classes"])
    state.phase = "explain" if settings.explain else "evaluate"
    pooled: dict[str, Any] = {}
    per_site: dict[str, dict[str, Any]] = {}
    if settings.test_statistics != "none":
        facts = RoundFacts(run_id=state.run_id, model_config=json.dumps(state.model_config),
                           coef=tuple(state.meta_coef), glm_coef=tuple(state.glm_coef))
        pooled, _, per_site, res = _statistics_exchange(grid, settings, state, log, weights, facts,
                                                        message_type="query.validation", where="validation")
        log.event("validation", seconds=res.seconds)
        state.rounds.append({"phase": "validation", **res.cost(), "sites": sorted(per_site, key=natural_key),
                             "epsilon": {s: v["epsilon"] for s, v in per_site.items() if v["epsilon"] > 0}})
    chosen = _binary_thresholds(settings, state, pooled, per_site) if k == 2 else {}
    state.meta_fallback = _stacking_fallback(state, pooled, k, margin_se=settings.fallback_margin,
                                             site_average_se=settings.site_average_margin,
                                             candidates=stacked_models(stack_local=settings.stack_forest),
                                             weights="public" if settings.public_meta_weights else "fitted")
    if state.meta_fallback.get("model"):
        fb = state.meta_fallback
        if chosen:
            chosen["hybrid"] = dict(chosen[fb["model"]])
        log.warning("meta-classifier: " + fallback_words(fb))
    state.thresholds = {m: t for m, t in chosen.items() if m in MODELS}
    # A site alone would pick its best model alone on its own validation split, never on its test split.
    state.site_validation_auc = {
        site: {row: metrics_from_stats(v["stats"][released])["auc"]
               for row, released in SITE_ALONE_ROWS.items() if released in v["stats"]}
        for site, v in per_site.items()}
    if chosen:
        log.info("operating thresholds (probability of class 1, " + next(iter(chosen.values()))["rule"] + "): "
                 + ", ".join(f"{m} {t['probability']:.3f}" for m, t in chosen.items()))
    return chosen


def _binary_thresholds(settings: RunSettings, state: RunState, pooled: dict[str, Any],
                       per_site: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The federated models' thresholds from the summed statistics; each site's own models' from its own."""
    from common.metrics import Threshold, choose_threshold

    chosen = {}
    for name in MODELS + tuple(REDUCED_STACKS):
        if name in pooled or name in MODELS:  # a reduced stack needs its statistics; a model gets 0.5 without
            th = choose_threshold(pooled[name], target_sensitivity=settings.target_sensitivity) if name in pooled \
                else Threshold.default()
            chosen[name] = th.to_dict()
    # A site alone would choose its own models' thresholds on its own validation split.
    state.site_thresholds = {
        site: {row: choose_threshold(v["stats"][released], target_sensitivity=settings.target_sensitivity).to_dict()
               for row, released in SITE_ALONE_ROWS.items() if released in v["stats"]}
        for site, v in per_site.items()}
    return chosen


def run_evaluation(grid: Grid, settings: RunSettings, state: RunState, log: RunLog,
                   weights: dict[str, np.ndarray]) -> dict[str, Any]:
    """Every site evaluates every model on its test split and stores the final models."""
    from common.metrics import Threshold, at_threshold

    thresholds = {m: Threshold(int(t["bin"]), int(t["n_bins"]), str(t["rule"])) for m, t in state.thresholds.items()}
    facts = RoundFacts(run_id=state.run_id, model_config=json.dumps(state.model_config), coef=tuple(state.meta_coef),
                       glm_coef=tuple(state.glm_coef),
                       thresholds=tuple(thresholds[m].probability for m in MODELS) if thresholds else (),
                       explanation=json.dumps(state.explanation) if state.explanation else "")
    pooled, paired, per_site, res = _statistics_exchange(grid, settings, state, log, weights, facts,
                                                         message_type="evaluate", where="evaluation", training=False)
    for site, v in per_site.items():
        v["alone"] = _site_alone_stats(v["stats"], state.site_thresholds.get(site, {}))
    if thresholds:
        pooled = {m: at_threshold(st, thresholds[m]) for m, st in pooled.items() if m in thresholds}
        for v in per_site.values():
            v["stats"] = {m: at_threshold(st, thresholds[m]) for m, st in v["stats"].items() if m in thresholds}
    else:
        pooled = {m: st for m, st in pooled.items() if m in MODELS}
        for v in per_site.values():
            v["stats"] = {m: st for m, st in v["stats"].items() if m in MODELS}
    state.rounds.append({"phase": "evaluate", **res.cost(),
                         "sites": sorted(per_site, key=natural_key),
                         "epsilon": {s: v["epsilon"] for s, v in per_site.items() if v["epsilon"] > 0}})
    log.event("evaluate", seconds=res.seconds, sites=sorted(per_site, key=natural_key))
    state.phase = "done"
    log.info(f"evaluation: {len(per_site)} sites returned test statistics; final models stored at every site")
    return {"pooled": pooled, "sites": per_site, "paired": paired_tests(paired)}


def _stacking_fallback(state: RunState, pooled: dict[str, Any], n_classes: int, *, margin_se: float,
                       site_average_se: float, candidates: tuple[str, ...] = BASE_MODELS,
                       weights: str = "fitted") -> dict[str, Any]:
    """The stack the hybrid becomes, chosen on the sites' summed validation statistics; returns
    what was decided and on what figures, or {} (no statistics).

    The candidates are the fitted stack and the reduced stacks (the stack without each base
    model, :data:`common.stack.REDUCED_STACKS`). Unless the best of them beats the best base model
    of ``candidates`` by more than ``margin_se`` times that model's AUC standard error (``meta-fallback-margin``),
    the hybrid becomes that base model; otherwise it becomes the best stack. ``state.meta_coef`` is
    set to what was chosen.

    The meta-classifier was fitted on the same validation split, so its figure there is
    optimistic by a little (a few coefficients on hundreds of records); a margin in standard
    errors (Hanley and McNeil's, from the validation class counts) can demand more than that. The
    default is no margin: over eight measured runs a margin of one error changed one decision, and
    cost that run's hybrid 0.059 of test AUC (docs/learning.md). The fallback is what saves the
    hybrid when the meta statistics are noise (DP at small validation splits); the reduced stacks
    are what keeps two good models together when a third (a DP GLM at chance) would dilute them.

    Where the hybrid would fall back to one of the site's own models (its forest or its GLM), it
    becomes the two averaged with equal weights (:data:`common.stack.SITE_AVERAGE`) instead, unless
    that model leads the average by more than ``site_average_se`` times the standard error
    (``site-average-margin``): at these validation sizes the two are within the split's noise of
    each other, and on the test splits of 47 measured runs the average beat the forest in 46
    (docs/learning.md, "The site models averaged rather than one chosen").
    Post-processing of released statistics: no privacy cost. In the decision, ``model`` is what
    replaced the fitted stack ("" if it was kept) and ``chosen`` names what the hybrid is either way;
    ``weights`` says whether the stack's weights were fitted or public (the averaging prior: DP with
    ``meta-dp-rounds = 0``), for the words that describe it.
    """
    from common.meta import selection_coef
    from common.metrics import auc_standard_error, metrics_from_stats

    if "hybrid" not in pooled or not all(m in pooled for m in BASE_MODELS):
        return {}
    stacks = ["hybrid", *(m for m in REDUCED_STACKS if m in pooled)]
    auc = {m: float(metrics_from_stats(pooled[m])["auc"]) for m in (*stacks, *BASE_MODELS)}
    best = max(candidates, key=lambda m: -1.0 if math.isnan(auc[m]) else auc[m])
    se = auc_standard_error(pooled[best])
    if math.isnan(se):  # a class missing from the validation splits: nothing to decide on
        return {}
    best, stack, chosen = choose_stack(auc, stacks=stacks, candidates=candidates, se=se, margin_se=margin_se,
                                       site_average_se=site_average_se)
    decision = {"validation_auc": auc, "best_base": best, "best_stack": stack, "standard_error": se,
                "margin": margin_se * se, "margin_se": margin_se, "weights": weights}
    if chosen == "hybrid":
        return {**decision, "model": "", "chosen": "hybrid"}
    decision["fitted_coef"] = [float(c) for c in state.meta_coef]  # what the meta rounds fitted, set aside
    k = max(n_classes, 2)
    if chosen in REDUCED_STACKS:
        coef = reduced_stack_weights(chosen, np.asarray(state.meta_coef), n_classes=k)
    else:
        coef = selection_coef(n_models=len(BASE_MODELS), n_classes=k, index=BASE_MODELS.index(chosen))
    if chosen == SITE_AVERAGE and not auc[stack] > auc[best] + margin_se * se:  # the fallback's average
        decision.update(reason="site-average", site_average_se=site_average_se,
                        site_average_margin=site_average_se * se)
    state.meta_coef = [float(c) for c in coef]
    return {**decision, "model": chosen, "chosen": chosen}


def _site_alone_stats(stats: dict[str, Any], thresholds: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A site's own models (deep model, forest, GLM) at the site's own thresholds (binary); none
    unless the site released its models alone (a site that did not train them has only its forest)."""
    from common.metrics import Threshold, at_threshold

    if not all(m in stats for m in ALONE_MODELS):
        return {}
    out = {}
    for row, released in SITE_ALONE_ROWS.items():
        if released not in stats:
            continue
        th = thresholds.get(row)
        out[row] = at_threshold(stats[released], Threshold(int(th["bin"]), int(th["n_bins"]), str(th["rule"]))) \
            if th else stats[released]
    return out


def _statistics_exchange(grid: Grid, settings: RunSettings, state: RunState, log: RunLog,
                         weights: dict[str, np.ndarray], facts: RoundFacts, *, message_type: str,
                         where: str, training: bool = True) -> tuple[dict[str, Any], dict[str, np.ndarray],
                                                                     dict[str, dict[str, Any]], Any]:
    """Ask every site for its released statistics of one split; sum them per model (the held-out
    site, asked when not ``training``, is left out of the sums).

    Returns the summed statistics by model, the summed discordant counts by pair, each site's
    count, noise and epsilon (with its own statistics, unless they went through the secure sum),
    and the exchange.
    """
    nodes = _require_quorum(state, settings, where, training=training)
    label = f"{state.run_id}-{where}"
    cfg = ConfigRecord(replace(facts, secure=_secure_request(state, label, nodes)).to_config())
    shared = shared_record(state)
    cnn = to_record(weights)
    res = exchange(grid, nodes, lambda n: RecordDict({"cnn": cnn, "shared": shared, "config": cfg}),
                   message_type=message_type, group_id=label, timeout=settings.round_timeout)
    _note_failures(state, log, res.failures, where)
    k = max(len(state.schema["label"]["classes"]), 2)
    if state.secure:
        return (*_secure_statistics(grid, settings, state, log, res, nodes=nodes, label=label,
                                    message_type=message_type, where=where, k=k), res)
    pooled: dict[str, Any] = {}
    pooled_paired: dict[str, np.ndarray] = {}
    per_site: dict[str, dict[str, Any]] = {}
    for node in sorted(res.replies, key=state.site_order):
        site, reply = state.site_of(node), res.replies[node]
        arrays = from_record(reply.content.array_records["stats"]) if "stats" in reply.content.array_records else {}
        try:
            stats, paired = _stats_from_arrays(arrays, k), _paired_from_arrays(arrays)
        except ValueError as exc:
            state.excluded.setdefault(site, f"{where}: statistics rejected: {exc}")
            log.warning(f"{where}: statistics of site {site} rejected: {exc}")
            continue
        per_site[site] = {**_site_counts(reply), "stats": stats, "paired": paired}
        if site == state.held_out:
            continue
        for name, st in stats.items():
            pooled[name] = pooled[name] + st if name in pooled else st
        for pair, counts in paired.items():
            pooled_paired[pair] = pooled_paired.get(pair, np.zeros(2)) + counts
    return pooled, pooled_paired, per_site, res


def _site_counts(reply: Any) -> dict[str, Any]:
    """What a statistics reply says in the clear: the split's count, the noise added, the epsilon spent."""
    metrics = dict(reply.content.metric_records["metrics"])
    return {"n": int(metrics.get("num-examples", 0)), "noise_std": float(metrics.get("noise-std", 0.0)),
            "epsilon": float(metrics.get("epsilon", 0.0))}


def _secure_statistics(grid: Grid, settings: RunSettings, state: RunState, log: RunLog, res: Any, *,
                       nodes: list[int], label: str, message_type: str, where: str,
                       k: int) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, dict[str, Any]]]:
    """The unmasked sum of the sites' statistics, made whole counts here: rounded, and under DP
    projected onto the summed class counts of the census (post-processing of the one release the
    coordinator sees; the sites add noise only). No site's own statistics are known."""
    from common.metrics import project_rows_to_totals, released_totals

    sums, summed = _secure_sum(grid, settings, state, log, res, label=label, nodes=nodes, message_type=message_type,
                               where=where)
    split = "test" if message_type == "evaluate" else "validation"
    counts = sum(np.asarray(state.census[state.site_of(n)][f"{split}-class-counts"], dtype=np.int64) for n in summed)
    totals = released_totals(np.asarray(counts, dtype=np.int64)) if settings.test_statistics == "noised" else {}
    whole = {}
    for key, value in sums.items():
        part = key.partition(".")[2]
        if part in totals:  # a model's histograms (a pair's counts have no known total)
            flat = np.asarray(value, dtype=np.float64).reshape(-1, np.shape(value)[-1])
            row_totals = np.broadcast_to(np.asarray(totals[part], dtype=np.int64), (flat.shape[0],))
            whole[key] = project_rows_to_totals(flat, totals=row_totals).reshape(np.shape(value))
        else:
            whole[key] = np.maximum(np.rint(value), 0).astype(np.int64)
    try:
        pooled, paired = _stats_from_arrays(whole, k), _paired_from_arrays(whole)
    except ValueError as exc:
        raise TooFewSitesError(f"{where}: the summed statistics are malformed: {exc}") from None
    per_site = {state.site_of(n): {**_site_counts(res.replies[n]), "stats": {}, "paired": {}}
                for n in sorted(summed, key=state.site_order)}
    return pooled, paired, per_site


def _stats_from_arrays(arrays: dict[str, np.ndarray], n_classes: int) -> dict[str, Any]:
    """Released test statistics per model (empty when a site's policy releases none).

    Raises
    ------
    ValueError
        The arrays do not have the released shapes.
    """
    from common.metrics import stats_from_released

    by_model: dict[str, dict[str, np.ndarray]] = {}
    for key, value in arrays.items():
        if key.startswith("paired."):
            continue  # the discordant counts: _paired_from_arrays
        model, _, part = key.partition(".")
        if model not in MODELS + tuple(REDUCED_STACKS) + ALONE_MODELS:
            raise ValueError(f"unknown model {model!r} in test statistics")
        by_model.setdefault(model, {})[part] = value
    return {m: stats_from_released(parts, n_classes=n_classes) for m, parts in by_model.items()}


def _paired_from_arrays(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Released discordant counts of the hybrid against each base model (test split).

    Raises
    ------
    ValueError
        A pair that is not the hybrid against a base model, or not two finite counts.
    """
    from common.paired import PAIRED_WITH, paired_key

    out = {}
    for key, value in arrays.items():
        if not key.startswith("paired."):
            continue
        if key not in {paired_key(m) for m in PAIRED_WITH}:
            raise ValueError(f"unknown paired comparison {key!r}")
        if np.shape(value) != (2,) or not np.isfinite(value).all():
            raise ValueError(f"{key} is not two finite counts")
        out[key.removeprefix("paired.")] = np.asarray(value, dtype=np.float64)
    return out


def paired_tests(sums: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    """McNemar's test of the hybrid against each base model on the summed discordant counts
    (the held-out site left out, as from every pooled figure)."""
    from common.paired import mcnemar

    return {pair: mcnemar(np.asarray(counts)) for pair, counts in sorted(sums.items())}


def new_state() -> RunState:
    """A fresh run with its own genofed run id (sites key their per-run state by it)."""
    return RunState(run_id=uuid.uuid4().hex[:12])


def state_to_dict(state: RunState) -> dict[str, Any]:
    return asdict(state)


def state_from_dict(d: dict[str, Any]) -> RunState:
    return RunState(**d)
