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
