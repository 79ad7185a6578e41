"""Per-patient decision support on a site: the final models' predictions for one patient, explained.

Everything here runs on the hospital's own machine, from its vault: the patient's record and every
model are decrypted in memory, nothing is sent anywhere and nothing is charged to the privacy
ledger (no release leaves the site). ``genofed predict`` (:mod:`client.predict_cli`) is the command.

For one patient (of the vault's cohort, or a new one imported in memory from files in the cohort's
formats) it gives

- each final model's class probabilities (global deep model ``cnn``, the site's ``forest``, the
  federated GLM ``logreg``, the site's own GLM ``site-logreg``, the meta-classifier ``hybrid``) and
  the class each predicts at the run's operating threshold (binary) or by argmax (multi-class);
- the patient's own top contributing features: the forest's TreeSHAP values (probability scale;
  they add up with the forest's expected value to its probability, checked to :data:`SHAP_TOLERANCE`),
  the federated GLM's exact linear attributions (log-odds relative to the federation's mean), the
  site GLM's (relative to the site's own train mean), and the deep
  model's integrated gradients per sequence position;
- optionally LIME (:func:`lime_tabular`, Ribeiro et al. 2016) for the forest as a second opinion,
  and where it agrees with SHAP;
- where the patient stands against the run's global explanation (``model/explanation``), when the
  vault holds one.

A :class:`Predictor` loads the models once (:func:`load_predictor`); :func:`predict_patient` is the
per-patient work, which is what ``genofed bench predict`` times.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from client.site_models import SiteModels, decide, load_site_models, model_probabilities
from common.errors import GenofedError
from common.explanation import BASES, ExplanationFeatures, feature_layout
from common.stack import MODEL_NAMES

if TYPE_CHECKING:
    from client.pipeline import SiteData
    from client.vault import Vault
    from common.cohort import Cohort

TOP = 5
"""Features (and sequence positions) shown per model."""
SHAP_TOLERANCE = 1e-6
"""The forest's TreeSHAP values plus its expected value equal its probability within this."""
LIME_SAMPLES = 1000
"""Perturbed records per LIME explanation."""
IG_STEPS = 64
"""Integrated-gradients steps (:func:`client.explain.deep_attributions`)."""
PRIVACY_NOTE = ("computed on this machine from the vault; nothing was sent and nothing was charged to the "
                "site's privacy ledger")


class PredictError(GenofedError):
    """A prediction cannot be made as asked (unknown patient, other schema, ...)."""


@dataclass
class Predictor:
    """A site's final models and what explaining them needs, loaded once.

    Attributes
    ----------
    source : the vault folder (for messages).
    cohort, data : the vault's cohort, and the same as model inputs.
    models : the final models (:func:`client.site_models.load_site_models`).
    layout : explanation features over the shared columns, with the site's own names.
    public : the same features' public labels (those of the global explanation), same order.
    forest_layout : explanation features over the forest's columns (``layout`` unless the forest's
        preprocessing reduced columns).
    explainer, expected_value : the forest's TreeSHAP explainer and its expected output per explained output.
    background : the forest's inputs on the train split (LIME draws replacement values from it).
    explanation : the run's global explanation, or None when the vault holds none.
    """

    source: Path
    cohort: Cohort
    data: SiteData
    models: SiteModels
    layout: ExplanationFeatures
    public: tuple[str, ...]
    forest_layout: ExplanationFeatures
    explainer: Any
    expected_value: np.ndarray
    background: np.ndarray
    explanation: dict[str, Any] | None


# ---------------------------------------------------------------------------------------------
# Loading


def load_predictor(vault: Vault, *, cohort: Cohort | None = None) -> Predictor:
    """Decrypt the vault's cohort and final models and prepare the explainers (once per call of the CLI).

    ``cohort`` is the vault's cohort when the caller has already decrypted it.

    Raises
    ------
    client.site_models.FinalModelsMissing
        No federated run has handed this vault its final models.
    """
    import shap

    from client.cohort_store import load_cohort
    from client.explain import explainer_expected_value
    from client.model_store import load_explanation
    from client.pipeline import SiteData, forest_matrix

    models = load_site_models(vault)
    cohort = load_cohort(vault) if cohort is None else cohort
    data = SiteData.from_cohort(cohort)
    layout = feature_layout(cohort.schema, named=True)
    # Unnamed, the site's full schema gives the public labels: feature_layout(public_schema(schema)).
    public = feature_layout(cohort.schema).names
    background = forest_matrix(data, "train", models.preprocessor)
    explainer = shap.TreeExplainer(models.forest.forest_)
    ev = explainer_expected_value(explainer, classes=models.forest.classes_, n_classes=models.n_classes)
    return Predictor(source=Path(vault.path), cohort=cohort, data=data, models=models, layout=layout,
                     public=public, forest_layout=_forest_layout(layout, data, models, background.shape[1]),
                     explainer=explainer, expected_value=ev, background=background,
                     explanation=load_explanation(vault))


