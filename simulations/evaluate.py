"""``genofed evaluate``: every model trained on pooled data, the reference the federation is judged by.

It runs the site-local steps of :mod:`client.pipeline` on one cohort (a spec's files, one vault,
or the union of several sites' vaults with the splits stored in them) and writes
``RUNDIR/metrics.json`` and ``RUNDIR/metrics.md``:

- ``models``: ``hybrid``, ``cnn``, ``forest``, ``logreg`` (the GLM), each with ``auc``, ``accuracy``,
  ``precision``, ``recall``, ``specificity``, ``f1``, ``auprc`` (test split) and ``ci`` (bootstrap
  95% intervals of each);
- ``privacy``: ``epsilon``, ``delta``, ``accountant`` (or ``dp: false``);
- ``paired_tests``: the hybrid against each base model on the same test patients, ``hybrid_vs_cnn``
  etc., each with ``delong`` (DeLong's test of the two AUCs) and ``mcnemar`` (McNemar's exact test
  of their decisions: at the operating thresholds for a binary problem, else argmax);
- ``folds`` (with ``--folds K``): per-fold AUCs and paired tests of the hybrid against each model.

It also writes ``RUNDIR/pooled_stats.npz`` (the test split's statistics of every model, for the
curves) and ``RUNDIR/report.html`` (:mod:`simulations.evaluate_report`).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from client.dp_training import DPConfig, TrainConfig
from client.pipeline import (
    SiteData,
    deep_config,
    deep_proba,
    fit_forest,
    fit_glm,
    fit_shared_scaler,
    fit_tabular_preprocessor,
    forest_matrix,
    glm_matrix,
    meta_features,
    over_all_classes,
    site_glm_proba,
    train_deep,
)
from common.cohort import Cohort
from common.files import json_default, write_text_atomic
from common.meta import StackingMetaClassifier
from common.metrics import (
    METRIC_NAMES,
    Threshold,
    bin_index,
    bootstrap_ci,
    choose_threshold,
    compute_metrics,
    compute_stats,
    paired_tests,
)
from common.paired import delong_test_proba, discordant_counts, mcnemar
from common.progress import progress_bar

MODELS = ("hybrid", "cnn", "forest", "logreg")
BASE_MODELS = ("cnn", "forest", "logreg")
SITE_MODELS = ("forest", "site-logreg")
"""The models each site fits alone in the reference with site models (a federation's stack has both)."""


@dataclass(frozen=True)
class EvaluateSettings:
    """What ``genofed evaluate`` trains and how."""

    epsilon: float | None = 8.0
    delta: float | None = None
    max_grad_norm: float = 1.0
    epochs: int | None = None
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-2
    patience: int = 10
    grad_sample_mode: str = "ew"
    folds: int = 0
    seed: int = 0
    n_boot: int = 1000
    forest_trees: int = 200
    forest_cnn_features: bool = False
    omics_pca: int | None = None
    arch: str = "cnn"
    meta_C: float = 1.0
    meta_positive: bool = True
    glm_C: float = 0.1
    glm_max_features: int = 256
    calibrate_site_models: bool = True

    @property
    def planned_epochs(self) -> int:
        """Epochs at most: 60 without DP; 20 with DP, where the noise is calibrated to every
        planned epoch, so planning fewer buys less noise per step."""
        if self.epochs is not None:
            return self.epochs
        return 60 if self.epsilon is None else 20

    def delta_for(self, n_train: int) -> float:
        """The DP delta: as given, or below 1/n (the usual requirement) by a factor of 10 at least."""
        return self.delta if self.delta is not None else min(1e-5, 0.1 / max(n_train, 1))


def evaluate_split(data: SiteData, settings: EvaluateSettings, *, label: str = "",
                   site_index: np.ndarray | None = None) -> dict[str, Any]:
    """Train every model on the stored train/validation split; test probabilities and privacy facts.

    With ``site_index`` (each patient's site, for pooled sites), also the reference that the
    federation can reach when a site's own models never leave it: the deep model and GLM pooled,
    each site's forest and GLM trained on its own train split, the meta-classifier over the four.
    """
    n_train = int(data.masks["train"].sum())
    delta = settings.delta_for(n_train)
    dp = None
    if settings.epsilon is not None:
        dp = DPConfig(target_epsilon=settings.epsilon, target_delta=delta, max_grad_norm=settings.max_grad_norm,
                      total_epochs=settings.planned_epochs, grad_sample_mode=settings.grad_sample_mode)
    pre = fit_tabular_preprocessor(data, omics_pca=settings.omics_pca)
    # The federated models' one scaler, here from the pooled data's exact moments.
    scaler = fit_shared_scaler(data, max_glm_columns=settings.glm_max_features)
    cfg = deep_config(data, arch=settings.arch)
    train = TrainConfig(epochs=settings.planned_epochs, batch_size=settings.batch_size, lr=settings.lr,
                        weight_decay=settings.weight_decay, patience=settings.patience, seed=settings.seed)
    timing: dict[str, float] = {}
    t0 = time.perf_counter()
    with progress_bar() as bar:
        task = bar.add_task(f"deep model{label}", total=settings.planned_epochs)
        model, result = train_deep(data, cfg=cfg, train=train, dp=dp, seed=settings.seed, scaler=scaler,
                                   on_epoch=lambda rec: bar.advance(task))
        bar.update(task, completed=settings.planned_epochs)
    timing["deep_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    emb = model if settings.forest_cnn_features else None
    forest = fit_forest(data, pre, embedding=emb, scaler=scaler, n_estimators=settings.forest_trees,
                        random_state=settings.seed)
    timing["forest_s"] = time.perf_counter() - t0
    glm = fit_glm(data, scaler, C=settings.glm_C)
    proba = {s: {"cnn": deep_proba(model, data, s, scaler),
                 "forest": forest.predict_proba(forest_matrix(data, s, pre, emb, scaler)),
                 "logreg": glm.predict_proba(glm_matrix(data, s, scaler))} for s in ("validation", "test")}
    val_y = data.y[data.masks["validation"]]
    test, thresholds, meta = _stack(proba, val_y, data.n_classes, settings)
    site_forests = None
    if site_index is not None:
        own, read = _site_models_proba(data, site_index, settings)
        base = (*BASE_MODELS, "site-logreg")
        # The stack reads each site's models through that site's Platt maps, as a federation's does;
        # the site models' own rows are as they are (a federation's rows are too).
        hybrid_test, hybrid_thresholds, _ = _stack({s: {**proba[s], **read[s]} for s in ("validation", "test")},
                                                   val_y, data.n_classes, settings, base=base)
        sf_test, sf_thresholds, _ = _stack({s: {**proba[s], **own[s]} for s in ("validation", "test")},
                                           val_y, data.n_classes, settings, base=base)
        sf_test["hybrid"] = hybrid_test["hybrid"]
        if "hybrid" in hybrid_thresholds:
            sf_thresholds["hybrid"] = hybrid_thresholds["hybrid"]
        rows = ("hybrid", *SITE_MODELS)
        site_forests = {"test_proba": {m: sf_test[m] for m in rows},
                        "thresholds": {m: sf_thresholds[m] for m in rows if m in sf_thresholds}}
    privacy = {"dp": dp is not None}
    if dp is not None:
        privacy.update(epsilon=result.epsilon, delta=delta, accountant=dp.accountant,
                       noise_multiplier=result.noise_multiplier, max_grad_norm=dp.max_grad_norm,
                       target_epsilon=dp.target_epsilon, steps=result.steps)
    return {"test_proba": test, "y_test": data.y[data.masks["test"]], "privacy": privacy, "timing": timing,
            "thresholds": thresholds, "site_forests": site_forests,
            "deep": {"epochs_run": result.epochs_run, "best_epoch": result.best_epoch, "config": cfg.to_dict()},
            "forest": {"best_params": forest.best_params_, "selection": forest.selection,
                       "selection_auc": forest.selection_score_},
            "meta": {"coef": meta.coef_.tolist(), "intercept": meta.intercept_.tolist()}}


def _stack(proba: dict[str, dict[str, np.ndarray]], val_y: np.ndarray, n_classes: int, settings: EvaluateSettings,
           *, base: tuple[str, ...] = BASE_MODELS
           ) -> tuple[dict[str, np.ndarray], dict[str, Threshold], StackingMetaClassifier]:
    """The meta-classifier over ``base`` fitted on the validation split; test probabilities of every
    model and (binary problems) each model's threshold chosen on the validation split."""
    meta = StackingMetaClassifier(penalty="l2", C=settings.meta_C, positive=settings.meta_positive).fit(
        meta_features(*(proba["validation"][m] for m in base)), val_y)
    test = dict(proba["test"])
    test["hybrid"] = meta.predict_proba(meta_features(*(test[m] for m in base)))
    validation = dict(proba["validation"])
    validation["hybrid"] = meta.predict_proba(meta_features(*(validation[m] for m in base)))
    thresholds = {}
    if n_classes == 2:  # decisions at thresholds chosen on validation; multi-class keeps argmax
        thresholds = {name: choose_threshold(compute_stats(val_y, validation[name], n_classes=2))
                      for name in ("hybrid", *base)}
    return test, thresholds, meta


def _site_models_proba(data: SiteData, site_index: np.ndarray, settings: EvaluateSettings
                       ) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, dict[str, np.ndarray]]]:
    """Each site's own forest and GLM (fitted once on its own train split, the GLM with the site's
    own scaler, as a federated site fits them) on its patients of the validation and test splits,
    in pooled order: ``{split: {model: probabilities}}``, as they are and as the stack reads them
    (through the site's Platt maps, :mod:`client.calibration`, with ``calibrate_site_models``)."""
    from client.calibration import stacking_probabilities
    from client.pipeline import fit_local_models

    splits = ("validation", "test")
    shape = {s: (int(data.masks[s].sum()), data.n_classes) for s in splits}
    out = {s: {m: np.zeros(shape[s]) for m in SITE_MODELS} for s in splits}
    read = {s: {m: np.zeros(shape[s]) for m in SITE_MODELS} for s in splits}
    for i in np.unique(site_index):
        mine = site_index == i
        site = replace(data, masks={k: m & mine for k, m in data.masks.items()})
        local = fit_local_models(site, forest_trees=settings.forest_trees, glm_c=settings.glm_C,
                                 glm_max_features=settings.glm_max_features,
                                 calibrate=settings.calibrate_site_models, seed=settings.seed)
        forest, pre, maps = local["forest"], local["preprocessor"], local["calibration"]
        for s in splits:
            here = np.isin(np.flatnonzero(data.masks[s]), np.flatnonzero(site.masks[s]))
            mine_proba = {"forest": over_all_classes(forest.predict_proba(forest_matrix(site, s, pre)),
                                                     forest.classes_, data.n_classes),
                          "site-logreg": site_glm_proba(local["site_glm"], local["site_scaler"], site, s,
                                                        classes=local["site_glm_classes"])}
            for m, p in mine_proba.items():
                out[s][m][here] = p
            for m, p in stacking_probabilities(mine_proba, maps).items():
                read[s][m][here] = p
    return out, read


