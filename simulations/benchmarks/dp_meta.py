"""Benchmark: the federated meta-classifier under DP, against its non-private pooled fit.

Reads a site layout after a federated run (each vault holds the run's final deep model, shared
scaler, GLM, and its own forest and GLM), computes every site's stacking features (the base models'
log-odds, :data:`common.stack.BASE_MODELS`)
on its validation and test splits, and fits the meta-classifier: pooled without noise (the
reference), and as the federation does under DP (Newton steps on Gaussian-noised statistics,
eigenvalues floored at the noise level) from zero and from the public averaging prior, for each
feature bound and number of rounds asked for (``meta-epsilon`` split over the rounds). Each DP
variant is repeated over several noise draws and scored by the hybrid's pooled validation AUC (what
the stacking fallback sees) and test AUC, beside each base model's. Nothing is charged to the
ledgers: this replays the mechanism offline on data the sites hold, for choosing settings.

Usage::

    python -m simulations.benchmarks.dp_meta SITES_DIR [--meta-epsilon 1.0] [--bound 6 3] [--rounds 3 1]
        [--draws 5] [--json OUT]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from simulations.benchmarks import BenchmarkInputError, emit, layout_sites, run_main


def _site_features(sites_dir: Path) -> list[dict[str, tuple[np.ndarray, np.ndarray]]]:
    from client.cohort_store import load_cohort
    from client.model_store import CNN_ROLE
    from client.calibration import stacking_probabilities
    from client.pipeline import SiteData, meta_features
    from client.site_models import base_probabilities, load_site_models
    from client.vault import KeySource, Vault
    from common.stack import BASE_MODELS

    out = []
    for d in layout_sites(sites_dir):
        vault = Vault.open(d / "vault", KeySource.from_key_file(d / "key"))
        if CNN_ROLE not in vault.roles:
            raise BenchmarkInputError(f"{d}: no final models in the vault; run a federation on {sites_dir} first")
        data = SiteData.from_cohort(load_cohort(vault))
        models = load_site_models(vault)
        feats = {}
        for split in ("validation", "test"):
            proba = base_probabilities(models, data, split)
            proba = stacking_probabilities(proba, models.calibration)
            feats[split] = (meta_features(*(proba[m] for m in BASE_MODELS)), data.y[data.masks[split]])
        out.append(feats)
    return out


def _auc(sites: list[dict], coef: np.ndarray, n_features: int, n_classes: int, split: str = "test") -> float:
    from sklearn.metrics import roc_auc_score

    from common.meta import StackingMetaClassifier

    x = np.vstack([s[split][0] for s in sites])
    y = np.concatenate([s[split][1] for s in sites])
    p = StackingMetaClassifier().set_coef(coef, n_features=n_features).predict_proba(x)
    return float(roc_auc_score(y, p[:, 1]) if n_classes == 2 else roc_auc_score(y, p, multi_class="ovr"))


def _dp_fit(sites: list[dict], *, start: np.ndarray, sigma: float, n_classes: int, rounds: int, bound: float,
            rng: np.random.Generator) -> np.ndarray:
    from client.privacy.mechanisms import private_newton_terms
    from common.meta import NewtonSolver, nearest_positive_definite, noise_floor, positive_evidence

    n_features = sites[0]["validation"][0].shape[1]
    n_models = n_features // (1 if n_classes == 2 else n_classes)
    solver = NewtonSolver(n_features=n_features, n_classes=n_classes,
                          positive=positive_evidence(n_models=n_models, n_classes=n_classes))
    solver.coef = solver.best_coef = start.copy()
    floor = noise_floor(dim=len(start), n_classes=n_classes, noise_multipliers=[sigma] * len(sites))
    for _ in range(rounds):
        terms = [private_newton_terms(solver.coef, *s["validation"], n_classes=n_classes, bound=bound,
                                      noise_multiplier=sigma, rng=rng) for s in sites]
        total = sum(terms[1:], terms[0])
        total.hess = nearest_positive_definite(total.hess, floor=floor)
        solver.step(total)
    return solver.coef


def run(*, sites_dir: Path, meta_epsilon: float, delta: float, rounds: list[int], bounds: list[float],
        draws: int) -> dict[str, Any]:
    from client.privacy.mechanisms import meta_noise_multiplier
    from common.meta import StackingMetaClassifier, averaging_prior, flat_coef, n_params, selection_coef
    from common.stack import BASE_MODELS

    sites = _site_features(sites_dir)
    n_classes = max(2, int(max(s["validation"][1].max() for s in sites)) + 1)
    n_features = sites[0]["validation"][0].shape[1]
    n_models = n_features // (1 if n_classes == 2 else n_classes)
    x = np.vstack([s["validation"][0] for s in sites])
    y = np.concatenate([s["validation"][1] for s in sites])
    pooled = flat_coef(StackingMetaClassifier(positive=True).fit(x, y))
    prior = averaging_prior(n_models=n_models, n_classes=n_classes)
    starts = {"zero": np.zeros(n_params(n_features, n_classes)), "averaging-prior": prior}

    def score(coef: np.ndarray) -> dict[str, float]:
        return {split: round(_auc(sites, coef, n_features, n_classes, split), 4) for split in ("validation", "test")}

    base = {name: score(selection_coef(n_models=n_models, n_classes=n_classes, index=i))
            for i, name in enumerate(BASE_MODELS[:n_models])}
    rows = []
    for bound in bounds:
        for r in rounds:
            sigma = meta_noise_multiplier(epsilon=meta_epsilon, delta=delta, rounds=r)
            for name, start in starts.items():
                fits = [_dp_fit(sites, start=start, sigma=sigma, n_classes=n_classes, rounds=r, bound=bound,
                                rng=np.random.default_rng(draw)) for draw in range(draws)]
                scores = [score(c) for c in fits]
                rows.append({"bound": bound, "rounds": r, "start": name, "noise_multiplier": round(sigma, 3),
                             "validation_auc": [s["validation"] for s in scores],
                             "test_auc": [s["test"] for s in scores],
                             "mean_test_auc": round(float(np.mean([s["test"] for s in scores])), 4)})
    return {"sites_dir": str(sites_dir), "validation_records": int(len(y)), "classes": n_classes,
            "meta_epsilon": meta_epsilon, "delta": delta, "pooled_no_noise": score(pooled),
            "averaging_prior": score(prior), "base_models": base, "dp": rows}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m simulations.benchmarks.dp_meta", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sites_dir", type=Path, help="a site layout after a federated run")
    parser.add_argument("--meta-epsilon", type=float, default=1.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--rounds", type=int, nargs="+", default=[3], help="meta rounds (meta-epsilon split over them)")
    parser.add_argument("--bound", type=float, nargs="+", default=[6.0], help="meta feature clipping bounds")
    parser.add_argument("--draws", type=int, default=5, help="noise draws per starting point")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    result = run(sites_dir=args.sites_dir, meta_epsilon=args.meta_epsilon, delta=args.delta, rounds=args.rounds,
                 bounds=args.bound, draws=args.draws)
    emit(result, args.json)


if __name__ == "__main__":
    run_main(main, "python -m simulations.benchmarks.dp_meta")
