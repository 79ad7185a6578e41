"""Membership-inference attacks on a federated run's final models, measured on site.

Two attacks ask, for each patient of a site, "was this patient in the training split?", from the
class probabilities a final model gives the patient (:func:`client.site_models.model_probabilities`,
the very computation ``genofed predict`` and the run's evaluation use):

* **loss threshold** (Yeom et al., CSF 2018): score = -loss under the target model; training
  members tend to have a lower loss than patients the model never saw.
* **calibrated** (difficulty calibration, Watson et al., ICLR 2022; the offline reference-model
  attack of Carlini et al., S&P 2022, in its simplest form): score = loss under reference models
  trained WITHOUT the targets, minus loss under the target model. A patient who is easy for every
  model (low reference loss) no longer looks like a member merely for being easy.

Members are the target sites' training patients, non-members their held-out test patients
(validation patients are neither: the meta-classifier is fitted on them). Attack success is the
ROC AUC over all target sites' patients pooled (sklearn's ``roc_auc_score``; each patient scored
by its own site's models). The two groups are NOT balanced by subsampling: AUC is a rank statistic
over member/non-member pairs, insensitive to the groups' sizes; 0.5 is chance.

Reference data: a disjoint part of the same population. One synthetic cohort (one generator seed,
so one planted ground truth: another seed plants other causal variants, a different population)
is split over sites; some sites are the federation under attack, the others ("reference sites")
run their own federation with the same settings. A patient belongs to exactly one site, so no
target patient (member or non-member) is in any reference model's data. A target patient's
reference loss is the mean of its losses under every reference site's final models.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from client.pipeline import SiteData
    from client.site_models import SiteModels

ATTACKED_MODELS = ("cnn", "hybrid")
ATTACKS = ("loss threshold", "calibrated")
MIN_PROBABILITY = 1e-12


@dataclass
class SiteInputs:
    """A site's final models and its cohort as model inputs."""

    models: SiteModels
    data: SiteData


@dataclass
class GroupLosses:
    """Per-patient losses of one attacked model, members and non-members, under the target and reference models."""

    member_target: np.ndarray
    member_reference: np.ndarray
    nonmember_target: np.ndarray
    nonmember_reference: np.ndarray


