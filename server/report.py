"""The run directory's ``metrics.json`` and ``metrics.md``, from pooled statistics and run state.

``metrics.json`` has the schema of ``genofed evaluate`` (``models`` keyed ``hybrid``, ``cnn``,
``forest``, ``logreg`` with ``auc``, ``accuracy``, ``precision``, ``recall``, ``specificity``,
``f1``, ``auprc`` and ``ci``), plus ``sites`` (each site's own test metrics), ``privacy`` keyed by
site (``epsilon`` spent in total by the site's ledger, ``run_epsilon`` of this run's DP-SGD,
``delta``), ``missing_sites`` (site -> why it left the run), ``rounds`` and ``settings``.
Pooled metrics are computed from the sum of the sites' statistics: counts exactly, AUC within
the ``auc_bound`` it reports; intervals come from a parametric bootstrap of those statistics.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from common.files import json_default, write_text_atomic
from common.metrics import (
    METRIC_NAMES,
    EvalStats,
    bootstrap_ci_from_stats,
    metrics_from_stats,
)
from common.settings import RunSettings
from common.site_names import natural_key
from common.stack import AVERAGED_STACKS, REDUCED_STACKS, fallback_words, left_out_words
from server.explanation_doc import explanation_markdown, read_explanation
from server.phases import MODELS, RunState

MODEL_ROLES = {
    "hybrid": "federated stacking meta-classifier over the four base models below",
    "cnn": "federated deep model (FedAvg of the sites' DP-SGD updates)",
    "forest": "each site's own random forest (local: it never leaves its site), evaluated at its site",
    "logreg": "federated GLM: penalized logistic regression on the shared tabular features (glm-* settings)",
    "site-logreg": "each site's own GLM, fitted on its train split alone (local: it never leaves its site), "
                   "evaluated at its site",
}
"""What each row of ``models`` is: rows that are local models are labelled as such."""


def _site_metrics(site: dict[str, Any], census: dict[str, Any], *, seed: int) -> dict[str, Any]:
    """One site's test metrics, computed here from the statistics it released (noised if so).

    With noised statistics, ``auc_noise_sd`` is the standard deviation that the site's own noise
    adds to an AUC there (simulated on its hybrid's released statistics, as the pooled figures'):
    at a few test patients it is larger than any difference between models.
    """
    from common.metrics import noise_error

    out: dict[str, Any] = {"n": site["n"], "class_counts": _test_class_counts(census), "noise_std": site["noise_std"]}
    for model, stats in site["stats"].items():
        m = metrics_from_stats(stats)
        out[model] = {**{k: m[k] for k in METRIC_NAMES}, "auc_bound": m["auc_bound"]}
    hybrid = site["stats"].get("hybrid")
    if site["noise_std"] > 0 and hybrid is not None:
        out["auc_noise_sd"] = noise_error(hybrid, noise_std_per_site=site["noise_std"], n_sites=1, draws=100,
                                          seed=seed)["auc"]
    return out


def site_alone_comparison(evaluation: dict[str, Any], state: RunState) -> dict[str, Any]:
    """What federation bought: each site's own models alone against the federated hybrid, on its test split.

    ``sites``: per site, the test class counts, each own model's metrics (deep model and GLM
    trained on the site alone, its forest; each at the site's own validation threshold), the
    best of them (``best_alone``: by AUC on the site's validation split, as the site alone would
    choose; by test AUC, an optimistic choice said in ``best_alone_chosen_on``, where no validation
    statistics were released: ``test-statistics = none``), and the federated models' AUCs there. ``pooled``: each own model's
    statistics summed over the sites. ``mean_auc``: averaged over sites, the federated hybrid and
    each site's best model alone.
    """
    sites, pooled = {}, {}
    for site, v in evaluation["sites"].items():
        alone = v.get("alone", {})
        if not alone or site == state.held_out:
            continue
        own = {row: _metric_subset(metrics_from_stats(st)) for row, st in alone.items()}
        validation = state.site_validation_auc.get(site, {})
        chosen_on = "validation" if all(row in validation for row in own) else "test"
        score = validation if chosen_on == "validation" else {row: own[row]["auc"] for row in own}
        best = _best_alone(score)
        best_auc = own[best]["auc"] if best else float("nan")
        fed = {m: metrics_from_stats(st)["auc"] for m, st in v["stats"].items()}
        sites[site] = {"class_counts": _test_class_counts(state.census.get(site, {})), **own,
                       "validation_auc": dict(validation), "best_alone": best, "best_alone_chosen_on": chosen_on,
                       "best_alone_auc": best_auc,
                       "federated_auc": fed,
                       "federated_hybrid_minus_best_alone": fed.get("hybrid", float("nan")) - best_auc}
        for row, st in alone.items():
            pooled[row] = pooled[row] + st if row in pooled else st
    missing = {site: why for site, why in state.alone_missing.items() if site != state.held_out}
    if not sites:
        return {"sites": {}, "without_models_alone": missing} if missing else {}
    # The two means are over the same sites: those where both figures exist (a split with one
    # class has no AUC), so that their difference compares like with like.
    compared = [s for s in sites.values() if not math.isnan(s["federated_hybrid_minus_best_alone"])]
    hybrid = [s["federated_auc"]["hybrid"] for s in compared]
    best = [s["best_alone_auc"] for s in compared]
    return {"sites": sites, "pooled": {row: _metric_subset(metrics_from_stats(st)) for row, st in pooled.items()},
            "mean_auc": {"federated_hybrid": _nanmean(hybrid), "best_alone": _nanmean(best),
                         "sites_compared": len(compared),
                         **{f"alone_{row}": _nanmean([s[row]["auc"] for s in sites.values() if row in s])
                            for row in pooled}},
            "without_models_alone": missing}


def _held_out(evaluation: dict[str, Any], state: RunState) -> dict[str, Any]:
    """The held-out site (it did not train): the federated models there against its own models."""
    v = evaluation["sites"].get(state.held_out)
    if not state.held_out or v is None:
        return {}
    return {"site": state.held_out, "class_counts": _test_class_counts(state.census.get(state.held_out, {})),
            "federated": {m: _metric_subset(metrics_from_stats(st)) for m, st in v["stats"].items()},
            "own": {row: _metric_subset(metrics_from_stats(st)) for row, st in v.get("alone", {}).items()}}


def _metric_subset(m: dict[str, float]) -> dict[str, float]:
    return {k: m[k] for k in METRIC_NAMES}


def _best_alone(score: dict[str, float]) -> str | None:
    """The own model with the highest score; None when no score exists (the split the site chooses
    on holds one class), since the site alone could not choose."""
    finite = {row: v for row, v in score.items() if not math.isnan(v)}
    return max(finite, key=finite.__getitem__) if finite else None


def best_alone_words(site: dict[str, Any]) -> str:
    """A site's best model alone and its test AUC ("0.687 (forest)"), or "n/a" without one."""
    if not site.get("best_alone"):
        return "n/a"
    return f"{fmt(site['best_alone_auc'])} ({site['best_alone']})"


