"""Synthetic cohorts: determinism, standard formats, planted truth, and signal split across modalities."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import pytest

from common.spec import MODALITIES, load_spec
from simulations import cohort_cli, synthetic
from simulations.synthetic import SynthError

N = 2000
FILES = ("sequences.fa", "variants.vcf.gz", "omics.csv", "clinical.csv", "mutations.tsv", "spec.toml", "truth.json")


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="genofed")
    cohort_cli.register(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "cohort"
    assert _cli(["cohort", "synth", "--out", str(out), "--patients", str(N), "--seed", "11"]) == 0
    return out


def _fasta(path: Path) -> dict[str, str]:
    records: dict[str, str] = {}
    rid = None
    for line in path.read_text().splitlines():
        if line.startswith(">"):
            rid = line[1:].split()[0]
            records[rid] = ""
        else:
            records[rid] += line.strip()
    return records


def _table(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t" if path.suffix == ".tsv" else ","))


def test_same_arguments_give_identical_bytes(tmp_path):
    args = {"patients": 120, "seed": 4, "sequence_length": 90, "variants": 40, "omics": 12}
    synthetic.write_synthetic_cohort(out=tmp_path / "a", **args)
    synthetic.write_synthetic_cohort(out=tmp_path / "b", **args)
    synthetic.write_synthetic_cohort(out=tmp_path / "c", **{**args, "seed": 5})
    for name in FILES:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert (tmp_path / "a" / "sequences.fa").read_bytes() != (tmp_path / "c" / "sequences.fa").read_bytes()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(FILES)


def test_files_parse_in_standard_formats(cohort):
    from cyvcf2 import VCF

    spec = load_spec(cohort / "spec.toml")
    assert spec.modalities == MODALITIES
    assert spec.label.classes == ("control", "case") and spec.label.positive == ("case",)
    seqs = _fasta(cohort / "sequences.fa")
    assert len(seqs) == N and {len(s) for s in seqs.values()} == {200}
    assert set("".join(seqs.values())) == set("ACGT")
    ids = list(seqs)

    vcf = VCF(str(cohort / "variants.vcf.gz"))
    assert vcf.samples == ids
    assert any("fileformat=VCFv4.2" in line for line in vcf.raw_header.splitlines())
    assert "##contig=<ID=1" in vcf.raw_header
    positions, sites, dosages = [], [], []
    for rec in vcf:
        assert len(rec.ALT) == 1 and len(rec.REF) == 1 and len(rec.ALT[0]) == 1 and rec.REF != rec.ALT[0]
        positions.append(rec.POS)
        sites.append(f"{rec.CHROM}:{rec.POS}:{rec.REF}:{rec.ALT[0]}")
        gt = rec.gt_types  # 0 hom-ref, 1 het, 3 hom-alt
        assert set(np.unique(gt).tolist()) <= {0, 1, 3}
        dosages.append(np.where(gt == 3, 2, gt))
    vcf.close()
    assert len(sites) == 200 and positions == sorted(positions) and len(set(positions)) == 200
    assert tuple(sites) == spec.variants.sites

    omics = _table(cohort / "omics.csv")
    assert [r["patient_id"] for r in omics] == ids
    assert tuple(k for k in omics[0] if k != "patient_id") == spec.omics.features and len(spec.omics.features) == 50
    assert all(np.isfinite(float(v)) for r in omics[:50] for k, v in r.items() if k != "patient_id")

    clinical = _table(cohort / "clinical.csv")
    assert list(clinical[0]) == ["patient_id", "outcome", "age", "bmi", "sex", "smoker", "site_hint"]
    assert [r["patient_id"] for r in clinical] == ids
    assert {r["outcome"] for r in clinical} == {"control", "case"}
    for col in ("age", "bmi", "smoker"):
        empty = sum(r[col] == "" for r in clinical)
        assert 0 < empty < 0.1 * N, col
    assert {r["sex"] for r in clinical} == set(spec.clinical.categorical["sex"])
    assert {r["smoker"] for r in clinical} - {""} == set(spec.clinical.categorical["smoker"])
    assert len({r["site_hint"] for r in clinical}) == 3

    muts = _table(cohort / "mutations.tsv")
    assert list(muts[0]) == ["patient_id", "gene"]
    assert {r["gene"] for r in muts} <= set(spec.events.features)
    assert {r["patient_id"] for r in muts} <= set(ids)


def test_truth_names_what_was_planted(cohort):
    truth = json.loads((cohort / "truth.json").read_text())
    spec = load_spec(cohort / "spec.toml")
    seqs = _fasta(cohort / "sequences.fa")
    labels = {r["patient_id"]: r["outcome"] for r in _table(cohort / "clinical.csv")}
    assert truth["params"] == {"patients": N, "seed": 11, "sequence_length": 200, "variants": 200, "omics": 50,
                               "site_shift": 1.0}
    assert truth["label"]["counts"] == {c: sum(v == c for v in labels.values()) for c in ("control", "case")}

    # Motifs: every recorded copy is where truth.json says, with at most one substituted base.
    for motif in truth["motifs"]:
        starts = truth["motif_starts"][motif["name"]]
        assert len(starts) == motif["carriers"] > 0
        mismatches = []
        for pid, start in starts.items():
            window = seqs[pid][start:start + motif["length"]]
            mismatches.append(sum(a != b for a, b in zip(window, motif["consensus"])))
        assert max(mismatches) <= 1 and sum(mismatches) == motif["substituted_copies"]
        rate = motif["carrier_rate_by_class"]
        assert rate["case"] > rate["control"] + 0.1  # implanted in cases more often

    # Causal variants, the interaction variant, omics and events features exist in the pinned spec.
    sites = set(spec.variants.sites)
    causal = truth["variants"]["causal"]
    assert len(causal) == 6 and all(v["site"] in sites for v in causal)
    inter = truth["interaction"]
    assert inter["site"] in sites and inter["site"] not in {v["site"] for v in causal}
    assert inter["motif"] == "motif_A" and inter["coefficient"] > 0
    assert all(o["feature"] in spec.omics.features for o in truth["omics"]["causal"])
    assert all(g["gene"] in spec.events.features for g in truth["events"]["causal"])

    # The label model lists every term, by modality, with the intercept.
    terms = truth["label_model"]["terms"]
    modalities = {t["modality"] for t in terms}
    assert {"sequences", "variants", "omics", "clinical", "events", "sequences x variants"} <= modalities
    assert isinstance(truth["label_model"]["intercept"], float)
    assert set(truth["signal_by_modality"]) == {"sequences_only", "tabular_only", "cross_modal", "hidden"}
    assert len(truth["ancestry"]["per_patient"]) == N and len(truth["ancestry"]["groups"]) == 3
    assert set(truth["site_shifts"]["sites"]) == {r for r in truth["site_shifts"]["counts"]}


def _motif_hits(seqs: list[str], motif: str) -> np.ndarray:
    """Occurrences of ``motif`` with at most one mismatch, per sequence."""
    arr = np.frombuffer("".join(seqs).encode(), dtype=np.uint8).reshape(len(seqs), -1)
    m = np.frombuffer(motif.encode(), dtype=np.uint8)
    k = m.size
    hits = np.zeros(len(seqs))
    for start in range(arr.shape[1] - k + 1):
        hits += (arr[:, start:start + k] != m).sum(axis=1) <= 1
    return hits


def test_both_modalities_beat_each_alone(cohort):
    """Logistic regression on motif counts vs tabular features vs both: both wins by a clear margin."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    truth = json.loads((cohort / "truth.json").read_text())
    seqs = _fasta(cohort / "sequences.fa")
    ids = list(seqs)
    seq_x = np.column_stack([_motif_hits(list(seqs.values()), m["consensus"]) for m in truth["motifs"]])

    clinical = _table(cohort / "clinical.csv")
    y = np.array([r["outcome"] == "case" for r in clinical], dtype=int)

    def num(col: str) -> np.ndarray:
        v = np.array([float(r[col]) if r[col] else np.nan for r in clinical])
        return np.where(np.isnan(v), np.nanmean(v), v)

    cat = np.column_stack([[r["sex"] == "F" for r in clinical]]
                          + [[r["smoker"] == level for r in clinical] for level in ("former", "current")])
    omics = np.array([[float(v) for k, v in r.items() if k != "patient_id"] for r in _table(cohort / "omics.csv")])
    from cyvcf2 import VCF
    dos = np.array([np.where(rec.gt_types == 3, 2, rec.gt_types) for rec in VCF(str(cohort / "variants.vcf.gz"))]).T
    spec = load_spec(cohort / "spec.toml")
    genes = list(spec.events.features)
    flags = np.zeros((N, len(genes)))
    row = {pid: i for i, pid in enumerate(ids)}
    for r in _table(cohort / "mutations.tsv"):
        flags[row[r["patient_id"]], genes.index(r["gene"])] = 1
    tab_x = np.column_stack([dos, omics, num("age"), num("bmi"), cat, flags])

    cv = StratifiedKFold(5, shuffle=True, random_state=0)

    def auc(x: np.ndarray) -> float:
        model = make_pipeline(StandardScaler(), LogisticRegression(C=0.05, max_iter=2000))
        return roc_auc_score(y, cross_val_predict(model, x, y, cv=cv, method="predict_proba")[:, 1])

    seq_auc, tab_auc, both_auc = auc(seq_x), auc(tab_x), auc(np.column_stack([seq_x, tab_x]))
    margin = 0.03
    assert seq_auc > 0.6 and tab_auc > 0.6, (seq_auc, tab_auc)
    assert both_auc > seq_auc + margin, (seq_auc, tab_auc, both_auc)
    assert both_auc > tab_auc + margin, (seq_auc, tab_auc, both_auc)


