"""``genofed bench``: medians over repeats, ratios to the baseline of the same run, JSON + Markdown.

The benchmarks' figures are measured by running them (README, "Results"); here the framework's
arithmetic is checked on known samples, and the quickest benchmark runs end to end.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from simulations.bench import BenchError, BenchResult, run_bench
from simulations.cli import main


def test_medians_over_repeats_and_ratios_to_the_baseline() -> None:
    result = BenchResult(name="x", title="X", baseline="base", measures={"s": "seconds", "mb": "memory (MB)"},
                         params={}, repeats=3)
    result.samples = {"base": [{"s": 2.0, "mb": 10.0}, {"s": 4.0, "mb": 30.0}, {"s": 3.0, "mb": 20.0}],
                      "fast": [{"s": 1.0}, {"s": 1.5}, {"s": 9.0}]}
    result.summarise()
    assert result.medians == {"base": {"s": 3.0, "mb": 20.0}, "fast": {"s": 1.5}}
    assert result.ratios["fast"] == {"s": 0.5} and result.ratios["base"] == {"s": 1.0, "mb": 1.0}
    table = result.markdown()
    assert "| base (baseline) | 3 | 20.0 |" in table
    assert "| fast | 1.5 (0.50x) | n/a |" in table
    assert "Medians over 3 repeat(s)" in table


def test_unknown_benchmark_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(BenchError, match="unknown benchmark 'nope'; choose from deployment"):
        run_bench("nope", tmp_path)


@pytest.mark.slow
def test_throughput_bench_writes_json_and_markdown(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "throughput", "--out", str(tmp_path / "b"), "--quick", "--repeats", "1"]) == 0
    doc = json.loads((tmp_path / "b" / "throughput.json").read_text())
    assert doc["baseline"] == "plain-pytorch" and doc["repeats"] == 1
    for variant in ("plain-pytorch", "genofed"):
        med = doc["medians"][variant]
        assert med["samples_per_s"] > 0 and 0 < med["of_matmul_peak"] < 1.5
    assert doc["ratios"]["plain-pytorch"]["samples_per_s"] == 1.0
    assert (tmp_path / "b" / "throughput.md").read_text() in capsys.readouterr().out


@pytest.mark.slow
def test_scale_bench_measures_memory_and_the_same_bytes_per_site_at_any_size(tmp_path: Path) -> None:
    result = run_bench("scale", tmp_path / "b", quick=True, repeats=1)
    small, large = result.medians["3 sites"], result.medians["6 sites"]
    for med in (small, large):
        assert med["round_s"] > 0 and 0 < med["peak_mb"] < 24 * 1024
        # the default deep model (about 29,000 float32 weights) goes down and its update comes up
        assert med["round_kb_per_site"] > 2 * 4 * 25_000 / 1000 and med["run_kb_per_site"] > med["round_kb_per_site"]
    # a site sends and receives the same model however many sites there are
    assert large["round_kb_per_site"] == pytest.approx(small["round_kb_per_site"], rel=0.05)
    assert (tmp_path / "b" / "scale.md").read_text().startswith("### Simulated federations")


@pytest.mark.parametrize("module", ["dp_glm", "dp_meta", "fedavg_gap", "forest_selection", "site_glm_stack",
                                    "site_glm_c"])
@pytest.mark.parametrize("make", ["missing", "empty"])
def test_a_benchmark_given_no_layout_says_so_in_one_line(module: str, make: str, tmp_path: Path, capsys) -> None:
    """A benchmark pointed at a missing folder, or at one without site vaults, exits with one line
    naming the folder and what to give instead, not a traceback."""
    import importlib

    from simulations.benchmarks import run_main

    where = tmp_path / "layout"
    if make == "empty":
        where.mkdir()
    bench = importlib.import_module(f"simulations.benchmarks.{module}")
    with pytest.raises(SystemExit) as exit_:
        run_main(lambda: bench.main([str(where)]), f"python -m simulations.benchmarks.{module}")
    assert exit_.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"python -m simulations.benchmarks.{module}: error: {where}: ")
    assert "genofed cohort split --vaults" in err


@pytest.mark.parametrize("make", ["no-run", "no-layout"])
def test_stack_candidates_given_no_run_or_no_layout_says_so_in_one_line(make: str, tmp_path: Path, capsys) -> None:
    """The candidates benchmark needs a finished run's metrics.json and the layout it trained: either
    missing is one line naming the folder, not a traceback."""
    from simulations.benchmarks import run_main
    from simulations.benchmarks.stack_candidates import main

    run_dir, sites = tmp_path / "run", tmp_path / "sites"
    if make == "no-layout":
        run_dir.mkdir()
        (run_dir / "metrics.json").write_text('{"meta": {"coef": [0.5, 0.5, 0.0, 0.0, 0.0]}}')
    prog = "python -m simulations.benchmarks.stack_candidates"
    with pytest.raises(SystemExit) as exit_:
        run_main(lambda: main([str(run_dir), str(sites)]), prog)
    assert exit_.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    where = run_dir / "metrics.json" if make == "no-run" else sites
    assert err.startswith(f"{prog}: error: {where}: ")


def test_site_glm_c_scores_each_sites_glm_at_the_fixed_and_the_chosen_penalty(tmp_path: Path) -> None:
    from client.site_glm import C_GRID
    from simulations.benchmarks.site_glm_c import run
    from simulations.site_layout import split_cohort
    from simulations.synthetic import write_synthetic_cohort

    write_synthetic_cohort(out=tmp_path / "cohort", patients=300, seed=5)
    split_cohort(spec_path=tmp_path / "cohort" / "spec.toml", sites=3, by="iid", out=tmp_path / "sites", seed=0,
                 vaults=True, show_progress=False)
    fixed = run(sites_dir=tmp_path / "sites", glm_c=0.1, seed=0)
    assert fixed["sites"] == 3 and len(fixed["chosen_c"]) == 3 and set(fixed["chosen_c"]) <= set(C_GRID)
    for name in ("fixed", "chosen"):
        assert 0.0 <= fixed[name]["pooled_test_auc"] <= 1.0 and fixed[name]["sites_in_mean"] == 3
    # a fixed penalty that is one of the grid's and that every site chose scores the same both ways
    only = run(sites_dir=tmp_path / "sites", glm_c=fixed["chosen_c"][0], seed=0)
    if len(set(fixed["chosen_c"])) == 1:
        assert only["fixed"] == only["chosen"]
    else:
        assert only["fixed"] != only["chosen"]


def test_explanation_recovery_spread_is_the_range_over_federations() -> None:
    from simulations.benchmarks.explanation_recovery import SPREAD_KEYS, spread

    runs = [{k: v for k in SPREAD_KEYS} | {"top_motif": "GAATTT"} for v in (0.9, 0.7, 1.0)]
    out = spread(runs)
    assert set(out) == set(SPREAD_KEYS)
    assert out["spearman_pooled_top20"] == {"min": 0.7, "median": 0.9, "max": 1.0}


def test_explanation_recovery_refuses_fewer_than_one_run(monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from simulations.benchmarks import explanation_recovery

    monkeypatch.setattr("sys.argv", ["explanation_recovery", "--runs", "0"])
    with pytest.raises(SystemExit) as exc:
        explanation_recovery.main()
    assert exc.value.code == 2
    assert "--runs must be at least 1" in capsys.readouterr().err


@pytest.mark.parametrize(("text", "message"), [('{"grups": 1}', "unknown deep-model field(s) grups"),
                                               ("[1]", "give a JSON object"), ("{groups", "not JSON")])
def test_fedavg_gap_model_overrides_are_checked_in_one_line(text: str, message: str, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    from simulations.benchmarks import fedavg_gap

    with pytest.raises(SystemExit) as exc:
        fedavg_gap.main([str(tmp_path), "--model", text])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and "Traceback" not in "\n".join(err)


def test_fedavg_gap_model_override_reaches_the_replayed_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    import common.models
    from simulations.benchmarks import fedavg_gap, run_main
    from simulations.site_layout import split_cohort
    from simulations.synthetic import write_synthetic_cohort

    write_synthetic_cohort(out=tmp_path / "cohort", patients=200, seed=5)
    split_cohort(spec_path=tmp_path / "cohort" / "spec.toml", sites=2, by="iid", out=tmp_path / "sites", seed=0,
                 vaults=True, show_progress=False)
    built = []
    real_build = common.models.build_model
    monkeypatch.setattr(common.models, "build_model", lambda cfg, **kw: built.append(cfg) or real_build(cfg, **kw))
    out = fedavg_gap.run(sites_dir=tmp_path / "sites", rounds=1, local_epochs=1, variants=["fedavg"],
                         model={"groups": None, "filters": [8, 8]})
    assert out["model"] == {"groups": None, "filters": [8, 8]} and len(out["curves"]["fedavg"]) == 1
    assert built and all(cfg.groups is None and cfg.filters == (8, 8) for cfg in built)
    with pytest.raises(SystemExit) as exc:
        run_main(lambda: fedavg_gap.main([str(tmp_path / "sites"), "--rounds", "1", "--model", '{"groups": 3}']),
                 "fedavg_gap")
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "must be a multiple of groups (3)" in err
