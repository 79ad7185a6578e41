"""The explanation summaries' shared layout: k-mer keys, position bins, and reading motifs back.

Sites release, per explained output, the clipped sum of their patients' attributions for every
(k-mer, position bin) key (:func:`client.explain.motif_sums`); the coordinator reads the top
motifs from the summed, noised array with :func:`top_motifs`. Both sides agree on the layout here:
a k-mer's key is its base-4 code in A, C, G, T order; with ``canonical`` (sequences whose
orientation carries no meaning) a k-mer and its reverse complement share the smaller key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

BASES = "ACGT"


@dataclass(frozen=True)
class MotifLayout:
    """k-mer length, position bins over a track of ``length`` positions, and orientation."""

    k: int
    bins: int
    length: int
    canonical: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.k <= 10:
            raise ValueError(f"motif k-mer length must be 1-10, got {self.k}")
        if self.bins < 1 or self.length < self.k:
            raise ValueError(f"need at least one bin and a track of at least k={self.k} positions")

    @property
    def n_kmers(self) -> int:
        return 4**self.k

    @property
    def shape(self) -> tuple[int, int]:
        """(k-mer keys, position bins) per explained output."""
        return self.n_kmers, self.bins

    def bin_of(self, start: np.ndarray) -> np.ndarray:
        """The position bin of each k-mer start."""
        return np.minimum(np.asarray(start) * self.bins // (self.length - self.k + 1), self.bins - 1)

    def bin_range(self, b: int) -> tuple[int, int]:
        """First and last k-mer start (0-based) of position bin ``b``."""
        starts = np.arange(self.length - self.k + 1)
        inside = starts[self.bin_of(starts) == b]
        return int(inside[0]), int(inside[-1])


def kmer_codes(codes: np.ndarray, layout: MotifLayout) -> tuple[np.ndarray, np.ndarray]:
    """Keys of the k-mer starting at each position of ``(n, L)`` base codes (A0 C1 G2 T3, N4),
    shape ``(n, L - k + 1)``, and whether each is whole (no N in it)."""
    codes = np.asarray(codes, dtype=np.int64)
    windows = np.lib.stride_tricks.sliding_window_view(codes, layout.k, axis=1)
    whole = (windows < 4).all(axis=2)
    keys = (np.where(windows < 4, windows, 0) * (4 ** np.arange(layout.k - 1, -1, -1))).sum(axis=2)
    if layout.canonical:
        keys = np.minimum(keys, reverse_complement_key(keys, layout.k))
    return keys, whole


def reverse_complement_key(keys: np.ndarray, k: int) -> np.ndarray:
    """The key of each k-mer's reverse complement."""
    keys = np.asarray(keys, dtype=np.int64)
    out = np.zeros_like(keys)
    for _ in range(k):
        out = out * 4 + (3 - keys % 4)
        keys = keys // 4
    return out


def kmer_string(key: int, k: int) -> str:
    """The k-mer of a key."""
    return "".join(BASES[(int(key) // 4 ** (k - 1 - i)) % 4] for i in range(k))


def top_motifs(sums: np.ndarray, layout: MotifLayout, *, n_patients: int, top: int = 10,
               output_names: list[str] | None = None) -> list[dict[str, Any]]:
    """The strongest motifs in summed motif attributions ``(outputs, n_kmers, bins)``.

    A motif's score is its attribution summed over position bins, per patient (``n_patients``:
    the records the sums cover); it is reported at the bin where most of that attribution sits.
    For a binary model the one output is class 1's log-odds: positive scores raise the risk,
    negative ones lower it; motifs are ranked by the size of their score.
    """
    sums = np.asarray(sums, dtype=np.float64)
    names = output_names or [f"output {i}" for i in range(sums.shape[0])]
    found = []
    for o, per_key in enumerate(sums):
        score = per_key.sum(axis=1) / max(n_patients, 1)
        for key in np.argsort(-np.abs(score), kind="stable")[:top]:
            b = int(np.argmax(np.abs(per_key[key])))
            first, last = layout.bin_range(b)
            found.append({"output": names[o], "kmer": kmer_string(int(key), layout.k), "score": float(score[key]),
                          "positions": [first, last + layout.k - 1], "bin": b})
    return found
