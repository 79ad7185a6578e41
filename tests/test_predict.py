"""``genofed predict``: one patient's predictions from a site's final models, explained, on site.

One tiny federated run (two sites, the real ServerApp phases and ClientApp handlers over the
in-process LocalGrid, no DP) leaves final models in every vault; the tests predict from site-1's.
Checked: probabilities are distributions and the class follows the stored threshold; one patient
gets exactly what the split-wide computation of a run gets; the forest's TreeSHAP values add up to
its probability within ``SHAP_TOLERANCE`` and the GLM's attributions to its log-odds; LIME and its
agreement with SHAP; the global explanation (public labels mapped to the site's names); new patients
from a spec; and every user error as one line.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from client.predict import (
    SHAP_TOLERANCE,
    agreement,
    forest_contributions,
    glm_contributions,
    lime_tabular,
    load_predictor,
    one_patient,
    predict_patient,
)
from client.vault import KeySource, Vault
from common.explanation import ExplanationFeatures
from common.stack import MODEL_NAMES
from simulations.cli import main

FAST = dict(cnn_rounds=1, local_epochs=1, forest_trees=20, wait_timeout=2.0, round_timeout=60.0,
            test_statistics="exact", site_alone=False, glm_rounds=2, dp=False)


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two sites whose vaults hold the final models of one short federated run."""
    from client.client_app import app as client_app
    from common.settings import RunSettings
    from server.server_app import run_federation
    from simulations.site_layout import set_layout_policy, split_cohort
    from simulations.synthetic import write_synthetic_cohort
    from tests.local_grid import LocalGrid, node_configs

    root = tmp_path_factory.mktemp("predict")
    write_synthetic_cohort(out=root / "cohort", patients=240, seed=5)
    split_cohort(spec_path=root / "cohort" / "spec.toml", sites=2, by="iid", out=root / "sites", seed=0,
                 vaults=True, show_progress=False)
    set_layout_policy(root / "sites", require_dp=False, test_statistics="exact")
    run = RunSettings(run_dir=str(root / "run"), **FAST)
    run_federation(LocalGrid(client_app, node_configs(root / "sites"), run_config=run.to_run_config()), run)
    return root / "sites"


def _vault(site: Path) -> Vault:
    return Vault.open(site / "vault", KeySource.from_key_file(site / "key"))


@pytest.fixture(scope="module")
def predictor(sites: Path):
    return load_predictor(_vault(sites / "site-1"))


def _cli(site: Path, *args: str) -> list[str]:
    return ["predict", "--vault", str(site / "vault"), "--key-file", str(site / "key"), *args]


# ---------------------------------------------------------------------------------------------
# Predictions


@pytest.mark.slow
def test_probabilities_are_distributions_and_the_class_follows_the_stored_threshold(predictor) -> None:
    thresholds = predictor.models.thresholds
    assert set(thresholds) == set(MODEL_NAMES)
    for i in range(0, predictor.cohort.n, 23):
        result = predict_patient(predictor, index=i)
        assert set(result["models"]) == set(MODEL_NAMES)
        for name, row in result["models"].items():
            p = np.array([row["probabilities"][c] for c in ("control", "case")])
            assert np.all((p >= 0.0) & (p <= 1.0)) and p.sum() == pytest.approx(1.0, abs=1e-6)
            assert row["threshold"] == thresholds[name] and row["rule"] == "threshold"
            assert row["predicted"] == ("case" if p[1] >= thresholds[name] else "control")


