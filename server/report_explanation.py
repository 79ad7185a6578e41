"""The "Explanation" section of ``report.html``: the run's global explanation, drawn.

Read from ``RUNDIR/explanation.json`` (:mod:`server.explanation_doc`): the forest's global SHAP
ranking (and the two GLMs'), the deep model's attribution profiles along each sequence track, sequence
logos of its top motifs, the meta-classifier's share per base model, and what the numbers do and do
not reveal. Figures are inline PNGs drawn with :mod:`server.report_html`'s helpers, as the rest of
the page. A broken file never breaks the page: the section then says in one line why it is missing.
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

import numpy as np

from common.explanation import BASES
from server.explanation_doc import (MALFORMED, features_by_output, motifs_by_output, positions_text,
                                    read_explanation, unreadable_reason)
from server.report_html import _finish, _plt, _png

TOP_FEATURES = 15
RAISES, LOWERS, NEITHER = "#c44e52", "#4c72b0", "#999999"
"""Bar colours by the sign of a feature's mean SHAP: raises, lowers, or leaves the output's risk."""


def _mpl(text: Any) -> str:
    """A label from the JSON as plain matplotlib text: a '$' would otherwise start mathtext (or fail to parse)."""
    return str(text).replace("$", r"\$")


def _img(alt: str, png: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{png}">'


def _colour(mean: Any) -> str:
    m = float(mean or 0.0)
    return RAISES if m > 0 else LOWERS if m < 0 else NEITHER


def _shap_panel(ax: Any, entries: list[dict[str, Any]], output: str, scale: str) -> None:
    """One output's horizontal bars, the most important feature at the top."""
    entries = entries[::-1]  # barh draws bottom-up
    ax.barh(range(len(entries)), [float(e["importance"]) for e in entries],
            color=[_colour(e.get("mean")) for e in entries])
    ax.set_yticks(range(len(entries)), [_mpl(e["feature"]) for e in entries], fontsize=7)
    ax.axvline(0, color="grey", lw=0.6)
    ax.set_xlabel(f"mean |attribution| ({_mpl(scale)})", fontsize=8)
    ax.set_title(_mpl(output), fontsize=9)


def shap_figure(entries: list[dict[str, Any]], *, title: str, scale: str, small: bool = False) -> str | None:
    """Global SHAP bar chart: the top features of each output (one panel per output), coloured by sign.

    Parameters
    ----------
    entries : feature entries of the explanation ("features" or a model's "features").
    title : the figure's title.
    scale : what the SHAP values are on ("probability", "log-odds").
    small : a smaller figure (the second model's).
    """
    from matplotlib.patches import Patch

    groups = features_by_output(entries, TOP_FEATURES)
    if not groups:
        return None
    plt = _plt()
    cols = min(len(groups), 3)
    rows = math.ceil(len(groups) / cols)
    bars = max(len(es) for es in groups.values())
    width = (4.2 if small else 5.2) if cols == 1 else (8.0 if small else 10.0)  # one panel each: side by side
    fig, axes = plt.subplots(rows, cols, figsize=(width, rows * (0.9 + (0.18 if small else 0.24) * bars)),
                             squeeze=False)
    for ax, (output, es) in zip(axes.flat, groups.items()):
        _shap_panel(ax, es, output, scale)
    for ax in list(axes.flat)[len(groups):]:
        ax.set_visible(False)
    fig.suptitle(_mpl(title), fontsize=10)
    # One legend below all panels: inside a panel it would cover bars.
    whose = _mpl(next(iter(groups))) if len(groups) == 1 else "the panel's output"
    fig.legend(handles=[Patch(color=RAISES, label=f"raises the risk of {whose}"),
                        Patch(color=LOWERS, label=f"lowers the risk of {whose}")], loc="lower center", ncol=2,
               fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.28 / fig.get_figheight(), 1, 1))
    return _png(fig)


