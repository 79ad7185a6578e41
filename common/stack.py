"""The stack's model names, which both sides and the report agree on.

``MODEL_NAMES`` are the rows of ``metrics.json`` ``models`` (the contract's keys: ``logreg`` is
the federated GLM); ``BASE_MODELS`` are the meta-classifier's inputs, in its feature order;
``ALONE_MODELS`` are a site's own deep model and GLM trained on its data alone (its forest is
already its own), whose statistics a site releases beside the federated models' when the run
asks for ``site-alone``. ``REDUCED_STACKS`` are the fitted stack with one base model's weights set
to zero, released on the validation split only, so that the coordinator can choose the stack
without a model that only adds noise (:func:`server.phases._stacking_fallback`).
"""

from __future__ import annotations

MODEL_NAMES = ("hybrid", "cnn", "forest", "logreg")
BASE_MODELS = ("cnn", "forest", "logreg")
ALONE_MODELS = ("alone-cnn", "alone-logreg")
SITE_ALONE_ROWS = {"cnn": "alone-cnn", "forest": "forest", "logreg": "alone-logreg"}
"""A site alone: its deep model, forest and GLM, by the released model that holds each."""
REDUCED_STACKS = {f"hybrid-without-{m}": m for m in BASE_MODELS}
"""The stack without one base model, by the base model it leaves out."""


def released_models(*, site_alone: bool, split: str = "test") -> tuple[str, ...]:
    """The models whose statistics a site releases on ``split`` ("validation" or "test")."""
    reduced = tuple(REDUCED_STACKS) if split == "validation" else ()
    return MODEL_NAMES + reduced + (ALONE_MODELS if site_alone else ())
