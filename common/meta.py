"""Stacking meta-classifier: logistic regression fitted by Newton's method from summed statistics.

The fit only ever needs, at the current coefficients, each data holder's log-loss, gradient and
Hessian (:func:`newton_terms`). Those add up across sites, so the same :class:`NewtonSolver`
fits on pooled data (one holder) and in the federation (the server sums the sites' terms), and
converges to the pooled-data solution. The objective is scikit-learn's::

    sum_i logloss_i(W) + 1 / (2 C) * ||W without intercept||^2     (penalty="l2")
    sum_i logloss_i(W)                                              (penalty=None)

Binary problems use one coefficient vector (as scikit-learn does); K > 2 classes use the
multinomial model with K vectors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

# Meta features (base-model log-odds or log-probabilities) are clipped to [-B, B]. This bounds one
# record's part in the Newton statistics (:func:`statistic_bounds`, for DP) and keeps the votes of
# a 200-tree forest apart (199 of 200 trees: log-odds 5.3).
META_FEATURE_BOUND = 6.0


@dataclass
class NewtonTerms:
    """One holder's contribution at the current coefficients (all additive)."""

    loss: float
    grad: np.ndarray
    hess: np.ndarray
    n: int

    def __add__(self, other: NewtonTerms) -> NewtonTerms:
        return NewtonTerms(self.loss + other.loss, self.grad + other.grad, self.hess + other.hess, self.n + other.n)


def _design(x: np.ndarray) -> np.ndarray:
    """Features with a trailing intercept column."""
    x = np.asarray(x, dtype=np.float64)
    return np.hstack([x, np.ones((x.shape[0], 1))])


def n_params(n_features: int, n_classes: int) -> int:
    """Length of the flat coefficient vector (intercepts included)."""
    return (n_features + 1) * (1 if n_classes == 2 else n_classes)


def newton_terms(coef: np.ndarray, x: np.ndarray, y: np.ndarray, *, n_classes: int) -> NewtonTerms:
    """Log-loss, gradient and Hessian of the *unpenalized* objective on (x, y) at ``coef``.

    ``coef`` is flat: for binary, ``[w_1..w_d, b]``; for K classes, K such blocks.
    """
    z = _design(x)
    y = np.asarray(y, dtype=np.int64)
    d = z.shape[1]
    if n_classes == 2:
        eta = z @ coef
        p = 1.0 / (1.0 + np.exp(-eta))
        loss = float(np.sum(np.logaddexp(0.0, eta) - y * eta))
        grad = z.T @ (p - y)
        hess = (z * (p * (1.0 - p))[:, None]).T @ z
        return NewtonTerms(loss, grad, hess, len(y))
    from scipy.special import (
        log_softmax,  # multiclass only: a binary site never loads SciPy
    )

    w = coef.reshape(n_classes, d)
    eta = z @ w.T
    logp = log_softmax(eta, axis=1)
    p = np.exp(logp)
    onehot = np.eye(n_classes)[y]
    loss = float(-np.sum(logp[np.arange(len(y)), y]))
    grad = ((p - onehot).T @ z).ravel()
    hess = np.zeros((n_classes * d, n_classes * d))
    for a in range(n_classes):
        for b in range(a, n_classes):
            weight = p[:, a] * ((a == b) - p[:, b])
            block = (z * weight[:, None]).T @ z
            hess[a * d:(a + 1) * d, b * d:(b + 1) * d] = block
            hess[b * d:(b + 1) * d, a * d:(a + 1) * d] = block
    return NewtonTerms(loss, grad, hess, len(y))