def test_imports_cleanly_with_its_own_spec(cohort):
    from client.importers import import_cohort

    spec = load_spec(cohort / "spec.toml")
    imported = import_cohort(spec)
    assert imported.n == N
    assert imported.schema_hash == spec.schema_hash()
    assert imported.modalities == MODALITIES
    assert int(np.isnan(imported.clinical.numeric).sum()) > 0  # the empty cells are missing values


def test_spec_declares_public_ranges_that_hold(cohort):
    from client.importers import import_cohort

    spec = load_spec(cohort / "spec.toml")
    assert spec.clinical.ranges == {"age": (0.0, 120.0), "bmi": (10.0, 80.0)}
    assert spec.omics.range == (-10.0, 10.0)
    schema = spec.schema()
    assert schema["clinical"]["ranges"] == {"age": [0.0, 120.0], "bmi": [10.0, 80.0]}
    assert schema["omics"]["range"] == [-10.0, 10.0]
    imported = import_cohort(spec)  # the import enforces the ranges
    assert imported.schema["clinical"]["ranges"] == schema["clinical"]["ranges"]
    # The generator's own bounds sit well inside the declared ones.
    ages, bmis = imported.clinical.numeric[:, 0], imported.clinical.numeric[:, 1]
    assert 18 <= np.nanmin(ages) and np.nanmax(ages) <= 95 and 15 <= np.nanmin(bmis) and np.nanmax(bmis) <= 55
    truth = json.loads((cohort / "truth.json").read_text())
    assert truth["omics"]["declared_range"] == [-10.0, 10.0] and truth["omics"]["clipped_values"] == 0


def test_extreme_site_shift_is_clipped_to_the_declared_omics_range(tmp_path):
    from client.importers import import_cohort

    out = tmp_path / "shifted"
    synthetic.write_synthetic_cohort(out=out, patients=300, seed=2, variants=20, omics=12, site_shift=40.0)
    truth = json.loads((out / "truth.json").read_text())
    assert truth["omics"]["clipped_values"] > 0
    cohort = import_cohort(load_spec(out / "spec.toml"))
    assert np.abs(cohort.omics.values).max() == 10.0


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(SynthError, match="--patients must be at least 50"):
        synthetic.write_synthetic_cohort(out=tmp_path / "x", patients=10, seed=0)
    with pytest.raises(SynthError, match="--sequence-length"):
        synthetic.write_synthetic_cohort(out=tmp_path / "x", patients=100, seed=0, sequence_length=20)
    with pytest.raises(SynthError, match="--variants"):
        synthetic.write_synthetic_cohort(out=tmp_path / "x", patients=100, seed=0, variants=5)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(SynthError, match="not empty"):
        synthetic.write_synthetic_cohort(out=tmp_path / "full", patients=100, seed=0)
    assert (tmp_path / "full" / "keep.txt").read_text() == "x"
    assert not (tmp_path / "x").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind
