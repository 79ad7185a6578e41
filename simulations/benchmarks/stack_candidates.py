"""Benchmark: every stacking candidate's exact pooled AUC after a run, read back from the sites' vaults.

A run releases its stacking candidates' validation statistics on 32 bins, and test statistics only
of the hybrid it chose and of the base models. To judge that choice, this reads back each site's
stored models from the vaults the run trained (the deep model, the GLMs, the forest, the Platt
maps and the meta coefficients), scores every candidate on every site's validation and test split,
and pools the scores: the base models, the fitted stack (``meta.fallback.fitted_coef`` when the
fallback replaced it), each reduced stack as the sites built it
(:func:`common.stack.reduced_stack_weights`), the hybrid as the run left it, and the public
weightings (``public``: the base models' log-odds averaged with equal weights,
:func:`common.meta.averaging_prior`; ``public-without-...``: the same average without some models),
which are the stacks of a DP run with ``meta-dp-rounds = 0``. AUC is exact (scikit-learn on the
pooled scores, macro one-vs-rest for several classes); ``released_validation`` repeats what the run
decided on. ``decisions`` applies the run's own rule (:func:`common.stack.choose_stack`, with the
run's margins and the standard error it released) to the exact validation AUCs of each family of
stacks, fitted and public, and gives what each would have chosen and its test AUC.

It needs every site's key, so it is a tool for simulations and audits, not for a federation: the
pooled scores it computes are what the sites never send. Nothing is released or charged.

Usage::

    python -m simulations.benchmarks.stack_candidates RUN_DIR SITES_DIR [--json OUT]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from simulations.benchmarks import BenchmarkInputError, emit, layout_sites, run_main

SPLITS = ("validation", "test")


def _run_metrics(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / "metrics.json"
    if not path.is_file():
        raise BenchmarkInputError(f"{path}: no metrics.json; give the --out folder of a finished `genofed simulate`")
    return json.loads(path.read_text(encoding="utf-8"))


PUBLIC = "public"


def public_name(stack: str) -> str:
    """The public weighting that stands where ``stack`` (``hybrid`` or a reduced stack) stands."""
    return stack.replace("hybrid", PUBLIC, 1)


def candidate_coefs(meta: dict[str, Any], *, n_classes: int) -> dict[str, np.ndarray]:
    """The meta coefficients of every candidate: the fitted stack, each reduced stack built from it,
    the hybrid as the run left it (``chosen``), and the public weightings."""
    from common.meta import averaging_prior
    from common.stack import BASE_MODELS, REDUCED_STACKS, reduced_stack_weights

    fallback = meta.get("fallback") or {}
    fitted = np.asarray(fallback.get("fitted_coef", meta["coef"]), dtype=np.float64)
    prior = averaging_prior(n_models=len(BASE_MODELS), n_classes=max(n_classes, 2))
    coefs = {"hybrid": fitted, "chosen": np.asarray(meta["coef"], dtype=np.float64), PUBLIC: prior}
    for name in REDUCED_STACKS:
        coefs[name] = reduced_stack_weights(name, fitted, n_classes=n_classes)
        coefs[public_name(name)] = reduced_stack_weights(name, prior, n_classes=n_classes)
    return coefs


def replay_decisions(doc: dict[str, Any], auc: dict[str, dict[str, float]]) -> dict[str, Any]:
    """What the run's stacking rule chooses from each family of stacks (fitted, public) on the exact
    validation AUCs, and that choice's exact test AUC; {} when the run released no decision."""
    from common.settings import RunSettings
    from common.stack import REDUCED_STACKS, choose_stack, stacked_models

    fallback = (doc.get("meta") or {}).get("fallback") or {}
    if "standard_error" not in fallback:
        return {}
    settings = RunSettings(**{k: v for k, v in doc.get("settings", {}).items() if k in RunSettings.__dataclass_fields__})
    stacks = ["hybrid", *REDUCED_STACKS]
    out = {}
    for family, name in (("fitted", lambda s: s), ("public", public_name)):
        val = {**auc["validation"], **{s: auc["validation"][name(s)] for s in stacks}}
        _, _, chosen = choose_stack(val, stacks=stacks, candidates=stacked_models(stack_local=settings.stack_forest),
                                    se=float(fallback["standard_error"]), margin_se=settings.fallback_margin,
                                    site_average_se=settings.site_average_margin)
        scored = name(chosen) if chosen in stacks else chosen
        out[family] = {"chosen": scored, "validation_auc": auc["validation"][scored], "test_auc": auc["test"][scored]}
    return out


def _auc(y: np.ndarray, p: np.ndarray, n_classes: int) -> float:
    from sklearn.metrics import roc_auc_score

    if n_classes == 2:
        return float(roc_auc_score(y, p[:, 1]))
    return float(roc_auc_score(y, p, multi_class="ovr", labels=np.arange(n_classes)))


def run(*, run_dir: Path, sites_dir: Path) -> dict[str, Any]:
    from client.cohort_store import load_cohort
    from client.pipeline import SiteData
    from client.site_models import base_probabilities, hybrid_probabilities, load_site_models
    from client.vault import KeySource, Vault

    doc = _run_metrics(run_dir)
    ys: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    scores: dict[str, dict[str, list[np.ndarray]]] = {s: {} for s in SPLITS}
    n_classes, coefs = 0, {}
    for site in layout_sites(sites_dir):
        vault = Vault.open(site / "vault", KeySource.from_key_file(site / "key"))
        models, data = load_site_models(vault), SiteData.from_cohort(load_cohort(vault))
        if not coefs:  # the same for every site: the run's one meta-classifier
            n_classes = models.n_classes
            coefs = candidate_coefs(doc["meta"], n_classes=n_classes)
        for split in SPLITS:
            base = base_probabilities(models, data, split)
            ys[split].append(data.y[data.masks[split]])
            for name, proba in {**base, **{c: hybrid_probabilities(base, coef, n_classes=n_classes,
                                                                     calibration=models.calibration)
                                           for c, coef in coefs.items()}}.items():
                scores[split].setdefault(name, []).append(proba)
    auc = {split: {name: round(_auc(np.concatenate(ys[split]), np.vstack(ps), n_classes), 4)
                   for name, ps in scores[split].items()} for split in SPLITS}
    fallback = doc["meta"].get("fallback") or {}
    return {"run_dir": str(run_dir), "sites_dir": str(sites_dir),
            "chosen": fallback.get("chosen", "hybrid"), "reason": fallback.get("reason", ""),
            "released_validation": {k: round(float(v), 4) for k, v in (fallback.get("validation_auc") or {}).items()},
            "exact_auc": auc, "decisions": replay_decisions(doc, auc)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m simulations.benchmarks.stack_candidates", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="the --out folder of a finished genofed simulate")
    parser.add_argument("sites_dir", type=Path, help="the layout that run trained (its --sites-dir)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    emit(run(run_dir=args.run_dir, sites_dir=args.sites_dir), args.json)


if __name__ == "__main__":
    run_main(main, "python -m simulations.benchmarks.stack_candidates")
