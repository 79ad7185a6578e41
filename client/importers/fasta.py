"""FASTA reading and the sequence checks shared by FASTA and sequences-in-a-column.

A record's id is the first word of its ``>`` header line and must be a patient id. Sequence
lines may wrap; blank lines are ignored. Encoding goes through ``common.encoders`` so that
IUPAC ambiguity codes become N and are counted, and anything else is reported with the exact
line and position.
"""

from __future__ import annotations

import bisect
import gzip
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from client.importers.problems import ProblemLog, match_ids
from common.encoders import SequenceEncodingError, encode_sequence


@dataclass
class SequenceRecord:
    """One sequence and where it came from.

    ``lines`` maps the sequence onto the file: ``(line number, offset in the sequence where
    that line's text starts)``, so a bad symbol can be reported on its own line.
    """

    id: str
    sequence: str
    location: str
    field: str | None
    lines: list[tuple[int, int]] = field(default_factory=list)
    empty_message: str = "empty record: no sequence lines after the header"
    id_field: str | None = None
    unit: str = "record"

    def line_of(self, position: int) -> str:
        """``line N`` holding 0-based ``position`` of the sequence."""
        offsets = [off for _, off in self.lines]
        i = max(0, bisect.bisect_right(offsets, position) - 1)
        return f"line {self.lines[i][0]}" if self.lines else self.location


@dataclass
class SequencesResult:
    """Codes (n, L) aligned to the cohort's patients, and what was turned into N."""

    codes: np.ndarray
    report: dict


def _open_text(path: Path):
    """Text handle for a plain or gzip-compressed file (by its magic bytes, not its name)."""
    with open(path, "rb") as fh:
        magic = fh.read(2)
    if magic == b"\x1f\x8b":
        return gzip.open(path, "rt", encoding="utf-8-sig")
    return open(path, encoding="utf-8-sig")


def read_fasta(path: Path, log: ProblemLog) -> list[SequenceRecord] | None:
    """Records of a FASTA file; None if the file cannot be read (problem logged)."""
    file = str(path)
    try:
        with _open_text(path) as fh:
            records = _parse_fasta(file, fh, log)
    except FileNotFoundError:
        log.add(file, "", None, "file not found (paths in the spec are relative to the spec file)",
                kind="unreadable file")
        return None
    except IsADirectoryError:
        log.add(file, "", None, "is a folder, not a file", kind="unreadable file")
        return None
    except (EOFError, zlib.error, gzip.BadGzipFile):
        log.add(file, "", None, "the compressed file is truncated or corrupt: copy or compress it again",
                kind="unreadable file")
        return None
    except UnicodeDecodeError:
        log.add(file, "", None, "is not text (not UTF-8): a FASTA file is plain text, optionally gzip-compressed",
                kind="unreadable file")
        return None
    except OSError as exc:
        log.add(file, "", None, f"cannot be read: {exc.strerror or exc}", kind="unreadable file")
        return None
    if not records:
        if log.problems_in(file) == 0:
            log.add(file, "", None, "the file is empty: it needs one '>ID' record per patient", kind="empty file")
        return None
    return records


def _parse_fasta(file: str, lines, log: ProblemLog) -> list[SequenceRecord]:
    records: list[SequenceRecord] = []
    current: SequenceRecord | None = None
    chunks: list[str] = []
    stray_reported = False
    for lineno, raw in enumerate(lines, start=1):
        text = raw.strip()
        if not text:
            continue
        if text.startswith(">"):
            _finish(current, chunks, records)
            current, chunks = _start_record(file, text, lineno, log), []
        elif current is None:
            if not stray_reported:
                log.add(file, f"line {lineno}", None, "sequence text before the first '>' header line: every record "
                        "starts with a line '>ID' naming the patient", kind="text before header")
                stray_reported = True
        else:
            current.lines.append((lineno, sum(len(c) for c in chunks)))
            chunks.append(text)
    _finish(current, chunks, records)
    return records


def _start_record(file: str, header: str, lineno: int, log: ProblemLog) -> SequenceRecord:
    words = header[1:].split()
    rid = words[0] if words else ""
    if not rid:
        log.add(file, f"line {lineno}", None, "header line has no id after '>': write '>ID' with the patient id",
                kind="empty id")
    return SequenceRecord(id=rid, sequence="", location=f"line {lineno}", field=f"record {rid!r}")


def _finish(record: SequenceRecord | None, chunks: list[str], records: list[SequenceRecord]) -> None:
    if record is None:
        return
    record.sequence = "".join(chunks)
    if record.id:
        records.append(record)


def encode_records(file: str, records: list[SequenceRecord], patients: tuple[str, ...], length: int,
                   label_file: str, log: ProblemLog) -> SequencesResult | None:
    """Match records to patients, check and encode them; ``length`` comes from the spec."""
    # Same wording as the table readers, so a table used for labels too reports an id problem once.
    source = records[0] if records else SequenceRecord("", "", "", None)
    index = match_ids(file, [r.id for r in records], [r.location for r in records],
                      source.id_field, patients, log, label_file=label_file, what=source.unit)
    encoded: list[np.ndarray] = []
    ambiguity: Counter[str] = Counter()
    with_ambiguity = 0
    for row in index:
        if row < 0:
            continue
        record = records[row]
        if not record.sequence:
            log.add(file, record.location, record.field, record.empty_message, kind="empty sequence")
            continue
        try:
            row_codes, seen = encode_sequence(record.sequence, length)
        except SequenceEncodingError as exc:
            _log_bad_sequence(file, record, exc, length, log)
            continue
        encoded.append(row_codes)
        if seen:
            ambiguity.update(seen)
            with_ambiguity += 1
    if len(encoded) < len(patients):
        return None  # each patient without a usable sequence is a logged problem: the import fails
    # Stacked from sequences that have the spec's length, never allocated from ``length`` alone:
    # a mistyped length (10**12) is then a problem per record, not a failed allocation.
    codes = np.stack(encoded)
    report = {"records": len(records), "length": length,
              "ambiguity_codes": dict(sorted(ambiguity.items())), "sequences_with_ambiguity": with_ambiguity,
              "identical_to_another": _repeats(codes)}
    return SequencesResult(codes=codes, report=report)


def _log_bad_sequence(file: str, record: SequenceRecord, exc: SequenceEncodingError, length: int,
                      log: ProblemLog) -> None:
    if exc.position is None:
        log.add(file, record.location, record.field,
                f"sequence length {len(record.sequence)}, expected {length} (length in [modalities.sequences]): "
                "every sequence must have exactly that length", kind="wrong length")
    else:
        log.add(file, record.line_of(exc.position), record.field,
                f"{exc}: use A, C, G, T or an IUPAC ambiguity code (R, Y, S, W, K, M, B, D, H, V, N)",
                kind="unknown symbol")


def _repeats(codes: np.ndarray) -> int:
    """How many sequences equal an earlier one (a hint of duplicates that may straddle splits)."""
    if codes.shape[0] == 0:
        return 0
    return int(codes.shape[0] - np.unique(codes, axis=0).shape[0])
