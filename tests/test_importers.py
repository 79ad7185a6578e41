"""import_cohort: a tiny valid cohort with every modality, and one test per kind of bad input."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import pytest
import tomli_w

from client.importers import CohortImportError, Problem, import_cohort
from client.importers.problems import ProblemLog
from client.importers.vcf import BGZF_EOF
from common.cohort import cohort_from_blobs, cohort_to_blobs
from common.spec import CohortSpec, load_spec, write_spec

PATIENTS = [f"P{i}" for i in range(1, 9)]
OUTCOME = {p: ("case" if i % 2 == 0 else "control") for i, p in enumerate(PATIENTS)}

LABELS = "patient_id,outcome,family\n" + "".join(
    f"{p},{OUTCOME[p]},f{i // 2}\n" for i, p in enumerate(PATIENTS))

FASTA = """>P1 first patient
ACGTACGT
>P2
ACGT
ACGA
>P3
ACGTRCGT
>P4
acgtacgt
>P5
TTTTAAAA
>P6
GGGGCCCC

>P7
ACGTNNYT
>P8
CATGCATG
"""

VCF_HEADER = """##fileformat=VCFv4.2
##contig=<ID=1,length=1000000>
##contig=<ID=2,length=1000000>
##FORMAT=<ID=GT,Number=1,Type=String,Description="Genotype">
"""
VCF_SAMPLES = ["P8", "P7", "P6", "P5", "P4", "P3", "P2", "P1"]  # not the label file's order
VCF_RECORDS = [
    "1\t100\trs1\tA\tG\t.\tPASS\t.\tGT\t0/0\t0/1\t1/1\t0|1\t./.\t0/0\t1|1\t0/1",
    "1\t250\t.\tC\tT\t.\tPASS\t.\tGT\t0/0\t0/0\t0/0\t0/0\t0/0\t0/0\t0/0\t1/1",
    "2\t50\t.\tG\tA\t.\tPASS\t.\tGT\t0/0\t0/0\t0/0\t0/0\t0/0\t0/1\t0/0\t0/0",
]
# Dosages per patient P1..P8 for each site, read off the records above.
DOSAGES = {"1:100:A:G": [1, 2, 0, -1, 1, 2, 1, 0], "1:250:C:T": [2, 0, 0, 0, 0, 0, 0, 0],
           "2:50:G:A": [0, 0, 1, 0, 0, 0, 0, 0]}

OMICS = """patient_id,TP53,ESR1
P8,8,-8e-1
P1,1.5,-2
P2,0,1e3
P3,3,3
P4,4,4
P5,5,5
P6,6,6
P7,7,7
"""

CLINICAL = """patient_id\tage\tsex\tnotes
P1\t61\tF\tx
P2\t45.5\tM\t
P3\t\tF\tNA
P4\t70\tNA\t
P5\t 52 \tM\t
P6\t33\tF\t
P7\t80\tM\t
P8\t29\tF\t
"""

EVENTS = """patient_id\tgene\tchange
P1\tTP53\tR175H
P1\tTP53\tR248Q
P2\tPIK3CA\tH1047R
P3\tBRCA1\tX
P5\tTP53\tY220C
P6\tPIK3CA\tE545K
"""


def vcf_text(records: list[str] | None = None, samples: list[str] | None = None, header: str = VCF_HEADER) -> str:
    """A VCF with the standard header, ``samples`` and ``records``."""
    cols = "#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\tFORMAT\t" + "\t".join(samples or VCF_SAMPLES)
    return header + cols + "\n" + "".join(r + "\n" for r in (VCF_RECORDS if records is None else records))


def base_spec() -> dict:
    return {
        "cohort": {"name": "tiny", "id-column": "patient_id"},
        "label": {"file": "labels.csv", "column": "outcome", "classes": ["control", "case"], "positive": ["case"]},
        "split": {"seed": 3},
        "modalities": {
            "sequences": {"file": "seqs.fa", "length": 8},
            "variants": {"file": "variants.vcf", "missing": "allow"},
            "omics": {"file": "omics.csv"},
            "clinical": {"file": "clinical.tsv", "numeric": ["age"], "categorical": {"sex": ["F", "M"]}},
            "events": {"file": "events.tsv", "feature-column": "gene"},
        },
    }


class Site:
    """A folder with a valid tiny cohort; tests overwrite single files or spec keys to break it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.spec_data = base_spec()
        for name, text in (("labels.csv", LABELS), ("seqs.fa", FASTA), ("variants.vcf", vcf_text()),
                           ("omics.csv", OMICS), ("clinical.tsv", CLINICAL), ("events.tsv", EVENTS)):
            self.write(name, text)

    def path(self, name: str) -> str:
        return str((self.root / name).resolve())

    def write(self, name: str, text: str | bytes) -> str:
        target = self.root / name
        if isinstance(text, bytes):
            target.write_bytes(text)
        else:
            target.write_text(text)
        return self.path(name)

    def modality(self, name: str, **changes) -> None:
        self.spec_data["modalities"][name].update(changes)

    def only(self, *names: str) -> None:
        """Keep only these modalities in the spec."""
        self.spec_data["modalities"] = {k: v for k, v in self.spec_data["modalities"].items() if k in names}

    def spec(self) -> CohortSpec:
        path = self.root / "spec.toml"
        path.write_text(tomli_w.dumps(self.spec_data))
        return load_spec(path)

    def fail(self) -> CohortImportError:
        with pytest.raises(CohortImportError) as info:
            import_cohort(self.spec())
        return info.value


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site(tmp_path)


def find(err: CohortImportError, text: str) -> list[Problem]:
    return [p for p in err.problems if text in p.message]


def one(err: CohortImportError, text: str) -> Problem:
    hits = find(err, text)
    assert len(hits) == 1, f"expected one problem with {text!r}, got:\n{err}"
    return hits[0]


# ---------------------------------------------------------------------------------------------
# A valid cohort


