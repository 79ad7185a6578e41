"""Multi-sample VCF / VCF.gz to alternate-allele dosages, with cyvcf2 (htslib).

Genotypes are decoded per record as one vectorised allele array (from htslib's int32 GT values,
``Variant.format("GT", int)``: one row per sample, allele indices, -1 for a missing allele, -2
past a short call's end), so a dosage is a count of one allele over the row. This one path
covers biallelic sites, split multi-allelic sites (a feature per alternate allele), haploid
calls (dosage 0/1) and partly missing calls such as ``0/.`` (missing, where ``gt_types`` would
say homozygous reference). cyvcf2's own ``Genotypes.array()`` is not used: it casts allele
indices to int16, so ``0/65537`` would read as ``0/1``. A call naming an allele the record does
not have, or holding more than two alleles (a dosage is 0, 1 or 2), is a problem.

htslib's own stderr messages are silenced while reading; every failure becomes a problem
here instead, and a truncated or corrupt file is diagnosed with Python's gzip.
"""

from __future__ import annotations

import gzip
import os
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import cyvcf2
import numpy as np

from client.importers.problems import ProblemLog, quote_list
from common.spec import VariantsSpec

# The 28-byte empty block bgzip writes at the end of every complete file.
BGZF_EOF = bytes.fromhex("1f8b08040000000000ff0600424302001b0003000000000000000000")
_HTSLIB_DEFAULT_LOG_LEVEL = 3
_PROGRESS_EVERY = 256
_SPLIT_HINT = 'split it with `bcftools norm -m -any`, or set multiallelic = "split" in [modalities.variants]'
_MISSING_HINT = 'set missing = "allow" in [modalities.variants] to keep it'
# htslib's int32 GT encoding: an allele is stored as (index + 1) << 1 | phased, so 0 and 1 are a
# missing allele ('.'); a call shorter than the record's longest is padded with vector_end.
_GT_VECTOR_END = -(2**31) + 1
_GT_INT32_MISSING = -(2**31)
_MAX_PLOIDY = 2


@dataclass
class VariantsResult:
    """Dosages (n_patients, m) int8 aligned to the cohort, the site names and import facts."""

    values: np.ndarray
    sites: tuple[str, ...]
    report: dict


@contextmanager
def quiet_htslib() -> Iterator[None]:
    """Silence htslib's stderr messages (problems are reported by us), then restore the level."""
    setter = getattr(cyvcf2, "set_htslib_log_level", None) or getattr(cyvcf2.cyvcf2, "set_htslib_log_level", None)
    if setter is None:
        yield
        return
    setter(0)
    try:
        yield
    finally:
        level = os.environ.get("CYVCF2_HTSLIB_LOG_LEVEL", "")
        setter(int(level) if level.isdigit() else _HTSLIB_DEFAULT_LOG_LEVEL)


def read_variants(spec: VariantsSpec, patients: tuple[str, ...], label_file: str, log: ProblemLog,
                  advance: Callable[[int], None] = lambda n: None) -> VariantsResult | None:
    """Read ``spec.file`` into dosages for ``patients``; None if unusable (problems logged)."""
    path, file = spec.file, str(spec.file)
    if not _check_file(path, log):
        return None
    _check_bgzf_end(path, log)
    with quiet_htslib():
        try:
            vcf = cyvcf2.VCF(file)
        except Exception:  # cyvcf2 raises OSError or a bare Exception for a bad header
            _diagnose_header(path, log)
            return None
        try:
            return _read_records(vcf, spec, patients, label_file, log, advance)
        finally:
            vcf.close()


def _check_file(path: Path, log: ProblemLog) -> bool:
    file = str(path)
    if not path.exists():
        log.add(file, "", None, "file not found (paths in the spec are relative to the spec file)",
                kind="unreadable file")
    elif path.is_dir():
        log.add(file, "", None, "is a folder, not a file", kind="unreadable file")
    elif not os.access(path, os.R_OK):
        log.add(file, "", None, "cannot be read: permission denied", kind="unreadable file")
    elif path.stat().st_size == 0:
        log.add(file, "", None, "the file is empty: it needs a VCF header and one record per site", kind="empty file")
    else:
        return True
    return False


