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

The norm bound can be derived rather than guessed: :func:`site_update_norm_bound` is the
largest change Adam can make in one round of local training, whatever the site's data, so an
honest site always passes and a scaled (model-replacement) update does not. The meta-learner's
Newton terms get their own check, :func:`check_newton_terms`.
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


# ---------------------------------------------------------------------------------------------
# Bounds on an honest site's update

# Absorbs float32 rounding in the site's Adam arithmetic and weight updates: each step can be
# off by at most ulp(|w|)/2 = 2**-24 |w| per weight, while every step's bound is at least lr, so
# 1 % covers it whenever the weights stay below 0.01 * 2**24 * lr (about 335 at lr = 2e-3).
FLOAT_SLACK = 1.01

# Steps summed per numpy call in adam_update_norm_bound: bounded memory for any step count.
_CHUNK = 1 << 16


def _require_int(name: str, value: int, *, minimum: int) -> None:
    # bool is an int subclass; True is not a count.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _one_minus_power(beta: float, t: np.ndarray) -> np.ndarray:
    """``1 - beta**t``, accurate for ``beta`` near 1 (Adam's bias corrections) and for ``beta = 0``."""
    with np.errstate(divide="ignore"):  # log(0) = -inf gives exactly 1, as it should
        return -np.expm1(t * np.log(np.float64(beta)))


def _geometric_sum(log_ratio: float, t: np.ndarray) -> np.ndarray:
    """``sum(ratio**k for k in range(t))`` from ``log(ratio)``, accurate when the ratio is near 1."""
    if log_ratio == 0.0:
        return t.copy()
    with np.errstate(over="ignore"):  # a ratio above 1 may overflow to inf: then there is no bound
        return np.expm1(t * log_ratio) / np.expm1(log_ratio)


def adam_step_ratio_bounds(t: np.ndarray, *, betas: tuple[float, float] = (0.9, 0.999)) -> np.ndarray:
    """The largest ``|m_hat_t| / sqrt(v_hat_t)`` any gradient sequence can reach, per step ``t``.

    Adam moves each weight by ``lr * m_hat_t / (sqrt(v_hat_t) + eps)`` at step ``t`` (counted
    from 1 by a fresh optimizer), with ``m_t = (1-b1) sum_i b1**(t-i) g_i`` and ``v_t = (1-b2)
    sum_i b2**(t-i) g_i**2``. By Cauchy-Schwarz ``|m_t| <= (1-b1) sqrt(sum_k (b1**2/b2)**k)
    sqrt(v_t / (1-b2))``, with equality for ``g_i`` proportional to ``(b1/b2)**(t-i)``; the
    bias corrections multiply by ``sqrt(1-b2**t) / (1-b1**t)``. So this is the exact supremum.

    Kingma & Ba (2015, section 2.1) give ``(1-b1)/sqrt(1-b2)`` (3.16 at the defaults) instead:
    that is the ratio when only the current gradient is non-zero, not a supremum. With the
    defaults, this bound is 1 at t = 1, 2.24 at t = 100 and 7.27 in the limit; gradients
    growing about 10 % per step (a diverging loss) come close to it.

    Parameters
    ----------
    t : step numbers (>= 1), as float64.
    betas : Adam's ``(b1, b2)``.
    """
    beta1, beta2 = betas
    with np.errstate(divide="ignore"):  # b1 = 0 gives log_ratio = -inf: a sum of one term
        log_ratio = float(2.0 * np.log(np.float64(beta1)) - np.log(np.float64(beta2)))
    corrected = (1.0 - beta1) / _one_minus_power(beta1, t)
    with np.errstate(over="ignore", invalid="ignore"):
        return corrected * np.sqrt(_one_minus_power(beta2, t) / (1.0 - beta2) * _geometric_sum(log_ratio, t))