def _forest_layout(layout: ExplanationFeatures, data: SiteData, models: SiteModels, width: int) -> ExplanationFeatures:
    """Features over the forest's columns: the shared layout, unless its preprocessing changed the columns."""
    if width == len(layout.column_feature):
        return layout
    pre = models.preprocessor
    names = [*(pre.get_feature_names_out() if pre is not None else ()), *data.seq_feature_names]
    return ExplanationFeatures.from_columns([str(n) for n in names], categorical=data.frame.categorical_names)


def import_patients(spec_path: str | Path, *, schema: dict[str, Any]) -> Cohort:
    """New patients from a cohort spec's files, imported in memory with the vault's importer.

    Feature lists the spec leaves out (variant sites, omics and event features) are taken from the
    vault's ``schema``, so that the files are read against the agreed panel; the imported schema's
    hash must then equal the vault's. The importer needs every patient's label column filled in
    (any of the classes: it is not used here). A folder stands for its ``spec.toml``.

    Raises
    ------
    common.spec.SpecError, client.importers.CohortImportError
        The spec or its files are invalid (every problem listed).
    PredictError
        The files describe other features than the vault's cohort.
    """
    from client.importers import import_cohort
    from common.spec import diff_schemas, load_spec, schema_hash, with_resolved_features

    path = Path(spec_path)
    if path.is_dir():
        path = path / "spec.toml"
    spec = load_spec(path)
    fill = {}
    for name, attr in (("variants", "sites"), ("omics", "features"), ("events", "features")):
        part, agreed = getattr(spec, name), schema.get(name, {}).get(attr)
        if part is not None and getattr(part, attr) is None and isinstance(agreed, list):
            fill[name] = tuple(agreed)
    cohort = import_cohort(with_resolved_features(spec, **fill) if fill else spec)
    if cohort.schema_hash != schema_hash(schema):
        diff = diff_schemas(schema, cohort.schema, names=("the vault", "the input"), limit=3)
        raise PredictError(f"{path}: schema hash {cohort.schema_hash[:12]} differs from the vault cohort's "
                           f"{schema_hash(schema)[:12]} ({diff[0] if diff else 'schemas differ'}); the new patients' "
                           "files must hold the same features as the cohort the models were trained on")
    return cohort


def patient_index(cohort: Cohort, patient: str | None, *, source: str | Path, new: bool = False) -> int:
    """The row of ``patient`` in ``cohort``; with ``patient`` None, the only patient of a new cohort.

    Raises
    ------
    PredictError
        No such patient, or several patients and none chosen.
    """
    ids = np.asarray(cohort.patient_ids).astype(str)
    where = "the files this spec names" if new else "this vault's cohort"
    if patient is None:
        if new and len(ids) == 1:
            return 0
        shown = ", ".join(ids[:5]) + (", ..." if len(ids) > 5 else "")
        raise PredictError(f"{source}: {len(ids)} patients in {where} ({shown}); choose one with --patient ID")
    hits = np.flatnonzero(ids == str(patient))
    if not len(hits):
        hint = "check the id" if new else "check the id, or give a new patient's files with --input SPEC"
        raise PredictError(f"{source}: no patient {patient!r} in {where} ({len(ids)} patients, ids as in the "
                           f"label file's id column); {hint}")
    return int(hits[0])


# ---------------------------------------------------------------------------------------------
# One patient


def one_patient(data: SiteData, index: int) -> SiteData:
    """``data`` with a ``predict`` split holding only row ``index`` (arrays shared, not copied)."""
    mask = np.zeros(len(data.y), dtype=bool)
    mask[index] = True
    return dataclasses.replace(data, masks={**data.masks, "predict": mask})


