"""The global explanation in ``report.html`` and ``metrics.md``, from a hand-written ``explanation.json``.

The run folder is made by hand (``metrics.json`` and ``pooled_stats.npz`` of made-up predictions),
so these tests draw the page without running a federation.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from common.metrics import METRIC_NAMES, compute_stats, metrics_from_stats
from server.explanation_doc import EXPLANATION, explanation_markdown, read_explanation
from server.report import render_markdown
from server.report_html import render_run_report, save_pooled_stats

ODD_LABEL = 'clinical:<b>"dose"&co</b>'
"""A clinical variable's spec name is the site's words: the page must show it as text, never as markup."""


def write_minimal_run(run_dir: Path, *, seed: int = 0) -> dict[str, Any]:
    """A run folder with just what ``report.html`` is made from: ``metrics.json`` and ``pooled_stats.npz``.

    Made-up predictions of one model on 200 patients, no DP, exact test statistics.
    """
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 200)
    p = np.clip(0.5 + 0.3 * (y - 0.5) + rng.normal(0, 0.2, 200), 0, 1)
    stats = compute_stats(y, p)
    m = metrics_from_stats(stats)
    doc = {"run": {"run_id": "ab12cd34ef56", "exchanges": 5, "timing": {"total_s": 1.0},
                   "classes": ["control", "case"]},
           "settings": {"cnn_rounds": 2, "strategy": "fedavg", "local_epochs": 1, "dp": False, "epsilon": 10.0},
           "models": {"hybrid": {**m, "ci": {k: [m[k], m[k]] for k in METRIC_NAMES}}},
           "sites": {}, "privacy": {}, "missing_sites": {}, "rounds": [],
           "test_statistics": {"mode": "exact", "bins": 20}, "privacy_note": "No differential privacy."}
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.json").write_text(json.dumps(doc))
    save_pooled_stats(run_dir, {"hybrid": stats})
    return doc


def _features(n: int, *, output: str = "case", seed: int = 0) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    labels = [f"variant#{i}" for i in range(1, n - 3)] + ["clinical:age", "kmer:ACG", ODD_LABEL, "clinical:cost$"]
    importance = sorted(rng.uniform(0.001, 0.05, n), reverse=True)
    return [{"feature": f, "kind": f.split(":")[0].split("#")[0], "index": i + 1, "output": output,
             "importance": float(v), "mean": float(rng.normal(0, 0.01)), "rank": i + 1}
            for i, (f, v) in enumerate(zip(labels[::-1], importance))]  # the odd labels rank first


def fake_explanation(*, length: int = 60) -> dict[str, Any]:
    """An explanation of a binary run, following docs/explanations.md (format genofed-explanation, version 1)."""
    rng = np.random.default_rng(1)
    features = _features(20)
    motifs = [{"output": "case", "kmer": kmer, "score": score, "positions": [10 * i + 1, 10 * i + 15], "bin": i,
               "matrix": rng.uniform(0, 1, (6, 4)).round(3).tolist()}
              for i, (kmer, score) in enumerate([("GACGTC", 0.41), ("TTGACA", 0.3), ("CCGCGG", 0.2), ("AAAAAA", 0.1)])]
    return {"format": "genofed-explanation", "version": 1, "run_id": "ab12cd34ef56", "classes": ["control", "case"],
            "outputs": ["case"], "noised": True, "epsilon": 1.0, "delta": 1e-5, "clip": 1.0, "patients": 450,
            "sites": {f"site-{i}": {"patients": 150, "epsilon": 7.9, "noise_sd": 0.3} for i in (1, 2, 3)},
            "features": features,
            "models": {"forest": {"scale": "probability", "features": features},
                       "logreg": {"scale": "log-odds", "features": _features(8, seed=2)}},
            "profiles": {"dna": {"outputs": ["case"], "length": length,
                                 "mean": rng.normal(0, 0.01, (1, length)).tolist(),
                                 "importance": np.abs(rng.normal(0, 0.02, (1, length))).tolist()}},
            "motifs": motifs, "motif_layout": {"k": 6, "bins": 4, "length": length, "canonical": False},
            "shares": {"cnn": 0.45, "forest": 0.35, "logreg": 0.20},
            "guarantee": "Each site's epsilon covers <its> patients' attributions & nothing else."}


@pytest.fixture()
def run_dir(tmp_path: Path) -> Path:
    write_minimal_run(tmp_path / "run")
    return tmp_path / "run"


def _section(page: str) -> str:
    """The page from the Explanation heading to the next section."""
    start = page.index("<h2>Explanation</h2>")
    return page[start:page.index("<h2>", start + 1)]


def test_report_draws_the_explanation(run_dir: Path) -> None:
    (run_dir / EXPLANATION).write_text(json.dumps(fake_explanation()))
    page = render_run_report(run_dir).read_text()
    section = _section(page)
    alts = re.findall(r'<img alt="([^"]*)" src="data:image/png;base64,', section)
    # the global ranking, forest and GLM SHAP, one profile (dna), three logos (at most 3 of the 4 motifs)
    assert len(alts) == 7, alts
    assert sum(a.startswith(("global ranking", "global SHAP forest", "global SHAP logreg")) for a in alts) == 3
    assert sum(a.startswith("motif logo ") for a in alts) == 3
    assert {"motif logo GACGTC (case)", "motif logo TTGACA (case)", "motif logo CCGCGG (case)"} <= set(alts)
    assert "attribution profile dna" in alts
    assert ODD_LABEL not in page and html.escape(ODD_LABEL) in section  # in the SHAP chart's alt text
    assert "&lt;its&gt; patients&#x27; attributions &amp; nothing else" in section  # the guarantee, escaped
    assert "never left the sites" in section and "variant#6" in section and "450 patients" in section
    assert "epsilon 1.0, delta 1e-05 per site" in section
    assert "45%" in section and "<th>logreg</th>" in section  # shares
    assert "could not be read" not in page
    assert page.count("<img ") == 3 + 7  # ROC, PR, calibration (no DP: no spend) and the explanation's


@pytest.mark.parametrize("content, why", [
    ("{not json", "JSONDecodeError"),
    (json.dumps({"format": "genofed-explanation", "version": 2}), "version 2"),
    (json.dumps({"format": "shap", "version": 1}), "format 'shap'"),
    (json.dumps([1, 2]), "a JSON list"),
    (json.dumps({**fake_explanation(), "features": [{"feature": "x", "output": "case"}]}), "KeyError"),
    (json.dumps({**fake_explanation(), "motifs": [{"output": "case", "kmer": "A", "score": 1, "matrix": [[1, 2]]}]}),
     "matrix must be k rows of 4"),
])
def test_a_broken_explanation_is_one_line_and_the_rest_of_the_report_renders(run_dir: Path, content: str,
                                                                              why: str) -> None:
    (run_dir / EXPLANATION).write_text(content)
    page = render_run_report(run_dir).read_text()
    section = _section(page)
    notice = re.findall(r"<p>The explanation \(explanation.json\) could not be read: ([^\n<]*)\.</p>", section)
    assert len(notice) == 1 and why in html.unescape(notice[0]), section
    assert "<img" not in section
    assert "Pooled test metrics" in page and page.count("<img ") == 3  # the run's own figures still there


def test_no_explanation_no_section(run_dir: Path) -> None:
    page = render_run_report(run_dir).read_text()
    assert "Explanation" not in page and page.count("<img ") == 3


def test_empty_parts_are_left_out(run_dir: Path) -> None:
    expl = {**fake_explanation(), "models": {}, "profiles": {}, "motifs": [], "shares": {}, "noised": False,
            "run_id": "0ther0run"}
    (run_dir / EXPLANATION).write_text(json.dumps(expl))
    section = _section(render_run_report(run_dir).read_text())
    assert section.count("<img ") == 1 and "global ranking" in section  # the global ranking's chart alone
    assert "motif" not in section.lower() and "share" not in section and "outside any guarantee" in section
    assert "this explanation is from run 0ther0run, the metrics from run ab12cd34ef56" in section


def test_delta_is_read_from_the_sites_when_the_top_has_none(run_dir: Path) -> None:
    expl = fake_explanation()
    del expl["delta"]
    expl["sites"] = {s: {**v, "delta": 1e-6} for s, v in expl["sites"].items()}
    (run_dir / EXPLANATION).write_text(json.dumps(expl))
    assert "epsilon 1.0, delta 1e-06 per site" in _section(render_run_report(run_dir).read_text())


def test_several_outputs_share_one_chart_and_logos_are_per_output(run_dir: Path) -> None:
    expl = fake_explanation()
    expl["features"] = _features(20, output="a") + _features(20, output="b", seed=3)
    expl["models"] = {}
    expl["motifs"] = [{**m, "output": out} for out in ("a", "b") for m in expl["motifs"]]
    (run_dir / EXPLANATION).write_text(json.dumps(expl))
    alts = re.findall(r'<img alt="([^"]*)"', _section(render_run_report(run_dir).read_text()))
    assert len(alts) == 1 + 1 + 6 and sum(a.startswith("motif logo ") for a in alts) == 6, alts


def test_markdown_gets_features_motifs_and_shares(run_dir: Path) -> None:
    (run_dir / EXPLANATION).write_text(json.dumps(fake_explanation()))
    doc = json.loads((run_dir / "metrics.json").read_text())
    expl, error = read_explanation(run_dir)
    md = render_markdown(doc, explanation=expl, explanation_error=error)
    top = next(line for line in md.splitlines() if line.startswith("- Top features for case"))
    listed = top.split("): ", 1)[1].split(", ")
    assert len(listed) == 10 and listed[0].startswith("clinical:cost$ ")  # the top 10, most important first
    assert all(re.fullmatch(r".+ [+0-] \d\.\d+", f) for f in listed), listed  # each with its sign and importance
    assert "- Top motifs for case (deep model): GACGTC (score 0.41, positions 1-15), TTGACA" in md
    assert "AAAAAA" not in md and "cnn 45%, forest 35%, logreg 20%" in md
    assert render_markdown(doc).count("Explanation") == 0
    assert explanation_markdown(None, "JSONDecodeError: bad") == [
        "", "Explanation: explanation.json could not be read (JSONDecodeError: bad)."]
    assert "could not be read (KeyError" in explanation_markdown({"features": [{"feature": "x"}]})[1]
