"""Benchmark: the DP GLM against its budget, and what the noised shared scaler costs it.

Reads a site layout (each vault's cohort; no run needed) and replays, offline, what a DP
federation does for the GLM: each site's rescaled column moments noised at ``moments-epsilon``
and summed into the shared scaler, then each site's gradient at the intercept-only model noised
at ``glm-epsilon``, one step with the public curvature, the ``glm-dp-max-features`` largest
columns kept (:mod:`common.glm`). Each ``glm-epsilon`` is scored by the GLM's pooled test AUC over
several noise draws, with the noised scaler and with the exact pooled one (what a better
scaler could reach), beside the no-noise fit. For each setting it also gives the run's composed
epsilon at a site (the run plan the site checks, at the given DP-SGD ``epsilon``). Nothing is
charged to the ledgers: this is for choosing settings.

``--glm-max-features`` replays each setting at several widths of the GLM (the columns it reads:
every clinical column, then the most variable of the rest, chosen from the noised moments without
the label), to price a narrower release; by default the run's width under DP (``glm-dp-columns``).

``--distributed`` adds, for every setting, the same draws with distributed noise (what a run with
``secure-sum = true`` does): each site adds ``1/sqrt(t)`` of the noise, ``t`` the secure sum's
default threshold, so the summed release carries the calibrated noise once instead of once per site.

Usage::

    python -m simulations.benchmarks.dp_glm SITES_DIR [--glm-epsilon 1 2 4] [--moments-epsilon 0.5 2]
        [--glm-max-features 256 64 16] [--draws 5] [--distributed] [--json OUT]
"""

from __future__ import annotations

import argparse
import itertools
import math
from pathlib import Path
from typing import Any

import numpy as np

from common.settings import RunSettings
from simulations.benchmarks import emit, layout_cohorts, layout_sites, run_main


def _noised_scaler(raws: list[np.ndarray], columns: Any, *, sigma: float, max_glm_columns: int,
                   rng: np.random.Generator) -> Any:
    """The shared scaler as the coordinator builds it from the sites' noised moments."""
    from client.privacy.mechanisms import noised_moments
    from common.tabular import column_moments, moments_sensitivity, scaler_from_moments

    sens = moments_sensitivity(columns.width)
    total: dict[str, np.ndarray] = {}
    for raw in raws:
        m = noised_moments(column_moments(raw, low=columns.low, high=columns.high), sensitivity=sens,
                           noise_multiplier=sigma, rng=rng)
        total = {k: total.get(k, 0.0) + v for k, v in m.items()}
    return scaler_from_moments(total, columns, rescaled=True, max_glm_columns=max_glm_columns,
                               noise_sd=math.sqrt(len(raws)) * sigma * sens)


def _glm_auc(sites: list[Any], scaler: Any, *, sigma: float, C: float, keep: int, n_classes: int,
             rng: np.random.Generator) -> float:
    """Pooled test AUC of the DP GLM's one step from the sites' noised gradients (sigma 0: no noise)."""
    from sklearn.metrics import roc_auc_score

    from client.pipeline import glm_matrix
    from client.privacy.mechanisms import private_glm_gradient
    from common.glm import FederatedGLM, intercept_only, keep_largest, public_curvature
    from common.meta import NewtonSolver, NewtonTerms, newton_terms

    xs = [glm_matrix(s, "train", scaler) for s in sites]
    ys = [s.y[s.masks["train"]] for s in sites]
    d = xs[0].shape[1]
    coef = intercept_only(np.bincount(np.concatenate(ys), minlength=n_classes), n_features=d, n_classes=n_classes)
    if sigma > 0:
        grad = sum(private_glm_gradient(coef, x, y, n_classes=n_classes, noise_multiplier=sigma, rng=rng)
                   for x, y in zip(xs, ys))
    else:
        grad = sum(newton_terms(coef, x, y, n_classes=n_classes).grad for x, y in zip(xs, ys))
    n = sum(len(y) for y in ys)
    terms = NewtonTerms(0.0, grad, public_curvature(n=n, n_features=d, n_classes=n_classes), n)
    solver = NewtonSolver(n_features=d, n_classes=n_classes, penalty="l2", C=C)
    solver.coef = solver.best_coef = coef
    _, g, h = solver.objective(terms)
    # lstsq, as the coordinator's solver: the multinomial curvature is singular along the intercepts' sum.
    step = keep_largest(coef - np.linalg.lstsq(h, g, rcond=None)[0], n_features=d, n_classes=n_classes, keep=keep)
    x_test = np.vstack([glm_matrix(s, "test", scaler) for s in sites])
    y_test = np.concatenate([s.y[s.masks["test"]] for s in sites])
    p = FederatedGLM().set_coef(step, n_features=d).predict_proba(x_test)
    return float(roc_auc_score(y_test, p[:, 1]) if n_classes == 2 else roc_auc_score(y_test, p, multi_class="ovr"))


