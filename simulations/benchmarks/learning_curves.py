"""Sweep: the deep model's validation AUC after every epoch, for variants of its architecture and schedule.

The deep model is trained on the pooled train split of a cohort (a spec, or every site of a
layout pooled), one variant after another in one invocation, each from the same seeded start.
Without DP, each epoch is one call of the training the federation makes in a round (a fresh
Adam, no early stopping), so a curve shows how many local epochs a model needs before it
learns anything. With ``"epsilon"`` in a variant, the whole curve is one DP-SGD training
calibrated to all its epochs, as a site's would be.

A variant is a JSON object: deep-model fields (``dropout``, ``filters``, ``kernel_sizes``,
``dilations``, ``groups``, ``head_hidden``, ...) and ``lr``, ``weight_decay``, ``batch_size``,
``epsilon``. ``{}`` is the default model and schedule.

Usage::

    python -m simulations.benchmarks.learning_curves (--spec SPEC | --sites-dir DIR) \
        --variants '[{}, {"dropout": 0.5}]' [--epochs 10] [--seeds 0 1] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np

from simulations.benchmarks import emit, layout_fields, run_main

SCHEDULE_KEYS = ("lr", "weight_decay", "batch_size", "epsilon")


def _auc(y: np.ndarray, proba: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    if proba.shape[1] == 2:
        return float(roc_auc_score(y, proba[:, 1]))
    return float(roc_auc_score(y, proba, multi_class="ovr", labels=list(range(proba.shape[1]))))


def curve(data: Any, variant: dict[str, Any], *, epochs: int, seed: int) -> list[float]:
    """Validation AUC after each of ``epochs`` epochs of ``variant`` on the pooled ``data``."""
    from client.dp_training import DPConfig, TrainConfig, predict_proba, train_deep_model
    from client.pipeline import deep_config, deep_data, fit_shared_scaler
    from common.models import build_model

    cfg = deep_config(data, **layout_fields({k: v for k, v in variant.items() if k not in SCHEDULE_KEYS}))
    scaler = fit_shared_scaler(data, max_glm_columns=256)
    train, val = deep_data(data, "train", cfg, scaler), deep_data(data, "validation", cfg, scaler)
    model = build_model(cfg, seed=seed)
    kw = {"batch_size": variant.get("batch_size", 128), "lr": variant.get("lr", 2e-3),
          "weight_decay": variant.get("weight_decay", 1e-2), "select_best": False, "seed": seed}
    if "epsilon" in variant:
        n = len(train)
        dp = DPConfig(target_epsilon=variant["epsilon"], target_delta=min(1e-5, 0.1 / n), total_epochs=epochs)
        aucs: list[float] = []
        train_deep_model(model, train, val=val, config=TrainConfig(epochs=epochs, **kw), dp=dp,
                         on_epoch=lambda rec: aucs.append(_auc(val.y, predict_proba(model, val))))
        return aucs
    aucs = []
    for _ in range(epochs):
        # One call per epoch: a fresh optimizer each time, as in a federated round.
        train_deep_model(model, train, val=val, config=TrainConfig(epochs=1, **kw))
        aucs.append(_auc(val.y, predict_proba(model, val)))
    return aucs


def run(data: Any, variants: list[dict[str, Any]], *, epochs: int, seeds: list[int], source: str) -> dict[str, Any]:
    """Every variant's curve for every seed, and the first epoch at which each curve reaches 0.6."""
    import torch

    torch.set_num_threads(1)
    rows = []
    for v in variants:
        curves = [curve(data, v, epochs=epochs, seed=s) for s in seeds]
        mean = np.mean(curves, axis=0)
        rows.append({"variant": v, "curves": [[round(a, 3) for a in c] for c in curves],
                     "mean_auc": [round(float(a), 3) for a in mean], "final_mean_auc": round(float(mean[-1]), 3),
                     "best_mean_auc": round(float(mean.max()), 3)})
    return {"source": source, "epochs": epochs, "seeds": seeds, "n_train": int(data.masks["train"].sum()),
            "results": rows}


def render(result: dict[str, Any]) -> str:
    """A Markdown table of mean validation AUC per epoch."""
    head = "| variant | " + " | ".join(str(e + 1) for e in range(result["epochs"])) + " |"
    lines = [f"{result['source']}, {result['n_train']} training records, seeds {result['seeds']}", "",
             head, "|" + "---|" * (result["epochs"] + 1)]
    for r in result["results"]:
        lines.append(f"| `{json.dumps(r['variant'])}` | " + " | ".join(f"{a:.2f}" for a in r["mean_auc"]) + " |")
    return "\n".join(lines)


def main() -> None:
    from simulations.evaluate_cli import add_cohort_source, load_input_cohort

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cohort_source(parser)
    parser.add_argument("--variants", default="[{}]", help="JSON list of variants (default: the default model)")
    parser.add_argument("--epochs", type=int, default=10, help="epochs per curve (default 10)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds of the start and the batches")
    parser.add_argument("--json", help="also write the result to this file")
    args = parser.parse_args()
    from client.pipeline import SiteData

    cohort, source = load_input_cohort(args)
    result = run(SiteData.from_cohort(cohort), json.loads(args.variants), epochs=args.epochs, seeds=args.seeds,
                 source=source)
    emit(result, args.json)
    print(render(result))


if __name__ == "__main__":
    run_main(main, "python -m simulations.benchmarks.learning_curves")
