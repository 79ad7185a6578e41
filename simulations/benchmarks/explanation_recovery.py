"""Benchmark: how well a run's global explanation recovers a synthetic cohort's planted truth.

A synthetic cohort (3,000 patients by default, seed 5) is split IID over 3 sites with vaults, and
``genofed simulate`` runs a federation without DP in training (every site's officer allows it),
which writes ``explanation.json`` and leaves the final models in every vault. Measured:

- without explanation noise (that run's explanation): precision at 10 of the consensus ranking,
  of the forest's and of the GLM's own rankings, against ``truth.json``; Spearman correlation with
  a pooled analysis over its top 20 (:func:`simulations.explanation_scoring.pooled_ranking`);
  the top motif and whether it matches a planted one within one mismatch;
- with noise: every site makes real DP explanation releases of its final models at
  ``explanation-epsilon`` (1 by default), one per draw, charged to its ledger (the bench raises the
  sites' budgets to allow the draws), and the consensus ranking's precision at 10 is read per draw,
  with the release's weights (:data:`common.explanation.SUMMARY_WEIGHTS`) and with equal weights
  (the baseline).

With ``--runs N`` the federation is run N times on the same cohort, each time with new vault keys
and a new run id (the seeds of the sites' forests and of the deep model's training), and the
noise-free figures of every run are reported with their range (``noise_free_runs``, ``spread``):
how much one federation's explanation depends on its seeds. The noise draws read the first run.

Usage::

    python -m simulations.benchmarks.explanation_recovery [--patients 3000] [--draws 6] [--runs 1]
        [--json OUT]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from simulations.benchmarks import emit, run_main

RUN = {"cnn-rounds": 4, "local-epochs": 2, "forest-trees": 100, "explanation-patients": 150}
VARIANTS = ("equal weights", "weighted")


def make_run(root: Path, *, patients: int, seed: int = 5) -> Path:
    """The cohort, its 3 sites with vaults, and a federated run without DP; returns the run directory."""
    from simulations.site_layout import set_layout_policy, split_cohort
    from simulations.synthetic import write_synthetic_cohort

    write_synthetic_cohort(out=root / "cohort", patients=patients, seed=seed)
    split_cohort(spec_path=root / "cohort" / "spec.toml", sites=3, by="iid", out=root / "sites", seed=0,
                 vaults=True, show_progress=False)
    set_layout_policy(root / "sites", require_dp=False, test_statistics="exact", budget_epsilon=1000.0,
                      allow_raise=True)
    cmd = [sys.executable, "-m", "simulations.cli", "simulate", "--sites-dir", str(root / "sites"), "--out",
           str(root / "run"), "--no-dp", "--rounds", str(RUN["cnn-rounds"]), "--local-epochs",
           str(RUN["local-epochs"]), "--set", f"forest-trees={RUN['forest-trees']}", "--set",
           f"explanation-patients={RUN['explanation-patients']}", "--set", 'test-statistics="exact"',
           "--set", "site-alone=false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "GENOFED_NO_PROGRESS": "1"})
    if proc.returncode != 0:
        raise RuntimeError("the federated run for the benchmark failed: " + (proc.stderr or proc.stdout)[-2000:])
    return root / "run"


@contextlib.contextmanager
def equal_weights(on: bool) -> Iterator[None]:
    """Every summary at weight 1 while ``on`` (the baseline the release's weights are measured against)."""
    from common import explanation

    saved = dict(explanation.SUMMARY_WEIGHTS)
    if on:
        explanation.SUMMARY_WEIGHTS.clear()
    try:
        yield
    finally:
        explanation.SUMMARY_WEIGHTS.clear()
        explanation.SUMMARY_WEIGHTS.update(saved)


def noise_free(root: Path) -> dict[str, Any]:
    """The run's own explanation scored against the truth and a pooled analysis."""
    from client.cohort_store import load_cohort
    from client.vault import KeySource, Vault
    from common.cohort import concat_cohorts
    from common.settings import RunSettings
    from simulations.explanation_scoring import pooled_ranking, precision_at, spearman_top, within_one_mismatch

    ex = json.loads((root / "run" / "explanation.json").read_text())
    truth = json.loads((root / "cohort" / "truth.json").read_text())
    cohorts = [load_cohort(Vault.open(site / "vault", KeySource.from_key_file(site / "key"))) for site in _sites(root)]
    schema = cohorts[0].schema
    reference = pooled_ranking(concat_cohorts(cohorts), shares=ex["shares"], trees=RUN["forest-trees"],
                               glm_c=RunSettings().glm_c)
    top = ex["motifs"][0] if ex["motifs"] else {}
    return {"consensus_p10": precision_at(ex["features"], schema=schema, truth=truth),
            **{f"{m}_p10": precision_at(ex["models"][m]["features"], schema=schema, truth=truth)
               for m in ("forest", "logreg")},
            "spearman_pooled_top20": spearman_top(reference, ex["features"]),
            "top_motif": top.get("kmer", ""), "top_motif_positions": top.get("positions", []),
            "top_motif_planted": bool(top) and any(within_one_mismatch(top["kmer"], m["consensus"])
                                                   for m in truth["motifs"])}


def _sites(root: Path) -> list[Path]:
    return sorted(p for p in (root / "sites").iterdir() if (p / "vault").is_dir())


def noised_draw(root: Path, *, variant: str, draw: int, epsilon: float) -> float:
    """One DP release per site at ``epsilon``; the consensus ranking's precision at 10."""
    from client.cohort_store import load_cohort
    from client.vault import KeySource, Vault
    from common.settings import RunSettings
    from simulations.explanation_scoring import noised_explanation, precision_at

    settings = RunSettings(dp=True, explanation_epsilon=epsilon,
                           **{k.replace("-", "_"): v for k, v in RUN.items()})
    sites = [(s.name, s / "vault", s / "key") for s in _sites(root)]
    with equal_weights(variant == "equal weights"):
        ex = noised_explanation(sites, run_id=f"bench-{variant.replace(' ', '-')}-{draw}-{os.getpid()}",
                                settings=settings)
    schema = load_cohort(Vault.open(sites[0][1], KeySource.from_key_file(sites[0][2]))).schema
    truth = json.loads((root / "cohort" / "truth.json").read_text())
    return precision_at(ex["features"], schema=schema, truth=truth)


SPREAD_KEYS = ("consensus_p10", "forest_p10", "logreg_p10", "spearman_pooled_top20")


def spread(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Min, median and max over ``runs`` of each numeric noise-free figure."""
    import statistics

    return {k: {"min": min(r[k] for r in runs), "median": statistics.median(r[k] for r in runs),
                "max": max(r[k] for r in runs)} for k in SPREAD_KEYS}


def main() -> None:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", type=int, default=3000)
    parser.add_argument("--draws", type=int, default=6)
    parser.add_argument("--epsilon", type=float, default=1.0)
    parser.add_argument("--runs", type=int, default=1,
                        help="federations on the same cohort, each with new keys and run id (default 1)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    with tempfile.TemporaryDirectory() as tmp:
        roots = [Path(tmp) / f"federation-{i + 1}" for i in range(args.runs)]
        runs = []
        for root in roots:
            make_run(root, patients=args.patients)
            runs.append(noise_free(root))
        result: dict[str, Any] = {"noise_free": runs[0]}
        if args.runs > 1:
            result |= {"noise_free_runs": runs, "spread": spread(runs)}
        for variant in VARIANTS:
            result[variant] = [noised_draw(roots[0], variant=variant, draw=i, epsilon=args.epsilon)
                               for i in range(args.draws)]
    emit(result, args.json)


if __name__ == "__main__":
    run_main(main, "python -m simulations.benchmarks.explanation_recovery")
