"""Partitioners (property tests) and ``genofed cohort split`` on a synthetic cohort."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.errors import GenofedError
from common.spec import load_spec
from simulations import cohort_cli, partition, synthetic
from simulations.partition import PartitionError

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def labelled(draw, *, min_per_class: int = 1):
    """Labels (shuffled), a site count, and a seed, such that a stratified split is feasible."""
    n_sites = draw(st.integers(2, 5))
    n_classes = draw(st.integers(2, 4))
    sizes = draw(st.lists(st.integers(max(min_per_class, n_sites), 120), min_size=n_classes, max_size=n_classes))
    if sum(sizes) < 10 * n_sites:
        sizes[0] += 10 * n_sites - sum(sizes)
    names = draw(st.sampled_from([["a", "b", "c", "d"], ["case", "control", "other", "x"], [0, 1, 2, 3]]))
    labels = np.concatenate([np.full(k, names[i], dtype=object) for i, k in enumerate(sizes)])
    seed = draw(st.integers(0, 2**31 - 1))
    labels = labels[np.random.default_rng(seed).permutation(labels.size)]
    return labels, n_sites, seed


def _assert_valid(labels: np.ndarray, sites: np.ndarray, n_sites: int, min_size: int = 10) -> None:
    assert sites.shape == labels.shape                       # every patient assigned exactly once
    assert sites.dtype.kind == "i"
    assert set(np.unique(sites).tolist()) == set(range(n_sites))  # every site used, none outside
    for s in range(n_sites):
        mask = sites == s
        assert mask.sum() >= min_size
        assert len(set(labels[mask].tolist())) >= 2          # no single-class site


@SETTINGS
@given(labelled())
def test_iid_is_stratified_and_complete(case):
    labels, n_sites, seed = case
    sites = partition.iid(labels, n_sites, seed=seed)
    _assert_valid(labels, sites, n_sites)
    sizes = np.bincount(sites, minlength=n_sites)
    assert sizes.max() - sizes.min() <= 1
    for c in set(labels.tolist()):
        per_site = np.bincount(sites[labels == c], minlength=n_sites)
        assert per_site.max() - per_site.min() <= 1
    assert np.array_equal(sites, partition.iid(labels, n_sites, seed=seed))


@SETTINGS
@given(labelled(), st.sampled_from([0.1, 0.3, 1.0, 5.0, 100.0]))
def test_dirichlet_is_valid_or_refuses(case, alpha):
    labels, n_sites, seed = case
    try:
        sites = partition.dirichlet(labels, n_sites, alpha=alpha, seed=seed, max_tries=50)
    except PartitionError as exc:
        assert "\n" not in str(exc) and "--alpha" in str(exc)
        return
    _assert_valid(labels, sites, n_sites)
    assert np.array_equal(sites, partition.dirichlet(labels, n_sites, alpha=alpha, seed=seed, max_tries=50))


@SETTINGS
@given(labelled(min_per_class=10), st.sampled_from([0.2, 1.0, 10.0]))
def test_quantity_is_valid_or_refuses(case, alpha):
    labels, n_sites, seed = case
    try:
        sites = partition.quantity(labels, n_sites, alpha=alpha, seed=seed, max_tries=50)
    except PartitionError as exc:
        assert "\n" not in str(exc)
        return
    _assert_valid(labels, sites, n_sites)


@SETTINGS
@given(labelled(), st.integers(2, 6))
def test_column_keeps_groups_whole(case, n_groups):
    labels, _, seed = case
    rng = np.random.default_rng(seed)
    groups = np.asarray([f"g{k}" for k in rng.integers(0, n_groups, size=labels.size)], dtype=object)
    try:
        sites, names = partition.column(labels, groups)
    except PartitionError:
        return
    assert names == sorted(set(groups.tolist()))
    _assert_valid(labels, sites, len(names))
    for g in set(groups.tolist()):
        assert len(set(sites[groups == g].tolist())) == 1
        assert names[sites[groups == g][0]] == g


@settings(max_examples=8, deadline=None)
@given(st.floats(0.2, 0.8), st.integers(3, 5))
def test_dirichlet_skew_grows_as_alpha_shrinks(frac_case, n_sites):
    n = 1200
    labels = np.where(np.arange(n) < int(frac_case * n), "case", "control")
    skew = {}
    for alpha in (0.3, 3.0, 100.0):
        values = [partition.label_skew(labels, partition.dirichlet(labels, n_sites, alpha=alpha, seed=s), n_sites)
                  for s in range(12)]
        skew[alpha] = float(np.mean(values))
    assert skew[0.3] > skew[3.0] > skew[100.0]
    assert skew[100.0] < 0.05


def test_partitioners_refuse_impossible_requests():
    labels = np.array(["a"] * 30 + ["b"] * 30)
    with pytest.raises(PartitionError, match="cannot fill 7 sites"):
        partition.iid(labels, 7)
    with pytest.raises(PartitionError, match="single class"):
        partition.iid(np.array(["a"] * 57 + ["b"] * 3), 5)
    with pytest.raises(PartitionError, match="every site needs two classes"):
        partition.dirichlet(np.array(["a"] * 60), 2, alpha=1.0)
    with pytest.raises(PartitionError, match="positive"):
        partition.dirichlet(labels, 2, alpha=0.0)
    with pytest.raises(PartitionError, match=r"no Dirichlet\(alpha=0.01\).*larger --alpha"):
        partition.dirichlet(labels, 3, alpha=0.01, max_tries=5)
    with pytest.raises(PartitionError, match="no value in the group column"):
        partition.column(labels, ["x"] * 59 + [""])
    with pytest.raises(PartitionError, match="fewer than 10"):
        partition.column(labels, ["x"] * 55 + ["y"] * 5)
    assert all(isinstance(e, GenofedError) for e in (PartitionError("x"),))


# ---------------------------------------------------------------------------------------------
# cohort split, end to end on a synthetic cohort


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="genofed")
    cohort_cli.register(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture(scope="module")
def synth_spec(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "cohort"
    synthetic.write_synthetic_cohort(out=out, patients=400, seed=5, variants=60, omics=12)
    return out / "spec.toml"


def _fasta_ids(path: Path) -> list[str]:
    return [ln[1:].split()[0] for ln in path.read_text().splitlines() if ln.startswith(">")]


@pytest.mark.parametrize("by,extra", [("iid", ["--sites", "3"]),
                                      ("dirichlet", ["--sites", "3", "--alpha", "1.0"]),
                                      ("quantity", ["--sites", "3", "--alpha", "2.0"]),
                                      ("column", ["--column", "site_hint"])])
def test_split_writes_standard_files_with_one_schema(synth_spec, tmp_path, by, extra, monkeypatch, capsys):
    monkeypatch.setenv("GENOFED_NO_PROGRESS", "1")
    out = tmp_path / "sites"
    assert _cli(["cohort", "split", "--spec", str(synth_spec), "--by", by, *extra, "--seed", "1",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "sites.json" in printed
    info = json.loads((out / "sites.json").read_text())
    source = load_spec(synth_spec)
    assert info["split"]["by"] == by and info["seed"] == 1
    assert info["patients"] == 400 and info["schema_hash"] == source.schema_hash()
    names = [s["name"] for s in info["sites"]]
    if by == "column":
        assert names == ["central", "north", "south"]
    else:
        assert names == ["site-1", "site-2", "site-3"]
    seen: list[str] = []
    for site in info["sites"]:
        folder = out / site["folder"]
        spec = load_spec(folder / "spec.toml")
        assert spec.schema_hash() == info["schema_hash"]
        ids = _fasta_ids(folder / "sequences.fa")
        assert len(ids) == site["patients"]
        clinical = (folder / "clinical.csv").read_text().splitlines()
        assert [row.split(",")[0] for row in clinical[1:]] == ids
        assert sum(site["classes"].values()) == site["patients"]
        assert min(site["classes"].values()) > 0
        if by == "column":
            assert {row.split(",")[-1] for row in clinical[1:]} == {site["name"]}
        seen += ids
    assert len(seen) == len(set(seen)) == 400


def test_split_refuses_bad_options(synth_spec, tmp_path):
    from simulations.site_layout import LayoutError, split_cohort

    with pytest.raises(LayoutError, match="needs --sites"):
        split_cohort(spec_path=synth_spec, sites=None, by="iid", out=tmp_path / "a")
    with pytest.raises(LayoutError, match="needs --column"):
        split_cohort(spec_path=synth_spec, sites=None, by="column", out=tmp_path / "a")
    with pytest.raises(LayoutError, match="no table of the cohort has that column"):
        split_cohort(spec_path=synth_spec, sites=None, by="column", column="nope", out=tmp_path / "a")
    with pytest.raises(PartitionError, match="cannot fill 50 sites"):
        split_cohort(spec_path=synth_spec, sites=50, by="iid", out=tmp_path / "a")
    assert not (tmp_path / "a").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(GenofedError, match="not empty"):
        split_cohort(spec_path=synth_spec, sites=2, by="iid", out=tmp_path / "full")


def test_split_into_vaults(synth_spec, tmp_path, monkeypatch):
    from client.cohort_store import inspect_vault, load_cohort
    from client.vault import KeySource

    monkeypatch.setenv("GENOFED_NO_PROGRESS", "1")
    out = tmp_path / "sites"
    assert _cli(["cohort", "split", "--spec", str(synth_spec), "--by", "dirichlet", "--alpha", "2",
                 "--sites", "2", "--out", str(out), "--vaults"]) == 0
    info = json.loads((out / "sites.json").read_text())
    assert info["vaults"] is True
    for site in info["sites"]:
        key_path = out / site["key"]
        assert key_path.stat().st_mode & 0o777 == 0o600
        key = KeySource.from_key_file(key_path)
        summary = inspect_vault(out / site["vault"], key)["cohort"]
        assert summary["patients"] == site["patients"]
        assert summary["classes"] == site["classes"]
        assert summary["schema_hash"] == info["schema_hash"]
        cohort = load_cohort(out / site["vault"], key)
        assert cohort.variants is not None and len(cohort.variants.features) == 60


def test_split_pins_feature_lists_the_source_left_out(synth_spec, tmp_path, monkeypatch):
    """A source spec without feature lists: per-site specs pin what the import resolved, hashes agree."""
    import dataclasses

    from client.importers import import_cohort
    from common.spec import write_spec
    from simulations.site_layout import split_cohort

    monkeypatch.setenv("GENOFED_NO_PROGRESS", "1")
    spec = load_spec(synth_spec)
    loose = dataclasses.replace(spec, variants=dataclasses.replace(spec.variants, sites=None),
                                omics=dataclasses.replace(spec.omics, features=None),
                                events=dataclasses.replace(spec.events, features=None))
    loose_path = write_spec(loose, synth_spec.parent / "loose.toml")
    resolved_hash = import_cohort(load_spec(loose_path)).schema_hash
    assert resolved_hash != load_spec(loose_path).schema_hash()  # unresolved lists hash differently
    info = split_cohort(spec_path=loose_path, sites=2, by="iid", seed=3, out=tmp_path / "sites")
    assert info["schema_hash"] == resolved_hash
    for site in info["sites"]:
        site_spec = load_spec(tmp_path / "sites" / site["spec"])
        assert site_spec.schema_hash() == resolved_hash
        assert site_spec.variants.sites is not None and len(site_spec.variants.sites) == 60
        assert site_spec.omics.features is not None and site_spec.events.features is not None


def test_layout_is_all_or_nothing(tmp_path, monkeypatch):
    """A site that fails its vault import, or holds one class, leaves no output folder behind."""
    from common.spec import ClinicalSpec, CohortSpec, LabelSpec
    from simulations.site_layout import LayoutError, SitePlan, write_sites

    monkeypatch.setenv("GENOFED_NO_PROGRESS", "1")

    def writer(bad: bool):
        def write(folder: Path) -> CohortSpec:
            rows = [f"p{i},{'case' if i % 2 else 'control'},{'abc' if bad and i == 3 else 40 + i}" for i in range(12)]
            (folder / "clinical.csv").write_text("patient_id,outcome,age\n" + "\n".join(rows) + "\n")
            return CohortSpec(name="t", id_column="patient_id",
                              label=LabelSpec(file=folder / "clinical.csv", column="outcome",
                                              classes=("control", "case")),
                              clinical=ClinicalSpec(file=folder / "clinical.csv", numeric=("age",)))
        return write

    plans = [SitePlan(name="good", write=writer(False), patients=12, classes={"control": 6, "case": 6}),
             SitePlan(name="bad", write=writer(True), patients=12, classes={"control": 6, "case": 6})]
    with pytest.raises(LayoutError, match=r"^bad: import into a vault failed: .*age"):
        write_sites(tmp_path / "out", plans, meta={}, vaults=True)
    with pytest.raises(LayoutError, match="single class"):
        write_sites(tmp_path / "out", [SitePlan(name="one", write=writer(False), patients=12,
                                                classes={"control": 12, "case": 0})], meta={}, vaults=False)
    assert list(tmp_path.iterdir()) == []
    info = write_sites(tmp_path / "out", plans[:1], meta={"note": "x"}, vaults=True)
    assert info["note"] == "x" and (tmp_path / "out" / "good" / "vault").is_dir()
