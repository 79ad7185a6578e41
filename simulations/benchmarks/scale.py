"""Benchmark: a federation of 5 to 100 simulated sites, each the same size: time, memory, bytes.

For each number of sites S, a synthetic cohort of S x ``--patients-per-site`` patients is split
IID over S sites with vaults, and ``genofed simulate`` runs it with DP at the defaults
(epsilon 8) for ``--rounds`` CNN rounds of one local epoch. Measured:

- wall seconds per CNN round (the run's metrics, median over its CNN rounds) and of the whole
  command;
- peak memory the run added to the machine (``MemTotal - MemAvailable`` sampled every 0.2 s:
  the SuperLink, Ray and its workers, the ServerApp);
- bytes per site per CNN round: the global model down plus the site's update up, as Flower
  ships them (:func:`server.exchange.payload_bytes`), and per site over the whole run.

Usage::

    python -m simulations.benchmarks.scale [--sites 5,20,50,100] [--patients-per-site 60]
        [--rounds 2] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from simulations.benchmarks import emit, run_main
from simulations.benchmarks.machine import MemoryPeak

SITES = (5, 20, 50, 100)


def run(*, sites: int, patients_per_site: int, rounds: int, seed: int = 0) -> dict[str, Any]:
    """One federation of ``sites`` sites; its time per round, peak memory and bytes per site."""
    from simulations.site_layout import split_cohort
    from simulations.synthetic import write_synthetic_cohort

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_synthetic_cohort(out=root / "cohort", patients=sites * patients_per_site, seed=seed)
        split_cohort(spec_path=root / "cohort" / "spec.toml", sites=sites, by="iid", out=root / "sites", seed=seed,
                     vaults=True, show_progress=False)
        cmd = [sys.executable, "-m", "simulations.cli", "simulate", "--sites-dir", str(root / "sites"),
               "--out", str(root / "run"), "--rounds", str(rounds), "--local-epochs", "1", "--seed", str(seed),
               "--set", "forest-trees=50"]
        t0 = time.perf_counter()
        with MemoryPeak() as memory:
            proc = subprocess.run(cmd, capture_output=True, text=True,
                                  env={**os.environ, "GENOFED_NO_PROGRESS": "1"})
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"{sites} sites: " + (proc.stderr or proc.stdout)[-2000:])
        doc = json.loads((root / "run" / "metrics.json").read_text())
    cnn = [r for r in doc["rounds"] if r["phase"] == "cnn"]
    return {"sites": sites, "patients_per_site": patients_per_site, "rounds": rounds,
            "round_s": statistics.median(r["seconds"] for r in cnn),
            "peak_mb": round(memory.peak_mb, 1),
            "round_kb_per_site": statistics.median(r["bytes_down"] + r["bytes_up"] for r in cnn) / 1000,
            "run_kb_per_site": sum(r.get("bytes_down", 0) + r.get("bytes_up", 0) for r in doc["rounds"]) / 1000,
            "run_s": round(wall, 1), "exchanges": len(doc["rounds"]),
            "hybrid_auc": doc["models"]["hybrid"]["auc"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", default=",".join(map(str, SITES)), help="comma-separated site counts")
    parser.add_argument("--patients-per-site", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = [run(sites=int(s), patients_per_site=args.patients_per_site, rounds=args.rounds)
               for s in args.sites.split(",") if s.strip()]
    emit({"runs": results}, args.json)


if __name__ == "__main__":
    run_main(main, "python -m simulations.benchmarks.scale")
