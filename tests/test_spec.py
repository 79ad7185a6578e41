"""Cohort spec parsing, writing, schema hash and schema diff."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from common.spec import (
    SpecError,
    diff_schemas,
    load_spec,
    schema_hash,
    with_resolved_features,
    write_spec,
)

FULL_SPEC = """\
[cohort]
name = "demo"
id-column = "patient_id"

[label]
file = "clinical.csv"
column = "outcome"
classes = ["control", "case"]
positive = ["case"]

[split]
policy = "stratified"
seed = 3

[modalities.sequences]
file = "sequences.fa"
length = 120

[modalities.variants]
file = "variants.vcf.gz"
multiallelic = "split"

[modalities.omics]
file = "omics.csv"
features = ["g1", "g2"]

[modalities.clinical]
file = "clinical.csv"
numeric = ["age", "bmi"]
categorical = { sex = ["F", "M"], smoker = ["no", "yes"] }

[modalities.events]
file = "mutations.tsv"
feature-column = "gene"
absent = "zero"
"""


def _write(tmp_path: Path, text: str, name: str = "spec.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_full_spec_parses_with_paths_resolved(tmp_path: Path) -> None:
    spec = load_spec(_write(tmp_path, FULL_SPEC))
    assert spec.name == "demo"
    assert spec.modalities == ("sequences", "variants", "omics", "clinical", "events")
    assert spec.label.classes == ("control", "case") and spec.label.positive == ("case",)
    assert spec.sequences.file == (tmp_path / "sequences.fa").resolve()
    assert spec.sequences.length == 120 and spec.sequences.format == "fasta"
    assert spec.variants.multiallelic == "split" and spec.variants.missing == "error"
    assert spec.omics.features == ("g1", "g2")
    assert spec.clinical.categorical == {"sex": ("F", "M"), "smoker": ("no", "yes")}
    assert spec.events.absent == "zero" and spec.events.feature_column == "gene"
    assert (spec.split.train, spec.split.validation, spec.split.test, spec.split.seed) == (0.70, 0.15, 0.15, 3)
    assert spec.id_column_for(spec.clinical) == "patient_id"


def test_write_then_load_keeps_spec_and_hash(tmp_path: Path) -> None:
    spec = load_spec(_write(tmp_path, FULL_SPEC))
    out = write_spec(spec, tmp_path / "copy" / "spec.toml")
    again = load_spec(out)
    assert again.schema() == spec.schema()
    assert again.schema_hash() == spec.schema_hash()
    assert again.sequences.file == spec.sequences.file
    assert dataclasses.replace(again, source=None) == dataclasses.replace(spec, source=None)


def test_hash_ignores_local_settings_and_key_order(tmp_path: Path) -> None:
    base = load_spec(_write(tmp_path, FULL_SPEC))
    local = FULL_SPEC.replace('file = "omics.csv"', 'file = "elsewhere/expr.tsv"\nid-column = "sample"')
    local = local.replace("seed = 3", "seed = 99").replace('id-column = "patient_id"', 'id-column = "pid"')
    other = load_spec(_write(tmp_path, local, "other.toml"))
    assert other.schema_hash() == base.schema_hash()
    reordered = load_spec(_write(tmp_path, FULL_SPEC.replace(
        "categorical = { sex = [\"F\", \"M\"], smoker = [\"no\", \"yes\"] }",
        "categorical = { smoker = [\"no\", \"yes\"], sex = [\"F\", \"M\"] }"), "reordered.toml"))
    assert reordered.schema_hash() == base.schema_hash()


@pytest.mark.parametrize("change", [
    ('classes = ["control", "case"]', 'classes = ["control", "case", "other"]'),
    ("length = 120", "length = 121"),
    ('features = ["g1", "g2"]', 'features = ["g2", "g1"]'),
    ('sex = ["F", "M"]', 'sex = ["F", "M", "X"]'),
    ('absent = "zero"', 'absent = "missing"'),
])
def test_hash_changes_with_what_sites_must_share(tmp_path: Path, change: tuple[str, str]) -> None:
    base = load_spec(_write(tmp_path, FULL_SPEC))
    other = load_spec(_write(tmp_path, FULL_SPEC.replace(*change), "other.toml"))
    assert other.schema_hash() != base.schema_hash()
    assert diff_schemas(base.schema(), other.schema())


def test_diff_is_readable_and_summarises_long_lists(tmp_path: Path) -> None:
    spec = load_spec(_write(tmp_path, FULL_SPEC))
    a = with_resolved_features(spec, variants=[f"1:{i}:A:G" for i in range(1000)])
    b = with_resolved_features(spec, variants=[f"1:{i}:A:G" for i in range(1, 1001)])
    b = dataclasses.replace(b, sequences=dataclasses.replace(b.sequences, length=60))
    lines = diff_schemas(a.schema(), b.schema(), names=("site-a", "site-b"))
    assert "sequences.length: site-a has 120, site-b has 60" in lines
    assert "variants.sites: 1 only in site-a (1:0:A:G); 1 only in site-b (1:1000:A:G)" in lines
    assert len(lines) == 2
    assert schema_hash(a.schema()) != schema_hash(b.schema())


def test_diff_reports_missing_modality(tmp_path: Path) -> None:
    full = load_spec(_write(tmp_path, FULL_SPEC))
    fewer = dataclasses.replace(full, events=None)
    lines = diff_schemas(full.schema(), fewer.schema(), names=("a", "b"))
    assert any(line.startswith("events: only in a") for line in lines)
    assert any(line.startswith("modalities: 1 only in a (events)") for line in lines)


@pytest.mark.parametrize(("edit", "message"), [
    (("[split]", "[split]\nbogus = 1"), "[split] bogus: unknown key"),
    (('column = "outcome"\n', ""), "[label] column: is required"),
    (("length = 120", "length = \"120\""), "[modalities.sequences] length: must be of type int"),
    (("length = 120", "length = 0"), "[modalities.sequences] length: must be a positive integer"),
    (('classes = ["control", "case"]', 'classes = ["case"]'), "[label] classes: needs at least two classes"),
    (('positive = ["case"]', 'positive = ["sick"]'), "[label] positive: 'sick' is not one of the classes"),
    (('classes = ["control", "case"]', 'classes = ["case", "case"]'), "[label] classes: lists 'case' twice"),
    (("seed = 3", "seed = 3\ntrain = 0.8"), "train + validation + test must be 1"),
    (("seed = 3", "seed = -1"), "[split] seed: must be a non-negative integer, got -1"),
    (("seed = 3", "seed = 1e400"), "[split] seed: must be of type int, got inf"),
    (("seed = 3", "seed = 3\ntrain = nan"), "[split] train: must lie strictly between 0 and 1, got nan"),
    (('policy = "stratified"', 'policy = "group"'), "[split] group-column: is required"),
    (('policy = "stratified"', 'policy = "random"'), "[split] policy: must be one of stratified, group"),
    (('multiallelic = "split"', 'multiallelic = "drop"'), "multiallelic: must be one of error, split"),
    (('numeric = ["age", "bmi"]', 'numeric = ["age", "sex"]'), "'sex' is listed both as numeric and categorical"),
    (('smoker = ["no", "yes"]', 'smoker = []'), "categorical.smoker: must be a non-empty list"),
    (('file = "sequences.fa"', 'file = "sequences.csv"\nformat = "csv"'), "column: is required when format = 'csv'"),
    (('feature-column = "gene"\n', ""), "[modalities.events] feature-column: is required"),
    # declared value ranges
    (('numeric = ["age", "bmi"]', 'numeric = ["age", "bmi"]\nranges = { weight = [0, 300] }'),
     "[modalities.clinical] ranges.weight: 'weight' is not a numeric field (the numeric fields are ['age', 'bmi'])"),
    (('numeric = ["age", "bmi"]', 'numeric = ["age", "bmi"]\nranges = { sex = [0, 1] }'),
     "[modalities.clinical] ranges.sex: 'sex' is not a numeric field"),
    (('numeric = ["age", "bmi"]', 'numeric = ["age", "bmi"]\nranges = { age = [120, 0] }'),
     "[modalities.clinical] ranges.age: lo must be less than hi, got [120, 0]"),
    (('numeric = ["age", "bmi"]', 'numeric = ["age", "bmi"]\nranges = { age = [5, 5.0] }'),
     "[modalities.clinical] ranges.age: lo must be less than hi, got [5, 5.0]"),
    (('numeric = ["age", "bmi"]', 'numeric = ["age", "bmi"]\nranges = { age = [0, inf] }'),
     "[modalities.clinical] ranges.age: must be finite numbers, got [0, inf]"),
    (('numeric = ["age", "bmi"]', 'numeric = ["age", "bmi"]\nranges = { bmi = [nan, 80] }'),
     "[modalities.clinical] ranges.bmi: must be finite numbers, got [nan, 80]"),
    (('numeric = ["age", "bmi"]', 'numeric = ["age", "bmi"]\nranges = { age = [0, 60, 120] }'),
     "[modalities.clinical] ranges.age: must be a range [lo, hi] of two numbers, got [0, 60, 120]"),
    (('numeric = ["age", "bmi"]', 'numeric = ["age", "bmi"]\nranges = { age = ["0", "120"] }'),
     "[modalities.clinical] ranges.age: must be a range [lo, hi] of two numbers"),
    (('numeric = ["age", "bmi"]', 'numeric = ["age", "bmi"]\nranges = { age = 120 }'),
     "[modalities.clinical] ranges.age: must be a range [lo, hi] of two numbers, got 120"),
    (('numeric = ["age", "bmi"]', 'numeric = ["age", "bmi"]\nranges = [0, 120]'),
     "[modalities.clinical] ranges: must be of type dict"),
    (('features = ["g1", "g2"]', 'features = ["g1", "g2"]\nrange = [1, -1]'),
     "[modalities.omics] range: lo must be less than hi, got [1, -1]"),
    (('features = ["g1", "g2"]', 'features = ["g1", "g2"]\nrange = [-inf, 1]'),
     "[modalities.omics] range: must be finite numbers, got [-inf, 1]"),
    (('features = ["g1", "g2"]', 'features = ["g1", "g2"]\nrange = [true, 2]'),
     "[modalities.omics] range: must be a range [lo, hi] of two numbers"),
    (('features = ["g1", "g2"]', 'features = ["g1", "g2"]\nrange = 5'),
     "[modalities.omics] range: must be of type list"),
    (('features = ["g1", "g2"]', 'features = ["g1", "g2"]\nranges = { g1 = [0, 1] }'),
     "[modalities.omics] ranges: unknown key"),
])
def test_spec_errors_name_file_and_key(tmp_path: Path, edit: tuple[str, str], message: str) -> None:
    assert edit[0] in FULL_SPEC
    path = _write(tmp_path, FULL_SPEC.replace(*edit, 1))
    with pytest.raises(SpecError) as info:
        load_spec(path)
    text = str(info.value)
    assert text.startswith(str(path)) and message in text
    assert "\n" not in text


def test_spec_without_modalities_is_refused(tmp_path: Path) -> None:
    text = FULL_SPEC.split("[modalities.sequences]")[0]
    with pytest.raises(SpecError, match=r"\[modalities\] names no modality"):
        load_spec(_write(tmp_path, text))


def test_bad_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="not valid TOML"):
        load_spec(_write(tmp_path, "[label\nfile = 1"))
    with pytest.raises(SpecError, match="spec file not found"):
        load_spec(tmp_path / "nope.toml")


# ---------------------------------------------------------------------------------------------
# Declared value ranges

RANGES = (('numeric = ["age", "bmi"]', 'numeric = ["age", "bmi"]\nranges = { bmi = [10, 80.5], age = [0, 120] }'),
          ('features = ["g1", "g2"]', 'features = ["g1", "g2"]\nrange = [-10, 10]'))

# The schema hash of FULL_SPEC computed before declared ranges existed: a spec without ranges
# must keep it, or every federation would have to re-import.
FULL_SPEC_HASH = "e7dd969aa7ea518de4b08465309dc0abacf738a6c389eb4f6b3ad926074156c3"


def _with_ranges(text: str = FULL_SPEC) -> str:
    for old, new in RANGES:
        assert old in text
        text = text.replace(old, new, 1)
    return text


def test_ranges_parse_as_float_pairs(tmp_path: Path) -> None:
    spec = load_spec(_write(tmp_path, _with_ranges()))
    assert spec.clinical.ranges == {"bmi": (10.0, 80.5), "age": (0.0, 120.0)}
    assert all(isinstance(v, float) for r in spec.clinical.ranges.values() for v in r)
    assert spec.omics.range == (-10.0, 10.0)
    plain = load_spec(_write(tmp_path, FULL_SPEC, "plain.toml"))
    assert plain.clinical.ranges == {} and plain.omics.range is None


def test_ranges_enter_the_schema_sorted_and_only_when_declared(tmp_path: Path) -> None:
    spec = load_spec(_write(tmp_path, _with_ranges()))
    schema = spec.schema()
    assert schema["clinical"]["ranges"] == {"age": [0.0, 120.0], "bmi": [10.0, 80.5]}
    assert list(schema["clinical"]["ranges"]) == ["age", "bmi"]
    assert schema["omics"]["range"] == [-10.0, 10.0]
    plain = load_spec(_write(tmp_path, FULL_SPEC, "plain.toml")).schema()
    assert "ranges" not in plain["clinical"] and "range" not in plain["omics"]


def test_hash_without_ranges_is_unchanged(tmp_path: Path) -> None:
    assert load_spec(_write(tmp_path, FULL_SPEC)).schema_hash() == FULL_SPEC_HASH
    # An empty ranges table declares nothing: same hash as no key at all.
    empty = FULL_SPEC.replace('numeric = ["age", "bmi"]', 'numeric = ["age", "bmi"]\nranges = {}')
    assert load_spec(_write(tmp_path, empty, "empty.toml")).schema_hash() == FULL_SPEC_HASH


def test_hash_covers_declared_ranges(tmp_path: Path) -> None:
    ranged = load_spec(_write(tmp_path, _with_ranges()))
    assert ranged.schema_hash() != FULL_SPEC_HASH
    lines = diff_schemas(load_spec(_write(tmp_path, FULL_SPEC, "plain.toml")).schema(), ranged.schema(),
                         names=("a", "b"))
    assert any(line.startswith("clinical.ranges: only in b") for line in lines)
    assert any(line.startswith("omics.range: only in b") for line in lines)
    wider = load_spec(_write(tmp_path, _with_ranges().replace("age = [0, 120]", "age = [0, 130]"), "wider.toml"))
    assert wider.schema_hash() != ranged.schema_hash()
    assert diff_schemas(ranged.schema(), wider.schema()) == [
        "clinical.ranges.age: 1 only in first (120.0); 1 only in second (130.0)"]
    # Integers and floats spell the same bound.
    floats = _with_ranges().replace("age = [0, 120]", "age = [0.0, 120.0]").replace("[-10, 10]", "[-10.0, 10.0]")
    assert load_spec(_write(tmp_path, floats, "floats.toml")).schema_hash() == ranged.schema_hash()


def test_ranges_survive_write_and_load(tmp_path: Path) -> None:
    spec = load_spec(_write(tmp_path, _with_ranges()))
    again = load_spec(write_spec(spec, tmp_path / "copy" / "spec.toml"))
    assert again.clinical.ranges == spec.clinical.ranges and again.omics.range == spec.omics.range
    assert again.schema_hash() == spec.schema_hash()
    plain = load_spec(_write(tmp_path, FULL_SPEC, "plain.toml"))
    written = tomllib.loads(write_spec(plain, tmp_path / "plain" / "spec.toml").read_text())
    assert "ranges" not in written["modalities"]["clinical"]  # nothing declared, nothing written
    assert "range" not in written["modalities"]["omics"]
