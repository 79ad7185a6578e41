"""Checks on every client update before it reaches an aggregator.

A site's training reply is accepted only if it has exactly the global model's arrays (names,
shapes, dtypes), only finite values, a plausible example count and, when a bound is set, an
update norm ``||client - global||_2`` within that bound. Anything else is rejected with a
short reason that the ServerApp logs next to the site's name; a rejected update never
influences the global model.

Float arrays are the trained weights: they are checked for finiteness and make up the update
norm. Non-float arrays (integer or boolean buffers, e.g. a step counter; GroupNorm has none)
are not trained by the federation, so an update must return them *unchanged*; they are left
out of the norm, and the aggregators carry the global values through.
"""

from __future__ import annotations

import math
import numbers
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np


def is_float_array(array: np.ndarray) -> bool:
    """Whether ``array`` holds trained (floating-point) weights."""
    return bool(np.issubdtype(array.dtype, np.floating))


@dataclass(frozen=True)
class UpdateSpec:
    """What a valid update looks like: the global model's layout plus the bounds.

    Attributes
    ----------
    names : array names, in the global model's order.
    shapes : shape of each array, aligned with ``names``.
    dtypes : dtype string of each array (``np.dtype.str`` form, e.g. ``"<f4"``), aligned with ``names``.
    max_norm : L2 bound on ``client - global`` over all float arrays; ``None`` for no bound.
    max_examples : largest accepted ``num-examples``; ``None`` for no bound. A bound matters
        because FedAvg weights by this number: one site claiming 10**9 examples would own
        the average.
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]
    max_norm: float | None = None
    max_examples: int | None = None

    def __post_init__(self) -> None:
        if not len(self.names) == len(self.shapes) == len(self.dtypes):
            raise ValueError("names, shapes and dtypes must have the same length")
        if self.max_norm is not None and not (self.max_norm > 0 and math.isfinite(self.max_norm)):
            raise ValueError(f"max_norm must be a positive finite number, got {self.max_norm}")
        if self.max_examples is not None and self.max_examples < 1:
            raise ValueError(f"max_examples must be at least 1, got {self.max_examples}")

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], *, max_norm: float | None = None,
                    max_examples: int | None = None) -> UpdateSpec:
        """The spec of the global model ``arrays`` (e.g. its numpy state dict)."""
        names = tuple(arrays)
        return cls(names=names,
                   shapes=tuple(tuple(int(d) for d in np.shape(arrays[n])) for n in names),
                   dtypes=tuple(np.asarray(arrays[n]).dtype.str for n in names),
                   max_norm=None if max_norm is None else float(max_norm),
                   max_examples=None if max_examples is None else int(max_examples))


@dataclass(frozen=True)
class Verdict:
    """The outcome of :func:`validate_update`.

    Attributes
    ----------
    ok : whether the update may be aggregated.
    reason : why not (``None`` when ``ok``).
    norm : the update's L2 norm over float arrays, when it got that far (``None`` otherwise).
    """

    ok: bool
    reason: str | None = None
    norm: float | None = None


def _reject(reason: str, norm: float | None = None) -> Verdict:
    return Verdict(ok=False, reason=reason, norm=norm)


def check_num_examples(num_examples: object, *, max_examples: int | None) -> str | None:
    """Why ``num_examples`` is unacceptable, or ``None``. Integral floats (``120.0``) are accepted."""
    bad = f"num-examples must be a positive integer, got {num_examples!r}"
    # bool is an int subclass; True is not a count.
    if isinstance(num_examples, bool) or not isinstance(num_examples, numbers.Real):
        return bad
    value = float(num_examples)
    if not math.isfinite(value) or value != math.floor(value) or value < 1:
        return bad
    if max_examples is not None and value > max_examples:
        return f"num-examples {int(value)} exceeds bound {max_examples}"
    return None


def _dtype_label(dtype: np.dtype) -> str:
    # "float32" reads better, but a byte-swapped float32 must not print like the expected one.
    return dtype.name if dtype.isnative else dtype.str


def _check_array(name: str, array: object, *, shape: tuple[int, ...], dtype: str,
                 global_array: np.ndarray) -> str | None:
    """Why one received array is unacceptable, or ``None``."""
    if not isinstance(array, np.ndarray):
        return f"array '{name}' is a {type(array).__name__}, not a numpy array"
    if array.dtype != np.dtype(dtype):
        return f"array '{name}' has dtype {_dtype_label(array.dtype)}, expected {_dtype_label(np.dtype(dtype))}"
    if array.shape != shape:
        return f"array '{name}' has shape {array.shape}, expected {shape}"
    if is_float_array(array):
        if not np.isfinite(array).all():
            return f"non-finite values in '{name}'"
    elif not np.array_equal(array, global_array):
        return f"array '{name}' ({array.dtype.name}) differs from the global model; non-float arrays are not trained"
    return None


def update_norm(*, global_arrays: Mapping[str, np.ndarray], update_arrays: Mapping[str, np.ndarray]) -> float:
    """L2 norm of ``update - global`` over the float arrays, accumulated in float64.

    float64 keeps the sum of squares of float32 differences from overflowing or losing small
    terms; the order of accumulation is the arrays' order, so the figure is reproducible.
    """
    total = 0.0
    with np.errstate(over="ignore"):  # an overflow gives inf, which validate_update rejects
        for name, g in global_arrays.items():
            if is_float_array(g):
                diff = update_arrays[name].astype(np.float64) - g.astype(np.float64)
                total += float(np.dot(diff.ravel(), diff.ravel()))
    return math.sqrt(total)


def validate_update(spec: UpdateSpec, *, global_arrays: Mapping[str, np.ndarray],
                    update_arrays: Mapping[str, np.ndarray], num_examples: object) -> Verdict:
    """Decide whether one client update may be aggregated.

    Checks, in order (the first failure is the reason): ``num_examples``; missing arrays
    (in the spec's order); unexpected arrays (sorted); per array in the spec's order: type,
    dtype, shape, finite values (float arrays) or equality with the global array (non-float
    arrays); finally the update norm against ``spec.max_norm``.

    Parameters
    ----------
    spec : the expected layout and bounds (:meth:`UpdateSpec.from_arrays` of the global model).
    global_arrays : the global weights the site trained from.
    update_arrays : the weights the site sent back (full weights, not a delta).
    num_examples : the site's reported example count.

    Returns
    -------
    Verdict
        ``ok`` with the norm, or not ``ok`` with the reason.
    """
    if (why := check_num_examples(num_examples, max_examples=spec.max_examples)) is not None:
        return _reject(why)
    missing = [n for n in spec.names if n not in update_arrays]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        return _reject(f"missing array '{missing[0]}'{more}")
    unexpected = sorted(set(update_arrays) - set(spec.names))
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        return _reject(f"unexpected array '{unexpected[0]}'{more}")
    for name, shape, dtype in zip(spec.names, spec.shapes, spec.dtypes, strict=True):
        why = _check_array(name, update_arrays[name], shape=shape, dtype=dtype, global_array=global_arrays[name])
        if why is not None:
            return _reject(why)
    norm = update_norm(global_arrays=global_arrays, update_arrays=update_arrays)
    if not math.isfinite(norm):
        # Finite float64 weights can still differ by more than float64 can square.
        return _reject("update norm is not finite", norm)
    if spec.max_norm is not None and norm > spec.max_norm:
        return _reject(f"update norm {norm:.4g} exceeds bound {spec.max_norm:g}", norm)
    return Verdict(ok=True, reason=None, norm=norm)


@dataclass(frozen=True)
class AcceptedUpdate:
    """An update that passed :func:`validate_update`."""

    site: str
    arrays: dict[str, np.ndarray]
    num_examples: int
    norm: float


@dataclass(frozen=True)
class RejectedUpdate:
    """An update that failed, with the reason to log next to the site."""

    site: str
    reason: str


@dataclass(frozen=True)
class Partition:
    """Accepted and rejected updates of one round, each sorted by site name."""

    accepted: list[AcceptedUpdate]
    rejected: list[RejectedUpdate]

    def updates(self) -> list[tuple[dict[str, np.ndarray], int]]:
        """The accepted updates in the form :meth:`server.aggregation.Aggregator.aggregate` takes."""
        return [(u.arrays, u.num_examples) for u in self.accepted]


def partition_replies(spec: UpdateSpec, *, global_arrays: Mapping[str, np.ndarray],
                      replies: Iterable[tuple[str, Mapping[str, np.ndarray], object]]) -> Partition:
    """Validate a round's replies and split them into accepted and rejected.

    Both lists come back sorted by site name, whatever order the replies arrived in: floating-
    point sums depend on order, so this is what makes aggregation (and a resumed run)
    reproducible. A site that replied more than once in the round has all its replies
    rejected, since picking one would depend on arrival order.

    Parameters
    ----------
    spec : see :func:`validate_update`.
    global_arrays : the global weights sent this round.
    replies : ``(site_name, arrays, num_examples)`` per received reply.
    """
    replies = sorted(replies, key=lambda r: r[0])
    counts = Counter(site for site, _, _ in replies)
    accepted: list[AcceptedUpdate] = []
    rejected: list[RejectedUpdate] = []
    for site, arrays, num_examples in replies:
        if counts[site] > 1:
            rejected.append(RejectedUpdate(site, f"{counts[site]} replies from this site in one round"))
            continue
        verdict = validate_update(spec, global_arrays=global_arrays, update_arrays=arrays, num_examples=num_examples)
        if verdict.ok:
            # validate_update accepted it, so it is a whole positive number and the norm is set.
            count = int(float(num_examples))  # type: ignore[arg-type]
            accepted.append(AcceptedUpdate(site, dict(arrays), count, float(verdict.norm or 0.0)))
        else:
            rejected.append(RejectedUpdate(site, str(verdict.reason)))
    return Partition(accepted=accepted, rejected=rejected)
