"""The explanation summaries' shared layout: k-mer keys, position bins, and reading motifs back.

Sites release, per explained output, the clipped sum of their patients' attributions for every
(k-mer, position bin) key (:func:`client.explain.motif_sums`); the coordinator reads the top
motifs from the summed, noised array with :func:`top_motifs`. Both sides agree on the layout here:
a k-mer's key is its base-4 code in A, C, G, T order; with ``canonical`` (sequences whose
orientation carries no meaning) a k-mer and its reverse complement share the smaller key.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from common.stack import BASE_MODELS

BASES = "ACGT"
RESOLVED_KINDS = (("variants", "sites", "variant"), ("omics", "features", "omics"), ("events", "features", "events"))
"""Feature lists a site may resolve from its own files: named only by position outside the site."""


@dataclass(frozen=True)
class ExplanationFeatures:
    """Explanation features and, for each encoded column, the feature it belongs to."""

    names: tuple[str, ...]
    column_feature: np.ndarray  # encoded column -> index into ``names``

    @classmethod
    def from_columns(cls, column_names: Sequence[str], *, categorical: Sequence[str] = ()) -> ExplanationFeatures:
        """Group encoded columns: ``"smoker=current"`` belongs to ``"smoker"`` when ``smoker`` is
        categorical; every other column is a feature of its own. Order of first appearance."""
        cats = set(categorical)
        names: list[str] = []
        index: dict[str, int] = {}
        owner = []
        for col in column_names:
            base, sep, _ = col.partition("=")
            feature = base if sep and base in cats else col
            if feature not in index:
                index[feature] = len(names)
                names.append(feature)
            owner.append(index[feature])
        return cls(tuple(names), np.asarray(owner, dtype=np.int64))

    def group(self, phi: np.ndarray) -> np.ndarray:
        """Per-column attributions ``(n, outputs, columns)`` summed into ``(n, outputs, features)``."""
        phi = np.asarray(phi, dtype=np.float64)
        if phi.shape[-1] != len(self.column_feature):
            raise ValueError(f"attributions have {phi.shape[-1]} columns, the features were built from "
                             f"{len(self.column_feature)}")
        out = np.zeros((*phi.shape[:-1], len(self.names)))
        np.add.at(np.moveaxis(out, -1, 0), self.column_feature, np.moveaxis(phi, -1, 0))
        return out


    @property
    def kinds(self) -> tuple[str, ...]:
        """Each feature's kind: variant, omics, events, clinical, kmer or position."""
        return tuple(_kind_of(n) for n in self.names)


def _kind_of(label: str) -> str:
    if label.startswith("pos") and label[3:].isdigit():
        return "position"
    head, sep, _ = label.partition("#")
    if sep:
        return head
    return label.partition(":")[0]


def feature_layout(schema: dict[str, Any], *, named: bool = False) -> ExplanationFeatures:
    """The explanation features of cohorts with ``schema``, over the shared columns.

    The shared columns (:func:`common.tabular.shared_columns`: numeric features, one-hot clinical
    categories, sequence-derived features; also the forest's columns) are grouped into features a
    clinician names: a categorical variable is one feature, and so is one position of a short
    sequence's one-hot. Labels are public by default: lists a site resolves from its own files
    (variant sites, omics and event features) are named by 1-based position (``variant#6``),
    because their names can reveal what a hospital's patients carry; with ``named`` (on a site,
    from its full schema) they carry the site's own names, in the same order.
    """
    from common.model_config import feature_count
    from common.tabular import KMER, POSITIONAL_MAX_LENGTH

    columns: list[str] = []
    for kind, key, label in RESOLVED_KINDS:
        listed = schema.get(kind, {}).get(key)
        if listed is None:
            continue
        if named and isinstance(listed, int):
            raise ValueError(f"the schema lists only the number of {kind} {key}: names need the site's own schema")
        columns += [f"{label}:{v}" if named else f"{label}#{i + 1}"
                    for i, v in enumerate(listed if named else range(feature_count(listed)))]
    categorical: list[str] = []
    if "clinical" in schema:
        columns += [f"clinical:{n}" for n in schema["clinical"]["numeric"]]
        for name, values in schema["clinical"]["categorical"].items():
            categorical.append(f"clinical:{name}")
            columns += [f"clinical:{name}={v}" for v in values]
    if "sequences" in schema:
        length = int(schema["sequences"]["length"])
        columns += [f"kmer:{kmer_string(i, KMER)}" for i in range(4**KMER)]
        if length <= POSITIONAL_MAX_LENGTH:
            columns += [f"pos{i + 1}={b}" for i in range(length) for b in BASES]
            categorical += [f"pos{i + 1}" for i in range(length)]
    return ExplanationFeatures.from_columns(columns, categorical=categorical)




