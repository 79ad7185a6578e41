"""Local explanations on a site: grouping by feature, additivity, clipping and the release's noise."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays as np_arrays

from client.explain import (
    ExplanationFeatures,
    attribution_sums,
    clip_patients,
    forest_attributions,
    forest_expected_value,
    linear_attributions,
    motif_sums,
)
from client.privacy.mechanisms import attribution_sensitivity, noised_attribution_sums


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory):
    from client.importers import import_cohort
    from client.pipeline import SiteData, fit_forest, fit_tabular_preprocessor, forest_matrix
    from common.spec import load_spec
    from simulations.synthetic import write_synthetic_cohort

    root = tmp_path_factory.mktemp("explain")
    write_synthetic_cohort(out=root / "cohort", patients=400, seed=3)
    data = SiteData.from_cohort(import_cohort(load_spec(root / "cohort" / "spec.toml")))
    pre = fit_tabular_preprocessor(data)
    forest = fit_forest(data, pre, n_estimators=40)
    names = [*pre.get_feature_names_out(), *data.seq_feature_names]
    return data, forest, forest_matrix(data, "validation", pre), names


def test_categorical_columns_are_one_feature_and_others_their_own() -> None:
    feats = ExplanationFeatures.from_columns(["age", "smoker=never", "smoker=current", "ratio=a", "kmer:ACG"],
                                             categorical=["smoker"])
    assert feats.names == ("age", "smoker", "ratio=a", "kmer:ACG")
    phi = np.arange(10.0).reshape(2, 1, 5)
    np.testing.assert_array_equal(feats.group(phi), [[[0.0, 3.0, 3.0, 4.0]], [[5.0, 13.0, 8.0, 9.0]]])
    with pytest.raises(ValueError, match="attributions have 4 columns"):
        feats.group(np.zeros((1, 1, 4)))


def test_forest_attributions_grouped_by_feature_add_up_to_the_forests_probability(site) -> None:
    data, forest, x, names = site
    feats = ExplanationFeatures.from_columns(names, categorical=data.frame.categorical_names)
    assert "clinical:smoker" in feats.names and not any(n.startswith("clinical:smoker=") for n in feats.names)
    phi = feats.group(forest_attributions(forest, x, n_classes=2))
    assert phi.shape == (len(x), 1, len(feats.names))
    total = phi.sum(axis=(1, 2)) + forest_expected_value(forest, n_classes=2)[0]
    np.testing.assert_allclose(total, forest.predict_proba(x)[:, 1], atol=1e-9)


@pytest.mark.parametrize("k", [2, 3])
def test_linear_attributions_add_up_to_the_log_odds(k: int) -> None:
    from common.meta import NewtonLogisticRegression, flat_coef

    rng = np.random.default_rng(k)
    x = rng.normal(size=(60, 5))
    y = rng.integers(0, k, size=60)
    model = NewtonLogisticRegression(C=1.0).fit(x, y)
    coef = flat_coef(model)
    phi = linear_attributions(coef, x, n_classes=k)
    rows = coef.reshape(1 if k == 2 else k, 6)
    np.testing.assert_allclose(phi.sum(axis=2) + rows[:, -1], model.decision_function(x).reshape(60, -1), atol=1e-9)


@pytest.mark.parametrize(("k", "seen"), [(2, (0, 1)), (4, (0, 1, 3)), (4, (1, 3))])
def test_a_site_glms_attributions_add_up_to_its_scores_and_are_zero_for_classes_it_never_saw(
        k: int, seen: tuple[int, ...]) -> None:
    """A site's own GLM (site-logreg) may be fitted on a train split that lacks classes of the cohort."""
    from client.explain import site_glm_rows
    from common.glm import FederatedGLM

    rng = np.random.default_rng(len(seen))
    x = rng.normal(size=(80, 5))
    y = np.asarray(seen)[rng.integers(0, len(seen), size=80)]
    glm = FederatedGLM(C=1.0).fit(x, y)
    coef = site_glm_rows(glm, classes=np.unique(y), n_classes=k)
    phi = linear_attributions(coef, x, n_classes=k)
    rows = coef.reshape(1 if k == 2 else k, 6)
    score = phi.sum(axis=2) + rows[:, -1]
    own = glm.decision_function(x).reshape(80, -1)
    if k == 2:
        np.testing.assert_allclose(score, own, atol=1e-9)
    elif len(seen) == 2:  # one row: the second seen class's score against the first's
        np.testing.assert_allclose(score[:, seen[1]] - score[:, seen[0]], own[:, 0], atol=1e-9)
    else:
        np.testing.assert_allclose(score[:, list(seen)], own, atol=1e-9)
    unseen = [c for c in range(k) if c not in seen] if k > 2 else []
    assert np.all(phi[:, unseen] == 0.0)


