"""Benchmark: the federated meta-classifier under DP, against its non-private pooled fit.

Reads a site layout after a federated run (each vault holds the run's final CNN and its forest),
computes every site's stacking features on its validation split, and fits the meta-classifier
three ways: pooled without noise (the reference), and as the federation does under DP (three
Newton steps on Gaussian-noised statistics, eigenvalues floored at the noise level) from zero
and from the public averaging prior. Each DP variant is repeated over several noise draws and
scored by the hybrid's pooled test AUC. Nothing is charged to the ledgers: this replays the
mechanism offline on data the sites hold, for choosing settings.

Usage::

    python -m simulations.benchmarks.dp_meta SITES_DIR [--meta-epsilon 1.0] [--draws 5] [--json OUT]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from simulations.benchmarks import emit


def _site_features(sites_dir: Path) -> list[dict[str, tuple[np.ndarray, np.ndarray]]]:
    import torch

    from client.cohort_store import load_cohort
    from client.model_store import CNN_ROLE, arrays_from_bytes, load_forest
    from client.pipeline import SiteData, deep_proba, forest_matrix, meta_features
    from client.site import site_dirs
    from client.vault import KeySource, Vault
    from common.models import DeepModelConfig, build_model

    out = []
    for d in site_dirs(sites_dir):
        vault = Vault.open(d / "vault", KeySource.from_key_file(d / "key"))
        if CNN_ROLE not in vault.roles:
            raise SystemExit(f"{d}: no final CNN in the vault; run a federation on {sites_dir} first")
        data = SiteData.from_cohort(load_cohort(vault))
        arrays, meta = arrays_from_bytes(vault.read(CNN_ROLE))
        model = build_model(DeepModelConfig.from_dict(meta["config"]))
        model.load_state_dict({k: torch.as_tensor(a) for k, a in arrays.items()})
        stored = load_forest(vault)
        pre = stored["preprocessor"]
        out.append({split: (meta_features(deep_proba(model, data, split, pre),
                                          stored["forest"].predict_proba(forest_matrix(data, split, pre))),
                            data.y[data.masks[split]]) for split in ("validation", "test")})
    return out


def _auc(sites: list[dict], coef: np.ndarray, n_features: int, n_classes: int) -> float:
    from sklearn.metrics import roc_auc_score

    from common.meta import StackingMetaClassifier

    x = np.vstack([s["test"][0] for s in sites])
    y = np.concatenate([s["test"][1] for s in sites])
    p = StackingMetaClassifier().set_coef(coef, n_features=n_features).predict_proba(x)
    return float(roc_auc_score(y, p[:, 1]) if n_classes == 2 else roc_auc_score(y, p, multi_class="ovr"))


def _dp_fit(sites: list[dict], *, start: np.ndarray, sigma: float, n_classes: int, rounds: int,
            rng: np.random.Generator) -> np.ndarray:
    from client.privacy.mechanisms import private_newton_terms
    from common.meta import META_FEATURE_BOUND, NewtonSolver, nearest_positive_definite, noise_floor

    n_features = sites[0]["validation"][0].shape[1]
    solver = NewtonSolver(n_features=n_features, n_classes=n_classes)
    solver.coef = solver.best_coef = start.copy()
    floor = noise_floor(dim=len(start), n_classes=n_classes, noise_multipliers=[sigma] * len(sites))
    for _ in range(rounds):
        terms = [private_newton_terms(solver.coef, *s["validation"], n_classes=n_classes, bound=META_FEATURE_BOUND,
                                      noise_multiplier=sigma, rng=rng) for s in sites]
        total = sum(terms[1:], terms[0])
        total.hess = nearest_positive_definite(total.hess, floor=floor)
        solver.step(total)
    return solver.coef


def run(*, sites_dir: Path, meta_epsilon: float, delta: float, rounds: int, draws: int) -> dict[str, Any]:
    from client.privacy.mechanisms import meta_noise_multiplier
    from common.meta import StackingMetaClassifier, averaging_prior, flat_coef, n_params

    sites = _site_features(sites_dir)
    n_classes = max(2, int(max(s["validation"][1].max() for s in sites)) + 1)
    n_features = sites[0]["validation"][0].shape[1]
    x = np.vstack([s["validation"][0] for s in sites])
    y = np.concatenate([s["validation"][1] for s in sites])
    pooled = flat_coef(StackingMetaClassifier().fit(x, y))
    sigma = meta_noise_multiplier(epsilon=meta_epsilon, delta=delta, rounds=rounds)
    prior = averaging_prior(n_models=2, n_classes=n_classes)
    starts = {"zero": np.zeros(n_params(n_features, n_classes)), "averaging-prior": prior}
    dp = {name: [round(_auc(sites, _dp_fit(sites, start=start, sigma=sigma, n_classes=n_classes, rounds=rounds,
                                           rng=np.random.default_rng(draw)), n_features, n_classes), 4)
                 for draw in range(draws)]
          for name, start in starts.items()}
    return {"sites_dir": str(sites_dir), "validation_records": int(len(y)), "classes": n_classes,
            "meta_epsilon": meta_epsilon, "delta": delta, "rounds": rounds, "noise_multiplier": round(sigma, 3),
            "pooled_no_noise_auc": round(_auc(sites, pooled, n_features, n_classes), 4),
            "averaging_prior_auc": round(_auc(sites, prior, n_features, n_classes), 4),
            "dp_auc_by_start": dp}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sites_dir", type=Path, help="a site layout after a federated run")
    parser.add_argument("--meta-epsilon", type=float, default=1.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--draws", type=int, default=5, help="noise draws per starting point")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result = run(sites_dir=args.sites_dir, meta_epsilon=args.meta_epsilon, delta=args.delta, rounds=args.rounds,
                 draws=args.draws)
    emit(result, args.json)


if __name__ == "__main__":
    main()
