"""``report.html``: the run for people who would rather look than read.

Built from ``metrics.json`` and ``pooled_stats.npz`` (the summed test statistics) alone: ROC
curves of every model on the pooled test sets, metrics with intervals, per-site results, the
privacy spend of each site over the CNN rounds, and the run's exchanges; with the global
explanation when the run wrote ``explanation.json`` (:mod:`server.report_explanation`). Figures
are inline PNGs, so the file can be mailed or archived on its own.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from common.files import write_text_atomic
from common.metrics import METRIC_NAMES, EvalStats, calibration_points, pr_points, roc_points
from common.site_names import natural_key
from server.phases import MODELS
from server.report import (
    CHARGED_PHASES,
    alone_missing_note,
    best_alone_rule,
    best_alone_words,
    bins_mark,
    convergence_notes,
    fallback_note,
    fmt,
    mean_label,
    paired_rows,
    signed,
    site_noise_note,
    unresolved_note,
    warm_start_note,
)


POOLED_STATS = "pooled_stats.npz"


def save_pooled_stats(run_dir: Path, pooled: dict[str, EvalStats]) -> None:
    """The summed test statistics (aggregates only), for the report's curves."""
    from common.durable import write_atomic

    arrays = {f"{m}.{k}": v for m, s in pooled.items() for k, v in s.to_arrays().items()}
    write_atomic(run_dir / POOLED_STATS, lambda fh: np.savez(fh, **arrays))


def load_pooled_stats(run_dir: Path) -> dict[str, EvalStats]:
    with np.load(run_dir / POOLED_STATS, allow_pickle=False) as z:
        return {m: EvalStats.from_arrays({k: z[f"{m}.{k}"] for k in ("confusion", "hist_pos", "hist_neg")})
                for m in MODELS if f"{m}.confusion" in z.files}


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish(fig: Any, ax: Any, *, legend: str) -> str:
    """The curve figures' common ending: a smaller title, the legend, and the PNG."""
    ax.title.set_fontsize(10)
    ax.legend(loc=legend, fontsize=8)
    fig.tight_layout()
    return _png(fig)


def _target(doc: dict[str, Any]) -> str:
    """The class the curves are about: the positive class of a binary problem, else class 0 vs the rest."""
    classes = doc["run"].get("classes", [])
    if len(classes) == 2:
        return str(classes[1])
    return f"{classes[0] if classes else 'class 0'} vs rest"


def _operating_point(stats: EvalStats, threshold: dict[str, Any] | None) -> tuple[float, float] | None:
    """(FPR, TPR) of a binary model at its operating threshold: patients at or above its bin are called."""
    if not threshold or stats.hist_pos.shape[0] != 2:
        return None
    b = int(threshold["bin"])
    pos, neg = np.maximum(stats.hist_pos[1], 0), np.maximum(stats.hist_neg[1], 0)
    return float(neg[b:].sum() / max(neg.sum(), 1)), float(pos[b:].sum() / max(pos.sum(), 1))


def roc_figure(pooled: dict[str, EvalStats], doc: dict[str, Any]) -> str:
    """ROC curve per model, each with its operating threshold marked (binary problems)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    for name, stats in pooled.items():
        fpr, tpr = roc_points(stats)
        line, = ax.plot(fpr, tpr, label=f"{name} (AUC {doc['models'][name]['auc']:.3f})")
        if (point := _operating_point(stats, doc.get("thresholds", {}).get(name))) is not None:
            ax.plot(*point, marker="o", color=line.get_color(), markersize=6)
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    marked = " (dots: operating thresholds)" if doc.get("thresholds") else ""
    ax.set(xlabel="false positive rate", ylabel="true positive rate",
           title=f"Pooled test ROC ({_target(doc)}){marked}")
    return _finish(fig, ax, legend="lower right")


def pr_figure(pooled: dict[str, EvalStats], doc: dict[str, Any]) -> str:
    """Precision-recall curve per model, with the class's share as the chance level."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    share = None
    for name, stats in pooled.items():
        recall, precision = pr_points(stats)
        ax.step(recall, precision, where="pre", label=f"{name} (AUPRC {doc['models'][name]['auprc']:.3f})")
        share = precision[-1] if len(precision) else share  # everyone called: precision is the class's share
    if share is not None:
        ax.axhline(share, color="grey", lw=0.8, ls="--", label="chance (class share)")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title=f"Pooled test precision-recall "
           f"({_target(doc)})")
    return _finish(fig, ax, legend="lower left")