def mean_label(sa: dict[str, Any]) -> str:
    """The site-alone table's last row: its best-alone and hybrid means are over the sites with both."""
    n = sa["mean_auc"].get("sites_compared", len(sa["sites"]))
    if n == len(sa["sites"]):
        return "mean over sites"
    return f"mean over sites (best alone and hybrid: the {n} of {len(sa['sites'])} sites with both figures)"


def signed(x: float) -> str:
    """A difference with its sign, or "n/a" where one side has no figure."""
    return "n/a" if x is None or math.isnan(x) else f"{x:+.3f}"


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(sum(finite) / len(finite)) if finite else float("nan")


def _test_class_counts(census: dict[str, Any]) -> list[int] | None:
    counts = census.get("test-class-counts")
    return [int(c) for c in counts] if counts is not None else None


CHARGED_PHASES = ("moments", "glm", "meta", "validation", "explain", "evaluate")
"""Exchanges besides the CNN rounds whose records carry each charged site's ledger total."""


def _privacy(state: RunState, settings: RunSettings) -> dict[str, Any]:
    out: dict[str, Any] = {}

    def entry(site: str) -> dict[str, Any]:
        return out.setdefault(site, {
            "epsilon": float("nan"), "run_epsilon": float("nan"),
            "delta": float(state.census.get(site, {}).get("ledger-delta", settings.delta)),
            "budget": float(state.census.get(site, {}).get("ledger-budget", float("nan")))})

    # Rounds are in order, so each site ends with its ledger's latest total.
    for record in state.rounds:
        if record.get("phase") == "cnn":
            for site, m in record["sites"].items():
                if "epsilon" in m:
                    entry(site).update(epsilon=float(m["epsilon"]),
                                       run_epsilon=float(m.get("run-epsilon", float("nan"))))
        elif record.get("phase") in CHARGED_PHASES:
            for site, eps in record.get("epsilon", {}).items():
                entry(site)["epsilon"] = float(eps)
    return out


