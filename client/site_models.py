"""Every final model a federated run left in a site's vault, loaded once, and their probabilities.

A run's evaluation exchange hands the site its final models (``client.handlers._store_final_models``,
roles in :mod:`client.model_store`): the global deep model (``model/cnn``), the shared scaler
(``model/shared-scaler``), the GLM's and the meta-classifier's coefficients with the operating
thresholds (``model/meta``), and the site's own forest and GLM (``model/local``, fitted in the
run's first meta round). :func:`load_site_models` reads them all; :func:`base_probabilities` and
:func:`model_probabilities` compute the models' class probabilities exactly as the site's
handlers do during a run (``_base_probabilities`` and ``_probabilities``), so a prediction made
later on site is the one the run's statistics describe.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from common.errors import GenofedError
from common.stack import BASE_MODELS, MODEL_NAMES

if TYPE_CHECKING:
    from client.forest import SiteForest
    from client.pipeline import SiteData
    from client.preprocess import TabularPreprocessor
    from client.vault import Vault
    from common.glm import FederatedGLM
    from common.models import GenomicNet
    from common.tabular import SharedScaler


class FinalModelsMissing(GenofedError):
    """The vault holds no (or not every) final model of a federated run."""


@dataclass
class SiteModels:
    """A site's final models, ready to predict.

    Attributes
    ----------
    cnn : the global deep model (eval mode).
    scaler : the shared scaler (the GLM's inputs and the deep model's dense branch).
    forest, preprocessor : the site's forest and its tabular preprocessing (None without tabular data).
    site_glm, site_scaler, site_glm_classes : the site's own GLM, the scaler it was fitted with (the
        site's own moments) and the classes its train split held.
    glm_coef : the federated GLM's flat coefficients (per output: weights, then the intercept).
    meta_coef : the meta-classifier's flat coefficients over :data:`common.stack.BASE_MODELS`' log-odds.
    classes : class names, in the cohort's order.
    thresholds : operating threshold per model (probability of class 1; binary problems only).
    run_id : the run the deep model, scaler and coefficients come from.
    forest_run_id : the run the site's own models (forest and GLM) were fitted in (the same run,
        unless a later run stopped after fitting them and before its evaluation).
    calibration : the Platt maps the stack reads the site's own models through (:mod:`client.calibration`;
        empty: none).
    """

    cnn: GenomicNet
    scaler: SharedScaler
    forest: SiteForest
    preprocessor: TabularPreprocessor | None
    site_glm: FederatedGLM
    site_scaler: SharedScaler
    site_glm_classes: tuple[int, ...]
    glm_coef: np.ndarray
    meta_coef: np.ndarray
    classes: tuple[str, ...]
    thresholds: dict[str, float] = field(default_factory=dict)
    run_id: str = ""
    forest_run_id: str = ""
    calibration: dict[str, Any] = field(default_factory=dict)

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def warnings(self) -> list[str]:
        """What a reader of these models' predictions should know (empty when all is consistent)."""
        out = []
        if self.forest_run_id and self.run_id and self.forest_run_id != self.run_id:
            out.append(f"the site's own forest and GLM were fitted in run {self.forest_run_id}, the other final "
                       f"models come from run {self.run_id} (run {self.forest_run_id} stopped before its "
                       "evaluation): the hybrid's weights were fitted with other site models; finish a run to make "
                       "them consistent")
        return out


