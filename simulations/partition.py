"""Partitioners: which site each patient goes to.

Pure functions on label arrays (any hashable labels: strings or integers), returning an
``int`` array of site indices ``0 .. n_sites - 1``, one per patient. Every partitioner checks its
result with :func:`check_partition` and refuses, with a one-line :class:`PartitionError`, to
produce a site with a single class or fewer than ``min_size`` patients: such a site cannot train
or evaluate a classifier and would only fail later, further from the cause.

=============  ===================================================================================
``iid``        stratified: every class is shuffled and dealt round-robin, so sites have the same
               size (to one patient) and the same class mix
``dirichlet``  label skew: each class is divided among the sites in proportions drawn from
               ``Dirichlet(alpha)``; small ``alpha`` gives very different class mixes
``quantity``   quantity skew: site sizes drawn from ``Dirichlet(alpha)`` (small ``alpha``: a few
               large hospitals and many small ones); the class mix stays the same everywhere
``column``     natural groups: one site per distinct value of a column (centre, locus, ...)
=============  ===================================================================================

Random partitioners that draw an infeasible partition retry with derived seeds a bounded number
of times (``max_tries``) and then give up with a message saying what to change.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from common.errors import GenofedError

MIN_SITE_SIZE = 10
MAX_TRIES = 200
METHODS = ("iid", "dirichlet", "quantity", "column")


class PartitionError(GenofedError, ValueError):
    """A partition cannot be made as asked (a site would be too small or hold one class)."""


def _encode(labels: Sequence[Any] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise PartitionError(f"labels must be a 1-d array, got shape {arr.shape}")
    if arr.size == 0:
        raise PartitionError("no patients to partition")
    classes, codes = np.unique(arr, return_inverse=True)
    return classes, codes.astype(np.int64)


def _check_sites_arg(n: int, n_sites: int, min_size: int) -> None:
    if n_sites < 1:
        raise PartitionError(f"the number of sites must be at least 1, got {n_sites}")
    if n < n_sites * min_size:
        raise PartitionError(f"{n} patients cannot fill {n_sites} sites of at least {min_size} patients; "
                             f"use at most {max(1, n // min_size)} sites")


def check_partition(labels: Sequence[Any] | np.ndarray, sites: np.ndarray, n_sites: int, *,
                    min_size: int = MIN_SITE_SIZE, names: Sequence[str] | None = None) -> None:
    """Raise :class:`PartitionError` unless every site has ``min_size`` patients and two classes.

    ``names`` (one per site) are used in the message; sites are called ``site-1..`` otherwise.
    """
    classes, codes = _encode(labels)
    sites = np.asarray(sites)
    if sites.shape != codes.shape:
        raise PartitionError(f"assignment has {sites.size} entries for {codes.size} patients")
    if sites.size and (sites.min() < 0 or sites.max() >= n_sites):
        raise PartitionError(f"assignment holds a site index outside 0..{n_sites - 1}")
    for s in range(n_sites):
        name = names[s] if names is not None else f"site-{s + 1}"
        mask = sites == s
        size = int(mask.sum())
        if size < min_size:
            raise PartitionError(f"{name} would hold {size} patients (fewer than {min_size})")
        present = np.unique(codes[mask])
        if present.size < 2:
            raise PartitionError(f"{name} would hold a single class ({classes[present[0]]!s}, {size} patients); "
                                 "a site needs at least two classes to train and evaluate")


def _deal(order: np.ndarray, n_sites: int, start: int) -> np.ndarray:
    return (np.arange(order.size) + start) % n_sites


def iid(labels: Sequence[Any] | np.ndarray, n_sites: int, *, seed: int = 0,
        min_size: int = MIN_SITE_SIZE) -> np.ndarray:
    """Stratified random partition: each class shuffled and dealt round-robin over the sites."""
    classes, codes = _encode(labels)
    _check_sites_arg(codes.size, n_sites, min_size)
    rng = np.random.default_rng(seed)
    sites = np.empty(codes.size, dtype=np.int64)
    offset = 0
    for c in range(classes.size):
        idx = np.flatnonzero(codes == c)
        rng.shuffle(idx)
        # Continue the deal where the previous class stopped, so site sizes differ by at most one.
        sites[idx] = _deal(idx, n_sites, offset)
        offset = (offset + idx.size) % n_sites
    check_partition(codes, sites, n_sites, min_size=min_size)
    return sites


def _split_counts(total: int, proportions: np.ndarray) -> np.ndarray:
    """Integer counts summing to ``total``, proportional to ``proportions`` (largest remainder)."""
    raw = proportions * total
    counts = np.floor(raw).astype(np.int64)
    short = total - int(counts.sum())
    if short > 0:
        order = np.argsort(-(raw - counts), kind="stable")
        counts[order[:short]] += 1
    return counts


def _derived_seeds(seed: int, max_tries: int):
    for attempt in range(max_tries):
        yield attempt, np.random.default_rng([seed, attempt])


def dirichlet(labels: Sequence[Any] | np.ndarray, n_sites: int, *, alpha: float, seed: int = 0,
              min_size: int = MIN_SITE_SIZE, max_tries: int = MAX_TRIES) -> np.ndarray:
    """Label-skewed partition: class ``c`` is divided over sites in ``Dirichlet(alpha)`` proportions.

    Draws that leave a site too small or with one class are retried with derived seeds, up to
    ``max_tries`` times; the first feasible draw is returned, so the result is deterministic.
    """
    if not alpha > 0 or not np.isfinite(alpha):
        raise PartitionError(f"--alpha must be a positive number, got {alpha}")
    classes, codes = _encode(labels)
    _check_sites_arg(codes.size, n_sites, min_size)
    if classes.size < 2:
        raise PartitionError(f"all patients have the class {classes[0]!s}; every site needs two classes")
    last = ""
    for _, rng in _derived_seeds(seed, max_tries):
        sites = np.empty(codes.size, dtype=np.int64)
        for c in range(classes.size):
            idx = np.flatnonzero(codes == c)
            rng.shuffle(idx)
            counts = _split_counts(idx.size, rng.dirichlet(np.full(n_sites, alpha)))
            sites[idx] = np.repeat(np.arange(n_sites), counts)
        try:
            check_partition(codes, sites, n_sites, min_size=min_size)
        except PartitionError as exc:
            last = str(exc)
            continue
        return sites
    raise PartitionError(f"no Dirichlet(alpha={alpha:g}) label split over {n_sites} sites worked in {max_tries} "
                         f"draws (last: {last}); use a larger --alpha or fewer --sites")


def quantity(labels: Sequence[Any] | np.ndarray, n_sites: int, *, alpha: float = 1.0, seed: int = 0,
             min_size: int = MIN_SITE_SIZE, max_tries: int = MAX_TRIES) -> np.ndarray:
    """Quantity-skewed partition: site sizes from ``Dirichlet(alpha)``, class mix kept stratified.

    Each site first gets ``min_size`` patients' worth of room; the rest is shared in Dirichlet
    proportions, and every class is divided in those same proportions.
    """
    if not alpha > 0 or not np.isfinite(alpha):
        raise PartitionError(f"--alpha must be a positive number, got {alpha}")
    classes, codes = _encode(labels)
    n = codes.size
    _check_sites_arg(n, n_sites, min_size)
    last = ""
    for _, rng in _derived_seeds(seed, max_tries):
        share = rng.dirichlet(np.full(n_sites, alpha))
        floor = min_size / n
        proportions = floor + share * (1.0 - floor * n_sites)
        sites = np.empty(n, dtype=np.int64)
        for c in range(classes.size):
            idx = np.flatnonzero(codes == c)
            rng.shuffle(idx)
            counts = _split_counts(idx.size, proportions)
            sites[idx] = np.repeat(np.arange(n_sites), counts)
        try:
            check_partition(codes, sites, n_sites, min_size=min_size)
        except PartitionError as exc:
            last = str(exc)
            continue
        return sites
    raise PartitionError(f"no quantity-skewed split (alpha={alpha:g}) over {n_sites} sites worked in {max_tries} "
                         f"draws (last: {last}); use a larger --alpha or fewer --sites")


def column(labels: Sequence[Any] | np.ndarray, groups: Sequence[Any] | np.ndarray, *,
           min_size: int = MIN_SITE_SIZE) -> tuple[np.ndarray, list[str]]:
    """Natural groups: one site per distinct value of ``groups`` (sorted), named by that value.

    Returns ``(sites, names)``. Missing group values (empty, ``None`` or NaN) are refused.
    """
    _, codes = _encode(labels)
    g = np.asarray(groups, dtype=object)
    if g.shape != codes.shape:
        raise PartitionError(f"group column has {g.size} values for {codes.size} patients")
    missing = [i for i, v in enumerate(g) if v is None or (isinstance(v, float) and np.isnan(v)) or str(v) == ""]
    if missing:
        raise PartitionError(f"{len(missing)} patients have no value in the group column (first: row {missing[0]}); "
                             "give every patient a group or drop them first")
    text = np.asarray([str(v) for v in g])
    names, sites = np.unique(text, return_inverse=True)
    names_list = [str(n) for n in names]
    check_partition(codes, sites, len(names_list), min_size=min_size, names=names_list)
    return sites.astype(np.int64), names_list


def label_skew(labels: Sequence[Any] | np.ndarray, sites: np.ndarray, n_sites: int) -> float:
    """Mean total-variation distance between each site's class mix and the overall class mix.

    0 for a perfectly stratified partition; grows towards 1 as sites specialise in classes.
    """
    classes, codes = _encode(labels)
    overall = np.bincount(codes, minlength=classes.size) / codes.size
    tv = []
    for s in range(n_sites):
        mask = np.asarray(sites) == s
        if not mask.any():
            continue
        local = np.bincount(codes[mask], minlength=classes.size) / mask.sum()
        tv.append(0.5 * np.abs(local - overall).sum())
    return float(np.mean(tv))


def class_counts(labels: Sequence[Any] | np.ndarray, sites: np.ndarray, n_sites: int) -> list[dict[str, int]]:
    """Per site, the number of patients of each class (classes absent from a site are listed as 0)."""
    classes, codes = _encode(labels)
    out = []
    for s in range(n_sites):
        mask = np.asarray(sites) == s
        out.append({str(c): int((codes[mask] == i).sum()) for i, c in enumerate(classes)})
    return out