def calibration_figure(pooled: dict[str, EvalStats], doc: dict[str, Any]) -> str:
    """Observed share of the class against predicted probability, per model (bins with 5+ patients)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    for name, stats in pooled.items():
        centre, observed, _ = calibration_points(stats, min_count=5)
        ax.plot(centre, observed, marker="o", markersize=3, lw=1, label=name)
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--", label="perfectly calibrated")
    ax.set(xlabel="predicted probability (bin centre)", ylabel="observed share of the class", xlim=(0, 1),
           ylim=(-0.02, 1.02), title=f"Calibration on pooled test data ({_target(doc)})")
    return _finish(fig, ax, legend="upper left")


def privacy_figure(doc: dict[str, Any]) -> str | None:
    """Each site's ledger total after every exchange that charged it."""
    series: dict[str, list[tuple[int, float]]] = {}
    labels: list[str] = []
    for r in doc["rounds"]:
        if r.get("phase") == "cnn":
            spent = {site: m["epsilon"] for site, m in r["sites"].items() if "epsilon" in m}
        elif r.get("phase") in CHARGED_PHASES:
            spent = dict(r.get("epsilon", {}))
        else:
            continue
        if spent:
            name = {"cnn": "CNN", "glm": "GLM"}.get(r["phase"], r["phase"])
            labels.append(f"{name} {r.get('round', '')}".strip())
            for site, eps in spent.items():
                series.setdefault(site, []).append((len(labels), eps))
    if not series:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    # Sites often spend the same: each is drawn a little to the side, with its own marker, so none hides another.
    markers = "osD^vP*Xh<>"
    width = min(0.3, 0.6 / max(len(series), 1))
    for i, (site, points) in enumerate(sorted(series.items(), key=lambda kv: natural_key(kv[0]))):
        shift = (i - (len(series) - 1) / 2) * width
        ax.plot([x + shift for x, _ in points], [y for _, y in points], marker=markers[i % len(markers)],
                markersize=4, lw=1, label=site)
    budgets = {p.get("budget") for p in doc["privacy"].values() if p.get("budget") is not None}
    for i, b in enumerate(sorted(b for b in budgets if not math.isnan(b))):
        ax.axhline(b, color="red", lw=0.8, ls="--", label="site budget" if i == 0 else None)
    ax.set_xticks(range(1, len(labels) + 1), labels, rotation=45 if len(labels) > 8 else 0, fontsize=8)
    ax.set(xlabel="exchange", ylabel="epsilon spent (site ledger)", title="Privacy spend per site")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def _metrics_table(doc: dict[str, Any]) -> str:
    head = "".join(f"<th>{m}</th>" for m in METRIC_NAMES)
    rows = []
    for name, m in doc["models"].items():
        cells = "".join(f"<td>{fmt(m[k])}<br><small>[{fmt(m['ci'][k][0])}, {fmt(m['ci'][k][1])}]"
                        f"{html.escape(bins_mark(m)) if k == 'auc' else ''}</small></td>" for k in METRIC_NAMES)
        rows.append(f"<tr><th>{name}</th>{cells}</tr>")
    return f"<table><tr><th>model</th>{head}</tr>{''.join(rows)}</table>"


def _small_note(text: str) -> str:
    """``text`` as a small paragraph ("" when there is none)."""
    return f"<p><small>{html.escape(text)}</small></p>" if text else ""


def _sites_table(doc: dict[str, Any]) -> str:
    rows = []
    for site, m in doc["sites"].items():
        aucs = "".join(f"<td>{fmt(m.get(name, {}).get('auc'))}{html.escape(bins_mark(m.get(name, {})))}</td>"
                       for name in MODELS)
        eps = doc["privacy"].get(site, {}).get("epsilon")
        counts = " / ".join(str(c) for c in (m.get("class_counts") or []))
        rows.append(f"<tr><th>{html.escape(site)}</th><td>{m.get('n', '')}</td><td>{counts}</td>{aucs}"
                    f"<td>{fmt(eps)}</td></tr>")
    head = "".join(f"<th>{name} AUC</th>" for name in MODELS)
    classes = " / ".join(html.escape(str(c)) for c in doc["run"].get("classes", []))
    secure = ("<p>No site's own AUC: with secure-sum the coordinator saw the test statistics only summed over the "
              "sites (pooled figures above).</p>" if doc.get("secure_sum") else "")
    noise = _small_note(site_noise_note(doc))
    return (f"{secure}<table><tr><th>site</th><th>test patients</th><th>test class counts ({classes})</th>{head}"
            f"<th>epsilon spent</th></tr>{''.join(rows)}</table>{noise}")


