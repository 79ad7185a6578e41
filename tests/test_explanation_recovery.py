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

import pytest

from client.client_app import app as client_app
from client.cohort_store import load_cohort
from client.vault import KeySource, Vault
from common.settings import RunSettings
from server.phases import RunState
from server.server_app import run_federation
from simulations.explanation_scoring import (
    noised_explanation,
    pooled_explanation,
    precision_at,
    spearman_top,
    within_one_mismatch,
)
from simulations.site_layout import set_layout_policy, split_cohort
from simulations.synthetic import write_synthetic_cohort
from tests.local_grid import LocalGrid, fixed_key_bytes, node_configs

pytestmark = pytest.mark.slow  # (nearly) every test here runs a federation; tests/conftest.py orders files by it

RUN = dict(cnn_rounds=4, local_epochs=2, forest_trees=100, wait_timeout=2.0, round_timeout=600.0,
           test_statistics="exact", site_alone=False, explanation_patients=150)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("recovery")
    write_synthetic_cohort(out=root / "cohort", patients=3000, seed=5)
    # Fixed vault keys and run id: the sites seed their forests from them, and the agreement with a
    # pooled analysis varies with those seeds (docs/explanations.md: 0.89-0.98 over 20 runs). Fixed,
    # every run of this module measures the same federation.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("client.vault.secrets.token_bytes", fixed_key_bytes(0))
        mp.setattr("server.server_app.new_state", lambda: RunState(run_id="recovery01"))
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


def _truth(root: Path) -> dict[str, Any]:
    return json.loads((root / "cohort" / "truth.json").read_text())


def _precision_at_10(features: list[dict[str, Any]], root: Path) -> float:
    schema = load_cohort(_vaults(root)[0][1]).schema
    return precision_at(features, schema=schema, truth=_truth(root), k=10)


def test_the_feature_ranking_recovers_the_planted_features(run: dict[str, Any]) -> None:
    precision = _precision_at_10(run["explanation"]["features"], run["root"])
    assert precision >= 0.9, precision


def test_the_top_motif_is_a_planted_one_within_one_mismatch(run: dict[str, Any]) -> None:
    top = run["explanation"]["motifs"][0]["kmer"]
    assert any(within_one_mismatch(top, m["consensus"]) for m in _truth(run["root"])["motifs"]), top


def test_the_federated_ranking_agrees_with_a_pooled_analysis(run: dict[str, Any]) -> None:
    """SHAP of the tabular models fitted on the pooled sites (a forest, the GLM at ``glm-c`` and one
    at the penalty the sites' own rule picks), on the pooled validation splits, ranks the top features
    like the federation's sums (Spearman over the pooled top 30); the federated GLM's own ranking
    is the pooled GLM's.

    The site forests rank the tail (near ties of weak features) unlike a forest on three times their
    data, so the consensus's agreement falls with the forests' share of the stack: 0.96-0.98 over
    the 15 of 20 runs with random seeds whose stack kept the site GLM, 0.89-0.97 over the 5 whose
    stack dropped it (docs/explanations.md). The fixture fixes the seeds; the bound is on the top 30."""
    from common.cohort import concat_cohorts

    cohort = concat_cohorts([load_cohort(v) for _, v in _vaults(run["root"])])
    pooled = pooled_explanation(cohort, shares=run["explanation"]["shares"], trees=RUN["forest_trees"],
                                glm_c=RunSettings().glm_c)
    reference = pooled["features"]
    rho = spearman_top(reference, run["explanation"]["features"], top=30)
    assert rho >= 0.9, (rho, [f["feature"] for f in reference[:30]])
    glm = spearman_top(pooled["models"]["logreg"]["features"], run["explanation"]["models"]["logreg"]["features"],
                       top=30)
    assert glm >= 0.98, glm


def test_a_noised_release_at_epsilon_1_still_recovers_the_truth(run: dict[str, Any]) -> None:
    """Every site makes a real DP explanation release of the final models, charged to its ledger."""
    from client.privacy.ledger import PrivacyLedger

    root = run["root"]
    settings = RunSettings(dp=True, **{**RUN, "explanation_epsilon": 1.0})
    sites = [(name, root / "sites" / name / "vault", root / "sites" / name / "key") for name, _ in _vaults(root)]
    noised = noised_explanation(sites, run_id="noised-explanation", settings=settings)
    for name, vault in _vaults(root):
        charged = [r for r in PrivacyLedger.load(vault).releases if r.label == "explanation"]
        assert len(charged) == 1 and charged[0].run_id == "noised-explanation", name
    precision = _precision_at_10(noised["features"], root)
    assert precision >= 0.8, precision