def build_metrics(evaluation: dict[str, Any], state: RunState, settings: RunSettings,
                  timing: dict[str, float]) -> dict[str, Any]:
    """The whole ``metrics.json`` document."""
    pooled: dict[str, EvalStats] = evaluation["pooled"]
    models = {}
    for name in MODELS:
        if name not in pooled:
            continue
        m = metrics_from_stats(pooled[name])
        models[name] = {**{k: m[k] for k in METRIC_NAMES}, "auc_bound": m["auc_bound"], "n": m["n"],
                        "ci": bootstrap_ci_from_stats(pooled[name], n_boot=500, seed=settings.seed)}
    return {
        "run": {"run_id": state.run_id, "status": "completed", "exchanges": len(state.rounds), "timing": timing,
                "classes": state.schema.get("label", {}).get("classes", [])},
        "models": models,
        "paired_tests": _paired_note(evaluation, settings),
        "sites": {site: _site_metrics(v, state.census.get(site, {}), seed=settings.seed)
                  for site, v in evaluation["sites"].items()
                  if site != state.held_out},
        "site_alone": site_alone_comparison(evaluation, state),
        "held_out": _held_out(evaluation, state),
        "init_from": state.init_from,
        "init_origin": dict(state.init_origin),
        "privacy": _privacy(state, settings),
        "privacy_note": _privacy_note(settings),
        "secure_sum": _secure_sum(state, settings),
        "missing_sites": dict(state.excluded),
        "refusals": dict(state.refusals),
        "test_statistics": _test_statistics_note(settings, evaluation),
        "model_roles": _model_roles(state, settings),
        "thresholds": dict(state.thresholds),
        "meta": {"coef": list(state.meta_coef), "rounds": state.meta_round,
                 "converged": bool(state.meta_solver.get("converged", False)), "noised": settings.dp,
                 "weights": "public" if settings.public_meta_weights else "fitted",
                 "fallback": dict(state.meta_fallback), "stack_forest": settings.stack_forest},
        "glm": {"rounds": state.glm_round, "converged": bool(state.glm_solver.get("converged", False)),
                "noised": settings.dp,
                "columns": len(state.shared.get("glm_columns", [])), "kept": _glm_kept(state, settings),
                "C": settings.glm_c},
        "rounds": state.rounds,
        "census": state.census,
        "settings": asdict(settings),
    }


def _glm_kept(state: RunState, settings: RunSettings) -> int | None:
    """Columns the DP GLM kept of those it read (None without DP: it keeps them all)."""
    return min(settings.glm_dp_max_features, len(state.shared.get("glm_columns", []))) if settings.dp else None


def _model_roles(state: RunState, settings: RunSettings) -> dict[str, str]:
    roles = dict(MODEL_ROLES)
    updates = "DP-SGD updates" if settings.dp else "updates (no DP)"
    roles["cnn"] = roles["cnn"].replace("DP-SGD updates", updates)
    if not state.model_config.get("tracks"):
        roles["cnn"] = ("federated deep model: a dense network on the shared tabular features (the cohort has no "
                        f"sequence tracks), FedAvg of the sites' {updates}")
    chosen = state.meta_fallback.get("model")
    over = "the base models below" if settings.stack_forest else "the deep model and the federated GLM"
    public = "public weights under DP, meta-dp-rounds = 0: no meta statistics released"
    site_average = state.meta_fallback.get("reason") == "site-average"
    if settings.public_meta_weights and not chosen:
        roles["hybrid"] = f"{over} averaged with equal weights on their log-odds ({public})"
    elif settings.public_meta_weights and chosen in REDUCED_STACKS and not site_average:
        one = len(REDUCED_STACKS[chosen]) == 1
        roles["hybrid"] = (f"{over} but the {left_out_words(chosen)}, averaged with equal weights on their log-odds"
                           f" (the average without {'it' if one else 'them'} won on validation; {public})")
    elif not settings.stack_forest and not chosen:
        roles["hybrid"] = (f"federated stacking meta-classifier over {over} (stack-forest = false: the site's own "
                           "forest and GLM, fitted without DP, are not stacked)")
    elif site_average:
        roles["hybrid"] = (f"the site's own forest and GLM averaged with equal weights (stacking fallback: no stack "
                           f"beat the {state.meta_fallback['best_base']} on validation by the fallback margin, and it "
                           "did not lead this average by more than site-average-margin)")
    elif chosen in REDUCED_STACKS:
        one = len(REDUCED_STACKS[chosen]) == 1
        roles["hybrid"] = (f"federated stacking meta-classifier over {over} but the {left_out_words(chosen)} ("
                           + ("its weight" if one else "their weights") + " set to zero"
                           + (", the others averaged with equal weights" if chosen in AVERAGED_STACKS else "")
                           + ": the stack without " + ("it" if one else "them") + " won on validation"
                           + ("" if settings.stack_forest else "; stack-forest = false") + ")")
    elif chosen:
        roles["hybrid"] = f"the {chosen} below (stacking fallback: no stack beat it on validation)"
    return roles