def test_valid_cohort_values(site: Site) -> None:
    cohort = import_cohort(site.spec())
    assert cohort.patient_ids.tolist() == PATIENTS
    assert cohort.classes == ("control", "case")
    assert cohort.labels.tolist() == [1 if OUTCOME[p] == "case" else 0 for p in PATIENTS]
    assert cohort.modalities == ("sequences", "variants", "omics", "clinical", "events")

    # sequences: wrapped lines joined, lowercase read, ambiguity codes -> N (code 4)
    assert cohort.sequences.dtype == np.uint8 and cohort.sequences.shape == (8, 8)
    assert cohort.sequences[1].tolist() == [0, 1, 2, 3, 0, 1, 2, 0]
    assert cohort.sequences[2].tolist() == [0, 1, 2, 3, 4, 1, 2, 3]
    assert cohort.sequences[3].tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    assert cohort.sequences[6].tolist() == [0, 1, 2, 3, 4, 4, 4, 3]
    seq_report = cohort.report["sequences"]
    assert seq_report["ambiguity_codes"] == {"N": 2, "R": 1, "Y": 1}
    assert seq_report["sequences_with_ambiguity"] == 2

    # variants: reordered from the VCF's sample order to the label file's
    assert cohort.variants.features == tuple(DOSAGES)
    assert cohort.variants.values.dtype == np.int8
    for j, site_name in enumerate(DOSAGES):
        assert cohort.variants.values[:, j].tolist() == DOSAGES[site_name]
    assert cohort.report["variants"]["missing_genotypes"] == 1

    # omics: columns minus id, rows by id
    assert cohort.omics.features == ("TP53", "ESR1")
    assert cohort.omics.values[:, 0].tolist() == [1.5, 0, 3, 4, 5, 6, 7, 8]
    assert cohort.omics.values[:, 1].tolist() == [-2, 1000, 3, 4, 5, 6, 7, -0.8]

    # clinical: a missing numeric cell is NaN, a missing category is -1
    clin = cohort.clinical
    assert clin.numeric_names == ("age",) and clin.categorical_names == ("sex",)
    ages = clin.numeric[:, 0]
    assert np.isnan(ages[2]) and np.delete(ages, 2).tolist() == [61, 45.5, 70, 52, 33, 80, 29]
    assert clin.categorical[:, 0].tolist() == [0, 1, 0, -1, 1, 0, 1, 0]
    assert clin.categories == {"sex": ("F", "M")}

    # events: sorted vocabulary; no rows at all means not profiled (NaN)
    ev = cohort.events
    assert ev.features == ("BRCA1", "PIK3CA", "TP53")
    expected = {"P1": [0, 0, 1], "P2": [0, 1, 0], "P3": [1, 0, 0], "P5": [0, 0, 1], "P6": [0, 1, 0]}
    for i, p in enumerate(PATIENTS):
        if p in expected:
            assert ev.values[i].tolist() == expected[p]
        else:
            assert np.isnan(ev.values[i]).all()
    assert cohort.report["events"]["patients_not_profiled"] == 3


def test_valid_cohort_schema_and_splits(site: Site) -> None:
    spec = site.spec()
    first, second = import_cohort(spec), import_cohort(spec)
    schema = first.schema
    assert schema["variants"]["sites"] == list(DOSAGES)
    assert schema["omics"]["features"] == ["TP53", "ESR1"]
    assert schema["events"]["features"] == ["BRCA1", "PIK3CA", "TP53"]
    assert first.schema_hash == second.schema_hash
    assert np.array_equal(first.split, second.split)
    assert first.split.dtype == np.int8 and set(first.split.tolist()) == {0, 1, 2}
    # A spec that lists the resolved features explicitly has the same hash.
    site.modality("variants", sites=list(DOSAGES))
    site.modality("omics", features=["TP53", "ESR1"])
    site.modality("events", features=["BRCA1", "PIK3CA", "TP53"])
    assert import_cohort(site.spec()).schema_hash == first.schema_hash


def test_cohort_survives_blobs(site: Site) -> None:
    cohort = import_cohort(site.spec())
    back = cohort_from_blobs(cohort_to_blobs(cohort))
    assert back.schema_hash == cohort.schema_hash
    assert back.report == cohort.report
    assert np.array_equal(back.variants.values, cohort.variants.values)


def test_gzipped_vcf_reads_like_plain(site: Site) -> None:
    plain = import_cohort(site.spec())
    site.write("variants.vcf.gz", gzip.compress(vcf_text().encode()))
    site.modality("variants", file="variants.vcf.gz")
    gz = import_cohort(site.spec())
    assert np.array_equal(plain.variants.values, gz.variants.values)


def test_spec_written_back_imports_the_same(site: Site) -> None:
    spec = site.spec()
    copy = write_spec(spec, site.root / "copy" / "spec.toml")
    assert import_cohort(load_spec(copy)).schema_hash == import_cohort(spec).schema_hash