@settings(max_examples=60, deadline=None)
@given(phi=np_arrays(np.float64, (5, 2, 4), elements=st.floats(-50, 50)),
       extra=np_arrays(np.float64, (1, 2, 4), elements=st.floats(-50, 50)),
       clip=st.floats(0.01, 10.0))
def test_one_patient_moves_the_summary_by_at_most_its_sensitivity(phi, extra, clip) -> None:
    assert np.all(np.linalg.norm(clip_patients(phi, clip=clip).reshape(5, -1), axis=1) <= clip * (1 + 1e-12))
    without = attribution_sums(phi, clip=clip)
    with_one = attribution_sums(np.concatenate([phi, extra]), clip=clip)
    moved = np.sqrt(sum(np.sum((with_one[k] - without[k]) ** 2) for k in ("signed", "abs")))
    assert moved <= attribution_sensitivity(clip) * (1 + 1e-9) + 1e-12


def test_the_noised_summary_has_the_calibrated_spread_and_no_negative_magnitudes() -> None:
    sums = {"signed": np.zeros((1, 20_000)), "abs": np.full((1, 20_000), 50.0)}
    out = noised_attribution_sums(sums, clip=0.5, noise_multiplier=2.0, rng=np.random.default_rng(0))
    assert np.std(out["signed"]) == pytest.approx(2.0 * np.sqrt(2.0) * 0.5, rel=0.03)
    assert out["abs"].min() >= 0.0
    with pytest.raises(ValueError, match="clip must be"):
        noised_attribution_sums(sums, clip=0.0, noise_multiplier=1.0, rng=np.random.default_rng(0))


@pytest.mark.parametrize("k", [2, 3])
def test_integrated_gradients_are_complete(k: int) -> None:
    """The attributions of all inputs add up to output(x) - output(0): the explained difference."""
    import torch

    from client.explain import _explained_outputs, deep_attributions, position_profile
    from common.models import DeepModelConfig, TrackShape, build_model

    cfg = DeepModelConfig(tracks=(TrackShape("dna", 4, 60),), n_tabular=5, n_classes=k)
    model = build_model(cfg, seed=k)
    rng = np.random.default_rng(k)
    dna = np.eye(4, dtype=np.float32)[rng.integers(0, 4, size=(7, 60))].transpose(0, 2, 1)
    tab = rng.normal(size=(7, 5)).astype(np.float32)
    attr = deep_attributions(model, [dna, tab], steps=512, batch_size=4)
    assert attr[0].shape == (7, 1 if k == 2 else k, 4, 60) and attr[1].shape == (7, 1 if k == 2 else k, 5)
    with torch.no_grad():
        at_x = _explained_outputs(model(torch.as_tensor(dna), torch.as_tensor(tab))).double().numpy()
        at_0 = _explained_outputs(model(torch.zeros(7, 4, 60), torch.zeros(7, 5))).double().numpy()
    total = attr[0].sum(axis=(2, 3)) + attr[1].sum(axis=2)
    np.testing.assert_allclose(total, at_x - at_0, atol=0.01 * np.abs(at_x - at_0).max())
    profile = position_profile(attr[0])
    assert profile.shape == (7, 1 if k == 2 else k, 60)
    # A one-hot track is attributed only where a base is observed.
    assert np.all(attr[0][np.broadcast_to((dna == 0)[:, None], attr[0].shape)] == 0.0)


def test_kmer_keys_and_their_reverse_complements() -> None:
    from common.explanation import MotifLayout, kmer_codes, kmer_string, reverse_complement_key

    codes = np.array([[0, 1, 2, 3, 4, 2]])  # ACGTNG
    keys, whole = kmer_codes(codes, MotifLayout(k=3, bins=2, length=6))
    assert [kmer_string(int(x), 3) for x in keys[0][:2]] == ["ACG", "CGT"] and whole[0].tolist() == [1, 1, 0, 0]
    assert kmer_string(int(reverse_complement_key(np.array([int(keys[0][0])]), 3)[0]), 3) == "CGT"
    canon, _ = kmer_codes(codes, MotifLayout(k=3, bins=2, length=6, canonical=True))
    assert canon[0][0] == canon[0][1]  # ACG and CGT are each other's reverse complement