def newton_direction(hess: np.ndarray, grad: np.ndarray, *, null: np.ndarray | None = None) -> np.ndarray:
    """The least-norm solution ``s`` of ``hess @ s = grad`` for a penalized model's Hessian: symmetric,
    positive definite, or semi-definite with the one null direction ``null`` (a unit vector) that
    ``grad`` is orthogonal to (the multinomial model's intercepts moved alike).

    ``(hess + null null') s = grad`` is then definite, and its only solution is the least-norm
    one of the original system: a Cholesky factorization and one solve, where the SVD-based
    least-squares solve costs about ten times as much at a multinomial GLM's size (a few hundred
    columns times the classes). Where the system is not definite after all (a Cholesky pivot
    vanishes: a null direction that ``null`` does not cover) or the solution does not satisfy
    ``hess @ s = grad`` to rounding (``null`` is not a null direction), least squares decides.
    """
    system = hess if null is None else hess + np.outer(null, null)
    try:
        pivots = np.diag(np.linalg.cholesky(system)) ** 2
    except np.linalg.LinAlgError:
        pivots = None
    if pivots is not None and pivots.min() > 1e-10 * pivots.max():
        step = np.linalg.solve(system, grad)
        scale = np.linalg.norm(hess) * np.linalg.norm(step) + np.linalg.norm(grad)
        if np.all(np.isfinite(step)) and np.linalg.norm(hess @ step - grad) <= 1e-10 * scale:
            return step
    return np.linalg.lstsq(hess, grad, rcond=None)[0]