def profile_figure(track: str, profile: dict[str, Any]) -> str | None:
    """Mean |attribution| (top) and mean signed attribution (bottom) along a track, one line per output."""
    importance = np.asarray(profile.get("importance") or [], dtype=float)
    mean = np.asarray(profile.get("mean") or [], dtype=float)
    if importance.ndim != 2 or importance.size == 0:
        return None
    outputs = [str(o) for o in profile.get("outputs") or []] or [f"output {i + 1}" for i in range(len(importance))]
    plt = _plt()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9.5, 4.4), sharex=True)
    x = np.arange(1, importance.shape[1] + 1)  # positions, 1-based as the feature labels ("pos12")
    for i, out in enumerate(outputs[:len(importance)]):
        top.plot(x, importance[i], lw=1, label=_mpl(out))
        if mean.ndim == 2 and i < len(mean):
            bottom.plot(x, mean[i], lw=1, label=_mpl(out))
    bottom.axhline(0, color="grey", lw=0.6)
    top.set(ylabel="mean |attribution|", title=f"Deep model attribution along {_mpl(track)} (integrated gradients, "
            "mean per patient)")
    bottom.set(xlabel="position", ylabel="mean signed attribution")
    top.title.set_fontsize(10)
    top.legend(fontsize=8, loc="best")
    return _finish(fig, bottom, legend="best")


def logo_figure(motif: dict[str, Any], *, with_output: bool) -> str:
    """A sequence logo of one motif's attribution mass per position and base."""
    import logomaker
    import pandas as pd

    matrix = np.asarray(motif["matrix"], dtype=float)
    if matrix.ndim != 2 or matrix.shape[1] != len(BASES) or not np.isfinite(matrix).all():
        raise ValueError(f"motif {motif.get('kmer')!r}: matrix must be k rows of 4 finite numbers (A, C, G, T)")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(3.6, 0.4 * len(matrix) + 1.2), 2.1))
    logomaker.Logo(pd.DataFrame(matrix, columns=list(BASES)), ax=ax, color_scheme="classic")
    ax.set_xticks(range(len(matrix)), [str(i + 1) for i in range(len(matrix))], fontsize=7)
    ax.set_ylabel("attribution", fontsize=8)
    where = f" ({_mpl(motif.get('output', ''))})" if with_output else ""
    ax.set_title(f"{_mpl(motif['kmer'])}{where}  score {float(motif['score']):.3g}  positions "
                 f"{_mpl(positions_text(motif))}", fontsize=9)
    fig.tight_layout()
    return _png(fig)


def _alt_top(prefix: str, entries: list[dict[str, Any]]) -> str:
    """Alt text naming the top five features, for readers who do not see the figure."""
    groups = features_by_output(entries, 5)
    return prefix + "; ".join(f"{out}: " + ", ".join(str(e["feature"]) for e in es) for out, es in groups.items())


def _features_part(expl: dict[str, Any]) -> str:
    """The consensus ranking (what the hybrid relies on), and each tabular model's own SHAP chart."""
    imgs = []
    if png := shap_figure(expl.get("features") or [], title="Global ranking: what the hybrid relies on",
                          scale="fraction of the weighted evidence"):
        imgs.append(_img(_alt_top("global ranking, top features ", expl["features"]), png))
    for name, model in (expl.get("models") or {}).items():
        if png := shap_figure(model.get("features") or [], title=f"Global SHAP: {name}", small=True,
                              scale=model.get("scale", "")):
            imgs.append(_img(_alt_top(f"global SHAP {name}, top features ", model["features"]), png))
    if not imgs:
        return ""
    noise = " The numbers are noised sums, so a small bar may be noise." if expl.get("noised", True) else ""
    return ("<h3>Which features move the risk</h3>" + "".join(imgs)
            + f"<p><small>Top {TOP_FEATURES} features per explained output. The global ranking weighs the forest's, "
            "the federated GLM's and the sites' own GLMs' importances (each as a fraction of its own total) by the "
            "meta-classifier's reliance on each model; the smaller charts are each model's own (the forest's TreeSHAP, "
            "the GLMs' exact attributions; a site's own GLM is explained relative to its own patients' mean). "
            "Bar length: mean |attribution| per patient, each patient's attributions scaled to unit length (so a "
            "fraction of that patient's explanation); colour: the sign of the mean attribution, red where it raises "
            f"the predicted risk of the output on average, blue where it lowers it.{noise}</small></p>")