@dataclass(frozen=True)
class MotifLayout:
    """k-mer length, position bins over a track of ``length`` positions, and orientation."""

    k: int
    bins: int
    length: int
    canonical: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.k <= 10:
            raise ValueError(f"motif k-mer length must be 1-10, got {self.k}")
        if self.bins < 1 or self.length < self.k:
            raise ValueError(f"need at least one bin and a track of at least k={self.k} positions")

    @property
    def n_kmers(self) -> int:
        return 4**self.k

    @property
    def shape(self) -> tuple[int, int]:
        """(k-mer keys, position bins) per explained output."""
        return self.n_kmers, self.bins

    def bin_of(self, start: np.ndarray) -> np.ndarray:
        """The position bin of each k-mer start."""
        return np.minimum(np.asarray(start) * self.bins // (self.length - self.k + 1), self.bins - 1)

    def bin_range(self, b: int) -> tuple[int, int]:
        """First and last k-mer start (0-based) of position bin ``b``."""
        starts = np.arange(self.length - self.k + 1)
        inside = starts[self.bin_of(starts) == b]
        return int(inside[0]), int(inside[-1])


def kmer_codes(codes: np.ndarray, layout: MotifLayout) -> tuple[np.ndarray, np.ndarray]:
    """Keys of the k-mer starting at each position of ``(n, L)`` base codes (A0 C1 G2 T3, N4),
    shape ``(n, L - k + 1)``, and whether each is whole (no N in it)."""
    codes = np.asarray(codes, dtype=np.int64)
    windows = np.lib.stride_tricks.sliding_window_view(codes, layout.k, axis=1)
    whole = (windows < 4).all(axis=2)
    keys = (np.where(windows < 4, windows, 0) * (4 ** np.arange(layout.k - 1, -1, -1))).sum(axis=2)
    if layout.canonical:
        keys = np.minimum(keys, reverse_complement_key(keys, layout.k))
    return keys, whole


def reverse_complement_key(keys: np.ndarray, k: int) -> np.ndarray:
    """The key of each k-mer's reverse complement."""
    keys = np.asarray(keys, dtype=np.int64)
    out = np.zeros_like(keys)
    for _ in range(k):
        out = out * 4 + (3 - keys % 4)
        keys = keys // 4
    return out


def kmer_string(key: int, k: int) -> str:
    """The k-mer of a key."""
    return "".join(BASES[(int(key) // 4 ** (k - 1 - i)) % 4] for i in range(k))


def top_motifs(sums: np.ndarray, layout: MotifLayout, *, n_patients: int, top: int = 10,
               output_names: list[str] | None = None) -> list[dict[str, Any]]:
    """The strongest motifs in summed motif attributions ``(outputs, n_kmers, bins)``.

    A motif's score is its attribution summed over position bins, per patient (``n_patients``:
    the records the sums cover); it is reported at the bin where most of that attribution sits.
    For a binary model the one output is class 1's log-odds, otherwise each class's
    log-probability: positive scores are evidence for the output, negative ones against it.
    Motifs are ranked by their score, evidence for the output first: what a motif logo of a class
    should show (a donor site's GT for the donor class, not the donor GT that speaks against an
    acceptor).
    """
    sums = np.asarray(sums, dtype=np.float64)
    names = output_names or [f"output {i}" for i in range(sums.shape[0])]
    found = []
    for o, per_key in enumerate(sums):
        score = per_key.sum(axis=1) / max(n_patients, 1)
        for key in np.argsort(-score, kind="stable")[:top]:
            b = int(np.argmax(np.abs(per_key[key])))
            first, last = layout.bin_range(b)
            found.append({"output": names[o], "kmer": kmer_string(int(key), layout.k), "score": float(score[key]),
                          "positions": [first + 1, last + layout.k], "bin": b})
    return found


# ---------------------------------------------------------------------------------------------
# The explanation release: what a site sends, and the global explanation read from the sums

BASE_SHARE_MODELS = BASE_MODELS
"""The base models whose share of the meta-classifier's evidence a site sums (common.stack order)."""

TABULAR_MODELS = {"forest": "probability", "logreg": "log-odds", "site-logreg": "log-odds"}
"""The models explained per feature, with the scale of their attributions: the site's forest
(TreeSHAP), the federated GLM and the site's own GLM (exact linear attributions)."""

FORMAT = "genofed-explanation"
VERSION = 1


def n_outputs(n_classes: int) -> int:
    """Explained outputs: class 1 of a binary problem, every class otherwise."""
    return 1 if n_classes <= 2 else n_classes


def output_names(classes: Sequence[str]) -> list[str]:
    """The explained outputs' names."""
    return [str(classes[1])] if len(classes) <= 2 else [str(c) for c in classes]


def motif_layout(schema: dict[str, Any], model_config: dict[str, Any], *, k: int, bins: int) -> MotifLayout | None:
    """Where motifs are summed: the deep model's ``dna`` track, if it reads one."""
    dna = next((t for t in model_config.get("tracks", []) if t["name"] == "dna"), None)
    if dna is None or int(dna["length"]) < k:
        return None
    canonical = schema.get("sequences", {}).get("strand") == "either"
    return MotifLayout(k=k, bins=min(bins, int(dna["length"]) - k + 1), length=int(dna["length"]),
                       canonical=canonical)


def summary_shapes(schema: dict[str, Any], *, n_classes: int, model_config: dict[str, Any],
                   motifs: MotifLayout | None) -> dict[str, tuple[int, ...]]:
    """Every array of a site's explanation release, name -> shape (functions of the agreed schema,
    the model layout and the run config; never of a site's counts)."""
    n_out, width = n_outputs(n_classes), len(feature_layout(schema).names)
    shapes: dict[str, tuple[int, ...]] = {}
    for model in TABULAR_MODELS:
        shapes |= {f"{model}.signed": (n_out, width), f"{model}.abs": (n_out, width)}
    for track in model_config.get("tracks", []):
        shapes |= {f"profile.{track['name']}.signed": (n_out, int(track["length"])),
                   f"profile.{track['name']}.abs": (n_out, int(track["length"]))}
    if motifs is not None:
        shapes["motifs.dna"] = (n_out, *motifs.shape)
    shapes["shares"] = (len(BASE_SHARE_MODELS),)
    return shapes


SUMMARY_WEIGHTS = {**{f"{m}.abs": 3.0 for m in TABULAR_MODELS}, **{f"{m}.signed": 0.5 for m in TABULAR_MODELS}}
"""How the budget is shared among the summaries (a summary of weight w gets noise ``1 / w`` times
that of a summary of weight 1). The feature rankings' absolute sums, the explanation's headline,
get the most; their signed sums, read only for the sign of the top features, the least. Against
equal weights (3.16 noise multipliers each) this cuts the rankings' noise to 1.88 and raises the
others' to 5.63 (three tabular models, one DNA track)."""


def summary_weight(name: str) -> float:
    return SUMMARY_WEIGHTS.get(name, 1.0)


def clip_nonnegative(name: str, value: np.ndarray) -> np.ndarray:
    """``value`` of summary ``name`` clipped at zero if it is a sum of absolute values (free
    post-processing of its noise); other summaries unchanged. A site clips its own release; under
    secure sum the coordinator clips the sum instead."""
    return np.maximum(value, 0.0) if name.endswith(".abs") or name == "shares" else value


def summary_sensitivity(shapes: dict[str, tuple[int, ...]], *, clip: float) -> float:
    """L2 sensitivity of the whole weighted release: one patient's clipped array moves each summary by
    at most ``clip``, and the release holds every summary times its weight (:data:`SUMMARY_WEIGHTS`)."""
    return clip * float(np.sqrt(sum(summary_weight(name) ** 2 for name in shapes)))


def summary_noise_sd(shapes: dict[str, tuple[int, ...]], *, clip: float, noise_multiplier: float) -> dict[str, float]:
    """The noise each summary gets: the Gaussian mechanism on the weighted release (noise
    ``noise_multiplier`` times its sensitivity), read back on each summary's own scale."""
    sd = noise_multiplier * summary_sensitivity(shapes, clip=clip)
    return {name: sd / summary_weight(name) for name in shapes}


def global_explanation(sums: dict[str, np.ndarray], *, schema: dict[str, Any], classes: Sequence[str],
                       patients: int, motifs: MotifLayout | None, top_motif_count: int = 10,
                       unweighted: Sequence[str] = (), **facts: Any) -> dict[str, Any]:
    """The global explanation (``explanation.json``) from the sites' summed releases.

    Means are per explained patient; post-processing of the noised sums, at no privacy cost.
    ``unweighted`` names the base models the hybrid's (public) coefficients give no weight: their
    share is exactly zero, whatever noise their released sums carry.
    ``facts`` (run id, epsilon, delta, clip, per-site figures, the guarantee) are copied in.
    """
    layout = feature_layout(schema)
    outputs = output_names(classes)
    n = max(int(patients), 1)
    models = {model: {"scale": scale, "features": _ranking(sums, model, layout, outputs, n)}
              for model, scale in TABULAR_MODELS.items() if f"{model}.abs" in sums}
    profiles = {name.split(".")[1]: {"outputs": outputs, "length": int(sums[name].shape[1]),
                                     "mean": (sums[name] / n).tolist(),
                                     "importance": (sums[name.replace(".signed", ".abs")] / n).tolist()}
                for name in sums if name.startswith("profile.") and name.endswith(".signed")}
    found = []
    if motifs is not None and "motifs.dna" in sums:
        found = top_motifs(sums["motifs.dna"], motifs, n_patients=n, top=top_motif_count, output_names=outputs)
        for m in found:
            m["matrix"] = motif_matrix(sums["motifs.dna"][outputs.index(m["output"])], motifs, m["kmer"],
                                       sign=np.sign(m["score"]) or 1.0)
    shares = np.maximum(np.asarray(sums.get("shares", np.zeros(0)), dtype=np.float64), 0.0)
    shares = np.where([m in unweighted for m in BASE_SHARE_MODELS[:len(shares)]], 0.0, shares)
    share = {m: float(v / shares.sum()) for m, v in zip(BASE_SHARE_MODELS, shares)} if shares.sum() > 0 else {}
    return {"format": FORMAT, "version": VERSION, **facts, "classes": list(classes), "outputs": outputs,
            "patients": int(patients), "features": consensus_ranking(models, share, layout, outputs),
            "models": models,
            "profiles": profiles, "motifs": found,
            "motif_layout": ({"k": motifs.k, "bins": motifs.bins, "length": motifs.length,
                              "canonical": motifs.canonical} if motifs else {}),
            "shares": share}


def consensus_ranking(models: dict[str, dict[str, Any]], shares: dict[str, float], layout: ExplanationFeatures,
                      outputs: list[str]) -> list[dict[str, Any]]:
    """The features the hybrid relies on: each tabular model's importances as fractions of its
    own total (so probability and log-odds scales can be added), weighted by that model's share of
    the meta-classifier's evidence (equal weights when no shares were released).

    Entries are those of the models' rankings with ``importance`` and ``mean`` on this common
    scale (fractions of the weighted tabular evidence).
    """
    weights = {m: shares.get(m, 1.0) if shares else 1.0 for m in models}
    total_w = sum(weights.values()) or 1.0
    width = len(layout.names)
    entries = []
    for output in outputs:
        imp, mean = np.zeros(width), np.zeros(width)
        for model, doc in models.items():
            rows = [f for f in doc["features"] if f["output"] == output]
            a = np.zeros(width)
            m = np.zeros(width)
            for f in rows:
                j = layout.names.index(f["feature"])
                a[j], m[j] = f["importance"], f["mean"]
            scale = a.sum() or 1.0
            imp += weights[model] / total_w * a / scale
            mean += weights[model] / total_w * m / scale
        for rank, j in enumerate(np.argsort(-imp, kind="stable"), start=1):
            label = layout.names[j]
            entries.append({"feature": label, "kind": layout.kinds[j], "index": _index_of(label), "output": output,
                            "importance": float(imp[j]), "mean": float(mean[j]), "rank": rank})
    return entries


def _ranking(sums: dict[str, np.ndarray], model: str, layout: ExplanationFeatures, outputs: list[str],
             n: int) -> list[dict[str, Any]]:
    signed, absolute = sums[f"{model}.signed"] / n, sums[f"{model}.abs"] / n
    entries = []
    for o, output in enumerate(outputs):
        order = np.argsort(-absolute[o], kind="stable")
        for rank, j in enumerate(order, start=1):
            label = layout.names[j]
            entries.append({"feature": label, "kind": layout.kinds[j], "index": _index_of(label), "output": output,
                            "importance": float(absolute[o, j]), "mean": float(signed[o, j]), "rank": rank})
    return entries


def _index_of(label: str) -> int:
    """The 1-based position in its list of a feature named by position (0 for a named one)."""
    head, sep, tail = label.partition("#")
    if sep and tail.isdigit():
        return int(tail)
    return int(label[3:]) if label.startswith("pos") and label[3:].isdigit() else 0


def motif_matrix(per_key: np.ndarray, layout: MotifLayout, kmer: str, *, sign: float) -> list[list[float]]:
    """Attribution mass per position and base around one motif, for a sequence logo.

    Sums, over the k-mers within one mismatch of ``kmer``, each one's attribution in the motif's
    direction (``sign``; negative mass is left out) onto its bases: position ``i`` of the matrix
    gets that mass on the base the k-mer has there. ``per_key``: ``(n_kmers, bins)`` sums of one output.
    """
    k = layout.k
    code = [BASES.index(b) for b in kmer]
    mass = np.maximum(sign * np.asarray(per_key, dtype=np.float64).sum(axis=1), 0.0)
    matrix = np.zeros((k, 4))
    for i in range(k):
        for b in range(4):
            variant = list(code)
            variant[i] = b
            key = 0
            for c in variant:
                key = key * 4 + c
            if layout.canonical:
                key = int(min(key, reverse_complement_key(np.asarray([key]), k)[0]))
            # The motif itself counts once per position: every one-mismatch neighbour adds to its base only.
            matrix[i, b] += mass[key]
    return matrix.tolist()
