"""Local explanations on a site: per-patient attributions, grouped by feature, clipped and summed.

A site explains its models on its own records. Per-patient attributions never leave it: what a
site may release is, per explanation feature, the sum over its patients of the attribution and of
its absolute value, after each patient's whole attribution vector was clipped to an L2 norm
``clip``. One patient then moves the pair of sums by at most ``sqrt(2) * clip`` (L2), which is
what the noise of :func:`client.privacy.mechanisms.noised_attribution_sums` is calibrated to.

Explanation features are what a clinician names: a numeric column, a categorical variable (its
one-hot columns summed: attributions of the forest's TreeSHAP and of a linear model are additive,
so the sum is the variable's attribution), a sequence-derived feature. Every site of a run has
the same ones, in the same order, because they come from the agreed schema.

Attributions are arrays of shape ``(n_patients, n_outputs, n_columns)``: one output for a binary
model (class 1: probability for the forest, log-odds for the GLM), one per class otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from common.explanation import ExplanationFeatures, feature_layout  # noqa: F401 - re-exported for callers

__all__ = ["ExplanationFeatures", "feature_layout"]


def clip_patients(phi: np.ndarray, *, clip: float, normalize: bool = False) -> np.ndarray:
    """Each patient's whole attribution array scaled down to L2 norm at most ``clip``; with
    ``normalize``, scaled to exactly ``clip`` (an all-zero array stays zero), so that every patient
    weighs the same in a sum whatever the scale of the model's output."""
    from common.tabular import clip_rows

    if not np.isfinite(clip) or clip <= 0:
        raise ValueError(f"clip must be a finite number > 0, got {clip!r}")
    phi = np.asarray(phi, dtype=np.float64)
    flat = phi.reshape(len(phi), -1)
    if normalize:
        norm = np.linalg.norm(flat, axis=1, keepdims=True)
        return (flat * np.where(norm > 0, clip / np.maximum(norm, 1e-300), 0.0)).reshape(phi.shape)
    return clip_rows(flat, clip).reshape(phi.shape)


def attribution_sums(phi: np.ndarray, *, clip: float, normalize: bool = False) -> dict[str, np.ndarray]:
    """The releasable summary of grouped attributions: ``signed`` (sum of each patient's clipped
    attributions) and ``abs`` (sum of their absolute values), each ``(outputs, features)``."""
    clipped = clip_patients(phi, clip=clip, normalize=normalize)
    return {"signed": clipped.sum(axis=0), "abs": np.abs(clipped).sum(axis=0)}


def forest_attributions(forest: object, x: np.ndarray, *, n_classes: int) -> np.ndarray:
    """TreeSHAP attributions of a fitted :class:`client.forest.SiteForest` (probability scale) over
    the explained outputs of a cohort of ``n_classes`` (:func:`cohort_outputs`).

    Returns ``(n, outputs, columns)``; with :func:`forest_expected_value`, each patient's row sums
    to the forest's probability of the class (additivity is checked by shap).
    """
    import shap

    return tree_shap(shap.TreeExplainer(forest.forest_), x, classes=forest.classes_, n_classes=n_classes)


def tree_shap(explainer: object, x: np.ndarray, *, classes: Sequence[int], n_classes: int) -> np.ndarray:
    """TreeSHAP values ``(n, outputs, columns)`` from a prepared ``shap.TreeExplainer`` of a forest
    that saw ``classes`` (:func:`cohort_outputs`): build the explainer once to explain many calls."""
    values = np.asarray(explainer.shap_values(np.asarray(x, dtype=np.float64)))  # (n, columns, seen classes)
    return cohort_outputs(np.moveaxis(values, -1, 1), classes, n_classes)


def cohort_outputs(per_class: np.ndarray, classes: Sequence[int], n_classes: int) -> np.ndarray:
    """Values per class a site model saw ``(n, seen classes, ...)`` as the cohort's explained outputs:
    class 1 of two classes, every class of more; a class the site's train split lacked gets zeros (the
    model gives it no probability to attribute)."""
    full = np.zeros((per_class.shape[0], n_classes, *per_class.shape[2:]))
    full[:, np.asarray(classes, dtype=int)] = per_class
    return full[:, 1:2] if n_classes == 2 else full