def _check_bgzf_end(path: Path, log: ProblemLog) -> None:
    """A bgzip file must end with the BGZF EOF block; without it the file was cut short."""
    with open(path, "rb") as fh:
        head = fh.read(18)
        if len(head) < 18 or head[:2] != b"\x1f\x8b" or not head[3] & 4 or head[12:14] != b"BC":
            return  # not BGZF (plain text or plain gzip): truncation shows up while reading
        fh.seek(-min(28, path.stat().st_size), os.SEEK_END)
        if fh.read(28) != BGZF_EOF:
            log.add(str(path), "", None, "the bgzip end-of-file marker is missing, so the file is probably "
                    "truncated: copy or compress it again", kind="truncated file")


def _read_records(vcf: cyvcf2.VCF, spec: VariantsSpec, patients: tuple[str, ...], label_file: str,
                  log: ProblemLog, advance: Callable[[int], None]) -> VariantsResult | None:
    file = str(spec.file)
    try:
        samples = list(vcf.samples)
    except UnicodeDecodeError as exc:  # cyvcf2 decodes the header as UTF-8 text
        log.add(file, "header", None, f"the header is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} in "
                f"{exc.object[:40]!r}...): fix the sample names or save the file as UTF-8", kind="malformed header")
        return None
    if not samples:
        log.add(file, "header", None, "the VCF has no samples (no genotype columns after FORMAT)", kind="no samples")
        return None
    sample_of = _match_samples(file, samples, patients, label_file, log)
    reader = _Records(file, spec, samples, log)
    records = iter(vcf)
    while True:
        try:
            variant = next(records)
        except StopIteration:
            break
        except Exception:  # cyvcf2 raises a bare Exception for a record htslib cannot parse
            _diagnose_record(spec.file, reader.count, reader.last_site, log)
            break
        if variant.end <= variant.start:
            # htslib gave up on the line without an error and left no REF allele: reading REF (or
            # anything after it) would crash cyvcf2 (a segmentation fault, seen on a record whose
            # CHROM was missing or that held binary bytes). Report the line instead.
            _diagnose_record(spec.file, reader.count, reader.last_site, log)
            break
        try:
            reader.add(variant)
        except UnicodeDecodeError:  # cyvcf2 decodes CHROM, REF and ALT as UTF-8 text
            _diagnose_record(spec.file, reader.count - 1, reader.last_site, log)
            break
        if reader.count % _PROGRESS_EVERY == 0:
            advance(_PROGRESS_EVERY)
    advance(reader.count % _PROGRESS_EVERY)
    reader.finish()
    cols = _panel_columns(file, reader.sites, reader.locations, spec.sites, log)
    if cols is None or sample_of is None or log.problems_in(file):
        return None
    values = np.ascontiguousarray(reader.dosages()[cols][:, sample_of].T)
    sites = tuple(reader.sites[c] for c in cols)
    report = {"records": reader.count, "sites": len(sites), "samples": len(samples),
              "multiallelic_sites_split": reader.split_sites,
              "missing_genotypes": int((values < 0).sum())}
    return VariantsResult(values=values, sites=sites, report=report)


def _match_samples(file: str, samples: list[str], patients: tuple[str, ...], label_file: str,
                   log: ProblemLog) -> np.ndarray | None:
    """Column of each patient in the VCF; one summary problem if the sets differ."""
    position = {s: i for i, s in enumerate(samples)}
    if len(position) < len(samples):
        dup = next(s for i, s in enumerate(samples) if position[s] != i)
        log.add(file, "header", f"sample {dup!r}", "sample name appears twice in the #CHROM line: names must be "
                "unique (bcftools reheader can rename samples)", kind="duplicate sample")
        return None
    known = set(patients)
    extra = [s for s in samples if s not in known]
    missing = [p for p in patients if p not in position]
    if not extra and not missing:
        return np.array([position[p] for p in patients], dtype=np.int64)
    parts = []
    if extra:
        parts.append(f"{len(extra):,} {'sample' if len(extra) == 1 else 'samples'} not in the label file "
                     f"(e.g. {quote_list(extra[:3], 3)})")
    if missing:
        parts.append(f"{len(missing):,} {'patient' if len(missing) == 1 else 'patients'} missing from the VCF "
                     f"(e.g. {quote_list(missing[:3], 3)})")
    log.add(file, "header", None, ", ".join(parts) + f": the VCF's samples must be exactly the patients of the label "
            f"file {label_file} (bcftools view -s selects samples, bcftools reheader renames them)",
            kind="sample mismatch")
    return None