def test_a_planted_motifs_attribution_is_read_back_with_its_position() -> None:
    """Patients carry GGATCC at position 30 and their attribution sits there: the top motif is
    that k-mer, at that position, whatever the rest of the sequence is; one patient moves the sums by
    at most the clip."""
    from common.explanation import MotifLayout, top_motifs

    rng = np.random.default_rng(0)
    n, length = 50, 80
    codes = rng.integers(0, 4, size=(n, length))
    codes[:, 30:36] = [2, 2, 0, 3, 1, 1]
    profile = rng.normal(0.0, 0.01, size=(n, 1, length))
    profile[:, 0, 30:36] += 0.2
    layout = MotifLayout(k=6, bins=4, length=length)
    sums = motif_sums(codes, profile, layout, clip=1.0)
    assert sums.shape == (1, 4**6, 4)
    best = top_motifs(sums, layout, n_patients=n, top=1)[0]
    assert best["kmer"] == "GGATCC" and best["score"] > 0 and best["positions"][0] <= 31 <= best["positions"][1]  # 1-based
    more = motif_sums(np.vstack([codes, codes[:1]]), np.vstack([profile, 100 * profile[:1]]), layout, clip=1.0)
    assert np.linalg.norm(more - sums) <= 1.0 + 1e-9


def test_public_feature_labels_hide_site_resolved_names_and_group_like_the_forest(site) -> None:
    """The coordinator's labels name site-resolved lists by position only, in the order the site
    groups its own forest columns; the site maps them back to its names."""
    from client.handlers import public_schema
    from common.explanation import feature_layout
    from common.tabular import shared_columns

    data, _, _, names = site
    schema = data.schema
    public, named = feature_layout(public_schema(schema)), feature_layout(schema, named=True)
    assert len(public.names) == len(named.names) and len(named.column_feature) == shared_columns(schema).width
    assert public.names[0] == "variant#1" and named.names[0].startswith("variant:")
    assert not any(n.startswith(("variant:", "omics:", "events:")) for n in public.names)
    assert "clinical:smoker" in public.names and "kmer:ACG" in public.names
    columns = [n.replace(":", "=") if n.startswith("pos") else n for n in names]
    grouped = ExplanationFeatures.from_columns(columns, categorical=[*data.frame.categorical_names,
                                                                     *{c.split("=")[0] for c in columns
                                                                       if c.startswith("pos")}])
    assert grouped.names == named.names and (grouped.column_feature == named.column_feature).all()


def test_unit_scaled_patients_weigh_the_same_and_bound_the_release() -> None:
    phi = np.array([[[3.0, 4.0]], [[0.03, 0.04]], [[0.0, 0.0]]])
    scaled = clip_patients(phi, clip=1.0, normalize=True)
    np.testing.assert_allclose(scaled[:2], [[[0.6, 0.8]], [[0.6, 0.8]]])
    assert (scaled[2] == 0).all()
    from common.explanation import summary_sensitivity

    shapes = {"forest.signed": (1, 3), "forest.abs": (1, 3), "motifs.dna": (1, 16, 2), "shares": (3,)}
    # SUMMARY_WEIGHTS: forest.abs weighs 3 (a third of the noise), forest.signed 0.5 (twice the noise).
    assert summary_sensitivity(shapes, clip=1.0) == pytest.approx(np.sqrt(0.25 + 9 + 1 + 1))
    from common.explanation import summary_noise_sd

    sds = summary_noise_sd(shapes, clip=1.0, noise_multiplier=2.0)
    assert sds["forest.abs"] == pytest.approx(2 * np.sqrt(11.25) / 3) and sds["shares"] == pytest.approx(2 * np.sqrt(11.25))