def predict_patient(predictor: Predictor, *, index: int, data: SiteData | None = None, lime: bool = False,
                    top: int = TOP, seed: int = 0, lime_samples: int = LIME_SAMPLES,
                    threads: int = 1) -> dict[str, Any]:
    """Every model's prediction for one patient, with the patient's explanations.

    Parameters
    ----------
    predictor : the loaded models (:func:`load_predictor`).
    index : the patient's row in ``data``.
    data : the patient's cohort as model inputs (a new cohort's); the vault's by default.
    lime : also explain the forest with :func:`lime_tabular` and compare it with SHAP.
    top : features and positions shown per model.
    seed : LIME's sampling seed.
    lime_samples : LIME's perturbed records.
    threads : torch's intra-op threads and the BLAS threads for this call (restored after): one
        patient's work is too small to gain from more, and on a busy machine more threads wait on
        each other.

    Returns
    -------
    dict
        JSON-ready: ``models`` (probabilities, threshold, predicted class per model), ``attributions``
        (``forest``, ``logreg``, ``cnn``), ``lime`` (with ``lime``), ``global`` (or None).
    """
    with torch_threads(threads):
        return _predict(predictor, index=index, data=data, lime=lime, top=top, seed=seed, lime_samples=lime_samples)


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads and the BLAS and OpenMP thread pools (numpy, scipy, scikit-learn)
    limited to ``n`` inside the block, restored after."""
    import torch
    from threadpoolctl import threadpool_limits  # a dependency of scikit-learn

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        with threadpool_limits(limits=n):
            yield
    finally:
        torch.set_num_threads(before)


def _predict(predictor: Predictor, *, index: int, data: SiteData | None, lime: bool, top: int, seed: int,
             lime_samples: int) -> dict[str, Any]:
    from client.pipeline import forest_matrix, glm_matrix, shared_raw

    models = predictor.models
    one = one_patient(predictor.data if data is None else data, index)
    proba = {m: p[0] for m, p in model_probabilities(models, one, "predict").items()}
    classes = models.classes
    binary = len(classes) == 2
    hybrid_class = decide(proba["hybrid"], classes=classes, threshold=models.thresholds.get("hybrid"))
    out_index = 0 if binary else classes.index(hybrid_class)
    output = classes[1] if binary else hybrid_class
    values = feature_values(predictor.layout, shared_raw(one, "predict")[0], schema=predictor.cohort.schema)
    x_forest = forest_matrix(one, "predict", models.preprocessor)
    forest = _forest_part(predictor, x_forest, out_index=out_index, top=top, values=values)
    glms = {m: _glm_part(predictor, glm_matrix(one, "predict", glm_scaler(models, m)), proba[m], model=m,
                         out_index=out_index, top=top, values=values) for m in GLM_MODELS}
    result: dict[str, Any] = {
        "classes": list(classes), "explained_output": output,
        "models": {m: _model_row(proba[m], classes=classes, threshold=models.thresholds.get(m)) for m in MODEL_NAMES},
        "attributions": {"forest": forest,
                         **glms,
                         "cnn": _deep_part(predictor, one, out_index=out_index, top=top, values=values)},
    }
    if lime:
        phi_lime, fit = lime_tabular(lambda x: _forest_output(predictor, x, out_index), x_forest[0],
                                     predictor.background, predictor.forest_layout, samples=lime_samples, seed=seed)
        result["lime"] = {"model": "forest", "scale": "probability", "samples": lime_samples, "seed": seed,
                          "local_r2": fit, "top": _top(phi_lime, predictor.forest_layout.names,
                                                       values if predictor.forest_layout is predictor.layout else None,
                                                       top=top),
                          "agreement": agreement(np.asarray(forest["_phi"]), phi_lime,
                                                 predictor.forest_layout.names, top=top)}
    result["global"] = global_standing(predictor, result, values=values, output=output, top=top)
    for part in result["attributions"].values():  # every feature's attribution: used above, not shown
        for key in ("_phi", "_norm", "_profiles"):
            part.pop(key, None)
    return result


def _model_row(p: np.ndarray, *, classes: tuple[str, ...], threshold: float | None) -> dict[str, Any]:
    binary = len(classes) == 2 and threshold is not None
    return {"probabilities": {c: float(v) for c, v in zip(classes, p)},
            "threshold": float(threshold) if binary else None, "rule": "threshold" if binary else "argmax",
            "predicted": decide(p, classes=classes, threshold=threshold)}


def feature_values(layout: ExplanationFeatures, raw: np.ndarray, *, schema: dict[str, Any]) -> list[Any]:
    """The patient's value of every explanation feature, from its shared columns before scaling:
    a number, the category of a categorical variable, the base at a sequence position, or None
    where the record has no value."""
    raw = np.asarray(raw, dtype=np.float64)
    if len(raw) != len(layout.column_feature):
        return [None] * len(layout.names)
    categories = {f"clinical:{k}": v for k, v in schema.get("clinical", {}).get("categorical", {}).items()}
    out: list[Any] = []
    for f, name in enumerate(layout.names):
        cols = np.flatnonzero(layout.column_feature == f)
        block = raw[cols]
        if len(cols) == 1:
            out.append(None if np.isnan(block[0]) else float(block[0]))
            continue
        labels = categories.get(name, BASES)
        hit = np.flatnonzero(block == 1.0)
        out.append(str(labels[hit[0]]) if len(hit) and hit[0] < len(labels) else None)
    return out


def _top(phi: np.ndarray, names: tuple[str, ...], values: list[Any] | None, *, top: int) -> list[dict[str, Any]]:
    """The ``top`` features by size of attribution, strongest first (ties: layout order)."""
    phi = np.asarray(phi, dtype=np.float64)
    order = np.argsort(-np.abs(phi), kind="stable")[:top]
    return [{"feature": names[i], "value": values[i] if values is not None and i < len(values) else None,
             "contribution": float(phi[i])} for i in order]


def forest_contributions(predictor: Predictor, x: np.ndarray) -> np.ndarray:
    """The forest's TreeSHAP values of records ``x`` (its inputs) grouped by explanation feature,
    ``(n, outputs, features)``; with ``predictor.expected_value`` they add up to its probabilities."""
    from client.explain import tree_shap

    return predictor.forest_layout.group(tree_shap(predictor.explainer, x, classes=predictor.models.forest.classes_,
                                                   n_classes=predictor.models.n_classes))


def _forest_output(predictor: Predictor, x: np.ndarray, out_index: int) -> np.ndarray:
    """The forest's own probability of explained output ``out_index`` for records ``x`` (what its
    TreeSHAP values add up to: a class its site never saw has probability 0, not the stack's floor)."""
    from client.pipeline import over_all_classes

    forest, n_classes = predictor.models.forest, predictor.models.n_classes
    proba = over_all_classes(forest.predict_proba(x), forest.classes_, n_classes, floor=0.0)
    return proba[:, out_index + (n_classes == 2)]


