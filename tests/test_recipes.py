"""Recipes on the real data sets in ../shared/data: counts add up, groups stay whole, one schema."""

from __future__ import annotations

import argparse
import csv
import gzip
import json
from pathlib import Path

import pandas as pd
import pytest

from common.spec import load_spec
from simulations import cohort_cli, recipes
from simulations.recipes import RecipeError

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

pytestmark = [pytest.mark.realdata,
              pytest.mark.skipif(not DATA.is_dir(), reason=f"shared data folder {DATA} not present")]


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="genofed")
    cohort_cli.register(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t" if path.suffix == ".tsv" else ","))


def _run(tmp_path_factory, name: str, *extra: str) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp(name) / "sites"
    assert _cli(["cohort", "recipe", name, "--data", str(DATA), "--out", str(out), *extra]) == 0
    return out, json.loads((out / "sites.json").read_text())


def _check_common(out: Path, info: dict) -> list:
    """Per-site specs share one schema hash; no site holds a single class; per-site counts add up."""
    specs = [load_spec(out / s["spec"]) for s in info["sites"]]
    assert {s.schema_hash() for s in specs} == {info["schema_hash"]}
    for site in info["sites"]:
        assert sum(1 for k in site["classes"].values() if k > 0) >= 2, site["name"]
        assert sum(site["classes"].values()) == site["patients"]
    assert sum(s["patients"] for s in info["sites"]) == info["patients"]
    return specs


@pytest.fixture(scope="module")
def splice(tmp_path_factory, monkeypatch_module):
    return _run(tmp_path_factory, "splice", "--vaults", "--seed", "2")


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    mp.setenv("GENOFED_NO_PROGRESS", "1")
    yield mp
    mp.undo()


def test_splice_sites(splice):
    out, info = splice
    specs = _check_common(out, info)
    assert info["n_sites"] == 3 and info["patients"] == 3190
    assert info["classes"] == {"EI": 767, "IE": 768, "N": 1655}
    assert info["quirks"]["ids_renamed"] == 12
    assert info["quirks"]["sequences_with_ambiguity_codes"] == 15
    assert info["quirks"]["duplicate_sequences"] == 185
    for spec in specs:
        assert spec.split.policy == "group" and spec.split.group_column == "locus_group"
        assert spec.sequences.length == 60
        assert spec.clinical is None and spec.omics is None  # no numeric field to declare a range for
    ids, locus_site, group_site, seq_site = [], {}, {}, {}
    for site in info["sites"]:
        labels = _rows(out / site["folder"] / "labels.csv")
        seqs = _rows(out / site["folder"] / "sequences.csv")
        assert [r["id"] for r in labels] == [r["id"] for r in seqs]
        assert len(labels) == site["patients"]
        assert {c: sum(r["class"] == c for r in labels) for c in ("EI", "IE", "N")} == site["classes"]
        for lab, seq in zip(labels, seqs):
            ids.append(lab["id"])
            assert lab["locus"] == lab["instance_name"].split("-")[0]
            assert locus_site.setdefault(lab["locus"], site["name"]) == site["name"]       # loci whole
            assert group_site.setdefault(lab["locus_group"], site["name"]) == site["name"]
            assert seq_site.setdefault(seq["sequence"], site["name"]) == site["name"]     # duplicates together
    assert len(ids) == len(set(ids)) == 3190
    assert sum("#" in i for i in ids) == 12
    assert len(locus_site) == 1475


def test_splice_vaults_match_the_source(splice):
    from client.cohort_store import inspect_vault
    from client.vault import KeySource

    out, info = splice
    assert info["vaults"] is True
    total = 0
    for site in info["sites"]:
        summary = inspect_vault(out / site["vault"], KeySource.from_key_file(out / site["key"]))["cohort"]
        assert summary["patients"] == site["patients"]
        assert summary["classes"] == site["classes"]
        assert summary["schema_hash"] == info["schema_hash"]
        total += summary["patients"]
    assert total == 3190


def test_kg1000_sites(tmp_path_factory, monkeypatch_module):
    out, info = _run(tmp_path_factory, "kg1000", "--sites", "4", "--vaults")
    specs = _check_common(out, info)
    for spec in specs:  # sex only: no numeric clinical field, no omics, so no range to declare
        assert spec.clinical.numeric == () and spec.clinical.ranges == {} and spec.omics is None
    panel = pd.read_csv(DATA / "kg1000_chr1" / "integrated_call_samples_v3.20130502.ALL.panel", sep="\t",
                        usecols=["sample", "pop", "super_pop"])
    with gzip.open(DATA / "kg1000_chr1" / "example.vcf.gz", "rt") as fh:
        header = [ln for ln in fh if ln.startswith("#")]
    samples = header[-1].rstrip("\n").split("\t")[9:]
    panel = panel[panel["sample"].isin(samples)]
    assert info["patients"] == len(samples) == 2504
    assert info["classes"] == panel["super_pop"].value_counts().to_dict()
    assert len(info["classes"]) == 5
    pop_site: dict[str, str] = {}
    from cyvcf2 import VCF
    for site in info["sites"]:
        rows = _rows(out / site["folder"] / "samples.csv")
        assert len(rows) == site["patients"]
        assert len({r["super_pop"] for r in rows}) >= 2
        assert sorted({r["super_pop"] for r in rows}) == site["super_populations"]
        for r in rows:
            assert pop_site.setdefault(r["pop"], site["name"]) == site["name"]          # populations whole
        vcf = VCF(str(out / site["folder"] / "variants.vcf.gz"))
        assert vcf.samples == [r["sample"] for r in rows]
        n_records = sum(1 for _ in vcf)
        assert n_records == 4296
        assert [ln for ln in vcf.raw_header.splitlines(keepends=True) if ln.startswith("##")] == \
            [ln for ln in header if ln.startswith("##")]
        vcf.close()
    assert len(pop_site) == 26
    assert info["quirks"]["panel_samples_not_in_vcf"] == 31

    from client.cohort_store import inspect_vault
    from client.vault import KeySource

    for site in info["sites"]:
        summary = inspect_vault(out / site["vault"], KeySource.from_key_file(out / site["key"]))["cohort"]
        assert summary["patients"] == site["patients"] and summary["classes"] == site["classes"]
        assert summary["modalities"]["variants"]["features"] == 4296
        assert summary["schema_hash"] == info["schema_hash"]


def test_metabric_sites_against_an_independent_count(tmp_path_factory, monkeypatch_module):
    out, info = _run(tmp_path_factory, "metabric", "--vaults")
    specs = _check_common(out, info)
    folder = DATA / "metabric"
    surv = pd.read_csv(folder / "metabric_survival.tsv", sep="\t")
    cbio = pd.read_csv(folder / "brca_metabric_clinical_data.tsv", sep="\t")
    joined = surv.merge(cbio[["Patient ID", "Cohort"]], left_on="patientId", right_on="Patient ID", how="left")
    kept = joined[joined["Cohort"].isin([1, 2, 3, 4, 5])]
    dropped = len(joined) - len(kept)
    assert info["dropped"]["total"] == dropped
    expected = {int(c): g for c, g in kept.groupby("Cohort")}
    assert sorted(len(g) for g in expected.values()) == sorted([762, 522, 288, 238, 170])
    mutated = set(pd.read_csv(folder / "metabric_mutations.tsv", sep="\t")["patientId"])
    assert [s["name"] for s in info["sites"]] == [f"cohort-{c}" for c in range(1, 6)]
    for site in info["sites"]:
        g = expected[site["cohort"]]
        assert site["patients"] == len(g)
        assert site["classes"] == {"alive_or_other_cause": int((g["event"] != 1).sum()),
                                   "died_of_disease": int((g["event"] == 1).sum())}
        assert site["not_profiled"] == int((~g["patientId"].isin(mutated)).sum())
        rows = _rows(out / site["folder"] / "clinical.tsv")
        assert {r["patient_id"] for r in rows} == set(g["patientId"])
        assert {r["er_ihc"] for r in rows} <= {"Positive", "Negative", ""}
    assert sum(s["not_profiled"] for s in info["sites"]) == 121
    for spec in specs:
        assert spec.events.absent == "missing" and len(spec.events.features) == 173
        assert spec.label.positive == ("died_of_disease",)
        # Public clinical bounds for every numeric field, declared alike at every site.
        assert spec.clinical.ranges == {"age_at_diagnosis": (0.0, 120.0), "lymph_nodes_positive": (0.0, 100.0),
                                        "npi": (0.0, 10.0), "tumour_grade": (1.0, 3.0)}
        assert set(spec.clinical.ranges) == set(spec.clinical.numeric)
        assert spec.schema()["clinical"]["ranges"]["npi"] == [0.0, 10.0]
    # Every source value lies inside its range (the vault imports above enforce it too), with room:
    # the bounds are not the data's min/max.
    clin = pd.read_csv(folder / "metabric_clinical.tsv", sep="\t")
    measured = {"age_at_diagnosis": clin["AGE_AT_DIAGNOSIS"], "lymph_nodes_positive":
                clin["LYMPH_NODES_EXAMINED_POSITIVE"], "npi": clin["NPI"],
                "tumour_grade": cbio["Neoplasm Histologic Grade"]}
    for name, values in measured.items():
        lo, hi = specs[0].clinical.ranges[name]
        assert lo <= values.min() and values.max() <= hi, name

    import numpy as np

    from client.cohort_store import load_cohort
    from client.vault import KeySource

    unprofiled = 0
    for site in info["sites"]:
        cohort = load_cohort(out / site["vault"], KeySource.from_key_file(out / site["key"]))
        assert cohort.n == site["patients"]
        assert dict(zip(cohort.classes, np.bincount(cohort.labels, minlength=2).tolist())) == site["classes"]
        unprofiled += int(np.isnan(cohort.events.values).all(axis=1).sum())
    assert unprofiled == 121


def test_recipes_refuse_bad_requests(tmp_path):
    with pytest.raises(RecipeError, match="--sites must be 5"):
        recipes.run_recipe("metabric", data=DATA, sites=4, out=tmp_path / "m")
    with pytest.raises(RecipeError, match="between 2 and 13"):
        recipes.run_recipe("kg1000", data=DATA, sites=20, out=tmp_path / "k")
    with pytest.raises(RecipeError, match="not found"):
        recipes.run_recipe("splice", data=tmp_path / "nowhere", out=tmp_path / "s")
    assert not any(tmp_path.iterdir())


def test_metabric_source_value_outside_its_declared_range_is_refused(tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(DATA / "metabric", data / "metabric")
    clin = data / "metabric" / "metabric_clinical.tsv"
    (data / "metabric").chmod(0o755)
    clin.chmod(0o644)
    text = clin.read_text()
    assert "\nMB-0000\t75.65\t" in text
    clin.write_text(text.replace("\nMB-0000\t75.65\t", "\nMB-0000\t130\t", 1))
    with pytest.raises(RecipeError, match=r"patient MB-0000: column 'AGE_AT_DIAGNOSIS': '130' is outside the public "
                                          r"range \[0, 120\] the recipe declares for age_at_diagnosis"):
        recipes.run_recipe("metabric", data=data, sites=5, out=tmp_path / "m", show_progress=False)
    assert not (tmp_path / "m").exists()
