"""Phase 5: the global explanation, from the sites' noised sums of per-patient attributions.

Every training site sends one explanation release (:mod:`client.explain_release`); the
coordinator checks each against the declared shapes, sums them (sample-weighted by construction:
the sums are over patients, and means divide by all patients explained), reads the global
explanation off the sums (:func:`common.explanation.global_explanation`) and writes
``RUNDIR/explanation.json``. The evaluation then hands it to every site with the final models.
A site that cannot explain is named in the explanation and stays in the run: an explanation is
not worth a site's evaluation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, RecordDict
from flwr.serverapp import Grid

from common.records import from_record, to_record
from common.settings import RoundFacts, RunSettings
from common.site_names import natural_key
from server.exchange import exchange
from server.phases import RunState, _require_quorum, _secure_request, shared_record
from server.runlog import RunLog

UNIT = 1.0  # client.explain_release.UNIT: the coordinator does not import the site's code

EXPLANATION_FILE = "explanation.json"


def run_explanations(grid: Grid, settings: RunSettings, state: RunState, log: RunLog,
                     weights: dict[str, np.ndarray]) -> dict[str, Any]:
    """Ask every training site for its explanation release; sum them into the global explanation."""
    from common.explanation import motif_layout, summary_shapes

    nodes = _require_quorum(state, settings, "explanation")
    k = len(state.schema["label"]["classes"])
    motifs = motif_layout(state.schema, state.model_config, k=settings.motif_k, bins=settings.motif_bins)
    shapes = summary_shapes(state.schema, n_classes=k, model_config=state.model_config, motifs=motifs)
    label = f"{state.run_id}-explain"
    facts = RoundFacts(run_id=state.run_id, model_config=json.dumps(state.model_config), coef=tuple(state.meta_coef),
                       glm_coef=tuple(state.glm_coef), secure=_secure_request(state, label, nodes))
    content = RecordDict({"cnn": to_record(weights), "shared": shared_record(state),
                          "config": ConfigRecord(facts.to_config())})
    res = exchange(grid, nodes, lambda n: content, message_type="query.explain", group_id=label,
                   timeout=settings.round_timeout)
    missing = {state.site_of(n): reason for n, reason in res.failures.items()}
    if state.secure:
        total, sites = _secure_sums(grid, settings, state, log, res, shapes, missing, label=label, nodes=nodes)
    else:
        total, sites = _plain_sums(state, res, shapes, missing)
    for site, reason in missing.items():
        log.warning(f"explanation: site {site} sent no usable summary and is left out of it: {reason}")
    state.rounds.append({"phase": "explain", **res.cost(), "sites": sorted(sites, key=natural_key),
                         "epsilon": {s: v["epsilon"] for s, v in sites.items() if v["epsilon"] > 0}})
    state.explanation = _explanation(total, sites, missing, settings, state, motifs) if sites else {}
    if settings.run_dir and state.explanation:
        from common.files import write_text_atomic

        write_text_atomic(Path(settings.run_dir) / EXPLANATION_FILE, json.dumps(state.explanation, indent=1))
    log.event("explain", seconds=res.seconds, sites=sorted(sites, key=natural_key))
    log.info(f"explanation: {len(sites)} sites' summaries over {sum(v['patients'] for v in sites.values())} "
             "validation patients" + (f"; top feature {state.explanation['features'][0]['feature']}"
                                      if state.explanation.get("features") else ""))
    state.phase = "evaluate"
    return state.explanation


def _site_facts(state: RunState, node: int, reply: Any) -> dict[str, Any]:
    metrics = dict(reply.content.metric_records["metrics"])
    return {"patients": int(metrics.get("num-examples", 0)), "epsilon": float(metrics.get("epsilon", 0.0)),
            "noise_sd": float(metrics.get("noise-std", 0.0)),
            "delta": float(state.census.get(state.site_of(node), {}).get("ledger-delta", 0.0))}


def _plain_sums(state: RunState, res: Any, shapes: dict[str, tuple[int, ...]],
                missing: dict[str, str]) -> tuple[dict[str, np.ndarray], dict[str, dict[str, Any]]]:
    """The sum of the sites' summaries, each checked against the declared shapes first."""
    total: dict[str, np.ndarray] = {}
    sites: dict[str, dict[str, Any]] = {}
    for node in sorted(res.replies, key=state.site_order):
        site, reply = state.site_of(node), res.replies[node]
        arrays = from_record(reply.content.array_records["summary"])
        if (why := _malformed(arrays, shapes)) is not None:
            missing[site] = f"summary rejected: {why}"
            continue
        sites[site] = _site_facts(state, node, reply)
        for name, value in arrays.items():
            total[name] = total.get(name, 0.0) + np.asarray(value, dtype=np.float64)
    return total, sites