def _forest_part(predictor: Predictor, x: np.ndarray, *, out_index: int, top: int,
                 values: list[Any]) -> dict[str, Any]:
    phi_all = forest_contributions(predictor, x)[0]
    phi = phi_all[out_index]
    ev = float(predictor.expected_value[out_index])
    model_output = float(_forest_output(predictor, x, out_index)[0])
    total = float(phi.sum())
    shown = values if predictor.forest_layout is predictor.layout else None
    return {"scale": "probability", "method": "TreeSHAP (path-dependent)", "expected_value": ev,
            "sum_check": {"contributions": total, "expected_value": ev, "model_output": model_output,
                          "error": abs(total + ev - model_output), "tolerance": SHAP_TOLERANCE},
            "top": _top(phi, predictor.forest_layout.names, shown, top=top), "_phi": phi,
            "_norm": float(np.linalg.norm(phi_all))}


GLM_MODELS = ("logreg", "site-logreg")
"""The linear models explained per patient: the federated GLM and the site's own."""

GLM_ORIGIN = {"logreg": "shared-scaled inputs (zero = the federation's mean)",
              "site-logreg": "inputs scaled with the site's own scaler (zero = this site's train mean)"}


def glm_scaler(models: SiteModels, model: str) -> Any:
    """The scaler a GLM reads its inputs with: the shared one (``logreg``) or the site's own (``site-logreg``)."""
    return models.scaler if model == "logreg" else models.site_scaler


def _glm_coef(models: SiteModels, model: str) -> np.ndarray:
    from client.explain import site_glm_rows

    if model == "logreg":
        return models.glm_coef
    return site_glm_rows(models.site_glm, classes=models.site_glm_classes, n_classes=models.n_classes)