def test_the_global_explanation_ranks_weights_and_draws_motif_logos() -> None:
    from common.explanation import MotifLayout, global_explanation

    schema = {"label": {"classes": ["a", "b"]}, "clinical": {"numeric": ["age", "bmi"], "categorical": {}},
              "omics": {"features": 2}}
    sums = {"forest.signed": np.array([[0.0, 0.0, 1.0, -2.0]]), "forest.abs": np.array([[1.0, 3.0, 2.0, 4.0]]),
            "logreg.signed": np.array([[0.0, 6.0, 0.0, 0.0]]), "logreg.abs": np.array([[0.0, 6.0, 0.0, 0.0]]),
            "shares": np.array([0.0, 1.0, 1.0])}
    layout = MotifLayout(k=2, bins=1, length=10)
    motifs = np.zeros((1, 16, 1))
    motifs[0, 2, 0] = 5.0   # AG
    motifs[0, 3, 0] = 1.0   # AT: one mismatch from AG
    doc = global_explanation({**sums, "motifs.dna": motifs}, schema=schema, classes=["a", "b"], patients=2,
                             motifs=layout, run_id="r")
    assert [f["feature"] for f in doc["models"]["forest"]["features"][:2]] == ["clinical:bmi", "omics#2"]
    # Equal shares: omics#2 has half the forest's and all the GLM's evidence.
    assert doc["features"][0]["feature"] == "omics#2" and doc["features"][0]["importance"] == pytest.approx(0.5 * 0.3 + 0.5)
    assert doc["shares"] == {"cnn": 0.0, "forest": 0.5, "logreg": 0.5}
    top = doc["motifs"][0]
    assert top["kmer"] == "AG" and top["score"] == pytest.approx(2.5)
    assert top["matrix"][1] == [0.0, 0.0, 5.0, 1.0] and top["matrix"][0] == [5.0, 0.0, 0.0, 0.0]


def test_a_model_the_hybrid_gives_no_weight_has_no_share_whatever_its_noised_sums_say() -> None:
    from common.explanation import global_explanation
    from common.meta import unweighted_models

    # The site average (forest and site GLM, weight 1/2 each): the deep model and the federated GLM
    # are out, for two classes and for three (each model then has one column per class).
    assert unweighted_models([0.0, 0.5, 0.0, 0.5, 0.0], n_models=4, n_classes=2) == [0, 2]
    three = np.zeros((3, 13))
    three[:, 3:6] = three[:, 9:12] = 0.5
    three[1, 6] = 0.1  # one weight on one class of the federated GLM keeps it in
    assert unweighted_models(three.ravel(), n_models=4, n_classes=3) == [0]
    assert unweighted_models([], n_models=4, n_classes=2) == []
    schema = {"label": {"classes": ["a", "b"]}, "clinical": {"numeric": ["age", "bmi"], "categorical": {}},
              "omics": {"features": 2}}
    sums = {"forest.signed": np.array([[0.0, 0.0, 1.0, -2.0]]), "forest.abs": np.array([[1.0, 3.0, 2.0, 4.0]]),
            "logreg.signed": np.array([[6.0, 0.0, 0.0, 0.0]]), "logreg.abs": np.array([[6.0, 0.0, 0.0, 0.0]]),
            "shares": np.array([0.4, 1.0, 0.6, 2.0])}  # noise on the deep model's and the GLM's
    doc = global_explanation(sums, schema=schema, classes=["a", "b"], patients=2, motifs=None,
                             unweighted=["cnn", "logreg"])
    assert doc["shares"] == {"cnn": 0.0, "forest": pytest.approx(1 / 3), "logreg": 0.0,
                             "site-logreg": pytest.approx(2 / 3)}
    # the GLM's attributions (all on one feature) no longer enter the hybrid's consensus ranking:
    # it is the forest's alone, each feature at its fraction of the forest's evidence
    forest = {f["feature"]: f["importance"] for f in doc["models"]["forest"]["features"]}
    forest = {name: v / sum(forest.values()) for name, v in forest.items()}
    assert {f["feature"]: pytest.approx(f["importance"]) for f in doc["features"]} == forest


def test_an_explanation_epsilon_above_the_policy_is_refused_unless_explanations_are_off() -> None:
    from client.privacy.policy import SitePolicy, check_request
    from common.settings import RunSettings

    policy = SitePolicy(max_run_epsilon=2.0)
    assert any("explanation-epsilon 3" in r for r in check_request(policy, RunSettings(epsilon=1.0, meta_epsilon=1.0,
                                                                                        explanation_epsilon=3.0)))
    assert not check_request(policy, RunSettings(epsilon=1.0, explanation_epsilon=3.0, explain=False))


def test_the_explanation_contract_declares_every_summary_and_refuses_more() -> None:
    from client.privacy.egress import contract_for, observe

    contract = contract_for("query.explain", dp=True, n_classes=2, summary_shapes={"shares": (3,)})
    ok = {"summary": {"shares": observe(np.zeros(3))}, "metrics": {"epsilon": observe(1.0)}}
    assert contract.violations(ok) == []
    extra = {"summary": {"shares": observe(np.zeros(3)), "patient-17": observe(np.zeros(3))}}
    assert contract.violations(extra) == ["undeclared key summary.patient-17"]
