"""Model inputs from a site's cohort: genomic tracks for the deep model, tables for the forest.

Tracks
    ``dna``      one-hot (4, L) of the sequences (N is all zeros)
    ``dosage``   (2, m) genotype dosages scaled to [0, 1] plus an observed mask, in position order
Tabular blocks (numeric, NaN = missing), in a fixed order so every site builds the same columns
    ``variants`` dosages 0/1/2, ``omics``, ``clinical`` numeric fields, ``events`` flags;
    clinical categorical fields are kept as codes (-1 missing) for one-hot encoding.
Sequence-derived features (for the forest, so a sequence-only cohort still has one)
    k-mer counts (both strands summed, so the features do not depend on orientation) and, for
    short sequences, positional one-hot.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from common.cohort import Cohort
from common.encoders import dosage_track, one_hot, reverse_complement
from common.models import TrackShape
from common.tabular import KMER, POSITIONAL_MAX_LENGTH


@dataclass
class TabularFrame:
    """Numeric columns (NaN missing) and categorical codes (-1 missing) with their names."""

    numeric: np.ndarray
    numeric_names: list[str]
    blocks: dict[str, slice]
    categorical: np.ndarray
    categorical_names: list[str]
    categories: dict[str, tuple[str, ...]]

    def rows(self, mask: np.ndarray) -> TabularFrame:
        """The same frame restricted to some patients."""
        return TabularFrame(self.numeric[mask], self.numeric_names, self.blocks, self.categorical[mask],
                            self.categorical_names, self.categories)

    @property
    def width(self) -> int:
        return self.numeric.shape[1] + self.categorical.shape[1]


def deep_tracks(cohort: Cohort) -> tuple[list[np.ndarray], tuple[TrackShape, ...]]:
    """The deep model's tracks for every patient, and their shapes (for the model config)."""
    arrays, shapes = [], []
    if cohort.sequences is not None:
        arrays.append(one_hot(cohort.sequences))
        shapes.append(TrackShape("dna", 4, int(cohort.sequences.shape[1])))
    if cohort.variants is not None:
        arrays.append(dosage_track(cohort.variants.values))
        shapes.append(TrackShape("dosage", 2, int(cohort.variants.values.shape[1]), positional=True))
    return arrays, tuple(shapes)


def tabular_frame(cohort: Cohort) -> TabularFrame:
    """All tabular features of the cohort, numeric and categorical, in the canonical order."""
    parts, names, blocks, start = [], [], {}, 0
    if cohort.variants is not None:
        d = cohort.variants.values.astype(np.float64)
        parts.append(np.where(d < 0, np.nan, d))
        names += [f"variant:{f}" for f in cohort.variants.features]
    for kind in ("omics", "events"):
        part = getattr(cohort, kind)
        if part is not None:
            parts.append(part.values.astype(np.float64))
            names += [f"{kind}:{f}" for f in part.features]
    if cohort.clinical is not None:
        parts.append(cohort.clinical.numeric.astype(np.float64))
        names += [f"clinical:{f}" for f in cohort.clinical.numeric_names]
    for kind, count in _block_sizes(cohort):
        blocks[kind] = slice(start, start + count)
        start += count
    numeric = np.hstack(parts) if parts else np.zeros((cohort.n, 0))
    if cohort.clinical is not None and cohort.clinical.categorical_names:
        cat = cohort.clinical.categorical.astype(np.int64)
        cat_names = [f"clinical:{f}" for f in cohort.clinical.categorical_names]
        categories = {f"clinical:{k}": v for k, v in cohort.clinical.categories.items()}
    else:
        cat, cat_names, categories = np.zeros((cohort.n, 0), dtype=np.int64), [], {}
    return TabularFrame(numeric, names, blocks, cat, cat_names, categories)


def _block_sizes(cohort: Cohort) -> list[tuple[str, int]]:
    sizes = []
    if cohort.variants is not None:
        sizes.append(("variants", len(cohort.variants.features)))
    for kind in ("omics", "events"):
        part = getattr(cohort, kind)
        if part is not None:
            sizes.append((kind, len(part.features)))
    if cohort.clinical is not None:
        sizes.append(("clinical", len(cohort.clinical.numeric_names)))
    return sizes


def kmer_names(k: int) -> list[str]:
    """All k-mers over ACGT in lexicographic order."""
    return ["".join(p) for p in itertools.product("ACGT", repeat=k)]


def kmer_counts(codes: np.ndarray, k: int = KMER) -> np.ndarray:
    """(n, 4**k) counts of each k-mer on both strands; windows containing N are skipped."""
    codes = np.asarray(codes, dtype=np.int64)
    out = np.zeros((codes.shape[0], 4**k), dtype=np.float64)
    for strand in (codes, reverse_complement(codes.astype(np.uint8)).astype(np.int64)):
        windows = np.lib.stride_tricks.sliding_window_view(strand, k, axis=1)
        valid = (windows < 4).all(axis=2)
        index = (windows * (4 ** np.arange(k - 1, -1, -1))).sum(axis=2)
        rows = np.broadcast_to(np.arange(codes.shape[0])[:, None], index.shape)
        np.add.at(out, (rows[valid], index[valid]), 1.0)
    return out


def sequence_features(codes: np.ndarray, *, k: int = KMER) -> tuple[np.ndarray, list[str]]:
    """k-mer counts, plus positional one-hot when sequences are short enough to make it useful."""
    values, names = [kmer_counts(codes, k)], [f"kmer:{m}" for m in kmer_names(k)]
    length = codes.shape[1]
    if length <= POSITIONAL_MAX_LENGTH:
        values.append(one_hot(codes, dtype=np.float64).transpose(0, 2, 1).reshape(codes.shape[0], -1))
        names += [f"pos{i + 1}:{b}" for i in range(length) for b in "ACGT"]
    return np.hstack(values), names