def patient_loss(proba: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Cross-entropy of each patient's true class.

    Parameters
    ----------
    proba : (n, K) class probabilities.
    y : (n,) true class indices.

    Returns
    -------
    (n,) ``-log p[i, y[i]]``, the probability clipped below at 1e-12.
    """
    p = np.asarray(proba, dtype=np.float64)[np.arange(len(y)), np.asarray(y, dtype=np.int64)]
    return -np.log(np.clip(p, MIN_PROBABILITY, 1.0))


def attack_auc(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> float:
    """ROC AUC of a membership score (higher = more likely a member); groups need not be balanced."""
    from sklearn.metrics import roc_auc_score

    scores = np.concatenate([member_scores, nonmember_scores])
    labels = np.concatenate([np.ones(len(member_scores)), np.zeros(len(nonmember_scores))])
    return float(roc_auc_score(labels, scores))


def loss_threshold_auc(losses: GroupLosses) -> float:
    """AUC of the loss-threshold attack: score = -loss under the target model."""
    return attack_auc(-losses.member_target, -losses.nonmember_target)


def calibrated_auc(losses: GroupLosses) -> float:
    """AUC of the calibrated attack: score = reference loss - target loss."""
    return attack_auc(losses.member_reference - losses.member_target,
                      losses.nonmember_reference - losses.nonmember_target)


def load_site(site_dir: str | Path) -> SiteInputs:
    """A site's final models and its cohort as model inputs, from its vault (``vault/`` and ``key`` in ``site_dir``)."""
    from client.cohort_store import load_cohort
    from client.pipeline import SiteData
    from client.site_models import load_site_models
    from client.vault import KeySource, Vault

    site_dir = Path(site_dir)
    vault = Vault.open(site_dir / "vault", KeySource.from_key_file(site_dir / "key"))
    return SiteInputs(models=load_site_models(vault), data=SiteData.from_cohort(load_cohort(vault)))


def split_losses(models: SiteModels, data: SiteData, split: str,
                 names: Sequence[str] = ATTACKED_MODELS) -> dict[str, np.ndarray]:
    """Each named model's per-patient loss on one split of ``data``, with ``models``' final models."""
    from client.site_models import model_probabilities

    proba = model_probabilities(models, data, split)
    y = data.y[data.masks[split]]
    return {name: patient_loss(proba[name], y) for name in names}


def site_group_losses(target: SiteInputs, references: Sequence[SiteInputs],
                      names: Sequence[str] = ATTACKED_MODELS, *, member_split: str = "train") -> dict[str, GroupLosses]:
    """One target site's member (``member_split``) and non-member (test) losses, under its own final
    models and (mean over ``references``) under the reference sites' final models.

    ``member_split="validation"`` is a null experiment for a model that never trained on the
    validation split (the federated deep model: federated rounds keep the last epoch, never the
    best on validation): both groups are non-members, so an unbiased attack scores AUC 0.5 up to
    sampling error.
    """
    out = {}
    per_split = {}
    for split in (member_split, "test"):
        own = split_losses(target.models, target.data, split, names)
        ref = [split_losses(r.models, target.data, split, names) for r in references]
        per_split[split] = (own, {n: np.mean([r[n] for r in ref], axis=0) for n in names})
    for n in names:
        out[n] = GroupLosses(member_target=per_split[member_split][0][n],
                             member_reference=per_split[member_split][1][n],
                             nonmember_target=per_split["test"][0][n], nonmember_reference=per_split["test"][1][n])
    return out


def pooled_losses(target_dirs: Sequence[str | Path], reference_dirs: Sequence[str | Path],
                  names: Sequence[str] = ATTACKED_MODELS, *, member_split: str = "train") -> dict[str, GroupLosses]:
    """Every target site's losses (:func:`site_group_losses`) pooled, per attacked model."""
    references = [load_site(d) for d in reference_dirs]
    sites = [site_group_losses(load_site(d), references, names, member_split=member_split) for d in target_dirs]
    return {n: GroupLosses(*(np.concatenate([getattr(s[n], f) for s in sites])
                             for f in ("member_target", "member_reference", "nonmember_target",
                                       "nonmember_reference")))
            for n in names}


def attack_aucs(target_dirs: Sequence[str | Path], reference_dirs: Sequence[str | Path],
                names: Sequence[str] = ATTACKED_MODELS) -> dict[tuple[str, str], float]:
    """Both attacks' AUC against each named model: ``{(model, attack): auc}``.

    Parameters
    ----------
    target_dirs : site folders (``vault/``, ``key``) of the attacked federation, after its run.
    reference_dirs : site folders of the reference federation (disjoint patients), after its run.
    names : models of :func:`client.site_models.model_probabilities` to attack.
    """
    return attack_aucs_from(pooled_losses(target_dirs, reference_dirs, names))


def attack_aucs_from(losses: dict[str, GroupLosses]) -> dict[tuple[str, str], float]:
    """Both attacks' AUC against each model of ``losses`` (:func:`pooled_losses`): ``{(model, attack): auc}``."""
    return {(n, a): (loss_threshold_auc if a == ATTACKS[0] else calibrated_auc)(group)
            for n, group in losses.items() for a in ATTACKS}


def group_sizes(losses: GroupLosses) -> tuple[int, int]:
    """(members, non-members)."""
    return len(losses.member_target), len(losses.nonmember_target)


def auc_standard_error(auc: float, n_members: int, n_nonmembers: int) -> float:
    """The AUC's standard error (Hanley and McNeil, Radiology 1982), to read a measured AUC against a target."""
    q1, q2 = auc / (2.0 - auc), 2.0 * auc * auc / (1.0 + auc)
    var = (auc * (1.0 - auc) + (n_members - 1) * (q1 - auc * auc)
           + (n_nonmembers - 1) * (q2 - auc * auc)) / (n_members * n_nonmembers)
    return float(np.sqrt(max(var, 0.0)))


def hybrid_local_weight(site_dir: str | Path) -> float:
    """The largest absolute weight the site's hybrid (meta-classifier) puts on its own models' evidence.

    0 when the run's stacking fell back to a model without them. The site's forest and GLM are
    fitted on its training split without DP (docs/privacy.md, "What the guarantee does not cover"),
    so a hybrid with a non-zero weight on either carries no DP guarantee for the training patients.
    """
    from common.stack import BASE_MODELS, LOCAL_MODELS

    models = load_site(site_dir).models
    k = models.n_classes
    width = len(BASE_MODELS) * (1 if k == 2 else k)
    coef = np.asarray(models.meta_coef, dtype=np.float64)
    per_output = coef.reshape(-1, width + 1)[:, :width]  # per output: weights, then the intercept
    block = 1 if k == 2 else k
    return max(float(np.abs(per_output[:, i * block:(i + 1) * block]).max())
               for i in (BASE_MODELS.index(m) for m in LOCAL_MODELS))