def test_one_patient_gets_what_the_runs_split_wide_computation_gets(sites: Path, predictor) -> None:
    """The stored models read back independently, as the handlers use them on a whole split."""
    import torch

    from client.model_store import CNN_ROLE, META_ROLE, SHARED_ROLE, arrays_from_bytes, load_local_models
    from client.pipeline import deep_proba, forest_matrix, glm_matrix, meta_features
    from common.glm import FederatedGLM
    from client.calibration import apply_platt
    from common.meta import StackingMetaClassifier, selected_model
    from common.models import DeepModelConfig, build_model
    from common.tabular import SharedScaler

    vault, data = _vault(sites / "site-1"), predictor.data
    weights, meta = arrays_from_bytes(vault.read(CNN_ROLE))
    model = build_model(DeepModelConfig.from_dict(meta["config"]))
    model.load_state_dict({k: torch.as_tensor(v) for k, v in weights.items()})
    scaler = SharedScaler.from_arrays(arrays_from_bytes(vault.read(SHARED_ROLE))[0])
    coef = json.loads(vault.read(META_ROLE))
    stored = load_local_models(vault)
    x_glm = glm_matrix(data, "test", scaler)
    glm = FederatedGLM().set_coef(np.asarray(coef["glm_coef"]), n_features=x_glm.shape[1])
    whole = {"cnn": deep_proba(model, data, "test", scaler),
             "forest": stored["forest"].predict_proba(forest_matrix(data, "test", stored["preprocessor"])),
             "logreg": glm.predict_proba(x_glm),
             "site-logreg": stored["site_glm"].predict_proba(glm_matrix(data, "test", stored["site_scaler"]))}
    # The stack reads each site model through the Platt map the site fitted out of fold (client/calibration.py),
    # unless the hybrid fell back to one base model, which it then is.
    maps = stored["calibration"]
    assert set(maps) == {"forest", "site-logreg"} and all(m["slope"] >= 0 for m in maps.values())
    read = {m: apply_platt(p, maps.get(m)) for m, p in whole.items()}
    x = meta_features(read["cnn"], read["forest"], read["logreg"], read["site-logreg"])
    meta = StackingMetaClassifier().set_coef(np.asarray(coef["coef"]), n_features=x.shape[1])
    chosen = selected_model(coef["coef"], n_models=4, n_classes=2)
    whole["hybrid"] = meta.predict_proba(x) if chosen is None else whole[("cnn", "forest", "logreg", "site-logreg")[chosen]]
    for j, i in enumerate(np.flatnonzero(data.masks["test"])[:6]):
        result = predict_patient(predictor, index=int(i))
        for name in MODEL_NAMES:
            got = [result["models"][name]["probabilities"][c] for c in ("control", "case")]
            np.testing.assert_allclose(got, whole[name][j], atol=1e-5, err_msg=name)


# ---------------------------------------------------------------------------------------------
# Explanations


def test_forest_shap_adds_up_to_the_forests_probability(predictor) -> None:
    from client.explain import forest_attributions
    from client.pipeline import forest_matrix

    forest = predictor.models.forest
    for i in range(0, predictor.cohort.n, 11):
        check = predict_patient(predictor, index=i)["attributions"]["forest"]["sum_check"]
        assert check["error"] <= SHAP_TOLERANCE == check["tolerance"]
        x = forest_matrix(one_patient(predictor.data, i), "predict", predictor.models.preprocessor)
        phi = forest_contributions(predictor, x)
        assert phi.sum() + predictor.expected_value[0] == pytest.approx(forest.predict_proba(x)[0, 1],
                                                                        abs=SHAP_TOLERANCE)
        # the prepared explainer gives what client.explain computes with a fresh one
        np.testing.assert_allclose(phi, predictor.layout.group(forest_attributions(forest, x, n_classes=2)), atol=1e-12)


@pytest.mark.parametrize("model", ["logreg", "site-logreg"])
def test_glm_attributions_add_up_to_its_log_odds_minus_the_intercept(predictor, model: str) -> None:
    from client.pipeline import glm_matrix
    from client.predict import glm_scaler
    from client.site_models import glm_model

    models = predictor.models
    for i in range(0, predictor.cohort.n, 13):
        x = glm_matrix(one_patient(predictor.data, i), "predict", glm_scaler(models, model))
        phi, intercept = glm_contributions(predictor, x, model=model)
        glm = glm_model(models, n_features=x.shape[1]) if model == "logreg" else models.site_glm
        p = glm.predict_proba(x)[0]
        assert phi.shape == (1, 1, len(predictor.layout.names))
        assert phi.sum() == pytest.approx(np.log(p[1] / p[0]) - intercept[0], abs=1e-9)
        part = predict_patient(predictor, index=i)["attributions"][model]
        assert part["sum_check"]["error"] < 1e-9 and part["scale"] == "log-odds"
    # The site's GLM reads the columns its own scaler chose, placed among the shared ones.
    assert np.count_nonzero(phi) <= len(glm_scaler(models, model).glm_columns)


def test_deep_model_positions_name_the_patients_base(predictor) -> None:
    cnn = predict_patient(predictor, index=0, top=3)["attributions"]["cnn"]
    rows = cnn["tracks"]["dna"]
    assert len(rows) == 3 and abs(rows[0]["attribution"]) >= abs(rows[-1]["attribution"])
    codes = predictor.cohort.sequences[0]
    for r in rows:
        assert r["base"] == "ACGTN"[codes[r["position"] - 1]]