def glm_contributions(predictor: Predictor, x: np.ndarray, *, model: str = "logreg") -> tuple[np.ndarray, np.ndarray]:
    """A GLM's exact attributions of records ``x`` (its inputs, scaled with :func:`glm_scaler`)
    grouped by explanation feature, ``(n, outputs, features)`` (zero for shared columns the GLM does
    not read), and its intercept per output: together they add up to its log-odds (binary) or class
    scores. ``model``: the federated GLM (``logreg``) or the site's own (``site-logreg``)."""
    from client.explain import linear_attributions

    models = predictor.models
    k = models.n_classes
    coef = _glm_coef(models, model)
    columns = linear_attributions(coef, x, n_classes=k)  # over the GLM's own columns
    full = np.zeros((*columns.shape[:2], len(predictor.layout.column_feature)))
    full[:, :, glm_scaler(models, model).glm_columns] = columns
    rows = coef.reshape(1 if k <= 2 else k, x.shape[1] + 1)
    return predictor.layout.group(full), rows[:, -1].copy()


def _glm_part(predictor: Predictor, x: np.ndarray, proba: np.ndarray, *, model: str, out_index: int, top: int,
              values: list[Any]) -> dict[str, Any]:
    phi_all, intercepts = glm_contributions(predictor, x, model=model)
    phi, intercept = phi_all[0, out_index], float(intercepts[out_index])
    binary = predictor.models.n_classes == 2
    part = {"scale": "log-odds" if binary else "class score (softmax logit)",
            "method": f"exact linear attributions on {GLM_ORIGIN[model]}",
            "intercept": intercept, "score": float(phi.sum()) + intercept,
            "top": _top(phi, predictor.layout.names, values, top=top), "_phi": phi,
            "_norm": float(np.linalg.norm(phi_all[0]))}
    if binary:  # the GLM's own probability, back on the log-odds scale
        p = np.clip(np.asarray(proba, dtype=np.float64), 1e-300, 1.0)
        model = float(np.log(p[1]) - np.log(p[0]))
        part["sum_check"] = {"contributions": float(phi.sum()), "intercept": intercept, "model_log_odds": model,
                             "error": abs(float(phi.sum()) + intercept - model)}
    return part


def _deep_part(predictor: Predictor, one: SiteData, *, out_index: int, top: int,
               values: list[Any]) -> dict[str, Any]:
    from client.explain import deep_attributions, position_profile
    from client.pipeline import deep_data

    model = predictor.models.cnn
    d = deep_data(one, "predict", model.cfg, predictor.models.scaler)
    inputs = [*d.tracks, *([d.tabular] if d.tabular is not None else [])]
    attr = deep_attributions(model, inputs, steps=IG_STEPS)
    part: dict[str, Any] = {"scale": "log-odds" if predictor.models.n_classes == 2 else "log-probability",
                            "method": f"integrated gradients ({IG_STEPS} steps, all-zero baseline)",
                            "total": float(sum(a[0, out_index].sum() for a in attr)), "tracks": {}}
    part["_profiles"] = {}
    for shape, track, a in zip(model.cfg.tracks, d.tracks, attr):
        part["_profiles"][shape.name] = position_profile(a)[0]  # (outputs, positions)
        profile = part["_profiles"][shape.name][out_index]
        order = np.argsort(-np.abs(profile), kind="stable")[:top]
        part["tracks"][shape.name] = [{"position": int(i + 1), **_position_value(shape.name, track[0], i, predictor),
                                       "attribution": float(profile[i])} for i in order]
    if d.tabular is not None:
        full = np.zeros(len(predictor.layout.column_feature))
        full[:d.tabular.shape[1]] = attr[-1][0, out_index]
        part["dense"] = _top(predictor.layout.group(full[None, None, :])[0, 0], predictor.layout.names, values, top=top)
    return part


def _position_value(track: str, x: np.ndarray, i: int, predictor: Predictor) -> dict[str, Any]:
    """What the patient has at position ``i`` of a track: the base of a one-hot DNA track, the
    variant of a dosage track."""
    if track == "dna":
        hit = np.flatnonzero(x[:, i] > 0)
        return {"base": BASES[hit[0]] if len(hit) else "N"}
    sites = predictor.cohort.schema.get("variants", {}).get("sites")
    if track == "dosage" and isinstance(sites, list) and i < len(sites):
        return {"variant": str(sites[i])}
    return {}


# ---------------------------------------------------------------------------------------------
# LIME