def test_show_progress_runs(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GENOFED_NO_PROGRESS", "1")
    assert import_cohort(site.spec(), show_progress=True).n == 8


def test_group_split_reads_the_label_file(site: Site) -> None:
    site.spec_data["split"] = {"policy": "group", "group-column": "family", "seed": 1}
    cohort = import_cohort(site.spec())
    assert cohort.groups.tolist() == [f"f{i // 2}" for i in range(8)]
    for g in set(cohort.groups.tolist()):
        assert len(set(cohort.split[cohort.groups == g].tolist())) == 1


def test_events_absent_zero_and_profiled(site: Site) -> None:
    site.write("profiled.csv", "patient_id\nP4\n")
    site.modality("events", profiled="profiled.csv")
    cohort = import_cohort(site.spec())
    assert cohort.events.values[3].tolist() == [0, 0, 0]  # P4: profiled, no event
    assert np.isnan(cohort.events.values[6]).all()  # P7: not profiled
    site.modality("events", absent="zero")
    assert not np.isnan(import_cohort(site.spec()).events.values).any()


def test_sequences_from_a_column(site: Site) -> None:
    rows = "".join(f"{p},{'ACGTACGT'}\n" for p in PATIENTS)
    site.write("seqs.csv", "patient_id,dna\n" + rows)
    site.modality("sequences", file="seqs.csv", format="csv", column="dna")
    assert import_cohort(site.spec()).sequences[0].tolist() == [0, 1, 2, 3, 0, 1, 2, 3]


def test_multiallelic_split_gives_one_dosage_per_allele(site: Site) -> None:
    records = VCF_RECORDS + ["2\t80\t.\tC\tT,G\t.\tPASS\t.\tGT\t1/2\t2/2\t0/1\t0/0\t2|0\t1/1\t0/0\t0/0"]
    site.write("variants.vcf", vcf_text(records))
    site.modality("variants", multiallelic="split")
    cohort = import_cohort(site.spec())
    feats = cohort.variants.features
    assert feats[-2:] == ("2:80:C:T", "2:80:C:G")
    by_patient_t = cohort.variants.values[:, -2].tolist()
    by_patient_g = cohort.variants.values[:, -1].tolist()
    # samples P8..P1: 1/2 2/2 0/1 0/0 2|0 1/1 0/0 0/0 -> per patient P1..P8
    assert by_patient_t == [0, 0, 2, 0, 0, 1, 0, 1]
    assert by_patient_g == [0, 0, 0, 1, 0, 0, 2, 1]
    assert cohort.report["variants"]["multiallelic_sites_split"] == 1


# ---------------------------------------------------------------------------------------------
# Problem and error formatting


def test_problem_and_error_text() -> None:
    p = Problem("/abs/clinical.csv", "line 7", "column 'age'", "value 'abc' is not a number")
    assert str(p) == "/abs/clinical.csv:line 7: column 'age': value 'abc' is not a number"
    assert str(Problem("/abs/x.fa", "", None, "the file is empty")) == "/abs/x.fa: the file is empty"
    err = CohortImportError([p, Problem("/abs/x.fa", "", None, "empty")])
    lines = str(err).splitlines()
    assert lines[0] == "import failed: 2 problems in /abs/clinical.csv, /abs/x.fa"
    assert lines[1:] == [str(p), "/abs/x.fa: empty"]


def test_problem_log_caps_and_counts() -> None:
    log = ProblemLog(per_kind=3, max_listed=50)
    for i in range(10):
        log.add("/f", f"line {i}", None, f"bad {i}", kind="bad")
    log.add("/f", "line 99", None, "other", kind="other")
    err = log.error()
    assert err.total == 11 and len(err.problems) == 4
    assert str(err).splitlines()[-1] == "/f: ... and 7 more problems like this: bad"


def test_many_problems_are_capped_with_a_count(site: Site) -> None:
    rows = "".join(f"{p},abc,abc\n" for p in PATIENTS)
    site.write("omics.csv", "patient_id,TP53,ESR1\n" + rows)
    err = site.fail()
    assert err.total == 16
    assert len(find(err, "is not a number")) == 5
    assert "... and 11 more problems like this: not a number" in str(err)


def test_three_different_problems_in_one_file_are_all_reported(site: Site) -> None:
    site.write("clinical.tsv", CLINICAL.replace("P1\t61\tF", "P1\tabc\tF").replace("P2\t45.5\tM", "P2\t45.5\tX")
               .replace("P6\t33", "P6\tinf"))
    err = site.fail()
    clinical = site.path("clinical.tsv")
    assert err.files == [clinical] and err.total == 3 and len(err.problems) == 3
    assert str(err).splitlines() == [
        f"import failed: 3 problems in {clinical}",
        f"{clinical}:line 2: column 'age': value 'abc' is not a number",
        f"{clinical}:line 3: column 'sex': value 'X' is not one of the categories 'F', 'M' (categorical.sex in "
        "[modalities.clinical]): fix the cell, or add the category to the spec (every site must agree on it)",
        f"{clinical}:line 7: column 'age': value 'inf' is not a finite number: write an empty cell for a missing value",
    ]


def test_problems_in_several_files_are_reported_together(site: Site) -> None:
    site.write("omics.csv", OMICS.replace("P3,3,3", "P3,x,3"))
    site.write("seqs.fa", FASTA.replace("TTTTAAAA", "TTTT"))
    site.write("events.tsv", EVENTS + "P9\tTP53\tX\n")
    err = site.fail()
    assert set(err.files) == {site.path("omics.csv"), site.path("seqs.fa"), site.path("events.tsv")}
    assert err.total == 3


# ---------------------------------------------------------------------------------------------
# Patients and ids


def test_unknown_patient_in_a_table(site: Site) -> None:
    site.write("omics.csv", OMICS + "P9,1,1\n")
    p = one(site.fail(), "'P9' is not in the label file")
    assert (p.file, p.location, p.field) == (site.path("omics.csv"), "line 10", "column 'patient_id'")
    assert site.path("labels.csv") in p.message


def test_duplicate_id_in_a_table(site: Site) -> None:
    site.write("clinical.tsv", CLINICAL + "P2\t50\tM\t\n")
    p = one(site.fail(), "appears again")
    assert (p.location, p.field) == ("line 10", "column 'patient_id'")
    assert "first at line 3" in p.message


def test_duplicate_id_in_the_label_file(site: Site) -> None:
    site.only("omics")
    site.write("labels.csv", LABELS + "P1,case,f9\n")
    p = one(site.fail(), "appears again")
    assert (p.file, p.location) == (site.path("labels.csv"), "line 10")


def test_duplicate_fasta_record(site: Site) -> None:
    site.write("seqs.fa", FASTA + ">P3 again\nACGTACGT\n")
    p = one(site.fail(), "appears again")
    assert p.file == site.path("seqs.fa") and p.location == "line 19"  # line 14 is blank


def test_duplicate_vcf_sample(site: Site) -> None:
    site.write("variants.vcf", vcf_text(samples=VCF_SAMPLES[:-1] + ["P8"]))
    p = one(site.fail(), "appears twice")
    assert p.file == site.path("variants.vcf") and p.field == "sample 'P8'"


@pytest.mark.parametrize("modality, name, text", [
    ("omics", "omics.csv", OMICS.replace("P5,5,5\n", "")),
    ("clinical", "clinical.tsv", CLINICAL.replace("P5\t 52 \tM\t\n", "")),
    ("sequences", "seqs.fa", FASTA.replace(">P5\nTTTTAAAA\n", "")),
])
def test_patient_missing_from_a_modality(site: Site, modality: str, name: str, text: str) -> None:
    site.write(name, text)
    p = one(site.fail(), "for this patient of the label file")
    assert (p.file, p.location) == (site.path(name), "patient P5")


def test_vcf_samples_that_do_not_match_the_patients(site: Site) -> None:
    site.write("variants.vcf", vcf_text(samples=["X1", "X2"] + VCF_SAMPLES[2:]))
    p = one(site.fail(), "samples not in the label file")
    assert p.location == "header"
    assert p.message.startswith("2 samples not in the label file (e.g. 'X1', 'X2'), 2 patients missing from the VCF "
                                "(e.g. 'P7', 'P8')")


def test_missing_label_and_unknown_class(site: Site) -> None:
    site.only("omics")
    site.write("labels.csv", LABELS.replace("P2,control", "P2,").replace("P3,case", "P3,Case"))
    err = site.fail()
    missing = one(err, "missing value")
    assert (missing.location, missing.field) == ("line 3", "column 'outcome'")
    assert "every patient needs a label" in missing.message
    unknown = one(err, "is not one of the categories")
    assert unknown.location == "line 4" and "'Case'" in unknown.message and "did you mean 'case'" in unknown.message


def test_empty_id_in_the_label_file(site: Site) -> None:
    site.only("omics")
    site.write("labels.csv", LABELS + ",case,f9\n")
    assert one(site.fail(), "empty patient id").location == "line 10"


# ---------------------------------------------------------------------------------------------
# Cell values


@pytest.mark.parametrize("token", ["nan", "NaN", "inf", "-inf", "Infinity", "1e999"])
def test_nan_and_inf_written_as_values(site: Site, token: str) -> None:
    site.write("omics.csv", OMICS.replace("P3,3,3", f"P3,{token},3"))
    p = one(site.fail(), "is not a finite number")
    assert (p.location, p.field) == ("line 5", "column 'TP53'")
    assert "write an empty cell for a missing value" in p.message


@pytest.mark.parametrize("token", ["1e400", "-1E+400", "1.8e308", "inf", "-Infinity", "nan", "+nan"])
def test_a_clinical_value_that_overflows_or_is_not_finite_is_refused(site: Site, token: str) -> None:
    """float('1e400') is inf: refused like a literal inf, with its line and column, and no vault."""
    site.write("clinical.tsv", CLINICAL.replace("P6\t33\t", f"P6\t{token}\t"))
    p = one(site.fail(), "is not a finite number")
    assert str(p) == (f"{site.path('clinical.tsv')}:line 7: column 'age': value {token!r} is not a finite number: "
                      "write an empty cell for a missing value")


def test_missing_tokens_stay_missing_next_to_refused_non_finite_values(site: Site) -> None:
    site.modality("omics", **{"allow-missing": True})
    site.write("omics.csv", OMICS.replace("P3,3,3", "P3,,NA").replace("P4,4,4", "P4,1e-400,4"))
    cohort = import_cohort(site.spec())
    assert np.isnan(cohort.omics.values[2]).all() and cohort.omics.values[3].tolist() == [0.0, 4.0]
    site.write("omics.csv", OMICS.replace("P3,3,3", "P3,,NA").replace("P4,4,4", "P4,1e400,4"))
    err = site.fail()
    assert err.total == 1 and one(err, "'1e400' is not a finite number").location == "line 6"


def test_non_numeric_cell(site: Site) -> None:
    site.write("omics.csv", OMICS.replace("P4,4,4", "P4,4,4,5").replace("P3,3,3", "P3,3,3,5"))
    err = site.fail()  # a ragged file: more fields than the header
    assert one(err, "fields but the header line has 3").location == "line 5"
    site.write("omics.csv", OMICS.replace("P3,3,3", "P3,3,1,5"))
    p = one(site.fail(), "fields")
    assert p.location == "line 5"
    site.write("omics.csv", OMICS.replace("P3,3,3", 'P3,3,"1,5"'))
    p = one(site.fail(), "is not a number")
    assert str(p) == f"{site.path('omics.csv')}:line 5: column 'ESR1': value '1,5' is not a number " \
                     "(use '.' as the decimal mark)"


def test_missing_value_where_not_allowed(site: Site) -> None:
    site.write("omics.csv", OMICS.replace("P3,3,3", "P3,,3").replace("P4,4,4", "P4,NA,4"))
    err = site.fail()
    problems = find(err, "missing value")
    assert [(p.location, p.field) for p in problems] == [("line 5", "column 'TP53'"), ("line 6", "column 'TP53'")]
    assert "allow-missing = true in [modalities.omics]" in problems[0].message
    site.modality("omics", **{"allow-missing": True})
    assert np.isnan(import_cohort(site.spec()).omics.values[2:4, 0]).all()


def test_clinical_missing_not_allowed(site: Site) -> None:
    site.modality("clinical", **{"allow-missing": False})
    err = site.fail()
    assert [(p.location, p.field) for p in find(err, "missing value")] == [
        ("line 4", "column 'age'"), ("line 5", "column 'sex'")]


RANGE_HINT = "fix the value, or widen the range in the spec (a public bound every site must agree on)"


def test_values_inside_declared_ranges_import(site: Site) -> None:
    plain = import_cohort(site.spec())
    # Bounds are inclusive: the omics matrix spans exactly [-2, 1000]; P3's missing age is allowed.
    site.modality("clinical", ranges={"age": [29, 80]})
    site.modality("omics", range=[-2, 1000])
    cohort = import_cohort(site.spec())
    assert np.array_equal(cohort.omics.values, plain.omics.values)
    assert np.array_equal(cohort.clinical.numeric, plain.clinical.numeric, equal_nan=True)
    assert cohort.schema["clinical"]["ranges"] == {"age": [29.0, 80.0]}
    assert cohort.schema["omics"]["range"] == [-2.0, 1000.0]
    assert cohort.schema_hash != plain.schema_hash


def test_clinical_value_outside_its_declared_range(site: Site) -> None:
    site.modality("clinical", ranges={"age": [30, 75]})
    err = site.fail()
    clinical = site.path("clinical.tsv")
    assert err.files == [clinical] and err.total == 2
    assert [str(p) for p in find(err, "outside the declared range")] == [
        (f"{clinical}:line 8: column 'age': value '80' is outside the declared range [30, 75] "
         f"(ranges.age in [modalities.clinical]): {RANGE_HINT}"),
        (f"{clinical}:line 9: column 'age': value '29' is outside the declared range [30, 75] "
         f"(ranges.age in [modalities.clinical]): {RANGE_HINT}"),
    ]


def test_omics_value_outside_the_declared_range(site: Site) -> None:
    site.modality("omics", range=[-1.5, 7.5])
    err = site.fail()
    omics = site.path("omics.csv")
    problems = find(err, "outside the declared range [-1.5, 7.5] (range in [modalities.omics])")
    assert [(p.file, p.location, p.field) for p in problems] == [
        (omics, "line 2", "column 'TP53'"), (omics, "line 3", "column 'ESR1'"), (omics, "line 4", "column 'ESR1'")]
    assert [p.message.split(" is outside")[0] for p in problems] == ["value '8'", "value '-2'", "value '1e3'"]
    assert all(p.message.endswith(RANGE_HINT) for p in problems)


def test_out_of_range_value_writes_no_vault(site: Site) -> None:
    import argparse

    from client.vault import generate_key_file
    from client.vault_cli import register

    site.modality("clinical", ranges={"age": [0, 75]})
    generate_key_file(site.root / "key")
    parser = argparse.ArgumentParser(prog="genofed")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["vault", "import", "--spec", str(site.root / "spec.toml"),
                              "--out", str(site.root / "vault"), "--key-file", str(site.root / "key")])
    site.spec()  # writes spec.toml
    with pytest.raises(CohortImportError) as info:
        args.func(args)
    assert "value '80' is outside the declared range [0, 75]" in str(info.value)
    assert not (site.root / "vault").exists()
    assert not [p for p in site.root.iterdir() if p.name.startswith(".")]  # no half-built vault either


def test_unknown_category(site: Site) -> None:
    site.write("clinical.tsv", CLINICAL.replace("P6\t33\tF", "P6\t33\tfemale"))
    p = one(site.fail(), "is not one of the categories 'F', 'M'")
    assert (p.location, p.field) == ("line 7", "column 'sex'")
    assert "categorical.sex" in p.message


# ---------------------------------------------------------------------------------------------
# Files and columns


@pytest.mark.parametrize("name", ["omics.csv", "clinical.tsv", "events.tsv", "labels.csv", "seqs.fa", "variants.vcf"])
def test_empty_file(site: Site, name: str) -> None:
    site.write(name, "")
    err = site.fail()
    assert err.total == 1, str(err)  # an unusable file is not also missing every patient
    assert "the file is empty" in err.problems[0].message and err.problems[0].file == site.path(name)


@pytest.mark.parametrize("name, header", [("omics.csv", "patient_id,TP53,ESR1\n"),
                                          ("events.tsv", "patient_id\tgene\tchange\n"),
                                          ("variants.vcf", vcf_text(records=[]))])
def test_header_only_file(site: Site, name: str, header: str) -> None:
    site.write(name, header)
    p = one(site.fail(), "no data rows" if name != "variants.vcf" else "no variant records")
    assert p.file == site.path(name)


