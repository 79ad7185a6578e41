"""A recipe's site layout with its pooled, non-private reference: the quality gates' common start."""

from __future__ import annotations

import json
from pathlib import Path

from simulations.cli import main
from simulations.site_layout import set_layout_policy

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def recipe_with_pooled_reference(tmp_path: Path, recipe: str) -> tuple[Path, dict]:
    """The recipe's layout, each site allowing the non-private reference, and its pooled ``metrics.json``."""
    sites = tmp_path / "sites"
    assert main(["cohort", "recipe", recipe, "--data", str(DATA), "--out", str(sites), "--vaults"]) == 0
    # The non-private reference: every site's officer allows it, and exact test statistics.
    set_layout_policy(sites, require_dp=False, test_statistics="exact")
    assert main(["evaluate", "--sites-dir", str(sites), "--no-dp", "--out", str(tmp_path / "pooled"),
                 "--bootstrap", "1"]) == 0
    return sites, json.loads((tmp_path / "pooled" / "metrics.json").read_text())