def _paired_note(evaluation: dict[str, Any], settings: RunSettings) -> dict[str, Any]:
    """McNemar's test of the hybrid against each base model, on the sites' summed discordant counts."""
    tests = evaluation.get("paired", {})
    if not tests:
        return {}
    how = {"noised": "noised counts (the test is approximate: each count carries the test statistics' noise)",
           "exact": "exact counts"}.get(settings.test_statistics, "")
    return {"test": "McNemar (exact binomial on the discordant patients), at the operating thresholds (binary) or "
                    "argmax", "counts": how, "pairs": tests}


def _secure_sum(state: Any, settings: RunSettings) -> dict[str, Any]:
    """Which sites' sums were masked, and the threshold that unmasks one (empty without secure sum)."""
    from common.summands import SUMMED_RECORD

    if not state.secure:
        return {}
    return {"sites": sorted(state.secure["index"], key=natural_key),
            "threshold": int(state.secure["roster"]["threshold"]),
            "distributed_noise": bool(settings.dp and settings.distributed_noise),
            "summed": sorted(SUMMED_RECORD),
            "unmasked_sums": sum(r.get("phase") == "secure-unmask" for r in state.rounds)}


def _privacy_note(settings: RunSettings) -> str:
    return _dp_note(settings) + _secure_sum_note(settings)


def _secure_sum_note(settings: RunSettings) -> str:
    if not settings.secure_sum:
        return " No secure sum (secure-sum = false): the coordinator saw each site's release."
    distributed = settings.dp and settings.distributed_noise
    statistics = "GLM's statistics" if settings.public_meta_weights else "GLM's and meta-classifier's statistics"
    return (f" Secure sum: the coordinator saw the moments, the CNN updates, the {statistics}, the explanation "
            "summaries and the validation and test statistics only summed over at least the threshold of sites: "
            "this report has pooled figures only (no site's own AUC, no site-alone comparison, which needs each "
            "site's statistics); the counts per site and split come from the census and stay in the clear." + (
                " Distributed noise: each site whose policy allows it added 1/sqrt(threshold) of each summed "
                "release's noise and was charged for the whole; against sites colluding with the coordinator the "
                "sum carries less (docs/security.md)." if distributed else ""))