def adam_update_norm_bound(*, lr: float, steps: int, n_params: int,
                           betas: tuple[float, float] = (0.9, 0.999)) -> float:
    """Hard upper bound on ``||w_end - w_start||_2`` after ``steps`` steps of ``torch.optim.Adam``.

    Each step moves each weight by at most ``lr * r_t`` (:func:`adam_step_ratio_bounds`),
    whatever the gradients are, so the whole change is at most ``lr * sum(r_t) * sqrt(n_params)``.
    Gradients enter only through Adam's ratio, so the bound also holds with coupled L2 weight
    decay (``Adam(weight_decay=...)``, as client/dp_training.py uses: the decay is part of the
    gradient), with DP-SGD's clipped and noised gradients, with any ``eps >= 0`` (it only
    shrinks the step) and with ``amsgrad`` (a larger denominator). It does not cover AdamW's
    decoupled decay (an extra ``lr * wd * |w|`` per step), an optimizer state carried over
    from an earlier round (steps would not restart at 1), or float buffers that are not
    trained by Adam (e.g. BatchNorm statistics; the models use GroupNorm, which has none).
    FedProx's pull ``w -= mu * lr * (w - w_start)`` never increases the change while
    ``mu * lr <= 2``.

    Parameters
    ----------
    lr : Adam's learning rate.
    steps : number of optimizer steps (0 gives 0).
    n_params : number of trained float weights (total size of the float arrays).
    betas : Adam's ``(b1, b2)``; ``b2 = 0`` is refused, since the step is then unbounded.

    Returns
    -------
    float
        The bound, in exact arithmetic (see :data:`FLOAT_SLACK` for float32 training); ``inf``
        when ``b1**2 > b2`` and ``steps`` is large enough for the bound to overflow.
    """
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    _require_int("steps", steps, minimum=0)
    _require_int("n_params", n_params, minimum=0)
    beta1, beta2 = (float(b) for b in betas)
    if not (0.0 <= beta1 < 1.0 and 0.0 < beta2 < 1.0):
        raise ValueError(f"betas must satisfy 0 <= b1 < 1 and 0 < b2 < 1, got {betas!r}")
    if steps == 0 or n_params == 0:
        return 0.0  # not lr * 0 * ..., which is nan when the sum overflowed to inf
    total = 0.0
    for start in range(1, int(steps) + 1, _CHUNK):
        t = np.arange(start, min(start + _CHUNK, int(steps) + 1), dtype=np.float64)
        total += float(np.sum(adam_step_ratio_bounds(t, betas=(beta1, beta2))))
    return lr * total * math.sqrt(n_params)


def site_update_norm_bound(*, lr: float, local_epochs: int, batch_size: int, n_train: int,
                           n_params: int) -> float:
    """The ``max_norm`` for one site's CNN update in one round (Adam with default betas).

    The bound depends only on the run's settings (``lr``, ``local_epochs``, ``batch_size``,
    the model's size) and on the site's census count ``n_train``, never on the data or on the
    update, so the coordinator can fix it before the round. A site can only raise it by
    over-reporting ``n_train`` at the census; use the same count as the site's ``max_examples``
    so that FedAvg does not also reward the lie with weight.

    Steps per epoch: a plain ``DataLoader`` (``drop_last=False``) draws ``ceil(n/batch)``
    batches; Opacus' Poisson loader uses sample rate ``1/len(loader)`` and draws
    ``int(1/rate)`` batches, which is ``ceil(n/batch)`` or one fewer (``int(1/(1/93)) == 92``),
    and an empty Poisson batch takes no step. A smaller count only tightens the real change,
    so ``local_epochs * ceil(n_train / batch_size)`` is an upper bound for both.

    Parameters
    ----------
    lr : the run's learning rate.
    local_epochs : epochs of local training per round.
    batch_size : the run's (expected) batch size.
    n_train : the site's training records, from its census.
    n_params : number of trained float weights in the global model.

    Returns
    -------
    float
        :func:`adam_update_norm_bound` of that many steps, times :data:`FLOAT_SLACK`.
    """
    for name, value in (("local_epochs", local_epochs), ("batch_size", batch_size), ("n_train", n_train)):
        _require_int(name, value, minimum=1)
    steps = int(local_epochs) * math.ceil(int(n_train) / int(batch_size))
    return FLOAT_SLACK * adam_update_norm_bound(lr=lr, steps=steps, n_params=n_params)


