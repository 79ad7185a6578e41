"""Benchmark: what a site's own GLM adds to the stack beside its own forest.

Under DP at sites of a few hundred records the federated deep model and the DP GLM are near
chance, so the hybrid fell back to the site forests (docs/learning.md, "Known limits"); a site's
own GLM (the base model ``site-logreg``), fitted on its train split alone like its forest, needs no
DP of its own either (only the statistics released about it do). This replays, offline and without noise, the two site-local
models of every site of a layout and four ways of using them: each alone, their mean log-odds,
and a stack of the two fitted on the pooled validation split (a logistic regression on their
log-odds, what a federated meta-classifier over them would reach without noise), and their mean
after each is calibrated by its out-of-fold Platt map (``calibrated-mean``: :mod:`client.calibration`, what
the DP meta-classifier's averaging prior now starts from). Scored by pooled
test AUC and by the mean over sites of each site's own test AUC (sites whose test split lacks a
class are left out of that mean), beside each site's better model alone (chosen on its own
validation split).

The forest and the GLM are fitted as a run fits them (``forest-trees``, ``glm-c``, the site's
own scaler at ``glm-max-features``). Nothing is charged to the ledgers.

Usage::

    python -m simulations.benchmarks.site_glm_stack SITES_DIR [--json OUT]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from simulations.benchmarks import emit, layout_cohorts, run_main

SCORES = ("forest", "glm", "mean", "calibrated-mean", "stack")


def _site_log_odds(site: Any, *, trees: int, glm_c: float, width: int, seed: int) -> dict[str, np.ndarray]:
    """The site's forest and GLM (fitted on its train split) as stacking inputs on validation and test,
    raw and (``"<split>-calibrated"``) after their Platt maps, as a run's stack reads them (:mod:`client.calibration`)."""
    from client.calibration import apply_platt
    from client.pipeline import fit_local_models, forest_matrix, meta_features, over_all_classes, site_glm_proba

    k = site.n_classes
    local = fit_local_models(site, forest_trees=trees, glm_c=glm_c, glm_max_features=width, calibrate=True, seed=seed)
    forest, pre, maps = local["forest"], local["preprocessor"], local["calibration"]
    out = {}
    for split in ("validation", "test"):
        pf = over_all_classes(forest.predict_proba(forest_matrix(site, split, pre)), forest.classes_, k)
        pg = site_glm_proba(local["site_glm"], local["site_scaler"], site, split, classes=local["site_glm_classes"])
        out[split] = meta_features(pf, pg)
        out[f"{split}-calibrated"] = meta_features(apply_platt(pf, maps.get("forest")),
                                                   apply_platt(pg, maps.get("site-logreg")))
    return out


def _auc(y: np.ndarray, score: np.ndarray, n_classes: int) -> float:
    from scipy.special import softmax
    from sklearn.metrics import roc_auc_score

    if n_classes == 2:
        return float(roc_auc_score(y, score))
    return float(roc_auc_score(y, softmax(score, axis=1), multi_class="ovr", labels=np.arange(n_classes)))


def _scores(x: np.ndarray, calibrated: np.ndarray, stack: Any, k: int) -> dict[str, np.ndarray]:
    """Each way of using the two models, as one score (binary) or per-class log-scores."""
    w = 1 if k == 2 else k
    forest, glm = x[:, :w], x[:, w:]
    scores = {"forest": forest, "glm": glm, "mean": (forest + glm) / 2,
              "calibrated-mean": (calibrated[:, :w] + calibrated[:, w:]) / 2,
              "stack": stack.decision_function(x).reshape(len(x), -1)}
    return {name: s[:, 0] if k == 2 else s for name, s in scores.items()}


def run(*, sites_dir: Path, seed: int = 0) -> dict[str, Any]:
    from sklearn.linear_model import LogisticRegression

    from client.pipeline import SiteData
    from common.settings import RunSettings

    settings = RunSettings()
    sites = [SiteData.from_cohort(c) for c in layout_cohorts(sites_dir)]
    k = sites[0].n_classes
    x = [_site_log_odds(s, trees=settings.forest_trees, glm_c=settings.glm_c, width=settings.glm_max_features,
                        seed=seed) for s in sites]
    y = {split: [s.y[s.masks[split]] for s in sites] for split in ("validation", "test")}
    stack = LogisticRegression(C=1.0, max_iter=1000).fit(np.vstack([v["validation"] for v in x]),
                                                          np.concatenate(y["validation"]))
    def pooled_scores(split: str) -> dict[str, np.ndarray]:
        return _scores(np.vstack([v[split] for v in x]), np.vstack([v[f"{split}-calibrated"] for v in x]), stack, k)

    pooled, pooled_val = pooled_scores("test"), pooled_scores("validation")
    y_test = np.concatenate(y["test"])
    per_site: list[dict[str, Any]] = []
    for i, site in enumerate(sites):
        if len(np.unique(y["test"][i])) < k or len(np.unique(y["validation"][i])) < k:
            continue
        test = _scores(x[i]["test"], x[i]["test-calibrated"], stack, k)
        val = _scores(x[i]["validation"], x[i]["validation-calibrated"], stack, k)
        best = max(("forest", "glm"), key=lambda m: _auc(y["validation"][i], val[m], k))
        aucs = {m: round(_auc(y["test"][i], test[m], k), 4) for m in SCORES}
        per_site.append({"site": i + 1, "test_records": len(y["test"][i]), **aucs,
                         "best_alone": best, "best_alone_auc": aucs[best]})
    return {"sites_dir": str(sites_dir), "classes": k, "forest_trees": settings.forest_trees,
            "glm_c": settings.glm_c, "stack_coef": np.round(stack.coef_, 3).tolist(),
            "pooled_test_auc": {m: round(_auc(y_test, s, k), 4) for m, s in pooled.items()},
            # the stack's own figure here is optimistic: it was fitted on this split
            "pooled_validation_auc": {m: round(_auc(np.concatenate(y["validation"]), s, k), 4)
                                      for m, s in pooled_val.items()},
            "site_mean_test_auc": {m: round(float(np.mean([r[m] for r in per_site])), 4)
                                   for m in (*SCORES, "best_alone_auc")} if per_site else {},
            "per_site": per_site}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m simulations.benchmarks.site_glm_stack", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sites_dir", type=Path, help="a site layout with vaults (genofed split ... --vaults)")
    parser.add_argument("--seed", type=int, default=0, help="the forests' random state")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    emit(run(sites_dir=args.sites_dir, seed=args.seed), args.json)


if __name__ == "__main__":
    run_main(main, "python -m simulations.benchmarks.site_glm_stack")
