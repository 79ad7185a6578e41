"""Property tests of the DNA and dosage encoders."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from common.encoders import (
    DNA_ALPHABET,
    IUPAC_AMBIGUITY,
    N_CODE,
    SequenceEncodingError,
    decode_dna,
    dosage_track,
    encode_dna,
    encode_sequence,
    one_hot,
    reverse_complement,
)

ACGT = st.text(alphabet="ACGT", min_size=1, max_size=60)
DNA_WITH_AMBIGUITY = st.text(alphabet="ACGTacgt" + "".join(sorted(IUPAC_AMBIGUITY)), min_size=1, max_size=60)
NOT_DNA = st.characters(blacklist_characters="ACGTacgt" + "".join(IUPAC_AMBIGUITY)
                        + "".join(sorted(IUPAC_AMBIGUITY)).lower())


def batch(length: int, size: int = 4) -> st.SearchStrategy[list[str]]:
    return st.lists(st.text(alphabet="ACGTN", min_size=length, max_size=length), min_size=1, max_size=size)


@given(ACGT)
def test_encode_decode_round_trip(seq: str) -> None:
    codes, ambiguous = encode_sequence(seq, len(seq))
    assert not ambiguous
    assert decode_dna(codes[None, :]) == [seq]


@given(st.lists(ACGT, min_size=1, max_size=5).flatmap(
    lambda seqs: st.lists(st.text(alphabet="ACGT", min_size=len(seqs[0]), max_size=len(seqs[0])),
                          min_size=1, max_size=5)))
def test_encode_dna_batch_round_trip(seqs: list[str]) -> None:
    encoded = encode_dna(seqs, len(seqs[0]))
    assert encoded.codes.dtype == np.uint8 and encoded.codes.shape == (len(seqs), len(seqs[0]))
    assert decode_dna(encoded.codes) == seqs
    assert encoded.sequences_with_ambiguity == 0


@given(DNA_WITH_AMBIGUITY)
def test_ambiguity_codes_become_n_and_are_counted(seq: str) -> None:
    codes, ambiguous = encode_sequence(seq, len(seq))
    upper = seq.upper()
    expected = Counter(c for c in upper if c in IUPAC_AMBIGUITY)
    assert ambiguous == expected
    assert decode_dna(codes[None, :])[0] == "".join(c if c in "ACGT" else "N" for c in upper)


@given(st.lists(DNA_WITH_AMBIGUITY, min_size=1, max_size=6))
def test_batch_ambiguity_totals(seqs: list[str]) -> None:
    length = len(seqs[0])
    seqs = [(s * length)[:length] for s in seqs]
    encoded = encode_dna(seqs, length)
    per_seq = [Counter(c for c in s.upper() if c in IUPAC_AMBIGUITY) for s in seqs]
    assert encoded.ambiguity_counts == sum(per_seq, Counter())
    assert encoded.sequences_with_ambiguity == sum(1 for c in per_seq if c)


@given(batch(12))
def test_one_hot_rows_sum_to_one_for_bases_and_zero_for_n(seqs: list[str]) -> None:
    codes = encode_dna(seqs, 12).codes
    hot = one_hot(codes)
    assert hot.shape == (len(seqs), 4, 12)
    sums = hot.sum(axis=1)
    assert np.array_equal(sums, (codes != N_CODE).astype(np.float32))
    is_base = codes != N_CODE
    assert np.array_equal(hot.argmax(axis=1)[is_base], codes[is_base])


@given(batch(15))
def test_reverse_complement_is_an_involution(seqs: list[str]) -> None:
    codes = encode_dna(seqs, 15).codes
    assert np.array_equal(reverse_complement(reverse_complement(codes)), codes)


@given(batch(9))
def test_reverse_complement_maps_one_hot_consistently(seqs: list[str]) -> None:
    codes = encode_dna(seqs, 9).codes
    # The other strand in one-hot is the channel order reversed (A<->T, C<->G) and positions reversed.
    assert np.array_equal(one_hot(reverse_complement(codes)), one_hot(codes)[:, ::-1, ::-1])
    complement = {"A": "T", "C": "G", "G": "C", "T": "A", "N": "N"}
    expected = ["".join(complement[c] for c in reversed(s)) for s in decode_dna(codes)]
    assert decode_dna(reverse_complement(codes)) == expected


@given(st.integers(1, 20).flatmap(lambda m: st.lists(st.lists(st.integers(-1, 2), min_size=m, max_size=m),
                                                     min_size=1, max_size=6)))
def test_dosage_track_preserves_dosage_and_missing(rows: list[list[int]]) -> None:
    dosages = np.array(rows, dtype=np.int8)
    track = dosage_track(dosages)
    assert track.shape == (dosages.shape[0], 2, dosages.shape[1])
    observed = dosages >= 0
    assert np.array_equal(track[:, 1], observed.astype(np.float32))
    assert np.array_equal(track[:, 0][observed] * 2, dosages[observed].astype(np.float32))
    assert (track[:, 0][~observed] == 0).all()


@given(ACGT, st.integers(1, 80))
def test_encode_rejects_wrong_length(seq: str, length: int) -> None:
    assume(len(seq) != length)
    with pytest.raises(SequenceEncodingError, match=f"length {len(seq)}, expected {length}") as info:
        encode_sequence(seq, length)
    assert info.value.position is None


@settings(max_examples=200)
@given(ACGT, NOT_DNA, st.data())
def test_encode_rejects_non_dna_symbol_with_its_position(seq: str, bad: str, data: st.DataObject) -> None:
    pos = data.draw(st.integers(0, len(seq) - 1))
    broken = seq[:pos] + bad + seq[pos + 1:]
    with pytest.raises(SequenceEncodingError, match=f"at position {pos + 1}") as info:
        encode_sequence(broken, len(broken))
    assert info.value.position == pos
    assert repr(bad) in str(info.value)


@given(st.lists(ACGT, min_size=2, max_size=5), st.data())
def test_encode_dna_reports_which_sequence(seqs: list[str], data: st.DataObject) -> None:
    length = len(seqs[0])
    seqs = [(s * length)[:length] for s in seqs]
    bad = data.draw(st.integers(0, len(seqs) - 1))
    seqs[bad] = "X" + seqs[bad][1:]
    with pytest.raises(SequenceEncodingError) as info:
        encode_dna(seqs, length)
    assert info.value.index == bad and info.value.position == 0


def test_alphabet_constants() -> None:
    assert DNA_ALPHABET == "ACGTN" and DNA_ALPHABET[N_CODE] == "N"
    assert encode_dna([], 5).codes.shape == (0, 5)
