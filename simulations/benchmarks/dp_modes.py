"""Benchmark: seconds per epoch of DP-SGD in each Opacus grad-sample mode against non-DP training.

Every configuration trains the default deep model on the same synthetic 1,000 bp one-hot
cohort, each in its own fresh process (so the peak resident memory reported is that mode's
alone), one after the other in one invocation; ratios are against the non-DP run of the same
invocation. An epoch's time is the median over the timed epochs after one warm-up epoch.

Usage::

    python -m simulations.benchmarks.dp_modes [--patients 2000] [--length 1000] [--epochs 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from typing import Any

from simulations.benchmarks import emit, run_main

MODES = ("none", "hooks", "functorch", "ew", "ghost")

CHILD = r"""
import json, resource, statistics, sys, time, warnings
import numpy as np, torch
warnings.simplefilter("ignore")
from client.dp_training import DeepData, DPConfig, TrainConfig, train_deep_model
from common.encoders import one_hot
from common.models import DeepModelConfig, TrackShape, build_model

mode, n, length, epochs, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
rng = np.random.default_rng(0)
codes = rng.integers(0, 4, size=(n, length)).astype(np.uint8)
y = rng.integers(0, 2, n)
motif = np.array([0, 1, 2, 3, 3, 2, 1, 0])
for i in np.flatnonzero(y == 1):
    p = rng.integers(0, length - 8)
    codes[i, p:p + 8] = motif
data = DeepData(tracks=[one_hot(codes)], tabular=None, y=y)
cfg = DeepModelConfig(n_classes=2, tracks=(TrackShape("dna", 4, length),))
model = build_model(cfg, seed=0)
times = []
def on_epoch(rec, t=[time.perf_counter()]):
    now = time.perf_counter(); times.append(now - t[0]); t[0] = now
dp = None if mode == "none" else DPConfig(target_epsilon=8.0, target_delta=1e-5, total_epochs=epochs,
                                          grad_sample_mode=mode)
r = train_deep_model(model, data, config=TrainConfig(epochs=epochs, batch_size=batch, patience=epochs + 1,
                                                     max_physical_batch_size=batch * 4), dp=dp, on_epoch=on_epoch)
print(json.dumps({"mode": mode, "epoch_s": statistics.median(times[1:] or times), "epochs_s": times,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "epsilon": r.epsilon, "train_loss": r.history[-1]["train_loss"]}))
"""


def run_mode(mode: str, *, patients: int, length: int, epochs: int, batch: int) -> dict[str, Any]:
    """One configuration in a fresh process; returns its measurements (or its error)."""
    proc = subprocess.run([sys.executable, "-c", CHILD, mode, str(patients), str(length), str(epochs), str(batch)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return {"mode": mode, "error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(*, patients: int, length: int, epochs: int, batch: int) -> dict[str, Any]:
    """Every mode, then ratios against the non-DP baseline of this invocation."""
    results = [run_mode(m, patients=patients, length=length, epochs=epochs, batch=batch) for m in MODES]
    base = results[0].get("epoch_s")
    for r in results:
        if "epoch_s" in r and base:
            r["over_non_dp"] = round(r["epoch_s"] / base, 2)
    ok = [r for r in results[1:] if "epoch_s" in r]
    fastest = min(ok, key=lambda r: r["epoch_s"])["mode"] if ok else None
    return {"patients": patients, "length": length, "epochs": epochs, "batch_size": batch, "results": results,
            "fastest_dp_mode": fastest}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", type=int, default=2000, help="training records (default 2000)")
    parser.add_argument("--length", type=int, default=1000, help="sequence length in bp (default 1000)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per mode, the first is warm-up (default 3)")
    parser.add_argument("--batch-size", type=int, default=64, help="expected batch size (default 64)")
    parser.add_argument("--json", help="also write the result to this file")
    args = parser.parse_args()
    result = run(patients=args.patients, length=args.length, epochs=args.epochs, batch=args.batch_size)
    emit(result, args.json)


if __name__ == "__main__":
    run_main(main, "python -m simulations.benchmarks.dp_modes")