def lime_tabular(predict: Any, row: np.ndarray, background: np.ndarray, layout: ExplanationFeatures, *,
                 samples: int = LIME_SAMPLES, seed: int = 0, kernel_width: float | None = None,
                 alpha: float = 1.0) -> tuple[np.ndarray, float]:
    """LIME's tabular explanation of one record, per explanation feature (Ribeiro et al. 2016).

    Local Interpretable Model-agnostic Explanations ("Why should I trust you?", KDD 2016), tabular
    variant, written here rather than taken from the ``lime`` package: the interpretable
    representation is one bit per feature, 1 when the record keeps its own value, 0 when that
    feature's value is replaced by the one of a record drawn at random from ``background`` (the
    training split: each feature is sampled from its own distribution there, all columns of a
    categorical feature from the same record, so one-hot blocks stay valid). The first sample is the
    record itself; in the others each bit is 0 with probability 1/2. Samples are weighted with
    LIME's exponential kernel on their distance from the record in that representation (the
    square root of the number of replaced features), width ``0.75 * sqrt(features)`` by default as
    in LIME, and a weighted ridge regression of ``predict``'s output on the bits is the local
    model: a feature's coefficient is what the record's own value adds to the output against a
    value typical of the training split (the output's scale).

    Parameters
    ----------
    predict : maps records ``(n, columns)`` to the explained output ``(n,)``.
    row : the record ``(columns,)``; ``background`` : ``(m, columns)``.
    layout : groups the columns into features (``layout.column_feature``).
    samples, seed : perturbed records and the seed of their draw (same seed, same explanation).

    Returns
    -------
    (coefficients per feature ``(features,)``, the local model's weighted R^2 on the samples)
    """
    from sklearn.linear_model import Ridge

    rng = np.random.default_rng(seed)
    owner = np.asarray(layout.column_feature)
    n_features = len(layout.names)
    keep = rng.random((samples, n_features)) >= 0.5
    keep[0] = True
    donors = rng.integers(0, len(background), size=(samples, n_features))
    drawn = background[donors[:, owner], np.arange(len(owner))]
    x = np.where(keep[:, owner], np.asarray(row, dtype=np.float64)[None, :], drawn)
    y = np.asarray(predict(x), dtype=np.float64)
    width = kernel_width or 0.75 * np.sqrt(n_features)
    distance2 = (~keep).sum(axis=1)
    weights = np.sqrt(np.exp(-distance2 / width**2))
    z = keep.astype(np.float64)
    local = Ridge(alpha=alpha).fit(z, y, sample_weight=weights)
    return np.asarray(local.coef_, dtype=np.float64), float(local.score(z, y, sample_weight=weights))


def agreement(shap_phi: np.ndarray, lime_phi: np.ndarray, names: tuple[str, ...], *, top: int) -> dict[str, Any]:
    """Where SHAP and LIME agree on one patient: the overlap of their top-``top`` features (by size)
    and, of the shared ones, how many have the same sign; with a sentence saying so."""
    shap_phi, lime_phi = np.asarray(shap_phi, dtype=np.float64), np.asarray(lime_phi, dtype=np.float64)
    top_shap = [int(i) for i in np.argsort(-np.abs(shap_phi), kind="stable")[:top]]
    top_lime = {int(i) for i in np.argsort(-np.abs(lime_phi), kind="stable")[:top]}
    shared = [i for i in top_shap if i in top_lime]
    same = [i for i in shared if np.sign(shap_phi[i]) == np.sign(lime_phi[i])]
    opposite = [names[i] for i in shared if i not in same]
    text = (f"SHAP and LIME share {len(shared)} of their top {top} features"
            + (f" ({', '.join(names[i] for i in shared)})" if shared else "")
            + (f"; {len(same)} of them with the same sign" if shared else "")
            + (f"; opposite signs for {', '.join(opposite)}" if opposite else "") + ".")
    return {"top": top, "shared": [names[i] for i in shared], "same_sign": [names[i] for i in same],
            "opposite_sign": opposite, "overlap": len(shared) / max(top, 1), "statement": text}


# ---------------------------------------------------------------------------------------------
# Against the global explanation


