"""``genofed demo``: a small federated simulation on a built-in synthetic cohort, with a report.

Steps: synthesize a cohort with planted truth; split it over hospitals; validate and import each
site's files into its own encrypted vault; open every vault as the site would and authenticate
every blob; pretrain the deep model without DP on a second, public synthetic cohort (the same
biology, other people: what a consortium would take from a published study); run the federation
(census, DP-SGD CNN rounds from the pretrained weights, forests, the federated GLM and
meta-classifier, evaluation) through Flower's Simulation Engine; write ``report.html`` with the
data path and the run's results. Everything it shows was computed in this run.

Why the pretraining: at a few hundred records a hospital, DP-SGD alone leaves the deep model at
chance (docs/learning.md), and the hybrid then has nothing to add to the forest. ``--no-pretrain``
shows that run.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
from pathlib import Path
from typing import Any

from common.errors import GenofedError
from common.site_names import natural_key


class DemoError(GenofedError):
    """The demo could not run (for example its output folder already exists)."""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``genofed demo`` to the console script."""
    p = subparsers.add_parser(
        "demo", help="synthetic cohort -> encrypted site vaults -> federated simulation -> report",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="run directory to create (must not exist)")
    p.add_argument("--patients", type=int, default=4000, help="synthetic cohort size (default 4000)")
    p.add_argument("--sites", type=int, default=4, help="number of hospitals (default 4)")
    p.add_argument("--rounds", type=int, default=4, help="CNN rounds (default 4)")
    p.add_argument("--epsilon", type=float, default=8.0, help="DP-SGD target epsilon per site (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed for the cohort, the split and training (default 0)")
    p.add_argument("--public-patients", type=int, default=2000,
                   help="size of the public cohort the deep model is pretrained on (default 2000)")
    p.add_argument("--no-pretrain", action="store_true",
                   help="start the deep model from random weights (DP-SGD alone)")
    p.set_defaults(func=run_demo_command)


def run_demo_command(args: argparse.Namespace) -> int:
    """Handler of ``genofed demo``."""
    summary = run_demo(out=args.out, patients=args.patients, sites=args.sites, rounds=args.rounds,
                       epsilon=args.epsilon, seed=args.seed,
                       public_patients=0 if args.no_pretrain else args.public_patients)
    hybrid = summary["metrics"]["models"]["hybrid"]
    print(f"demo finished: {len(summary['sites'])} sites, vaults verified, schema hashes "
          f"{'agree' if summary['schema_agrees'] else 'DIFFER'}; federated hybrid test AUC {hybrid['auc']:.3f}")
    if summary.get("pretrained"):
        pre = summary["pretrained"]
        print(f"deep model: pretrained without DP on {pre['source']} (public; validation AUC "
              f"{pre['validation_auc']:.3f}), then trained with DP-SGD at the hospitals")
    print(comparison_text(summary["metrics"]))
    print(f"report:   {args.out / 'report.html'}")
    print(f"run:      {args.out / 'run'}  (metrics.json, report.html, run.log, checkpoints/)")
    print(f"sites:    {args.out / 'sites'}  (each with spec.toml, vault/ and key)")
    return 0


def comparison_text(metrics: dict[str, Any]) -> str:
    """What the run shows, in a few lines: the federated hybrid against each base model and each site alone."""
    models = metrics["models"]
    mode = metrics.get("test_statistics", {}).get("mode", "")
    lines = ["", f"test AUC, pooled over the sites (test statistics released {mode}; decisions at thresholds chosen "
             "on validation):"]
    for name, m in models.items():
        role = metrics.get("model_roles", {}).get(name, "")
        lines.append(f"  {name:11s} {m['auc']:.3f}  (recall {m['recall']:.3f}, specificity {m['specificity']:.3f})"
                     f"  {role}")
    best_base = max((n for n in models if n != "hybrid"), key=lambda n: models[n]["auc"])
    lines.append(f"  hybrid - best base model ({best_base}): {models['hybrid']['auc'] - models[best_base]['auc']:+.3f}")
    from server.report import fallback_note

    if fallback_note(metrics):
        lines.append("  note: " + fallback_note(metrics))
    alone = metrics.get("site_alone") or {}
    if alone.get("sites"):
        from server.report import alone_missing_note, best_alone_rule, best_alone_words, fmt, mean_label, signed

        lines.append("each site alone (its own deep model, forest and GLM) vs the federated hybrid, test AUC at the site. "
                     + f"{best_alone_rule(alone)} {alone_missing_note(alone)}".rstrip())
        for site, v in alone["sites"].items():
            lines.append(f"  {site:10s} best alone {best_alone_words(v)}  federated hybrid "
                         f"{fmt(v['federated_auc'].get('hybrid'))}  ({signed(v['federated_hybrid_minus_best_alone'])})")
        m = alone["mean_auc"]
        lines.append(f"  {mean_label(alone)}: best alone {fmt(m['best_alone'])}, federated hybrid "
                     f"{fmt(m['federated_hybrid'])} ({signed(m['federated_hybrid'] - m['best_alone'])})")
    return "\n".join(lines)


def run_demo(*, out: Path, patients: int, sites: int, rounds: int, epsilon: float, seed: int,
             public_patients: int = 2000) -> dict[str, Any]:
    """Run the demo into ``out`` and return the summary written to ``out/summary.json``.

    ``public_patients`` > 0: the deep model starts from weights pretrained on a public synthetic
    cohort of that size (seed ``seed + 1000``); 0: from random weights.
    """
    from client.cohort_store import inspect_vault
    from client.vault import KeySource, Vault
    from simulations import site_layout, synthetic
    from simulations.simulate import SimulationRequest, simulate

    out = Path(out)
    if out.exists():
        raise DemoError(f"{out}: already exists; give a new --out folder (the demo never overwrites a run)")
    out.mkdir(parents=True)
    synthetic.write_synthetic_cohort(out=out / "cohort", patients=patients, seed=seed)
    site_layout.split_cohort(spec_path=out / "cohort" / "spec.toml", sites=sites, by="dirichlet", alpha=5.0,
                             column=None, seed=seed, out=out / "sites", vaults=True)
    # The demo's synthetic hospitals allow exact test statistics, so that the comparison it prints is
    # measured rather than noised (at ~60 test patients a site, noise at test-epsilon 1 would swamp it).
    site_layout.set_layout_policy(out / "sites", test_statistics="exact")
    rows = []
    for site_dir in sorted((p for p in (out / "sites").iterdir() if (p / "vault").is_dir()),
                           key=lambda p: natural_key(p.name)):
        key = KeySource.from_key_file(site_dir / "key")
        verified = Vault.open(site_dir / "vault", key).verify()
        rows.append({"site": site_dir.name, "inspect": inspect_vault(site_dir / "vault", key), "verify": verified})
    run_config = {"cnn-rounds": rounds, "epsilon": epsilon, "seed": seed, "local-epochs": 2, "forest-trees": 100,
                  "test-statistics": "exact"}
    pretrained = _pretrain_on_public(out, patients=public_patients, seed=seed) if public_patients else None
    if pretrained is not None:
        run_config["init-from"] = str((out / "pretrained").resolve())
    metrics = simulate(SimulationRequest(sites_dir=out / "sites", out=out / "run", run_config=run_config))
    hashes = {r["inspect"]["cohort"]["schema_hash"] for r in rows}
    summary = {"patients": patients, "seed": seed, "sites": rows, "schema_agrees": len(hashes) == 1,
               "pretrained": pretrained, "metrics": metrics, "truth": json.loads((out / "cohort" / "truth.json").read_text())}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    _write_report(out, summary)
    return summary