class _Records:
    """Checks records as they stream in and keeps one int8 dosage row per site."""

    def __init__(self, file: str, spec: VariantsSpec, samples: list[str], log: ProblemLog) -> None:
        self.file, self.spec, self.samples, self.log = file, spec, samples, log
        self.sites: list[str] = []
        self.locations: list[str] = []
        self._index: dict[str, int] = {}
        self._rows = np.empty((1024, len(samples)), dtype=np.int8)
        self.count = 0
        self.split_sites = 0
        self.last_site: str | None = None
        self._last: tuple[str, int] | None = None
        self._chroms: set[str] = set()

    def add(self, v: cyvcf2.Variant) -> None:
        """Check one record and store its dosage row(s)."""
        self.count += 1
        chrom, pos, ref, alts = v.CHROM, v.POS, v.REF, v.ALT
        where = f"record {chrom}:{pos}"
        self._check_order(chrom, pos, where)
        self.last_site = f"{chrom}:{pos}"
        if not alts:
            self.log.add(self.file, where, None, "site has no alternate allele (ALT is '.'): remove such sites, "
                         "e.g. bcftools view -e 'ALT=\".\"'", kind="no alternate allele")
            return
        if len(alts) > 1 and self.spec.multiallelic == "error":
            self.log.add(self.file, where, None, f"site has {len(alts)} alternate alleles ({','.join(alts)}): "
                         + _SPLIT_HINT, kind="multi-allelic site")
            return
        calls = self._genotypes(v, where)
        if calls is None:
            return
        self._check_alleles(calls, ref, alts, where)  # logged; the record is kept so its site is not also "missing"
        missing = _missing_calls(calls)
        if missing is not None:
            self._missing(calls, missing, where)
        self.split_sites += len(alts) > 1
        for k, alt in enumerate(alts, start=1):
            dosage = _allele_count(calls, k)
            if missing is not None:
                dosage[missing] = -1
            self._store(f"{chrom}:{pos}:{ref}:{alt}", dosage, where)

    def _genotypes(self, v: cyvcf2.Variant, where: str) -> np.ndarray | None:
        """(samples, ploidy + 1) int32 allele array, last column the phase flag; None without GT."""
        try:
            raw = v.format("GT", int)
        except Exception:  # cyvcf2 raises rather than return None for some records without GT
            raw = None
        if raw is None:
            self.log.add(self.file, where, None, "record has no GT (genotype) field: genofed needs called genotypes "
                         "in FORMAT/GT", kind="no GT field")
            return None
        return _decode_gt(raw, len(self.samples))

    def _check_alleles(self, calls: np.ndarray, ref: str, alts: list[str], where: str) -> None:
        """Log each sample whose genotype names an allele beyond the record's ALT (0 = REF, 1.. = ALT),
        or holds more than two alleles: htslib reads ``0/2`` at a site with one ALT, or ``1/1/1``,
        without a word, and they would count as no copy, or as a dosage of 3."""
        alleles = calls[:, :-1]
        beyond = (alleles > len(alts)).any(axis=1)
        if beyond.any():
            shown = f"REF {ref}, ALT {','.join(alts)}"
            noun = "allele" if len(alts) == 1 else "alleles"
            self._per_sample(calls, beyond, where, "allele beyond ALT",
                             lambda i: f"names allele {int(alleles[i].max())}, but the record has {len(alts)} "
                             f"alternate {noun} ({shown}): fix the genotype or the record's ALT")
        if alleles.shape[1] > _MAX_PLOIDY:
            extra = (alleles[:, _MAX_PLOIDY:] != -2).any(axis=1)
            self._per_sample(calls, extra & ~beyond, where, "more than two alleles",
                             lambda i: f"has {int((alleles[i] != -2).sum())} alleles: genofed reads haploid and "
                             "diploid calls only (a dosage is 0, 1 or 2); fix the genotype")

    def _per_sample(self, calls: np.ndarray, mask: np.ndarray, where: str, kind: str,
                    message: Callable[[int], str]) -> None:
        """Log ``genotype 'G' <message(i)>`` for the first samples of ``mask`` that fit the cap; count the rest."""
        hits = np.flatnonzero(mask)
        room = min(self.log.room(self.file, kind), hits.size)
        for i in hits[:room]:
            self.log.add(self.file, where, f"sample {self.samples[i]!r}",
                         f"genotype {_genotype_text(calls[i])!r} {message(i)}", kind=kind)
        self.log.count(self.file, kind, hits.size - room)

    def _check_order(self, chrom: str, pos: int, where: str) -> None:
        if self._last is not None and chrom == self._last[0] and pos < self._last[1]:
            self.log.add(self.file, where, None, f"position comes after {self._last[0]}:{self._last[1]}: the VCF must "
                         "be sorted by position (bcftools sort)", kind="unsorted")
        elif self._last is not None and chrom != self._last[0] and chrom in self._chroms:
            self.log.add(self.file, where, None, f"chromosome {chrom!r} appears again after {self._last[0]!r}: the "
                         "VCF must be sorted by chromosome and position (bcftools sort)", kind="unsorted")
        self._chroms.add(chrom)
        self._last = (chrom, pos)

    def _missing(self, calls: np.ndarray, missing: np.ndarray, where: str) -> None:
        if self.spec.missing == "allow":
            return
        hits = np.flatnonzero(missing)
        room = min(self.log.room(self.file, "missing genotype"), hits.size)
        for i in hits[:room]:
            self.log.add(self.file, where, f"sample {self.samples[i]!r}",
                         f"missing genotype {_genotype_text(calls[i])!r} ({_MISSING_HINT})", kind="missing genotype")
        self.log.count(self.file, "missing genotype", hits.size - room)

    def _store(self, site: str, dosage: np.ndarray, where: str) -> None:
        if site in self._index:
            self.log.add(self.file, where, None, f"site {site} appears twice: remove the copy "
                         "(bcftools norm -d exact)", kind="duplicate site")
            return
        n = len(self.sites)
        if n == self._rows.shape[0]:
            self._rows = np.concatenate([self._rows, np.empty_like(self._rows)])
        self._rows[n] = dosage
        self._index[site] = n
        self.sites.append(site)
        self.locations.append(where)

    def finish(self) -> None:
        """File-level problems seen only at the end."""
        if self.count == 0:
            self.log.add(self.file, "", None, "the VCF has a header but no variant records", kind="empty file")

    def dosages(self) -> np.ndarray:
        """(sites, samples) int8 dosages in file order."""
        return self._rows[: len(self.sites)]


