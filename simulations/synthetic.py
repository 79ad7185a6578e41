"""Synthetic cohorts with planted ground truth.

``write_synthetic_cohort(out=DIR, patients=N, seed=S)`` writes a cohort in the standard input
formats, exactly as a hospital would hand it to ``genofed vault import``:

==================  ===========================================================================
``sequences.fa``    FASTA, one record per patient (id = patient id), fixed length L
``variants.vcf.gz`` VCF 4.2, multi-sample, biallelic SNPs sorted by position, GT only, gzip
``omics.csv``       wide matrix: ``patient_id`` + P expression-like features
``clinical.csv``    ``patient_id, outcome, age, bmi, sex, smoker, site_hint``; a few empty cells
``mutations.tsv``   long format ``patient_id, gene`` (one row per mutated gene)
``spec.toml``       the cohort spec, every feature list and category pinned
``truth.json``      everything that was planted (see below)
==================  ===========================================================================

The label (``outcome``: ``control`` / ``case``) is drawn from a logistic model whose terms are
split across modalities on purpose:

* sequences only: two motifs (``motif_A``, ``motif_B``), each implanted once at a uniform
  random position in a random subset of patients (sometimes with one substituted base);
* tabular only: causal variants (dosage effects), three omics features, age / BMI / smoking,
  one mutated gene;
* across modalities: ``motif_A`` present x the dosage of one variant that has no main effect;
* population structure: three ancestry groups with Balding-Nichols allele-frequency shifts and
  a small ancestry effect on the label (a confounder the way real stratification is);
* site shifts: ``site_hint`` (the natural hospital) depends on ancestry and shifts age and adds an
  omics batch offset (measurement only: the label sees the biological value).

The spec declares public value ranges (the clipping bounds of the shared preprocessing's noised
column moments), wide enough that the import never refuses a generated value: age is drawn
clipped to [18, 95] and declared [0, 120]; BMI clipped to [15, 55], declared [10, 80]; the
omics matrix is declared [-10, 10] and the measured values are clipped to it (a standardised
value plus a batch offset reaches 10 only with an extreme ``site_shift``; ``truth.json`` counts
the clipped cells).

Effect sizes are chosen so that a model on sequences alone and a model on tabular data alone are
both clearly worse than one on both (the tests measure this). Everything is drawn from
``numpy.random.default_rng`` children of one ``SeedSequence(seed)``, every file is written with
fixed formatting and gzip ``mtime=0``, so the same arguments give byte-identical files.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import GenofedError
from common.spec import (
    ClinicalSpec,
    CohortSpec,
    EventsSpec,
    LabelSpec,
    OmicsSpec,
    SequencesSpec,
    SplitSpec,
    VariantsSpec,
    write_spec,
)

GENERATOR_VERSION = 1
CLASSES = ("control", "case")
BASES = np.array(list("ACGT"))

MOTIFS = (
    # name, consensus, fraction of patients carrying it, logit coefficient when present
    ("motif_A", "TGACGTCA", 0.40, 1.60),
    ("motif_B", "GGGAATTTCC", 0.35, 2.20),
)
MOTIF_SUBSTITUTION_RATE = 0.15
VARIANT_EFFECTS = (0.95, -0.90, 0.80, -0.70, 0.65, 0.65)
INTERACTION_COEFFICIENT = 1.60
OMICS_EFFECTS = (0.90, -0.80, 0.70)
N_OMICS_FACTORS = 4
N_GENES = 20
CAUSAL_GENE_RATE = 0.15
CAUSAL_GENE_EFFECT = 1.30
AGE_PER_YEAR = 0.055          # logit per year above 60
BMI_PER_UNIT = 0.10           # logit per kg/m2 above 27
SMOKER_EFFECTS = {"never": 0.0, "former": 0.40, "current": 1.00}
SMOKER_RATES = {"never": 0.55, "former": 0.28, "current": 0.17}
MISSING_RATE = 0.03           # per cell of age, bmi, smoker
PREVALENCE = 0.40

ANCESTRIES = ("anc-A", "anc-B", "anc-C")
ANCESTRY_PROPORTIONS = (0.5, 0.3, 0.2)
ANCESTRY_EFFECTS = {"anc-A": 0.0, "anc-B": 0.30, "anc-C": -0.20}
FST = 0.08
SITES = ("north", "central", "south")
SITE_GIVEN_ANCESTRY = ((0.60, 0.25, 0.15), (0.20, 0.60, 0.20), (0.15, 0.25, 0.60))
SITE_AGE_SHIFT = {"north": -3.0, "central": 0.0, "south": 4.0}
SITE_OMICS_OFFSET_SD = 0.25

# Public value ranges declared in the spec (not fitted to the draws). Age and BMI are drawn clipped
# to narrower bounds; measured omics values are clipped to OMICS_RANGE, so none is ever refused.
CLINICAL_RANGES = {"age": (0.0, 120.0), "bmi": (10.0, 80.0)}
OMICS_RANGE = (-10.0, 10.0)

CONTIG = "1"
CONTIG_LENGTH = 249_250_621
FIRST_POSITION = 1_000_000


class SynthError(GenofedError, ValueError):
    """Bad arguments for a synthetic cohort (too few patients, too short sequences, ...)."""


@dataclass
class SyntheticCohort:
    """The generated data, before it is written (tables as lists of row strings)."""

    patient_ids: list[str]
    sequences: list[str]
    variant_sites: list[tuple[str, int, str, str, str]]   # chrom, pos, id, ref, alt
    dosages: np.ndarray                                   # (n, m) int8
    omics_names: list[str]
    omics: np.ndarray                                     # (n, p) measured values
    clinical_rows: list[list[str]]
    mutation_rows: list[tuple[str, str]]
    genes: list[str]
    labels: np.ndarray                                    # (n,) 0 control / 1 case
    truth: dict[str, Any]


def _check_args(patients: int, sequence_length: int, variants: int, omics: int, site_shift: float) -> None:
    longest = max(len(m[1]) for m in MOTIFS)
    if patients < 50:
        raise SynthError(f"--patients must be at least 50, got {patients}")
    if sequence_length < 3 * longest:
        raise SynthError(f"--sequence-length must be at least {3 * longest} (room for the planted motifs), "
                         f"got {sequence_length}")
    need_variants = len(VARIANT_EFFECTS) + 1
    if variants < 2 * need_variants:
        raise SynthError(f"--variants must be at least {2 * need_variants}, got {variants}")
    if omics < 2 * len(OMICS_EFFECTS):
        raise SynthError(f"--omics must be at least {2 * len(OMICS_EFFECTS)}, got {omics}")
    if not np.isfinite(site_shift) or site_shift < 0:
        raise SynthError(f"--site-shift must be a non-negative number, got {site_shift}")


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _intercept_for(score: np.ndarray, prevalence: float) -> float:
    """The intercept b with mean(sigmoid(b + score)) == prevalence (bisection; deterministic)."""
    lo, hi = -30.0, 30.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if _sigmoid(mid + score).mean() < prevalence:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _r(x: float) -> float:
    return float(round(float(x), 6))


def generate(*, patients: int, seed: int, sequence_length: int = 200, variants: int = 200, omics: int = 50,
             site_shift: float = 1.0) -> SyntheticCohort:
    """Draw a synthetic cohort (no files written). See the module docstring for what is planted."""
    _check_args(patients, sequence_length, variants, omics, site_shift)
    n, L, m, p = patients, sequence_length, variants, omics
    rng_anc, rng_seq, rng_var, rng_omx, rng_cli, rng_mut, rng_lab, rng_miss = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(8))
    width = max(5, len(str(n)))
    ids = [f"P{i + 1:0{width}d}" for i in range(n)]

    # Population structure and the natural site of each patient.
    ancestry = rng_anc.choice(len(ANCESTRIES), size=n, p=ANCESTRY_PROPORTIONS)
    site_probs = np.asarray(SITE_GIVEN_ANCESTRY)[ancestry]
    site = (rng_anc.random(n)[:, None] > np.cumsum(site_probs, axis=1)).sum(axis=1)

    # Sequences: uniform background, motifs implanted once each, never overlapping.
    seq_codes = rng_seq.integers(0, 4, size=(n, L))
    carriers = {name: rng_seq.random(n) < rate for name, _, rate, _ in MOTIFS}
    motif_sites: dict[str, dict[str, int]] = {name: {} for name, *_ in MOTIFS}
    motif_substituted = {name: 0 for name, *_ in MOTIFS}
    lookup = {b: i for i, b in enumerate("ACGT")}
    for i in range(n):
        taken: list[tuple[int, int]] = []
        for name, consensus, _, _ in MOTIFS:
            if not carriers[name][i]:
                continue
            k = len(consensus)
            while True:
                start = int(rng_seq.integers(0, L - k + 1))
                if all(start + k <= a or b <= start for a, b in taken):
                    break
            taken.append((start, start + k))
            codes = np.array([lookup[b] for b in consensus])
            if rng_seq.random() < MOTIF_SUBSTITUTION_RATE:
                j = int(rng_seq.integers(0, k))
                codes[j] = (codes[j] + int(rng_seq.integers(1, 4))) % 4
                motif_substituted[name] += 1
            seq_codes[i, start:start + k] = codes
            motif_sites[name][ids[i]] = start
    sequences = ["".join(row) for row in BASES[seq_codes]]

    # Variants: Balding-Nichols allele frequencies per ancestry group.
    positions = np.sort(rng_var.choice(np.arange(FIRST_POSITION, FIRST_POSITION + 1000 * m), size=m, replace=False))
    refs = rng_var.integers(0, 4, size=m)
    alts = (refs + rng_var.integers(1, 4, size=m)) % 4
    base_freq = rng_var.uniform(0.05, 0.5, size=m)
    chosen = rng_var.choice(m, size=len(VARIANT_EFFECTS) + 1, replace=False)
    causal_idx, interaction_idx = np.sort(chosen[:-1]), int(chosen[-1])
    base_freq[chosen] = rng_var.uniform(0.25, 0.5, size=chosen.size)
    a = base_freq * (1 - FST) / FST
    b = (1 - base_freq) * (1 - FST) / FST
    group_freq = np.clip(rng_var.beta(a, b, size=(len(ANCESTRIES), m)), 0.01, 0.99)
    dosages = rng_var.binomial(2, group_freq[ancestry]).astype(np.int8)
    variant_sites = [(CONTIG, int(positions[j]), f"snv{j + 1:04d}", "ACGT"[refs[j]], "ACGT"[alts[j]]) for j in range(m)]
    site_key = [f"{c}:{pos}:{ref}:{alt}" for c, pos, _, ref, alt in variant_sites]

    # Omics: a few latent factors plus noise, standardised; a batch offset per site (measurement only).
    factors = rng_omx.normal(size=(n, N_OMICS_FACTORS))
    loadings = rng_omx.normal(scale=0.5, size=(N_OMICS_FACTORS, p))
    bio = factors @ loadings + rng_omx.normal(size=(n, p))
    bio = (bio - bio.mean(axis=0)) / bio.std(axis=0)
    omics_causal = np.sort(rng_omx.choice(p, size=len(OMICS_EFFECTS), replace=False))
    omics_offset = rng_omx.normal(scale=SITE_OMICS_OFFSET_SD, size=(len(SITES), p)) * site_shift
    measured = bio + omics_offset[site]
    omics_clipped = int(((measured < OMICS_RANGE[0]) | (measured > OMICS_RANGE[1])).sum())
    measured = np.clip(measured, *OMICS_RANGE)
    omics_names = [f"expr_{j + 1:03d}" for j in range(p)]

    # Clinical.
    age_shift = np.array([SITE_AGE_SHIFT[s] for s in SITES]) * site_shift
    age = np.clip(rng_cli.normal(58.0, 11.0, size=n) + age_shift[site], 18.0, 95.0).round(1)
    bmi = np.clip(rng_cli.normal(27.0, 4.5, size=n), 15.0, 55.0).round(1)
    sex = np.where(rng_cli.random(n) < 0.5, "F", "M")
    smoker_names = list(SMOKER_RATES)
    smoker = rng_cli.choice(len(smoker_names), size=n, p=list(SMOKER_RATES.values()))

    # Mutations: 20 genes, one causal.
    genes = [f"GENE{j + 1:02d}" for j in range(N_GENES)]
    gene_rates = rng_mut.uniform(0.02, 0.12, size=N_GENES)
    causal_gene = int(rng_mut.integers(0, N_GENES))
    gene_rates[causal_gene] = CAUSAL_GENE_RATE
    mutated = rng_mut.random((n, N_GENES)) < gene_rates

    # The label model.
    terms: list[dict[str, Any]] = []
    score = np.zeros(n)
    for name, consensus, _, coef in MOTIFS:
        score += coef * carriers[name]
        terms.append({"name": name, "modality": "sequences", "feature": consensus, "coefficient": coef,
                      "encoding": "1 if the motif was implanted, else 0"})
    for j, coef in zip(causal_idx, VARIANT_EFFECTS):
        score += coef * dosages[:, j]
        terms.append({"name": f"variant {variant_sites[j][2]}", "modality": "variants", "feature": site_key[j],
                      "coefficient": coef, "encoding": "alternate-allele dosage 0/1/2"})
    for j, coef in zip(omics_causal, OMICS_EFFECTS):
        score += coef * bio[:, j]
        terms.append({"name": omics_names[j], "modality": "omics", "feature": omics_names[j], "coefficient": coef,
                      "encoding": "biological value in standard deviations (before the site batch offset)"})
    score += AGE_PER_YEAR * (age - 60.0)
    terms.append({"name": "age", "modality": "clinical", "feature": "age", "coefficient": AGE_PER_YEAR,
                  "encoding": "years above 60"})
    score += BMI_PER_UNIT * (bmi - 27.0)
    terms.append({"name": "bmi", "modality": "clinical", "feature": "bmi", "coefficient": BMI_PER_UNIT,
                  "encoding": "kg/m2 above 27"})
    for k, level in enumerate(smoker_names):
        if SMOKER_EFFECTS[level]:
            score += SMOKER_EFFECTS[level] * (smoker == k)
            terms.append({"name": f"smoker={level}", "modality": "clinical", "feature": f"smoker={level}",
                          "coefficient": SMOKER_EFFECTS[level], "encoding": "1 if smoker is this level (vs never)"})
    score += CAUSAL_GENE_EFFECT * mutated[:, causal_gene]
    terms.append({"name": genes[causal_gene], "modality": "events", "feature": genes[causal_gene],
                  "coefficient": CAUSAL_GENE_EFFECT, "encoding": "1 if the gene is mutated"})
    interaction = carriers["motif_A"] * dosages[:, interaction_idx]
    score += INTERACTION_COEFFICIENT * interaction
    terms.append({"name": f"motif_A x {variant_sites[interaction_idx][2]}", "modality": "sequences x variants",
                  "feature": f"motif_A x {site_key[interaction_idx]}", "coefficient": INTERACTION_COEFFICIENT,
                  "encoding": "motif_A present (0/1) times the variant's dosage (0/1/2); the variant has no main effect"})
    for g, name in enumerate(ANCESTRIES):
        if ANCESTRY_EFFECTS[name]:
            score += ANCESTRY_EFFECTS[name] * (ancestry == g)
            terms.append({"name": f"ancestry={name}", "modality": "hidden", "feature": name,
                          "coefficient": ANCESTRY_EFFECTS[name],
                          "encoding": "1 for this ancestry group (not in any file: a confounder)"})
    intercept = _intercept_for(score, PREVALENCE)
    prob = _sigmoid(intercept + score)
    labels = (rng_lab.random(n) < prob).astype(np.int64)

    # Missing cells, drawn after the label (missing at random).
    miss = rng_miss.random((n, 3)) < MISSING_RATE
    clinical_rows = []
    for i in range(n):
        clinical_rows.append([ids[i], CLASSES[labels[i]], "" if miss[i, 0] else f"{age[i]:.1f}",
                              "" if miss[i, 1] else f"{bmi[i]:.1f}", str(sex[i]),
                              "" if miss[i, 2] else smoker_names[smoker[i]], SITES[site[i]]])
    mutation_rows = [(ids[i], genes[g]) for i in range(n) for g in range(N_GENES) if mutated[i, g]]

    case = labels == 1
    truth: dict[str, Any] = {
        "generator": "genofed simulations.synthetic",
        "version": GENERATOR_VERSION,
        "params": {"patients": n, "seed": seed, "sequence_length": L, "variants": m, "omics": p,
                   "site_shift": _r(site_shift)},
        "label": {"file": "clinical.csv", "column": "outcome", "classes": list(CLASSES), "positive": "case",
                  "counts": {c: int((labels == k).sum()) for k, c in enumerate(CLASSES)},
                  "model": "outcome ~ Bernoulli(sigmoid(intercept + sum of coefficient * encoding over terms))",
                  "intercept": _r(intercept), "target_prevalence": PREVALENCE},
        "label_model": {"intercept": _r(intercept), "terms": [{**t, "coefficient": _r(t["coefficient"])}
                                                              for t in terms]},
        "motifs": [
            {"name": name, "consensus": consensus, "length": len(consensus), "carrier_rate": rate,
             "coefficient": coef, "substitution_rate": MOTIF_SUBSTITUTION_RATE,
             "substituted_copies": motif_substituted[name],
             "positions_policy": ("at most one copy per sequence, start uniform in [0, L - length] (0-based), "
                                  "never overlapping another motif; with probability substitution_rate one base "
                                  "of the copy is replaced by a different base"),
             "carriers": int(carriers[name].sum()),
             "carrier_rate_by_class": {"control": _r(carriers[name][~case].mean()) if (~case).any() else 0.0,
                                       "case": _r(carriers[name][case].mean()) if case.any() else 0.0}}
            for name, consensus, rate, coef in MOTIFS],
        "motif_starts": motif_sites,
        "variants": {
            "contig": CONTIG,
            "causal": [{"id": variant_sites[j][2], "site": site_key[j], "coefficient": coef,
                        "allele_frequency_by_ancestry": {a_: _r(group_freq[g, j]) for g, a_ in enumerate(ANCESTRIES)}}
                       for j, coef in zip(causal_idx, VARIANT_EFFECTS)],
            "interaction_variant": {"id": variant_sites[interaction_idx][2], "site": site_key[interaction_idx],
                                    "main_effect": 0.0},
            "population_structure": {"model": "Balding-Nichols", "fst": FST,
                                     "base_frequency": "uniform(0.05, 0.5); uniform(0.25, 0.5) for planted variants"},
        },
        "omics": {"causal": [{"feature": omics_names[j], "coefficient": coef}
                             for j, coef in zip(omics_causal, OMICS_EFFECTS)],
                  "latent_factors": N_OMICS_FACTORS,
                  "note": "label uses the standardised biological value; files hold it plus the site batch offset",
                  "declared_range": list(OMICS_RANGE),
                  "clipped_values": omics_clipped},
        "clinical": {"effects": {"age": {"per_year_above_60": AGE_PER_YEAR},
                                 "bmi": {"per_unit_above_27": BMI_PER_UNIT},
                                 "smoker": {k: v for k, v in SMOKER_EFFECTS.items()},
                                 "sex": "no effect (a null feature)"},
                     "missing_rate_per_cell": {"age": MISSING_RATE, "bmi": MISSING_RATE, "smoker": MISSING_RATE},
                     "missing_cells": {"age": int(miss[:, 0].sum()), "bmi": int(miss[:, 1].sum()),
                                       "smoker": int(miss[:, 2].sum())}},
        "events": {"file": "mutations.tsv", "absent": "zero",
                   "causal": [{"gene": genes[causal_gene], "coefficient": CAUSAL_GENE_EFFECT,
                               "rate": CAUSAL_GENE_RATE}],
                   "rates": {g: _r(r) for g, r in zip(genes, gene_rates)}},
        "interaction": {"kind": "motif present x variant dosage", "motif": "motif_A",
                        "variant": variant_sites[interaction_idx][2], "site": site_key[interaction_idx],
                        "coefficient": INTERACTION_COEFFICIENT},
        "ancestry": {"groups": list(ANCESTRIES), "proportions": list(ANCESTRY_PROPORTIONS),
                     "coefficients": dict(ANCESTRY_EFFECTS), "fst": FST,
                     "counts": {a_: int((ancestry == g).sum()) for g, a_ in enumerate(ANCESTRIES)},
                     "per_patient": [ANCESTRIES[g] for g in ancestry]},
        "site_shifts": {"column": "site_hint", "sites": list(SITES), "scale": _r(site_shift),
                        "site_given_ancestry": {a_: dict(zip(SITES, row))
                                                for a_, row in zip(ANCESTRIES, SITE_GIVEN_ANCESTRY)},
                        "age_shift_years": {s: _r(v) for s, v in zip(SITES, age_shift)},
                        "omics_offset": {s: {omics_names[j]: _r(omics_offset[k, j]) for j in range(p)}
                                         for k, s in enumerate(SITES)},
                        "counts": {s: int((site == k).sum()) for k, s in enumerate(SITES)}},
        "signal_by_modality": {
            "sequences_only": [name for name, *_ in MOTIFS],
            "tabular_only": ([variant_sites[j][2] for j in causal_idx] + [omics_names[j] for j in omics_causal]
                             + ["age", "bmi", "smoker", genes[causal_gene]]),
            "cross_modal": [f"motif_A x {variant_sites[interaction_idx][2]}"],
            "hidden": ["ancestry"],
        },
    }
    return SyntheticCohort(patient_ids=ids, sequences=sequences, variant_sites=variant_sites, dosages=dosages,
                           omics_names=omics_names, omics=measured, clinical_rows=clinical_rows,
                           mutation_rows=mutation_rows, genes=genes, labels=labels, truth=truth)


# ---------------------------------------------------------------------------------------------
# Writing


def write_gzip_text(path: Path, text: str) -> None:
    """gzip ``text`` into ``path`` with no file name and mtime 0, so equal text gives equal bytes."""
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0,
                                                compresslevel=6) as gz:
        gz.write(text.encode("utf-8"))


def _vcf_text(cohort: SyntheticCohort) -> str:
    out = io.StringIO()
    out.write("##fileformat=VCFv4.2\n")
    out.write("##source=genofed-synthetic\n")
    out.write(f"##contig=<ID={CONTIG},length={CONTIG_LENGTH}>\n")
    out.write('##FORMAT=<ID=GT,Number=1,Type=String,Description="Genotype">\n')
    out.write("#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\tFORMAT\t" + "\t".join(cohort.patient_ids) + "\n")
    gt = np.array(["0/0", "0/1", "1/1"])
    for j, (chrom, pos, vid, ref, alt) in enumerate(cohort.variant_sites):
        out.write(f"{chrom}\t{pos}\t{vid}\t{ref}\t{alt}\t.\tPASS\t.\tGT\t")
        out.write("\t".join(gt[cohort.dosages[:, j]]))
        out.write("\n")
    return out.getvalue()


def _write_files(cohort: SyntheticCohort, folder: Path) -> None:
    t = cohort.truth
    with open(folder / "sequences.fa", "w", encoding="ascii", newline="\n") as fh:
        fh.writelines(f">{pid}\n{seq}\n" for pid, seq in zip(cohort.patient_ids, cohort.sequences))
    write_gzip_text(folder / "variants.vcf.gz", _vcf_text(cohort))
    with open(folder / "omics.csv", "w", encoding="ascii", newline="\n") as fh:
        fh.write("patient_id," + ",".join(cohort.omics_names) + "\n")
        fh.writelines(pid + "," + ",".join(f"{v:.4f}" for v in row) + "\n"
                      for pid, row in zip(cohort.patient_ids, cohort.omics))
    with open(folder / "clinical.csv", "w", encoding="ascii", newline="\n") as fh:
        fh.write("patient_id,outcome,age,bmi,sex,smoker,site_hint\n")
        fh.writelines(",".join(row) + "\n" for row in cohort.clinical_rows)
    with open(folder / "mutations.tsv", "w", encoding="ascii", newline="\n") as fh:
        fh.write("patient_id\tgene\n")
        fh.writelines(f"{pid}\t{gene}\n" for pid, gene in cohort.mutation_rows)
    spec = CohortSpec(
        name="synthetic", id_column="patient_id",
        label=LabelSpec(file=folder / "clinical.csv", column="outcome", classes=CLASSES, positive=("case",)),
        split=SplitSpec(policy="stratified", seed=int(t["params"]["seed"])),
        sequences=SequencesSpec(file=folder / "sequences.fa", length=int(t["params"]["sequence_length"])),
        variants=VariantsSpec(file=folder / "variants.vcf.gz",
                              sites=tuple(f"{c}:{pos}:{r}:{a}" for c, pos, _, r, a in cohort.variant_sites)),
        omics=OmicsSpec(file=folder / "omics.csv", features=tuple(cohort.omics_names), range=OMICS_RANGE),
        clinical=ClinicalSpec(file=folder / "clinical.csv", numeric=("age", "bmi"),
                              categorical={"sex": ("F", "M"), "smoker": tuple(SMOKER_RATES)},
                              ranges=dict(CLINICAL_RANGES)),
        events=EventsSpec(file=folder / "mutations.tsv", feature_column="gene", features=tuple(cohort.genes),
                          absent="zero"),
    )
    write_spec(spec, folder / "spec.toml")
    (folder / "truth.json").write_text(json.dumps(t, indent=1) + "\n", encoding="utf-8")


def prepare_out_dir(out: Path) -> Path:
    """Refuse an ``out`` that exists and is not empty; return a fresh hidden sibling to build in."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SynthError(f"{out}: already exists and is not empty; give a new --out folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))


def publish_dir(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` folder to ``out`` (which is absent or an empty folder)."""
    out = Path(out)
    umask = os.umask(0o022)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp made it 0700; give it the mode a plain mkdir would
    if out.is_dir():
        out.rmdir()
    tmp.replace(out)


def write_synthetic_cohort(*, out: str | Path, patients: int, seed: int, sequence_length: int = 200,
                           variants: int = 200, omics: int = 50, site_shift: float = 1.0) -> dict[str, Any]:
    """Generate a synthetic cohort and write it to ``out`` (created; must not exist or be empty).

    Returns a short summary (patients, class counts, files). The folder appears whole or not at all.
    """
    cohort = generate(patients=patients, seed=seed, sequence_length=sequence_length, variants=variants,
                      omics=omics, site_shift=site_shift)
    out = Path(out)
    tmp = prepare_out_dir(out)
    try:
        _write_files(cohort, tmp)
        publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out": str(out), "patients": patients, "classes": cohort.truth["label"]["counts"],
            "files": sorted(p.name for p in out.iterdir()), "spec": str(out / "spec.toml")}
