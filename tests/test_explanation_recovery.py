"""The global explanation recovers what was planted, agrees with a pooled analysis, and survives its noise.

One federated run (real ServerApp phases and ClientApp handlers over a LocalGrid) on a synthetic
cohort of 3,000 patients over 3 sites, without DP, writes ``explanation.json``; the planted truth
is ``truth.json``. The noised case then asks every site for a real DP explanation release
(epsilon 1, charged to its ledger) of the same final models.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from client.client_app import app as client_app
from client.cohort_store import load_cohort
from client.handlers import public_schema
from client.vault import KeySource, Vault
from common.explanation import BASES, feature_layout, global_explanation, motif_layout
from common.settings import RoundFacts, RunSettings
from server.server_app import run_federation
from simulations.site_layout import set_layout_policy, split_cohort
from simulations.synthetic import write_synthetic_cohort
from tests.local_grid import LocalGrid, node_configs

RUN = dict(cnn_rounds=4, local_epochs=2, forest_trees=100, wait_timeout=2.0, round_timeout=600.0,
           test_statistics="exact", site_alone=False, explanation_patients=150)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("recovery")
    write_synthetic_cohort(out=root / "cohort", patients=3000, seed=5)
    split_cohort(spec_path=root / "cohort" / "spec.toml", sites=3, by="iid", out=root / "sites", seed=0,
                 vaults=True, show_progress=False)
    set_layout_policy(root / "sites", require_dp=False, test_statistics="exact")
    settings = RunSettings(run_dir=str(root / "run"), dp=False, **RUN)
    doc = run_federation(LocalGrid(client_app, node_configs(root / "sites"), run_config=settings.to_run_config()),
                         settings)
    return {"root": root, "doc": doc, "explanation": json.loads((root / "run" / "explanation.json").read_text())}


def _vaults(root: Path) -> list[tuple[str, Vault]]:
    return [(p.name, Vault.open(p / "vault", KeySource.from_key_file(p / "key")))
            for p in sorted((root / "sites").iterdir()) if (p / "vault").is_dir()]


def _names(root: Path) -> dict[str, str]:
    """Public label -> the sites' own name (the test holds the cohort, as a site does)."""
    schema = load_cohort(_vaults(root)[0][1]).schema
    return dict(zip(feature_layout(public_schema(schema)).names, feature_layout(schema, named=True).names))


def _planted(root: Path) -> set[str]:
    truth = json.loads((root / "cohort" / "truth.json").read_text())
    prefix = {"variants": "variant", "omics": "omics", "events": "events", "clinical": "clinical"}
    out = {f"{prefix[t['modality']]}:{t['feature'].split('=')[0]}" for t in truth["label_model"]["terms"]
           if t["modality"] in prefix}
    return out | {f"variant:{truth['interaction']['site']}"}


def _precision_at_10(features: list[dict[str, Any]], root: Path) -> float:
    names, planted = _names(root), _planted(root)
    return sum(names[f["feature"]] in planted for f in features[:10]) / 10


def test_the_feature_ranking_recovers_the_planted_features(run: dict[str, Any]) -> None:
    assert _precision_at_10(run["explanation"]["features"], run["root"]) >= 0.9


def test_the_top_motif_is_a_planted_one_within_one_mismatch(run: dict[str, Any]) -> None:
    truth = json.loads((run["root"] / "cohort" / "truth.json").read_text())
    top = run["explanation"]["motifs"][0]["kmer"]
    assert any(_within_one_mismatch(top, m["consensus"]) for m in truth["motifs"]), top


def _within_one_mismatch(kmer: str, motif: str) -> bool:
    rc = motif[::-1].translate(str.maketrans(BASES, BASES[::-1]))
    return any(sum(a != b for a, b in zip(kmer, s[i:i + len(kmer)])) <= 1
               for s in (motif, rc) for i in range(len(s) - len(kmer) + 1))


def test_the_federated_ranking_agrees_with_a_pooled_analysis(run: dict[str, Any]) -> None:
    """SHAP of a forest and a GLM fitted on the pooled sites, on the pooled validation splits, ranks
    the top features like the federation's sums (Spearman over the pooled top 20)."""
    from scipy.stats import spearmanr

    from client.explain import attribution_sums, forest_attributions, linear_attributions
    from client.pipeline import SiteData, fit_forest, fit_glm, fit_shared_scaler, fit_tabular_preprocessor, \
        forest_matrix, glm_matrix
    from common.cohort import concat_cohorts
    from common.explanation import consensus_ranking

    cohort = concat_cohorts([load_cohort(v) for _, v in _vaults(run["root"])])
    data = SiteData.from_cohort(cohort)
    layout = feature_layout(cohort.schema, named=True)
    pre = fit_tabular_preprocessor(data)
    forest = fit_forest(data, pre, n_estimators=RUN["forest_trees"], random_state=0)
    scaler = fit_shared_scaler(data, max_glm_columns=256)
    glm = fit_glm(data, scaler, C=RunSettings().glm_c)
    x = glm_matrix(data, "validation", scaler)
    phi = linear_attributions(_flat(glm), x, n_classes=2)
    full = np.zeros((*phi.shape[:2], len(layout.column_feature)))
    full[:, :, scaler.glm_columns] = phi
    sums = {f"forest.{k}": v for k, v in attribution_sums(layout.group(
        forest_attributions(forest, forest_matrix(data, "validation", pre))), clip=1.0, normalize=True).items()}
    sums |= {f"logreg.{k}": v for k, v in attribution_sums(layout.group(full), clip=1.0, normalize=True).items()}
    pooled = global_explanation(sums, schema=public_schema(cohort.schema), classes=list(cohort.classes),
                                patients=int(data.masks["validation"].sum()), motifs=None)
    ranking = consensus_ranking(pooled["models"], run["explanation"]["shares"], feature_layout(
        public_schema(cohort.schema)), pooled["outputs"])
    fed = {f["feature"]: f["importance"] for f in run["explanation"]["features"]}
    top = [f["feature"] for f in ranking[:20]]
    rho = spearmanr([f["importance"] for f in ranking[:20]], [fed[t] for t in top]).statistic
    assert rho >= 0.9, (rho, top)


def _flat(glm: Any) -> np.ndarray:
    from common.meta import flat_coef

    return flat_coef(glm)


def test_a_noised_release_at_epsilon_1_still_recovers_the_truth(run: dict[str, Any]) -> None:
    """Every site makes a real DP explanation release of the final models, charged to its ledger."""
    from client.explain_release import explain
    from client.model_store import CNN_ROLE, META_ROLE, SHARED_ROLE, arrays_from_bytes
    from client.privacy.ledger import PrivacyLedger
    from client.site import SiteRef

    root = run["root"]
    settings = RunSettings(dp=True, **{**RUN, "explanation_epsilon": 1.0})
    total: dict[str, np.ndarray] = {}
    patients = 0
    schema = None
    for name, vault in _vaults(root):
        cnn, meta = arrays_from_bytes(vault.read(CNN_ROLE))
        shared = arrays_from_bytes(vault.read(SHARED_ROLE))[0]
        coefs = json.loads(vault.read(META_ROLE))
        facts = RoundFacts(run_id="noised-explanation", model_config=json.dumps(meta["config"]),
                           coef=tuple(coefs["coef"]), glm_coef=tuple(coefs["glm_coef"]))
        site = SiteRef(name=name, vault=root / "sites" / name / "vault", key_file=root / "sites" / name / "key")
        reply = explain(site, cnn, shared, settings, facts)
        for key, value in reply.values("summary").items():
            total[key] = total.get(key, 0.0) + value
        patients += reply.values("metrics")["num-examples"]
        assert reply.values("metrics")["noise-std"] > 0
        charged = [r for r in PrivacyLedger.load(vault).releases if r.label == "explanation"]
        assert len(charged) == 1 and charged[0].run_id == "noised-explanation"
        schema = public_schema(load_cohort(vault).schema)
        model_config = meta["config"]
    noised = global_explanation(total, schema=schema, classes=run["explanation"]["classes"], patients=patients,
                                motifs=motif_layout(schema, model_config, k=settings.motif_k,
                                                    bins=settings.motif_bins))
    precision = _precision_at_10(noised["features"], root)
    assert precision >= 0.8, precision
