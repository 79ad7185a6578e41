"""``report.html`` of a ``genofed evaluate`` folder: the pooled reference for people who would rather look.

Built from the folder's ``metrics.json`` and ``pooled_stats.npz`` (every model's test-split
statistics, :func:`server.report_html.save_pooled_stats`) alone, so ``genofed report DIR`` can
write it again: metrics with bootstrap intervals, ROC, precision-recall and calibration curves,
the paired tests of the hybrid against each base model on the same test patients (DeLong's test of
the AUCs, McNemar's of the decisions), and with ``--folds`` the cross-validation. The figures are
drawn by :mod:`server.report_html`'s helpers and embedded as PNGs: the file stands alone.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

from common.files import write_text_atomic

EVALUATE_KEYS = ("source", "cohort", "models", "settings")
"""Top-level keys of an evaluate ``metrics.json`` (a federated run's has ``run`` instead of ``source``)."""
CALIBRATION_BINS = 16
"""Bins of the calibration figure: a test split of a few hundred patients leaves the statistics' 2,048
bins with one or two patients each (the curves keep them all)."""
ALPHA = 0.05
"""The level at which the page names the better model of a comparison."""
STYLE = """body{font-family:sans-serif;max-width:1100px;margin:2em auto}td,th{padding:4px 8px;
border-bottom:1px solid #ddd;text-align:left}table{border-collapse:collapse;margin:1em 0}.note{background:#eef5ff;
padding:.6em 1em;border-left:4px solid #4a7bd0}img{margin:.5em 1em .5em 0}"""


def is_evaluate_folder(folder: Path) -> bool:
    """Whether ``folder/metrics.json`` has the layout ``genofed evaluate`` writes."""
    try:
        doc = json.loads((folder / "metrics.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and all(key in doc for key in EVALUATE_KEYS) and "run" not in doc


def render_evaluate_report(folder: Path, *, title: str = "genofed evaluate", out: Path | None = None) -> Path:
    """Write ``out`` (default ``folder/report.html``) from the folder's metrics and test statistics.

    Parameters
    ----------
    folder : the ``--out`` folder of ``genofed evaluate``.
    title : the page's title.
    out : the HTML file to write.

    Returns
    -------
    Path
        The file written.
    """
    from server.report_html import POOLED_STATS, load_pooled_stats

    doc = json.loads((folder / "metrics.json").read_text())
    pooled = load_pooled_stats(folder) if (folder / POOLED_STATS).is_file() else None
    body = "".join([f"<h1>{html.escape(title)}</h1>", _summary(doc), _metrics_section(doc),
                    _curves_section(doc, pooled), _paired_section(doc), _folds_section(doc), _privacy_section(doc)])
    out = out or folder / "report.html"
    write_text_atomic(out, page(title=title, body=body))
    return out


def page(*, title: str, body: str) -> str:
    """A self-contained HTML page around ``body`` (``title`` is escaped here)."""
    return (f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style></head><body>\n{body}\n</body></html>\n")


def _img(alt: str, png: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{png}">'


def _fmt(x: Any) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def _fmt_p(p: Any) -> str:
    """A p-value: three decimals, or two significant digits below 0.001."""
    return _fmt(p) if p is None or math.isnan(p) or p >= 0.001 else f"{p:.2g}"


def _summary(doc: dict[str, Any]) -> str:
    c = doc["cohort"]
    splits = ", ".join(f"{html.escape(s)} {n}" for s, n in c["splits"].items())
    classes = ", ".join(html.escape(str(k)) for k in doc.get("classes", []))
    seconds = doc.get("timing", {}).get("total_s")
    took = f" in {seconds:.1f} s" if isinstance(seconds, (int, float)) else ""
    return (f"<p>Every model trained on pooled data ({html.escape(str(doc['source']))}){took}: the reference "
            f"the federation is judged by. {c['patients']} patients ({splits}); classes {classes}.</p>")


def _metrics_section(doc: dict[str, Any]) -> str:
    from server.report_html import _metrics_table

    ref = doc.get("reference_site_forests")
    reference = ("<h3>With each site's own forest and GLM</h3><p><small>The deep model and GLM pooled, each site's "
                 "forest and GLM trained on its own train split and scoring its own patients, the meta-classifier "
                 "over the four: what a federation can reach when a site's own models never leave it.</small></p>"
                 + _metrics_table({"models": ref}) if ref else "")
    return (f"<h2>Test metrics (bootstrap 95% intervals)</h2>{_metrics_table(doc)}"
            f"<p><small>{_decisions(doc)}</small></p>{reference}")


def _decisions(doc: dict[str, Any]) -> str:
    th = doc.get("thresholds") or {}
    if not th:
        return "Decisions: the most probable class (argmax). AUC and AUPRC are threshold-free."
    rule = html.escape(str(next(iter(th.values())).get("rule", "")))
    return (f"Decisions at each model's operating threshold ({rule}): "
            + ", ".join(f"{html.escape(m)} p &ge; {t['probability']:.3f}" for m, t in th.items())
            + ". AUC and AUPRC are threshold-free.")


def _curves_section(doc: dict[str, Any], pooled: dict[str, Any] | None) -> str:
    from common.metrics import coarsen_stats
    from server.report_html import calibration_figure, pr_figure, roc_figure

    if not pooled:
        return ("<h2>Curves</h2><p>No pooled_stats.npz in this folder (written by genofed evaluate since report.html "
                "was added): run genofed evaluate again for the curves.</p>")
    view = {**doc, "run": {"classes": doc.get("classes", [])}}  # the figure helpers read the classes there
    pooled = {m: s for m, s in pooled.items() if m in doc["models"]}
    bins = next(iter(pooled.values())).hist_pos.shape[1]
    coarse = {m: coarsen_stats(s, n_bins=CALIBRATION_BINS) for m, s in pooled.items()} if bins > CALIBRATION_BINS \
        and bins % CALIBRATION_BINS == 0 else pooled
    return ("<h2>Curves on the test split</h2>"
            + _img("ROC curves", roc_figure(pooled, view)) + _img("precision-recall curves", pr_figure(pooled, view))
            + _img("calibration", calibration_figure(coarse, view))
            + f"<p><small>From the test split's statistics ({bins:,} score bins; calibration on "
              f"{coarse[next(iter(coarse))].hist_pos.shape[1]} of them, showing bins that hold at least 5 "
              "patients).</small></p>")


def _paired_section(doc: dict[str, Any]) -> str:
    tests = doc.get("paired_tests")
    if not tests:
        return ("<h2>Paired tests</h2><p>This metrics.json has no paired_tests (written before they were added): "
                "run genofed evaluate again.</p>")
    rows = "".join(_paired_row(name, t) for name, t in tests.items())
    figure = difference_figure(tests)
    k = len(tests)
    return ("<h2>Paired tests: the hybrid against each base model</h2><p><small>Both tests compare two models on "
            "the same test patients. DeLong's test (DeLong, DeLong &amp; Clarke-Pearson 1988) compares their ROC "
            "AUCs, with the covariance the shared patients induce; multi-class problems compare the macro "
            "one-vs-rest AUC. McNemar's exact test compares their decisions through the patients only one of the "
            f"two classifies right. The better model is named where p &lt; {ALPHA:g}; over {k} comparisons, "
            f"a family-wise level of {ALPHA:g} needs p &lt; {ALPHA / k:.3f} (Bonferroni). DeLong's AUCs are "
            "computed from the raw scores, so they can differ from the table's binned AUCs by at most its "
            "auc_bound.</small></p>"
            "<table><tr><th>comparison</th><th>AUC hybrid</th><th>AUC other</th><th>difference [95% CI]</th>"
            "<th>DeLong z</th><th>DeLong p</th><th>better AUC</th><th>decisions</th>"
            "<th>only hybrid right / only other right</th><th>accuracy hybrid / other</th><th>McNemar p</th>"
            f"<th>better decisions</th></tr>{rows}</table>"
            + (_img("AUC differences", figure) if figure else ""))


def _paired_row(name: str, t: dict[str, Any]) -> str:
    other = name.removeprefix("hybrid_vs_")
    d, m = t["delong"], t["mcnemar"]
    if "error" in d:
        auc = f'<td colspan="6">{html.escape(str(d["error"]))}</td>'
    else:
        lo, hi = d["difference"] - 1.96 * d["se"], d["difference"] + 1.96 * d["se"]
        auc = (f"<td>{_fmt(d['auc_a'])}</td><td>{_fmt(d['auc_b'])}</td><td>{d['difference']:+.3f} "
               f"[{lo:+.3f}, {hi:+.3f}]</td><td>{_fmt(d['z'])}</td><td>{_fmt_p(d['p'])}</td>"
               f"<td>{html.escape(better(d['p'], d['difference'], other=other))}</td>")
    counts = f"{m['first_only']} / {m['second_only']}"
    accuracy = f"{_fmt(m.get('accuracy_a'))} / {_fmt(m.get('accuracy_b'))}"
    verdict = better(m["p"], m["first_only"] - m["second_only"], other=other)
    return (f"<tr><th>hybrid vs {html.escape(other)}</th>{auc}<td>{html.escape(str(m.get('decisions', '')))}</td>"
            f"<td>{counts}</td><td>{accuracy}</td><td>{_fmt_p(m['p'])}</td><td>{html.escape(verdict)}</td></tr>")


def better(p: float | None, difference: float, *, other: str, first: str = "hybrid") -> str:
    """The better model of a comparison at :data:`ALPHA`, or that the test does not tell them apart."""
    if p is None or math.isnan(p):
        return "n/a"
    if p >= ALPHA or difference == 0:
        return f"no difference at {ALPHA:g}"
    return first if difference > 0 else other


def difference_figure(tests: dict[str, dict[str, Any]]) -> str | None:
    """The hybrid's AUC minus each base model's, with DeLong's 95% interval; None without any to draw."""
    from server.report_html import _finish, _plt

    rows = [(name.removeprefix("hybrid_vs_"), t["delong"]) for name, t in tests.items() if "error" not in t["delong"]]
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.2, 0.9 + 0.6 * len(rows)))
    y = list(range(len(rows)))
    ax.errorbar([d["difference"] for _, d in rows], y, xerr=[1.96 * d["se"] for _, d in rows], fmt="o", capsize=4,
                label="difference, 95% interval (DeLong)")
    ax.axvline(0.0, color="grey", lw=0.8, ls="--", label="no difference")
    ax.set_yticks(y, [f"hybrid - {name}" for name, _ in rows])
    ax.set_ylim(-0.8, len(rows) - 0.2 + 0.6)
    ax.set(xlabel="test AUC difference", title="Hybrid against each base model (test split)")
    return _finish(fig, ax, legend="best")


def _folds_section(doc: dict[str, Any]) -> str:
    f = doc.get("folds")
    if not f:
        return ""
    head = "".join(f"<th>fold {i + 1}</th>" for i in range(f["k"]))
    rows = "".join(f"<tr><th>{html.escape(m)}</th><td>{_fmt(f['mean'][m])}</td>"
                   + "".join(f"<td>{_fmt(x)}</td>" for x in v) + "</tr>" for m, v in f["per_fold"].items())
    tests = "".join(f"<li>{html.escape(name.replace('_vs_', ' vs '))}: mean difference {t['mean_difference']:+.4f}, "
                    f"Wilcoxon p = {_fmt_p(t['wilcoxon_p'])}, paired t p = {_fmt_p(t['ttest_p'])}</li>"
                    for name, t in f["paired_tests"].items())
    return (f"<h2>{f['k']}-fold cross-validation (test AUC)</h2><table><tr><th>model</th><th>mean</th>{head}</tr>"
            f"{rows}</table><p><small>Paired tests across folds (the folds' AUCs as pairs):</small></p>"
            f"<ul>{tests}</ul>")


def _privacy_section(doc: dict[str, Any]) -> str:
    p = doc["privacy"]
    if not p.get("dp"):
        text = "No differential privacy (--no-dp): the non-private reference."
    else:
        text = (f"Deep model trained with DP-SGD: epsilon {p['epsilon']:.3f}, delta {p['delta']:.2e} "
                f"({p['accountant']} accountant, noise multiplier {p['noise_multiplier']:.3f}, clip "
                f"{p['max_grad_norm']}); unit: one training record. The forest, GLM and meta-classifier are not DP.")
    return f'<h2>Privacy</h2><p class="note">{html.escape(text)}</p>'
