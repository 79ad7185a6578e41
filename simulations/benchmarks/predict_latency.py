"""Benchmark: ``genofed predict``'s time per patient, with the models loaded, and its one-off load.

A synthetic cohort is split IID over two sites with vaults and ``genofed simulate`` runs a short
federation (DP at the defaults, every phase, ``forest-trees`` as asked), which leaves every site's
final models in its vault. Then, in this process, for the first site:

- ``load``: :func:`client.predict.load_predictor` after opening the vault: decrypt the cohort and the
  final models, cut the cohort into model inputs, build the forest's TreeSHAP explainer and LIME's
  background (what one ``genofed predict`` call does once, besides starting Python and importing
  the libraries, which are imported before it is timed);
- per patient, with the models loaded (what the time budget is about), over the site's first
  ``patients`` patients after one untimed warm-up call:

  - ``probabilities``: the four models' probabilities alone (:func:`client.site_models.model_probabilities`
    on the one patient), the baseline;
  - ``predict``: :func:`client.predict.predict_patient`, what ``genofed predict`` computes: the
    probabilities, TreeSHAP, the GLM's attributions, integrated gradients of the deep model, the
    comparison with the global explanation when the vault holds one;
  - ``predict --lime``: the same with LIME (1,000 perturbed records);
- ``CLI call``: the whole ``genofed predict --json`` process for one patient (Python start, imports,
  decryption, loading, the prediction), a few calls.

Usage::

    python -m simulations.benchmarks.predict_latency [--patients-per-site 300] [--rounds 2]
        [--forest-trees 200] [--timed 60] [--calls 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from simulations.benchmarks import emit, run_main


def make_sites(root: Path, *, patients_per_site: int, rounds: int, forest_trees: int, seed: int = 0) -> Path:
    """Two sites with vaults after a short federated run (their final models stored); returns the layout."""
    from simulations.site_layout import split_cohort
    from simulations.synthetic import write_synthetic_cohort

    write_synthetic_cohort(out=root / "cohort", patients=2 * patients_per_site, seed=seed)
    split_cohort(spec_path=root / "cohort" / "spec.toml", sites=2, by="iid", out=root / "sites", seed=seed,
                 vaults=True, show_progress=False)
    cmd = [sys.executable, "-m", "simulations.cli", "simulate", "--sites-dir", str(root / "sites"),
           "--out", str(root / "run"), "--rounds", str(rounds), "--local-epochs", "1", "--seed", str(seed),
           "--set", f"forest-trees={forest_trees}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "GENOFED_NO_PROGRESS": "1"})
    if proc.returncode != 0:
        raise RuntimeError("the federated run for the benchmark failed: " + (proc.stderr or proc.stdout)[-2000:])
    return root / "sites"


def time_load(site: Path) -> tuple[Any, float]:
    """Open the vault and load every final model once; the predictor and the seconds it took (the
    libraries already imported: a whole call's imports are in :func:`time_cli`)."""
    import importlib

    from client.predict import load_predictor
    from client.vault import KeySource, Vault

    for module in ("shap", "sklearn.ensemble", "torch", "client.cohort_store", "client.pipeline"):
        importlib.import_module(module)  # before the clock starts
    t0 = time.perf_counter()
    predictor = load_predictor(Vault.open(site / "vault", KeySource.from_key_file(site / "key")))
    return predictor, time.perf_counter() - t0


def time_patients(predictor: Any, indices: list[int], *, variant: str) -> list[float]:
    """Milliseconds per patient of one variant (``probabilities``, ``predict`` or ``predict --lime``),
    after one untimed warm-up call."""
    from client.predict import one_patient, predict_patient, torch_threads
    from client.site_models import model_probabilities

    def probabilities(i: int) -> None:
        with torch_threads(1):  # as predict_patient runs
            model_probabilities(predictor.models, one_patient(predictor.data, i), "predict")

    call = {"probabilities": probabilities,
            "predict": lambda i: predict_patient(predictor, index=i),
            "predict --lime": lambda i: predict_patient(predictor, index=i, lime=True)}[variant]
    call(indices[0])
    out = []
    for i in indices:
        t0 = time.perf_counter()
        call(i)
        out.append((time.perf_counter() - t0) * 1000.0)
    return out


def time_cli(site: Path, patient: str) -> float:
    """Seconds of one whole ``genofed predict --json`` process."""
    cmd = [sys.executable, "-m", "simulations.cli", "predict", "--vault", str(site / "vault"), "--key-file",
           str(site / "key"), "--patient", patient, "--json"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"genofed predict failed: {proc.stderr[-1000:]}")
    return seconds


VARIANTS = ("probabilities", "predict", "predict --lime")


def summary(ms: list[float]) -> dict[str, float]:
    """Median and 90th percentile of per-patient milliseconds."""
    return {"median_ms": float(np.median(ms)), "p90_ms": float(np.percentile(ms, 90))}


def run(*, sites_dir: Path, timed: int, calls: int) -> dict[str, Any]:
    """Every measure once on the first site of ``sites_dir``."""
    from client.site import site_dirs

    site = site_dirs(sites_dir)[0]
    predictor, load_s = time_load(site)
    indices = list(range(min(timed, predictor.cohort.n)))
    result: dict[str, Any] = {"site": site.name, "patients": len(indices),
                              "trees": len(predictor.models.forest.forest_),
                              "global_explanation": predictor.explanation is not None, "load_ms": load_s * 1000.0}
    for variant in VARIANTS:
        ms = time_patients(predictor, indices, variant=variant)
        result[variant] = {**summary(ms), "ms": [round(v, 2) for v in ms]}
    pid = str(predictor.cohort.patient_ids[0])
    result["cli_s"] = [time_cli(site, pid) for _ in range(calls)]
    return result


def main() -> None:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients-per-site", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--forest-trees", type=int, default=200)
    parser.add_argument("--timed", type=int, default=60, help="patients timed per variant")
    parser.add_argument("--calls", type=int, default=3, help="whole CLI calls timed")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sites = make_sites(Path(tmp), patients_per_site=args.patients_per_site, rounds=args.rounds,
                           forest_trees=args.forest_trees)
        emit(run(sites_dir=sites, timed=args.timed, calls=args.calls), args.json)


if __name__ == "__main__":
    run_main(main, "python -m simulations.benchmarks.predict_latency")

