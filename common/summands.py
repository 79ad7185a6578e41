"""What of each additive reply is summed, in one vector, for the secure sum (common/secure_sum.py).

Every reply the coordinator only ever adds up can reach it as a masked sum: the moments of the
shared preprocessing, the deep model's weights (weighted by the site's examples: FedAvg's
numerator), the GLM's and the meta-classifier's Newton terms, the explanation summaries. A site turns its reply's array
record into *summands* (:func:`summands`), flattens them in the order of :func:`layout`, and
the coordinator unflattens the sum (:func:`unflatten`). Per-site figures that were plain metrics
beside the arrays (a round's loss) move into the sum; counts the census already published stay
plain.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

SUMMED_RECORD = {"query.moments": "moments", "train": "arrays", "train.glm": "terms", "train.meta": "terms",
                 "query.explain": "summary", "query.validation": "stats", "evaluate": "stats"}
"""The record of a reply that is summed, by message type (the other records stay plain)."""
MOVED_METRICS = {"train": ("train-loss",), "train.glm": ("loss",), "train.meta": ("loss",)}
"""Per-site metrics that join the sum (prefixed ``metric.``); the rest of a secure reply's metrics
is counts and public settings (examples, epsilon, noise multiplier)."""
DROPPED_METRICS = {"train": ("val-loss",)}
"""Per-site metrics a secure reply leaves out (not summable: missing at a site without validation)."""
WEIGHTED = {"train": "num-examples"}
"""Message types whose arrays are summed times a count (FedAvg's numerator)."""
COUNTED = ("query.validation", "evaluate")
"""Message types whose integer arrays are summed too (statistics: histograms and counts). Elsewhere
integer arrays are bookkeeping (a batch-norm step counter) and stay out."""


def summed_record(message_type: str) -> str | None:
    """The record summed in a reply to ``message_type`` (None: the reply is not additive)."""
    return SUMMED_RECORD.get(message_type)


def summands(message_type: str, arrays: Mapping[str, np.ndarray], metrics: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The float64 arrays a site adds to the sum for its reply (integer arrays stay out unless the
    message type is :data:`COUNTED`)."""
    weight = float(metrics[WEIGHTED[message_type]]) if message_type in WEIGHTED else 1.0
    counted = message_type in COUNTED
    out = {k: np.asarray(v, dtype=np.float64) * weight for k, v in arrays.items()
           if counted or np.issubdtype(np.asarray(v).dtype, np.floating)}
    if "local_coef" in arrays:  # the warm start's Hessian-weighted combination, as sums
        out["local_hess_coef"] = np.asarray(arrays["local_hess"], dtype=np.float64) @ np.asarray(arrays["local_coef"])
    for name in MOVED_METRICS.get(message_type, ()):
        if name in metrics:
            out[f"metric.{name}"] = np.array([float(metrics[name]) * weight])
    return out


def plain_metrics(message_type: str, metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The metrics a secure reply still sends as they are."""
    gone = set(MOVED_METRICS.get(message_type, ())) | set(DROPPED_METRICS.get(message_type, ()))
    return {k: v for k, v in metrics.items() if k not in gone}


def layout(values: Mapping[str, np.ndarray]) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes in the order the flat vector holds them (sorted by name)."""
    return [(k, tuple(int(d) for d in np.shape(values[k]))) for k in sorted(values)]


def flatten(values: Mapping[str, np.ndarray]) -> np.ndarray:
    """One float64 vector of ``values`` in :func:`layout` order."""
    return np.concatenate([np.asarray(values[k], dtype=np.float64).ravel() for k, _ in layout(values)]) \
        if values else np.zeros(0)


def unflatten(vector: np.ndarray, shapes: Sequence[tuple[str, Sequence[int]]]) -> dict[str, np.ndarray]:
    """Inverse of :func:`flatten` given the layout.

    Raises
    ------
    ValueError
        The vector's length is not the layout's.
    """
    sizes = [int(np.prod(s)) for _, s in shapes]
    if sum(sizes) != len(vector):
        raise ValueError(f"a vector of {len(vector)} values for a layout of {sum(sizes)}")
    out, at = {}, 0
    for (name, shape), size in zip(shapes, sizes):
        out[name] = np.asarray(vector[at:at + size], dtype=np.float64).reshape(tuple(shape))
        at += size
    return out