# ---------------------------------------------------------------------------------------------
# Meta-learner Newton terms


def _check_float_array(label: str, value: object, *, shape: tuple[int, ...]) -> str | None:
    """Why ``value`` is not a finite float array of ``shape``, or ``None``."""
    if not isinstance(value, np.ndarray):
        return f"{label} is a {type(value).__name__}, not a numpy array"
    if not is_float_array(value):
        return f"{label} has dtype {_dtype_label(value.dtype)}, expected a float dtype"
    if value.shape != shape:
        return f"{label} has shape {value.shape}, expected {shape}"
    bad = int(np.size(value) - np.count_nonzero(np.isfinite(value)))
    if bad:
        return f"{label} has {bad} non-finite value{'s' if bad > 1 else ''}"
    return None


def _asymmetry(hess: np.ndarray) -> float:
    with np.errstate(over="ignore", invalid="ignore"):  # huge finite entries: inf, then rejected
        return float(np.max(np.abs(hess - hess.T))) if hess.size else 0.0


def _check_count(n: object, *, max_n: int | None) -> str | None:
    """Why ``n`` is not a record count in ``[1, max_n]``, or ``None``.

    Integral floats pass, as in :func:`check_num_examples` (metric records may carry counts as floats).
    """
    if isinstance(n, bool) or not isinstance(n, numbers.Real):
        return f"n must be a positive integer, got {n!r}"
    value = float(n)
    if not math.isfinite(value) or value != math.floor(value) or value < 1:
        return f"n must be a positive integer, got {n!r}"
    if max_n is not None and value > max_n:
        return f"n {int(value)} exceeds the site's census count {max_n}"
    return None


def check_newton_terms(grad: object, hess: object, *, dim: int, n: object, max_n: int | None,
                       sym_tol: float = 1e-8) -> str | None:
    """Why one site's meta-learner Newton terms are unacceptable, or ``None``.

    The coordinator sums every site's gradient and Hessian and solves for a Newton step, so
    one wrong-shaped, non-finite or asymmetric term spoils the step for everyone, and an
    inflated ``n`` misstates the sample the fit rests on. Positive definiteness is not checked:
    DP noise makes honest Hessians indefinite, and the coordinator repairs the sum.

    Parameters
    ----------
    grad : the site's gradient; must be a finite float array of shape ``(dim,)``.
    hess : the site's Hessian; must be a finite float array of shape ``(dim, dim)``,
        symmetric to within ``sym_tol * max(1, max|hess|)`` (a product ``Z^T W Z`` is
        symmetric only up to rounding; the DP noise is mirrored, hence exactly symmetric).
    dim : the meta-learner's number of coefficients.
    n : the site's record count behind the terms; a positive integer.
    max_n : the site's census count for the split the terms come from; ``None`` for no bound.
    sym_tol : relative tolerance for the symmetry check.

    Returns
    -------
    str or None
        The first problem found (gradient, then Hessian, then symmetry, then ``n``), or ``None``.
    """
    _require_int("dim", dim, minimum=1)
    if not sym_tol >= 0:
        raise ValueError(f"sym_tol must be >= 0, got {sym_tol!r}")
    why = (_check_float_array("meta gradient", grad, shape=(dim,))
           or _check_float_array("meta hessian", hess, shape=(dim, dim)))
    if why is not None:
        return why
    assert isinstance(hess, np.ndarray)  # checked above; narrows the type
    asymmetry = _asymmetry(hess)
    if not asymmetry <= sym_tol * max(1.0, float(np.max(np.abs(hess)))):
        return f"meta hessian is not symmetric (max asymmetry {asymmetry:.1e})"
    return _check_count(n, max_n=max_n)