def _decode_gt(raw: np.ndarray, n_samples: int) -> np.ndarray:
    """htslib's int32 GT values (samples x ploidy) as an int32 allele array plus a phase column.

    Allele ``-1`` is missing ('.', or no value at all), ``-2`` is past the end of a shorter call.
    The phase flag is the second allele's (htslib stores it there); it only picks the separator
    when a call is quoted back in a problem.
    """
    raw = np.asarray(raw, dtype=np.int32).reshape(n_samples, -1)
    calls = np.empty((n_samples, raw.shape[1] + 1), dtype=np.int32)
    alleles = calls[:, :-1]
    np.subtract(raw >> 1, 1, out=alleles)
    alleles[raw == _GT_VECTOR_END] = -2
    alleles[raw == _GT_INT32_MISSING] = -1
    calls[:, -1] = raw[:, min(1, raw.shape[1] - 1)] & 1
    return calls


def _allele_count(calls: np.ndarray, allele: int) -> np.ndarray:
    """Copies of ``allele`` per sample (int8), summed column by column: numpy's row-wise
    reductions over two or three entries are several times slower than these vector ops."""
    count = (calls[:, 0] == allele).astype(np.int8)
    for j in range(1, calls.shape[1] - 1):
        count += calls[:, j] == allele
    return count


def _missing_calls(calls: np.ndarray) -> np.ndarray | None:
    """Mask of samples with any missing allele (``./.``, ``0/.``, ``.``); None when all are called."""
    alleles = calls[:, :-1]
    if not (alleles == -1).any():
        return None
    missing = alleles[:, 0] == -1
    for j in range(1, alleles.shape[1]):
        missing |= alleles[:, j] == -1
    return missing


def _genotype_text(call: np.ndarray) -> str:
    """VCF text of one allele-array row: ``./.``, ``0/.``, ``.``."""
    sep = "|" if call[-1] else "/"
    return sep.join("." if a == -1 else str(int(a)) for a in call[:-1] if a != -2) or "."


def _panel_columns(file: str, sites: list[str], locations: list[str], panel: tuple[str, ...] | None,
                   log: ProblemLog) -> list[int] | None:
    """Rows of the agreed panel's sites (file order when there is no panel); strict both ways."""
    if panel is None:
        return list(range(len(sites)))
    index = {s: i for i, s in enumerate(sites)}
    wanted = set(panel)
    hint = _chr_hint(sites, panel)
    for site in panel:
        if site not in index:
            log.add(file, "", None, f"site {site} of the agreed panel ([modalities.variants] sites) is not in this "
                    f"VCF{hint}", kind="panel site missing")
    for site, where in zip(sites, locations):
        if site not in wanted:
            log.add(file, where, None, f"site {site} is not in the agreed panel ([modalities.variants] sites): "
                    f"remove it from the VCF (bcftools view -T) or agree on a new panel{hint}", kind="site not in panel")
    if any(s not in index for s in panel) or any(s not in wanted for s in sites):
        return None
    return [index[s] for s in panel]


