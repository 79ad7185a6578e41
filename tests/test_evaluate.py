"""`genofed evaluate`: the pooled reference, its metrics.json contract, and the hybrid's advantage."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

from client.importers import import_cohort
from common.metrics import METRIC_NAMES
from common.spec import load_spec, write_spec
from simulations.cli import main
from simulations.evaluate import EvaluateSettings, run_evaluate
from simulations.synthetic import write_synthetic_cohort

FAST = dict(epochs=4, n_boot=30, forest_trees=30)


@pytest.fixture(scope="module")
def small_spec(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("eval") / "cohort"
    write_synthetic_cohort(out=out, patients=400, seed=3)
    return out / "spec.toml"


def _check_contract(report: dict, out: Path) -> None:
    on_disk = json.loads((out / "metrics.json").read_text())
    assert set(on_disk["models"]) == {"hybrid", "cnn", "forest", "logreg"}
    for name, m in on_disk["models"].items():
        for key in METRIC_NAMES:
            assert isinstance(m[key], float) and 0.0 <= m[key] <= 1.0, (name, key)
            lo, hi = m["ci"][key]
            assert lo <= hi, (name, key)
    assert "| hybrid |" in (out / "metrics.md").read_text()
    assert on_disk["privacy"] == json.loads(json.dumps(report["privacy"]))


def test_non_dp_run_writes_the_metrics_contract(small_spec: Path, tmp_path: Path) -> None:
    cohort = import_cohort(load_spec(small_spec))
    report = run_evaluate(cohort, EvaluateSettings(epsilon=None, **FAST), tmp_path, source="test")
    _check_contract(report, tmp_path)
    assert report["privacy"] == {"dp": False}
    assert report["cohort"]["patients"] == 400


@pytest.mark.slow
def test_dp_run_reports_epsilon_delta_and_accountant(small_spec: Path, tmp_path: Path) -> None:
    cohort = import_cohort(load_spec(small_spec))
    report = run_evaluate(cohort, EvaluateSettings(epsilon=3.0, **FAST), tmp_path, source="test")
    _check_contract(report, tmp_path)
    p = report["privacy"]
    n_train = report["cohort"]["splits"]["train"]
    assert p["dp"] and p["accountant"] == "rdp"
    assert 0 < p["epsilon"] <= 3.0 + 0.02  # spent at most the target (calibrated to every planned epoch)
    assert p["delta"] < 1 / n_train


def test_cohort_without_sequences_gets_a_dense_deep_model(small_spec: Path, tmp_path: Path) -> None:
    spec = load_spec(small_spec)
    tabular_only = write_spec(dataclasses.replace(spec, sequences=None, variants=None), tmp_path / "tab" / "spec.toml")
    out = tmp_path / "run"
    assert main(["evaluate", "--spec", str(tabular_only), "--out", str(out), "--no-dp", "--epochs", "3",
                 "--bootstrap", "20"]) == 0
    report = json.loads((out / "metrics.json").read_text())
    deep = report["details"]["deep"]["config"]
    assert deep["tracks"] == [] and deep["n_tabular"] > 0
    assert not math.isnan(report["models"]["hybrid"]["auc"])


def test_omics_pca_option(small_spec: Path, tmp_path: Path) -> None:
    cohort = import_cohort(load_spec(small_spec))
    report = run_evaluate(cohort, EvaluateSettings(epsilon=None, omics_pca=3, forest_cnn_features=True, **FAST),
                          tmp_path, source="test")
    _check_contract(report, tmp_path)


@pytest.mark.slow
def test_folds_give_paired_tests(small_spec: Path, tmp_path: Path) -> None:
    cohort = import_cohort(load_spec(small_spec))
    report = run_evaluate(cohort, EvaluateSettings(epsilon=None, folds=3, **FAST), tmp_path, source="test")
    folds = report["folds"]
    assert folds["k"] == 3 and all(len(v) == 3 for v in folds["per_fold"].values())
    for name in ("hybrid_vs_cnn", "hybrid_vs_forest", "hybrid_vs_logreg"):
        t = folds["paired_tests"][name]
        assert t["pairs"] == 3 and 0.0 <= t["ttest_p"] <= 1.0 and 0.0 <= t["wilcoxon_p"] <= 1.0


def test_cli_input_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", "--vault", str(tmp_path), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "genofed: error: --vault needs --key-file"
    (tmp_path / "empty").mkdir()
    assert main(["evaluate", "--sites-dir", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 1
    assert "no DIR/<site>/vault folders" in capsys.readouterr().err


@pytest.mark.slow
def test_hybrid_beats_each_base_model_on_a_synthetic_cohort(tmp_path: Path) -> None:
    """The planted signal is split across modalities: stacking must beat CNN and forest by 0.02 AUC."""
    write_synthetic_cohort(out=tmp_path / "cohort", patients=2000, seed=0)
    cohort = import_cohort(load_spec(tmp_path / "cohort" / "spec.toml"))
    report = run_evaluate(cohort, EvaluateSettings(epsilon=None, n_boot=50), tmp_path / "run", source="test")
    auc = {m: report["models"][m]["auc"] for m in ("hybrid", "cnn", "forest")}
    assert auc["hybrid"] >= auc["cnn"] + 0.02, auc
    assert auc["hybrid"] >= auc["forest"] + 0.02, auc


def test_lstm_and_cnn_features_into_the_forest(tmp_path: Path) -> None:
    # DPLSTM steps through positions in Python: a short-sequence cohort keeps this test quick.
    write_synthetic_cohort(out=tmp_path / "short", patients=200, seed=4, sequence_length=60)
    cohort = import_cohort(load_spec(tmp_path / "short" / "spec.toml"))
    settings = EvaluateSettings(epsilon=None, arch="lstm", forest_cnn_features=True, **{**FAST, "epochs": 1})
    report = run_evaluate(cohort, settings, tmp_path, source="test")
    assert report["details"]["deep"]["config"]["arch"] == "lstm"
    _check_contract(report, tmp_path)


@pytest.mark.slow
def test_pooled_sites_also_give_the_site_forest_reference(small_spec: Path, tmp_path: Path) -> None:
    """Pooled from several sites, the forest of the reference is each site's own, evaluated on its patients."""
    import numpy as np

    from client.pipeline import (
        SiteData,
        fit_forest,
        fit_glm,
        fit_shared_scaler,
        fit_tabular_preprocessor,
        forest_matrix,
        glm_matrix,
    )
    from common.cohort import concat_cohorts
    from common.metrics import compute_metrics
    from simulations.evaluate import _site_models_proba

    from client.cohort_store import load_cohort
    from client.vault import KeySource
    from simulations.site_layout import split_cohort

    split_cohort(spec_path=small_spec, sites=2, by="iid", out=tmp_path / "sites", seed=0, vaults=True,
                 show_progress=False)
    halves = [load_cohort(tmp_path / "sites" / s / "vault", KeySource.from_key_file(tmp_path / "sites" / s / "key"))
              for s in ("site-1", "site-2")]
    pooled = concat_cohorts(halves)
    sizes = [c.n for c in halves]
    assert pooled.report["site_sizes"] == sizes
    settings = EvaluateSettings(epsilon=None, **FAST)
    report = run_evaluate(pooled, settings, tmp_path / "out", source="test")
    ref = report["reference_site_forests"]
    assert set(ref) == {"hybrid", "forest", "site-logreg"}
    # The reference's forest and GLM test AUCs are those of the two sites' own models on their own test patients.
    data = SiteData.from_cohort(pooled)
    site_index = np.repeat([0, 1], sizes)
    own_proba, read = _site_models_proba(data, site_index, settings)
    proba = own_proba["test"]
    first = SiteData.from_cohort(halves[0])
    n_first = int(first.masks["test"].sum())
    pre = fit_tabular_preprocessor(first)
    own = fit_forest(first, pre, n_estimators=settings.forest_trees, random_state=settings.seed)
    np.testing.assert_allclose(proba["forest"][:n_first], own.predict_proba(forest_matrix(first, "test", pre)))
    scaler = fit_shared_scaler(first, max_glm_columns=settings.glm_max_features)
    from client.calibration import FOLDS
    from client.site_glm import choose_site_glm_c

    c = choose_site_glm_c(glm_matrix(first, "train", scaler), first.y[first.masks["train"]], folds=FOLDS,
                          seed=settings.seed, default=settings.glm_C)
    glm = fit_glm(first, scaler, C=c)
    np.testing.assert_allclose(proba["site-logreg"][:n_first], glm.predict_proba(glm_matrix(first, "test", scaler)))
    for name in ("forest", "site-logreg"):
        assert ref[name]["auc"] == compute_metrics(data.y[data.masks["test"]], proba[name], n_classes=2)["auc"]
    # The stack reads them through each site's own Platt maps, as a federated site's stack does.
    from client.calibration import apply_platt, site_model_maps
    from common.glm import FederatedGLM

    maps = site_model_maps(forest=own, glm_fit=lambda a, b: FederatedGLM(C=c).fit(a, b),
                           x_glm=glm_matrix(first, "train", scaler), y=first.y[first.masks["train"]], n_classes=2,
                           folds=FOLDS, seed=settings.seed)
    assert set(maps) == {"forest", "site-logreg"}
    for name in ("forest", "site-logreg"):
        np.testing.assert_allclose(read["test"][name][:n_first], apply_platt(proba[name][:n_first], maps[name]))
        assert not np.allclose(read["test"][name], proba[name])
    from dataclasses import replace

    _, unread = _site_models_proba(data, site_index, replace(settings, calibrate_site_models=False))
    np.testing.assert_array_equal(unread["test"]["forest"], proba["forest"])
    assert "Reference with each site's own forest and GLM" in (tmp_path / "out" / "metrics.md").read_text()
