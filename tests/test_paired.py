"""Paired tests of two models on the same patients: McNemar's (counts) and DeLong's (AUCs)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from common.paired import delong_test, delong_test_proba, discordant_counts, mcnemar, predictions


# ---------------------------------------------------------------------------------------------
# McNemar


@pytest.mark.parametrize(("counts", "p"), [
    ([10, 0], 2 * 0.5 ** 10),
    ([0, 10], 2 * 0.5 ** 10),
    ([0, 0], 1.0),
    ([5, 5], 1.0),
    ([1, 0], 1.0),  # one discordant pair: 2 * 0.5 capped at 1
    ([3, 12], 2 * sum(math.comb(15, i) for i in range(4)) / 2 ** 15),
])
def test_mcnemar_exact_p_values(counts: list[int], p: float) -> None:
    out = mcnemar(counts)
    assert out["p"] == pytest.approx(p, rel=1e-12)
    assert (out["first_only"], out["second_only"]) == tuple(counts)


def test_mcnemar_agrees_with_scipy_binomtest_on_large_counts() -> None:
    from scipy.stats import binomtest

    for b, c in [(40, 60), (700, 650), (3, 2000)]:
        assert mcnemar([b, c])["p"] == pytest.approx(binomtest(b, b + c).pvalue, rel=1e-9, abs=1e-300)


def test_mcnemar_rounds_noised_counts_and_clips_negatives() -> None:
    out = mcnemar([9.6, -1.2])
    assert (out["first_only"], out["second_only"]) == (10, 0)
    assert out["p"] == pytest.approx(2 * 0.5 ** 10)


def test_discordant_counts_and_decisions() -> None:
    y = np.array([1, 1, 0, 0, 1])
    proba = np.array([[0.2, 0.8], [0.6, 0.4], [0.7, 0.3], [0.4, 0.6], [0.45, 0.55]])
    assert predictions(proba, threshold=None).tolist() == [1, 0, 0, 1, 1]
    assert predictions(proba, threshold=0.58).tolist() == [1, 0, 0, 1, 0]
    a, b = np.array([1, 1, 0, 1, 1]), np.array([1, 0, 1, 0, 0])
    assert discordant_counts(y, a, b).tolist() == [3, 1]  # a alone right on patients 2, 3 and 5; b alone on 4


# ---------------------------------------------------------------------------------------------
# DeLong


def test_delong_hand_computed_case() -> None:
    """Two positives, two negatives, one tie; every component worked out by hand.

    A: positives 0.9, 0.4; negatives 0.5, 0.1 -> V10 = (1, 0.5), V01 = (0.5, 1), AUC 0.75.
    B: positives 0.8, 0.3; negatives 0.3, 0.2 -> V10 = (1, 0.75), V01 = (0.75, 1), AUC 0.875.
    Centred differences: positives (0.125, -0.125), negatives (-0.125, 0.125): each sample variance
    is 0.03125, over 2 patients 0.015625; var = 0.03125, se = 1 / (4 sqrt 2), z = -1 / sqrt 2.
    """
    y = [1, 1, 0, 0]
    out = delong_test(y, [0.9, 0.4, 0.5, 0.1], [0.8, 0.3, 0.3, 0.2])
    assert out["auc_a"] == pytest.approx(0.75) and out["auc_b"] == pytest.approx(0.875)
    assert out["difference"] == pytest.approx(-0.125)
    assert out["se"] == pytest.approx(1 / (4 * math.sqrt(2)))
    assert out["z"] == pytest.approx(-1 / math.sqrt(2))
    assert out["p"] == pytest.approx(math.erfc(0.5))  # 2 (1 - Phi(1 / sqrt 2)) = 0.4795
    assert (out["n_pos"], out["n_neg"]) == (2, 2)


def _delong_by_definition(y: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """AUC difference and its variance from DeLong's O(m n) definition (no ranks)."""
    pos, neg = y == 1, y == 0
    comps = []
    for s in (a, b):
        psi = np.array([[1.0 if x > z else 0.5 if x == z else 0.0 for z in s[neg]] for x in s[pos]])
        comps.append((psi.mean(), psi.mean(axis=1), psi.mean(axis=0)))
    (ta, v10a, v01a), (tb, v10b, v01b) = comps
    s10 = np.cov(np.vstack([v10a, v10b]))
    s01 = np.cov(np.vstack([v01a, v01b]))
    var = (s10[0, 0] + s10[1, 1] - 2 * s10[0, 1]) / pos.sum() + (s01[0, 0] + s01[1, 1] - 2 * s01[0, 1]) / neg.sum()
    return ta - tb, var


def test_delong_matches_the_definition_and_sklearn_with_ties() -> None:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 80)
    a = np.round(y + rng.normal(0, 1, 80), 1)  # rounded: many ties
    b = np.round(0.5 * y + rng.normal(0, 1, 80), 1)
    out = delong_test(y, a, b)
    diff, var = _delong_by_definition(y, a, b)
    assert out["auc_a"] == pytest.approx(roc_auc_score(y, a)) and out["auc_b"] == pytest.approx(roc_auc_score(y, b))
    assert out["difference"] == pytest.approx(diff)
    assert out["se"] == pytest.approx(math.sqrt(var))