def _chr_hint(sites: list[str], panel: tuple[str, ...]) -> str:
    """Point out a 'chr1' vs '1' naming difference, the usual reason a whole panel mismatches."""
    if not sites or not panel:
        return ""
    vcf_chr, panel_chr = sites[0].startswith("chr"), panel[0].startswith("chr")
    if vcf_chr == panel_chr:
        return ""
    return (f" (the panel names chromosomes like {panel[0].split(':')[0]!r}, the VCF like "
            f"{sites[0].split(':')[0]!r}: rename with bcftools annotate --rename-chrs)")


# ---------------------------------------------------------------------------------------------
# Diagnosis of files htslib cannot read, with plain Python


def _open_text(path: Path):
    with open(path, "rb") as fh:
        gz = fh.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rt", encoding="utf-8", errors="replace") if gz else \
        open(path, encoding="utf-8", errors="replace")


def _diagnose_header(path: Path, log: ProblemLog) -> None:
    """Say why htslib refused the header: no #CHROM line, repeated samples, or not a VCF at all."""
    file = str(path)
    try:
        samples, lineno = _scan_header(path)
    except (EOFError, zlib.error, gzip.BadGzipFile, OSError):
        log.add(file, "", None, "the compressed file is truncated or corrupt: copy or compress it again",
                kind="truncated file")
        return
    if samples is None:
        log.add(file, f"line {lineno}" if lineno else "", None, "not a VCF file: it must start with '##fileformat=VCF"
                "...' header lines and a '#CHROM POS ID REF ALT QUAL FILTER INFO FORMAT <samples>' line",
                kind="not a VCF")
        return
    seen: dict[str, int] = {}
    for col, name in enumerate(samples, start=10):
        if name in seen:
            log.add(file, f"line {lineno}", f"sample {name!r}", f"sample name appears twice in the #CHROM line "
                    f"(columns {seen[name]} and {col}): names must be unique", kind="duplicate sample")
        seen.setdefault(name, col)
    if len(seen) == len(samples):
        log.add(file, "header", None, "htslib cannot read the VCF header: check it with `bcftools view -h`",
                kind="not a VCF")


def _scan_header(path: Path) -> tuple[list[str] | None, int]:
    """Samples of the #CHROM line and its line number; ``(None, n)`` if line n is not header."""
    with _open_text(path) as fh:
        for lineno, line in enumerate(fh, start=1):
            if line.startswith("#CHROM"):
                return line.rstrip("\r\n").split("\t")[9:], lineno
            if not line.startswith("##"):
                return None, lineno
    return None, 0


def _diagnose_record(path: Path, good: int, last_site: str | None, log: ProblemLog) -> None:
    """Say why reading stopped after ``good`` records: a cut-off file, or which line is malformed."""
    file = str(path)
    after = f"after record {last_site}" if last_site else "before the first record"
    try:
        line_no, text = _record_line(path, good)
    except (EOFError, zlib.error, gzip.BadGzipFile, OSError):
        log.add(file, after, None, "the compressed file is truncated or corrupt, so the records after this point "
                "cannot be read: copy or compress it again (bgzip)", kind="truncated file")
        return
    if line_no is None:
        log.add(file, after, None, "htslib could not read the next record", kind="malformed record")
        return
    shown = "\t".join(text.split("\t")[:5])
    log.add(file, f"line {line_no}", None, f"cannot parse this record ({shown[:80]!r}...): check the CHROM, POS, "
            "REF and ALT columns and that columns are separated by tabs", kind="malformed record")


def _record_line(path: Path, good: int) -> tuple[int | None, str]:
    """Line number and text of the record after the first ``good`` ones (reads the whole file,
    so a truncated gzip stream raises here rather than passing for a parse error)."""
    found: tuple[int | None, str] = (None, "")
    records = 0
    with _open_text(path) as fh:
        for lineno, line in enumerate(fh, start=1):
            if line.startswith("#"):
                continue
            if records == good and found[0] is None:
                found = (lineno, line.rstrip("\r\n"))
            records += 1
    return found