def forest_expected_value(forest: object, *, n_classes: int) -> np.ndarray:
    """The forest's expected output per explained output (what the attributions are relative to)."""
    import shap

    return explainer_expected_value(shap.TreeExplainer(forest.forest_), classes=forest.classes_, n_classes=n_classes)


def explainer_expected_value(explainer: object, *, classes: Sequence[int], n_classes: int) -> np.ndarray:
    """A prepared explainer's expected output per explained output (:func:`cohort_outputs`)."""
    ev = np.atleast_1d(np.asarray(explainer.expected_value, dtype=np.float64))
    return cohort_outputs(ev[None, :], classes, n_classes)[0]


def linear_attributions(coef: np.ndarray, x: np.ndarray, *, n_classes: int) -> np.ndarray:
    """Exact attributions of a linear model on centred inputs: ``coef_j * x_j`` per output.

    ``coef`` is the flat coefficient vector of :class:`common.meta.NewtonLogisticRegression`
    (per output row: weights, then the intercept); ``x`` is standardized with the shared scaler,
    so zero is the federation's mean and the attributions are relative to it (log-odds scale).
    """
    x = np.asarray(x, dtype=np.float64)
    rows = np.asarray(coef, dtype=np.float64).reshape(1 if n_classes <= 2 else n_classes, x.shape[1] + 1)
    return x[:, None, :] * rows[None, :, :-1]


def site_glm_rows(glm: object, *, classes: Sequence[int], n_classes: int) -> np.ndarray:
    """A site's own GLM as flat coefficients over every explained output (the layout of
    :func:`linear_attributions`: per output, weights then the intercept).

    The site's train split may lack classes of a multi-class cohort: an output the GLM has no score
    for gets zero weights (no attribution); with two classes seen its one row is the second seen
    class's score against the first's.
    """
    coef = np.column_stack([np.atleast_2d(glm.coef_), np.atleast_1d(glm.intercept_)])
    if n_classes <= 2:
        return coef[:1].ravel()
    rows = np.zeros((n_classes, coef.shape[1]))
    seen = np.asarray(classes, dtype=int)
    if len(coef) == 1:
        rows[seen[-1]] = coef[0]
    else:
        rows[seen] = coef
    return rows.ravel()


def deep_attributions(model: object, inputs: Sequence[np.ndarray], *, steps: int = 64,
                      batch_size: int = 16) -> list[np.ndarray]:
    """Integrated gradients of the deep model from an all-zero baseline, one array per input.

    The explained outputs are the log-odds of class 1 (binary) or each class's log-probability.
    The baseline is zero for every input: no base at any position of a one-hot track, and the
    federation's mean for the dense branch (its inputs are standardized with the shared scaler).
    Returns, for each input of shape ``(n, *shape)``, attributions ``(n, outputs, *shape)`` whose
    sum over all inputs approximates output(x) - output(0) (completeness).

    The path integral is taken on ``alpha = t^2`` with ``steps`` midpoints in ``t``: GroupNorm
    makes the output change fastest near the all-zero baseline, where this puts more points. The
    completeness error falls about as 1 / ``steps``; on small random networks it stays under 1% of
    the explained difference at 512 steps (tests/test_explain.py).
    """
    import torch

    model.eval()
    t = (torch.arange(steps, dtype=torch.float64) + 0.5) / steps
    alphas, weights = t**2, 2.0 * t / steps  # d(alpha) = 2 t dt
    out: list[list[np.ndarray]] = [[] for _ in inputs]
    for start in range(0, len(inputs[0]), batch_size):
        xs = [torch.as_tensor(np.asarray(a[start:start + batch_size]), dtype=torch.float32) for a in inputs]
        for i, (x, g) in enumerate(zip(xs, _path_gradients(model, xs, alphas, weights))):
            out[i].append((x.unsqueeze(1).double() * g).numpy())
    return [np.concatenate(parts) for parts in out]