def _run_epsilon(sites_dir: Path, settings: Any) -> float:
    """The run's composed epsilon at the first site, from the plan the site checks at the census."""
    from client.cohort_store import load_cohort
    from client.privacy.facade import SitePrivacy
    from client.privacy.ledger import epsilon_of
    from client.vault import KeySource, Vault

    d = layout_sites(sites_dir)[0]
    vault = Vault.open(d / "vault", KeySource.from_key_file(d / "key"))
    cohort = load_cohort(vault)
    privacy = SitePrivacy.open(vault, site=d.name, settings=settings, run_id="dp-glm-benchmark", n_records=cohort.n)
    n_train = int(cohort.split_mask("train").sum())
    return float(epsilon_of(privacy.plan_run(n_train=n_train), delta=privacy.delta))


def run(*, sites_dir: Path, glm_epsilons: list[float], moments_epsilons: list[float], epsilon: float,
        delta: float, draws: int, distributed: bool = False, widths: list[int] | None = None) -> dict[str, Any]:
    from client.pipeline import SiteData, fit_shared_scaler, shared_raw
    from client.privacy.ledger import gaussian_noise_multiplier
    from common.cohort import concat_cohorts
    from common.secure_sum import default_threshold
    from common.tabular import shared_columns

    cohorts = layout_cohorts(sites_dir)
    sites = [SiteData.from_cohort(c) for c in cohorts]
    columns = shared_columns(sites[0].schema)
    n_classes = max(2, sites[0].n_classes)
    base = RunSettings(epsilon=epsilon, test_statistics="none")
    everyone = SiteData.from_cohort(concat_cohorts(cohorts))
    raws = [shared_raw(s, "train") for s in sites]
    shares = {"whole": 1.0} | ({"distributed": default_threshold(len(sites)) ** -0.5} if distributed else {})
    fit = {"C": base.glm_c, "keep": base.glm_dp_max_features, "n_classes": n_classes}
    widths = widths or [base.glm_width]
    rows, no_noise = [], {}
    for width in widths:
        # The exact pooled scaler: what the shared scaler would be without noise.
        exact = fit_shared_scaler(everyone, max_glm_columns=width)
        no_noise[width] = round(_glm_auc(sites, exact, sigma=0.0, rng=np.random.default_rng(0), **fit), 4)
        for me, ge, (noise, share) in itertools.product(moments_epsilons, glm_epsilons, shares.items()):
            sigma_g = share * gaussian_noise_multiplier(epsilon=ge, delta=delta)
            sigma_m = share * gaussian_noise_multiplier(epsilon=me, delta=delta)
            noised, exact_aucs = [], []
            for draw in range(draws):
                rng = np.random.default_rng(draw)
                scaler = _noised_scaler(raws, columns, sigma=sigma_m, max_glm_columns=width, rng=rng)
                noised.append(round(_glm_auc(sites, scaler, sigma=sigma_g, rng=rng, **fit), 4))
                exact_aucs.append(round(_glm_auc(sites, exact, sigma=sigma_g, rng=rng, **fit), 4))
            settings = RunSettings(epsilon=epsilon, glm_epsilon=ge, moments_epsilon=me, test_statistics="none")
            rows.append({"glm_max_features": width, "moments_epsilon": me, "glm_epsilon": ge, "noise": noise,
                         "noise_share": round(share, 4), "run_epsilon": round(_run_epsilon(sites_dir, settings), 3),
                         "auc_noised_scaler": noised, "auc_exact_scaler": exact_aucs,
                         "mean_noised_scaler": round(float(np.mean(noised)), 4),
                         "mean_exact_scaler": round(float(np.mean(exact_aucs)), 4),
                         "auc_exact_scaler_no_noise": no_noise[width]})
    return {"sites_dir": str(sites_dir), "sites": len(sites), "shared_columns": columns.width,
            "train_records": int(sum(int(s.masks["train"].sum()) for s in sites)), "dp_sgd_epsilon": epsilon,
            "delta": delta, "draws": draws, "auc_exact_scaler_no_noise": no_noise[widths[0]], "rows": rows}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m simulations.benchmarks.dp_glm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sites_dir", type=Path, help="a site layout with vaults (genofed split ... --vaults)")
    parser.add_argument("--glm-epsilon", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    parser.add_argument("--moments-epsilon", type=float, nargs="+", default=[RunSettings().moments_epsilon],
                        help="epsilons of the moments release to replay (default: the run's moments-epsilon)")
    parser.add_argument("--glm-max-features", type=int, nargs="+",
                        help="widths of the GLM to replay (default: the run's width under DP, glm-dp-columns)")
    parser.add_argument("--epsilon", type=float, default=8.0, help="DP-SGD epsilon, for the composed run epsilon")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--draws", type=int, default=5, help="noise draws per setting")
    parser.add_argument("--distributed", action="store_true",
                        help="also each setting with distributed noise (secure-sum = true)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    emit(run(sites_dir=args.sites_dir, glm_epsilons=args.glm_epsilon, moments_epsilons=args.moments_epsilon,
             epsilon=args.epsilon, delta=args.delta, draws=args.draws, distributed=args.distributed,
             widths=args.glm_max_features), args.json)


if __name__ == "__main__":
    run_main(main, "python -m simulations.benchmarks.dp_glm")
