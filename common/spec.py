"""Cohort specification: what a site's data files are and what every site must agree on.

A cohort spec is a TOML file. Keys are kebab-case, as in Flower's run config. Paths are
relative to the spec file. Example::

    [cohort]
    name = "synthetic"
    id-column = "patient_id"          # default id column for every table

    [label]
    file = "clinical.csv"
    column = "outcome"
    classes = ["control", "case"]
    positive = ["case"]

    [split]
    policy = "stratified"             # or "group" (with group-column)
    train = 0.70
    validation = 0.15
    test = 0.15
    seed = 0

    [modalities.sequences]
    format = "fasta"                  # or "csv" / "tsv" with column = "..."
    file = "sequences.fa"
    length = 200
    strand = "forward"                # or "either": orientation-free, train with reverse complements

    [modalities.variants]
    file = "variants.vcf.gz"
    multiallelic = "error"            # or "split"

    [modalities.omics]
    file = "omics.csv"
    range = [-10.0, 10.0]             # optional public bounds of every value (see below)

    [modalities.clinical]
    file = "clinical.csv"
    numeric = ["age"]
    categorical = { sex = ["F", "M"] }
    ranges = { age = [0, 120] }       # optional public bounds per numeric field

    [modalities.events]
    file = "mutations.tsv"
    feature-column = "gene"

The *schema* is the part of a spec that sites of one federation must share (classes, sequence
length, feature lists, categories, policies); file names, id columns and split settings are
local. Feature lists a spec leaves out are resolved from the data at import and stored in the
vault, so the schema hash a site reports always covers the exact features it trains on.

Declared ranges (``[modalities.clinical] ranges``, ``[modalities.omics] range``) are *public*
bounds, ``[lo, hi]`` with ``lo < hi``, finite: the clipping bounds of the differentially private
column moments (count, sum, sum of squares) behind the shared preprocessing. They are part of the
schema (every site clips alike), and a promise the import enforces: a value outside its declared
range is refused. Choose them from domain knowledge (an age lies in [0, 120]), never from the
site's data, which would leak it. A spec without them has the schema hash it always had.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import tomli_w

from common import durable
from common.errors import GenofedError

MODALITIES = ("sequences", "variants", "omics", "clinical", "events")
SPLIT_NAMES = ("train", "validation", "test")
SCHEMA_VERSION = 1


class SpecError(GenofedError, ValueError):
    """A cohort spec is invalid. The message names the file and the key."""


@dataclass(frozen=True)
class LabelSpec:
    """Where the label lives and which classes it has (``positive`` marks the case classes)."""

    file: Path
    column: str
    classes: tuple[str, ...]
    positive: tuple[str, ...] = ()
    id_column: str | None = None


@dataclass(frozen=True)
class SplitSpec:
    """How patients are split once, at import: stratified by label, or by a group column."""

    policy: Literal["stratified", "group"] = "stratified"
    train: float = 0.70
    validation: float = 0.15
    test: float = 0.15
    seed: int = 0
    group_column: str | None = None
    group_file: Path | None = None


@dataclass(frozen=True)
class SequencesSpec:
    """Fixed-length DNA sequences, from FASTA (record id = patient id) or a table column.

    ``strand = "forward"`` says the sequences are oriented (splice sites, promoters: the other
    strand means something else), so no reverse-complement augmentation is done; ``"either"``
    says orientation carries no meaning, and training adds reverse complements.
    """

    file: Path
    length: int
    format: Literal["fasta", "csv", "tsv"] = "fasta"
    column: str | None = None
    id_column: str | None = None
    strand: Literal["forward", "either"] = "forward"


@dataclass(frozen=True)
class VariantsSpec:
    """A multi-sample VCF / VCF.gz read into 0/1/2 alternate-allele dosages ordered by position.

    ``sites`` lists the agreed variants as ``chrom:pos:ref:alt``; left out, it is resolved from
    the file at import. ``multiallelic = "split"`` turns a site with k alternate alleles into k
    dosage features (one per alternate allele); ``"error"`` refuses it. ``missing = "allow"``
    keeps missing genotypes (stored as -1, imputed later); ``"error"`` refuses them.
    """

    file: Path
    multiallelic: Literal["error", "split"] = "error"
    missing: Literal["error", "allow"] = "error"
    sites: tuple[str, ...] | None = None


@dataclass(frozen=True)
class OmicsSpec:
    """A wide numeric matrix, one row per patient (expression, copy number, mutation flags)."""

    file: Path
    features: tuple[str, ...] | None = None
    id_column: str | None = None
    allow_missing: bool = False
    range: tuple[float, float] | None = None
    """Public ``(lo, hi)`` bounds of every value of the matrix (None: not declared)."""


@dataclass(frozen=True)
class ClinicalSpec:
    """Numeric and categorical EHR fields. Empty cells (and ``NA``) are missing values."""

    file: Path
    numeric: tuple[str, ...] = ()
    categorical: dict[str, tuple[str, ...]] = field(default_factory=dict)
    id_column: str | None = None
    allow_missing: bool = True
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    """Public ``(lo, hi)`` bounds per numeric field; a field left out has none declared."""


@dataclass(frozen=True)
class EventsSpec:
    """Long-format events (one row per patient and feature, e.g. patient, gene) pivoted to 0/1 flags.

    ``absent`` says what a patient with no row means: ``"missing"`` (not profiled: flags are
    missing values) or ``"zero"`` (profiled, no event). ``profiled`` optionally names a table
    listing patients that were profiled; those get zeros when they have no event.
    """

    file: Path
    feature_column: str
    features: tuple[str, ...] | None = None
    id_column: str | None = None
    absent: Literal["missing", "zero"] = "missing"
    profiled: Path | None = None


@dataclass(frozen=True)
class CohortSpec:
    """A parsed cohort spec. ``base_dir`` is the directory relative paths were resolved against."""

    name: str
    id_column: str
    label: LabelSpec
    split: SplitSpec = field(default_factory=SplitSpec)
    sequences: SequencesSpec | None = None
    variants: VariantsSpec | None = None
    omics: OmicsSpec | None = None
    clinical: ClinicalSpec | None = None
    events: EventsSpec | None = None
    source: Path | None = None

    @property
    def modalities(self) -> tuple[str, ...]:
        """Names of the modalities present, in canonical order."""
        return tuple(m for m in MODALITIES if getattr(self, m) is not None)

    def id_column_for(self, part: Any) -> str:
        """The id column of a table part, falling back to the cohort-wide one."""
        return getattr(part, "id_column", None) or self.id_column

    def schema(self) -> dict[str, Any]:
        """What sites must agree on, as plain JSON-able data."""
        return spec_schema(self)

    def schema_hash(self) -> str:
        """SHA-256 of the canonical schema; equal hashes mean compatible sites."""
        return schema_hash(self.schema())


# ---------------------------------------------------------------------------------------------
# Parsing


_ALLOWED_KEYS: dict[str, set[str]] = {
    "": {"cohort", "label", "split", "modalities"},
    "cohort": {"name", "id-column"},
    "label": {"file", "column", "classes", "positive", "id-column"},
    "split": {"policy", "train", "validation", "test", "seed", "group-column", "group-file"},
    "modalities": set(MODALITIES),
    "sequences": {"file", "length", "format", "column", "id-column", "strand"},
    "variants": {"file", "multiallelic", "missing", "sites"},
    "omics": {"file", "features", "id-column", "allow-missing", "range"},
    "clinical": {"file", "numeric", "categorical", "id-column", "allow-missing", "ranges"},
    "events": {"file", "feature-column", "features", "id-column", "absent", "profiled"},
}


class _Reader:
    """Typed access to one TOML table, with errors that name the spec file and the key."""

    def __init__(self, source: str, table: dict[str, Any], where: str, base_dir: Path) -> None:
        self.source, self.table, self.where, self.base_dir = source, table, where, base_dir
        allowed = _ALLOWED_KEYS[where.rsplit(".", 1)[-1] if where else ""]
        unknown = sorted(set(table) - allowed)
        if unknown:
            raise SpecError(
                f"{source}: {self._key(unknown[0])}: unknown key; allowed keys: {', '.join(sorted(allowed))}"
            )

    def _key(self, key: str) -> str:
        return f"[{self.where}] {key}" if self.where else key

    def fail(self, key: str, problem: str) -> SpecError:
        return SpecError(f"{self.source}: {self._key(key)}: {problem}")

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ..., *, required: bool = False) -> Any:
        if key not in self.table:
            if required or default is ...:
                raise self.fail(key, "is required")
            return default
        value = self.table[key]
        if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, float, (int, float))):
            name = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise self.fail(key, f"must be of type {name}, got {value!r}")
        return value

    def choice(self, key: str, options: tuple[str, ...], default: str) -> str:
        value = self.get(key, str, default)
        if value not in options:
            raise self.fail(key, f"must be one of {', '.join(options)}, got {value!r}")
        return value

    def strings(self, key: str, default: Any = ...) -> tuple[str, ...] | None:
        value = self.get(key, list, default)
        if value is None or value is default:
            return value
        if not all(isinstance(v, str) for v in value):
            raise self.fail(key, "must be a list of strings")
        if len(set(value)) != len(value):
            dup = next(v for v in value if value.count(v) > 1)
            raise self.fail(key, f"lists {dup!r} twice")
        return tuple(value)

    def path(self, key: str, default: Any = ...) -> Path | None:
        value = self.get(key, str, default)
        if value is None or value is default:
            return value
        return (self.base_dir / value).resolve()

    def optional_str(self, key: str) -> str | None:
        return self.get(key, str, None)

    def bounds(self, key: str, value: Any) -> tuple[float, float]:
        """``value`` as a public range ``(lo, hi)``: two finite numbers with lo < hi."""
        if (not isinstance(value, list) or len(value) != 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
            raise self.fail(key, f"must be a range [lo, hi] of two numbers, got {value!r}")
        lo, hi = float(value[0]), float(value[1])
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise self.fail(key, f"must be finite numbers, got [{value[0]}, {value[1]}]")
        if not lo < hi:
            raise self.fail(key, f"lo must be less than hi, got [{value[0]}, {value[1]}]")
        return lo, hi


def text_line_of(data: bytes, offset: int) -> int:
    """The 1-based line of byte ``offset`` in ``data``."""
    return data.count(b"\n", 0, offset) + 1


def load_spec(path: str | Path) -> CohortSpec:
    """Read and validate a cohort spec TOML file.

    Raises
    ------
    SpecError
        With the file and the key at fault, for anything from bad TOML to an unknown class.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"{path}: spec file not found") from None
    except OSError as exc:
        raise SpecError(f"{path}: cannot read spec: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        line = text_line_of(path.read_bytes(), exc.start)
        raise SpecError(f"{path}: line {line}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x}); save the "
                        "spec as UTF-8") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{path}: not valid TOML: {exc}") from None
    return parse_spec(data, source=path)


def parse_spec(data: dict[str, Any], *, source: Path) -> CohortSpec:
    """Build a :class:`CohortSpec` from parsed TOML ``data``; paths resolve against ``source``'s folder."""
    src, base = str(source), source.parent.resolve()
    top = _Reader(src, data, "", base)
    cohort = _Reader(src, top.get("cohort", dict, {}), "cohort", base)
    id_column = cohort.get("id-column", str, "patient_id")
    label = _parse_label(_Reader(src, top.get("label", dict, required=True), "label", base))
    split = _parse_split(_Reader(src, top.get("split", dict, {}), "split", base))
    mods = _Reader(src, top.get("modalities", dict, {}), "modalities", base)
    parts: dict[str, Any] = {}
    for name in MODALITIES:
        table = mods.get(name, dict, None)
        if table is not None:
            parts[name] = _PARSERS[name](_Reader(src, table, f"modalities.{name}", base))
    if not parts:
        raise SpecError(f"{src}: [modalities] names no modality; give at least one of {', '.join(MODALITIES)}")
    spec = CohortSpec(name=cohort.get("name", str, source.stem), id_column=id_column, label=label,
                      split=split, source=source.resolve(), **parts)
    if split.policy == "group" and split.group_column is None:
        raise SpecError(f"{src}: [split] group-column: is required when policy = \"group\"")
    return spec


def _parse_label(r: _Reader) -> LabelSpec:
    classes = r.strings("classes")
    if len(classes) < 2:
        raise r.fail("classes", "needs at least two classes")
    positive = r.strings("positive", ())
    for p in positive:
        if p not in classes:
            raise r.fail("positive", f"{p!r} is not one of the classes {list(classes)}")
    return LabelSpec(file=r.path("file"), column=r.get("column", str), classes=classes,
                     positive=positive, id_column=r.optional_str("id-column"))


def _parse_split(r: _Reader) -> SplitSpec:
    fractions = {k: float(r.get(k, (int, float), d)) for k, d in
                 (("train", 0.70), ("validation", 0.15), ("test", 0.15))}
    for k, v in fractions.items():
        if not 0.0 < v < 1.0:
            raise r.fail(k, f"must lie strictly between 0 and 1, got {v}")
    if abs(sum(fractions.values()) - 1.0) > 1e-9:
        raise r.fail("train", f"train + validation + test must be 1, got {sum(fractions.values()):.6g}")
    seed = r.get("seed", int, 0)
    if seed < 0:  # numpy's generators take non-negative seeds only
        raise r.fail("seed", f"must be a non-negative integer, got {seed}")
    return SplitSpec(policy=r.choice("policy", ("stratified", "group"), "stratified"), seed=seed,
                     group_column=r.optional_str("group-column"), group_file=r.path("group-file", None),
                     **fractions)


def _parse_sequences(r: _Reader) -> SequencesSpec:
    length = r.get("length", int)
    if length < 1:
        raise r.fail("length", f"must be a positive integer, got {length}")
    fmt = r.choice("format", ("fasta", "csv", "tsv"), "fasta")
    column = r.optional_str("column")
    if fmt != "fasta" and column is None:
        raise r.fail("column", f"is required when format = {fmt!r} (the column that holds the sequence)")
    return SequencesSpec(file=r.path("file"), length=length, format=fmt, column=column,
                         id_column=r.optional_str("id-column"),
                         strand=r.choice("strand", ("forward", "either"), "forward"))


def _parse_variants(r: _Reader) -> VariantsSpec:
    return VariantsSpec(file=r.path("file"), multiallelic=r.choice("multiallelic", ("error", "split"), "error"),
                        missing=r.choice("missing", ("error", "allow"), "error"), sites=r.strings("sites", None))


def _parse_omics(r: _Reader) -> OmicsSpec:
    raw = r.get("range", list, None)
    return OmicsSpec(file=r.path("file"), features=r.strings("features", None), id_column=r.optional_str("id-column"),
                     allow_missing=r.get("allow-missing", bool, False),
                     range=None if raw is None else r.bounds("range", raw))


def _parse_clinical(r: _Reader) -> ClinicalSpec:
    numeric = r.strings("numeric", ())
    raw = r.get("categorical", dict, {})
    categorical: dict[str, tuple[str, ...]] = {}
    for name, cats in raw.items():
        if not isinstance(cats, list) or not cats or not all(isinstance(c, str) for c in cats):
            raise r.fail(f"categorical.{name}", "must be a non-empty list of category names (strings)")
        if len(set(cats)) != len(cats):
            raise r.fail(f"categorical.{name}", "lists a category twice")
        categorical[name] = tuple(cats)
    both = set(numeric) & set(categorical)
    if both:
        raise r.fail("numeric", f"column {sorted(both)[0]!r} is listed both as numeric and categorical")
    if not numeric and not categorical:
        raise r.fail("numeric", "give at least one numeric or categorical column")
    ranges: dict[str, tuple[float, float]] = {}
    for name, value in r.get("ranges", dict, {}).items():
        if name not in numeric:
            listed = f"the numeric fields are {list(numeric)}" if numeric else "no numeric field is listed"
            raise r.fail(f"ranges.{name}", f"{name!r} is not a numeric field ({listed}); ranges are declared "
                         "for numeric fields only")
        ranges[name] = r.bounds(f"ranges.{name}", value)
    return ClinicalSpec(file=r.path("file"), numeric=numeric, categorical=categorical,
                        id_column=r.optional_str("id-column"), allow_missing=r.get("allow-missing", bool, True),
                        ranges=ranges)


def _parse_events(r: _Reader) -> EventsSpec:
    return EventsSpec(file=r.path("file"), feature_column=r.get("feature-column", str),
                      features=r.strings("features", None), id_column=r.optional_str("id-column"),
                      absent=r.choice("absent", ("missing", "zero"), "missing"), profiled=r.path("profiled", None))


_PARSERS = {"sequences": _parse_sequences, "variants": _parse_variants, "omics": _parse_omics,
            "clinical": _parse_clinical, "events": _parse_events}


# ---------------------------------------------------------------------------------------------
# Writing


def spec_to_dict(spec: CohortSpec, *, relative_to: Path | None = None) -> dict[str, Any]:
    """The TOML table structure of ``spec``; paths are made relative to ``relative_to`` when given."""

    def rel(p: Path | None) -> str | None:
        if p is None:
            return None
        if relative_to is not None:
            try:
                return str(Path(p).resolve().relative_to(Path(relative_to).resolve()))
            except ValueError:
                pass
        return str(p)

    def clean(d: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in d.items() if v is not None and v != ()}

    out: dict[str, Any] = {
        "cohort": {"name": spec.name, "id-column": spec.id_column},
        "label": clean({"file": rel(spec.label.file), "column": spec.label.column, "classes": list(spec.label.classes),
                        "positive": list(spec.label.positive) or None, "id-column": spec.label.id_column}),
        "split": clean({"policy": spec.split.policy, "train": spec.split.train, "validation": spec.split.validation,
                        "test": spec.split.test, "seed": spec.split.seed, "group-column": spec.split.group_column,
                        "group-file": rel(spec.split.group_file)}),
        "modalities": {},
    }
    mods = out["modalities"]
    if (s := spec.sequences) is not None:
        mods["sequences"] = clean({"format": s.format, "file": rel(s.file), "length": s.length, "column": s.column,
                                   "id-column": s.id_column, "strand": s.strand})
    if (v := spec.variants) is not None:
        mods["variants"] = clean({"file": rel(v.file), "multiallelic": v.multiallelic, "missing": v.missing,
                                  "sites": list(v.sites) if v.sites is not None else None})
    if (o := spec.omics) is not None:
        mods["omics"] = clean({"file": rel(o.file), "id-column": o.id_column, "allow-missing": o.allow_missing,
                               "range": list(o.range) if o.range is not None else None,
                               "features": list(o.features) if o.features is not None else None})
    if (c := spec.clinical) is not None:
        mods["clinical"] = clean({"file": rel(c.file), "id-column": c.id_column, "allow-missing": c.allow_missing,
                                  "numeric": list(c.numeric),
                                  "categorical": {k: list(v) for k, v in c.categorical.items()},
                                  "ranges": {k: list(v) for k, v in c.ranges.items()} or None})
    if (e := spec.events) is not None:
        mods["events"] = clean({"file": rel(e.file), "feature-column": e.feature_column, "id-column": e.id_column,
                                "absent": e.absent, "profiled": rel(e.profiled),
                                "features": list(e.features) if e.features is not None else None})
    return out


def write_spec(spec: CohortSpec, path: str | Path) -> Path:
    """Write ``spec`` as TOML to ``path`` with file paths relative to its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    durable.write_atomic(path, tomli_w.dumps(spec_to_dict(spec, relative_to=path.parent)))
    return path


# ---------------------------------------------------------------------------------------------
# Schema: what sites must agree on


def spec_schema(spec: CohortSpec) -> dict[str, Any]:
    """The site-independent part of ``spec``: classes, modalities and their feature layout."""
    schema: dict[str, Any] = {
        "schema-version": SCHEMA_VERSION,
        "label": {"classes": list(spec.label.classes), "positive": list(spec.label.positive)},
        "modalities": list(spec.modalities),
    }
    if (s := spec.sequences) is not None:
        schema["sequences"] = {"length": s.length, "alphabet": "ACGT", "ambiguity": "N", "strand": s.strand}
    if (v := spec.variants) is not None:
        schema["variants"] = {"multiallelic": v.multiallelic, "missing": v.missing,
                              "sites": list(v.sites) if v.sites is not None else None}
    # Declared ranges enter only when present, so specs without them keep their hash.
    if (o := spec.omics) is not None:
        schema["omics"] = {"features": list(o.features) if o.features is not None else None}
        if o.range is not None:
            schema["omics"]["range"] = list(o.range)
    if (c := spec.clinical) is not None:
        schema["clinical"] = {"numeric": list(c.numeric),
                              "categorical": {k: list(v) for k, v in sorted(c.categorical.items())}}
        if c.ranges:
            schema["clinical"]["ranges"] = {k: list(v) for k, v in sorted(c.ranges.items())}
    if (e := spec.events) is not None:
        schema["events"] = {"features": list(e.features) if e.features is not None else None, "absent": e.absent}
    return schema


def schema_hash(schema: dict[str, Any]) -> str:
    """SHA-256 (hex) of the canonical JSON form of ``schema``."""
    canonical = json.dumps(schema, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def with_resolved_features(spec: CohortSpec, **features: tuple[str, ...]) -> CohortSpec:
    """A copy of ``spec`` with feature lists filled in (keys: ``variants``, ``omics``, ``events``)."""
    changes: dict[str, Any] = {}
    for name, values in features.items():
        part = getattr(spec, name)
        attr = "sites" if name == "variants" else "features"
        changes[name] = dataclasses.replace(part, **{attr: tuple(values)})
    return dataclasses.replace(spec, **changes)


def diff_schemas(a: dict[str, Any], b: dict[str, Any], *, names: tuple[str, str] = ("first", "second"),
                 limit: int = 5) -> list[str]:
    """Readable differences between two schemas, one line per differing field.

    Lists are summarised by what each side alone has, so a 4,000-variant panel that differs
    by one site gives one short line.
    """
    lines: list[str] = []
    _diff(a, b, "", names, limit, lines)
    return lines


def _diff(a: Any, b: Any, path: str, names: tuple[str, str], limit: int, out: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            sub = f"{path}.{key}" if path else key
            if key not in a:
                out.append(f"{sub}: only in {names[1]} ({_short(b[key], limit)})")
            elif key not in b:
                out.append(f"{sub}: only in {names[0]} ({_short(a[key], limit)})")
            else:
                _diff(a[key], b[key], sub, names, limit, out)
        return
    if a == b:
        return
    if isinstance(a, list) and isinstance(b, list):
        in_a, in_b = {_hashable(x) for x in a}, {_hashable(x) for x in b}
        only_a = [x for x in a if _hashable(x) not in in_b]
        only_b = [x for x in b if _hashable(x) not in in_a]
        if not only_a and not only_b:
            out.append(f"{path}: same {len(a)} entries in a different order")
            return
        parts = []
        if only_a:
            parts.append(f"{len(only_a)} only in {names[0]} ({_short(only_a, limit)})")
        if only_b:
            parts.append(f"{len(only_b)} only in {names[1]} ({_short(only_b, limit)})")
        out.append(f"{path}: " + "; ".join(parts))
        return
    out.append(f"{path}: {names[0]} has {_short(a, limit)}, {names[1]} has {_short(b, limit)}")


def _hashable(x: Any) -> Any:
    return json.dumps(x, sort_keys=True) if isinstance(x, (dict, list)) else x


def _short(x: Any, limit: int) -> str:
    if isinstance(x, list) and len(x) > limit:
        return ", ".join(map(str, x[:limit])) + f", ... ({len(x)} in all)"
    if isinstance(x, list):
        return ", ".join(map(str, x)) if x else "none"
    return repr(x)