def _dp_note(settings: RunSettings) -> str:
    if not settings.dp:
        return ("No differential privacy in this run (dp = false): the non-private reference, run only where every "
                "site's policy allows it. Everything left the sites exact: the shared preprocessing's moments, model "
                "updates, the GLM's and the meta-classifier's Newton statistics, losses, and the validation and test "
                "statistics.")
    meta = (" (the meta-classifier's weights are public, meta-dp-rounds = 0: no meta statistics are released)"
            if settings.public_meta_weights else
            " and the meta-classifier statistics (meta-epsilon over the meta rounds) of its validation records")
    released = ("validation and test statistics" if settings.public_meta_weights
                else "meta-classifier statistics and test statistics")
    return ("Sample-level DP-SGD (Opacus, RDP accountant) protects each site's training records in the CNN updates "
            "(no losses are released); the Gaussian mechanism protects the shared preprocessing's moments "
            "(moments-epsilon) and the GLM statistics (glm-epsilon over the GLM rounds) of each site's training "
            "records" + meta + (
                ", and the validation and test statistics (test-epsilon each, noise calibrated to one patient)"
                if settings.test_statistics == "noised" else "") +
            "; every release is charged to the site's own ledger, composed with all earlier ones at the ledger's "
            "delta, and recorded in its egress log. Not covered by the guarantee: the census counts (patients per "
            "split and class), the number of examples sent with each update, "
            + ("the validation and test statistics (released exact, by the sites' policies), "
               if settings.test_statistics == "exact" else "") +
            ("the fit of each site's own forest and GLM and the forest's kNN imputation from the site's own data "
               f"(they stay on site but shape what the {released} release, and "
               "the hybrid stacks them: its predictions at a site tell training patients from others, "
               "stack-forest = false keeps the hybrid to the DP-trained models), " if settings.stack_forest else
               "the fit of each site's own forest and GLM and the forest's kNN imputation from the site's own data "
               "(the hybrid does not read them, stack-forest = false, but their own rows and test statistics do), ") +
            "early stopping, and the random number generator, which "
            "is not cryptographically secure here (it is seeded from each site's vault key and ledger, never from "
            "the run config). See docs/privacy.md.")


def _test_statistics_note(settings: RunSettings, evaluation: dict[str, Any]) -> dict[str, Any]:
    """How the test statistics left the sites, and the error their noise adds to pooled metrics."""
    from common.metrics import noise_bias, noise_error

    stds = [v["noise_std"] for v in evaluation["sites"].values()]
    out: dict[str, Any] = {"mode": settings.test_statistics, "noise_std_per_site": max(stds) if stds else 0.0,
                           "bins": _bins(evaluation)}
    if settings.test_statistics == "noised" and stds and max(stds) > 0:
        # Plain: each site's release is made whole counts on its own. Secure sum: the coordinator
        # makes the sum whole once, as if one site had released it with all the sites' noise.
        std, n_sites = (math.sqrt(sum(x * x for x in stds)), 1) if settings.secure_sum else (max(stds), len(stds))
        out["pooled_metric_error_sd"] = {
            name: noise_error(st, noise_std_per_site=std, n_sites=n_sites, draws=100, seed=settings.seed)
            for name, st in evaluation["pooled"].items()}
        out["pooled_metric_bias"] = {
            name: noise_bias(st, noise_std_per_site=std, n_sites=n_sites, draws=100, seed=settings.seed)
            for name, st in evaluation["pooled"].items()}
    return out


def _bins(evaluation: dict[str, Any]) -> int:
    for st in evaluation["pooled"].values():
        return int(st.hist_pos.shape[-1])
    return 0


