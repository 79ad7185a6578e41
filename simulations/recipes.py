"""Recipes: the real public data sets in ``../shared/data`` as per-site cohorts.

Each recipe reads the data set as published (see ``../shared/data/SOURCES.md``), meets its known
quirks with a count in ``sites.json`` or a one-line :class:`RecipeError`, deals the patients to
sites by a natural grouping, and writes the layout of :mod:`simulations.site_layout` (per-site
standard files + pinned ``spec.toml``, ``sites.json``, optional vaults).

``splice``    UCI splice junctions (3,190 x 60 bp, classes EI / IE / N). Sites and train/test
              splits are made by *locus group*: the gene locus (instance name before the first
              ``-``), with loci that share an identical sequence merged, so that homologous and
              duplicated sequences never straddle sites or splits. Default 3 sites.
``kg1000``    1000 Genomes chr1 slice (4,296 sites x 2,504 people), label ``super_pop``. Whole
              populations are dealt round-robin (super-populations in turn, populations shuffled
              within each by the seed), so every site sees several super-populations. Default 4
              sites (then every site holds all five, since AMR has four populations); 2 to 13.
``metabric``  METABRIC, one site per contributing centre (``Cohort`` 1-5); label: died of breast
              cancer (``event == 1`` in ``metabric_survival.tsv``) versus not. Exactly 5 sites.
"""

from __future__ import annotations

import csv
import gzip
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import GenofedError
from common.spec import ClinicalSpec, CohortSpec, EventsSpec, LabelSpec, SequencesSpec, SplitSpec, VariantsSpec
from simulations.site_layout import SitePlan, subset_vcf_text, write_gzip_text, write_sites, write_table

RECIPES = ("splice", "kg1000", "metabric")
DEFAULT_SITES = {"splice": 3, "kg1000": 4, "metabric": 5}


class RecipeError(GenofedError, ValueError):
    """A real data set is missing, malformed, or cannot be dealt into the sites asked for."""


def _need(path: Path) -> Path:
    if not path.is_file():
        raise RecipeError(f"{path}: not found; pass --data pointing at the shared data folder "
                          "(the one holding splice/, kg1000_chr1/ and metabric/)")
    return path


def _read_tsv(path: Path, *, delimiter: str = "\t") -> tuple[list[str], list[dict[str, str]]]:
    """Rows of a TSV as dicts of stripped strings (CRLF and padded cells tolerated)."""
    with open(_need(path), encoding="utf-8-sig", newline="") as fh:
        rows = list(csv.reader(fh, delimiter=delimiter))
    if not rows:
        raise RecipeError(f"{path}: file is empty")
    header = [h.strip() for h in rows[0]]
    out = []
    for line_no, row in enumerate(rows[1:], start=2):
        if not any(c.strip() for c in row):
            continue
        cells = [c.strip() for c in row] + [""] * max(0, len(header) - len(row))
        if any(c for c in cells[len(header):]):
            raise RecipeError(f"{path}:line {line_no}: {len(row)} cells for {len(header)} columns")
        out.append(dict(zip(header, cells)))
    return header, out


def _require_columns(path: Path, header: list[str], columns: list[str]) -> None:
    missing = [c for c in columns if c not in header]
    if missing:
        raise RecipeError(f"{path}: missing column(s) {', '.join(repr(c) for c in missing)}; "
                          f"found: {', '.join(h for h in header if h)}")


def _class_counts(labels: list[str], classes: tuple[str, ...]) -> dict[str, int]:
    return {c: sum(1 for x in labels if x == c) for c in classes}


def _check_sites_range(recipe: str, sites: int, low: int, high: int, why: str) -> None:
    if not low <= sites <= high:
        raise RecipeError(f"recipe {recipe}: --sites must be between {low} and {high} ({why}), got {sites}")


# ---------------------------------------------------------------------------------------------
# splice

SPLICE_CLASSES = ("EI", "IE", "N")
SPLICE_LENGTH = 60


@dataclass
class SpliceRecord:
    id: str
    instance: str
    cls: str
    locus: str
    sequence: str
    group: str = ""