def _pooled_section(doc: dict[str, Any], pooled: Any) -> str:
    ts = doc.get("test_statistics", {})
    if not doc["models"]:
        return "<h2>Pooled test metrics</h2><p>No test statistics were released (test-statistics = none).</p>"
    bound = max(m["auc_bound"] for m in doc["models"].values())
    if ts.get("mode") == "noised":
        err = ts.get("pooled_metric_error_sd", {}).get("hybrid", {})
        bias = ts.get("pooled_metric_bias", {}).get("hybrid", {})
        how = (f"each site noised its {ts.get('bins')}-bin statistics (Gaussian, sd {ts.get('noise_std_per_site', 0):.2f} "
               f"counts, calibrated to one patient and charged to its ledger); the noise adds a standard deviation of "
               f"about {fmt(err.get('auc'))} to the hybrid's AUC and {fmt(err.get('accuracy'))} to its accuracy and "
               f"shifts them by about {fmt(bias.get('auc'))} and {fmt(bias.get('accuracy'))} (simulated by re-noising "
               f"the released statistics, which already carry the noise: the true cost is larger, see docs/privacy.md); "
               f"binning adds at most {bound:.4f} to AUC")
    else:
        how = f"counts exactly ({ts.get('bins', '')} bins, released exact by the sites' policies); AUC within {bound:.4f}"
    return (f"<h2>Pooled test metrics (95% intervals)</h2>{_metrics_table(doc)}<p><small>Pooled from the sites' summed "
            f"test statistics: {html.escape(how)}.</small></p>{_roles_and_decisions(doc)}"
            f'<img alt="ROC curves" src="data:image/png;base64,{roc_figure(pooled, doc)}">'
            f'<img alt="precision-recall curves" src="data:image/png;base64,{pr_figure(pooled, doc)}">'
            f'<img alt="calibration" src="data:image/png;base64,{calibration_figure(pooled, doc)}">'
            "<p><small>Curves and calibration from the pooled binned statistics (the sites' sums); under noised "
            "statistics they carry the noise too. Calibration shows bins holding at least 5 patients.</small></p>"
            + _paired_table(doc))


def _paired_table(doc: dict[str, Any]) -> str:
    """Model comparison with a paired test: McNemar on the sites' summed discordant counts."""
    rows = paired_rows(doc)
    if not rows:
        return ""
    pt = doc["paired_tests"]
    body = "".join(f"<tr><td>{html.escape(a)}</td><td>{b}</td><td>{c}</td><td>{p}</td></tr>" for a, b, c, p in rows)
    return ("<h3>Model comparison (paired, same patients)</h3><table><tr><th>comparison</th><th>only the hybrid "
            f"right</th><th>only the other right</th><th>p</th></tr>{body}</table><p><small>"
            f"{html.escape(pt['test'])}, from the sites' summed {html.escape(pt['counts'])}. No patient's "
            "prediction left a site: each released how many of its test patients one model classified right and the "
            "other wrong.</small></p>")


def _roles_and_decisions(doc: dict[str, Any]) -> str:
    """What each row is (local models labelled), the operating thresholds, and fits that did not converge."""
    roles = "".join(f"<li><b>{html.escape(m)}</b>: {html.escape(r)}</li>" for m, r in doc.get("model_roles", {}).items())
    th = doc.get("thresholds", {})
    decisions = ("Decisions at each model's operating threshold (" + html.escape(next(iter(th.values()))["rule"]) + "): "
                 + ", ".join(f"{html.escape(m)} p &ge; {t['probability']:.3f}" for m, t in th.items())
                 + "; AUC and AUPRC are threshold-free.") if th else "Decisions: the most probable class (argmax)."
    notes = "".join(f"<li>{html.escape(note[0].upper() + note[1:])}</li>" for note in convergence_notes(doc))
    notes += "".join(f"<li>{html.escape(note[0].upper() + note[1:])}</li>"
                     for note in (fallback_note(doc), unresolved_note(doc)) if note)
    return f"<ul>{roles}{notes}</ul><p><small>{decisions}</small></p>"


