"""Model inputs from a cohort, tabular preprocessing and the site forest."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from sklearn.base import clone

from client.features import deep_tracks, kmer_counts, sequence_features, tabular_frame
from client.forest import SiteForest
from client.preprocess import TabularPreprocessor, column_moments, moments_to_scaler
from common.cohort import ClinicalTable, Cohort, FeatureMatrix
from common.encoders import decode_dna, encode_dna


def small_cohort(n: int = 60, seed: int = 0) -> Cohort:
    rng = np.random.default_rng(seed)
    seqs = ["".join(rng.choice(list("ACGT"), 12)) for _ in range(n)]
    seqs[0] = "ACGTNACGTACG"
    omics = rng.normal(size=(n, 6))
    omics[3, 2] = np.nan
    numeric = rng.normal(size=(n, 2))
    numeric[5, 0] = np.nan
    cat = rng.integers(-1, 2, size=(n, 1))
    return Cohort(patient_ids=np.array([f"P{i}" for i in range(n)]), labels=rng.integers(0, 2, n),
                  classes=("a", "b"), split=np.array([0, 1, 2] * (n // 3), dtype=np.int8), schema={},
                  sequences=encode_dna(seqs, 12).codes,
                  variants=FeatureMatrix(rng.integers(-1, 3, size=(n, 5)).astype(np.int8),
                                         tuple(f"1:{i}:A:G" for i in range(5))),
                  omics=FeatureMatrix(omics, tuple(f"g{i}" for i in range(6))),
                  clinical=ClinicalTable(numeric, ("age", "bmi"), cat, ("sex",), {"sex": ("F", "M")}))


def _naive_kmers(seq: str, k: int) -> dict[str, int]:
    comp = {"A": "T", "C": "G", "G": "C", "T": "A", "N": "N"}
    counts: dict[str, int] = {}
    for s in (seq, "".join(comp[c] for c in reversed(seq))):
        for i in range(len(s) - k + 1):
            w = s[i:i + k]
            if "N" not in w:
                counts[w] = counts.get(w, 0) + 1
    return counts


@pytest.mark.parametrize("k", [1, 2, 3])
def test_kmer_counts_match_a_naive_count(k: int) -> None:
    cohort = small_cohort()
    counts = kmer_counts(cohort.sequences, k)
    names = ["".join(p) for p in itertools.product("ACGT", repeat=k)]
    for row, seq in zip(counts[:10], decode_dna(cohort.sequences[:10])):
        expected = _naive_kmers(seq, k)
        assert {m: int(c) for m, c in zip(names, row) if c} == expected


def test_tracks_and_sequence_features_shapes() -> None:
    cohort = small_cohort()
    tracks, shapes = deep_tracks(cohort)
    assert [s.name for s in shapes] == ["dna", "dosage"]
    assert tracks[0].shape == (60, 4, 12) and tracks[1].shape == (60, 2, 5)
    values, names = sequence_features(cohort.sequences, k=2)
    assert values.shape == (60, 16 + 4 * 12) and len(names) == values.shape[1]


def test_preprocessor_is_fitted_on_train_rows_only() -> None:
    cohort = small_cohort()
    frame = tabular_frame(cohort)
    train = cohort.split_mask("train")
    pre = TabularPreprocessor(n_neighbors=3).fit(frame.rows(train))
    x_test = pre.transform(frame.rows(~train))
    assert not np.isnan(x_test).any()
    imputed = pre.imputer_.transform(frame.rows(train).numeric)
    np.testing.assert_allclose(pre.mean_, imputed.mean(axis=0))
    names = pre.get_feature_names_out()
    assert len(names) == x_test.shape[1] and names[-2:].tolist() == ["clinical:sex=F", "clinical:sex=M"]
    # A missing category is an all-zero one-hot row.
    codes = frame.rows(~train).categorical[:, 0]
    np.testing.assert_array_equal(x_test[:, -2:].sum(axis=1), (codes >= 0).astype(float))


def test_preprocessor_pca_replaces_the_omics_block() -> None:
    frame = tabular_frame(small_cohort())
    pre = TabularPreprocessor(omics_pca=2).fit(frame)
    names = list(pre.get_feature_names_out())
    assert "omics:PC1" in names and not any(n.startswith("omics:g") for n in names)
    assert pre.transform(frame).shape[1] == len(names)


def test_moments_add_up_across_sites() -> None:
    x = np.random.default_rng(0).normal(size=(100, 3))
    a, b = column_moments(x[:30]), column_moments(x[30:])
    mean, std = moments_to_scaler({k: a[k] + b[k] for k in a})
    np.testing.assert_allclose(mean, x.mean(axis=0))
    np.testing.assert_allclose(std, x.std(axis=0))


def test_site_forest_estimator_contract_and_learning() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 8))
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(int)
    forest = SiteForest(n_estimators=50, random_state=0)
    assert forest.fit(x[:200], y[:200]) is forest
    assert set(forest.best_params_) == {"max_features", "min_samples_leaf"}
    assert np.mean(forest.predict(x[200:]) == y[200:]) > 0.85
    assert clone(forest).get_params() == forest.get_params()
    p1 = forest.predict_proba(x[200:])
    p2 = SiteForest(n_estimators=50, random_state=0).fit(x[:200], y[:200]).predict_proba(x[200:])
    np.testing.assert_array_equal(p1, p2)


def test_the_site_forest_keeps_the_grid_point_with_the_best_out_of_bag_auc() -> None:
    """Out-of-bag selection: every grid point's forest on the whole train split, scored by the AUC of
    its out-of-bag votes; the best forest is kept as fitted (no refit), with its votes."""
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 6))
    y = (x[:, 0] - x[:, 1] + 0.5 * rng.normal(size=300) > 0).astype(int)
    grid = {"min_samples_leaf": [150, 1]}  # leaves of half the records cannot follow the signal
    forest = SiteForest(n_estimators=60, param_grid=grid, random_state=3).fit(x, y)
    scores = {}
    for leaf in grid["min_samples_leaf"]:
        plain = RandomForestClassifier(n_estimators=60, class_weight="balanced", random_state=3, oob_score=True,
                                       min_samples_leaf=leaf).fit(x, y)
        votes = np.nan_to_num(plain.oob_decision_function_)
        voted = votes.sum(axis=1) > 0
        scores[leaf] = roc_auc_score(y[voted], votes[voted, 1])
    assert scores[1] > scores[150] + 0.05
    assert forest.best_params_ == {"min_samples_leaf": 1} and forest.selection_score_ == pytest.approx(scores[1])
    np.testing.assert_array_equal(forest.predict_proba(x), plain.predict_proba(x))
    np.testing.assert_array_equal(np.nan_to_num(forest.oob_proba_), np.nan_to_num(plain.oob_decision_function_))


def test_the_site_forest_scores_multiclass_votes_and_falls_back_without_enough_votes() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(240, 4))
    y = np.digitize(x[:, 0], [-0.5, 0.5])
    forest = SiteForest(n_estimators=40, random_state=0).fit(x, y)
    assert 0.8 < forest.selection_score_ <= 1.0 and forest.oob_proba_.shape == (240, 3)
    # One tree leaves two thirds of the records without an out-of-bag vote, here a whole class: no
    # score, and the first grid point.
    tiny = SiteForest(n_estimators=1, random_state=0).fit(x[:12], y[:12])
    assert np.isnan(tiny.selection_score_)
    assert tiny.best_params_ == {"max_features": "sqrt", "min_samples_leaf": 1}


def test_the_site_forest_can_still_choose_by_cross_validation() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 5))
    y = (x[:, 0] > 0).astype(int)
    forest = SiteForest(n_estimators=30, selection="cv", random_state=0).fit(x, y)
    assert set(forest.best_params_) == {"max_features", "min_samples_leaf"} and forest.selection_score_ > 0.8
    assert forest.oob_proba_.shape == (200, 2)
    with pytest.raises(ValueError, match="selection"):
        SiteForest(selection="holdout").fit(x, y)


def test_a_forest_pickled_before_out_of_bag_selection_still_predicts_and_says_it_chose_by_cv() -> None:
    """A vault's forest from before ``selection`` existed (chosen by CV, scored as ``cv_score_``)
    unpickles as a CV-selected forest: the same predictions, ``get_params`` and its score."""
    import pickle

    rng = np.random.default_rng(4)
    x = rng.normal(size=(120, 4))
    y = (x[:, 0] > 0).astype(int)
    forest = SiteForest(n_estimators=20, selection="cv", random_state=0).fit(x, y)
    old = dict(forest.__getstate__())
    del old["selection"]
    old["cv_score_"] = old.pop("selection_score_")
    legacy = SiteForest.__new__(SiteForest)
    legacy.__setstate__(old)
    loaded = pickle.loads(pickle.dumps(legacy))
    assert loaded.get_params()["selection"] == "cv" and loaded.selection_score_ == forest.selection_score_
    assert not hasattr(loaded, "cv_score_")
    np.testing.assert_array_equal(loaded.predict_proba(x), forest.predict_proba(x))


@pytest.mark.slow
def test_the_forest_selection_benchmark_times_and_scores_both_selections(tmp_path) -> None:
    from simulations.benchmarks.forest_selection import SELECTIONS, run
    from simulations.site_layout import split_cohort
    from simulations.synthetic import write_synthetic_cohort

    write_synthetic_cohort(out=tmp_path / "cohort", patients=300, seed=4)
    split_cohort(spec_path=tmp_path / "cohort" / "spec.toml", sites=2, by="iid", out=tmp_path / "sites", seed=0,
                 vaults=True, show_progress=False)
    result = run(sites_dir=tmp_path / "sites", seeds=(0,))
    assert [r["selection"] for r in result["runs"]] == list(SELECTIONS)
    for row in result["runs"]:
        assert row["seconds"] > 0 and 0.0 <= row["pooled_test_auc"] <= 1.0 and len(row["params"]) == 2
    assert result["speedup"] == pytest.approx(result["seconds"]["cv"] / result["seconds"]["oob"], rel=1e-2)