def read_splice(data: Path) -> tuple[list[SpliceRecord], dict[str, Any]]:
    """Parse ``splice/splice.data.csv`` (raw UCI layout); returns records with unique ids and quirk counts."""
    path = _need(data / "splice" / "splice.data.csv")
    with open(path, encoding="utf-8-sig", newline="") as fh:
        rows = list(csv.reader(fh, skipinitialspace=True))
    if not rows or [h.strip().lower() for h in rows[0]] != ["class", "donor", "sequence"]:
        raise RecipeError(f"{path}: expected the UCI header 'Class, Donor, Sequence', got {rows[0] if rows else 'nothing'}")
    records: list[SpliceRecord] = []
    seen: dict[str, int] = {}
    renamed = ambiguous = 0
    symbols: dict[str, int] = {}
    for line_no, row in enumerate(rows[1:], start=2):
        if not any(c.strip() for c in row):
            continue
        if len(row) != 3:
            raise RecipeError(f"{path}:line {line_no}: {len(row)} fields, expected 3 (class, instance name, sequence)")
        cls, name, seq = (c.strip() for c in row)
        seq = seq.upper()
        if cls not in SPLICE_CLASSES:
            raise RecipeError(f"{path}:line {line_no}: class {cls!r} is not one of {', '.join(SPLICE_CLASSES)}")
        if len(seq) != SPLICE_LENGTH:
            raise RecipeError(f"{path}:line {line_no}: sequence of {name} has {len(seq)} bases, expected {SPLICE_LENGTH}")
        odd = set(seq) - set("ACGT")
        if odd:
            ambiguous += 1
            for s in seq:
                if s in odd:
                    symbols[s] = symbols.get(s, 0) + 1
        if not name:
            raise RecipeError(f"{path}:line {line_no}: empty instance name")
        seen[name] = seen.get(name, 0) + 1
        rid = name if seen[name] == 1 else f"{name}#{seen[name]}"
        renamed += seen[name] > 1
        records.append(SpliceRecord(id=rid, instance=name, cls=cls, locus=name.split("-", 1)[0], sequence=seq))
    ids = [r.id for r in records]
    if len(set(ids)) != len(ids):
        raise RecipeError(f"{path}: instance names still repeat after renaming (a name ending in '#N' collides)")
    by_seq: dict[str, list[SpliceRecord]] = {}
    for r in records:
        by_seq.setdefault(r.sequence, []).append(r)
    quirks = {
        "sequences": len(records),
        "ids_renamed": renamed,
        "id_rule": "instance name; the k-th repeat of a name (k >= 2) gets '#k' appended",
        "sequences_with_ambiguity_codes": ambiguous,
        "ambiguity_symbols": dict(sorted(symbols.items())),
        "duplicate_sequences": len(records) - len(by_seq),
        "exact_duplicate_rows": _exact_dups(records),
        "sequences_with_conflicting_classes": sum(1 for rs in by_seq.values() if len({r.cls for r in rs}) > 1),
    }
    return records, quirks


def _exact_dups(records: list[SpliceRecord]) -> int:
    seen: set[tuple[str, str, str]] = set()
    dups = 0
    for r in records:
        key = (r.cls, r.instance, r.sequence)
        dups += key in seen
        seen.add(key)
    return dups


def splice_groups(records: list[SpliceRecord]) -> dict[str, int]:
    """Assign each record its locus group: loci joined when they share an identical sequence.

    The group is named after its alphabetically first locus. Returns the number of loci per group.
    """
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    first_locus_of_seq: dict[str, str] = {}
    for r in records:
        find(r.locus)
        other = first_locus_of_seq.setdefault(r.sequence, r.locus)
        a, b = find(other), find(r.locus)
        if a != b:
            lo, hi = sorted((a, b))
            parent[hi] = lo
    loci_per_group: dict[str, set[str]] = {}
    for r in records:
        r.group = find(r.locus)
        loci_per_group.setdefault(r.group, set()).add(r.locus)
    # find() roots are the alphabetically smallest locus of each component by construction.
    return {g: len(v) for g, v in loci_per_group.items()}