def _site_alone_section(doc: dict[str, Any]) -> str:
    """Site alone vs federated: each site's own models against the federated hybrid, with class counts."""
    sa = doc.get("site_alone") or {}
    if not sa:
        return ""
    missing = html.escape(alone_missing_note(sa))
    if not sa["sites"]:
        return f"<h2>What federation bought</h2><p>No site trained its models alone. {missing}</p>"
    classes = doc["run"].get("classes", [])
    rows = []
    for site, v in sa["sites"].items():
        counts = ", ".join(f"{html.escape(str(c))} {n}" for c, n in zip(classes, v.get("class_counts") or []))
        own = "".join(f"<td>{fmt(v.get(r, {}).get('auc'))}</td>" for r in ("cnn", "forest", "logreg"))
        rows.append(f"<tr><th>{html.escape(site)}</th><td>{counts}</td>{own}<td>{html.escape(best_alone_words(v))}"
                    f"</td><td>{fmt(v['federated_auc'].get('hybrid'))}</td>"
                    f"<td>{signed(v['federated_hybrid_minus_best_alone'])}</td></tr>")
    m = sa["mean_auc"]
    rows.append(f"<tr><th>{html.escape(mean_label(sa))}</th><td></td><td>{fmt(m.get('alone_cnn'))}</td>"
                f"<td>{fmt(m.get('alone_forest'))}</td><td>{fmt(m.get('alone_logreg'))}</td>"
                f"<td>{fmt(m['best_alone'])}</td><td>{fmt(m['federated_hybrid'])}</td>"
                f"<td>{signed(m['federated_hybrid'] - m['best_alone'])}</td></tr>")
    ho = doc.get("held_out") or {}
    held = ""
    if ho:
        held = (f"<p>Held-out site <b>{html.escape(ho['site'])}</b> (did not train): federated "
                + ", ".join(f"{html.escape(k)} {fmt(v['auc'])}" for k, v in ho["federated"].items())
                + "; its own " + ", ".join(f"{html.escape(k)} {fmt(v['auc'])}" for k, v in ho["own"].items())
                + " (test AUC).</p>")
    noise = _small_note(site_noise_note(doc))
    return ("<h2>What federation bought</h2><p><small>Test AUC at each site: its own models trained on its data "
            "alone (local models, each at the site's own threshold) against the federated hybrid. "
            f"{html.escape(best_alone_rule(sa))} {missing}".rstrip() + "</small></p>"
            "<table><tr><th>site</th><th>test class counts</th><th>own deep model</th><th>own forest</th>"
            "<th>own GLM</th><th>best alone</th><th>federated hybrid</th><th>hybrid - best alone</th></tr>"
            f"{''.join(rows)}</table>{noise}{held}")


def render_run_report(run_dir: Path, *, title: str = "genofed run", preamble: str = "",
                      out: Path | None = None) -> Path:
    """Write ``out`` (default ``run_dir/report.html``) from the run's metrics and pooled statistics."""
    # Imported here: report_explanation draws with this module's figure helpers.
    from server.report_explanation import explanation_section

    doc = json.loads((run_dir / "metrics.json").read_text())
    pooled = load_pooled_stats(run_dir)
    s = doc["settings"]
    privacy_png = privacy_figure(doc)
    missing = "".join(f"<li>{html.escape(k)}: {html.escape(v)}</li>" for k, v in doc["missing_sites"].items())
    refused = "".join(f"<li>{html.escape(k)}: {html.escape(v)}</li>" for k, v in doc.get("refusals", {}).items())
    exchanges = ", ".join(f"{r['phase']} {r.get('round', '')} {r.get('seconds', 0):.1f}s".replace("  ", " ")
                          for r in doc["rounds"])
    body = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}td,th{{padding:4px 8px;border-bottom:1px solid #ddd;
text-align:left}}table{{border-collapse:collapse;margin:1em 0}}.note{{background:#eef5ff;padding:.6em 1em;
border-left:4px solid #4a7bd0}}img{{margin:.5em 1em .5em 0}}</style></head><body>
<h1>{html.escape(title)}</h1>{preamble}
<p>Run <code>{html.escape(doc['run']['run_id'])}</code>: {len(doc['sites'])} sites, {s['cnn_rounds']} CNN rounds
({html.escape(s['strategy'])}, {s['local_epochs']} local epoch(s) each), {doc['run']['exchanges']} exchanges,
{doc['run']['timing']['total_s']:.1f} s. {'DP-SGD target epsilon ' + str(s['epsilon']) + ' per site.' if s['dp'] else 'No differential privacy.'}</p>
{_pooled_section(doc, pooled)}
{f'<img alt="privacy spend" src="data:image/png;base64,{privacy_png}">' if privacy_png else ''}
<h2>Per site</h2>{_sites_table(doc)}
{_site_alone_section(doc)}
{explanation_section(run_dir, run_id=doc['run']['run_id'])}
{f'<h2>Sites that left the run</h2><ul>{missing}</ul>' if missing else ''}
{f'<h2>Refused by the sites (their own privacy policies)</h2><ul>{refused}</ul>' if refused else ''}
<h2>Privacy</h2><p class="note">{html.escape(doc['privacy_note'])}</p>
{f'<p class="note">{html.escape(warm_start_note(doc))}</p>' if warm_start_note(doc) else ''}
<h2>Exchanges</h2><p><small>{html.escape(exchanges)}</small></p>
</body></html>"""
    out = out or run_dir / "report.html"
    write_text_atomic(out, body)
    return out
