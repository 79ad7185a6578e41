"""The report's privacy statement and its site-alone table, on hand-made inputs (no run)."""

from __future__ import annotations

import math

import numpy as np

from common.metrics import compute_stats
from common.settings import RunSettings
from server.phases import RunState
from server.report import _privacy_note, _site_alone_lines, site_alone_comparison


def test_privacy_note_names_meta_statistics_only_when_they_are_released() -> None:
    public = _privacy_note(RunSettings(dp=True))  # meta-dp-rounds = 0: the stack's weights are public
    assert "no meta statistics are released" in public
    assert "meta-epsilon" not in public and "meta-classifier statistics" not in public
    fitted = _privacy_note(RunSettings(dp=True, meta_dp_rounds=2))
    assert "the meta-classifier statistics (meta-epsilon over the meta rounds) of its validation records" in fitted
    secure = _privacy_note(RunSettings(dp=True, secure_sum=True))
    assert "the GLM's statistics, the explanation" in secure and "meta-classifier's statistics" not in secure
    assert "meta-classifier's statistics" in _privacy_note(RunSettings(dp=True, secure_sum=True, meta_dp_rounds=1))


def _stats(y: list[int], p: list[float]):
    proba = np.asarray(p, dtype=float)
    return compute_stats(np.asarray(y), np.column_stack([1 - proba, proba]), n_classes=2)


def _evaluation() -> tuple[dict, RunState]:
    """Two sites: ``a`` with two classes everywhere; ``b`` whose validation and test splits hold one class."""
    good = _stats([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])   # AUC 0.75
    perfect = _stats([0, 0, 1, 1], [0.1, 0.2, 0.7, 0.8])  # AUC 1
    one_class = _stats([0, 0, 0], [0.1, 0.5, 0.9])        # no AUC
    own = {"cnn": good, "forest": perfect, "logreg": good}
    evaluation = {"sites": {"a": {"alone": own, "stats": {"hybrid": good}},
                            "b": {"alone": {r: one_class for r in own}, "stats": {"hybrid": one_class}}}}
    state = RunState(run_id="r", site_validation_auc={"a": {"cnn": 0.6, "forest": 0.9, "logreg": 0.7},
                                                      "b": {r: math.nan for r in own}})
    return evaluation, state


def test_site_alone_without_a_validation_auc_has_no_best_model_and_leaves_the_means() -> None:
    sa = site_alone_comparison(*_evaluation())
    assert sa["sites"]["a"]["best_alone"] == "forest" and sa["sites"]["a"]["best_alone_auc"] == 1.0
    b = sa["sites"]["b"]
    assert b["best_alone"] is None and math.isnan(b["best_alone_auc"])
    assert math.isnan(b["federated_hybrid_minus_best_alone"])
    # the two means are over the same site, a, not the hybrid's over a and b
    assert sa["mean_auc"] == {**sa["mean_auc"], "federated_hybrid": 0.75, "best_alone": 1.0, "sites_compared": 1}


def test_site_alone_table_says_n_a_where_a_site_has_no_figure() -> None:
    sa = site_alone_comparison(*_evaluation())
    md = "\n".join(_site_alone_lines({"run": {"classes": ["control", "case"]}, "site_alone": sa}))
    row_b = next(line for line in md.splitlines() if line.startswith("| b |"))
    assert row_b.endswith("| n/a | n/a | n/a |") and "nan" not in row_b
    assert "| mean over sites (best alone and hybrid: the 1 of 2 sites with both figures) |" in md
    assert "| 1.000 | 0.750 | -0.250 |" in md