def fmt(x: Any) -> str:
    """A figure to three decimals, or "n/a" where there is none."""
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def render_markdown(doc: dict[str, Any], *, explanation: dict[str, Any] | None = None,
                    explanation_error: str = "") -> str:
    """A readable summary of ``metrics.json``, with the run's global explanation when it has one.

    Parameters
    ----------
    doc : the run's ``metrics.json``.
    explanation : the run's ``explanation.json`` (:func:`server.explanation_doc.read_explanation`), or None.
    explanation_error : why ``explanation.json`` could not be read ("" when it could or there is none).
    """
    lines = ["| model | " + " | ".join(METRIC_NAMES) + " |", "|---|" + "---|" * len(METRIC_NAMES)]
    for name, m in doc["models"].items():
        lines.append(f"| {name} | " + " | ".join(f"{fmt(m[k])} [{fmt(m['ci'][k][0])}, {fmt(m['ci'][k][1])}]"
                                                 + (bins_mark(m) if k == "auc" else "") for k in METRIC_NAMES) + " |")
    th = doc.get("thresholds", {})
    if th:
        lines += ["", "Accuracy, precision, recall, specificity and F1 at each model's operating threshold ("
                  + next(iter(th.values()))["rule"] + "): "
                  + ", ".join(f"{m} p >= {t['probability']:.3f}" for m, t in th.items()) + "; AUC and AUPRC are "
                  "threshold-free."]
    elif doc["run"].get("classes") and len(doc["run"]["classes"]) > 2:
        lines += ["", "Decisions are the most probable class (argmax); AUC and AUPRC are macro one-vs-rest."]
    roles = doc.get("model_roles", {})
    if roles:
        lines += [""] + [f"- {name}: {roles[name]}" for name in doc["models"] if name in roles]
    lines += [f"Note: {note}" for note in convergence_notes(doc)]
    lines += [f"Note: {note}" for note in (fallback_note(doc), unresolved_note(doc)) if note]
    lines += paired_lines(doc)
    per_site = ("Per site (test class counts; no site's own AUC: the test statistics reached the coordinator only "
                "summed, secure-sum = true): " if doc.get("secure_sum") else
                "Per site (test AUC, from each site's released statistics; test class counts): ")
    lines += ["", per_site + "; ".join(_site_line(site, m, doc["run"]["classes"]) for site, m in doc["sites"].items())]
    if warm_start_note(doc):
        lines += ["", warm_start_note(doc)]
    lines += _site_alone_lines(doc)
    ho = doc.get("held_out") or {}
    if ho:
        lines += ["", f"Held-out site {ho['site']} ({_counts(ho.get('class_counts'), doc['run']['classes'])}; it did "
                  "not train, it only evaluated): test AUC of the federated models "
                  + ", ".join(f"{m} {fmt(v['auc'])}" for m, v in ho["federated"].items())
                  + ("; of its own models " + ", ".join(f"{m} {fmt(v['auc'])}" for m, v in ho["own"].items())
                     if ho["own"] else "") + "."]
    ts = doc.get("test_statistics", {})
    if ts.get("mode") == "noised":
        err = ts.get("pooled_metric_error_sd", {}).get("hybrid", {})
        lines.append(f"Test statistics: noised at each site (noise sd {ts['noise_std_per_site']:.2f} counts per bin, "
                     f"{ts['bins']} bins); this adds a standard deviation of about {fmt(err.get('auc'))} to the pooled "
                     f"hybrid AUC and {fmt(err.get('accuracy'))} to its accuracy, and shifts them by about "
                     f"{fmt(ts.get('pooled_metric_bias', {}).get('hybrid', {}).get('auc'))} and "
                     f"{fmt(ts.get('pooled_metric_bias', {}).get('hybrid', {}).get('accuracy'))} (simulated by "
                     "re-noising the released statistics, which already carry the noise: the true cost is larger; "
                     "docs/privacy.md gives measured ones).")
    elif ts.get("mode") == "exact":
        lines.append(f"Test statistics: released exact ({ts.get('bins')} bins), outside the DP guarantee.")
    elif ts.get("mode") == "none":
        lines.append("Test statistics: none released (the sites' policies or the run asked for none).")
    if doc["privacy"]:
        lines.append("Privacy (epsilon spent per site ledger / this run's DP-SGD): " + "; ".join(
            f"{s}: {fmt(p['epsilon'])} / {fmt(p['run_epsilon'])} at delta {p['delta']:.1e}"
            for s, p in doc["privacy"].items()))
    lines.append(doc["privacy_note"])
    for site, why in doc.get("refusals", {}).items():
        lines.append(f"Refused by {site}: {why}")
    if doc["missing_sites"]:
        lines.append("Sites that left the run: " + "; ".join(f"{s} ({r})" for s, r in doc["missing_sites"].items()))
    lines += explanation_markdown(explanation, explanation_error)
    return "\n".join(lines) + "\n"


