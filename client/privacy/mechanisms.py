"""The Gaussian mechanisms of a site's releases other than DP-SGD.

Newton statistics (GLM and meta-classifier)
-------------------------------------------
Under DP a site releases, in every GLM or meta round, the gradient and Hessian of its unpenalised
log-loss at the coordinator's coefficients (:func:`common.meta.newton_terms`) with Gaussian noise
added, and charges that release to its privacy ledger. The unit protected is one record added to
or removed from the site's train split (GLM) or validation split (meta-classifier), as in the
DP-SGD accounting.

Sensitivity
-----------
The features are clipped to ``[-B, B]``: the meta features are base-model log-odds (or
log-probabilities), ``B =`` :data:`common.meta.META_FEATURE_BOUND`; the GLM's are the shared
standardized columns, ``B =`` :data:`common.tabular.CLIP`. They are clipped again here, so the
bound holds by construction. One record's design row ``z = [x, 1]`` has ``||z||^2 <= d B^2 + 1`` and adds

- to the gradient ``(p - e_y) (x) z``: L2 norm at most ``||z||`` (binary, ``|p - y| <= 1``) or
  ``sqrt(2) ||z||`` (K classes, ``||p - e_y|| <= sqrt(2)``);
- to the Hessian ``p (1 - p) z z^T`` (binary: Frobenius norm at most ``||z||^2 / 4``) or
  ``(diag(p) - p p^T) (x) z z^T`` (K classes: at most ``trace(diag(p) - p p^T) ||z||^2 <= ||z||^2``,
  the matrix being positive semi-definite).

Only the upper triangle of the symmetric Hessian is noised (the lower one is its mirror), and its
Frobenius norm is at most the whole matrix's. Dividing the gradient by its bound and the
triangle by its bound gives two blocks of sensitivity 1 each, hence a joint L2 sensitivity of
``sqrt(2)``: one Gaussian release with noise multiplier ``sigma`` adds noise of standard deviation
``sigma * sqrt(2) * bound`` to every entry of each block.

The log-loss itself is not released (its sensitivity grows with the coefficients), so the
coordinator takes plain Newton steps; the count ``n`` is the split size the census already
reported.

The GLM under DP releases only its gradient (:func:`private_glm_gradient`): rows are clipped in
L2 norm (not per column), so one record moves it by at most ``||z|| = sqrt(R^2 + 1)`` with
``R =`` :func:`common.tabular.glm_row_bound` (``sqrt(2)`` times that for K classes); see
:mod:`common.glm` for why no Hessian.

Moments of the shared preprocessing
-----------------------------------
:func:`noised_moments`: every value rescaled to ``[0, 1]`` by its column's public range, so one
record adds at most 1 to each count, sum and sum of squares: L2 sensitivity ``sqrt(3 d)``.
"""

from __future__ import annotations

import math

import numpy as np

from common.meta import NewtonTerms, newton_terms, statistic_bounds


def meta_noise_multiplier(*, epsilon: float, delta: float, rounds: int) -> float:
    """Noise multiplier for ``rounds`` releases that together spend ``epsilon`` at ``delta``."""
    from client.privacy.ledger import gaussian_noise_multiplier

    return gaussian_noise_multiplier(epsilon=epsilon, delta=delta, count=rounds)


def private_newton_terms(coef: np.ndarray, x: np.ndarray, y: np.ndarray, *, n_classes: int, bound: float,
                         noise_multiplier: float, rng: np.random.Generator) -> NewtonTerms:
    """Newton terms of clipped features with Gaussian noise; ``loss`` is NaN (not released).

    Parameters
    ----------
    coef : the coordinator's flat coefficients.
    x, y : meta features and labels of the site's validation split.
    n_classes : number of classes.
    bound : clipping bound of the features.
    noise_multiplier : the release's noise multiplier (charged to the ledger by the caller).
    rng : the noise source; seed it from a secret of the site, never from the run config.
    """
    x = np.clip(np.asarray(x, dtype=np.float64), -bound, bound)
    terms = newton_terms(coef, x, y, n_classes=n_classes)
    g_bound, h_bound = statistic_bounds(n_features=x.shape[1], n_classes=n_classes, bound=bound)
    scale = noise_multiplier * math.sqrt(2.0)
    grad = terms.grad + rng.normal(0.0, scale * g_bound, size=terms.grad.shape)
    upper = np.triu(rng.normal(0.0, scale * h_bound, size=terms.hess.shape))
    hess = terms.hess + upper + np.triu(upper, 1).T
    return NewtonTerms(float("nan"), grad, hess, terms.n)