def test_lime_finds_a_known_models_features_and_signs() -> None:
    """On a linear model, LIME's effect of a feature is its weight times (own value - background mean)."""
    rng = np.random.default_rng(0)
    layout = ExplanationFeatures.from_columns(["a", "b", "c", "smoker=yes", "smoker=no"], categorical=["smoker"])
    background = np.column_stack([rng.normal(size=(400, 3)), np.eye(2)[rng.integers(0, 2, 400)]])
    w = np.array([2.0, -1.0, 0.0, 0.5, -0.5])
    row = np.array([1.5, 1.0, 3.0, 1.0, 0.0])
    phi, r2 = lime_tabular(lambda x: x @ w, row, background, layout, samples=2000, seed=1)
    expected = np.array([2.0 * (1.5 - background[:, 0].mean()), -1.0 * (1.0 - background[:, 1].mean()), 0.0,
                         0.5 - (background[:, 3:] @ w[3:]).mean()])
    np.testing.assert_allclose(phi, expected, atol=0.1)
    assert 0.3 < r2 <= 1.0  # the drawn values' own spread is what the bits cannot explain
    again, _ = lime_tabular(lambda x: x @ w, row, background, layout, samples=2000, seed=1)
    np.testing.assert_array_equal(phi, again)  # seeded
    verdict = agreement(np.array([3.0, -1.0, 0.0, 0.6]), phi, layout.names, top=2)
    assert verdict["shared"] == ["a", "b"] and verdict["same_sign"] == ["a", "b"]
    assert verdict["statement"].startswith("SHAP and LIME share 2 of their top 2 features")


def test_the_global_explanation_places_the_patient(sites: Path, tmp_path: Path) -> None:
    """Public labels ("variant#3") are read as the site's own names; the patient's contribution
    stands beside the global mean |SHAP|; the patient's top features are looked up in the global top."""
    from client.model_store import EXPLANATION_ROLE, load_explanation, save_explanation
    from client.pipeline import forest_matrix

    shutil.copytree(sites / "site-1", tmp_path / "site")
    vault = _vault(tmp_path / "site")
    vault.update(remove=[EXPLANATION_ROLE])
    predictor = load_predictor(vault)
    assert predict_patient(predictor, index=4)["global"] is None
    mine = predict_patient(predictor, index=4, top=3)["attributions"]["forest"]["top"]
    public = dict(zip(predictor.layout.names, predictor.public))
    labels = [public[mine[0]["feature"]], "variant#3", public[mine[2]["feature"]]]
    assert "variant#3" in predictor.public
    entries = [{"feature": f, "kind": "x", "output": "case", "importance": 0.05 / (k + 1), "mean": 0.01, "rank": k + 1}
               for k, f in enumerate(labels)]
    save_explanation(vault, {"format": "genofed-explanation", "version": 1, "run_id": "r",
                             "classes": ["control", "case"], "outputs": ["case"], "noised": True, "epsilon": 1.0,
                             "patients": 72, "features": entries,
                             "models": {"forest": {"scale": "probability", "features": entries}}})
    result = predict_patient(load_predictor(vault), index=4, top=3)
    forest = result["global"]["models"]["forest"]
    rows = forest["global_top"]
    assert [r["label"] for r in rows] == labels
    assert rows[1]["feature"] == f"variant:{predictor.cohort.schema['variants']['sites'][2]}"
    assert rows[0]["contribution"] == pytest.approx(mine[0]["contribution"])
    assert rows[0]["relative"] == pytest.approx(abs(mine[0]["contribution"]) / 0.05)
    assert forest["patient_top_in_global_top"] == [mine[0]["feature"], mine[2]["feature"]]
    assert forest["statement"].startswith("2 of this patient's top 3 forest features are among the run's global top 3")
    assert "logreg" not in result["global"]["models"]  # the explanation has no GLM ranking
    # Global figures made from each patient's attributions scaled to unit L2 norm: the patient's are scaled alike.
    save_explanation(vault, {**load_explanation(vault), "per_patient": "each patient's attributions scaled to unit "
                                                                       "L2 norm per summary"})
    predictor = load_predictor(vault)
    row = predict_patient(predictor, index=4, top=3)["global"]["models"]["forest"]["global_top"][0]
    x = forest_matrix(one_patient(predictor.data, 4), "predict", predictor.models.preprocessor)
    norm = np.linalg.norm(forest_contributions(predictor, x))
    assert row["share"] == pytest.approx(mine[0]["contribution"] / norm)
    assert row["relative"] == pytest.approx(abs(row["share"]) / 0.05)


# ---------------------------------------------------------------------------------------------
# The command


def test_json_names_every_model_and_explanation(sites: Path, capsys: pytest.CaptureFixture[str]) -> None:
    site = sites / "site-1"
    pid = str(load_predictor_ids(site)[7])
    assert main(_cli(site, "--patient", pid, "--json")) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["patient"] == pid and doc["split"] in ("train", "validation", "test") and doc["input"] is None
    assert set(doc["models"]) == set(MODEL_NAMES)
    assert set(doc["attributions"]) == {"forest", "logreg", "site-logreg", "cnn"}
    assert len(doc["attributions"]["forest"]["top"]) == 5 and doc["attributions"]["cnn"]["tracks"]["dna"]
    assert "nothing was sent" in doc["privacy"] and "lime" not in doc
    from client.model_store import EXPLANATION_ROLE

    if EXPLANATION_ROLE in _vault(site).roles:  # the run's own global explanation, as the coordinator sent it
        assert set(doc["global"]["models"]) == {"forest", "logreg", "site-logreg"}
        assert doc["global"]["positions"]["dna"][0]["global_importance"] > 0
    else:
        assert doc["global"] is None and any("no global explanation" in n for n in doc["notes"])


