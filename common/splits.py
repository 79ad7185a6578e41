"""Train / validation / test assignment, made once at import and stored with the cohort.

Two policies:

* stratified: each class is shuffled with a seeded generator and cut by the fractions, with
  largest-remainder rounding, so every split holds each class in proportion (within one
  patient) and a class of three or more members reaches validation and test;
* group: whole groups (gene locus, family, contributing centre) go to one split, so related
  records never straddle splits; groups are dealt greedily, largest first, to the split whose
  class mix lies furthest below its target.

Both are deterministic for a given seed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from common.spec import SPLIT_NAMES

DEFAULT_FRACTIONS = (0.70, 0.15, 0.15)


def assign_splits(labels: np.ndarray, *, fractions: Sequence[float] = DEFAULT_FRACTIONS, seed: int = 0,
                  groups: np.ndarray | None = None) -> np.ndarray:
    """Split codes (int8: 0 train, 1 validation, 2 test) for each row of ``labels``.

    Parameters
    ----------
    labels
        One class label per patient (any comparable values).
    fractions
        Train, validation and test shares; non-negative, summing to 1.
    seed
        Seed of the generator that orders patients (or groups); same seed, same split.
    groups
        Optional group per patient; when given, every group lands in exactly one split.

    Raises
    ------
    ValueError
        If the fractions are not three non-negative shares summing to 1, or the lengths differ.
    """
    labels = np.asarray(labels)
    shares = _check_fractions(fractions)
    rng = np.random.default_rng(seed)
    if groups is None:
        return _stratified(labels, shares, rng)
    groups = np.asarray(groups)
    if groups.shape[0] != labels.shape[0]:
        raise ValueError(f"groups has {groups.shape[0]} entries but labels has {labels.shape[0]}")
    return _grouped(labels, groups, shares, rng)


def _check_fractions(fractions: Sequence[float]) -> np.ndarray:
    shares = np.asarray(fractions, dtype=np.float64)
    if shares.shape != (len(SPLIT_NAMES),) or (shares < 0).any() or abs(shares.sum() - 1.0) > 1e-9:
        raise ValueError(f"fractions must be {len(SPLIT_NAMES)} non-negative shares summing to 1, got {fractions!r}")
    return shares


def apportion(n: int, shares: np.ndarray, deficit: np.ndarray | None = None) -> np.ndarray:
    """Whole counts per split summing to ``n``: largest remainder, then at least one per split.

    Ties in the remainder go to the split with the larger ``deficit`` (how far it lags its
    target over the classes cut so far), so rounding does not favour one split across classes.
    Each split with a positive share gets at least one member when ``n`` allows it.
    """
    quotas = n * shares
    counts = np.floor(quotas + 1e-9).astype(np.int64)
    remainders = np.round(quotas - counts, 9)
    deficit = np.zeros_like(shares) if deficit is None else deficit
    order = sorted(range(len(shares)), key=lambda s: (-remainders[s], -deficit[s], s))
    for s in order[: n - int(counts.sum())]:
        counts[s] += 1
    wanted = shares > 0
    if n >= int(wanted.sum()):
        for s in np.flatnonzero(wanted & (counts == 0)):
            counts[int(np.argmax(counts))] -= 1
            counts[s] += 1
    return counts


def _stratified(labels: np.ndarray, shares: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    split = np.zeros(labels.shape[0], dtype=np.int8)
    target, assigned = np.zeros_like(shares), np.zeros_like(shares)
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        target += members.size * shares
        counts = apportion(members.size, shares, deficit=target - assigned)
        assigned += counts
        for code, chunk in enumerate(np.split(members, np.cumsum(counts)[:-1])):
            split[chunk] = code
    return split


def _grouped(labels: np.ndarray, groups: np.ndarray, shares: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    group_names, group_of = np.unique(groups, return_inverse=True)
    _, class_of = np.unique(labels, return_inverse=True)
    mix = np.zeros((group_names.size, class_of.max(initial=-1) + 1))
    np.add.at(mix, (group_of, class_of), 1)
    target = shares[:, None] * mix.sum(axis=0)[None, :]
    filled = np.zeros_like(target)
    chosen = np.zeros(group_names.size, dtype=np.int8)
    # A seeded shuffle breaks ties between equal sizes; big groups go first so small ones can even out.
    order = rng.permutation(group_names.size)
    order = order[np.argsort(-mix.sum(axis=1)[order], kind="stable")]
    for g in order:
        s = _neediest_split(mix[g], filled, target, shares)
        chosen[g] = s
        filled[s] += mix[g]
    return chosen[group_of]


def _neediest_split(mix: np.ndarray, filled: np.ndarray, target: np.ndarray, shares: np.ndarray) -> int:
    """Split furthest below its target: the mean of its fill (share of target reached) over this
    group's classes and its fill over all patients. The class term keeps splits stratified; the
    overall term keeps them sized, so three or more groups reach all three splits."""
    present = mix > 0
    weights = mix[present] / mix[present].sum()
    fill = np.full(shares.size, np.inf)
    for s in np.flatnonzero(shares > 0):
        by_class = float((filled[s, present] / target[s, present]) @ weights)
        overall = filled[s].sum() / target[s].sum()
        fill[s] = (by_class + overall) / 2
    return int(np.argmin(fill))