def global_standing(predictor: Predictor, result: dict[str, Any], *, values: list[Any], output: str,
                    top: int) -> dict[str, Any] | None:
    """The patient against the run's global explanation, or None when the vault holds none.

    For each global top feature of the forest and the GLM (the explanation's per-model rankings,
    ``models``): the patient's value and contribution, beside the global mean |attribution| and
    mean attribution per patient, and the ratio of the two sizes; which of the patient's own top
    features are among the global top; and for the deep model's top positions of the patient, the
    global mean |attribution| there (``profiles``). When the explanation says each patient's
    attributions were scaled to unit L2 norm before they were summed (its ``per_patient``), the
    patient's are compared scaled alike: ``share`` is the contribution over the L2 norm of all the
    patient's attributions for that model (all outputs), and ``relative`` is ``|share|`` over the
    global mean; otherwise ``relative`` compares the contributions themselves.
    """
    exp = predictor.explanation
    if not exp:
        return None
    named = dict(zip(predictor.public, predictor.layout.names))
    per_patient = str(exp.get("per_patient", ""))
    unit = "unit" in per_patient and "norm" in per_patient
    out: dict[str, Any] = {"run_id": exp.get("run_id"), "noised": bool(exp.get("noised")),
                           "epsilon": exp.get("epsilon"), "patients": exp.get("patients"),
                           "scaled_to_unit_norm": unit, "models": {}}
    for model in ("forest", *GLM_MODELS):
        entries = ((exp.get("models") or {}).get(model) or {}).get("features")
        if entries:
            out["models"][model] = _model_standing(predictor, result["attributions"][model], entries, model=model,
                                                   named=named, values=values, output=output, top=top, unit=unit)
    positions = _position_standing(result["attributions"]["cnn"], exp.get("profiles") or {}, output=output, unit=unit)
    if positions:
        out["positions"] = positions
    return out


def _model_standing(predictor: Predictor, mine: dict[str, Any], entries: list[dict[str, Any]], *, model: str,
                    named: dict[str, str], values: list[Any], output: str, top: int, unit: bool) -> dict[str, Any]:
    names = predictor.forest_layout.names if model == "forest" else predictor.layout.names
    shown = values if names == predictor.layout.names else [None] * len(names)
    scale = 1.0 / mine["_norm"] if unit and mine["_norm"] > 0 else (0.0 if unit else 1.0)
    patient = {n: (float(c), v) for n, c, v in zip(names, mine["_phi"], shown)}
    ranked = sorted((e for e in entries if e.get("output", output) == output), key=lambda e: e.get("rank", 0))
    rows = []
    for e in ranked[:top]:
        name = named.get(e["feature"], e["feature"])
        contribution, value = patient.get(name, (None, None))
        importance = float(e.get("importance", 0.0))
        share = None if contribution is None else contribution * scale
        rows.append({"feature": name, "label": e["feature"], "value": value, "contribution": contribution,
                     "share": share if unit else None, "global_importance": importance,
                     "global_mean": float(e.get("mean", 0.0)),
                     "relative": abs(share) / importance if share is not None and importance > 0 else None})
    global_top = [r["feature"] for r in rows]
    patient_top = [r["feature"] for r in mine["top"]]
    inside = [f for f in patient_top if f in global_top]
    return {"scale": mine["scale"], "global_top": rows, "patient_top_in_global_top": inside,
            "statement": f"{len(inside)} of this patient's top {len(patient_top)} {model} features are among the run's "
                         f"global top {len(global_top)}" + (f" ({', '.join(inside)})" if inside else "") + "."}


def _position_standing(deep: dict[str, Any], profiles: dict[str, Any], *, output: str,
                       unit: bool) -> dict[str, list[dict[str, Any]]]:
    """The patient's top positions of each track beside the global mean |attribution| there."""
    out = {}
    for track, rows in deep["tracks"].items():
        glob, mine = profiles.get(track), deep["_profiles"].get(track)
        if not glob or mine is None or output not in glob.get("outputs", []):
            continue
        importance = np.asarray(glob["importance"], dtype=np.float64)[glob["outputs"].index(output)]
        norm = float(np.linalg.norm(mine)) if unit else 1.0
        listed = []
        for r in rows:
            g = float(importance[r["position"] - 1]) if r["position"] - 1 < len(importance) else None
            share = r["attribution"] / norm if norm > 0 else 0.0
            listed.append({"position": r["position"], "attribution": r["attribution"],
                           "share": share if unit else None, "global_importance": g,
                           "relative": abs(share) / g if g else None})
        out[track] = listed
    return out