def test_blank_first_line(site: Site) -> None:
    site.write("omics.csv", "\n" + OMICS)
    assert one(site.fail(), "the first line is blank").location == "line 1"


def test_missing_file(site: Site) -> None:
    (site.root / "omics.csv").unlink()
    p = one(site.fail(), "file not found")
    assert p.file == site.path("omics.csv")


def test_missing_column_named_by_the_spec(site: Site) -> None:
    site.modality("clinical", numeric=["Age"])
    p = one(site.fail(), "no such column")
    assert (p.file, p.location, p.field) == (site.path("clinical.tsv"), "line 1", "column 'Age'")
    assert "[modalities.clinical] numeric" in p.message and "did you mean 'age'" in p.message


def test_wrong_separator_is_explained(site: Site) -> None:
    site.write("clinical.csv", CLINICAL)
    site.modality("clinical", file="clinical.csv")
    p = find(site.fail(), "no such column")[0]
    assert "looks tab-separated" in p.message


def test_omics_header_problems(site: Site) -> None:
    site.write("omics.csv", OMICS.replace("patient_id,TP53,ESR1", "patient_id,TP53,TP53"))
    p = one(site.fail(), "names this column again")
    assert (p.location, p.field) == ("line 1", "column 'TP53'")
    site.write("omics.csv", OMICS.replace("patient_id,TP53,ESR1", "patient_id,TP53,"))
    assert one(site.fail(), "has no name").field == "column 3"


def test_trailing_separators_are_not_features(site: Site) -> None:
    site.write("omics.csv", "\n".join(line + "," for line in OMICS.splitlines()) + "\n")
    assert import_cohort(site.spec()).omics.features == ("TP53", "ESR1")


def test_duplicate_column_named_by_the_spec(site: Site) -> None:
    site.write("clinical.tsv", CLINICAL.replace("patient_id\tage\tsex\tnotes", "patient_id\tage\tsex\tage"))
    p = one(site.fail(), "names this column 2 times")
    assert (p.location, p.field) == ("line 1", "column 'age'")


