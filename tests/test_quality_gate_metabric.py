"""The federation's quality gate on real data: federated against pooled, on METABRIC.

On the METABRIC recipe (5 centres, tabular: the deep model is a dense network), against the pooled
reference with per-site forests (what a federation can reach when forests never leave their sites):
the federated GLM is the pooled fit, and the federated hybrid is within 0.03 of that reference
without DP (0.05 at epsilon 8) and not more than 0.03 below its best federated base model. Why not
issue 9's 0.01 and 0.005: each run's forests are seeded from the sites' keys, and the hybrid is chosen
on about 300 validation patients; over six federated runs of one layout without DP the hybrid read
0.678-0.701 against the reference's 0.700 (docs/learning.md, "Issue 9's table"): those bars are
inside the run-to-run spread.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from simulations.cli import main
from tests.recipe_reference import DATA, recipe_with_pooled_reference

pytestmark = [pytest.mark.realdata, pytest.mark.slow, pytest.mark.timeout(900),
              pytest.mark.skipif(not DATA.is_dir(), reason=f"shared data folder {DATA} not present")]


def test_federated_metabric_reaches_the_site_forest_reference(tmp_path: Path) -> None:
    sites, pooled = recipe_with_pooled_reference(tmp_path, "metabric")
    assert main(["simulate", "--sites-dir", str(sites), "--no-dp", "--set", 'test-statistics="exact"',
                 "--set", "explain=false", "--out", str(tmp_path / "fed")]) == 0
    fed = json.loads((tmp_path / "fed" / "metrics.json").read_text())
    auc = {name: m["auc"] for name, m in fed["models"].items()}
    # The GLM has no randomness: federated Newton steps on summed statistics reach the pooled fit, and
    # its AUC differs only by the released 32-bin histograms' rounding (measured 0.0009).
    assert auc["logreg"] == pytest.approx(pooled["models"]["logreg"]["auc"], abs=0.003)
    assert auc["hybrid"] == pytest.approx(pooled["reference_site_forests"]["hybrid"]["auc"], abs=0.03)
    # The hybrid is whichever of the stacks and base models led on the sites' summed validation
    # statistics (or, where one site model led, the site's two averaged); on test it may trail a base model by what 300 validation patients cannot tell apart
    # (AUC standard error 0.034): measured 0.000 in five runs, -0.012 in a sixth.
    fallback = fed["meta"]["fallback"]
    assert fallback["chosen"] == (fallback["model"] or "hybrid")
    best = max(fallback["validation_auc"].values())
    if fallback.get("reason") == "site-average":  # the site's two models averaged, within its margin of the best
        assert best - fallback["validation_auc"][fallback["chosen"]] <= fallback["site_average_margin"]
    else:
        assert fallback["validation_auc"][fallback["chosen"]] == best
    assert auc["hybrid"] >= max(auc[m] for m in ("cnn", "forest", "logreg")) - 0.03
    # The dense deep model learns in federation as in pooled training (measured -0.001 to +0.007).
    assert auc["cnn"] >= pooled["models"]["cnn"]["auc"] - 0.03
    # Every site's comparison with its own models alone is reported, with its test class counts.
    alone = fed["site_alone"]
    assert set(alone["sites"]) == set(fed["sites"]) == {f"cohort-{i}" for i in range(1, 6)}
    assert all(sum(site["class_counts"]) == fed["sites"][name]["n"] for name, site in alone["sites"].items())

    # At epsilon 8 (the DP deep model and GLM near chance at these sizes, the hybrid mostly its forest by
    # fallback): within 0.05 of the same reference, the floor of 0.660 that 0.04 below the uncalibrated
    # reference's 0.700 set before the reference read the site models through their Platt maps (0.711).
    # Measured against 0.711 over twelve runs of this layout: -0.045 to -0.003, mean -0.021 (issue 9's
    # 0.03 missed in two): what spreads them is the sites' forests, seeded per run (pooled test AUC
    # 0.682-0.699 over 24 seeds offline), not DP (docs/learning.md, "The epsilon-8 gate on METABRIC").
    assert main(["simulate", "--sites-dir", str(sites), "--epsilon", "8", "--set", 'test-statistics="exact"',
                 "--set", "site-alone=false", "--set", "explain=false", "--out", str(tmp_path / "dp")]) == 0
    dp = json.loads((tmp_path / "dp" / "metrics.json").read_text())
    dp_auc = {name: m["auc"] for name, m in dp["models"].items()}
    assert dp_auc["hybrid"] == pytest.approx(pooled["reference_site_forests"]["hybrid"]["auc"], abs=0.05)
    assert dp_auc["hybrid"] >= max(dp_auc[m] for m in ("cnn", "forest", "logreg")) - 0.03
    assert all(0 < site["epsilon"] <= site["budget"] for site in dp["privacy"].values())
