"""The coordinator's Flower ServerApp: runs the phases of :mod:`server.phases` and writes the run directory.

Run directory (``run-dir`` in the run config, an absolute path): ``metrics.json``,
``metrics.md``, ``report.html``, ``explanation.json``, ``pooled_stats.npz``, ``run.log``, ``events.jsonl`` and
``checkpoints/``. With ``resume = true`` the
run continues from the last checkpoint in that directory, under the same genofed run id.
"""

from __future__ import annotations

import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.errors import GenofedError
from common.flower_internals import shorten_polls
from server.exchange import POLL_S, PollingGrid
from server.phases import (
    new_state,
    remember_ledgers,
    run_census,
    run_cnn_rounds,
    run_evaluation,
    run_glm_rounds,
    run_meta_rounds,
    run_moments,
    run_site_alone,
    run_thresholds,
    state_from_dict,
    state_to_dict,
)
from server.explanation_phase import run_explanations
from server.report import build_metrics, write_failed_report, write_report
from server.runlog import RunLog
from common.settings import RunSettings

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    settings = RunSettings.from_run_config(dict(context.run_config))
    shorten_polls(POLL_S)  # replies' objects are pulled again after POLL_S, not Flower's 1 s, 2 s, ...
    run_federation(PollingGrid(grid), settings)


def run_federation(grid: Grid, settings: RunSettings) -> dict[str, Any]:
    """Every phase, from census (or the last checkpoint) to the written report."""
    run_dir = Path(settings.run_dir) if settings.run_dir else None
    log = RunLog(run_dir)
    started = time.monotonic()
    holder: dict[str, Any] = {}
    try:
        return _run(grid, settings, run_dir, log, started, holder)
    except GenofedError as exc:
        log.warning(f"run failed: {exc}")
        log.event("failed", reason=str(exc))
        if run_dir is not None and "state" in holder:
            write_failed_report(run_dir, holder["state"], settings, reason=str(exc))
        raise
    except Exception as exc:
        log.warning("run failed with an internal error:\n" + traceback.format_exc())
        log.event("failed", reason=f"internal error: {exc!r}")
        raise


def _run(grid: Grid, settings: RunSettings, run_dir: Path | None, log: RunLog, started: float,
         holder: dict[str, Any]) -> dict[str, Any]:
    from server.checkpoint import load_latest, save_checkpoint

    state, weights = new_state(), None
    if settings.resume and run_dir is not None and (ckpt := load_latest(run_dir)) is not None:
        state, weights = state_from_dict(ckpt.state), ckpt.arrays
        log.info(f"resuming run {state.run_id} from checkpoint: phase {state.phase}, CNN round {state.cnn_round}, "
                 f"meta round {state.meta_round}")
    else:
        log.info(f"run {state.run_id}: {settings.cnn_rounds} CNN rounds ({settings.strategy}), "
                 f"{'DP epsilon ' + str(settings.epsilon) if settings.dp else 'no DP'}, min {settings.min_sites} sites")
    holder["state"] = state  # a failed run still reports who refused or left, and why

    def checkpoint(w: dict[str, np.ndarray]) -> None:
        if run_dir is not None:
            rnd = {"cnn": state.cnn_round, "glm": state.glm_round, "meta": state.meta_round}.get(state.phase, 0)
            save_checkpoint(run_dir, phase=state.phase, round=rnd, arrays=w, state=state_to_dict(state))

    if state.phase == "census":
        weights = run_census(grid, settings, state, log)
        checkpoint(weights)
    if state.phase == "moments":
        run_moments(grid, settings, state, log)
        checkpoint(weights)
    if state.phase == "cnn":
        weights = run_cnn_rounds(grid, settings, state, log, weights, checkpoint)
    if state.phase == "glm":
        run_glm_rounds(grid, settings, state, log, weights, checkpoint)
    if state.phase == "meta":
        run_meta_rounds(grid, settings, state, log, weights, checkpoint)
    if state.phase == "alone":
        run_site_alone(grid, settings, state, log)
        checkpoint(weights)
    if state.phase == "threshold":
        run_thresholds(grid, settings, state, log, weights)
        checkpoint(weights)
    if state.phase == "explain":
        run_explanations(grid, settings, state, log, weights)
        checkpoint(weights)
    evaluation = run_evaluation(grid, settings, state, log, weights)
    timing = {"total_s": round(time.monotonic() - started, 2),
              "exchange_s": round(sum(r.get("seconds", 0.0) for r in state.rounds), 2)}
    doc = build_metrics(evaluation, state, settings, timing)
    if settings.ledger_registry and doc["privacy"]:
        remember_ledgers(settings, state, spent={s: p["epsilon"] for s, p in doc["privacy"].items()})
    if run_dir is not None:
        from server.report_html import render_run_report, save_pooled_stats

        write_report(run_dir, doc)
        save_pooled_stats(run_dir, evaluation["pooled"])
        render_run_report(run_dir)
        checkpoint(weights)
    log.event("done", run_id=state.run_id, seconds=timing["total_s"])
    log.info(f"run {state.run_id} done in {timing['total_s']:.1f} s; hybrid pooled test AUC "
             f"{doc['models'].get('hybrid', {}).get('auc', float('nan')):.3f}"
             + (f"; results in {run_dir}" if run_dir else ""))
    return doc
