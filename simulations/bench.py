"""``genofed bench NAME --out DIR``: benchmarks anyone can rerun, each a ratio against a baseline
measured in the same invocation.

Every benchmark runs its variants one after the other, ``--repeats`` times each, and reports per
variant the median of each measure over the repeats, and its ratio to the baseline variant's
median. It writes ``DIR/NAME.json`` (every repeat's raw figures too) and ``DIR/NAME.md`` (the
table the README's "Results" quotes), and prints the table.

- ``deployment``: a TLS deployment (3 SuperNodes, SuperNode authentication) running the genofed
  app; seconds per exchange beyond the slowest site's handler, a CNN round's seconds and its
  ratio to its slowest handler; stock ``flower-supernode`` (baseline) vs ``genofed supernode``.
- ``federation``: a 5-site simulation (Flower's Simulation Engine) vs pooled training of the same
  work (every model, the same total epochs): wall and CPU seconds.
- ``scale``: 5, 20, 50 and 100 simulated sites of 60 patients each (DP on): wall seconds per CNN
  round, peak memory added to the machine, KB per site per CNN round and per run; against 5 sites.
- ``dp``: seconds per epoch and peak memory of DP-SGD in each Opacus grad-sample mode vs non-DP.
- ``throughput``: training samples per second of genofed's deep model vs the same network in a
  plain PyTorch loop (baseline), and the achieved arithmetic rate vs this machine's float32
  matrix-multiply rate.
- ``predict``: ``genofed predict``'s milliseconds per patient with the models loaded (median and
  90th percentile), with and without LIME, against the four models' probabilities alone; the
  one-off load of a call and a whole CLI call.
- ``explanation``: the global explanation's precision at 10 against a synthetic cohort's planted
  truth at explanation-epsilon 1, per noise draw, with the release's weights against equal weights;
  the noise-free precision, the agreement with a pooled analysis and the top motif in the notes.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common.errors import GenofedError


class BenchError(GenofedError):
    """A benchmark could not run."""


@dataclass
class BenchResult:
    """One benchmark's variants: medians over repeats and ratios to the baseline."""

    name: str
    title: str
    baseline: str
    measures: dict[str, str]
    """Measure key -> column heading (with its unit)."""
    params: dict[str, Any]
    repeats: int
    samples: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    medians: dict[str, dict[str, float]] = field(default_factory=dict)
    ratios: dict[str, dict[str, float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    command: str = ""
    machine: dict[str, Any] = field(default_factory=dict)

    def summarise(self) -> None:
        """Medians over repeats, then each against the baseline's."""
        for variant, runs in self.samples.items():
            self.medians[variant] = {k: statistics.median(r[k] for r in runs) for k in self.measures
                                     if all(k in r for r in runs)}
        base = self.medians.get(self.baseline, {})
        for variant, med in self.medians.items():
            self.ratios[variant] = {k: round(v / base[k], 3) for k, v in med.items() if base.get(k)}

    def markdown(self) -> str:
        """The table: one row per variant, each measure as ``median (ratio to baseline)``."""
        head = "| variant | " + " | ".join(self.measures.values()) + " |"
        lines = [f"### {self.title}", "", head, "|" + "---|" * (len(self.measures) + 1)]
        for variant, med in self.medians.items():
            cells = []
            for key in self.measures:
                if key not in med:
                    cells.append("n/a")
                    continue
                ratio = self.ratios[variant].get(key)
                cells.append(f"{_fmt(med[key])}" + ("" if variant == self.baseline or ratio is None
                                                    else f" ({ratio:.2f}x)"))
            label = f"{variant} (baseline)" if variant == self.baseline else variant
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines += ["", f"Medians over {self.repeats} repeat(s); ratios against the baseline of the same run. "
                  f"Command: `{self.command}`. Machine: {self.machine.get('cpus')} CPUs, "
                  f"{self.machine.get('python')}, torch {self.machine.get('torch')}, flwr {self.machine.get('flwr')}."]
        lines += [f"- {note}" for note in self.notes]
        return "\n".join(lines) + "\n"


def _fmt(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"


def _machine() -> dict[str, Any]:
    import os
    from importlib.metadata import version

    return {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
            "torch": version("torch"), "flwr": version("flwr")}


# ---------------------------------------------------------------------------------------------
# The benchmarks


def bench_deployment(repeats: int, *, quick: bool) -> BenchResult:
    """Stock flower-supernode vs genofed supernode on the same TLS deployment (SuperLink state in memory)."""
    from simulations.benchmarks import deployment_rounds

    rounds, patients = (1, 150) if quick else (2, 300)
    result = BenchResult(
        name="deployment", title="TLS deployment, 3 SuperNodes: seconds per exchange", baseline="stock",
        measures={"beyond_handler_s": "beyond the slowest handler, median per exchange (s)",
                  "cnn_round_s": "CNN round, median (s)", "cnn_over_handler": "CNN round / its slowest handler",
                  "run_s": "whole run (s)"},
        params={"rounds": rounds, "patients": patients, "sites": 3, "dp": False}, repeats=repeats,
        notes=["The genofed app on a synthetic cohort, no DP; every exchange of the run counts (census, moments, "
               "CNN, GLM and meta rounds, the sites' own models, validation, evaluation).",
               "stock: `flower-supernode` (a fresh `flwr-clientapp` process per message); warm: `genofed supernode`."])
    for variant, warm in (("stock", False), ("warm", True)):
        for _ in range(repeats):
            res = deployment_rounds.run(rounds=rounds, patients=patients, dp=False, warm=warm, database=False)
            cnn = [r for r in res["per_exchange"] if r["phase"] == "cnn"]
            result.samples.setdefault(variant, []).append({
                "beyond_handler_s": res["overhead_median_s"], "cnn_round_s": res["cnn_round_median_s"],
                "cnn_over_handler": statistics.median(r["seconds"] / max(r["handler_s"] or 0.0, 1e-3) for r in cnn),
                "run_s": res["run_wall_s"]})
    return result


def bench_federation(repeats: int, *, quick: bool) -> BenchResult:
    """Five simulated sites vs pooled training of the same work."""
    from simulations.benchmarks import federation_cost

    params = {"sites": 5, "patients": 1000 if quick else 3000, "rounds": 2 if quick else 5, "local_epochs": 2}
    result = BenchResult(
        name="federation", title="Federation vs pooled training of the same work", baseline="pooled",
        measures={"wall_s": "wall (s)", "cpu_s": "CPU (s)"}, params=params, repeats=repeats,
        notes=["pooled: every model trained once on all sites' records (the deep model for rounds x local epochs); "
               "federated: `genofed simulate` (SuperLink, Ray, one simulated SuperNode per site), no DP.",
               "CPU: the whole machine's busy CPU seconds during each (Linux /proc/stat), so run it on an "
               "otherwise idle machine."])
    for _ in range(repeats):
        res = federation_cost.run(dp=False, **params)
        result.samples.setdefault("pooled", []).append({"wall_s": res["pooled_s"], "cpu_s": res["pooled_cpu_s"]})
        result.samples.setdefault("federated", []).append({"wall_s": res["federated_command_s"],
                                                           "cpu_s": res["federated_cpu_s"]})
    return result


def bench_scale(repeats: int, *, quick: bool) -> BenchResult:
    """5 to 100 simulated sites of the same size: wall per round, peak memory, bytes per site."""
    from simulations.benchmarks import scale

    counts = (3, 6) if quick else scale.SITES
    params = {"sites": list(counts), "patients_per_site": 60, "rounds": 2, "local_epochs": 1, "dp": True}
    result = BenchResult(
        name="scale", title="Simulated federations of 5 to 100 sites", baseline=f"{counts[0]} sites",
        measures={"round_s": "wall per CNN round (s)", "peak_mb": "peak memory (MB)",
                  "round_kb_per_site": "KB per site per CNN round", "run_kb_per_site": "KB per site per run",
                  "run_s": "whole run (s)"}, params=params, repeats=repeats,
        notes=["`genofed simulate` (Simulation Engine, 1 CPU per simulated site) on a synthetic cohort of 60 "
               "patients per site, IID, DP-SGD at epsilon 8, 2 CNN rounds of 1 local epoch, then every other phase "
               "(GLM, meta-classifier, the sites' own models, validation, evaluation).",
               "Peak memory: what the run added to the machine's memory in use (MemTotal - MemAvailable, sampled "
               "every 0.2 s): SuperLink, Ray and its workers, the ServerApp.",
               "KB: the global model down plus the update up, as Flower ships them (every object of a message, "
               "serialised), per site; per run: every exchange."])
    for _ in range(repeats):
        for sites in counts:
            res = scale.run(sites=sites, patients_per_site=params["patients_per_site"], rounds=params["rounds"])
            result.samples.setdefault(f"{sites} sites", []).append(
                {k: res[k] for k in ("round_s", "peak_mb", "round_kb_per_site", "run_kb_per_site", "run_s")})
    return result


def bench_dp(repeats: int, *, quick: bool) -> BenchResult:
    """DP-SGD per Opacus grad-sample mode vs non-DP training, each mode in a fresh process."""
    from simulations.benchmarks import dp_modes

    params = {"patients": 500 if quick else 2000, "length": 1000, "epochs": 3, "batch": 64}
    result = BenchResult(
        name="dp", title="DP-SGD per grad-sample mode vs non-DP training", baseline="none",
        measures={"epoch_s": "seconds per epoch", "peak_rss_mb": "peak memory (MB)"}, params=params,
        repeats=repeats, notes=["The default deep model, 1,000 bp one-hot; each mode in its own process (its peak "
                                "memory is its own); an epoch's time is the median of the epochs after a warm-up one."])
    for _ in range(repeats):
        for mode in dp_modes.MODES:
            res = dp_modes.run_mode(mode, **params)
            if "error" in res:
                result.notes.append(f"{mode}: failed ({res['error']})")
                continue
            result.samples.setdefault(mode, []).append({"epoch_s": res["epoch_s"], "peak_rss_mb": res["peak_rss_mb"]})
    return result


def bench_throughput(repeats: int, *, quick: bool) -> BenchResult:
    """genofed's training loop vs a plain PyTorch loop on the same network, and vs matmul peak."""
    from simulations.benchmarks import throughput

    params = {"patients": 512 if quick else 2048, "length": 1000, "batch": 64}
    result = BenchResult(
        name="throughput", title="Training throughput of the deep model", baseline="plain-pytorch",
        measures={"samples_per_s": "training samples/s", "gflops": "achieved GFLOP/s",
                  "of_matmul_peak": "share of matmul rate"}, params=params, repeats=repeats,
        notes=["The default deep model on 1,000 bp one-hot records, no DP, one epoch after a warm-up epoch.",
               "GFLOP/s: the model's forward and backward floating-point operations per sample "
               "(torch.utils.flop_counter) times samples/s; matmul rate: float32 2048 x 2048 matrix products "
               "on this machine, same run."])
    for _ in range(repeats):
        res = throughput.run(**params)
        for variant in ("plain-pytorch", "genofed"):
            result.samples.setdefault(variant, []).append(res[variant])
        result.samples.setdefault("matmul", []).append({"gflops": res["matmul_gflops"], "of_matmul_peak": 1.0})
    return result


def bench_predict(repeats: int, *, quick: bool) -> BenchResult:
    """``genofed predict`` per patient with the models loaded, the one-off load, and a whole call."""
    import tempfile

    from simulations.benchmarks import predict_latency

    params = {"sites": 2, "patients_per_site": 150 if quick else 300, "rounds": 1 if quick else 2,
              "forest_trees": 50 if quick else 200, "timed_patients": 20 if quick else 60,
              "cli_calls": 1 if quick else 3}
    result = BenchResult(
        name="predict", title="genofed predict: milliseconds per patient, models loaded", baseline="probabilities",
        measures={"median_ms": "median per patient (ms)", "p90_ms": "p90 per patient (ms)",
                  "once_ms": "once per call (ms)"}, params=params, repeats=repeats,
        notes=["A synthetic cohort over 2 sites, `genofed simulate` with DP at the defaults "
               f"({params['rounds']} CNN round(s) of 1 local epoch, {params['forest_trees']} trees), then the first "
               f"site's first {params['timed_patients']} patients, one after the other, after one untimed "
               "warm-up call.",
               "probabilities: the four final models' probabilities for the patient (the baseline); predict: what "
               "`genofed predict` computes (probabilities, TreeSHAP, the GLM's attributions, integrated gradients "
               "of the deep model, 64 steps; the global comparison when the vault holds an explanation); "
               "predict --lime: the same with LIME on the forest (1,000 perturbed records). A patient's work runs "
               "torch and the BLAS on one thread.",
               "load: open the vault, decrypt the cohort and the final models, build the model inputs, the "
               "TreeSHAP explainer and LIME's background, the libraries already imported: once per "
               "`genofed predict` call, not per patient. "
               "CLI call: the whole `genofed predict --json` process for one patient (Python start, imports, load, "
               "prediction)."])
    with tempfile.TemporaryDirectory() as tmp:
        sites = predict_latency.make_sites(Path(tmp), patients_per_site=params["patients_per_site"],
                                           rounds=params["rounds"], forest_trees=params["forest_trees"])
        for _ in range(repeats):
            res = predict_latency.run(sites_dir=sites, timed=params["timed_patients"], calls=params["cli_calls"])
            for variant in predict_latency.VARIANTS:
                result.samples.setdefault(variant, []).append(
                    {k: res[variant][k] for k in ("median_ms", "p90_ms")})
            result.samples.setdefault("load", []).append({"once_ms": res["load_ms"]})
            result.samples.setdefault("CLI call", []).append({"once_ms": statistics.median(res["cli_s"]) * 1000.0})
        result.notes.append("The vault held the run's global explanation (the comparison was timed): "
                            + ("yes." if res["global_explanation"] else "no."))
    return result


def bench_explanation(repeats: int, *, quick: bool) -> BenchResult:
    """The global explanation against the planted truth: precision at 10 per noise draw, weighted
    release vs equal weights; the noise-free figures in the notes."""
    import tempfile

    from simulations.benchmarks import explanation_recovery

    params = {"patients": 1500 if quick else 3000, "sites": 3, "explanation_epsilon": 1.0,
              **{k.replace("-", "_"): v for k, v in explanation_recovery.RUN.items()}}
    result = BenchResult(
        name="explanation", title="Global explanation: precision at 10 against the planted truth",
        baseline="equal weights",
        measures={"p10": "precision at 10, epsilon 1 (median over draws)"}, params=params, repeats=repeats,
        notes=[f"A synthetic cohort of {params['patients']} patients (seed 5) over 3 sites (IID), `genofed simulate "
               f"--no-dp --rounds {params['cnn_rounds']}` ({params['forest_trees']} trees, "
               f"{params['explanation_patients']} validation patients explained per site). Each repeat is one noise "
               "draw: every site makes a real DP explanation release of its final models at explanation-epsilon 1 "
               "(charged to its ledger), with the release's weights (weighted) or every summary at weight 1 "
               "(equal weights), and the consensus ranking's top 10 is scored against truth.json."])
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        explanation_recovery.make_run(root, patients=params["patients"])
        exact = explanation_recovery.noise_free(root)
        for i in range(repeats):
            for variant in explanation_recovery.VARIANTS:
                result.samples.setdefault(variant, []).append({"p10": explanation_recovery.noised_draw(
                    root, variant=variant, draw=i, epsilon=params["explanation_epsilon"])})
    result.notes.append(
        "Without explanation noise (the run's own explanation.json): precision at 10 of the consensus "
        f"{exact['consensus_p10']:.1f}, of the forest's ranking {exact['forest_p10']:.1f}, of the GLM's "
        f"{exact['logreg_p10']:.1f}; Spearman correlation with a pooled analysis over its top 20 "
        f"{exact['spearman_pooled_top20']:.3f}; top motif {exact['top_motif']} at bases "
        f"{'-'.join(map(str, exact['top_motif_positions']))}, planted within one mismatch: "
        f"{'yes' if exact['top_motif_planted'] else 'no'}.")
    result.notes.append("Every draw (weighted; equal weights): "
                        + "; ".join(f"{v}: " + ", ".join(f"{d['p10']:.1f}" for d in result.samples[v])
                                    for v in reversed(explanation_recovery.VARIANTS)) + ".")
    return result


BENCHES: Mapping[str, tuple[Callable[..., BenchResult], int]] = {
    "deployment": (bench_deployment, 1), "federation": (bench_federation, 1), "scale": (bench_scale, 1),
    "dp": (bench_dp, 1),
    "throughput": (bench_throughput, 3), "predict": (bench_predict, 3), "explanation": (bench_explanation, 6)}
"""Name -> (benchmark, default repeats)."""


def run_bench(name: str, out: Path, *, repeats: int | None = None, quick: bool = False,
              command: str = "") -> BenchResult:
    """Run benchmark ``name``; write ``out/NAME.json`` and ``out/NAME.md``; return the result."""
    if name not in BENCHES:
        raise BenchError(f"unknown benchmark {name!r}; choose from {', '.join(BENCHES)}")
    fn, default_repeats = BENCHES[name]
    n = repeats or default_repeats
    if n < 1:
        raise BenchError("--repeats must be at least 1")
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    result = fn(n, quick=quick)
    result.command, result.machine = command, _machine()
    result.params["quick"] = quick
    result.summarise()
    result.machine["bench_seconds"] = round(time.monotonic() - started, 1)
    (out / f"{name}.json").write_text(json.dumps(asdict(result), indent=2), encoding="utf-8")
    (out / f"{name}.md").write_text(result.markdown(), encoding="utf-8")
    return result


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``bench`` to the console script."""
    p = subparsers.add_parser("bench", help="rerunnable benchmarks: ratios against a baseline in the same run",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", choices=list(BENCHES), metavar="NAME", help="one of: " + ", ".join(BENCHES))
    p.add_argument("--out", type=Path, required=True, help="folder for NAME.json and NAME.md (created)")
    p.add_argument("--repeats", type=int, help="repeats per variant (default: deployment, federation, scale, dp 1; "
                                              "throughput, predict 3; explanation 6)")
    p.add_argument("--quick", action="store_true", help="a smaller workload (for trying it; figures not comparable)")
    p.set_defaults(func=bench_command)


def bench_command(args: argparse.Namespace) -> int:
    """Run one benchmark and print its table."""
    command = f"genofed bench {args.name} --out {args.out}" + (f" --repeats {args.repeats}" if args.repeats else "") \
        + (" --quick" if args.quick else "")
    result = run_bench(args.name, args.out, repeats=args.repeats, quick=args.quick, command=command)
    print(result.markdown())
    print(f"written: {args.out / (args.name + '.json')}, {args.out / (args.name + '.md')}")
    return 0
