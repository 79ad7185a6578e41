"""Benchmark: each site's own GLM at one fixed penalty against the penalty it chooses itself.

Reads a site layout (each vault's cohort; no run needed) and fits, at every site, its own GLM on its
train split with its own scaler (as :func:`client.pipeline.fit_local_models` does) twice: at the
run's ``glm-c``, and at the ``C`` the site chooses by cross-validation on its train split
(:func:`client.site_glm.choose_site_glm_c`). Each is scored on the site's own test split: the AUC of
all sites' test predictions pooled (the federated report's ``site-logreg`` row), and the mean of the
per-site AUCs over the sites whose test split holds both classes (binary cohorts). Nothing is
released or charged.

Usage::

    python -m simulations.benchmarks.site_glm_c SITES_DIR [--glm-c 0.1] [--seed 0] [--json OUT]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from simulations.benchmarks import emit, layout_cohorts, run_main


def _auc(y: np.ndarray, proba: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, proba[:, 1]) if proba.shape[1] == 2 else
                 roc_auc_score(y, proba, multi_class="ovr"))


def run(*, sites_dir: Path, glm_c: float, seed: int) -> dict[str, Any]:
    from client.calibration import FOLDS
    from client.pipeline import SiteData, fit_shared_scaler, glm_matrix, over_all_classes
    from client.site_glm import choose_site_glm_c
    from common.glm import FederatedGLM
    from common.settings import RunSettings

    width = RunSettings().glm_max_features
    sites = [SiteData.from_cohort(c) for c in layout_cohorts(sites_dir)]
    proba: dict[str, list[np.ndarray]] = {"fixed": [], "chosen": []}
    per_site: dict[str, list[float]] = {"fixed": [], "chosen": []}
    chosen, y_test = [], []
    for site in sites:
        scaler = fit_shared_scaler(site, max_glm_columns=width)
        x, y = glm_matrix(site, "train", scaler), site.y[site.masks["train"]]
        if len(np.unique(y)) < 2:
            continue  # no GLM of its own (the run leaves it out the same way)
        xt, yt = glm_matrix(site, "test", scaler), site.y[site.masks["test"]]
        c = choose_site_glm_c(x, y, folds=FOLDS, seed=seed, default=glm_c)
        chosen.append(c)
        y_test.append(yt)
        for name, value in (("fixed", glm_c), ("chosen", c)):
            p = over_all_classes(FederatedGLM(C=value).fit(x, y).predict_proba(xt), np.unique(y), site.n_classes)
            proba[name].append(p)
            if site.n_classes == 2 and len(np.unique(yt)) == 2:
                per_site[name].append(_auc(yt, p))
    y_all = np.concatenate(y_test)
    return {"sites_dir": str(sites_dir), "sites": len(sites), "glm_c": glm_c, "chosen_c": chosen,
            **{name: {"pooled_test_auc": round(_auc(y_all, np.vstack(proba[name])), 4),
                      "mean_site_test_auc": round(float(np.mean(per_site[name])), 4) if per_site[name] else None,
                      "sites_in_mean": len(per_site[name])} for name in proba}}


def main(argv: list[str] | None = None) -> None:
    from common.settings import RunSettings

    parser = argparse.ArgumentParser(prog="python -m simulations.benchmarks.site_glm_c", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sites_dir", type=Path, help="a site layout with vaults (genofed split ... --vaults)")
    parser.add_argument("--glm-c", type=float, default=RunSettings().glm_c, help="the fixed penalty (default: glm-c)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the cross-validation folds")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    emit(run(sites_dir=args.sites_dir, glm_c=args.glm_c, seed=args.seed), args.json)


if __name__ == "__main__":
    run_main(main, "python -m simulations.benchmarks.site_glm_c")