def load_predictor_ids(site: Path) -> np.ndarray:
    from client.cohort_store import load_cohort

    return load_cohort(_vault(site)).patient_ids


def test_lime_output_says_where_shap_and_lime_agree(sites: Path, capsys: pytest.CaptureFixture[str]) -> None:
    site = sites / "site-1"
    assert main(_cli(site, "--patient", str(load_predictor_ids(site)[3]), "--lime")) == 0
    out = capsys.readouterr().out
    assert "SHAP and LIME share" in out and "LIME on P(case)" in out and "TreeSHAP on P(case)" in out
    assert "predictions" in out and "hybrid" in out and "nothing was sent" in out


def test_unknown_patient_is_one_line_naming_the_patient_and_the_vault(sites: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    site = sites / "site-1"
    assert main(_cli(site, "--patient", "P99999")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "P99999" in err[0] and str(site / "vault") in err[0]


def test_wrong_key_and_missing_final_models_are_one_line_each(sites: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["predict", "--vault", str(sites / "site-1" / "vault"), "--key-file", str(sites / "site-2" / "key"),
                 "--patient", "P00001"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "wrong key" in err[0]
    site = sites / "site-1"
    assert main(["vault", "import", "--spec", str(site / "spec.toml"), "--out", str(tmp_path / "vault"),
                 "--key-file", str(site / "key")]) == 0
    capsys.readouterr()
    pid = str(load_predictor_ids(site)[0])
    assert main(["predict", "--vault", str(tmp_path / "vault"), "--key-file", str(site / "key"), "--patient", pid]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no final models" in err[0] and str(tmp_path / "vault") in err[0]


def test_new_patients_from_a_spec_in_the_cohorts_formats(sites: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from simulations.site_layout import subset_fasta, subset_table, subset_vcf

    other = sites / "site-2"  # patients site-1's models never saw, in the same schema
    with_events = set((other / "mutations.tsv").read_text().split())  # the importer wants an events row
    pid = next(str(p) for p in load_predictor_ids(other) if p in with_events)
    assert main(_cli(sites / "site-1", "--input", str(other / "spec.toml"), "--patient", pid, "--json")) == 0
    many = json.loads(capsys.readouterr().out)
    assert many["patient"] == pid and many["input"] == str(other / "spec.toml") and many["split"] is None
    # the same patient alone in its files: --patient may be left out, and the prediction is the same
    one = tmp_path / "one"
    one.mkdir()
    for name in ("clinical.csv", "omics.csv", "mutations.tsv"):
        subset_table(other / name, one / name, "patient_id", {pid})
    subset_fasta(other / "sequences.fa", one / "sequences.fa", {pid})
    subset_vcf(other / "variants.vcf.gz", one / "variants.vcf.gz", {pid})
    shutil.copy(other / "spec.toml", one / "spec.toml")
    assert main(_cli(sites / "site-1", "--input", str(one), "--json")) == 0
    alone = json.loads(capsys.readouterr().out)
    assert alone["patient"] == pid
    for name in MODEL_NAMES:
        assert alone["models"][name]["probabilities"] == pytest.approx(many["models"][name]["probabilities"], abs=1e-6)


def test_new_patients_with_another_schema_are_refused_in_one_line(sites: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from simulations.synthetic import write_synthetic_cohort

    write_synthetic_cohort(out=tmp_path / "other", patients=50, seed=1, variants=100)
    spec = tmp_path / "other" / "spec.toml"
    assert main(_cli(sites / "site-1", "--input", str(spec), "--patient", "P00001")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(spec) in err[0] and "schema hash" in err[0] and "variants.sites" in err[0]


def test_help_has_an_example_and_says_nothing_is_sent(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["predict", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "genofed predict --vault" in out and "nothing is sent" in out and "privacy ledger" in out


def test_the_benchmarks_timing_functions(predictor) -> None:
    from simulations.benchmarks.predict_latency import VARIANTS, summary, time_patients

    for variant in VARIANTS:
        ms = time_patients(predictor, [0, 1, 2], variant=variant)
        assert len(ms) == 3 and all(v > 0 for v in ms)
        assert summary(ms)["median_ms"] <= summary(ms)["p90_ms"]