def deal_groups(sizes: dict[str, int], sites: int, seed: int) -> dict[str, int]:
    """Whole groups to sites, largest first onto the site with fewest records (ties broken by the seed)."""
    rng = np.random.default_rng(seed)
    names = sorted(sizes)
    tiebreak = dict(zip(names, rng.permutation(len(names))))
    order = sorted(names, key=lambda g: (-sizes[g], tiebreak[g]))
    load = [0] * sites
    where: dict[str, int] = {}
    for g in order:
        k = min(range(sites), key=lambda s: (load[s], s))
        where[g] = k
        load[k] += sizes[g]
    return where


def splice_plans(data: Path, sites: int, seed: int) -> tuple[list[SitePlan], dict[str, Any]]:
    """Per-site plans for the splice recipe, and its ``sites.json`` metadata."""
    _check_sites_range("splice", sites, 2, 50, "whole locus groups are dealt to sites")
    records, quirks = read_splice(data)
    loci_per_group = splice_groups(records)
    group_sizes: dict[str, int] = {}
    for r in records:
        group_sizes[r.group] = group_sizes.get(r.group, 0) + 1
    where = deal_groups(group_sizes, sites, seed)
    names = [f"site-{k + 1}" for k in range(sites)]
    plans = []
    for k, name in enumerate(names):
        rows = [r for r in records if where[r.group] == k]

        def write(folder: Path, rows: list[SpliceRecord] = rows, name: str = name) -> CohortSpec:
            write_table(folder / "sequences.csv", ["id", "sequence"], ([r.id, r.sequence] for r in rows))
            write_table(folder / "labels.csv", ["id", "class", "locus", "locus_group", "instance_name"],
                        ([r.id, r.cls, r.locus, r.group, r.instance] for r in rows))
            return CohortSpec(
                name=f"splice-{name}", id_column="id",
                label=LabelSpec(file=folder / "labels.csv", column="class", classes=SPLICE_CLASSES),
                split=SplitSpec(policy="group", group_column="locus_group", group_file=folder / "labels.csv",
                                seed=seed),
                sequences=SequencesSpec(file=folder / "sequences.csv", length=SPLICE_LENGTH, format="csv",
                                        column="sequence"),
            )

        plans.append(SitePlan(name=name, write=write, patients=len(rows),
                              classes=_class_counts([r.cls for r in rows], SPLICE_CLASSES),
                              extra={"loci": len({r.locus for r in rows}),
                                     "locus_groups": len({r.group for r in rows})}))
    merged = sum(1 for n in loci_per_group.values() if n > 1)
    meta = {
        "source": {"file": str((data / "splice" / "splice.data.csv").resolve()), "patients": len(records),
                   "classes": _class_counts([r.cls for r in records], SPLICE_CLASSES),
                   "loci": len({r.locus for r in records}), "locus_groups": len(loci_per_group)},
        "quirks": {**quirks,
                   "locus_groups_joining_several_loci": merged,
                   "loci_in_joined_groups": sum(n for n in loci_per_group.values() if n > 1),
                   "grouping_rule": ("locus = instance name before the first '-'; loci that share an identical "
                                     "sequence are joined into one locus group (named after its alphabetically "
                                     "first locus); sites and train/validation/test splits are made by locus group")},
        "dealing": "locus groups, largest first, each onto the site with the fewest sequences (ties by seed)",
    }
    return plans, meta


# ---------------------------------------------------------------------------------------------
# kg1000

KG_CLASSES = ("AFR", "AMR", "EAS", "EUR", "SAS")
KG_SEXES = ("female", "male")


def _read_vcf_lines(path: Path) -> list[str]:
    try:
        with gzip.open(_need(path), "rt", encoding="utf-8", newline="") as fh:
            return fh.read().splitlines()
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{path}: cannot read as gzip-compressed VCF: {exc}") from None