def test_blank_lines_keep_line_numbers(site: Site) -> None:
    site.write("omics.csv", OMICS.replace("P3,3,3\n", "\n\nP3,x,3\n"))
    assert one(site.fail(), "is not a number").location == "line 7"


def test_quoted_line_breaks_keep_line_numbers(site: Site) -> None:
    site.write("clinical.tsv", CLINICAL.replace("P2\t45.5\tM\t", 'P2\t45.5\tM\t"two\nlines"')
               .replace("P6\t33", "P6\tabc"))
    assert one(site.fail(), "is not a number").location == "line 8"
    site.write("clinical.tsv.gz", gzip.compress(CLINICAL.replace("P2\t45.5\tM\t", 'P2\t45.5\tM\t"two\nlines"')
                                                .replace("P6\t33", "P6\tabc").encode()))
    site.modality("clinical", file="clinical.tsv.gz")
    assert one(site.fail(), "is not a number").location == "line 8"


def test_not_utf8(site: Site) -> None:
    site.write("omics.csv", OMICS.encode().replace(b"P8", b"P\xff8"))
    assert "not UTF-8" in one(site.fail(), "UTF-8").message


def test_truncated_gzip_table(site: Site) -> None:
    site.write("omics.csv.gz", gzip.compress(OMICS.encode())[:-12])
    site.modality("omics", file="omics.csv.gz")
    assert one(site.fail(), "truncated or corrupt").file == site.path("omics.csv.gz")


# ---------------------------------------------------------------------------------------------
# Sequences


def test_wrong_sequence_length(site: Site) -> None:
    site.write("seqs.fa", FASTA.replace("TTTTAAAA", "TTTTAAAAC"))
    p = one(site.fail(), "sequence length 9, expected 8")
    assert (p.location, p.field) == ("line 10", "record 'P5'")


def test_a_huge_sequence_length_in_the_spec_is_a_problem_not_an_allocation(site: Site) -> None:
    """length = 10**12 once allocated patients x length bytes before any record was checked
    (numpy's MemoryError, a traceback); now each record is the wrong length."""
    site.modality("sequences", length=10**12)
    err = site.fail()
    assert err.total == 8
    assert str(err.problems[0]).endswith("record 'P1': sequence length 8, expected 1000000000000 (length in "
                                         "[modalities.sequences]): every sequence must have exactly that length")


def test_unknown_symbol_reports_its_line_and_position(site: Site) -> None:
    site.write("seqs.fa", FASTA.replace("ACGT\nACGA", "ACGT\nACXA"))
    p = one(site.fail(), "unknown symbol 'X' at position 7")
    assert (p.location, p.field) == ("line 5", "record 'P2'")
    assert "IUPAC" in p.message


def test_fasta_text_before_header_and_empty_record(site: Site) -> None:
    site.write("seqs.fa", "ACGT\n" + FASTA.replace("GGGGCCCC\n", ""))
    err = site.fail()
    assert one(err, "before the first '>' header").location == "line 1"
    p = one(err, "empty record")
    assert (p.location, p.field) == ("line 13", "record 'P6'")


def test_sequence_column_problems(site: Site) -> None:
    rows = "".join(f"{p},{'ACGTACGT'}\n" for p in PATIENTS[:-2]) + "P7,\nP8,ACGT-CGT\n"
    site.write("seqs.csv", "patient_id,dna\n" + rows)
    site.modality("sequences", file="seqs.csv", format="csv", column="dna")
    err = site.fail()
    assert (one(err, "empty cell").location, one(err, "empty cell").field) == ("line 8", "column 'dna'")
    assert one(err, "unknown symbol '-' at position 5").location == "line 9"


# ---------------------------------------------------------------------------------------------
# Variants


def test_multiallelic_site_refused_by_default(site: Site) -> None:
    site.write("variants.vcf", vcf_text(VCF_RECORDS + ["2\t80\t.\tC\tT,G\t.\t.\t.\tGT" + "\t0/1" * 8]))
    p = one(site.fail(), "2 alternate alleles (T,G)")
    assert p.location == "record 2:80"
    assert "bcftools norm -m -any" in p.message and 'multiallelic = "split"' in p.message


def test_missing_genotype_refused_when_missing_is_error(site: Site) -> None:
    site.modality("variants", missing="error")
    p = one(site.fail(), "missing genotype")
    assert str(p) == (f"{site.path('variants.vcf')}:record 1:100: sample 'P4': missing genotype './.' "
                      '(set missing = "allow" in [modalities.variants] to keep it)')


def test_genotype_naming_an_allele_beyond_alt_is_refused(site: Site) -> None:
    records = [VCF_RECORDS[0], VCF_RECORDS[1], VCF_RECORDS[2].replace("\t0/1", "\t0/2", 1)]
    assert records[2] != VCF_RECORDS[2]
    site.write("variants.vcf", vcf_text(records))
    p = one(site.fail(), "names allele 2")
    assert str(p) == (f"{site.path('variants.vcf')}:record 2:50: sample 'P3': genotype '0/2' names allele 2, but the "
                      "record has 1 alternate allele (REF G, ALT A): fix the genotype or the record's ALT")


@pytest.mark.parametrize("allele", [40000, 65535, 65536, 65537, 131073])
def test_an_allele_index_past_int16_is_not_wrapped(site: Site, allele: int) -> None:
    """cyvcf2's Genotypes.array() casts allele indices to int16: 0/65537 read as 0/1, 0/65536 as 0/0,
    0/65535 as 0/. and 0/40000 as no copy at all. Each was imported without a word."""
    site.write("variants.vcf", vcf_text([*VCF_RECORDS[:2], VCF_RECORDS[2].replace("\t0/1", f"\t0/{allele}", 1)]))
    p = one(site.fail(), f"names allele {allele},")
    assert (p.location, p.field) == ("record 2:50", "sample 'P3'") and f"genotype '0/{allele}'" in p.message