def paired_rows(doc: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(comparison, patients only the hybrid classified right, only the other model, p) per pair."""
    pairs = (doc.get("paired_tests") or {}).get("pairs", {})
    return [(pair.replace("-vs-", " vs "), str(t["first_only"]), str(t["second_only"]), f"{t['p']:.3g}")
            for pair, t in pairs.items()]


def paired_lines(doc: dict[str, Any]) -> list[str]:
    """The paired comparison of the models, as markdown."""
    rows = paired_rows(doc)
    if not rows:
        return []
    pt = doc["paired_tests"]
    return ["", f"Paired comparison on the pooled test patients: {pt['test']}, from the sites' summed "
                f"{pt['counts']}.", "", "| comparison | only the hybrid right | only the other right | p |",
            "|---|---|---|---|", *(f"| {a} | {b} | {c} | {p} |" for a, b, c, p in rows)]


def warm_start_note(doc: dict[str, Any]) -> str:
    """Where the deep model started, when not from random weights, and what that means for the guarantee."""
    if not doc.get("init_from"):
        return ""
    note = f"Warm start: the federated deep model started from {doc['init_from']} (not from random weights)"
    origin = doc.get("init_origin") or {}
    if origin:
        note += (f", {origin.get('kind', 'pretrained')} ({origin.get('source')}, {origin.get('n_train')} training "
                 f"records, validation AUC {fmt(origin.get('validation_auc'))})")
    return note + (". The starting weights are an input the sites' DP-SGD did not pay for: the sites' guarantee "
                   "covers their own records, and nothing at all covers the data those weights were trained on.")


def fallback_note(doc: dict[str, Any]) -> str:
    """The stacking fallback of a run's ``metrics.json`` in words ("" when the stack kept its fit)."""
    return fallback_words((doc.get("meta") or {}).get("fallback") or {})


#: A model whose AUC the released bins leave this uncertain is named in the report: its figure is
#: then the bins' tie count, not its ranking (one class's scores all in one or two bins).
UNRESOLVED_AUC_BOUND = 0.05


def _unresolved(m: dict[str, Any]) -> bool:
    return float(m.get("auc_bound", 0.0)) >= UNRESOLVED_AUC_BOUND


def bins_mark(m: dict[str, Any]) -> str:
    """The mark ``" (bins ±B)"`` after an AUC the released bins leave that uncertain ("" otherwise)."""
    return f" (bins \u00b1{m['auc_bound']:.3f})" if _unresolved(m) else ""


def unresolved_note(doc: dict[str, Any]) -> str:
    """The models whose test AUC the binned statistics cannot resolve, in words ("" when none).

    A model whose predicted probabilities barely vary (an under-confident deep model: every
    patient near the class shares) puts most test patients into one bin of the public grid; its
    AUC is then only known to within ``auc_bound``, and the point figure (ties counted half) is
    near 0.5 whatever the model's ranking.
    """
    loose = {name: m for name, m in doc.get("models", {}).items() if _unresolved(m)}
    if not loose:
        return ""
    parts = [f"{name} {fmt(m['auc'])}, anywhere in [{fmt(max(m['auc'] - m['auc_bound'], 0.0))}, "
             f"{fmt(min(m['auc'] + m['auc_bound'], 1.0))}]" for name, m in loose.items()]
    return ("the test statistics' bins do not resolve the AUC of " + "; ".join(parts) + ": most of its test "
            "patients share a bin (its predicted probabilities barely vary), so the figure counts ties as half and "
            "its interval leaves out the binning; the model may rank patients better than it shows.")


def convergence_notes(doc: dict[str, Any]) -> list[str]:
    """A sentence for each Newton fit (GLM, meta-classifier) that ended unconverged: why, and what its
    coefficients are. Under DP the rounds are fixed in advance (each is a release the sites' budgets
    planned for) and no objective is released, so convergence is not judged there."""
    notes = []
    for fit, name in (("glm", "GLM"), ("meta", "meta-classifier")):
        info = doc.get(fit, {})
        if not info or info.get("converged", True):
            continue
        if info.get("weights") == "public":
            notes.append("under DP the meta-classifier's weights are public (meta-dp-rounds = 0): the base models' "
                         "log-odds averaged with equal weights, and the reduced stacks the same average without "
                         "some models; no meta statistics were released, so nothing was fitted to converge.")
        elif info.get("noised"):
            notes.append(f"under DP the {name} takes {info.get('rounds')} Newton round(s) on noised statistics, as "
                         "many as the sites' budgets planned; no objective is released, so convergence is not "
                         "judged (converged: false) and its coefficients are the last step's.")
        else:
            notes.append(f"the {name} did not converge in {info.get('rounds')} Newton rounds (converged: false); "
                         "its coefficients are the last iterate.")
    return notes


def best_alone_rule(sa: dict[str, Any]) -> str:
    """How each site's best model alone was chosen, in words."""
    on = {v.get("best_alone_chosen_on", "test") for v in sa["sites"].values()}
    if on == {"validation"}:
        return "Best alone: the site's own model with the highest AUC on its validation split."
    return ("Best alone: the site's own model with the highest AUC on its test split (no validation statistics "
            "were released), an optimistic choice.")


def alone_missing_note(sa: dict[str, Any]) -> str:
    """The sites left out of the site-alone comparison because they have no models alone, and why."""
    return " ".join(f"Site {site} has no models alone ({why}) and is left out of this comparison."
                    for site, why in sa.get("without_models_alone", {}).items())


def _site_line(site: str, m: dict[str, Any], classes: list[str]) -> str:
    """One site's test class counts and, where it released its own statistics, each model's AUC."""
    aucs = ", ".join(f"{mod} {fmt(v.get('auc'))}{bins_mark(v)}" for mod, v in m.items() if isinstance(v, dict))
    noise = f"; its test noise adds sd {fmt(m['auc_noise_sd'])} to an AUC" if "auc_noise_sd" in m else ""
    return f"{site} ({_counts(m.get('class_counts'), classes)}{noise})" + (f": {aucs}" if aucs else "")


def _site_alone_lines(doc: dict[str, Any]) -> list[str]:
    """The site-alone vs federated table of ``metrics.md``."""
    sa = doc.get("site_alone") or {}
    if not sa:
        return []
    missing = alone_missing_note(sa)
    if not sa["sites"]:
        return ["", "What federation bought: no site trained its models alone. " + missing]
    lines = ["", "What federation bought (test AUC at each site; the site's own models trained on its data alone, "
             "its forest included; the federated models' rows above). " + f"{best_alone_rule(sa)} {missing}".rstrip(), "",
             "| site | test class counts | own deep model | own forest | own GLM | best alone | federated hybrid | "
             "hybrid - best alone |", "|---|---|---|---|---|---|---|---|"]
    for site, v in sa["sites"].items():
        lines.append(f"| {site} | {_counts(v.get('class_counts'), doc['run']['classes'])} | "
                     + " | ".join(fmt(v.get(r, {}).get("auc")) for r in ("cnn", "forest", "logreg"))
                     + f" | {best_alone_words(v)} | {fmt(v['federated_auc'].get('hybrid'))} | "
                     f"{signed(v['federated_hybrid_minus_best_alone'])} |")
    m = sa["mean_auc"]
    lines.append(f"| {mean_label(sa)} | | {fmt(m.get('alone_cnn'))} | {fmt(m.get('alone_forest'))} | "
                 f"{fmt(m.get('alone_logreg'))} | {fmt(m['best_alone'])} | {fmt(m['federated_hybrid'])} | "
                 f"{signed(m['federated_hybrid'] - m['best_alone'])} |")
    noise = site_noise_note(doc)
    return lines + ([noise] if noise else [])


def site_noise_note(doc: dict[str, Any]) -> str:
    """How much the sites' own test-statistics noise moves a per-site AUC ("" without noise)."""
    sds = {site: m["auc_noise_sd"] for site, m in doc.get("sites", {}).items() if "auc_noise_sd" in m}
    if not sds:
        return ""
    return ("Every per-site figure carries its site's test-statistics noise, which adds a standard deviation of "
            f"{fmt(min(sds.values()))} to {fmt(max(sds.values()))} to an AUC there ("
            + ", ".join(f"{site} {fmt(sd)}" for site, sd in sds.items())
            + "; simulated by re-noising each site's released statistics): differences between models at one site "
            "smaller than that are noise, and a mean over sites averages it down only with the number of sites.")


def _counts(counts: list[int] | None, classes: list[str]) -> str:
    if not counts:
        return "counts n/a"
    return ", ".join(f"{c} {n}" for c, n in zip(classes, counts, strict=False))


def write_report(run_dir: Path, doc: dict[str, Any]) -> None:
    """Write ``metrics.json`` and ``metrics.md`` atomically (``metrics.md`` with ``explanation.json``, if any)."""
    explanation, error = read_explanation(run_dir)
    write_text_atomic(run_dir / "metrics.json", json.dumps(doc, indent=2, default=json_default))
    write_text_atomic(run_dir / "metrics.md", render_markdown(doc, explanation=explanation, explanation_error=error))


def write_failed_report(run_dir: Path, state: RunState, settings: RunSettings, *, reason: str) -> None:
    """``metrics.json`` of a run that failed: why, which sites refused or left, no models."""
    doc = {"run": {"run_id": state.run_id, "status": "failed", "reason": reason, "exchanges": len(state.rounds),
                   "classes": state.schema.get("label", {}).get("classes", [])},
           "models": {}, "sites": {}, "refusals": dict(state.refusals), "missing_sites": dict(state.excluded),
           "rounds": state.rounds, "census": state.census, "settings": asdict(settings)}
    write_text_atomic(run_dir / "metrics.json", json.dumps(doc, indent=2, default=json_default))
