"""The federated run in process: the real ServerApp phases and ClientApp handlers over a LocalGrid.

Covers the protocol (exchange count, metrics.json), exactness (meta-classifier equals a pooled
fit; pooled metrics equal metrics on the union of the sites' test splits), faults (a site that
raises, a site that goes silent, too few sites, schema mismatch), the privacy ledger (refusal,
continuation across runs) and resume from a checkpoint. The real engines (Ray simulation, a
TLS SuperLink with SuperNodes) are exercised in test_simulate.py and test_deployment.py.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from client.calibration import apply_platt
from client.client_app import app as client_app
from client.cohort_store import load_cohort
from client.model_store import CNN_ROLE, SHARED_ROLE, arrays_from_bytes, load_local_models
from client.pipeline import (
    SiteData,
    deep_proba,
    fit_glm,
    fit_shared_scaler,
    forest_matrix,
    glm_matrix,
    meta_features,
)
from client.site_glm import C_GRID
from client.vault import KeySource, Vault
from common.glm import FederatedGLM
from common.meta import StackingMetaClassifier, flat_coef, selected_model
from common.metrics import (
    TEST_BINS,
    Threshold,
    at_threshold,
    compute_stats,
    metrics_from_stats,
    released_arrays,
    stats_from_released,
)
from common.models import DeepModelConfig, build_model
from common.records import from_record
from common.settings import RunSettings
from common.tabular import SharedScaler
from server.exchange import TooFewSitesError
from server.phases import CensusError
from server.server_app import run_federation
from simulations.site_layout import set_layout_policy
from simulations.synthetic import write_synthetic_cohort
from tests.local_grid import LocalGrid, node_configs, reference_layout

pytestmark = pytest.mark.slow  # (nearly) every test here runs a federation; tests/conftest.py orders files by it

FAST = dict(cnn_rounds=2, local_epochs=1, forest_trees=20, wait_timeout=2.0, round_timeout=60.0, test_statistics="exact",
            site_alone=False, glm_rounds=2)


@pytest.fixture(scope="module")
def sites_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # These tests compare against non-private references: every site's officer allows them.
    return reference_layout(tmp_path_factory.mktemp("fed"), patients=360)


@pytest.fixture()
def sites(sites_template: Path, tmp_path: Path) -> Path:
    """A fresh copy per test: vaults and ledgers change during a run."""
    import shutil

    shutil.copytree(sites_template, tmp_path / "sites")
    return tmp_path / "sites"


def _run(sites: Path, run_dir: Path, *, fail=None, **settings) -> tuple[dict, LocalGrid]:
    run = RunSettings(run_dir=str(run_dir), **{**FAST, **settings})
    grid = LocalGrid(client_app, node_configs(sites), run_config=run.to_run_config(), fail=fail)
    doc = run_federation(grid, run)
    return doc, grid


def _site_vaults(sites: Path) -> list[tuple[str, Vault]]:
    return [(p.name, Vault.open(p / "vault", KeySource.from_key_file(p / "key")))
            for p in sorted(q for q in sites.iterdir() if (q / "vault").is_dir())]


def test_run_writes_metrics_with_one_exchange_per_round(sites: Path, tmp_path: Path) -> None:
    doc, grid = _run(sites, tmp_path / "run", dp=False, glm_rounds=8)
    # census, moments, CNN rounds, GLM rounds (until converged), meta rounds, validation, evaluation
    # ... then validation, explanation and evaluation
    assert grid.exchanges == 2 + FAST["cnn_rounds"] + doc["glm"]["rounds"] + doc["meta"]["rounds"] + 3
    assert set(doc["thresholds"]) == set(doc["models"]) and "Youden" in doc["thresholds"]["hybrid"]["rule"]
    assert doc["glm"]["converged"] and doc["glm"]["rounds"] <= 8
    # Without DP the meta-classifier, too, runs its Newton rounds until converged (meta-rounds: at most 8).
    assert doc["meta"]["converged"] and doc["meta"]["rounds"] <= 8
    on_disk = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(on_disk["models"]) == {"hybrid", "cnn", "forest", "logreg", "site-logreg"}
    for m in on_disk["models"].values():
        assert all(0.0 <= m[k] <= 1.0 for k in ("auc", "accuracy", "precision", "recall", "specificity", "f1", "auprc"))
        assert set(m["ci"]) >= {"auc", "f1"}
    assert set(on_disk["sites"]) == {"site-1", "site-2", "site-3"}
    assert on_disk["missing_sites"] == {}
    report = (tmp_path / "run" / "report.html").read_text()
    before_explanation = report.split("<h2>Explanation</h2>")[0]
    assert "Pooled test metrics" in report and before_explanation.count("data:image/png;base64,") == 3  # ROC, PR, calibration (no DP: no spend)
    assert "<h2>Explanation</h2>" in report and (tmp_path / "run" / "explanation.json").is_file()
    assert len(re.findall(r"CNN round \d/2: 3 updates aggregated", (tmp_path / "run" / "run.log").read_text())) == 2
    for _, vault in _site_vaults(sites):
        assert CNN_ROLE in vault.roles and "model/meta" in vault.roles
        assert "model/explanation" in vault.roles  # the global explanation, stored with the final models
    # Read back from the vaults, every stacking candidate is scored exactly, and what the run reported
    # from 32 bins holds the exact figure within its tie bound.
    from simulations.benchmarks.stack_candidates import run as stack_candidates

    replay = stack_candidates(run_dir=tmp_path / "run", sites_dir=sites)
    exact = replay["exact_auc"]
    for split in ("validation", "test"):
        assert set(exact[split]) >= {"chosen", "hybrid", "cnn", "forest", "logreg", "site-logreg",
                                     "hybrid-without-cnn-logreg", "public", "public-without-cnn-logreg"}
    # The run's rule replayed on each family of stacks (fitted, public) names a scored candidate.
    assert set(replay["decisions"]) == {"fitted", "public"}
    for family, d in replay["decisions"].items():
        assert d["test_auc"] == exact["test"][d["chosen"]], family
        assert not d["chosen"].startswith("public" if family == "fitted" else "hybrid"), family
    for name in ("cnn", "forest", "logreg", "site-logreg"):
        m = on_disk["models"][name]
        assert abs(exact["test"][name] - m["auc"]) <= m["auc_bound"] + 1e-9, name
    m = on_disk["models"]["hybrid"]
    assert abs(exact["test"]["chosen"] - m["auc"]) <= m["auc_bound"] + 1e-9


def _union_predictions(sites: Path, meta_coef: list[float], split: str) -> tuple[np.ndarray, dict, np.ndarray]:
    """Per-patient predictions a site could compute locally, pooled here only for the test's check."""
    ys, probas, xs = [], {"cnn": [], "forest": [], "logreg": [], "site-logreg": [], "hybrid": []}, []
    for _, vault in _site_vaults(sites):
        data = SiteData.from_cohort(load_cohort(vault))
        arrays, meta = arrays_from_bytes(vault.read(CNN_ROLE))
        scaler = SharedScaler.from_arrays(arrays_from_bytes(vault.read(SHARED_ROLE))[0])
        glm_coef = json.loads(vault.read("model/meta"))["glm_coef"]
        model = build_model(DeepModelConfig.from_dict(meta["config"]))
        model.load_state_dict({k: torch.as_tensor(v) for k, v in arrays.items()})
        stored = load_local_models(vault)
        cnn = deep_proba(model, data, split, scaler)
        forest = stored["forest"].predict_proba(forest_matrix(data, split, stored["preprocessor"]))
        x_glm = glm_matrix(data, split, scaler)
        logreg = FederatedGLM().set_coef(np.asarray(glm_coef), n_features=x_glm.shape[1]).predict_proba(x_glm)
        own = stored["site_glm"].predict_proba(glm_matrix(data, split, stored["site_scaler"]))
        # The stack reads the site's own models through their Platt maps (client/calibration.py).
        maps = stored["calibration"]
        x = meta_features(cnn, apply_platt(forest, maps["forest"]), logreg, apply_platt(own, maps["site-logreg"]))
        hybrid = StackingMetaClassifier().set_coef(np.asarray(meta_coef), n_features=x.shape[1]).predict_proba(x)
        chosen = selected_model(meta_coef, n_models=4, n_classes=2)  # a fallback is that model, as it is
        if chosen is not None:
            hybrid = (cnn, forest, logreg, own)[chosen]
        ys.append(data.y[data.masks[split]])
        xs.append(x)
        for name, p in (("cnn", cnn), ("forest", forest), ("logreg", logreg), ("site-logreg", own), ("hybrid", hybrid)):
            probas[name].append(p)
    return np.concatenate(ys), {k: np.concatenate(v) for k, v in probas.items()}, np.concatenate(xs)


