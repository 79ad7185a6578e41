"""``stack-forest = false``: under DP the hybrid reads only the DP-trained deep model and GLM.

The forest is fitted without DP, so a hybrid that stacks it (or falls back to it) gives its training
patients away (tests/test_membership.py). With ``stack-forest = false`` the forest's weights stay at
exactly 0 through the noised Newton rounds, the forest's scores never enter the meta statistics,
the hybrid never falls back to it, and the report says so; a site's policy can demand it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from client.client_app import app as client_app
from client.privacy.facade import set_policy
from client.vault import KeySource, Vault
from common.settings import RunSettings
from server.checkpoint import load_latest
from server.phases import CensusError
from server.server_app import run_federation
from simulations.membership import hybrid_local_weight
from tests.local_grid import LocalGrid, node_configs, reference_layout

pytestmark = pytest.mark.slow  # (nearly) every test here runs a federation; tests/conftest.py orders files by it

FAST = dict(cnn_rounds=2, local_epochs=1, forest_trees=20, wait_timeout=2.0, round_timeout=60.0,
            test_statistics="exact", site_alone=False, glm_rounds=2, meta_rounds=3, explain=False)


@pytest.fixture(scope="module")
def sites_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return reference_layout(tmp_path_factory.mktemp("stack-forest"), patients=300)


@pytest.fixture()
def sites(sites_template: Path, tmp_path: Path) -> Path:
    shutil.copytree(sites_template, tmp_path / "sites")
    return tmp_path / "sites"


def _run(sites: Path, run_dir: Path, **settings) -> dict:
    run = RunSettings(run_dir=str(run_dir), **{**FAST, **settings})
    return run_federation(LocalGrid(client_app, node_configs(sites), run_config=run.to_run_config()), run)


def _site_dirs(sites: Path) -> list[Path]:
    return [p for p in sorted(sites.iterdir()) if (p / "vault").is_dir()]


def test_under_dp_the_hybrid_keeps_a_zero_weight_on_the_site_models(sites: Path, tmp_path: Path) -> None:
    doc = _run(sites, tmp_path / "run", dp=True, epsilon=4.0, stack_forest=False)
    state = load_latest(tmp_path / "run").state
    local = np.asarray(state["meta_coef"])[[1, 3]]  # binary: [cnn, forest, logreg, site-logreg, intercept]
    assert np.all(local == 0.0) and doc["meta"]["fallback"].get("model") not in ("forest", "site-logreg"), \
        state["meta_coef"]
    assert all(hybrid_local_weight(s) == 0.0 for s in _site_dirs(sites))
    assert doc["meta"]["stack_forest"] is False
    assert "stack-forest = false" in doc["model_roles"]["hybrid"] or doc["meta"]["fallback"]["model"] in ("cnn", "logreg")
    assert "the hybrid does not read them, stack-forest = false" in doc["privacy_note"]
    fitted = doc["meta"]["fallback"].get("fitted_coef", state["meta_coef"])
    assert fitted[1] == fitted[3] == 0.0, fitted  # what the noised rounds fitted, before any fallback
    # The reduced stacks that equal the hybrid (without a site model) or keep nothing (without both
    # shared ones) are not released: they would only add noise to the validation statistics.
    stacks = set(doc["meta"]["fallback"]["validation_auc"]) - {"hybrid", "cnn", "forest", "logreg", "site-logreg"}
    assert stacks == {"hybrid-without-cnn", "hybrid-without-logreg"}, stacks


def test_the_default_hybrid_says_its_site_models_are_outside_the_guarantee(sites: Path, tmp_path: Path) -> None:
    doc = _run(sites, tmp_path / "run", dp=True, epsilon=4.0)
    assert doc["meta"]["stack_forest"] is True
    assert "the hybrid stacks them: its predictions at a site tell training patients from others" \
        in doc["privacy_note"]


def test_a_site_policy_can_keep_its_forest_out_of_the_hybrid(sites: Path, tmp_path: Path) -> None:
    for p in _site_dirs(sites):
        set_policy(Vault.open(p / "vault", KeySource.from_key_file(p / "key")), site=p.name, n_records=100,
                   stack_forest=False)
    with pytest.raises(CensusError, match="its policy keeps its own forest and GLM .* out of the hybrid and the run "
                                          "asks for stack-forest = true"):
        _run(sites, tmp_path / "refused", dp=True, epsilon=4.0)
    doc = _run(sites, tmp_path / "run", dp=True, epsilon=4.0, stack_forest=False)
    assert doc["models"]["hybrid"]["auc"] >= 0.0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["meta"]["stack_forest"] is False
