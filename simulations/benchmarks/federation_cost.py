"""Benchmark: wall time of a federated simulation against pooled training doing the same work.

A synthetic cohort is split over S sites (with vaults). Then, in one invocation:

- pooled: every model trained once on the union of the sites (``run_evaluate`` on the pooled
  cohort, the deep model for exactly R x E epochs, no early stopping, no bootstrap);
- federated: ``genofed simulate`` with R CNN rounds of E local epochs (Flower's Simulation
  Engine: a SuperLink, Ray, one simulated SuperNode per site; the same total passes over the
  training data), timed from the command's start to its end, and also the ServerApp's own time
  from its first to its last exchange.

Usage::

    python -m simulations.benchmarks.federation_cost [--sites 5] [--patients 3000] [--rounds 5]
        [--local-epochs 2] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from simulations.benchmarks import emit, run_main
from simulations.benchmarks.machine import cpu_seconds


def run(*, sites: int, patients: int, rounds: int, local_epochs: int, dp: bool, seed: int = 0) -> dict[str, Any]:
    from client.cohort_store import load_cohort
    from client.site import site_dirs
    from client.vault import KeySource
    from common.cohort import concat_cohorts
    from simulations.evaluate import EvaluateSettings, run_evaluate
    from simulations.site_layout import set_layout_policy, split_cohort
    from simulations.synthetic import write_synthetic_cohort

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_synthetic_cohort(out=root / "cohort", patients=patients, seed=seed)
        split_cohort(spec_path=root / "cohort" / "spec.toml", sites=sites, by="iid", out=root / "sites", seed=seed,
                     vaults=True, show_progress=False)
        if not dp:  # the benchmark stands in for every site's officer: the non-private reference
            set_layout_policy(root / "sites", require_dp=False, test_statistics="exact")
        epochs = rounds * local_epochs
        t0, cpu0 = time.perf_counter(), cpu_seconds()
        cohort = concat_cohorts([load_cohort(d / "vault", KeySource.from_key_file(d / "key"))
                                 for d in site_dirs(root / "sites")])
        settings = EvaluateSettings(epsilon=8.0 if dp else None, epochs=epochs, patience=epochs + 1, n_boot=1,
                                    seed=seed)
        pooled_report = run_evaluate(cohort, settings, root / "pooled", source="benchmark")
        pooled_s, pooled_cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
        t0, cpu0 = time.perf_counter(), cpu_seconds()
        cmd = [sys.executable, "-m", "simulations.cli", "simulate", "--sites-dir", str(root / "sites"),
               "--out", str(root / "fed"), "--rounds", str(rounds), "--local-epochs", str(local_epochs),
               "--seed", str(seed)] + ([] if dp else ["--no-dp"])
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ,
                                                                         "GENOFED_NO_PROGRESS": "1"})
        fed_s, fed_cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-2000:])
        fed = json.loads((root / "fed" / "metrics.json").read_text())
    return {"sites": sites, "patients": patients, "rounds": rounds, "local_epochs": local_epochs, "dp": dp,
            "pooled_s": round(pooled_s, 1), "federated_command_s": round(fed_s, 1),
            "pooled_cpu_s": round(pooled_cpu, 1), "federated_cpu_s": round(fed_cpu, 1),
            "federated_serverapp_s": fed["run"]["timing"]["total_s"],
            "command_over_pooled": round(fed_s / pooled_s, 2),
            "serverapp_over_pooled": round(fed["run"]["timing"]["total_s"] / pooled_s, 2),
            "exchanges": fed["run"]["exchanges"],
            "exchange_seconds": [r.get("seconds") for r in fed["rounds"]],
            "pooled_hybrid_auc": pooled_report["models"]["hybrid"]["auc"],
            "federated_hybrid_auc": fed["models"]["hybrid"]["auc"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, default=5)
    parser.add_argument("--patients", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--dp", action="store_true", help="DP-SGD in both (epsilon 8)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result = run(sites=args.sites, patients=args.patients, rounds=args.rounds, local_epochs=args.local_epochs,
                 dp=args.dp)
    emit(result, args.json)


if __name__ == "__main__":
    run_main(main, "python -m simulations.benchmarks.federation_cost")
