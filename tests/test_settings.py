"""One typed run-settings contract, parsed the same way by the coordinator and every site."""

from __future__ import annotations

import tomllib
from dataclasses import fields
from pathlib import Path

import pytest

from common.settings import RoundFacts, RunSettings, SettingsError

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_defaults_are_the_settings_defaults() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    keys = {f.name.replace("_", "-") for f in fields(RunSettings)}
    assert set(config) == keys  # no key read on one side only, none forgotten
    assert RunSettings.from_run_config(config) == RunSettings()


def test_round_trip_and_kebab_keys() -> None:
    s = RunSettings(cnn_rounds=7, strategy="fedprox", meta_c=0.5, test_statistics="none")
    cfg = s.to_run_config()
    assert cfg["cnn-rounds"] == 7 and cfg["meta-c"] == 0.5 and "site-epsilon-budget" not in cfg
    assert RunSettings.from_run_config(cfg) == s
    assert s.fedprox_mu == s.proximal_mu and RunSettings(strategy="fedavg").fedprox_mu == 0.0


def test_the_fallback_margin_in_force_follows_dp() -> None:
    """Under DP the stacking fallback reads meta-dp-fallback-margin, without DP meta-fallback-margin."""
    s = RunSettings(meta_fallback_margin=0.25, meta_dp_fallback_margin=2.0)
    assert s.fallback_margin == 2.0 and RunSettings(dp=False, meta_fallback_margin=0.25).fallback_margin == 0.25
    assert RunSettings().fallback_margin == 1.0 and RunSettings(dp=False).fallback_margin == 0.0


def test_the_meta_rounds_in_force_follow_dp() -> None:
    """Without DP meta-rounds caps a fit that stops when converged; under DP meta-dp-rounds is the
    number of noised releases, planned and charged whatever meta-rounds says; 0 (the default) means
    public weights and no release."""
    assert RunSettings().meta_fit_rounds == 0 and RunSettings().public_meta_weights
    assert RunSettings(dp=False).meta_fit_rounds == 8 and not RunSettings(dp=False).public_meta_weights
    assert RunSettings(meta_rounds=2, meta_dp_rounds=5).meta_fit_rounds == 5
    assert not RunSettings(meta_dp_rounds=5).public_meta_weights
    assert RunSettings(dp=False, meta_rounds=2, meta_dp_rounds=5).meta_fit_rounds == 2


@pytest.mark.parametrize(("cfg", "match"), [
    ({"meta-dp-rounds": -1}, r"run config meta-dp-rounds = -1: must be >= 0 \(0: public weights"),
    ({"meta-rounds": 0}, r"run config meta-rounds = 0: must be at least 1"),
    ({"cnn-rounds": "many"}, r"run config cnn-rounds = 'many': expected int"),
    ({"dp": "perhaps"}, r"run config dp = 'perhaps': expected bool"),
    ({"epsilon": 0.0}, r"run config epsilon = 0.0: must be > 0"),
    ({"delta": 1.5}, r"run config delta = 1.5: must be in \[0, 1\)"),
    ({"strategy": "fedsgd"}, r"strategy = 'fedsgd': choose one of fedavg"),
    ({"test-statistics": "loud"}, r"test-statistics = 'loud': choose one of none, noised, exact"),
    ({"meta-fallback-margin": -0.5}, r"meta-fallback-margin = -0.5: must be >= 0"),
    ({"site-average-margin": -1.0}, r"site-average-margin = -1.0: must be >= 0"),
    ({"meta-dp-fallback-margin": -1.0}, r"meta-dp-fallback-margin = -1.0: must be >= 0"),
])
def test_bad_values_are_named(cfg: dict, match: str) -> None:
    with pytest.raises(SettingsError, match=match):
        RunSettings.from_run_config(cfg)


def test_release_settings_leave_out_where_and_how_long() -> None:
    a = RunSettings(run_dir="/a", resume=False).release_settings()
    b = RunSettings(run_dir="/b", resume=True, round_timeout=5.0).release_settings()
    assert a == b and "epsilon" in a


def test_round_facts_carry_only_the_exchange() -> None:
    facts = RoundFacts(run_id="r1", server_round=3, model_config="{}", coef=(0.5, -1.0), warm_start=True)
    cfg = facts.to_config()
    assert set(cfg) == {"run-id", "server-round", "warm-start", "model-config", "coef"}
    assert RoundFacts.from_config({**cfg, "epsilon": 99.0, "dp": False}) == facts  # settings in a message: ignored
    with pytest.raises(SettingsError, match="not a genofed exchange"):
        RoundFacts.from_config({"server-round": 1})