@pytest.mark.parametrize("call", ["1/1/1", "0|1|1", "0/1/."])
def test_a_genotype_with_more_than_two_alleles_is_refused(site: Site, call: str) -> None:
    """A dosage is 0, 1 or 2 (the public range clipping relies on): a triploid call read as 3."""
    site.write("variants.vcf", vcf_text([*VCF_RECORDS[:2], VCF_RECORDS[2].replace("\t0/1", f"\t{call}", 1)]))
    p = one(site.fail(), "has 3 alleles")
    assert str(p) == (f"{site.path('variants.vcf')}:record 2:50: sample 'P3': genotype {call!r} has 3 alleles: "
                      "genofed reads haploid and diploid calls only (a dosage is 0, 1 or 2); fix the genotype")


def test_haploid_and_mixed_ploidy_calls_import(site: Site) -> None:
    records = [VCF_RECORDS[0], VCF_RECORDS[1].replace("\t0/0\t0/0\t0/0\t0/0\t0/0\t0/0\t0/0\t1/1",
                                                      "\t0\t1\t.\t0/0\t0|1\t1|0\t.|1\t1/1")]
    site.write("variants.vcf", vcf_text(records))
    # VCF samples are P8..P1, so the record's calls read backwards for P1..P8
    assert import_cohort(site.spec()).variants.values[:, 1].tolist() == [2, -1, 1, 1, 0, -1, 1, 0]


def test_partly_missing_genotype_is_missing(site: Site) -> None:
    records = [VCF_RECORDS[0].replace("./.", "0/."), *VCF_RECORDS[1:]]
    site.write("variants.vcf", vcf_text(records))
    assert import_cohort(site.spec()).variants.values[3, 0] == -1
    site.modality("variants", missing="error")
    assert "missing genotype '0/.'" in one(site.fail(), "missing genotype").message


def test_vcf_without_gt(site: Site) -> None:
    header = VCF_HEADER.replace('ID=GT,Number=1,Type=String,Description="Genotype"',
                                'ID=DP,Number=1,Type=Integer,Description="Depth"')
    records = ["\t".join(r.split("\t")[:8] + ["DP"] + ["7"] * 8) for r in VCF_RECORDS]
    site.write("variants.vcf", vcf_text(records, header=header))
    err = site.fail()
    assert len(find(err, "no GT (genotype) field")) == 3


def test_unsorted_vcf(site: Site) -> None:
    site.write("variants.vcf", vcf_text([VCF_RECORDS[1], VCF_RECORDS[0], VCF_RECORDS[2]]))
    p = one(site.fail(), "sorted by position")
    assert p.location == "record 1:100" and "bcftools sort" in p.message


def test_chromosome_that_comes_back(site: Site) -> None:
    site.write("variants.vcf", vcf_text([VCF_RECORDS[0], VCF_RECORDS[2], VCF_RECORDS[1]]))
    assert one(site.fail(), "appears again after").location == "record 1:250"


def test_duplicate_site(site: Site) -> None:
    site.write("variants.vcf", vcf_text(VCF_RECORDS + [VCF_RECORDS[2]]))
    assert one(site.fail(), "appears twice").location == "record 2:50"


def test_site_without_alt(site: Site) -> None:
    site.write("variants.vcf", vcf_text(VCF_RECORDS + ["2\t90\t.\tG\t.\t.\t.\t.\tGT" + "\t0/0" * 8]))
    assert one(site.fail(), "no alternate allele").location == "record 2:90"


def test_panel_site_missing_from_vcf_and_vcf_site_not_in_panel(site: Site) -> None:
    site.modality("variants", sites=["1:100:A:G", "1:250:C:T", "3:5:T:C"])
    err = site.fail()
    assert "3:5:T:C of the agreed panel" in one(err, "is not in this VCF").message
    extra = one(err, "is not in the agreed panel")
    assert extra.location == "record 2:50"


def test_panel_order_is_the_spec_order(site: Site) -> None:
    panel = ["2:50:G:A", "1:100:A:G", "1:250:C:T"]
    site.modality("variants", sites=panel)
    cohort = import_cohort(site.spec())
    assert cohort.variants.features == tuple(panel)
    assert cohort.variants.values[:, 0].tolist() == DOSAGES["2:50:G:A"]


def test_panel_chr_naming_hint(site: Site) -> None:
    site.modality("variants", sites=["chr1:100:A:G", "chr1:250:C:T", "chr2:50:G:A"])
    assert "bcftools annotate --rename-chrs" in find(site.fail(), "is not in this VCF")[0].message