def _pretrain_on_public(out: Path, *, patients: int, seed: int) -> dict[str, Any]:
    """A public synthetic cohort (same generator, other seed: other people) and the deep model
    pretrained on it without DP, in ``out/public`` and ``out/pretrained``."""
    from client.importers import import_cohort
    from common.spec import load_spec
    from simulations import synthetic
    from simulations.pretrain import pretrain

    synthetic.write_synthetic_cohort(out=out / "public", patients=patients, seed=seed + 1000)
    cohort = import_cohort(load_spec(out / "public" / "spec.toml"))
    return pretrain(cohort, out=out / "pretrained", epochs=30, batch_size=128, lr=2e-3, seed=seed,
                    source=f"a public synthetic cohort of {patients} patients, seed {seed + 1000}")


def _site_composition_png(rows: list[dict[str, Any]]) -> str:
    """A stacked bar chart of classes per site and split, as base64 PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, stacks = [], {}
    for r in rows:
        for split, part in r["inspect"]["cohort"]["splits"].items():
            labels.append(f"{r['site']}\n{split}")
            for cls, count in part["classes"].items():
                stacks.setdefault(cls, []).append(count)
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(labels)), 3.6), dpi=110)
    bottom = [0] * len(labels)
    for cls, counts in stacks.items():
        ax.bar(labels, counts, bottom=bottom, label=cls)
        bottom = [b + c for b, c in zip(bottom, counts)]
    ax.set_ylabel("patients")
    ax.set_title("Class balance per site and split (stored in each vault at import)")
    ax.legend(title="class")
    ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _pretrain_html(pretrained: dict[str, Any] | None) -> str:
    """The demo's public pretraining step, in a sentence (nothing when the demo skipped it)."""
    if not pretrained:
        return "<p>The deep model started from random weights (<code>--no-pretrain</code>).</p>"
    return (f"<h2>Public pretraining</h2><p>Before the federation, the deep model was trained without DP on "
            f"{html.escape(pretrained['source'])} ({pretrained['n_train']} training records; validation AUC "
            f"{pretrained['validation_auc']:.3f}): the same generator, other people, standing for a published "
            "study. The hospitals' DP-SGD started from those weights. Their guarantee covers their own records; "
            "the public cohort has none, which is why only public data may be used this way.</p>")


def _write_report(out: Path, summary: dict[str, Any]) -> None:
    """The demo's report: the data path, then the run's own report (same figures and tables)."""
    from server.report_html import render_run_report

    esc = html.escape
    rows_html = []
    for r in summary["sites"]:
        c = r["inspect"]["cohort"]
        splits = ", ".join(f"{k} {v['patients']}" for k, v in c["splits"].items())
        classes = ", ".join(f"{k} {v}" for k, v in c["classes"].items())
        rows_html.append(f"<tr><td>{esc(r['site'])}</td><td>{c['patients']}</td><td>{esc(classes)}</td>"
                         f"<td>{esc(splits)}</td><td><code>{esc(c['schema_hash'][:16])}</code></td>"
                         f"<td>{r['verify']['blobs']} blobs authenticated</td></tr>")
    planted = [f"{t['name']} ({t['modality']}, coefficient {t['coefficient']})"
               for t in summary["truth"]["label_model"]["terms"]]
    preamble = f"""<p>A synthetic cohort of {summary['patients']} patients (seed {summary['seed']}) was split over
{len(summary['sites'])} hospitals. Each site's files were validated and imported into its own AES-256-GCM vault, every
vault was opened with its key and every blob authenticated, and the sites then trained together through Flower's
Simulation Engine. Only model updates and aggregate statistics left the sites. The demo's hospitals allow their test
statistics to leave exact (their privacy policies say so; the default is noised), so that the comparison below is
measured, not noised.</p>
<h2>Sites and their vaults</h2>
<table><tr><th>site</th><th>patients</th><th>classes</th><th>splits</th><th>schema hash</th><th>vault</th></tr>
{''.join(rows_html)}</table>
<img alt="class balance per site" src="data:image/png;base64,{_site_composition_png(summary['sites'])}">
{_pretrain_html(summary.get("pretrained"))}
<p><small>Planted signal (truth.json): {esc('; '.join(planted[:8]))}{' ...' if len(planted) > 8 else ''}</small></p>"""
    render_run_report(out / "run", title="genofed demo", preamble=preamble, out=out / "report.html")
