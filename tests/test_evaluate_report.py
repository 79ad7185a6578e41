"""``genofed evaluate``'s report.html and its paired tests of the hybrid against each base model."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from common.metrics import Threshold, choose_threshold, compute_metrics, compute_stats
from simulations.cli import main
from simulations.evaluate import decisions, split_paired_tests
from simulations.evaluate_report import is_evaluate_folder, render_evaluate_report
from simulations.synthetic import write_synthetic_cohort

PAIRS = ("hybrid_vs_cnn", "hybrid_vs_forest", "hybrid_vs_logreg")
IMAGES = ("ROC curves", "precision-recall curves", "calibration", "AUC differences")


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One small non-DP evaluation through the command line (as tests/test_evaluate.py sizes them)."""
    root = tmp_path_factory.mktemp("evaluate_report")
    write_synthetic_cohort(out=root / "cohort", patients=400, seed=3)
    out = root / "out"
    assert main(["evaluate", "--spec", str(root / "cohort" / "spec.toml"), "--out", str(out), "--no-dp",
                 "--epochs", "3", "--bootstrap", "20"]) == 0
    return out


def _alts(page: str) -> list[str]:
    return re.findall(r'<img alt="([^"]*)" src="data:image/png;base64,[A-Za-z0-9+/=]+"', page)


@pytest.mark.slow
def test_metrics_json_gains_paired_tests_and_keeps_its_keys(evaluated: Path) -> None:
    doc = json.loads((evaluated / "metrics.json").read_text())
    kept = {"source", "classes", "cohort", "models", "thresholds", "privacy", "details", "settings", "timing"}
    assert kept <= set(doc)
    assert set(doc["paired_tests"]) == set(PAIRS)
    hybrid = doc["models"]["hybrid"]
    for name, t in doc["paired_tests"].items():
        other = doc["models"][name.removeprefix("hybrid_vs_")]
        d, m = t["delong"], t["mcnemar"]
        assert 0.0 <= d["p"] <= 1.0 and d["se"] > 0 and d["n_pos"] + d["n_neg"] == hybrid["n"]
        # DeLong's AUCs are the raw scores' Mann-Whitney statistics: within the binned AUC's bound.
        assert abs(d["auc_a"] - hybrid["auc"]) <= hybrid["auc_bound"] + 1e-12
        assert abs(d["auc_b"] - other["auc"]) <= other["auc_bound"] + 1e-12
        assert d["difference"] == pytest.approx(d["auc_a"] - d["auc_b"])
        # McNemar's decisions are those the table's accuracy counts (the operating thresholds).
        assert m["decisions"] == "operating thresholds" and 0.0 <= m["p"] <= 1.0
        assert m["accuracy_a"] == pytest.approx(hybrid["accuracy"])
        assert m["accuracy_b"] == pytest.approx(other["accuracy"])
        assert m["first_only"] - m["second_only"] == round((m["accuracy_a"] - m["accuracy_b"]) * hybrid["n"])
    assert "Paired tests on the test split" in (evaluated / "metrics.md").read_text()


def test_report_html_has_the_paired_table_and_every_figure(evaluated: Path) -> None:
    doc = json.loads((evaluated / "metrics.json").read_text())
    page = (evaluated / "report.html").read_text()
    assert page.startswith("<!doctype html>") and "<title>genofed evaluate</title>" in page
    assert _alts(page) == list(IMAGES)
    assert "http://" not in page and "https://" not in page  # self-contained
    assert "Paired tests: the hybrid against each base model" in page and "McNemar p" in page
    for name, t in doc["paired_tests"].items():
        row = re.search(rf"<tr><th>hybrid vs {name.removeprefix('hybrid_vs_')}</th>(.*?)</tr>", page)
        assert row, name
        cells = re.findall(r"<td>([^<]*)</td>", row.group(1))
        assert f"{t['delong']['auc_a']:.3f}" == cells[0] and f"{t['delong']['difference']:+.3f}" in cells[2]
        p_cells = [cells[4], cells[9]]  # DeLong p, McNemar p
        for p, cell in zip((t["delong"]["p"], t["mcnemar"]["p"]), p_cells):
            assert cell == (f"{p:.3f}" if p >= 0.001 else f"{p:.2g}"), (name, cells)
    for model in ("hybrid", "cnn", "forest", "logreg"):
        assert f"<th>{model}</th>" in page  # the metrics table


def test_genofed_report_rebuilds_it_from_the_folder_alone(evaluated: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("metrics.json", "pooled_stats.npz"):
        shutil.copy(evaluated / name, copy / name)
    assert is_evaluate_folder(copy)
    assert main(["report", str(copy)]) == 0
    assert f"report: {copy / 'report.html'}" in capsys.readouterr().out
    rebuilt = (copy / "report.html").read_text()
    assert _alts(rebuilt) == list(IMAGES)
    # The page evaluate wrote, rebuilt from the same two files (the PNGs' bytes left out of the comparison).
    original = (evaluated / "report.html").read_text()
    assert re.sub(r"base64,[^\"]+", "", rebuilt) == re.sub(r"base64,[^\"]+", "", original)
    assert main(["report", str(copy), "--out", str(tmp_path / "other.html"), "--title", "<pooled & co>"]) == 0
    assert "<title>&lt;pooled &amp; co&gt;</title>" in (tmp_path / "other.html").read_text()


def test_text_from_the_folder_is_escaped_and_old_folders_still_render(evaluated: Path, tmp_path: Path) -> None:
    doc = json.loads((evaluated / "metrics.json").read_text())
    doc["source"] = "spec <script>alert(1)</script>"
    doc["paired_tests"]["hybrid_vs_cnn"]["delong"] = {"error": "needs <2> patients"}
    doc["reference_site_forests"] = {m: doc["models"][m] for m in ("hybrid", "forest")}  # as --sites-dir adds
    (tmp_path / "metrics.json").write_text(json.dumps(doc))
    page = render_evaluate_report(tmp_path).read_text()
    assert "<script>" not in page and "&lt;script&gt;" in page and "needs &lt;2&gt; patients" in page
    assert page.count("<tr><th>forest</th>") == 2  # the metrics table and the site-forest reference's
    # Without pooled_stats.npz (a folder from before report.html) the page says why there are no curves.
    assert "No pooled_stats.npz" in page and _alts(page) == ["AUC differences"]
    del doc["paired_tests"]
    (tmp_path / "metrics.json").write_text(json.dumps(doc))
    assert "has no paired_tests" in render_evaluate_report(tmp_path).read_text()


def test_a_federated_run_folder_is_not_taken_for_an_evaluate_folder(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert not is_evaluate_folder(tmp_path)
    (tmp_path / "metrics.json").write_text(json.dumps({"run": {"run_id": "x"}, "models": {}, "settings": {}}))
    assert not is_evaluate_folder(tmp_path)
    assert main(["report", str(tmp_path)]) == 1
    assert "no pooled_stats.npz" in capsys.readouterr().err


def test_decisions_at_a_threshold_are_those_compute_metrics_counts() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    p1 = 1 / (1 + np.exp(-(1.5 * y - 0.75 + rng.normal(0, 1, 300))))
    proba = np.column_stack([1 - p1, p1])
    for threshold in (choose_threshold(compute_stats(y, proba)), Threshold.default(), Threshold(20, 32, "test")):
        accuracy = compute_metrics(y, proba, n_classes=2, threshold=threshold)["accuracy"]
        assert np.mean(decisions(proba, threshold=threshold) == y) == pytest.approx(accuracy)
    assert (decisions(proba, threshold=None) == proba.argmax(axis=1)).all()


def test_multi_class_paired_tests_use_macro_delong_and_argmax() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 240)
    proba = {}
    for name, signal in (("hybrid", 2.0), ("cnn", 0.2), ("forest", 1.0), ("logreg", 2.0)):
        logits = signal * np.eye(3)[y] + rng.normal(0, 1, (240, 3))
        proba[name] = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    tests = split_paired_tests(y, proba, thresholds={})
    assert set(tests) == set(PAIRS)
    assert tests["hybrid_vs_cnn"]["delong"]["average"] == "macro one-vs-rest"
    assert tests["hybrid_vs_cnn"]["delong"]["p"] < 0.01
    assert tests["hybrid_vs_cnn"]["mcnemar"]["decisions"] == "argmax"
    assert tests["hybrid_vs_cnn"]["mcnemar"]["accuracy_a"] == pytest.approx(np.mean(proba["hybrid"].argmax(1) == y))
    # A test split with one patient of a class cannot carry DeLong's test: recorded, not raised.
    tiny = split_paired_tests(np.array([0, 1, 1, 1]), {m: np.tile([0.4, 0.6], (4, 1)) for m in proba},
                              thresholds={})
    assert "error" in tiny["hybrid_vs_cnn"]["delong"] and tiny["hybrid_vs_cnn"]["mcnemar"]["p"] == 1.0


def test_cross_validation_appears_when_evaluate_ran_folds(evaluated: Path, tmp_path: Path) -> None:
    doc = json.loads((evaluated / "metrics.json").read_text())
    doc["folds"] = {"k": 2, "metric": "auc", "per_fold": {m: [0.7, 0.8] for m in doc["models"]},
                    "mean": {m: 0.75 for m in doc["models"]}, "epsilon_per_fold": [],
                    "paired_tests": {name: {"mean_difference": 0.01, "pairs": 2, "wilcoxon_p": 0.5, "ttest_p": 0.0004}
                                     for name in PAIRS}}
    (tmp_path / "metrics.json").write_text(json.dumps(doc))
    page = render_evaluate_report(tmp_path).read_text()
    assert "2-fold cross-validation (test AUC)" in page and "<th>fold 2</th>" in page
    assert "hybrid vs cnn: mean difference +0.0100, Wilcoxon p = 0.500, paired t p = 0.0004" in page
