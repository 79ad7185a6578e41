"""The stack's model names, which both sides and the report agree on.

``MODEL_NAMES`` are the rows of ``metrics.json`` ``models`` (the contract's keys: ``logreg`` is
the federated GLM, ``site-logreg`` each site's own GLM); ``BASE_MODELS`` are the
meta-classifier's inputs, in its feature order; ``LOCAL_MODELS`` are the base models each site
fits on its own train split and never sends (fitted without DP, like a hospital alone; only
statistics about them are released): what ``stack-forest = false`` keeps out of the stack.
``ALONE_MODELS`` are a site's own deep model trained on its data alone (its forest and GLM are
already its own), whose statistics a site releases beside the federated models' when the run asks
for ``site-alone``. ``REDUCED_STACKS`` are the fitted stack with some base models' weights set to
zero (each model in turn, and both shared models at once), released on the validation split only,
so that the coordinator can choose the stack without models that only add noise
(:func:`server.phases._stacking_fallback`); :func:`reduced_stacks` says which of them a run releases.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

MODEL_NAMES = ("hybrid", "cnn", "forest", "logreg", "site-logreg")
BASE_MODELS = ("cnn", "forest", "logreg", "site-logreg")
LOCAL_MODELS = ("forest", "site-logreg")
ALONE_MODELS = ("alone-cnn",)
SITE_ALONE_ROWS = {"cnn": "alone-cnn", "forest": "forest", "logreg": "site-logreg"}
"""A site alone: its deep model, forest and GLM, by the released model that holds each."""
SHARED_MODELS = ("cnn", "logreg")
"""The base models trained by the federation (under DP, the DP-trained ones)."""
REDUCED_STACKS = {**{f"hybrid-without-{m}": (m,) for m in BASE_MODELS}, "hybrid-without-cnn-logreg": SHARED_MODELS}
"""The stack without some base models, by the models it leaves out: each in turn, and both shared
ones (the site's own models weighted by the federation: under DP at small sites the DP-trained
models can be noise that no single leave-out removes; docs/learning.md)."""
SITE_AVERAGE = "hybrid-without-cnn-logreg"
"""The site's own forest and GLM averaged with equal weights: the stack without both shared models,
and what the coordinator prefers to either site model alone unless that one leads it on validation
by more than ``site-average-margin`` standard errors (:func:`server.phases._stacking_fallback`)."""
AVERAGED_STACKS = (SITE_AVERAGE,)
"""Reduced stacks that average the models they keep with equal weights and no intercept
(:func:`common.meta.averaging_prior`) instead of keeping their fitted weights: leaving out both shared
models is what the coordinator chooses when they are noise, and then the fitted weights of the site's
own models were estimated against that noise too; on about 300 validation patients an estimated
weighting ranks worse than the plain average of calibrated models (the forecast combination puzzle)."""


def choose_stack(auc: Mapping[str, float], *, stacks: Sequence[str], candidates: Sequence[str], se: float,
                 margin_se: float, site_average_se: float) -> tuple[str, str, str]:
    """The stacking decision on validation AUCs: ``(best base model, best stack, what the hybrid is)``.

    ``stacks`` are the full stack (``"hybrid"``, which wins ties: it is what was fitted) and the
    reduced ones; ``candidates`` the base models it must beat by ``margin_se`` times ``se`` (the
    best base model's AUC standard error). Failing that, the hybrid is that base model, or the
    site's two models averaged (:data:`SITE_AVERAGE`) when that model is one of them and leads the
    average by at most ``site_average_se`` times ``se``. One rule for the run
    (:func:`server.phases._stacking_fallback`) and its offline replays.
    """
    def score(m: str) -> float:
        return -1.0 if math.isnan(auc[m]) else auc[m]

    best = max(candidates, key=score)
    stack = max(stacks, key=lambda m: (score(m), m == "hybrid"))
    if auc[stack] > auc[best] + margin_se * se:
        return best, stack, stack
    average = auc.get(SITE_AVERAGE, math.nan)
    if best in LOCAL_MODELS and not math.isnan(average) and auc[best] - average <= site_average_se * se:
        return best, stack, SITE_AVERAGE
    return best, stack, best


def left_out_words(stack: str) -> str:
    """The models a reduced stack leaves out, for a sentence ("logreg", "cnn and the logreg")."""
    return " and the ".join(REDUCED_STACKS[stack])


def reduced_stack_weights(name: str, coef: Any, *, n_classes: int) -> Any:
    """The flat meta coefficients of the reduced stack ``name`` built from the fitted ``coef``: the
    same on every site (which releases its statistics) and at the coordinator (which may choose it)."""
    from common.meta import averaging_prior, reduced_stack_coef

    left_out = [BASE_MODELS.index(m) for m in REDUCED_STACKS[name]]
    if name in AVERAGED_STACKS:
        # The plain average of the kept models' calibrated log-odds, no intercept: the scale of one
        # site model alone. Under DP the fitted total (0.37-1.21 in measured runs) is noise, and a
        # small one squeezed the average into a few of the 32 released bins (docs/learning.md).
        return averaging_prior(n_models=len(BASE_MODELS), n_classes=max(n_classes, 2), left_out=left_out)
    return reduced_stack_coef(coef, n_models=len(BASE_MODELS), n_classes=max(n_classes, 2), index=left_out)


def stacked_models(*, stack_local: bool) -> tuple[str, ...]:
    """The base models the hybrid may read: all, or (``stack-forest = false``) all but the
    site-local ones, which are fitted without DP."""
    return tuple(m for m in BASE_MODELS if stack_local or m not in LOCAL_MODELS)


def local_indices(*, stack_local: bool) -> tuple[int, ...]:
    """Positions in :data:`BASE_MODELS` of the models left out of the stack (none, or the local ones)."""
    return () if stack_local else tuple(BASE_MODELS.index(m) for m in LOCAL_MODELS)


def reduced_stacks(*, stack_local: bool = True) -> dict[str, tuple[str, ...]]:
    """The reduced stacks worth releasing: those that leave out at least one model the hybrid
    reads and keep at least one. With ``stack-forest = false`` the others are the fitted stack
    itself or a stack of nothing, whose statistics would only add noise to the release."""
    stacked = stacked_models(stack_local=stack_local)
    return {name: out for name, out in REDUCED_STACKS.items()
            if any(m in stacked for m in out) and any(m not in out for m in stacked)}


def released_models(*, site_alone: bool, split: str = "test", stack_local: bool = True) -> tuple[str, ...]:
    """The models whose statistics a site releases on ``split`` ("validation" or "test")."""
    reduced = tuple(reduced_stacks(stack_local=stack_local)) if split == "validation" else ()
    return MODEL_NAMES + reduced + (ALONE_MODELS if site_alone else ())


def fallback_words(fb: dict[str, Any]) -> str:
    """A stacking decision other than the fitted stack, in words ("" when the stack kept its fit).

    ``fb`` is ``metrics.json`` ``meta.fallback``: the same sentence goes to the run log, the
    report and the demo's printout.
    """
    model = fb.get("model")
    if not model:
        return ""
    auc = fb["validation_auc"]
    se = fb.get("margin_se", 1.0)
    what = "its standard error" if se == 1.0 else f"{se:g} standard errors of it"
    margin = f" by more than {what} ({fb['margin']:.3f})" if fb.get("margin") else ""
    if fb.get("reason") == "site-average":
        best = fb["best_base"]
        return (f"no stack beat the {best}'s validation AUC ({auc[best]:.3f}){margin}, and the {best} did not lead the site's "
                f"own forest and GLM averaged with equal weights ({auc[model]:.3f}) by more than "
                f"{fb['site_average_se']:g} standard errors ({fb['site_average_margin']:.3f}), so the hybrid is that "
                "average: a smaller lead is within the validation split's noise, and the average of two calibrated "
                "models is the safer choice (site-average-margin; decided on the sites' summed validation "
                "statistics).")
    public = fb.get("weights") == "public"  # DP with meta-dp-rounds = 0: the stacks are plain averages
    if model in REDUCED_STACKS and public:
        return (f"the average without the {left_out_words(model)} had a higher validation AUC ({auc[model]:.3f}) than "
                f"the average of all the base models ({auc['hybrid']:.3f}) and every base model (best: the "
                f"{fb['best_base']}, {auc[fb['best_base']]:.3f}), so the hybrid is that average (public weights; "
                "decided on the sites' summed validation statistics).")
    if model in REDUCED_STACKS:
        left_out = left_out_words(model)
        weight = f"the {left_out}'s weight" if len(REDUCED_STACKS[model]) == 1 else f"the weights of the {left_out}"
        rest = " and the others averaged with equal weights" if model in AVERAGED_STACKS else ""
        return (f"the stack without the {left_out} had a higher validation AUC ({auc[model]:.3f}) than the full "
                f"stack ({auc['hybrid']:.3f}) and every base model (best: the {fb['best_base']}, "
                f"{auc[fb['best_base']]:.3f}), so the hybrid is the meta-classifier with {weight} set "
                f"to zero{rest} (decided on the sites' summed validation statistics).")
    stack = fb.get("best_stack", "hybrid")
    full = "the base models' average" if public else "the meta-classifier"
    which = f"{full}'s validation AUC ({auc[stack]:.3f})" if stack == "hybrid" else \
        f"the best stack, the one without the {left_out_words(stack)}, reached a validation AUC of {auc[stack]:.3f} and"
    return (f"{which} did not beat the {model}'s "
            f"({auc[model]:.3f}){margin}, so the hybrid is the {model} (stacking fallback, decided on "
            "the sites' summed validation statistics).")