def test_meta_matches_pooled_fit_and_pooled_metrics_match_the_union(sites: Path, tmp_path: Path) -> None:
    doc, _ = _run(sites, tmp_path / "run", dp=False)
    coef = doc["meta"]["coef"]  # what the sites used: the fit, or the base model the stack fell back to
    fitted = doc["meta"]["fallback"].get("fitted_coef", coef)
    y_val, _, x_val = _union_predictions(sites, coef, "validation")
    pooled = StackingMetaClassifier(penalty="l2", C=1.0).fit(x_val, y_val)
    np.testing.assert_allclose(np.asarray(fitted), flat_coef(pooled), atol=1e-4)
    y_test, proba, _ = _union_predictions(sites, coef, "test")
    for name in ("cnn", "forest", "logreg", "site-logreg", "hybrid"):
        # The sites released their statistics over TEST_BINS bins: the union with the same bins.
        # (released form: a binary decision is p1 >= 0.5, so the forest's 0.5 ties count as positive)
        union_stats = compute_stats(y_test, proba[name], n_classes=2, n_bins=TEST_BINS)
        th = Threshold(**{k: v for k, v in doc["thresholds"][name].items() if k != "probability"})
        union = metrics_from_stats(at_threshold(stats_from_released(released_arrays(union_stats), n_classes=2), th))
        fed = doc["models"][name]
        for key in ("accuracy", "precision", "recall", "specificity", "f1"):
            assert fed[key] == pytest.approx(union[key], abs=1e-12), (name, key)
        assert fed["auc"] == pytest.approx(union["auc"], abs=1e-12)  # same bins: identical statistics
    # The paired comparison: McNemar on the sites' summed discordant counts is McNemar on the union.
    from common.paired import discordant_counts, mcnemar, predictions

    th = {m: t["probability"] for m, t in doc["thresholds"].items()}
    hybrid = predictions(proba["hybrid"], threshold=th["hybrid"])
    for other in ("cnn", "forest", "logreg", "site-logreg"):
        union = mcnemar(discordant_counts(y_test, hybrid, predictions(proba[other], threshold=th[other])))
        assert doc["paired_tests"]["pairs"][f"hybrid-vs-{other}"] == union
    assert "McNemar" in (tmp_path / "run" / "report.html").read_text()


