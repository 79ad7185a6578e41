"""The run directory's ``metrics.json`` and ``metrics.md``, from pooled statistics and run state.

``metrics.json`` has the schema of ``genofed evaluate`` (``models`` keyed ``hybrid``, ``cnn``,
``forest``, ``logreg`` with ``auc``, ``accuracy``, ``precision``, ``recall``, ``specificity``,
``f1``, ``auprc`` and ``ci``), plus ``sites`` (each site's own test metrics), ``privacy`` keyed by
site (``epsilon`` spent in total by the site's ledger, ``run_epsilon`` of this run's DP-SGD,
``delta``), ``missing_sites`` (site -> why it left the run), ``rounds`` and ``settings``.
Pooled metrics are computed from the sum of the sites' statistics: counts exactly, AUC within
the ``auc_bound`` it reports; intervals come from a parametric bootstrap of those statistics.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from common.files import json_default, write_text_atomic
from common.metrics import METRIC_NAMES, EvalStats, bootstrap_ci_from_stats, metrics_from_stats
from server.phases import RunState
from server.settings import RunSettings

MODELS = ("hybrid", "cnn", "forest", "logreg")


def _site_metrics(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"n": int(flat.get("num-examples", 0))}
    for key, value in flat.items():
        if "." in key:
            model, metric = key.split(".", 1)
            out.setdefault(model, {})[metric] = float(value)
    return out


def _privacy(state: RunState, settings: RunSettings) -> dict[str, Any]:
    out: dict[str, Any] = {}

    def entry(site: str) -> dict[str, Any]:
        return out.setdefault(site, {
            "epsilon": float("nan"), "run_epsilon": float("nan"),
            "delta": float(state.census.get(site, {}).get("ledger-delta", settings.delta)),
            "budget": float(state.census.get(site, {}).get("ledger-budget", float("nan")))})

    # Rounds are in order, so each site ends with its ledger's latest total.
    for record in state.rounds:
        if record.get("phase") == "cnn":
            for site, m in record["sites"].items():
                if "epsilon" in m:
                    entry(site).update(epsilon=float(m["epsilon"]),
                                       run_epsilon=float(m.get("run-epsilon", float("nan"))))
        elif record.get("phase") == "meta":
            for site, eps in record.get("epsilon", {}).items():
                entry(site)["epsilon"] = float(eps)
    return out


def build_metrics(evaluation: dict[str, Any], state: RunState, settings: RunSettings,
                  timing: dict[str, float]) -> dict[str, Any]:
    """The whole ``metrics.json`` document."""
    pooled: dict[str, EvalStats] = evaluation["pooled"]
    models = {}
    for name in MODELS:
        if name not in pooled:
            continue
        m = metrics_from_stats(pooled[name])
        models[name] = {**{k: m[k] for k in METRIC_NAMES}, "auc_bound": m["auc_bound"], "n": m["n"],
                        "ci": bootstrap_ci_from_stats(pooled[name], n_boot=500, seed=settings.seed)}
    return {
        "run": {"run_id": state.run_id, "exchanges": len(state.rounds), "timing": timing,
                "classes": state.schema.get("label", {}).get("classes", [])},
        "models": models,
        "sites": {site: _site_metrics(flat) for site, flat in evaluation["sites"].items()},
        "privacy": _privacy(state, settings),
        "privacy_note": _privacy_note(settings),
        "missing_sites": dict(state.excluded),
        "meta": {"coef": list(state.meta_coef), "rounds": state.meta_round,
                 "converged": bool(state.meta_solver.get("converged", False))},
        "rounds": state.rounds,
        "census": state.census,
        "settings": asdict(settings),
    }


def _privacy_note(settings: RunSettings) -> str:
    if not settings.dp:
        return "No differential privacy in this run (dp = false): the non-private reference."
    return ("Sample-level DP-SGD (Opacus, RDP accountant) protects each site's training records in the CNN "
            "updates, and the Gaussian mechanism the meta-classifier statistics (meta-epsilon over the meta "
            "rounds); epsilon is composed in each site's ledger with every earlier release at the ledger's delta. "
            "Not covered: the forests (never leave the sites), the census counts and the test statistics "
            "(released without noise in this version), and the random number generator, which is not "
            "cryptographically secure here (it is seeded from each site's vault key, never from the run config).")


def _fmt(x: Any) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def render_markdown(doc: dict[str, Any]) -> str:
    """A readable summary of ``metrics.json``."""
    lines = ["| model | " + " | ".join(METRIC_NAMES) + " |", "|---|" + "---|" * len(METRIC_NAMES)]
    for name, m in doc["models"].items():
        lines.append(f"| {name} | " + " | ".join(f"{_fmt(m[k])} [{_fmt(m['ci'][k][0])}, {_fmt(m['ci'][k][1])}]"
                                                 for k in METRIC_NAMES) + " |")
    lines += ["", "Per site (test AUC): " + "; ".join(
        f"{site}: " + ", ".join(f"{mod} {_fmt(v.get('auc'))}" for mod, v in m.items() if isinstance(v, dict))
        for site, m in doc["sites"].items())]
    if doc["privacy"]:
        lines.append("Privacy (epsilon spent per site ledger / this run's DP-SGD): " + "; ".join(
            f"{s}: {_fmt(p['epsilon'])} / {_fmt(p['run_epsilon'])} at delta {p['delta']:.1e}"
            for s, p in doc["privacy"].items()))
    lines.append(doc["privacy_note"])
    if doc["missing_sites"]:
        lines.append("Sites that left the run: " + "; ".join(f"{s} ({r})" for s, r in doc["missing_sites"].items()))
    return "\n".join(lines) + "\n"


def write_report(run_dir: Path, doc: dict[str, Any]) -> None:
    """Write ``metrics.json`` and ``metrics.md`` atomically."""
    write_text_atomic(run_dir / "metrics.json", json.dumps(doc, indent=2, default=json_default))
    write_text_atomic(run_dir / "metrics.md", render_markdown(doc))