def test_truncated_gzip_vcf(site: Site) -> None:
    many = [f"1\t{100 + i}\t.\tA\tG\t.\t.\t.\tGT" + "\t0/1" * 8 for i in range(3000)]
    blob = gzip.compress(vcf_text(many).encode())
    site.write("variants.vcf.gz", blob[: len(blob) // 2])
    site.modality("variants", file="variants.vcf.gz")
    p = one(site.fail(), "truncated or corrupt")
    assert p.file == site.path("variants.vcf.gz") and p.location.startswith("after record 1:")


def test_bgzf_without_eof_marker(site: Site) -> None:
    # A BGZF-looking block (BC extra field) without the end-of-file block at the end.
    data = vcf_text().encode()
    comp = zlib.compressobj(6, zlib.DEFLATED, -15)
    body = comp.compress(data) + comp.flush()
    bsize = len(body) + 25
    block = (b"\x1f\x8b\x08\x04\x00\x00\x00\x00\x00\xff\x06\x00BC\x02\x00" + bsize.to_bytes(2, "little") + body
             + zlib.crc32(data).to_bytes(4, "little") + len(data).to_bytes(4, "little"))
    site.write("variants.vcf.gz", block + BGZF_EOF)
    site.modality("variants", file="variants.vcf.gz")
    assert import_cohort(site.spec()).variants.values.shape == (8, 3)
    site.write("variants.vcf.gz", block)
    assert one(site.fail(), "end-of-file marker is missing").file == site.path("variants.vcf.gz")


def test_malformed_vcf_record(site: Site) -> None:
    site.write("variants.vcf", vcf_text(VCF_RECORDS[:2] + ["2\tx\t.\tG\tA\t.\t.\t.\tGT" + "\t0/0" * 8]))
    p = one(site.fail(), "cannot parse this record")
    assert p.location == "line 8"


def test_not_a_vcf(site: Site) -> None:
    site.write("variants.vcf", "hello\nworld\n")
    assert one(site.fail(), "not a VCF file").location == "line 1"


def test_vcf_without_samples(site: Site) -> None:
    site.write("variants.vcf", VCF_HEADER + "#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\n1\t100\t.\tA\tG\t.\t.\t.\n")
    assert one(site.fail(), "no samples").location == "header"


# ---------------------------------------------------------------------------------------------
# Events and groups


def test_event_not_in_listed_vocabulary(site: Site) -> None:
    site.modality("events", features=["TP53", "PIK3CA"])
    p = one(site.fail(), "is not in the agreed list")
    assert (p.location, p.field) == ("line 5", "column 'gene'") and "'BRCA1'" in p.message


def test_event_rows_with_unknown_patient_and_empty_feature(site: Site) -> None:
    site.write("events.tsv", EVENTS + "P9\tTP53\tX\nP4\t\tX\n")
    err = site.fail()
    assert one(err, "'P9' is not in the label file").location == "line 8"
    assert one(err, "every row needs a feature name").location == "line 9"


def test_missing_group_value(site: Site) -> None:
    site.write("labels.csv", LABELS.replace("P3,case,f1", "P3,case,"))
    site.spec_data["split"] = {"policy": "group", "group-column": "family"}
    p = one(site.fail(), "missing group value")
    assert (p.file, p.location, p.field) == (site.path("labels.csv"), "line 4", "column 'family'")


def test_group_file(site: Site) -> None:
    site.write("groups.csv", "patient_id,centre\n" + "".join(f"{p},c{i % 3}\n" for i, p in enumerate(PATIENTS[:-1])))
    site.spec_data["split"] = {"policy": "group", "group-column": "centre", "group-file": "groups.csv"}
    p = one(site.fail(), "for this patient of the label file")
    assert (p.file, p.location) == (site.path("groups.csv"), "patient P8")


# ---------------------------------------------------------------------------------------------
# Real data


DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.mark.realdata
@pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data is absent")
def test_kg1000_vcf(tmp_path: Path) -> None:
    vcf = DATA / "kg1000_chr1" / "example.vcf.gz"
    with gzip.open(vcf, "rt") as fh:
        lines = [line for line in fh if not line.startswith("##")]
    samples = lines[0].rstrip("\n").split("\t")[9:]
    in_vcf = set(samples)
    panel = (DATA / "kg1000_chr1" / "integrated_call_samples_v3.20130502.ALL.panel").read_text().splitlines()
    rows = [line.split("\t") for line in panel[1:] if line.strip()]
    table = "sample\tsuper_pop\n" + "".join(f"{r[0]}\t{r[2]}\n" for r in rows if r[0] in in_vcf)
    (tmp_path / "labels.tsv").write_text(table)
    spec = {"cohort": {"id-column": "sample"},
            "label": {"file": "labels.tsv", "column": "super_pop", "classes": ["AFR", "AMR", "EAS", "EUR", "SAS"]},
            "modalities": {"variants": {"file": str(vcf)}}}
    (tmp_path / "spec.toml").write_text(tomli_w.dumps(spec))
    cohort = import_cohort(load_spec(tmp_path / "spec.toml"))
    assert cohort.variants.values.shape == (2504, 4296)
    # Independent dosages from the GT text: every call here is a phased biallelic 'a|b', so the
    # calls of a record are fixed-width 4-byte cells 'a|b\t'.
    expected = np.empty((len(lines) - 1, len(samples)), dtype=np.int8)
    for i, line in enumerate(lines[1:]):
        calls = line.rstrip("\n").split("\t", 9)[9] + "\t"
        cells = np.frombuffer(calls.encode("ascii"), dtype=np.uint8).reshape(len(samples), 4)
        assert (cells[:, 1] == ord("|")).all()
        expected[i] = (cells[:, 0] == ord("1")).astype(np.int8) + (cells[:, 2] == ord("1"))
    order = [samples.index(p) for p in cohort.patient_ids.tolist()]
    assert np.array_equal(cohort.variants.values, expected[:, order].T)
    assert int(cohort.variants.values.sum(dtype=np.int64)) == int(expected.sum(dtype=np.int64))
    assert cohort.summary()["classes"] == {"AFR": 661, "AMR": 347, "EAS": 504, "EUR": 503, "SAS": 489}


@pytest.mark.parametrize("line", ["\x00\x01", VCF_RECORDS[1].split("\t", 1)[1]], ids=["binary", "no CHROM column"])
def test_a_record_htslib_leaves_without_ref_is_a_malformed_record_not_a_crash(site: Site, line: str) -> None:
    """htslib parses such a line without an error and leaves no REF; cyvcf2 then crashes on reading it."""
    site.write("variants.vcf", vcf_text([VCF_RECORDS[0], line, VCF_RECORDS[2]]))
    p = one(site.fail(), "cannot parse this record")
    assert p.location == "line " + str(vcf_text([VCF_RECORDS[0]]).count("\n") + 1)


def test_a_record_with_bytes_that_are_not_text_is_a_malformed_record(site: Site) -> None:
    text = vcf_text(VCF_RECORDS).encode()
    site.write("variants.vcf", text.replace(b"\tC\tT\t", b"\tC\x80\tT\t"))  # not UTF-8: cyvcf2 cannot decode REF
    p = one(site.fail(), "cannot parse this record")
    assert p.location.startswith("line ")


def test_a_header_with_bytes_that_are_not_text_is_a_header_problem(site: Site) -> None:
    text = vcf_text(VCF_RECORDS).encode()
    site.write("variants.vcf", text.replace(b"\tP2", b"\tP\x802", 1))
    p = one(site.fail(), "the header is not UTF-8 text")
    assert p.location == "header" and "byte 0x80" in p.message