def load_site_models(vault: Vault) -> SiteModels:
    """Read every final model from ``vault`` (decrypted in memory only).

    Raises
    ------
    FinalModelsMissing
        A role is missing: no federated run has reached its evaluation with this vault.
    """
    import torch

    from client.model_store import (
        CNN_ROLE,
        LOCAL_MODELS_ROLE,
        META_ROLE,
        SHARED_ROLE,
        arrays_from_bytes,
        load_local_models,
    )
    from common.models import DeepModelConfig, build_model
    from common.tabular import SharedScaler

    roles = set(vault.roles)
    missing = [r for r in (CNN_ROLE, SHARED_ROLE, META_ROLE) if r not in roles]
    stored = load_local_models(vault)
    if stored is None or "site_glm" not in stored:
        missing.append(LOCAL_MODELS_ROLE)
    if missing:
        raise FinalModelsMissing(
            f"{vault.path}: no final models in this vault (missing: {', '.join(missing)}); a federated run hands "
            "them to the site at its evaluation: run one to the end with this vault (genofed simulate, or a "
            "deployment), then predict")
    weights, cnn_meta = arrays_from_bytes(vault.read(CNN_ROLE))
    model = build_model(DeepModelConfig.from_dict(cnn_meta["config"]))
    model.load_state_dict({k: torch.as_tensor(v) for k, v in weights.items()})
    model.eval()
    meta = json.loads(vault.read(META_ROLE).decode("utf-8"))
    if tuple(meta.get("base_models", BASE_MODELS)) != BASE_MODELS:
        raise FinalModelsMissing(f"{vault.path}: record {META_ROLE}: the meta-classifier stacks "
                                 f"{meta.get('base_models')}, this genofed stacks {list(BASE_MODELS)}; "
                                 "run a federation with this version to get matching final models")
    return SiteModels(cnn=model, scaler=SharedScaler.from_arrays(arrays_from_bytes(vault.read(SHARED_ROLE))[0]),
                      forest=stored["forest"], preprocessor=stored["preprocessor"], site_glm=stored["site_glm"],
                      site_scaler=stored["site_scaler"], site_glm_classes=tuple(stored["site_glm_classes"]),
                      glm_coef=np.asarray(meta["glm_coef"], dtype=np.float64),
                      meta_coef=np.asarray(meta["coef"], dtype=np.float64), classes=tuple(meta["classes"]),
                      thresholds={m: float(t) for m, t in meta.get("thresholds", {}).items() if m in MODEL_NAMES},
                      run_id=str(meta.get("run_id", "")), forest_run_id=str(stored.get("run_id", "")),
                      calibration=stored.get("calibration") or {})


def glm_model(models: SiteModels, *, n_features: int) -> Any:
    """The federated GLM with the final coefficients installed."""
    from common.glm import FederatedGLM

    return FederatedGLM().set_coef(models.glm_coef, n_features=n_features)


def base_probabilities(models: SiteModels, data: SiteData, split: str) -> dict[str, np.ndarray]:
    """The base models' class probabilities on one split of ``data``, as the handlers compute them
    (``client.handlers._base_probabilities`` with the forest already fitted)."""
    from client.pipeline import deep_proba, glm_matrix, site_forest_proba, site_glm_proba

    x_glm = glm_matrix(data, split, models.scaler)
    return {"cnn": deep_proba(models.cnn, data, split, models.scaler),
            "forest": site_forest_proba(models.forest, data, split, models.preprocessor),
            "logreg": glm_model(models, n_features=x_glm.shape[1]).predict_proba(x_glm),
            "site-logreg": site_glm_proba(models.site_glm, models.site_scaler, data, split,
                                          classes=models.site_glm_classes)}


def hybrid_probabilities(base: dict[str, np.ndarray], meta_coef: np.ndarray, *, n_classes: int,
                         calibration: dict[str, Any] | None = None) -> np.ndarray:
    """The meta-classifier's class probabilities over the base models' (``client.handlers._probabilities``),
    the site's own models read after their Platt maps (``calibration``: :mod:`client.calibration`).

    A hybrid that fell back to one base model (its coefficients select it) is that model's own
    probabilities, uncalibrated: what the report says it is.
    """
    from client.calibration import stacking_probabilities
    from client.pipeline import meta_features
    from common.meta import StackingMetaClassifier, selected_model

    chosen = selected_model(meta_coef, n_models=len(BASE_MODELS), n_classes=max(n_classes, 2))
    if chosen is not None:
        return base[BASE_MODELS[chosen]]
    n_features = len(BASE_MODELS) * (1 if n_classes == 2 else n_classes)
    read = stacking_probabilities(base, calibration)
    x = meta_features(*(read[m] for m in BASE_MODELS))
    return StackingMetaClassifier().set_coef(np.asarray(meta_coef, dtype=np.float64),
                                             n_features=n_features).predict_proba(x)


def model_probabilities(models: SiteModels, data: SiteData, split: str) -> dict[str, np.ndarray]:
    """Every final model's class probabilities on one split: the base models and the hybrid."""
    proba = base_probabilities(models, data, split)
    proba["hybrid"] = hybrid_probabilities(proba, models.meta_coef, n_classes=models.n_classes,
                                           calibration=models.calibration)
    return proba


def decide(proba: np.ndarray, *, classes: tuple[str, ...], threshold: float | None) -> str:
    """The predicted class of one patient's probabilities: class 1 when its probability reaches the
    operating threshold (binary, as :func:`common.metrics.at_threshold` counts it), else argmax."""
    from common.paired import predictions

    p = np.asarray(proba, dtype=np.float64).reshape(1, -1)
    return classes[int(predictions(p, threshold=threshold if len(classes) == 2 else None)[0])]
