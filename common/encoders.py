"""Encoders from raw genomic values to model-ready arrays.

DNA is stored compactly as uint8 codes into ``"ACGTN"`` and expanded to one-hot only when a
model needs it. IUPAC ambiguity codes (R, Y, S, W, K, M, B, D, H, V, N) become N, which one-hot
encodes as an all-zero column: the model sees "unknown base" rather than a guess.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from common.errors import GenofedError

DNA_ALPHABET = "ACGTN"
N_CODE = 4
IUPAC_AMBIGUITY = frozenset("RYSWKMBDHVN")

# Lookup from ASCII byte to code; 255 marks a symbol that is neither a base nor an IUPAC code.
_UNKNOWN = 255
_LUT = np.full(256, _UNKNOWN, dtype=np.uint8)
for _i, _b in enumerate("ACGT"):
    _LUT[ord(_b)] = _i
    _LUT[ord(_b.lower())] = _i
for _b in IUPAC_AMBIGUITY:
    _LUT[ord(_b)] = N_CODE
    _LUT[ord(_b.lower())] = N_CODE
# A <-> T, C <-> G, N stays N.
_COMPLEMENT = np.array([3, 2, 1, 0, 4], dtype=np.uint8)


class SequenceEncodingError(GenofedError, ValueError):
    """A sequence has the wrong length or a symbol that is not DNA.

    ``index`` is the sequence's position in a batch; ``position`` is the 0-based offset of the
    offending symbol within the sequence (None for a length error).
    """

    def __init__(self, index: int, message: str, position: int | None = None) -> None:
        super().__init__(message)
        self.index = index
        self.position = position


@dataclass
class EncodedSequences:
    """Codes for a batch of sequences and what ambiguity codes were turned into N."""

    codes: np.ndarray
    ambiguity_counts: Counter = field(default_factory=Counter)
    sequences_with_ambiguity: int = 0


def encode_sequence(seq: str, length: int) -> tuple[np.ndarray, Counter]:
    """Encode one DNA string to codes; returns the codes and the ambiguity symbols seen.

    Raises
    ------
    SequenceEncodingError
        If ``seq`` is not ``length`` long or holds a symbol outside ACGT and the IUPAC codes.
    """
    raw = np.frombuffer(seq.encode("ascii", errors="replace"), dtype=np.uint8)
    if raw.shape[0] != length:
        raise SequenceEncodingError(0, f"length {raw.shape[0]}, expected {length}")
    codes = _LUT[raw]
    bad = np.flatnonzero(codes == _UNKNOWN)
    if bad.size:
        pos = int(bad[0])
        raise SequenceEncodingError(0, f"unknown symbol {seq[pos]!r} at position {pos + 1}", pos)
    ambiguous = Counter()
    if (codes == N_CODE).any():
        ambiguous.update(seq[i].upper() for i in np.flatnonzero(codes == N_CODE))
    return codes, ambiguous


def encode_dna(sequences: Iterable[str], length: int) -> EncodedSequences:
    """Encode fixed-length DNA strings to a (n, length) uint8 code matrix.

    Raises
    ------
    SequenceEncodingError
        For the first bad sequence; ``.index`` is its position in ``sequences``.
    """
    rows, total, with_amb = [], Counter(), 0
    for i, seq in enumerate(sequences):
        try:
            codes, amb = encode_sequence(seq, length)
        except SequenceEncodingError as exc:
            raise SequenceEncodingError(i, str(exc), exc.position) from None
        rows.append(codes)
        if amb:
            total.update(amb)
            with_amb += 1
    codes = np.stack(rows) if rows else np.zeros((0, length), dtype=np.uint8)
    return EncodedSequences(codes=codes, ambiguity_counts=total, sequences_with_ambiguity=with_amb)


def decode_dna(codes: np.ndarray) -> list[str]:
    """Codes back to strings (ambiguity codes come back as N)."""
    letters = np.frombuffer(DNA_ALPHABET.encode("ascii"), dtype=np.uint8)
    return [letters[row].tobytes().decode("ascii") for row in np.asarray(codes, dtype=np.uint8)]


def one_hot(codes: np.ndarray, *, dtype: type = np.float32) -> np.ndarray:
    """(n, L) codes to (n, 4, L) one-hot channels in A, C, G, T order; N is all zeros."""
    codes = np.asarray(codes)
    eye = np.vstack([np.eye(4, dtype=dtype), np.zeros((1, 4), dtype=dtype)])
    return np.ascontiguousarray(eye[codes].transpose(0, 2, 1))


def reverse_complement(codes: np.ndarray) -> np.ndarray:
    """Reverse complement of (n, L) codes (the other strand, read 5' to 3')."""
    return _COMPLEMENT[np.asarray(codes)][:, ::-1].copy()


def dosage_track(dosages: np.ndarray, *, dtype: type = np.float32) -> np.ndarray:
    """(n, m) dosages 0/1/2 (-1 missing) to a (n, 2, m) track: scaled dosage and an observed mask.

    Missing genotypes get dosage 0 and mask 0, so a convolution can tell "reference" from
    "not called".
    """
    d = np.asarray(dosages)
    observed = d >= 0
    scaled = np.where(observed, d, 0).astype(dtype) / dtype(2.0)
    return np.stack([scaled, observed.astype(dtype)], axis=1)