def _pooled_sites(sites: Path) -> SiteData:
    """The union of the sites' data with their stored splits (the pooled reference's input)."""
    from common.cohort import concat_cohorts

    return SiteData.from_cohort(concat_cohorts([load_cohort(v) for _, v in _site_vaults(sites)]))


def test_federated_scaler_and_glm_equal_the_pooled_ones(sites: Path, tmp_path: Path) -> None:
    doc, _ = _run(sites, tmp_path / "run", dp=False, cnn_rounds=1, glm_rounds=8)
    _, vault = _site_vaults(sites)[0]
    fed_scaler = SharedScaler.from_arrays(arrays_from_bytes(vault.read(SHARED_ROLE))[0])
    pooled = _pooled_sites(sites)
    ref_scaler = fit_shared_scaler(pooled, max_glm_columns=RunSettings().glm_max_features)
    np.testing.assert_allclose(fed_scaler.mean, ref_scaler.mean, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(fed_scaler.scale, ref_scaler.scale, rtol=1e-10, atol=1e-10)
    np.testing.assert_array_equal(fed_scaler.glm_columns, ref_scaler.glm_columns)
    ref_glm = fit_glm(pooled, ref_scaler, C=RunSettings().glm_c)
    fed_coef = np.asarray(json.loads(vault.read("model/meta"))["glm_coef"])
    np.testing.assert_allclose(fed_coef, flat_coef(ref_glm), atol=1e-4)
    assert doc["glm"]["converged"]


def test_a_site_that_raises_leaves_the_run_named_with_its_reason(sites: Path, tmp_path: Path) -> None:
    def fail(node: int, msg) -> str | None:
        if node == 102 and msg.metadata.message_type == "train":
            return "<class 'RuntimeError'>:<'disk full'>"
        return None

    doc, _ = _run(sites, tmp_path / "run", dp=False, fail=fail)
    assert set(doc["missing_sites"]) == {"site-2"}
    assert "disk full" in doc["missing_sites"]["site-2"]
    assert set(doc["sites"]) == {"site-1", "site-3"}
    log = (tmp_path / "run" / "run.log").read_text()
    assert "site site-2 failed and leaves the run" in log and "disk full" in log


def test_a_reply_whose_arrays_do_not_unpack_leaves_the_run_named(sites: Path, tmp_path: Path) -> None:
    def fail(node: int, msg) -> str | None:
        return "garble" if node == 102 and msg.metadata.message_type == "train" else None

    doc, _ = _run(sites, tmp_path / "run", dp=False, fail=fail)
    assert "malformed reply: record 'arrays' is an array record that does not unpack" in doc["missing_sites"]["site-2"]
    assert set(doc["sites"]) == {"site-1", "site-3"}


def test_a_silent_site_times_out_and_the_run_completes(sites: Path, tmp_path: Path) -> None:
    def fail(node: int, msg) -> str | None:
        return "silent" if node == 103 and msg.metadata.message_type == "train.meta" else None

    doc, _ = _run(sites, tmp_path / "run", dp=False, fail=fail, round_timeout=1.0)
    assert "no reply within 1 s" in doc["missing_sites"]["site-3"]
    assert set(doc["sites"]) == {"site-1", "site-2"}


def test_too_few_sites_is_a_clear_timeout(sites: Path, tmp_path: Path) -> None:
    with pytest.raises(TooFewSitesError, match=r"only 3 site\(s\) online after 2 s; the run needs at least 4"):
        _run(sites, tmp_path / "run", dp=False, min_sites=4)
    assert "run failed" in (tmp_path / "run" / "run.log").read_text()


def test_schema_mismatch_stops_the_run_before_training(sites: Path, tmp_path: Path) -> None:
    from client.cohort_store import save_cohort

    p = sites / "site-3"
    key = KeySource.from_key_file(p / "key")
    cohort = load_cohort(p / "vault", key)
    schema = json.loads(json.dumps(cohort.schema))
    schema["label"]["classes"] = ["control", "disease"]
    save_cohort(p / "vault", dataclasses.replace(cohort, schema=schema), key, overwrite=True)
    with pytest.raises(CensusError, match=r"do not share one schema.*label.classes"):
        _run(sites, tmp_path / "run", dp=False)


def test_ledger_refuses_over_budget_and_continues_across_runs(sites: Path, tmp_path: Path) -> None:
    set_layout_policy(sites, budget_epsilon=5.5)  # one run (4.3) fits, two (composed above 5.5) do not
    first, _ = _run(sites, tmp_path / "run1", dp=True, epsilon=3.0)
    spent = {s: p["epsilon"] for s, p in first["privacy"].items()}
    assert all(0 < e <= 5.5 for e in spent.values())
    assert first["glm"]["rounds"] == 1  # under DP: one noised gradient, a public curvature
    # ... over at most glm-dp-columns shared columns, of which the largest coefficients are kept
    assert RunSettings().glm_dp_columns >= first["glm"]["columns"] > first["glm"]["kept"] == \
        RunSettings().glm_dp_max_features
    # Every round is charged (Opacus folds later rounds into one history entry: they must still count).
    from client.privacy.ledger import PrivacyLedger

    for site, vault in _site_vaults(sites):
        rounds = {r.round for r in PrivacyLedger.load(vault).releases if r.label == "cnn-update"}
        assert rounds == {1, 2}, site
    # The same sites again: the ledger continues, and the new run would exceed the budget of 5.5.
    with pytest.raises(CensusError, match=r"refused by the site's privacy policy: the run's planned releases would take the site's spend"):
        _run(sites, tmp_path / "run2", dp=True, epsilon=3.0, min_sites=1)
    for site, vault in _site_vaults(sites):  # refused at the census: nothing more was spent
        assert PrivacyLedger.load(vault).spent_epsilon() == pytest.approx(spent[site])
    log = (tmp_path / "run2" / "run.log").read_text()
    assert sum("refuses the run" in line for line in log.splitlines()) == 3


def test_a_dp_run_stacks_with_public_weights_and_releases_no_meta_statistics(sites: Path, tmp_path: Path) -> None:
    """The default under DP (meta-dp-rounds = 0): no train.meta exchange and no meta-statistics
    release; the hybrid is the base models' plain average, one of its reduced averages, or a base
    model, chosen on the validation release; metrics.md says so."""
    from client.privacy.ledger import PrivacyLedger
    from common.meta import averaging_prior, selection_coef
    from common.stack import BASE_MODELS, REDUCED_STACKS, reduced_stack_weights

    kinds = []
    assert all(load_local_models(vault) is None for _, vault in _site_vaults(sites))
    doc, _ = _run(sites, tmp_path / "run", dp=True, epsilon=3.0,
                  fail=lambda node, msg: kinds.append(msg.metadata.message_type))
    assert "train.meta" not in kinds and not any(r["phase"] == "meta" for r in doc["rounds"])
    assert doc["meta"]["rounds"] == 0 and doc["meta"]["weights"] == "public"
    for _, vault in _site_vaults(sites):
        assert "meta-statistics" not in {r.label for r in PrivacyLedger.load(vault).releases}
    prior = averaging_prior(n_models=len(BASE_MODELS), n_classes=2)
    fb = doc["meta"]["fallback"]
    np.testing.assert_allclose(fb.get("fitted_coef", doc["meta"]["coef"]), prior)
    allowed = [prior, *(reduced_stack_weights(n, prior, n_classes=2) for n in REDUCED_STACKS),
               *(selection_coef(n_models=len(BASE_MODELS), n_classes=2, index=i) for i in range(len(BASE_MODELS)))]
    assert any(np.allclose(doc["meta"]["coef"], c) for c in allowed)
    said = (tmp_path / "run" / "metrics.md").read_text()
    assert "public weights under DP" in said or fb.get("reason") == "site-average" or fb["model"] in BASE_MODELS
    assert "no meta statistics were released" in said
    # The forests were fitted, in the validation exchange, on each site's train split. (Not their
    # AUC > 0.5: 20 trees on about 84 records a site, tested on about 54 pooled, scored 0.49 in one
    # CI run's seeds.)
    for _, vault in _site_vaults(sites):
        stored, data = load_local_models(vault), SiteData.from_cohort(load_cohort(vault))
        assert len(stored["forest"].forest_.estimators_) == FAST["forest_trees"]
        assert stored["forest"].oob_proba_.shape[0] == int(data.masks["train"].sum())
    assert 0.0 <= doc["models"]["forest"]["auc"] <= 1.0


def test_dp_run_charges_noised_meta_statistics_to_every_ledger(sites: Path, tmp_path: Path) -> None:
    from client.privacy.ledger import PrivacyLedger

    sent = []

    def record(node: int, msg) -> None:
        if msg.metadata.message_type == "train.meta":
            sent.append(dict(msg.content.config_records["config"]))
        return None

    doc, _ = _run(sites, tmp_path / "run", dp=True, epsilon=3.0, meta_epsilon=1.0, meta_dp_rounds=3, fail=record)
    assert sent and not any(c["warm-start"] for c in sent)  # a local fit has no DP mechanism
    meta_rounds = [r for r in doc["rounds"] if r["phase"] == "meta"]
    assert len(meta_rounds) == 3  # meta-dp-rounds: fixed by the plan, not by convergence
    said = (tmp_path / "run" / "metrics.md").read_text()
    assert "the meta-classifier takes 3 Newton round(s) on noised statistics" in said
    for site, vault in _site_vaults(sites):
        ledger = PrivacyLedger.load(vault)
        meta = [r for r in ledger.releases if r.label == "meta-statistics"]
        assert sorted(r.round for r in meta) == [1, 2, 3] and all(r.kind == "gaussian" for r in meta), site
        assert doc["privacy"][site]["epsilon"] == pytest.approx(ledger.spent_epsilon()), site
        assert doc["privacy"][site]["epsilon"] > doc["privacy"][site]["run_epsilon"], site
        assert all(site in r["epsilon"] for r in meta_rounds)
    coef = np.asarray(doc["meta"]["coef"])
    assert np.all(np.isfinite(coef)) and np.abs(coef).max() < 50  # the noise floor keeps steps sane
    assert "epsilon spent per site" in (tmp_path / "run" / "run.log").read_text()
    from server.report_html import privacy_figure

    report = (tmp_path / "run" / "report.html").read_text().split("<h2>Explanation</h2>")[0]
    assert report.count("data:image/png;base64,") == 4  # ROC, PR, calibration, spend
    assert privacy_figure(doc) is not None


def test_round_randomness_is_seeded_from_the_site_key_not_the_run_config(sites: Path, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The coordinator knows the run seed; if it fixed a site's sampling and noise, DP would be void."""
    import shutil

    from client.vault import generate_key_file
    from server.phases import RunState

    monkeypatch.setattr("server.server_app.new_state", lambda: RunState(run_id="same-run"))

    other = tmp_path / "rekeyed"
    shutil.copytree(sites, other)
    for p in sorted(q for q in other.iterdir() if (q / "vault").is_dir()):
        new_key = generate_key_file(tmp_path / f"{p.name}.key")
        Vault.open(p / "vault", KeySource.from_key_file(p / "key")).rekey(KeySource.from_key_file(new_key))
        shutil.copy(new_key, p / "key")
    a, _ = _run(sites, tmp_path / "a", dp=True, epsilon=3.0, cnn_rounds=1)
    b, _ = _run(other, tmp_path / "b", dp=True, epsilon=3.0, cnn_rounds=1)
    for (_, va), (_, vb) in zip(_site_vaults(sites), _site_vaults(other)):  # same data, run and config; other keys
        wa, _ = arrays_from_bytes(va.read(CNN_ROLE))
        wb, _ = arrays_from_bytes(vb.read(CNN_ROLE))
        assert any(not np.array_equal(wa[k], wb[k]) for k in wa)


def test_coordinator_sends_away_a_site_whose_ledger_went_backwards(sites: Path, tmp_path: Path) -> None:
    """A vault folder restored from an older copy resets its ledger; only the coordinator can tell."""
    import shutil

    registry = tmp_path / "registry.json"
    _run(sites, tmp_path / "run1", dp=True, epsilon=3.0, ledger_registry=str(registry))
    backup = tmp_path / "site-1-vault-backup"
    shutil.copytree(sites / "site-1" / "vault", backup)  # a backup after the first run
    second, _ = _run(sites, tmp_path / "run2", dp=True, epsilon=3.0, ledger_registry=str(registry))
    remembered = json.loads(registry.read_text())["sites"]
    assert set(remembered) == {"site-1", "site-2", "site-3"}
    assert remembered["site-1"]["spent"] == pytest.approx(second["privacy"]["site-1"]["epsilon"])

    shutil.rmtree(sites / "site-1" / "vault")
    shutil.copytree(backup, sites / "site-1" / "vault")  # restored: the second run's spend is gone
    third, _ = _run(sites, tmp_path / "run3", dp=True, epsilon=3.0, ledger_registry=str(registry), min_sites=2)
    assert set(third["sites"]) == {"site-2", "site-3"}
    assert "privacy ledger went back from revision" in third["missing_sites"]["site-1"]
    assert "site site-1 leaves the run" in (tmp_path / "run3" / "run.log").read_text()
    after = json.loads(registry.read_text())["sites"]
    assert after["site-1"] == remembered["site-1"]  # what it knew is kept, never lowered
    assert after["site-2"]["spent"] > remembered["site-2"]["spent"]


def test_ledger_registry_tells_a_recreated_ledger_and_reads_only_its_own_format(tmp_path: Path) -> None:
    from server.ledger_registry import RegistryError, load_registry, went_backwards

    seen = {"ledger-created": "2026-01-01T00:00:00+00:00", "revision": 5, "spent": 2.5, "run-id": "r1"}
    same = {"ledger-created": seen["ledger-created"], "ledger-revision": 7, "ledger-spent": 3.0}
    assert went_backwards(None, same) is None and went_backwards(seen, same) is None
    assert "re-created or replaced" in went_backwards(seen, {**same, "ledger-created": "2026-02-01T00:00:00+00:00"})
    assert "went back" in went_backwards(seen, {**same, "ledger-spent": 1.0})
    (tmp_path / "other.json").write_text('{"format": "something-else", "sites": {}}')
    with pytest.raises(RegistryError, match="not a genofed-ledger-registry file"):
        load_registry(tmp_path / "other.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(RegistryError, match="not a readable ledger registry"):
        load_registry(tmp_path / "bad.json")


@pytest.mark.parametrize(("kind", "rnd", "at_node"), [
    ("train", 3, None),        # dies before any site trained round 3
    ("train", 3, 103),         # dies after two sites trained and charged round 3: asked again, they answer the same
    ("train.meta", 2, 103),    # the same in a meta round
])
def test_resumed_run_ends_at_the_same_model(sites: Path, sites_template: Path, tmp_path: Path, kind: str, rnd: int,
                                            at_node: int | None, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from client.privacy.ledger import PrivacyLedger
    from server.phases import RunState

    # A site seeds every release from its key, the run id and the charge's sequence number: the
    # reference must be the same run (same id) on an identical copy of the sites.
    monkeypatch.setattr("server.server_app.new_state", lambda: RunState(run_id="same-run"))

    # meta-dp-rounds = 3: noised meta rounds, so that a run can die in one (the default has none)
    reference, _ = _run(sites, tmp_path / "ref", dp=True, epsilon=4.0, cnn_rounds=3, meta_dp_rounds=3)

    other = tmp_path / "sites-b"
    shutil.copytree(sites_template, other)

    class Stop(Exception):
        pass

    def stop_in_round_3(node: int, msg) -> str | None:
        if (msg.metadata.message_type == kind and msg.content.config_records["config"]["server-round"] == rnd
                and at_node in (None, node)):
            raise Stop()  # the ServerApp process dies mid-round
        return None

    with pytest.raises(Stop):
        _run(other, tmp_path / "run", dp=True, epsilon=4.0, cnn_rounds=3, meta_dp_rounds=3, fail=stop_in_round_3)
    resumed, _ = _run(other, tmp_path / "run", dp=True, epsilon=4.0, cnn_rounds=3, meta_dp_rounds=3, resume=True)
    assert resumed["run"]["run_id"] == reference["run"]["run_id"] == "same-run"
    np.testing.assert_allclose(resumed["meta"]["coef"], reference["meta"]["coef"], atol=1e-10)
    for (_, a), (_, b) in zip(_site_vaults(sites), _site_vaults(other)):
        wa, _ = arrays_from_bytes(a.read(CNN_ROLE))
        wb, _ = arrays_from_bytes(b.read(CNN_ROLE))
        for k in wa:
            np.testing.assert_array_equal(wa[k], wb[k])
    log = (tmp_path / "run" / "run.log").read_text()
    assert "resuming run" in log
    for (_, a), (_, b) in zip(_site_vaults(sites), _site_vaults(other)):  # every release charged exactly once
        assert PrivacyLedger.load(b).spent_epsilon() == pytest.approx(PrivacyLedger.load(a).spent_epsilon())


def test_site_alone_rows_are_each_sites_own_models(sites: Path, tmp_path: Path) -> None:
    doc, _ = _run(sites, tmp_path / "run", dp=False, cnn_rounds=1, site_alone=True)
    alone = doc["site_alone"]
    assert set(alone["sites"]) == {"site-1", "site-2", "site-3"}
    defaults = RunSettings()
    for name, vault in _site_vaults(sites):
        data = SiteData.from_cohort(load_cohort(vault))
        scaler = fit_shared_scaler(data, max_glm_columns=defaults.glm_max_features)  # the site's own moments
        # its penalty is the one it chose by cross-validation (client.site_glm), refitted here
        chosen = load_local_models(vault)["site_glm"].C
        assert chosen in C_GRID
        glm = fit_glm(data, scaler, C=chosen)
        row = alone["sites"][name]
        for split, got in (("test", row["logreg"]["auc"]), ("validation", row["validation_auc"]["logreg"])):
            y = data.y[data.masks[split]]
            stats = compute_stats(y, glm.predict_proba(glm_matrix(data, split, scaler)), n_classes=2, n_bins=TEST_BINS)
            assert got == pytest.approx(metrics_from_stats(stats_from_released(released_arrays(stats),
                                                                               n_classes=2))["auc"], abs=1e-12)
        assert row["class_counts"] == [int(c) for c in np.bincount(data.y[data.masks["test"]], minlength=2)]
        # The best model alone is the one the site would pick: on its validation split, not on test.
        assert row["best_alone_chosen_on"] == "validation"
        assert row["best_alone"] == max(row["validation_auc"], key=row["validation_auc"].get)
        assert row["best_alone_auc"] == row[row["best_alone"]]["auc"]
    assert set(alone["mean_auc"]) >= {"federated_hybrid", "best_alone"}
    md = (tmp_path / "run" / "metrics.md").read_text()
    assert "What federation bought" in md and "| mean over sites |" in md and "on its validation split" in md
    assert "forest: each site's own random forest (local" in md
    report = (tmp_path / "run" / "report.html").read_text()
    assert "What federation bought" in report and "operating threshold" in report


def test_a_site_that_cannot_train_alone_in_time_stays_in_the_run(sites: Path, tmp_path: Path) -> None:
    """Training alone is a run's longest local work, in an exchange of its own: a site that does
    not finish it loses its site-alone rows, never its evaluation."""
    from client.privacy.egress import EgressLog

    def slow_alone(node: int, msg) -> str | None:
        return "silent" if node == 102 and msg.metadata.message_type == "train.alone" else None

    doc, _ = _run(sites, tmp_path / "run", dp=False, cnn_rounds=1, site_alone=True, fail=slow_alone,
                  round_timeout=1.0)
    assert set(doc["sites"]) == {"site-1", "site-2", "site-3"} and doc["missing_sites"] == {}
    alone = doc["site_alone"]
    assert set(alone["sites"]) == {"site-1", "site-3"}
    assert alone["without_models_alone"] == {"site-2": "no reply within 1 s"}
    assert "Site site-2 has no models alone (no reply within 1 s)" in (tmp_path / "run" / "metrics.md").read_text()
    phase = next(r for r in doc["rounds"] if r["phase"] == "alone")
    assert phase["sites"] == ["site-1", "site-3"]
    for name, vault in _site_vaults(sites):
        sent = [e for e in EgressLog(vault).entries() if e["run_id"] == doc["run"]["run_id"]]
        alone_replies = [e for e in sent if e["message_type"] == "train.alone"]
        assert len(alone_replies) == (0 if name == "site-2" else 1)
        for e in alone_replies:  # the models stay home: only the count leaves
            assert set(e["keys"]) == {"metrics.num-examples", "metrics.handler-seconds"}
        released = {k.split(".")[1] for e in sent if e["message_type"] == "evaluate" for k in e["keys"]
                    if k.startswith("stats.")}
        assert ("alone-cnn" in released) == (name != "site-2")


def test_a_held_out_site_only_evaluates(sites: Path, tmp_path: Path) -> None:
    from client.privacy.egress import EgressLog

    doc, _ = _run(sites, tmp_path / "run", dp=False, cnn_rounds=1, hold_out_site="site-3", site_alone=True)
    assert all("site-3" not in r["sites"] for r in doc["rounds"] if r["phase"] in ("moments", "cnn", "glm", "meta",
                                                                                    "validation"))
    assert set(doc["sites"]) == {"site-1", "site-2"}  # pooled and per-site metrics: the training sites
    held = doc["held_out"]
    assert held["site"] == "site-3" and set(held["federated"]) == {"hybrid", "cnn", "forest", "logreg", "site-logreg"}
    assert set(held["own"]) == {"cnn", "forest", "logreg"} and sum(held["class_counts"]) > 0
    vault = dict(_site_vaults(sites))["site-3"]
    # It trains its own models alone (only a count leaves) for the comparison, then evaluates.
    assert [e["message_type"] for e in EgressLog(vault).entries()] == ["query.census", "train.alone", "evaluate"]
    assert "Held-out site site-3" in (tmp_path / "run" / "metrics.md").read_text()
    with pytest.raises(CensusError, match="hold-out-site 'site-9' is not among"):
        _run(sites, tmp_path / "bad", dp=False, cnn_rounds=1, hold_out_site="site-9")


def test_warm_start_from_a_model_pretrained_on_a_public_cohort(sites: Path, tmp_path: Path) -> None:
    """``genofed pretrain`` writes a checkpoint that a run accepts as its starting point (layout
    checked), and the run's report says where the weights came from and what that means."""
    from common.spec import load_spec
    from client.importers import import_cohort
    from server.checkpoint import load_latest
    from simulations.pretrain import PretrainError, pretrain

    write_synthetic_cohort(out=tmp_path / "public", patients=200, seed=77)
    public = import_cohort(load_spec(tmp_path / "public" / "spec.toml"))
    summary = pretrain(public, out=tmp_path / "pre", source="the public test cohort", epochs=2, batch_size=64,
                       lr=2e-3, seed=0)
    assert summary["epochs_run"] <= 2 and 0.0 <= summary["validation_auc"] <= 1.0
    with pytest.raises(PretrainError, match="already exists"):
        pretrain(public, out=tmp_path / "pre", source="again", epochs=1, batch_size=64, lr=2e-3, seed=0)
    pretrained = load_latest(tmp_path / "pre").arrays
    sent = []

    def capture(node: int, msg) -> None:
        if msg.metadata.message_type == "train" and not sent:
            sent.append(from_record(msg.content.array_records["arrays"]))

    doc, _ = _run(sites, tmp_path / "run", dp=False, cnn_rounds=1, init_from=str(tmp_path / "pre"), fail=capture,
                  site_alone=True)
    for name, value in pretrained.items():
        np.testing.assert_array_equal(sent[0][name], value)
    # Each site's own model alone started from the same public weights (a fair comparison).
    from client.model_store import load_start_weights

    for _, vault in _site_vaults(sites):
        start = load_start_weights(vault, run_id=doc["run"]["run_id"])
        assert start is not None and all(np.array_equal(start[k], v) for k, v in pretrained.items())
    assert doc["site_alone"]["sites"]
    assert doc["init_origin"]["source"] == "the public test cohort"
    text = (tmp_path / "run" / "metrics.md").read_text()
    assert "pretrained without DP on a public cohort (the public test cohort" in text
    assert "nothing at all covers the data those weights were trained on" in text


def test_warm_start_from_an_earlier_run_with_its_layout_checked(sites: Path, tmp_path: Path) -> None:
    from server.checkpoint import load_latest, save_checkpoint
    from server.warm_start import WarmStartError

    _run(sites, tmp_path / "first", dp=False, cnn_rounds=1)
    earlier = load_latest(tmp_path / "first").arrays
    sent = []

    def capture(node: int, msg) -> None:
        if msg.metadata.message_type == "train" and not sent:
            sent.append(from_record(msg.content.array_records["arrays"]))

    doc, _ = _run(sites, tmp_path / "second", dp=False, cnn_rounds=1, init_from=str(tmp_path / "first"),
                  fail=capture)
    assert doc["init_from"] == str(tmp_path / "first")
    for name, value in earlier.items():
        np.testing.assert_array_equal(sent[0][name], value)
    assert "Warm start" in (tmp_path / "second" / "metrics.md").read_text()
    # Another layout (one array reshaped) is refused before any training, naming the file.
    bad = {k: (v[..., :1] if v.ndim > 1 else v) for k, v in earlier.items()}
    save_checkpoint(tmp_path / "other", phase="cnn", round=1, arrays=bad, state={"model_config": doc["run"]})
    with pytest.raises(WarmStartError, match="init-from .*ckpt.*another layout"):
        _run(sites, tmp_path / "third", dp=False, cnn_rounds=1, init_from=str(tmp_path / "other"))


def _three_class_layout(root: Path) -> Path:
    """The synthetic cohort with a third class, "mild" (every other control), that the
    patients of one natural site ("south") never have; split by that column: site south's splits
    hold two of the three classes, as a hospital without a rare subtype's patients does."""
    import csv

    from simulations.site_layout import split_cohort

    write_synthetic_cohort(out=root / "cohort", patients=360, seed=5)
    path = root / "cohort" / "clinical.csv"
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    controls = [r for r in rows if r["outcome"] == "control" and r["site_hint"] != "south"]
    for r in controls[::2]:
        r["outcome"] = "mild"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    spec = root / "cohort" / "spec.toml"
    spec.write_text(spec.read_text().replace('    "control",\n', '    "control",\n    "mild",\n', 1))
    split_cohort(spec_path=spec, sites=None, by="column", column="site_hint", out=root / "sites", seed=0,
                 vaults=True, show_progress=False)
    set_layout_policy(root / "sites", require_dp=False, test_statistics="exact")
    return root / "sites"


@pytest.mark.parametrize("dp", [False, True])
def test_a_multiclass_site_without_one_class_runs_explains_and_predicts(tmp_path: Path, dp: bool) -> None:
    from client.predict import SHAP_TOLERANCE, load_predictor, predict_patient

    sites = _three_class_layout(tmp_path)
    doc, _ = _run(sites, tmp_path / "run", dp=dp, epsilon=8.0, site_alone=True, explain=True)
    assert doc["run"]["classes"] == ["control", "mild", "case"] and set(doc["sites"]) == {"central", "north", "south"}
    assert doc["missing_sites"] == {} and 0.5 < doc["models"]["hybrid"]["auc"] <= 1.0
    vault = dict(_site_vaults(sites))["south"]
    predictor = load_predictor(vault)
    assert list(predictor.models.forest.classes_) == [0, 2]  # its forest never saw "mild"
    assert predictor.expected_value.shape == (3,) and predictor.expected_value[1] == 0.0
    for i in range(0, predictor.cohort.n, 17):
        out = predict_patient(predictor, index=i)
        check = out["attributions"]["forest"]["sum_check"]
        assert check["error"] <= SHAP_TOLERANCE
        assert len(out["models"]["forest"]["probabilities"]) == 3
    expl = json.loads((tmp_path / "run" / "explanation.json").read_text())
    assert expl["outputs"] == ["control", "mild", "case"]