def _profiles_part(expl: dict[str, Any]) -> str:
    imgs = [_img(f"attribution profile {track}", png) for track, prof in (expl.get("profiles") or {}).items()
            if (png := profile_figure(track, prof))]
    return "<h3>Where along the sequence</h3>" + "".join(imgs) if imgs else ""


def _motifs_part(expl: dict[str, Any]) -> str:
    groups = motifs_by_output(expl.get("motifs") or [])
    several = len(groups) > 1
    imgs = [_img(f"motif logo {m['kmer']} ({out})", logo_figure(m, with_output=several))
            for out, ms in groups.items() for m in ms]
    if not imgs:
        return ""
    return ("<h3>Motifs the deep model relies on</h3>" + "".join(imgs)
            + "<p><small>Sequence logos of the strongest k-mers per output: letter height is the attribution mass at "
            "each position of the k-mers within one mismatch of the motif; positions: the stretch of the track (1-based "
            "bases) that the k-mers of the motif's position bin cover.</small></p>")


def _shares_part(expl: dict[str, Any]) -> str:
    shares = expl.get("shares") or {}
    if not shares:
        return ""
    rows = "".join(f"<tr><th>{html.escape(str(name))}</th><td>{float(s):.0%}</td><td><div style=\"background:#4a7bd0;"
                   f"height:.8em;width:{max(0.0, min(float(s), 1.0)) * 200:.0f}px\"></div></td></tr>"
                   for name, s in shares.items())
    return ("<h3>Each model's share in the hybrid</h3><table><tr><th>base model</th><th>share of evidence</th><th></th>"
            f"</tr>{rows}</table>")


def _statement(expl: dict[str, Any], run_id: str) -> str:
    """What was released, under which guarantee, and what never left the sites."""
    sites = expl.get("sites") or {}
    # The format puts delta at the top; a file may carry it per site only (each site's own delta).
    deltas = {expl.get("delta")} if expl.get("delta") is not None else {s.get("delta") for s in sites.values()}
    delta = f", delta {deltas.pop()}" if len(deltas) == 1 and None not in deltas else ""
    how = (f"noised (epsilon {expl.get('epsilon')}{delta} per site, charged to each site's ledger)"
           if expl.get("noised", True) else
           "exact: this run had no differential privacy, so the explanation is outside any guarantee")
    text = (f"Global explanation from the validation splits of {expl.get('patients')} patients at {len(sites)} "
            "sites. "
            "Per-patient explanations never left the sites: each site released only sums over its patients, each "
            f"patient's attributions clipped to L2 norm {expl.get('clip')} per summary, {how}. Features a site "
            "resolves from its own files are shown by position (variant#6, omics#1, events#16) because their names "
            "stay at the sites; each site maps them back to its own names.")
    if expl.get("run_id") and run_id and expl["run_id"] != run_id:
        text += f" Note: this explanation is from run {expl['run_id']}, the metrics from run {run_id}."
    guarantee = f'<p class="note">{html.escape(str(expl["guarantee"]))}</p>' if expl.get("guarantee") else ""
    return f'<p class="note">{html.escape(text)}</p>{guarantee}'


def _section(expl: dict[str, Any], run_id: str) -> str:
    parts = (_features_part(expl), _profiles_part(expl), _motifs_part(expl), _shares_part(expl))
    return f"<h2>Explanation</h2>{_statement(expl, run_id)}{''.join(parts)}"


def explanation_section(run_dir: Path, *, run_id: str = "") -> str:
    """The page's "Explanation" section ("" when the run has no ``explanation.json``).

    Parameters
    ----------
    run_dir : the run folder.
    run_id : the run's id in ``metrics.json``, to flag an explanation left from another run.
    """
    expl, error = read_explanation(run_dir)
    if expl is not None:
        import logomaker  # here: a run without an explanation need not load it (and pandas)

        try:
            return _section(expl, run_id)
        except (*MALFORMED, logomaker.LogomakerError) as exc:
            _plt().close("all")  # a figure that failed half-drawn
            error = unreadable_reason(exc)
    if not error:
        return ""
    return f"<h2>Explanation</h2><p>The explanation (explanation.json) could not be read: {html.escape(error)}.</p>"