def _path_gradients(model: object, xs: list, alphas: object, weights: object) -> list:
    """The weighted sum of every explained output's gradient along the path from zero to ``xs``,
    all path points of a batch in one forward pass."""
    import torch

    b, m = len(xs[0]), len(alphas)
    scale = alphas.float().repeat_interleave(b)
    scaled = [(x.repeat(m, *([1] * (x.dim() - 1))) * scale.view(-1, *([1] * (x.dim() - 1)))).requires_grad_(True)
              for x in xs]
    outputs = _explained_outputs(model(*scaled))
    w = weights.repeat_interleave(b)
    result = []
    per_output = [torch.autograd.grad(outputs[:, k].sum(), scaled, retain_graph=k + 1 < outputs.shape[1])
                  for k in range(outputs.shape[1])]
    for i, x in enumerate(xs):
        g = torch.stack([per_output[k][i] for k in range(len(per_output))], dim=1).double()  # (m b, K, ...)
        g = g * w.view(-1, *([1] * (g.dim() - 1)))
        result.append(g.view(m, b, *g.shape[1:]).sum(dim=0))
    return result


def _explained_outputs(logits: object) -> object:
    import torch

    if logits.shape[1] == 2:
        return (logits[:, 1] - logits[:, 0]).unsqueeze(1)
    return torch.log_softmax(logits, dim=1)


def position_profile(track_attributions: np.ndarray) -> np.ndarray:
    """Per-position importance of a track: attributions ``(n, outputs, channels, L)`` summed over
    channels into ``(n, outputs, L)`` (for a one-hot track, the observed base's attribution)."""
    return np.asarray(track_attributions).sum(axis=2)


def motif_sums(codes: np.ndarray, profile: np.ndarray, layout: object, *, clip: float,
               normalize: bool = False) -> np.ndarray:
    """Clipped sums of each patient's motif attributions, ``(outputs, n_kmers, bins)``.

    A patient's attribution for the k-mer starting at position ``l`` is its position profile
    summed over the k-mer's ``k`` positions; that is added to the key (k-mer, position bin) of
    :class:`common.explanation.MotifLayout` (k-mers with an N are skipped). Each patient's whole
    array (all outputs) is clipped to L2 norm ``clip`` before it is added, so one patient moves the
    sum by at most ``clip`` (with ``normalize``, every patient's array is scaled to norm ``clip``). Built one patient at a time from its few nonzero keys: the dense
    array per patient would be ``4^k`` times the bins.

    Parameters
    ----------
    codes : ``(n, L)`` base codes of the track (A0 C1 G2 T3, N4).
    profile : ``(n, outputs, L)`` per-position attributions (:func:`position_profile`).
    """
    from common.explanation import kmer_codes

    if not np.isfinite(clip) or clip <= 0:
        raise ValueError(f"clip must be a finite number > 0, got {clip!r}")
    profile = np.asarray(profile, dtype=np.float64)
    n, n_out, length = profile.shape
    k = layout.k
    keys, whole = kmer_codes(codes, layout)
    cum = np.concatenate([np.zeros((n, n_out, 1)), np.cumsum(profile, axis=2)], axis=2)
    window = cum[:, :, k:] - cum[:, :, :length - k + 1]  # (n, outputs, L - k + 1)
    bins = layout.bin_of(np.arange(length - k + 1))
    per_output = layout.n_kmers * layout.bins
    flat = np.zeros(n_out * per_output)
    for i in range(n):
        ok = whole[i]
        cell = keys[i, ok] * layout.bins + bins[ok]
        index = (np.arange(n_out)[:, None] * per_output + cell[None, :]).ravel()
        unique, inverse = np.unique(index, return_inverse=True)
        values = np.bincount(inverse, weights=window[i][:, ok].ravel(), minlength=len(unique))
        norm = np.linalg.norm(values)
        scale = clip / max(norm, 1e-300) if normalize else min(1.0, clip / max(norm, 1e-300))
        np.add.at(flat, unique, values * (scale if norm > 0 else 0.0))
    return flat.reshape(n_out, layout.n_kmers, layout.bins)
