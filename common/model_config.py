"""The deep model's configuration derived from a cohort schema.

The coordinator never sees data, yet it must build the global network before the first
round; sites must build exactly the same one. Both derive it here, from the schema every site
already agrees on (its hash is checked at the census), so the shapes cannot drift apart.

Which inputs the deep model reads (``tracks = "auto"``): the DNA track when the cohort has
sequences; else the genotype dosage track; else, with no track at all, the tabular features
through the dense branch. Tabular data and variants stay out of the deep model when DNA exists,
keeping the two base models complementary (sequence vs tabular), which is what stacking
combines; on our synthetic cohorts a second, dosage tower also stalled the DNA tower's training.
"""

from __future__ import annotations

from typing import Any, Literal

from common.models import DeepModelConfig, TrackShape


def feature_count(listed: list[Any] | int) -> int:
    """How many features a schema entry names: a list of names, or (in the public schema a site
    sends at the census, :func:`client.handlers.public_schema`) just their count."""
    return listed if isinstance(listed, int) else len(listed)


def track_shapes(schema: dict[str, Any]) -> tuple[TrackShape, ...]:
    """Every track a cohort with this schema provides, in canonical order."""
    shapes = []
    if "sequences" in schema:
        shapes.append(TrackShape("dna", 4, int(schema["sequences"]["length"])))
    if "variants" in schema and schema["variants"].get("sites") is not None:
        shapes.append(TrackShape("dosage", 2, feature_count(schema["variants"]["sites"]), positional=True))
    return tuple(shapes)


def tabular_width(schema: dict[str, Any]) -> int:
    """Columns of the preprocessed tabular matrix (numeric features + one-hot categories)."""
    width = 0
    for kind, key in (("variants", "sites"), ("omics", "features"), ("events", "features")):
        if kind in schema and schema[kind].get(key) is not None:
            width += feature_count(schema[kind][key])
    if "clinical" in schema:
        width += len(schema["clinical"]["numeric"])
        width += sum(len(v) for v in schema["clinical"]["categorical"].values())
    return width


def deep_config_for_schema(schema: dict[str, Any], *, tracks: Literal["auto", "all"] = "auto",
                           **arch: Any) -> DeepModelConfig:
    """The deep model for cohorts with ``schema`` (see the module docstring for ``tracks``)."""
    shapes = track_shapes(schema)
    if tracks == "auto" and shapes:
        shapes = tuple(s for s in shapes if s.name == "dna") or shapes[:1]
    n_tab = 0 if shapes else tabular_width(schema)
    return DeepModelConfig(n_classes=len(schema["label"]["classes"]), tracks=shapes, n_tabular=n_tab, **arch)
