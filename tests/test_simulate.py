"""`genofed simulate` end to end: Flower's Simulation Engine (a SuperLink in simulation mode, Ray,
one simulated SuperNode per site vault), driven through the console script as a user would."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from simulations.cli import main
from simulations.site_layout import split_cohort
from simulations.synthetic import write_synthetic_cohort

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_simulation_engine_run_completes(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    write_synthetic_cohort(out=tmp_path / "cohort", patients=240, seed=11)
    split_cohort(spec_path=tmp_path / "cohort" / "spec.toml", sites=3, by="iid", out=tmp_path / "sites", seed=0,
                 vaults=True, show_progress=False)
    out = tmp_path / "run"
    monkeypatch.chdir(tmp_path)  # relative paths, as a user types them
    assert main(["simulate", "--sites-dir", "sites", "--out", "run", "--rounds", "1",
                 "--epsilon", "4", "--set", "forest-trees=10", "--set", "glm-rounds=2",
                 "--set", "local-epochs=1", "--set", "secure-sum=true"]) == 0
    doc = json.loads((out / "metrics.json").read_text())
    assert set(doc["sites"]) == {"site-1", "site-2", "site-3"}
    # census, then the summed exchanges (moments, CNN round, GLM rounds, meta rounds, validation, explanation,
    # evaluation), each followed by its unmask, and the secure sum's keys and shares once; no sites' own models
    # alone: their figures are per site, which the secure sum hides
    summed = 1 + 1 + doc["glm"]["rounds"] + doc["meta"]["rounds"] + 3
    assert doc["run"]["exchanges"] == 1 + summed + summed + 2
    assert sum(r.get("phase") == "secure-unmask" for r in doc["rounds"]) == summed
    assert doc["site_alone"] == {} and all("hybrid" not in v for v in doc["sites"].values())
    for p in doc["privacy"].values():  # DP-SGD near its target; the ledger adds the other releases, composed
        assert 0 < p["run_epsilon"] <= 4.0 + 0.02 and p["run_epsilon"] < p["epsilon"] <= 4.0 + 1.5
    assert (out / "report.html").exists() and "run directory" in capsys.readouterr().out
    # Nothing keeps running: the private SuperLink was stopped.
    log = (out / ".flower" / "superlink.log").read_text()
    assert log  # it did run
    # The same sites, asked for a run without DP: every site's default policy refuses it at the census,
    # and the user reads one line naming each site and why (once: the three refused for the same
    # reason), not a traceback.
    capsys.readouterr()
    assert main(["simulate", "--sites-dir", str(tmp_path / "sites"), "--out", str(tmp_path / "nodp"), "--no-dp"]) == 1
    stderr = capsys.readouterr().err
    err = [line for line in stderr.splitlines() if line.startswith("genofed: error")]  # (the rest: progress)
    assert len(err) == 1 and err[0].startswith("genofed: error: run ") and "Traceback" not in stderr
    assert err[0].count("its policy requires differential privacy") == 1
    assert "site-1, site-2, site-3: census: refused by the site's privacy policy" in err[0]
    refused = json.loads((tmp_path / "nodp" / "events.jsonl").read_text().splitlines()[-1])
    assert refused["event"] == "failed"


def test_simulate_refuses_a_missing_layout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--sites-dir", str(tmp_path / "nope"), "--out", str(tmp_path / "run")]) == 1
    assert "not a folder; make one with `genofed cohort split --vaults`" in capsys.readouterr().err
