"""Benchmark: wall time per exchange of a real TLS deployment, split into site work and the rest.

A SuperLink with TLS and SuperNode authentication and 3 SuperNodes on 127.0.0.1 (the harness of
``simulations.deployment``) run the genofed app on a small synthetic cohort, once per variant,
one after the other in the same invocation:

- ``stock``: SuperNodes as stock ``flower-supernode`` (a fresh ``flwr-clientapp`` process per
  message, Flower's own polls) and the SuperLink's state in SQLite (``--database``);
- ``warm-database``: SuperNodes as ``genofed supernode`` (warm worker, polls capped), SQLite state;
- ``warm``: ``genofed supernode`` and the SuperLink's state in memory (the harness default).

For every exchange the run's metrics give its wall time (push to last reply) and the longest time
a site spent inside its handler (decrypting its vault, training, fitting); the difference is
transport and process overhead. Each variant's medians are also given as a ratio to ``stock``.

Usage::

    python -m simulations.benchmarks.deployment_rounds [--rounds 3] [--patients 300]
        [--variants stock,warm-database,warm] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from simulations.benchmarks import emit, run_main

APP_DIR = Path(__file__).resolve().parents[2]


VARIANTS = {"stock": {"warm": False, "database": True}, "warm-database": {"warm": True, "database": True},
            "warm": {"warm": True, "database": False}}


def run(*, rounds: int, patients: int, dp: bool, warm: bool = True, database: bool = False) -> dict[str, Any]:
    from simulations.deployment import LocalDeployment
    from simulations.site_layout import set_layout_policy, split_cohort
    from simulations.synthetic import write_synthetic_cohort

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_synthetic_cohort(out=root / "cohort", patients=patients, seed=0)
        split_cohort(spec_path=root / "cohort" / "spec.toml", sites=3, by="iid", out=root / "sites", seed=0,
                     vaults=True, show_progress=False)
        if not dp:  # the benchmark stands in for every site's officer: the non-private reference
            set_layout_policy(root / "sites", require_dp=False)
        nodes = {p.name: {"vault": str(p / "vault"), "key-file": str(p / "key"), "site": p.name}
                 for p in sorted((root / "sites").iterdir()) if (p / "vault").is_dir()}
        with LocalDeployment(root / "work", sites=3, warm=warm, database=database) as dep:
            t0 = time.monotonic()
            dep.start(nodes, timeout=120.0)
            startup = time.monotonic() - t0
            cfg = {"cnn-rounds": rounds, "dp": dp, "forest-trees": 50, "run-dir": str(root / "run")}
            result = dep.run(APP_DIR, run_config=cfg, timeout=900.0)
        doc = json.loads((root / "run" / "metrics.json").read_text())
    rows = [{"phase": r["phase"], "round": r.get("round"), "seconds": r["seconds"], "handler_s": r.get("handler_s"),
             "overhead_s": round(r["seconds"] - (r.get("handler_s") or 0.0), 2)} for r in doc["rounds"]]
    cnn = [r for r in rows if r["phase"] == "cnn"]
    return {"rounds": rounds, "patients": patients, "dp": dp, "sites": 3, "startup_s": round(startup, 1),
            "run_wall_s": round(result.seconds, 1), "exchanges": len(rows), "per_exchange": rows,
            "cnn_round_median_s": statistics.median(r["seconds"] for r in cnn),
            "cnn_overhead_median_s": statistics.median(r["overhead_s"] for r in cnn),
            "overhead_median_s": statistics.median(r["overhead_s"] for r in rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--patients", type=int, default=300)
    parser.add_argument("--dp", action="store_true")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from: " + ", ".join(VARIANTS))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    results = {v: run(rounds=args.rounds, patients=args.patients, dp=args.dp, **VARIANTS[v]) for v in names}
    if "stock" in results:
        base = results["stock"]
        for res in results.values():
            res["ratio_to_stock"] = {k: round(res[k] / base[k], 3) for k in
                                     ("run_wall_s", "cnn_round_median_s", "overhead_median_s") if base[k]}
    emit({"variants": results}, args.json)


if __name__ == "__main__":
    run_main(main, "python -m simulations.benchmarks.deployment_rounds")