def test_identical_scores_give_p_one() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    s = y + rng.normal(0, 1, 200)
    out = delong_test(y, s, s)
    assert out["difference"] == 0.0 and out["p"] == 1.0
    # A monotone transformation ranks the patients identically: the same AUC, p = 1.
    assert delong_test(y, s, np.exp(s))["p"] == 1.0


def test_clearly_better_model_on_enough_patients() -> None:
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 500)
    good, weak = 2.0 * y + rng.normal(0, 1, 500), 0.3 * y + rng.normal(0, 1, 500)
    out = delong_test(y, good, weak)
    assert out["difference"] > 0.2 and out["p"] < 0.01
    assert delong_test(y, weak, good)["p"] == pytest.approx(out["p"])  # two-sided


def test_delong_p_agrees_with_a_paired_permutation_test() -> None:
    """Swapping the two models' scores patient by patient is the paired null: its p-value and DeLong's agree."""
    from scipy.stats import rankdata

    rng = np.random.default_rng(5)
    n = 300
    y = rng.integers(0, 2, n)
    a, b = 0.8 * y + rng.normal(0, 1, n), 0.6 * y + rng.normal(0, 1, n)  # close: p near 0.1, not at 0
    pos = y == 1
    m = pos.sum()

    def auc(s: np.ndarray) -> np.ndarray:  # rows of scores
        r = rankdata(s, axis=1)
        return (r[:, pos].sum(axis=1) - m * (m + 1) / 2) / (m * (n - m))

    # Percentiles rather than scores: the two models' scales differ, the swap must not reward scale.
    ra, rb = rankdata(a) / n, rankdata(b) / n
    swap = rng.random((4000, n)) < 0.5
    diffs = auc(np.where(swap, rb, ra)) - auc(np.where(swap, ra, rb))
    observed = auc(ra[None])[0] - auc(rb[None])[0]
    p_perm = float(np.mean(np.abs(diffs) >= abs(observed) - 1e-12))
    out = delong_test(y, a, b)
    assert out["difference"] == pytest.approx(observed)
    assert 0.02 < p_perm < 0.5
    assert out["p"] == pytest.approx(p_perm, abs=0.03), (out["p"], p_perm)


def test_delong_rejects_what_it_cannot_test() -> None:
    with pytest.raises(ValueError, match="binary"):
        delong_test([0, 1, 2, 1], [0.1] * 4, [0.2] * 4)
    with pytest.raises(ValueError, match="2 positives and 2 negatives"):
        delong_test([0, 0, 0, 1], [0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1])
    with pytest.raises(ValueError, match="shape"):
        delong_test([0, 0, 1, 1], [0.1, 0.2, 0.3], [0.1, 0.2, 0.3, 0.4])


def test_delong_on_probabilities_binary_is_class_one() -> None:
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 60)
    pa, pb = rng.random(60), rng.random(60)
    two_columns = delong_test_proba(y, np.column_stack([1 - pa, pa]), np.column_stack([1 - pb, pb]))
    assert two_columns == delong_test(y, pa, pb) == delong_test_proba(y, pa, pb)


def test_delong_macro_one_vs_rest_for_three_classes() -> None:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(5)
    y = rng.integers(0, 3, 300)
    logits_a = np.eye(3)[y] * 1.5 + rng.normal(0, 1, (300, 3))
    logits_b = np.eye(3)[y] * 0.3 + rng.normal(0, 1, (300, 3))
    pa, pb = (np.exp(v) / np.exp(v).sum(axis=1, keepdims=True) for v in (logits_a, logits_b))
    out = delong_test_proba(y, pa, pb)
    assert out["auc_a"] == pytest.approx(roc_auc_score(y, pa, multi_class="ovr", average="macro"))
    assert out["classes"] == [0, 1, 2] and set(out["per_class"]) == {"0", "1", "2"}
    for c, t in out["per_class"].items():
        assert t["auc_a"] == pytest.approx(roc_auc_score(y == int(c), pa[:, int(c)]))
    assert out["p"] < 0.01 and out["difference"] > 0
    # The macro difference's standard error is below the per-class ones (three classes averaged).
    assert out["se"] < min(t["se"] for t in out["per_class"].values())
    assert delong_test_proba(y, pa, pa)["p"] == 1.0


def test_delong_macro_matches_the_definition_on_a_small_case() -> None:
    """Macro variance: the per-patient components of the three one-vs-rest AUCs, averaged, then squared and summed."""
    y = np.array([0, 0, 1, 1, 2, 2, 0, 1, 2])
    rng = np.random.default_rng(6)
    pa, pb = rng.dirichlet(np.ones(3), 9), rng.dirichlet(np.ones(3), 9)
    out = delong_test_proba(y, pa, pb)
    per_class = [delong_test(y == c, pa[:, c], pb[:, c]) for c in range(3)]
    assert out["difference"] == pytest.approx(np.mean([t["difference"] for t in per_class]))
    # Independent classes would give var = sum(se_c^2) / 9; the shared patients make it differ, within the
    # Cauchy-Schwarz bound (sum of se_c / 3)^2.
    bound = sum(t["se"] for t in per_class) / 3
    assert 0 < out["se"] <= bound + 1e-12
    assert out["classes"] == [0, 1, 2]
