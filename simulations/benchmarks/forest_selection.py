"""Benchmark: choosing the site forest's grid point by out-of-bag AUC against 3-fold CV.

``SiteForest(selection="cv")`` fits ``cv`` forests per grid point on two thirds of the train split
and refits the best on all of it (13 forests for ``DEFAULT_GRID``'s 4 points); ``selection="oob"``
fits one forest per point on all of it and keeps the best by the AUC of its out-of-bag votes (4
forests, no refit). This fits both, on every site of a layout, with the same random state and
``forest-trees``, and reports the fitting time and the test AUC, pooled over sites and averaged over
sites (sites whose test split lacks a class are left out of that mean). Nothing is charged to the
ledgers.

Usage::

    python -m simulations.benchmarks.forest_selection SITES_DIR [--seeds 0 1] [--json OUT]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from simulations.benchmarks import emit, layout_cohorts, run_main

SELECTIONS = ("cv", "oob")


def _site_fits(site: Any, *, trees: int, seed: int) -> dict[str, Any]:
    """Both selections' test probabilities (over all the cohort's classes), fitting times and grid points."""
    from client.forest import SiteForest
    from client.pipeline import fit_tabular_preprocessor, forest_matrix, over_all_classes

    pre = fit_tabular_preprocessor(site)
    x, y = forest_matrix(site, "train", pre), site.y[site.masks["train"]]
    x_test = forest_matrix(site, "test", pre)
    out: dict[str, Any] = {}
    for selection in SELECTIONS:
        start = time.perf_counter()
        forest = SiteForest(n_estimators=trees, selection=selection, random_state=seed).fit(x, y)
        seconds = time.perf_counter() - start
        out[selection] = {"proba": over_all_classes(forest.predict_proba(x_test), forest.classes_, site.n_classes),
                          "seconds": seconds, "params": forest.best_params_}
    return out


def _auc(y: np.ndarray, proba: np.ndarray, n_classes: int) -> float:
    from sklearn.metrics import roc_auc_score

    if n_classes == 2:
        return float(roc_auc_score(y, proba[:, 1]))
    return float(roc_auc_score(y, proba, multi_class="ovr", labels=np.arange(n_classes)))


def run(*, sites_dir: Path, seeds: tuple[int, ...] = (0,)) -> dict[str, Any]:
    from client.pipeline import SiteData
    from common.progress import progress_bar
    from common.settings import RunSettings

    trees = RunSettings().forest_trees
    sites = [SiteData.from_cohort(c) for c in layout_cohorts(sites_dir)]
    k = sites[0].n_classes
    y_test = [s.y[s.masks["test"]] for s in sites]
    scored = [i for i, y in enumerate(y_test) if len(np.unique(y)) == k]
    rows = []
    with progress_bar() as bar:
        task = bar.add_task("forests (both selections)", total=len(seeds) * len(sites))

        def fit(site: Any, seed: int) -> dict[str, Any]:
            out = _site_fits(site, trees=trees, seed=seed)
            bar.advance(task)
            return out

        fits_by_seed = [[fit(s, seed) for s in sites] for seed in seeds]
    for seed, fits in zip(seeds, fits_by_seed):
        for selection in SELECTIONS:
            proba = [f[selection]["proba"] for f in fits]
            rows.append({"seed": seed, "selection": selection,
                         "seconds": round(sum(f[selection]["seconds"] for f in fits), 2),
                         "pooled_test_auc": round(_auc(np.concatenate(y_test), np.vstack(proba), k), 4),
                         "site_mean_test_auc": round(float(np.mean([_auc(y_test[i], proba[i], k) for i in scored])), 4)
                         if scored else None,
                         "params": [f[selection]["params"] for f in fits]})
    total = {s: sum(r["seconds"] for r in rows if r["selection"] == s) for s in SELECTIONS}
    return {"sites_dir": str(sites_dir), "classes": k, "forest_trees": trees, "seeds": list(seeds), "runs": rows,
            "seconds": {s: round(v, 2) for s, v in total.items()},
            "speedup": round(total["cv"] / total["oob"], 2) if total["oob"] > 0 else None}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m simulations.benchmarks.forest_selection", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sites_dir", type=Path, help="a site layout with vaults (genofed cohort split ... --vaults)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="the forests' random states")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    emit(run(sites_dir=args.sites_dir, seeds=tuple(args.seeds)), args.json)


if __name__ == "__main__":
    run_main(main, "python -m simulations.benchmarks.forest_selection")