def _fold_masks(data: SiteData, folds: int, seed: int, groups: np.ndarray | None) -> list[dict[str, np.ndarray]]:
    """k folds: each fold is the test split once; the rest is cut 85/15 into train/validation."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    n = len(data.y)
    idx = np.arange(n)
    if groups is not None:
        outer = StratifiedGroupKFold(folds, shuffle=True, random_state=seed).split(idx, data.y, groups)
    else:
        outer = StratifiedKFold(folds, shuffle=True, random_state=seed).split(idx, data.y)
    out = []
    for f, (rest, test) in enumerate(outer):
        inner_k = max(2, round(1 / 0.15))
        if groups is not None:
            inner = StratifiedGroupKFold(inner_k, shuffle=True, random_state=seed + f).split(rest, data.y[rest], groups[rest])
        else:
            inner = StratifiedKFold(inner_k, shuffle=True, random_state=seed + f).split(rest, data.y[rest])
        tr, va = next(inner)
        masks = {s: np.zeros(n, dtype=bool) for s in ("train", "validation", "test")}
        masks["train"][rest[tr]], masks["validation"][rest[va]], masks["test"][test] = True, True, True
        out.append(masks)
    return out


def _model_metrics(y: np.ndarray, proba: np.ndarray, k: int, n_boot: int, seed: int,
                   threshold: Threshold | None) -> dict[str, Any]:
    m = compute_metrics(y, proba, n_classes=k, threshold=threshold)
    out: dict[str, Any] = {name: m[name] for name in METRIC_NAMES}
    out["auc_bound"] = m["auc_bound"]
    out["n"] = m["n"]
    out["ci"] = bootstrap_ci(y, proba, n_boot=n_boot, seed=seed, n_classes=k, threshold=threshold)
    return out


def run_evaluate(cohort: Cohort, settings: EvaluateSettings, out: Path, *, source: str) -> dict[str, Any]:
    """Train and evaluate every model on ``cohort``; write ``out/metrics.json`` and ``out/metrics.md``."""
    t_start = time.perf_counter()
    data = SiteData.from_cohort(cohort)
    k = data.n_classes
    sizes = cohort.report.get("site_sizes") if isinstance(cohort.report, dict) else None
    site_index = np.repeat(np.arange(len(sizes)), sizes) if sizes and len(sizes) > 1 else None
    main = evaluate_split(data, settings, site_index=site_index)
    report: dict[str, Any] = {
        "source": source, "classes": list(data.classes),
        "cohort": {"patients": int(len(data.y)), "splits": {s: int(m.sum()) for s, m in data.masks.items()},
                   "schema_hash": cohort.schema_hash},
        "models": {name: _model_metrics(main["y_test"], main["test_proba"][name], k, settings.n_boot, settings.seed,
                                        main["thresholds"].get(name))
                   for name in MODELS},
        "thresholds": {name: th.to_dict() for name, th in main["thresholds"].items()},
        "reference_site_forests": _site_forest_reference(main, k, settings),
        "privacy": main["privacy"], "details": {key: main[key] for key in ("deep", "forest", "meta", "timing")},
        "settings": asdict(settings),
    }
    report["paired_tests"] = split_paired_tests(main["y_test"], main["test_proba"], thresholds=main["thresholds"])
    if settings.folds >= 2:
        report["folds"] = _cross_validate(data, cohort.groups, settings)
    report["timing"] = {"total_s": round(time.perf_counter() - t_start, 2)}
    _write(out, report)
    _write_report_html(out, main, k)
    return report


def decisions(proba: np.ndarray, *, threshold: Threshold | None) -> np.ndarray:
    """Each patient's decided class: at or above ``threshold``'s bin edge on the public grid (binary,
    exactly as :func:`common.metrics.at_threshold` counts it), else the most probable class.

    Parameters
    ----------
    proba : (n, K) class probabilities.
    threshold : the operating threshold of a binary problem, or None for argmax.
    """
    p = np.asarray(proba, dtype=np.float64)
    if threshold is None or p.shape[1] != 2:
        return np.argmax(p, axis=1)
    return (bin_index(p[:, 1], n_bins=threshold.n_bins) >= threshold.bin).astype(np.int64)


def split_paired_tests(y: np.ndarray, proba: dict[str, np.ndarray], *,
                       thresholds: dict[str, Threshold]) -> dict[str, dict[str, Any]]:
    """The hybrid against each base model on the same test patients: DeLong's test of the AUCs and
    McNemar's exact test of the decisions (``_a`` is the hybrid, ``_b`` the other model).

    Parameters
    ----------
    y : (n,) class indices of the test patients.
    proba : each model's (n, K) test probabilities, ``hybrid`` and every base model.
    thresholds : each model's operating threshold (binary problems); empty: argmax decisions.

    Returns
    -------
    dict
        ``{"hybrid_vs_cnn": {"delong": ..., "mcnemar": ...}, ...}``; ``delong`` is ``{"error": why}``
        when the test split cannot carry the test (fewer than 2 patients of a class).
    """
    y = np.asarray(y)
    rule = "operating thresholds" if thresholds else "argmax"
    hybrid = decisions(proba["hybrid"], threshold=thresholds.get("hybrid"))
    out = {}
    for other in BASE_MODELS:
        try:
            delong: dict[str, Any] = delong_test_proba(y, proba["hybrid"], proba[other])
        except ValueError as exc:
            delong = {"error": str(exc)}
        theirs = decisions(proba[other], threshold=thresholds.get(other))
        counts = mcnemar(discordant_counts(y, hybrid, theirs))
        out[f"hybrid_vs_{other}"] = {"delong": delong, "mcnemar": {
            **counts, "accuracy_a": float(np.mean(hybrid == y)), "accuracy_b": float(np.mean(theirs == y)),
            "decisions": rule}}
    return out


def _write_report_html(out: Path, main: dict[str, Any], k: int) -> None:
    """``pooled_stats.npz`` (every model's test statistics) and ``report.html`` made from the folder's files."""
    from server.report_html import save_pooled_stats
    from simulations.evaluate_report import render_evaluate_report

    save_pooled_stats(out, {name: compute_stats(main["y_test"], p, n_classes=k)
                            for name, p in main["test_proba"].items()})
    render_evaluate_report(out)


def _site_forest_reference(main: dict[str, Any], k: int, settings: EvaluateSettings) -> dict[str, Any] | None:
    """Pooled deep model and GLM with each site's own forest and GLM: what federation can reach
    (a site's own models stay home)."""
    sf = main.get("site_forests")
    if sf is None:
        return None
    return {name: _model_metrics(main["y_test"], p, k, settings.n_boot, settings.seed, sf["thresholds"].get(name))
            for name, p in sf["test_proba"].items()}


def _cross_validate(data: SiteData, groups: np.ndarray | None, settings: EvaluateSettings) -> dict[str, Any]:
    per_fold: dict[str, list[float]] = {m: [] for m in MODELS}
    eps = []
    for f, masks in enumerate(_fold_masks(data, settings.folds, settings.seed, groups)):
        fold = replace(data, masks=masks)
        res = evaluate_split(fold, replace(settings, seed=settings.seed + f), label=f" (fold {f + 1})")
        for name in MODELS:
            per_fold[name].append(compute_metrics(res["y_test"], res["test_proba"][name],
                                                  n_classes=data.n_classes)["auc"])
        if res["privacy"].get("epsilon") is not None:
            eps.append(res["privacy"]["epsilon"])
    tests = {f"hybrid_vs_{m}": paired_tests(per_fold["hybrid"], per_fold[m]) for m in MODELS if m != "hybrid"}
    return {"k": settings.folds, "metric": "auc", "per_fold": per_fold,
            "mean": {m: float(np.mean(v)) for m, v in per_fold.items()}, "paired_tests": tests,
            "epsilon_per_fold": eps}


def _fmt(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def render_table(report: dict[str, Any]) -> str:
    """The metrics as a Markdown table, with intervals, privacy and fold tests."""
    lines = ["| model | " + " | ".join(METRIC_NAMES) + " |", "|---|" + "---|" * len(METRIC_NAMES)]
    for name, m in report["models"].items():
        cells = [f"{_fmt(m[k])} [{_fmt(m['ci'][k][0])}, {_fmt(m['ci'][k][1])}]" for k in METRIC_NAMES]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    ref = report.get("reference_site_forests")
    if ref:
        lines += ["", "Reference with each site's own forest and GLM (the deep model and GLM pooled; a site's own "
                  "models never leave it, and the stack reads them through the site's Platt maps, as in the "
                  "federation):"]
        for name, m in ref.items():
            lines.append(f"- {name}: " + ", ".join(f"{k} {_fmt(m[k])}" for k in METRIC_NAMES))
    th = report.get("thresholds", {})
    lines.append("")
    if th:
        lines.append("Accuracy, precision, recall, specificity and F1 at each model's threshold (Youden's J on the "
                     "validation split): " + ", ".join(f"{m} p >= {t['probability']:.3f}" for m, t in th.items()))
    p = report["privacy"]
    if p["dp"]:
        lines.append(f"Deep model trained with DP-SGD: epsilon {p['epsilon']:.3f}, delta {p['delta']:.2e} "
                     f"({p['accountant']} accountant, noise multiplier {p['noise_multiplier']:.3f}, clip {p['max_grad_norm']}); "
                     "unit: one training record. The forest, GLM and meta-classifier are not DP.")
    else:
        lines.append("No differential privacy (--no-dp): the non-private reference.")
    lines += _paired_lines(report.get("paired_tests") or {})
    if "folds" in report:
        f = report["folds"]
        lines += ["", f"{f['k']}-fold cross-validation, test AUC per fold:"]
        for m, v in f["per_fold"].items():
            lines.append(f"- {m}: mean {_fmt(f['mean'][m])} ({', '.join(_fmt(x) for x in v)})")
        for name, t in f["paired_tests"].items():
            lines.append(f"- {name}: mean difference {t['mean_difference']:+.4f}, Wilcoxon p = {_fmt(t['wilcoxon_p'])}, "
                         f"paired t p = {_fmt(t['ttest_p'])}")
    return "\n".join(lines) + "\n"


def _paired_lines(tests: dict[str, dict[str, Any]]) -> list[str]:
    """The test split's paired tests as Markdown lines (none without them)."""
    if not tests:
        return []
    lines = ["", "Paired tests on the test split (the same patients; DeLong: AUC, McNemar: decisions):"]
    for name, t in tests.items():
        d, m = t["delong"], t["mcnemar"]
        auc = (f"DeLong AUC {_fmt(d['auc_a'])} vs {_fmt(d['auc_b'])}, difference {d['difference']:+.3f} "
               f"(se {_fmt(d['se'])}), p = {_fmt_p(d['p'])}") if "error" not in d else f"DeLong: {d['error']}"
        lines.append(f"- {name}: {auc}; McNemar ({m['decisions']}) {m['first_only']} vs {m['second_only']} "
                     f"discordant, p = {_fmt_p(m['p'])}")
    return lines


def _fmt_p(p: float) -> str:
    """A p-value: three decimals, or two significant digits below 0.001."""
    return _fmt(p) if p is None or math.isnan(p) or p >= 0.001 else f"{p:.2g}"


def _write(out: Path, report: dict[str, Any]) -> None:
    write_text_atomic(out / "metrics.json", json.dumps(report, indent=2, default=json_default))
    write_text_atomic(out / "metrics.md", render_table(report))