def deal_populations(pop_super: dict[str, str], sites: int, seed: int) -> dict[str, int]:
    """Populations to sites: super-populations in sorted order, populations shuffled within each, dealt round-robin."""
    rng = np.random.default_rng(seed)
    order: list[str] = []
    for sp in sorted(set(pop_super.values())):
        pops = sorted(p for p, s in pop_super.items() if s == sp)
        order.extend(pops[i] for i in rng.permutation(len(pops)))
    return {p: i % sites for i, p in enumerate(order)}


def kg1000_plans(data: Path, sites: int, seed: int) -> tuple[list[SitePlan], dict[str, Any]]:
    """Per-site plans for the 1000 Genomes recipe, and its ``sites.json`` metadata."""
    _check_sites_range("kg1000", sites, 2, 13, "26 whole populations are dealt out, at least two per site")
    folder = data / "kg1000_chr1"
    panel_path = folder / "integrated_call_samples_v3.20130502.ALL.panel"
    header, panel = _read_tsv(panel_path)
    _require_columns(panel_path, header, ["sample", "pop", "super_pop", "gender"])
    vcf_path = folder / "example.vcf.gz"
    lines = _read_vcf_lines(vcf_path)
    chrom_line = next((ln for ln in lines if ln.startswith("#CHROM")), None)
    if chrom_line is None:
        raise RecipeError(f"{vcf_path}: no #CHROM header line")
    samples = chrom_line.split("\t")[9:]
    info = {}
    for row in panel:
        if row["sample"] in info:
            raise RecipeError(f"{panel_path}: sample {row['sample']} is listed twice")
        if row["super_pop"] not in KG_CLASSES:
            raise RecipeError(f"{panel_path}: sample {row['sample']}: super_pop {row['super_pop']!r} is not one of "
                              f"{', '.join(KG_CLASSES)}")
        if row["gender"] not in KG_SEXES:
            raise RecipeError(f"{panel_path}: sample {row['sample']}: gender {row['gender']!r} is not one of "
                              f"{', '.join(KG_SEXES)}")
        info[row["sample"]] = row
    unknown = [s for s in samples if s not in info]
    if unknown:
        raise RecipeError(f"{vcf_path}: {len(unknown)} samples are not in the panel (first: {unknown[0]})")
    if len(set(samples)) != len(samples):
        raise RecipeError(f"{vcf_path}: a sample name appears twice in the #CHROM line")
    in_vcf = set(samples)
    not_genotyped = sorted(s for s in info if s not in in_vcf)
    records = [ln for ln in lines if ln and not ln.startswith("#")]
    site_ids = []
    symbolic = 0
    for ln in records:
        f = ln.split("\t", 5)
        site_ids.append(f"{f[0]}:{f[1]}:{f[3]}:{f[4]}")
        symbolic += f[4].startswith("<")
    if len(set(site_ids)) != len(site_ids):
        raise RecipeError(f"{vcf_path}: the same variant (chrom:pos:ref:alt) appears twice")
    pop_super = {info[s]["pop"]: info[s]["super_pop"] for s in samples}
    for s in samples:
        if pop_super[info[s]["pop"]] != info[s]["super_pop"]:
            raise RecipeError(f"{panel_path}: population {info[s]['pop']} is listed under two super-populations")
    where = deal_populations(pop_super, sites, seed)
    names = [f"site-{k + 1}" for k in range(sites)]
    plans = []
    for k, name in enumerate(names):
        keep = [s for s in samples if where[info[s]["pop"]] == k]
        pops = sorted({info[s]["pop"] for s in keep})

        def write(folder: Path, keep: list[str] = keep, name: str = name) -> CohortSpec:
            text, n = subset_vcf_text(lines, set(keep))
            assert n == len(keep)
            write_gzip_text(folder / "variants.vcf.gz", text)
            write_table(folder / "samples.csv", ["sample", "super_pop", "pop", "sex"],
                        ([s, info[s]["super_pop"], info[s]["pop"], info[s]["gender"]] for s in keep))
            return CohortSpec(
                name=f"kg1000-{name}", id_column="sample",
                label=LabelSpec(file=folder / "samples.csv", column="super_pop", classes=KG_CLASSES),
                split=SplitSpec(policy="stratified", seed=seed),
                variants=VariantsSpec(file=folder / "variants.vcf.gz", sites=tuple(site_ids)),
                clinical=ClinicalSpec(file=folder / "samples.csv", categorical={"sex": KG_SEXES}),
            )

        classes = _class_counts([info[s]["super_pop"] for s in keep], KG_CLASSES)
        plans.append(SitePlan(name=name, write=write, patients=len(keep), classes=classes,
                              extra={"populations": pops,
                                     "super_populations": [c for c in KG_CLASSES if classes[c] > 0]}))
    meta = {
        "source": {"vcf": str(vcf_path.resolve()), "panel": str(panel_path.resolve()), "patients": len(samples),
                   "variants": len(site_ids), "populations": len(pop_super),
                   "classes": _class_counts([info[s]["super_pop"] for s in samples], KG_CLASSES)},
        "quirks": {"panel_samples_not_in_vcf": len(not_genotyped),
                   "panel_samples_not_in_vcf_note": "listed in the panel but not genotyped in the VCF; left out",
                   "symbolic_alt_records": symbolic,
                   "symbolic_alt_note": "structural variants (<CN0>, <INS:ME:SVA>) kept: all records are the agreed panel"},
        "dealing": ("whole populations: super-populations in sorted order, populations shuffled within each "
                    "by the seed, then dealt round-robin over the sites"),
        "population_sites": {p: names[where[p]] for p in sorted(where)},
    }
    return plans, meta