def private_glm_gradient(coef: np.ndarray, x: np.ndarray, y: np.ndarray, *, n_classes: int,
                         noise_multiplier: float, rng: np.random.Generator) -> np.ndarray:
    """The DP GLM's release: the gradient of row-clipped inputs with Gaussian noise.

    Rows are clipped to :func:`common.tabular.glm_row_bound` again here, so the sensitivity
    :func:`common.glm.gradient_bound` holds by construction; the noise has deviation
    ``noise_multiplier * gradient_bound`` on every entry. No Hessian or loss is released: the
    coordinator uses a public curvature.
    """
    from common.glm import gradient_bound
    from common.tabular import clip_rows, glm_row_bound

    x = clip_rows(x, glm_row_bound(np.shape(x)[1]))
    grad = newton_terms(coef, x, y, n_classes=n_classes).grad
    sd = noise_multiplier * gradient_bound(n_features=x.shape[1], n_classes=n_classes)
    return grad + rng.normal(0.0, sd, size=grad.shape)


def noised_moments(moments: dict[str, np.ndarray], *, sensitivity: float, noise_multiplier: float,
                   rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The Gaussian mechanism on rescaled column moments (:func:`common.tabular.column_moments`).

    Every entry of count, sum and sum of squares gets N(0, (``noise_multiplier`` *
    ``sensitivity``)^2) noise: one release of L2 sensitivity ``sensitivity`` (one record adds at
    most 1 to each entry), charged to the ledger by the caller. The coordinator post-processes
    the noised sums (:func:`common.tabular.scaler_from_moments`).
    """
    for name, value in (("sensitivity", sensitivity), ("noise_multiplier", noise_multiplier)):
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    scale = noise_multiplier * sensitivity
    return {key: np.asarray(value, dtype=np.float64) + rng.normal(0.0, scale, size=np.shape(value))
            for key, value in moments.items()}


def attribution_sensitivity(clip: float) -> float:
    """L2 sensitivity of :func:`client.explain.attribution_sums`: one patient's clipped vector
    ``v`` (``||v|| <= clip``) adds ``v`` to the signed sum and ``|v|`` to the absolute one."""
    return math.sqrt(2.0) * clip


def noised_attribution_sums(sums: dict[str, np.ndarray], *, clip: float, noise_multiplier: float,
                            rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The Gaussian mechanism on a site's explanation summary (:func:`client.explain.attribution_sums`).

    Every entry of both sums gets N(0, (``noise_multiplier`` * ``sqrt(2) clip``)^2) noise: one
    release, charged to the ledger by the caller. The absolute sums are then clipped at zero,
    post-processing that costs no privacy.
    """
    for name, value in (("clip", clip), ("noise_multiplier", noise_multiplier)):
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    sd = noise_multiplier * attribution_sensitivity(clip)
    out = {key: np.asarray(value, dtype=np.float64) + rng.normal(0.0, sd, size=np.shape(value))
           for key, value in sums.items()}
    if "abs" in out:
        out["abs"] = np.maximum(out["abs"], 0.0)
    return out


def noised_release(arrays: dict[str, np.ndarray], *, sensitivity: float, noise_multiplier: float,
                   rng: np.random.Generator,
                   totals: dict[str, np.ndarray | int] | None = None) -> dict[str, np.ndarray]:
    """The Gaussian mechanism on a set of released counts (e.g. :func:`common.metrics.released_arrays`).

    Every entry of every array gets independent N(0, (``noise_multiplier`` * ``sensitivity``)^2)
    noise, so the set as a whole is one Gaussian release of L2 sensitivity ``sensitivity``,
    charged to the ledger by the caller with ``noise_multiplier``. The noised values are then
    made whole counts again, by post-processing of the DP release, which costs no privacy:

    - arrays with a known total in ``totals`` are projected onto the non-negative whole counts
      with that total (:func:`project_to_total`, row by row for a 2-D array). Where the total is
      public anyway (test class counts, sent at the census), this keeps the patient counts exact
      instead of adding phantom patients to sparse entries by clipping, and pooled sums keep their
      exact totals. It shrinks the bias clipping puts on pooled metrics but does not remove it:
      with noise far above the counts per entry, the entries kept are chosen largely by the noise;
    - the other arrays are rounded and clipped at 0. (Clipping at each site biases sparse
      entries upwards; see :func:`common.metrics.noise_bias`.)

    Parameters
    ----------
    arrays : name to array of counts, all of which are released together.
    sensitivity : L2 norm of one record's contribution to all the arrays together
        (:func:`common.metrics.released_sensitivity` for test statistics).
    noise_multiplier : noise standard deviation over sensitivity.
    rng : the noise source; seed it from a secret of the site, never from the run config.
    totals : optional name to known total: an int for a 1-D array, an int array of row totals
        for a 2-D one (:func:`common.metrics.released_totals` gives them for one model's test
        statistics). They must be public already (the projection reveals them) and equal the
        exact arrays' totals. Names left out, or ``None``, get rounding and clipping.

    Returns
    -------
    dict
        The same names, int64 arrays of the same shapes, all >= 0; arrays named in ``totals``
        sum (per row) exactly to their totals.

    Raises
    ------
    ValueError
        ``sensitivity`` or ``noise_multiplier`` not a finite number > 0 (a release without noise
        is not a DP release), non-finite values in ``arrays``, or ``totals`` naming an array that
        is not released, of the wrong shape, negative, or different from the exact array's totals.
    """
    for name, value in (("sensitivity", sensitivity), ("noise_multiplier", noise_multiplier)):
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    given = dict(totals or {})
    if unknown := sorted(set(given) - set(arrays)):
        raise ValueError(f"totals name arrays that are not released: {unknown}")
    std = noise_multiplier * sensitivity
    exact = {key: np.asarray(value, dtype=np.float64) for key, value in arrays.items()}
    for key, a in exact.items():
        if not np.all(np.isfinite(a)):
            raise ValueError(f"array {key!r} holds non-finite values")
    # The projection lives in common.metrics (common never imports client), so that the
    # coordinator's simulation of this mechanism (common.metrics.noise_bias) runs the same code.
    from common.metrics import project_rows_to_totals

    # Every check comes before the first noise draw: a refused release consumes no randomness.
    row_totals = {key: _row_totals(exact[key], total, key=key) for key, total in given.items()}
    out = {}
    for key, a in exact.items():
        noised = a + rng.normal(0.0, std, size=a.shape)
        if key in row_totals:
            out[key] = project_rows_to_totals(noised.reshape(-1, a.shape[-1]), totals=row_totals[key]).reshape(a.shape)
        else:
            out[key] = np.maximum(np.rint(noised), 0).astype(np.int64)
    return out


def _row_totals(a: np.ndarray, total: np.ndarray | int, *, key: str) -> np.ndarray:
    """``total`` as one int64 per row of ``a`` (1-D: one row), checked against ``a``'s own totals."""
    t = np.asarray(total)
    rows = 1 if a.ndim == 1 else a.shape[0] if a.ndim == 2 else -1
    if rows < 0 or t.shape != (() if a.ndim == 1 else (rows,)):
        raise ValueError(f"totals of {key!r} must be an int for a 1-D array or one int per row of a 2-D one,"
                         f" got shape {t.shape} for an array of shape {a.shape}")
    if t.dtype.kind not in "iu" or np.any(t < 0):
        raise ValueError(f"totals of {key!r} must be whole numbers >= 0, got {total!r}")
    t = t.reshape(rows).astype(np.int64)
    # A total that is not the array's own would move every released entry (the projection keeps
    # the stated total): a caller's bug, refused rather than released.
    if not np.array_equal(a.reshape(rows, -1).sum(axis=1), t):
        raise ValueError(f"totals of {key!r} differ from the array's own totals")
    return t


def simplex_projection(v: np.ndarray, total: float) -> np.ndarray:
    """Euclidean projection of ``v`` onto ``{x >= 0, sum(x) = total}``.

    The sort-based algorithm of Duchi, Shalev-Shwartz, Singer and Chandra (ICML 2008): the
    projection is ``max(v - theta, 0)`` for the one shift ``theta`` that gives the total.

    Parameters
    ----------
    v : (B,) finite values.
    total : finite number >= 0.

    Returns
    -------
    np.ndarray
        (B,) float64, >= 0, summing to ``total`` up to rounding.

    Raises
    ------
    ValueError
        ``v`` not a non-empty finite 1-D array, or ``total`` not a finite number >= 0.
    """
    v = np.asarray(v, dtype=np.float64)
    if v.ndim != 1 or v.size == 0 or not np.all(np.isfinite(v)):
        raise ValueError(f"v must be a non-empty finite 1-D array, got shape {v.shape}")
    if isinstance(total, bool) or not math.isfinite(total) or total < 0:
        raise ValueError(f"total must be a finite number >= 0, got {total!r}")
    from common.metrics import simplex_projection_rows

    return simplex_projection_rows(v[None, :], totals=np.array([float(total)]))[0]


def project_to_total(h: np.ndarray, *, total: int) -> np.ndarray:
    """The non-negative whole counts summing to ``total`` nearest to ``h`` (Euclidean distance).

    :func:`simplex_projection` first, then floors and one more count for the entries of the
    largest fractional parts until the total is reached (largest remainders; ties go to the
    lower index). That is the nearest point of the whole-count simplex itself: the distance is
    a separable convex function, and both give ``max(0, ceil(h_i - c))`` for one common shift
    ``c``. Non-negative whole counts that already sum to ``total`` are returned unchanged.

    Parameters
    ----------
    h : (B,) finite values, e.g. a noised histogram.
    total : the known total, an int >= 0 (0 gives all zeros).

    Returns
    -------
    np.ndarray
        (B,) int64, >= 0, summing exactly to ``total``.

    Raises
    ------
    ValueError
        ``h`` not a non-empty finite 1-D array, or ``total`` not an int >= 0.
    """
    h = np.asarray(h, dtype=np.float64)
    if h.ndim != 1 or h.size == 0 or not np.all(np.isfinite(h)):
        raise ValueError(f"h must be a non-empty finite 1-D array, got shape {h.shape}")
    if isinstance(total, bool) or not isinstance(total, int | np.integer) or total < 0:
        raise ValueError(f"total must be an int >= 0, got {total!r}")
    from common.metrics import project_rows_to_totals

    return project_rows_to_totals(h[None, :], totals=np.array([total], dtype=np.int64))[0]