@dataclass
class NewtonSolver:
    """Server-side Newton iteration with step halving, driven by summed :class:`NewtonTerms`.

    Call :meth:`step` with the terms summed over all holders at :attr:`coef`; it returns the
    next coefficients to evaluate. A step that raised the objective is halved back towards
    the last accepted point, so each round needs exactly one exchange with the holders.
    The state is plain data (``state_dict`` / ``load_state_dict``) so it can be checkpointed.

    ``positive`` (a mask over the flat coefficients, or None) keeps those coefficients at or above
    zero: each step then solves the Newton model's quadratic under that bound
    (:func:`bounded_newton_direction`), and step halving stays feasible. ``fixed`` (a mask, or
    None) keeps those coefficients at exactly zero: each step solves the Newton model over the
    others only (a stack that must not read some base model).
    """

    n_features: int
    n_classes: int
    penalty: Literal["l2"] | None = "l2"
    C: float = 1.0
    tol: float = 1e-10
    positive: np.ndarray | None = None
    fixed: np.ndarray | None = None
    coef: np.ndarray = field(init=False)
    best_coef: np.ndarray = field(init=False)
    best_objective: float = field(init=False, default=np.inf)
    step_size: float = field(init=False, default=1.0)
    direction: np.ndarray | None = field(init=False, default=None)
    converged: bool = field(init=False, default=False)
    iterations: int = field(init=False, default=0)
    fallback: np.ndarray | None = field(init=False, default=None)  # the Newton step a rejected warm start replaces

    def __post_init__(self) -> None:
        self.coef = np.zeros(n_params(self.n_features, self.n_classes))
        self.best_coef = self.coef.copy()

    def _penalty_mask(self) -> np.ndarray:
        d = self.n_features + 1
        blocks = 1 if self.n_classes == 2 else self.n_classes
        mask = np.ones((blocks, d))
        mask[:, -1] = 0.0  # intercepts are not penalized, as in scikit-learn
        return mask.ravel()

    def objective(self, terms: NewtonTerms) -> tuple[float, np.ndarray, np.ndarray]:
        """Penalized objective, gradient and Hessian at :attr:`coef`."""
        if self.penalty is None:
            return terms.loss, terms.grad, terms.hess
        mask = self._penalty_mask()
        lam = 1.0 / self.C
        obj = terms.loss + 0.5 * lam * float(np.sum(mask * self.coef**2))
        return obj, terms.grad + lam * mask * self.coef, terms.hess + lam * np.diag(mask)

    def step(self, terms: NewtonTerms) -> np.ndarray:
        """Take the summed terms at :attr:`coef` and move to the next point to evaluate."""
        obj, grad, hess = self.objective(terms)
        self.iterations += 1
        if obj > self.best_objective + 1e-12 * max(1.0, abs(self.best_objective)) and self.direction is not None:
            if self.fallback is not None:
                # The warm start was worse than the point it was proposed from: take the plain Newton step.
                self.direction, self.fallback, self.step_size = self.fallback, None, 1.0
                self.coef = self.best_coef + self.direction
                return self.coef
            # The last step overshot: go back half-way along it from the accepted point.
            self.step_size *= 0.5
            self.coef = self.best_coef + self.step_size * self.direction
            if self.step_size < 1e-8:
                self.coef, self.converged = self.best_coef.copy(), True
            return self.coef
        self.best_coef, self.best_objective, self.fallback = self.coef.copy(), obj, None
        free = self._free()
        hess, grad = hess[np.ix_(free, free)], grad[free]
        if self.penalty is None:  # lstsq: without a penalty the Hessian may be singular in many directions
            step = -np.linalg.lstsq(hess, grad, rcond=None)[0]
        else:
            step = -newton_direction(hess, grad, null=self._null_direction(free))
        if self.positive is not None:
            step = bounded_newton_direction(hess, grad, step, lower=self._lower()[free])
        direction = np.zeros_like(self.coef)
        direction[free] = step
        decrement = float(-grad @ step)
        if decrement / 2.0 <= self.tol * max(1.0, terms.n):
            self.converged = True
            return self.coef
        self.direction, self.step_size = direction, 1.0
        self.coef = self.best_coef + direction
        return self.coef

    def warm_start(self, terms: NewtonTerms, local_coefs: list[np.ndarray],
                   local_hessians: list[np.ndarray]) -> np.ndarray:
        """Propose the holders' local fits combined, guarded by the point ``terms`` were taken at.

        ``terms`` are the summed terms at :attr:`coef`, which becomes the accepted point. The
        proposal is the combination of the local fits weighted by their penalized Hessians (a
        one-step meta-analysis estimate, close to the pooled fit when the local fits are sound);
        it is evaluated next like a step from the accepted point, and if it raises the objective
        (local fits on nearly separable data extrapolate), the plain Newton step from that point
        is taken instead. Returns the next coefficients to evaluate.
        """
        hess = [np.asarray(h) for h in local_hessians]
        coefs = [np.asarray(c) for c in local_coefs]
        return self.warm_start_from_sums(terms, coef_sum=sum(coefs), hess_sum=sum(hess),
                                         hess_coef_sum=sum(h @ c for h, c in zip(hess, coefs)), holders=len(coefs))

    def warm_start_from_sums(self, terms: NewtonTerms, *, coef_sum: np.ndarray, hess_sum: np.ndarray,
                             hess_coef_sum: np.ndarray, holders: int) -> np.ndarray:
        """:meth:`warm_start` from sums over the holders (what a secure sum delivers): of their
        local fits ``c``, local Hessians ``H`` and products ``H @ c``."""
        self.step(terms)
        if self.converged:
            return self.coef
        penalty = self._penalty_hessian()
        h = np.asarray(hess_sum) + holders * penalty
        b = np.asarray(hess_coef_sum) + penalty @ np.asarray(coef_sum)
        # lstsq: the unpenalized multinomial directions (intercepts) leave h singular.
        proposal = self.feasible(np.linalg.lstsq(h, b, rcond=None)[0])
        self.fallback, self.direction, self.step_size = self.direction, proposal - self.best_coef, 1.0
        self.coef = proposal
        return self.coef

    def _penalty_hessian(self) -> np.ndarray:
        """The penalty's Hessian (zero without a penalty)."""
        mask = self._penalty_mask()
        return np.diag(mask / self.C) if self.penalty is not None else np.zeros((mask.size, mask.size))

    def _null_direction(self, free: np.ndarray) -> np.ndarray | None:
        """The penalized multinomial Hessian's one null direction over the ``free`` coefficients:
        every class's intercept moved alike (softmax does not see it, and intercepts are not
        penalized); None for a binary model (its penalized Hessian is definite) or when a fixed
        intercept leaves the direction out."""
        if self.n_classes == 2:
            return None
        d = self.n_features + 1
        intercepts = np.zeros(self.coef.shape[0], dtype=bool)
        intercepts[d - 1::d] = True
        if not np.all(free[intercepts]):
            return None
        return intercepts[free] / math.sqrt(self.n_classes)

    def _free(self) -> np.ndarray:
        """Mask of the coefficients a step may move (all but ``fixed``)."""
        n = self.coef.shape[0]
        return np.ones(n, dtype=bool) if self.fixed is None else ~np.asarray(self.fixed, dtype=bool)

    def _lower(self) -> np.ndarray:
        """Lower bounds of a step from :attr:`coef` (``-coef`` where positive, else unbounded)."""
        return np.where(np.asarray(self.positive, dtype=bool), -self.coef, -np.inf)

    def feasible(self, coef: np.ndarray) -> np.ndarray:
        """``coef`` with the ``positive`` coefficients raised to zero and the ``fixed`` ones set to
        zero (a warm start's projection)."""
        coef = np.where(self._free(), np.asarray(coef, dtype=np.float64), 0.0)
        if self.positive is None:
            return coef
        return np.where(np.asarray(self.positive, dtype=bool), np.maximum(coef, 0.0), coef)

    def result(self) -> np.ndarray:
        """The coefficients to use: the best accepted point once converged, else the current one."""
        return self.best_coef if self.converged else self.coef

    def state_dict(self) -> dict[str, Any]:
        """Serialisable state (lists and numbers only)."""
        return {"coef": self.coef.tolist(), "best_coef": self.best_coef.tolist(),
                "best_objective": self.best_objective, "step_size": self.step_size,
                "direction": None if self.direction is None else self.direction.tolist(),
                "converged": self.converged, "iterations": self.iterations,
                "fallback": None if self.fallback is None else self.fallback.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`."""
        self.coef, self.best_coef = np.asarray(state["coef"]), np.asarray(state["best_coef"])
        self.best_objective, self.step_size = float(state["best_objective"]), float(state["step_size"])
        self.direction = None if state["direction"] is None else np.asarray(state["direction"])
        self.converged, self.iterations = bool(state["converged"]), int(state["iterations"])
        self.fallback = None if state.get("fallback") is None else np.asarray(state["fallback"])


def bounded_newton_direction(hess: np.ndarray, grad: np.ndarray, direction: np.ndarray, *,
                             lower: np.ndarray, sweeps: int = 1000) -> np.ndarray:
    """The step ``s >= lower`` minimising the Newton model ``s'Hs / 2 + g's``.

    ``direction`` is the unbounded minimiser: returned as it is when it satisfies the bounds.
    Otherwise projected coordinate descent from its projection, exact for this convex quadratic
    (the models here have a few dozen coefficients at most).
    """
    if np.all(direction >= lower - 1e-12):
        return direction
    s = np.maximum(direction, lower)
    diag = np.maximum(np.diag(hess), 1e-12)
    for _ in range(sweeps):
        largest = 0.0
        for j in range(s.shape[0]):
            new = max(s[j] - (hess[j] @ s + grad[j]) / diag[j], lower[j])
            largest = max(largest, abs(new - s[j]))
            s[j] = new
        if largest <= 1e-12 * max(1.0, float(np.abs(s).max())):
            break
    return s


def selection_coef(*, n_models: int, n_classes: int, index: int) -> np.ndarray:
    """Flat coefficients that make the stack one of its base models (weight 1 on model ``index``'s
    own evidence, nothing else): what the stack falls back to when it does worse than that model."""
    if n_classes == 2:
        coef = np.zeros(n_models + 1)
        coef[index] = 1.0
        return coef
    d = n_models * n_classes + 1
    coef = np.zeros((n_classes, d))
    for k in range(n_classes):
        coef[k, index * n_classes + k] = 1.0
    return coef.ravel()


def selected_model(coef: np.ndarray, *, n_models: int, n_classes: int) -> int | None:
    """The base model whose :func:`selection_coef` ``coef`` is, or None (a fitted or reduced stack)."""
    coef = np.asarray(coef, dtype=np.float64)
    for index in range(n_models):
        if np.array_equal(coef, selection_coef(n_models=n_models, n_classes=n_classes, index=index)):
            return index
    return None


def without_model(coef: np.ndarray, *, n_models: int, n_classes: int, index: int | Sequence[int]) -> np.ndarray:
    """``coef`` with every weight on model ``index``'s features set to zero (the stack without it;
    several models when ``index`` is a sequence).

    The intercepts are left as fitted: a reduced stack is chosen and thresholded on its own
    validation statistics, which its ranking alone decides.
    """
    k = 1 if n_classes == 2 else n_classes
    rows = np.asarray(coef, dtype=np.float64).reshape(k, n_models * k + 1).copy()
    for i in _indices(index):
        rows[:, i * k:(i + 1) * k] = 0.0
    return rows.ravel()


def reduced_stack_coef(coef: np.ndarray, *, n_models: int, n_classes: int,
                       index: int | Sequence[int]) -> np.ndarray:
    """The stack without models ``index`` (:func:`without_model`), the weights it keeps scaled up so
    that each output's total absolute weight is the fitted stack's.

    The scale does not change its ranking; it keeps the reduced stack's scores as spread as the full
    stack's. Without it, the stack of two of four models near the averaging prior (weights about 1/4
    each) squeezes its scores into a few of the 32 released bins, whose ties then pull its validation
    AUC down against a base model's (0.721 for 0.739 at full resolution, on the demo's layout at
    epsilon 8: docs/learning.md), and the stacking fallback chooses on that.
    """
    k = 1 if n_classes == 2 else n_classes
    width = n_models * k
    full = np.asarray(coef, dtype=np.float64).reshape(k, width + 1)
    rows = without_model(coef, n_models=n_models, n_classes=n_classes, index=index).reshape(k, width + 1)
    return _with_fitted_total(rows, full).ravel()


def _with_fitted_total(rows: np.ndarray, full: np.ndarray) -> np.ndarray:
    """``rows`` (one per output, intercept last) with each output's weights scaled so that their
    total absolute weight is ``full``'s; an output whose weights are all zero on either side is left
    as it is."""
    kept = np.abs(rows[:, :-1]).sum(axis=1)
    total = np.abs(full[:, :-1]).sum(axis=1)
    scale = np.where((kept > 0) & (total > 0), total / np.where(kept > 0, kept, 1.0), 1.0)
    rows[:, :-1] *= scale[:, None]
    return rows


def _indices(index: int | Sequence[int]) -> tuple[int, ...]:
    return (int(index),) if isinstance(index, (int, np.integer)) else tuple(int(i) for i in index)


def positive_evidence(*, n_models: int, n_classes: int) -> np.ndarray:
    """Mask of the stacking weights each model puts on its own evidence for each class (the
    entries :func:`averaging_prior` sets), which non-negative stacking keeps at or above zero."""
    return averaging_prior(n_models=n_models, n_classes=n_classes) > 0


def statistic_bounds(*, n_features: int, n_classes: int, bound: float) -> tuple[float, float]:
    """L2 bounds of one record's contribution to the gradient and to the Hessian.

    With design row ``z = [x, 1]`` and ``|x_j| <= B``: the gradient gets ``(p - e_y) (x) z``
    (norm at most ``||z||`` for binary, ``sqrt(2) ||z||`` for K classes) and the Hessian
    ``p (1 - p) z z^T`` (Frobenius norm at most ``||z||^2 / 4``) or ``(diag(p) - p p^T) (x) z z^T``
    (at most ``||z||^2``, by the trace of a positive semi-definite matrix).

    Parameters
    ----------
    n_features : number of meta features (without the intercept).
    n_classes : number of classes (2 for binary).
    bound : the meta features' clipping bound ``B`` (:data:`META_FEATURE_BOUND`).
    """
    z2 = n_features * bound**2 + 1.0
    if n_classes == 2:
        return math.sqrt(z2), z2 / 4.0
    return math.sqrt(2.0 * z2), z2


def averaging_prior(*, n_models: int, n_classes: int, left_out: Sequence[int] = ()) -> np.ndarray:
    """Flat coefficients that average the base models' log-odds (or log-probabilities).

    The features are ``n_models`` blocks of one log-odds column (binary) or ``n_classes``
    log-probability columns; the prior gives each model (but those ``left_out``) an equal weight on
    its own evidence for each class and no intercept. It needs no data, so it is a free starting
    point when the statistics that would refine it are noised.
    """
    kept = [m for m in range(n_models) if m not in set(left_out)]
    if n_classes == 2:
        coef = np.zeros(n_models + 1)
        coef[kept] = 1.0 / len(kept)
        return coef
    d = n_models * n_classes + 1
    coef = np.zeros((n_classes, d))
    for k in range(n_classes):
        coef[k, [m * n_classes + k for m in kept]] = 1.0 / len(kept)
    return coef.ravel()


def without_model_features(x: np.ndarray, *, n_models: int, n_classes: int,
                           index: int | Sequence[int]) -> np.ndarray:
    """Stacking inputs ``x`` with model ``index``'s columns (or several models') set to zero (what
    the stack without it reads: nothing of that model enters its statistics)."""
    k = 1 if n_classes == 2 else n_classes
    out = np.array(x, dtype=np.float64, copy=True)
    for i in _indices(index):
        out[:, i * k:(i + 1) * k] = 0.0
    return out


def unweighted_models(coef: np.ndarray, *, n_models: int, n_classes: int) -> list[int]:
    """Positions of the models on whose features ``coef`` puts no weight at all (a fallback or a
    reduced stack left them out): their part in the stack's evidence is exactly zero."""
    if not len(coef):  # no stack yet
        return []
    k = 1 if n_classes == 2 else n_classes
    rows = np.asarray(coef, dtype=np.float64).reshape(k, n_models * k + 1)
    return [i for i in range(n_models) if not np.any(rows[:, i * k:(i + 1) * k])]


def model_mask(*, n_models: int, n_classes: int, index: int | Sequence[int]) -> np.ndarray:
    """Mask of the flat coefficients that weigh model ``index``'s features, or several models' (the ones
    :func:`without_model` zeroes)."""
    ones = np.ones(n_params(n_models * (1 if n_classes == 2 else n_classes), n_classes))
    return without_model(ones, n_models=n_models, n_classes=n_classes, index=index) == 0.0


def nearest_positive_definite(hess: np.ndarray, *, floor: float) -> np.ndarray:
    """The symmetric matrix with ``hess``'s eigenvectors and eigenvalues raised to ``floor``.

    Summed noisy Hessians can be indefinite, which would turn a Newton step uphill; this is
    post-processing of released values, so it costs no privacy.
    """
    sym = (hess + hess.T) / 2.0
    values, vectors = np.linalg.eigh(sym)
    return (vectors * np.maximum(values, floor)) @ vectors.T


def noise_floor(*, dim: int, n_classes: int, noise_multipliers: list[float],
                bound: float = META_FEATURE_BOUND) -> float:
    """Spectral size of the noise in a sum of Hessians released through the Gaussian mechanism.

    Each holder's Hessian carries noise of deviation ``sigma * sqrt(2) * h_bound`` per entry
    (client/privacy/mechanisms.py); a symmetric Gaussian matrix of size D with entry deviation s has
    spectral norm about 2 sqrt(D) s. Raising the summed Hessian's eigenvalues to this floor keeps
    noise from flipping or inflating a Newton step (a trust region in effect), from public values.
    """
    n_features = dim // (1 if n_classes == 2 else n_classes) - 1
    _, h_bound = statistic_bounds(n_features=n_features, n_classes=max(n_classes, 2), bound=bound)
    sd = math.sqrt(sum((s * math.sqrt(2.0) * h_bound) ** 2 for s in noise_multipliers))
    return max(2.0 * math.sqrt(dim) * sd, 1e-9)


def flat_coef(model: NewtonLogisticRegression) -> np.ndarray:
    """A fitted model's coefficients in the solver's flat layout (per class: weights, intercept)."""
    return np.hstack([model.coef_, model.intercept_[:, None]]).ravel()


class NewtonLogisticRegression:
    """Penalized logistic (multinomial) regression fitted by Newton from summed terms.

    A scikit-learn estimator by contract (``get_params`` from ``__init__``, ``fit`` returns self,
    learned attributes end in ``_``; :func:`sklearn.base.clone` works), written without importing
    scikit-learn so that the sites' deep-model rounds never pay for it. The pooled fit here and
    the federated fit (the coordinator's :class:`NewtonSolver` over the sites' summed
    :func:`newton_terms`, installed with :meth:`set_coef`) reach the same optimum.

    Parameters
    ----------
    penalty : "l2" or None
    C : inverse regularisation strength, as in scikit-learn.
    max_iter : Newton iterations at most.
    tol : convergence tolerance on the Newton decrement per record.
    """

    _estimator_type = "classifier"

    def __init__(self, *, penalty: Literal["l2"] | None = "l2", C: float = 1.0, max_iter: int = 100,
                 tol: float = 1e-10) -> None:
        self.penalty, self.C, self.max_iter, self.tol = penalty, C, max_iter, tol

    @classmethod
    def _get_param_names(cls) -> list[str]:
        import inspect

        params = inspect.signature(cls.__init__).parameters.values()
        return sorted(p.name for p in params if p.name != "self" and p.kind != p.VAR_KEYWORD)

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The ``__init__`` arguments, as scikit-learn's ``BaseEstimator`` reads them."""
        return {name: getattr(self, name) for name in self._get_param_names()}

    def set_params(self, **params: Any) -> NewtonLogisticRegression:
        valid = set(self._get_param_names())
        for key, value in params.items():
            if key not in valid:
                raise ValueError(f"invalid parameter {key!r} for {type(self).__name__}; valid: {sorted(valid)}")
            setattr(self, key, value)
        return self

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"

    def __sklearn_is_fitted__(self) -> bool:
        return hasattr(self, "coef_")

    def __sklearn_tags__(self) -> Any:
        from sklearn.utils import ClassifierTags, Tags, TargetTags

        return Tags(estimator_type="classifier", target_tags=TargetTags(required=True),
                    classifier_tags=ClassifierTags())

    def fit(self, X: np.ndarray, y: np.ndarray) -> NewtonLogisticRegression:
        """Fit on pooled data: the one-holder case of the federated fit."""
        X = np.asarray(X, dtype=np.float64)
        classes = np.unique(y)
        y_idx = np.searchsorted(classes, y)
        k = max(2, len(classes))
        solver = NewtonSolver(n_features=X.shape[1], n_classes=k, penalty=self.penalty, C=self.C, tol=self.tol,
                              positive=self._positive_mask(X.shape[1], k))
        for _ in range(self.max_iter):
            solver.step(newton_terms(solver.coef, X, y_idx, n_classes=k))
            if solver.converged:
                break
        return self.set_coef(solver.result(), n_features=X.shape[1], classes=classes,
                             converged=solver.converged, n_iter=solver.iterations)

    def _positive_mask(self, n_features: int, n_classes: int) -> np.ndarray | None:
        """Coefficients the fit keeps at or above zero (none here)."""
        return None

    def set_coef(self, coef: np.ndarray, *, n_features: int, classes: Any = None, converged: bool | None = None,
                 n_iter: int | None = None) -> NewtonLogisticRegression:
        """Install flat coefficients (e.g. from the federated solver) in scikit-learn's layout.

        ``classes`` defaults to ``0..K-1`` (K = 2 for one coefficient block); ``converged`` and
        ``n_iter`` record how the solver that produced ``coef`` ended.
        """
        blocks = np.asarray(coef, dtype=np.float64).reshape(-1, n_features + 1)
        self.coef_, self.intercept_ = blocks[:, :-1].copy(), blocks[:, -1].copy()
        self.n_features_in_ = n_features
        n_classes = 2 if blocks.shape[0] == 1 else blocks.shape[0]
        self.classes_ = np.arange(n_classes) if classes is None else np.asarray(classes)
        if len(self.classes_) != n_classes:
            raise ValueError(f"{len(self.classes_)} classes for coefficients of {n_classes} classes")
        self.converged_ = converged
        self.n_iter_ = n_iter
        return self

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        scores = np.asarray(X, dtype=np.float64) @ self.coef_.T + self.intercept_
        return scores.ravel() if scores.shape[1] == 1 else scores

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        scores = self.decision_function(X)
        if scores.ndim == 1:
            p = 1.0 / (1.0 + np.exp(-scores))
            return np.column_stack([1.0 - p, p])
        from scipy.special import softmax

        return softmax(scores, axis=1)

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.classes_[self.predict_proba(X).argmax(axis=1)]


class StackingMetaClassifier(NewtonLogisticRegression):
    """The stacking meta-classifier: logistic regression over the base models' log-odds.

    Its features are :func:`client.pipeline.meta_features` of the base models, clipped to
    :data:`META_FEATURE_BOUND`; see :class:`NewtonLogisticRegression` for the other parameters.

    Parameters
    ----------
    positive : keep each model's weight on its own evidence at or above zero (non-negative
        stacking, Breiman 1996). A negative weight says "believe the opposite of a model trained
        for the same target"; on a small validation split it is almost always noise fitted, and
        it is what made the hybrid lose to its own best base model on test data.
    """

    def __init__(self, *, penalty: Literal["l2"] | None = "l2", C: float = 1.0, max_iter: int = 100,
                 tol: float = 1e-10, positive: bool = True) -> None:
        super().__init__(penalty=penalty, C=C, max_iter=max_iter, tol=tol)
        self.positive = positive

    def _positive_mask(self, n_features: int, n_classes: int) -> np.ndarray | None:
        if not self.positive:
            return None
        return positive_evidence(n_models=n_features // (1 if n_classes == 2 else n_classes), n_classes=n_classes)