# ---------------------------------------------------------------------------------------------
# metabric

MB_CLASSES = ("alive_or_other_cause", "died_of_disease")
MB_EVENTS = {"0": "Living", "1": "Died of Disease", "2": "Died of Other Causes"}
MB_COHORTS = ("1", "2", "3", "4", "5")

# output column -> (source file key, source column); "c" = metabric_clinical.tsv, "b" = cBioPortal export
MB_NUMERIC = {
    "age_at_diagnosis": ("c", "AGE_AT_DIAGNOSIS"),
    "lymph_nodes_positive": ("c", "LYMPH_NODES_EXAMINED_POSITIVE"),
    "npi": ("c", "NPI"),
    "tumour_grade": ("b", "Neoplasm Histologic Grade"),
}
# Declared value ranges of the numeric fields: public clinical bounds, NOT fitted to the data (a
# range read off a cohort's min/max would leak it). They clip the noised column moments of the
# shared preprocessing, and the import refuses a value outside them. Age in years; positive
# lymph nodes: a count, an axillary dissection yields far fewer than 100; NPI = 0.2 x tumour size
# (cm) + grade (1-3) + nodal stage (1-3): every term is non-negative, and 10 leaves room for a
# 20 cm tumour (the lower bound is 0, not the formula's minimum of just over 2: recorded NPIs
# below 2 exist); histologic grade is Elston-Ellis 1-3.
MB_RANGES = {
    "age_at_diagnosis": (0.0, 120.0),
    "lymph_nodes_positive": (0.0, 100.0),
    "npi": (0.0, 10.0),
    "tumour_grade": (1.0, 3.0),
}
MB_CATEGORICAL: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "er_ihc": ("c", "ER_IHC", ("Negative", "Positive")),
    "her2_status": ("b", "HER2 Status", ("Negative", "Positive")),
    "her2_snp6": ("c", "HER2_SNP6", ("LOSS", "NEUTRAL", "GAIN")),
    "claudin_subtype": ("c", "CLAUDIN_SUBTYPE", ("LumA", "LumB", "Her2", "Basal", "claudin-low", "Normal", "NC")),
    "histological_subtype": ("c", "HISTOLOGICAL_SUBTYPE", ("Ductal/NST", "Lobular", "Mixed", "Medullary", "Mucinous",
                                                          "Tubular/ cribriform", "Metaplastic", "Other")),
    "cellularity": ("c", "CELLULARITY", ("Low", "Moderate", "High")),
    "menopausal_state": ("c", "INFERRED_MENOPAUSAL_STATE", ("Pre", "Post")),
    "breast_surgery": ("c", "BREAST_SURGERY", ("BREAST CONSERVING", "MASTECTOMY")),
    "chemotherapy": ("c", "CHEMOTHERAPY", ("NO", "YES")),
    "hormone_therapy": ("c", "HORMONE_THERAPY", ("NO", "YES")),
    "radio_therapy": ("c", "RADIO_THERAPY", ("NO", "YES")),
}
# Known spellings in the source fixed or read as missing (value -> replacement; "" = missing).
MB_RECODE = {"er_ihc": {"Positve": "Positive"}, "her2_snp6": {"UNDEF": ""}}
MB_MISSING = {"", "NA", "NaN", "nan", "null"}
MB_LABEL_RULE = ("outcome = 'died_of_disease' if metabric_survival.tsv event == 1 (event_str 'Died of Disease'), "
                 "else 'alive_or_other_cause' (event 0 'Living' or 2 'Died of Other Causes'); "
                 "follow-up time is not used, so patients alive at last follow-up count as not having died of "
                 "the disease however short their follow-up")