def _secure_sums(grid: Grid, settings: RunSettings, state: RunState, log: RunLog, res: Any,
                 shapes: dict[str, tuple[int, ...]], missing: dict[str, str], *, label: str,
                 nodes: list[int]) -> tuple[dict[str, np.ndarray], dict[str, dict[str, Any]]]:
    """The summaries' secure sum, checked as a whole and clipped at zero where the sites did not.

    A site whose masked reply is malformed leaves the run (its mask key is rebuilt to unmask around
    it), where a plain run keeps it for the evaluation.
    """
    from common.explanation import clip_nonnegative
    from server.exchange import TooFewSitesError
    from server.phases import _secure_sum

    try:
        total, summed = _secure_sum(grid, settings, state, log, res, label=label, nodes=nodes,
                                    message_type="query.explain", where="explanation")
    except TooFewSitesError as exc:
        missing.update({state.site_of(n): str(exc) for n in res.replies})
        return {}, {}
    if (why := _malformed(total, shapes)) is not None:
        missing.update({state.site_of(n): f"the summed summaries were rejected: {why}" for n in summed})
        return {}, {}
    missing.update({state.site_of(n): "malformed masked summary" for n in res.replies if n not in summed})
    sites = {state.site_of(n): _site_facts(state, n, res.replies[n]) for n in summed}
    return {name: clip_nonnegative(name, value) for name, value in total.items()}, sites


def _malformed(arrays: dict[str, np.ndarray], shapes: dict[str, tuple[int, ...]]) -> str | None:
    if set(arrays) != set(shapes):
        return f"arrays {sorted(set(arrays) ^ set(shapes))} differ from the declared ones"
    for name, shape in shapes.items():
        if np.shape(arrays[name]) != shape or not np.isfinite(arrays[name]).all():
            return f"{name} is not a finite array of shape {shape}"
    return None


def _explanation(total: dict[str, np.ndarray], sites: dict[str, dict[str, Any]], missing: dict[str, str],
                 settings: RunSettings, state: RunState, motifs: Any) -> dict[str, Any]:
    from common.explanation import global_explanation
    from common.meta import unweighted_models
    from common.stack import BASE_MODELS

    patients = sum(v["patients"] for v in sites.values())
    classes = state.schema["label"]["classes"]
    unweighted = [BASE_MODELS[i] for i in unweighted_models(state.meta_coef, n_models=len(BASE_MODELS),
                                                            n_classes=max(len(classes), 2))]
    # The noise on every per-patient mean of the models' rankings and the profiles (sites add theirs).
    noise_sd = float(np.sqrt(sum(v["noise_sd"] ** 2 for v in sites.values()))) / max(patients, 1)
    return global_explanation(total, schema=state.schema, classes=classes, patients=patients,
                              motifs=motifs, unweighted=unweighted, run_id=state.run_id, noised=settings.dp,
                              epsilon=settings.explanation_epsilon if settings.dp else 0.0,
                              clip=UNIT, per_patient="each patient's attributions scaled to unit L2 norm per summary",
                              noise_sd_per_mean=noise_sd, sites=sites, missing_sites=missing,
                              guarantee=guarantee_text(settings))


def guarantee_text(settings: RunSettings) -> str:
    """What the explanation's privacy covers, in plain words."""
    if not settings.dp:
        return ("Not private: this run had dp = false, so each site's explanation sums were released exact, outside "
                "any differential-privacy guarantee. Per-patient attributions still never left the sites.")
    return (f"Each site released one summary: sums over at most {settings.explanation_patients} of its validation "
            "patients of their attributions, each patient's scaled to unit L2 norm per summary, with"
            f" Gaussian noise for epsilon {settings.explanation_epsilon:g} at the site's delta, charged "
            "to its privacy ledger within its policy" + (
                "; the summaries reached the coordinator only summed (secure sum), each site adding its share of "
                "the noise" if settings.secure_sum and settings.distributed_noise else
                "; the summaries reached the coordinator only summed (secure sum)" if settings.secure_sum else "")
            + ". Per-patient attributions never left the sites. Not covered: "
            "the noise protects the validation patients explained; the models explained carry the run's own "
            "guarantees; feature lists a site resolves from its files are named here by position only.")