def metabric_plans(data: Path, sites: int, seed: int) -> tuple[list[SitePlan], dict[str, Any]]:
    """Per-site plans for the METABRIC recipe (one site per ``Cohort``), and its ``sites.json`` metadata."""
    if sites != 5:
        raise RecipeError(f"recipe metabric: --sites must be 5 (one site per contributing centre, Cohort 1-5), "
                          f"got {sites}")
    folder = data / "metabric"
    surv_path, clin_path = folder / "metabric_survival.tsv", folder / "metabric_clinical.tsv"
    cbio_path, mut_path = folder / "brca_metabric_clinical_data.tsv", folder / "metabric_mutations.tsv"
    sh, surv = _read_tsv(surv_path)
    _require_columns(surv_path, sh, ["patientId", "event", "event_str"])
    ch, clin = _read_tsv(clin_path)
    _require_columns(clin_path, ch, ["patientId"] + [c for f, c in MB_NUMERIC.values() if f == "c"]
                     + [c for f, c, _ in MB_CATEGORICAL.values() if f == "c"])
    bh, cbio = _read_tsv(cbio_path)
    _require_columns(cbio_path, bh, ["Patient ID", "Cohort"] + [c for f, c in MB_NUMERIC.values() if f == "b"]
                     + [c for f, c, _ in MB_CATEGORICAL.values() if f == "b"])
    mh, muts = _read_tsv(mut_path)
    _require_columns(mut_path, mh, ["patientId", "hugoGeneSymbol"])

    labels: dict[str, str] = {}
    for line_no, row in enumerate(surv, start=2):
        pid, ev, ev_str = row["patientId"], row["event"], row["event_str"]
        if pid in labels:
            raise RecipeError(f"{surv_path}:line {line_no}: patient {pid} is listed twice")
        if ev not in MB_EVENTS:
            raise RecipeError(f"{surv_path}:line {line_no}: event {ev!r} is not 0, 1 or 2")
        if MB_EVENTS[ev] != ev_str:
            raise RecipeError(f"{surv_path}:line {line_no}: event {ev} and event_str {ev_str!r} disagree "
                              f"(expected {MB_EVENTS[ev]!r})")
        labels[pid] = MB_CLASSES[1] if ev == "1" else MB_CLASSES[0]
    clin_by = {}
    for row in clin:
        if row["patientId"] in clin_by:
            raise RecipeError(f"{clin_path}: patient {row['patientId']} is listed twice")
        clin_by[row["patientId"]] = row
    cbio_by = {}
    for row in cbio:
        if row["Patient ID"] in cbio_by:
            raise RecipeError(f"{cbio_path}: patient {row['Patient ID']} is listed twice")
        cbio_by[row["Patient ID"]] = row

    dropped = {"no_clinical_row": 0, "not_in_cbioportal_export": 0, "no_cohort_value": 0, "cohort_not_1_to_5": 0}
    cohort_of: dict[str, str] = {}
    for pid in labels:
        if pid not in clin_by:
            dropped["no_clinical_row"] += 1
            continue
        if pid not in cbio_by:
            dropped["not_in_cbioportal_export"] += 1
            continue
        raw = cbio_by[pid]["Cohort"]
        if raw in MB_MISSING:
            dropped["no_cohort_value"] += 1
            continue
        try:
            number = float(raw)
        except ValueError:
            raise RecipeError(f"{cbio_path}: patient {pid}: Cohort {raw!r} is not a number") from None
        code = str(int(number)) if number.is_integer() else raw
        if code not in MB_COHORTS:
            dropped["cohort_not_1_to_5"] += 1
            continue
        cohort_of[pid] = code

    recoded = {name: 0 for name in MB_RECODE}
    missing_cells = {name: 0 for name in [*MB_NUMERIC, *MB_CATEGORICAL]}

    def cell(pid: str, name: str, where: str, col: str) -> str:
        raw = (clin_by[pid] if where == "c" else cbio_by[pid])[col]
        if raw in MB_RECODE.get(name, {}):
            raw = MB_RECODE[name][raw]
            recoded[name] += 1
        if raw in MB_MISSING:
            missing_cells[name] += 1
            return ""
        return raw

    table: dict[str, list[str]] = {}
    for pid, code in cohort_of.items():
        out_row = [pid, labels[pid], code]
        for name, (where, col) in MB_NUMERIC.items():
            v = cell(pid, name, where, col)
            if v:
                try:
                    num = float(v)
                except ValueError:
                    raise RecipeError(f"{clin_path if where == 'c' else cbio_path}: patient {pid}: column {col!r}: "
                                      f"{v!r} is not a number") from None
                if not np.isfinite(num):
                    raise RecipeError(f"{clin_path if where == 'c' else cbio_path}: patient {pid}: column {col!r}: "
                                      f"{v!r} is not finite")
                lo, hi = MB_RANGES[name]
                if not lo <= num <= hi:
                    raise RecipeError(f"{clin_path if where == 'c' else cbio_path}: patient {pid}: column {col!r}: "
                                      f"{v!r} is outside the public range [{lo:g}, {hi:g}] the recipe declares for "
                                      f"{name} (MB_RANGES in simulations/recipes.py): widen it if the value is real")
                v = str(int(num)) if name == "tumour_grade" and num.is_integer() else v
            out_row.append(v)
        for name, (where, col, cats) in MB_CATEGORICAL.items():
            v = cell(pid, name, where, col)
            if v and v not in cats:
                raise RecipeError(f"{clin_path if where == 'c' else cbio_path}: patient {pid}: column {col!r}: "
                                  f"category {v!r} is not one of {', '.join(cats)}")
            out_row.append(v)
        table[pid] = out_row

    genes = sorted({m["hugoGeneSymbol"] for m in muts if m["hugoGeneSymbol"]})
    if any(not m["hugoGeneSymbol"] for m in muts):
        raise RecipeError(f"{mut_path}: a mutation row has no gene (hugoGeneSymbol)")
    unknown_mut = sum(1 for m in muts if m["patientId"] not in labels)
    profiled = {m["patientId"] for m in muts}
    protein = "proteinChange" in mh
    header = ["patient_id", "outcome", "cohort", *MB_NUMERIC, *MB_CATEGORICAL]
    names = [f"cohort-{c}" for c in MB_COHORTS]
    plans = []
    for k, code in enumerate(MB_COHORTS):
        pids = [p for p in cohort_of if cohort_of[p] == code]
        keep = set(pids)
        site_muts = [m for m in muts if m["patientId"] in keep]

        def write(folder: Path, pids: list[str] = pids, site_muts: list[dict[str, str]] = site_muts,
                  name: str = names[k]) -> CohortSpec:
            write_table(folder / "clinical.tsv", header, (table[p] for p in pids))
            write_table(folder / "mutations.tsv", ["patient_id", "gene"] + (["protein_change"] if protein else []),
                        ([m["patientId"], m["hugoGeneSymbol"]] + ([m["proteinChange"]] if protein else [])
                         for m in site_muts))
            return CohortSpec(
                name=f"metabric-{name}", id_column="patient_id",
                label=LabelSpec(file=folder / "clinical.tsv", column="outcome", classes=MB_CLASSES,
                                positive=(MB_CLASSES[1],)),
                split=SplitSpec(policy="stratified", seed=seed),
                clinical=ClinicalSpec(file=folder / "clinical.tsv", numeric=tuple(MB_NUMERIC),
                                      categorical={n: c for n, (_, _, c) in MB_CATEGORICAL.items()},
                                      ranges=dict(MB_RANGES)),
                events=EventsSpec(file=folder / "mutations.tsv", feature_column="gene", features=tuple(genes),
                                  absent="missing"),
            )

        plans.append(SitePlan(name=names[k], write=write, patients=len(pids),
                              classes=_class_counts([labels[p] for p in pids], MB_CLASSES),
                              extra={"cohort": int(code), "mutation_rows": len(site_muts),
                                     "not_profiled": sum(1 for p in pids if p not in profiled)}))
    meta = {
        "source": {"folder": str(folder.resolve()), "patients": len(labels),
                   "classes": _class_counts(list(labels.values()), MB_CLASSES),
                   "mutation_rows": len(muts), "genes": len(genes)},
        "label_rule": MB_LABEL_RULE,
        "fields": {"numeric": {n: f"{'metabric_clinical.tsv' if w == 'c' else 'brca_metabric_clinical_data.tsv'}:{c}"
                               for n, (w, c) in MB_NUMERIC.items()},
                   "categorical": {n: f"{'metabric_clinical.tsv' if w == 'c' else 'brca_metabric_clinical_data.tsv'}:{c}"
                                   for n, (w, c, _) in MB_CATEGORICAL.items()},
                   "events": "metabric_mutations.tsv: one flag per gene (hugoGeneSymbol), all genes of the file",
                   "not_used": "tumour size and stage are not in these files; NPI (which combines size, grade and "
                               "nodes) stands in for them"},
        "dropped": {**dropped, "total": sum(dropped.values())},
        "quirks": {"recoded": {n: {"from": dict(MB_RECODE[n]), "cells": recoded[n]} for n in MB_RECODE},
                   "missing_cells": missing_cells,
                   "patients_without_mutation_record": sum(1 for p in cohort_of if p not in profiled),
                   "without_mutation_record_policy": "absent = 'missing': not profiled, flags missing (not zero)",
                   "mutation_rows_of_unknown_patients": unknown_mut,
                   "repeated_patient_gene_rows": len(muts) - len({(m["patientId"], m["hugoGeneSymbol"]) for m in muts}),
                   "cohort_column": "float in the cBioPortal export (1.0); read as an integer"},
        "dealing": "one site per contributing centre (cBioPortal 'Cohort' 1-5), joined on patientId = Patient ID",
    }
    return plans, meta


# ---------------------------------------------------------------------------------------------

_PLANNERS: dict[str, Callable[[Path, int, int], tuple[list[SitePlan], dict[str, Any]]]] = {
    "splice": splice_plans, "kg1000": kg1000_plans, "metabric": metabric_plans}


def run_recipe(name: str, *, data: str | Path, out: str | Path, sites: int | None = None, vaults: bool = False,
               seed: int = 0, show_progress: bool = True) -> dict[str, Any]:
    """Write recipe ``name`` as per-site cohorts under ``out``; returns the ``sites.json`` payload."""
    if name not in _PLANNERS:
        raise RecipeError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    data = Path(data)
    if not data.is_dir():
        raise RecipeError(f"{data}: --data folder not found (it should hold splice/, kg1000_chr1/ and metabric/)")
    sites = DEFAULT_SITES[name] if sites is None else sites
    plans, meta = _PLANNERS[name](data, sites, seed)
    meta = {"made_by": "genofed cohort recipe", "recipe": name, "data": str(data.resolve()), "seed": seed, **meta}
    return write_sites(Path(out), plans, meta=meta, vaults=vaults, show_progress=show_progress)
