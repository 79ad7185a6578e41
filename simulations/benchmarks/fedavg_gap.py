"""Benchmark: where the federated deep model loses to pooled training, without DP.

Reads a site layout (each vault's cohort; no run needed) and replays offline, in one process,
four ways of spending the same epochs on the same train records, each scored after every round
by the deep model's pooled validation and test AUC:

``pooled``
    one model on every train record, one optimizer for all epochs (``local-epochs`` per round);
``one-site-rounds``
    every train record at one site, the optimizer started afresh every round, as a federated
    site's local training is: what the round structure alone costs;
``fedavg``
    the layout's sites, each training ``local-epochs`` from the global weights, averaged by train
    counts: the federation without DP and without Flower;
``fedavg-iid``
    as many sites with the same sizes, the train records dealt out at random: what the sites'
    differences cost, beside what averaging itself costs;
``cyclic``
    the layout's sites in turn (cyclic weight transfer): each round the model visits every site
    once, in a seeded random order, and each trains ``local-epochs`` from the previous site's
    weights: no averaging at all, the same local epochs.

The shared scaler is the exact pooled one (the federated one equals it without noise). The same
model layout, batch size, learning rate and weight decay as a run (``RunSettings``) unless
given. Nothing is charged to the ledgers.

Usage::

    python -m simulations.benchmarks.fedavg_gap SITES_DIR [--rounds 10] [--local-epochs 2]
        [--variants pooled fedavg ...] [--strategy fedavg|fedadam] [--server-lr S]
        [--server-momentum M] [--init-seed N] [--model JSON] [--json OUT]

``--model`` overrides fields of the deep model's layout for every variant, e.g. ``'{"groups": null}'``
(one GroupNorm group per channel).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from simulations.benchmarks import BenchmarkInputError, emit, layout_cohorts, layout_fields, run_main

VARIANTS = ("pooled", "one-site-rounds", "fedavg", "fedavg-iid", "cyclic")


def _sites(sites_dir: Path) -> tuple[list[Any], Any]:
    from client.pipeline import SiteData
    from common.cohort import concat_cohorts

    cohorts = layout_cohorts(sites_dir)
    return [SiteData.from_cohort(c) for c in cohorts], SiteData.from_cohort(concat_cohorts(cohorts))


def _iid_sites(pooled: Any, sizes: list[int], seed: int) -> list[Any]:
    """``pooled``'s train records dealt out at random to sites of ``sizes`` records."""
    train = np.flatnonzero(pooled.masks["train"])
    order = np.random.default_rng(seed).permutation(train)
    out, start = [], 0
    for n in sizes:
        mask = np.zeros_like(pooled.masks["train"])
        mask[order[start:start + n]] = True
        out.append(dataclasses.replace(pooled, masks={**pooled.masks, "train": mask}))
        start += n
    return out


def _scores(model: Any, pooled: Any, scaler: Any) -> dict[str, float]:
    from sklearn.metrics import roc_auc_score

    from client.pipeline import deep_proba

    out = {}
    for split in ("validation", "test"):
        y = pooled.y[pooled.masks[split]]
        p = deep_proba(model, pooled, split, scaler)
        out[split] = round(float(roc_auc_score(y, p[:, 1]) if p.shape[1] == 2 else
                                 roc_auc_score(y, p, multi_class="ovr")), 4)
    return out


def _fedavg(sites: list[Any], pooled: Any, *, cfg: Any, scaler: Any, rounds: int, train: Any,
            strategy: str = "fedavg", server_lr: float | None = None, server_momentum: float = 0.0,
            init_seed: int = 0) -> list[dict]:
    """Federated rounds by train counts, each site's optimizer started afresh every round.

    ``strategy`` "fedavg": with ``server_lr`` 1 (or None) and ``server_momentum`` 0 the new global
    model is the average; otherwise the average's step from the global model is taken as a
    pseudo-gradient (FedAvgM). ``strategy`` "fedadam": the run's own FedAdam aggregator, with
    ``server_lr`` as its ``server-lr`` (None: the run's default). ``init_seed`` seeds the initial
    weights and, with the round and the site, each site's shuffles.
    """
    import torch

    from client.dp_training import train_deep_model
    from client.pipeline import deep_data
    from common.models import build_model
    from server.aggregation import make_aggregator, weighted_mean

    glob = build_model(cfg, seed=init_seed)
    adam = make_aggregator("fedadam", **({} if server_lr is None else {"server-lr": server_lr})) \
        if strategy == "fedadam" else None
    velocity: dict[str, np.ndarray] = {}
    curve = []
    for rnd in range(1, rounds + 1):
        updates = []
        for i, site in enumerate(sites):
            local = build_model(cfg, seed=init_seed)
            local.load_state_dict(glob.state_dict())
            train_deep_model(local, deep_data(site, "train", cfg, scaler),
                             config=dataclasses.replace(train, seed=100_000 * init_seed + 1000 * rnd + i))
            updates.append(({k: v.numpy() for k, v in local.state_dict().items()}, int(site.masks["train"].sum())))
        old = {k: v.numpy() for k, v in glob.state_dict().items()}
        if adam is not None:
            mean = adam.aggregate(old, updates)
        else:
            mean = weighted_mean(updates)  # the run's FedAvg
            step = 1.0 if server_lr is None else server_lr
            for k in mean:
                velocity[k] = server_momentum * velocity.get(k, 0.0) + (mean[k] - old[k])
                mean[k] = (old[k] + step * velocity[k]).astype(old[k].dtype)
        glob.load_state_dict({k: torch.as_tensor(v) for k, v in mean.items()})
        curve.append({"round": rnd, **_scores(glob, pooled, scaler)})
    return curve


def _cyclic(sites: list[Any], pooled: Any, *, cfg: Any, scaler: Any, rounds: int, train: Any,
            init_seed: int = 0) -> list[dict]:
    """Cyclic weight transfer: one model trained at each site in turn, a fresh optimizer per visit."""
    from client.dp_training import train_deep_model
    from client.pipeline import deep_data
    from common.models import build_model

    model = build_model(cfg, seed=init_seed)
    rng = np.random.default_rng(init_seed)
    curve = []
    for rnd in range(1, rounds + 1):
        for i in rng.permutation(len(sites)):
            train_deep_model(model, deep_data(sites[i], "train", cfg, scaler),
                             config=dataclasses.replace(train, seed=100_000 * init_seed + 1000 * rnd + int(i)))
        curve.append({"round": rnd, **_scores(model, pooled, scaler)})
    return curve


def _pooled(pooled: Any, *, cfg: Any, scaler: Any, rounds: int, train: Any, init_seed: int = 0) -> list[dict]:
    """One model, one optimizer, scored every ``train.epochs`` epochs."""
    from client.dp_training import train_deep_model
    from client.pipeline import deep_data
    from common.models import build_model

    model = build_model(cfg, seed=init_seed)
    curve: list[dict] = []

    def score(record: dict[str, float]) -> None:
        if record["epoch"] % train.epochs == 0:
            curve.append({"round": record["epoch"] // train.epochs, **_scores(model, pooled, scaler)})

    train_deep_model(model, deep_data(pooled, "train", cfg, scaler),
                     config=dataclasses.replace(train, epochs=rounds * train.epochs, seed=init_seed),
                     on_epoch=score)
    return curve


def run(*, sites_dir: Path, rounds: int, local_epochs: int, variants: list[str], batch_size: int | None = None,
        lr: float | None = None, seed: int = 0, strategy: str = "fedavg", server_lr: float | None = None,
        server_momentum: float = 0.0, init_seed: int = 0, model: dict[str, Any] | None = None) -> dict[str, Any]:
    from client.dp_training import TrainConfig
    from client.pipeline import deep_config, fit_shared_scaler
    from common.settings import RunSettings

    base = RunSettings()
    sites, pooled = _sites(sites_dir)
    scaler = fit_shared_scaler(pooled, max_glm_columns=base.glm_max_features)
    try:
        cfg = deep_config(pooled, **layout_fields(model or {}))
    except ValueError as exc:
        if not model:
            raise
        raise BenchmarkInputError(f"--model {json.dumps(model)}: {exc}") from None
    train = TrainConfig(epochs=local_epochs, batch_size=batch_size or base.batch_size, lr=lr or base.lr,
                        weight_decay=base.weight_decay, seed=0, select_best=False)
    sizes = [int(s.masks["train"].sum()) for s in sites]
    curves = {}
    for name in variants:
        if name == "pooled":
            curves[name] = _pooled(pooled, cfg=cfg, scaler=scaler, rounds=rounds, train=train, init_seed=init_seed)
            continue
        if name == "cyclic":
            curves[name] = _cyclic(sites, pooled, cfg=cfg, scaler=scaler, rounds=rounds, train=train,
                                   init_seed=init_seed)
            continue
        members = {"one-site-rounds": [pooled], "fedavg": sites,
                   "fedavg-iid": _iid_sites(pooled, sizes, seed)}[name]
        curves[name] = _fedavg(members, pooled, cfg=cfg, scaler=scaler, rounds=rounds, train=train,
                               strategy=strategy, server_lr=server_lr, server_momentum=server_momentum,
                               init_seed=init_seed)
    best = {name: max(c, key=lambda r: r["validation"]) for name, c in curves.items()}
    return {"sites_dir": str(sites_dir), "site_train_records": sizes, "rounds": rounds, "local_epochs": local_epochs,
            "batch_size": train.batch_size, "lr": train.lr, "strategy": strategy, "server_lr": server_lr,
            "server_momentum": server_momentum, "init_seed": init_seed, "model": model or {},
            "final": {name: c[-1] for name, c in curves.items()},
            "best_by_validation": best, "curves": curves}


def _model_fields(text: str) -> dict[str, Any]:
    """``--model``: a JSON object whose keys are fields of the deep model's layout."""
    from common.models import DeepModelConfig

    try:
        fields = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON ({exc.msg}): {text!r}") from None
    if not isinstance(fields, dict):
        raise argparse.ArgumentTypeError(f"give a JSON object, e.g. '{{\"groups\": null}}', not {text!r}")
    known = {f.name for f in dataclasses.fields(DeepModelConfig)} - {"n_classes", "tracks", "n_tabular"}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown deep-model field(s) {', '.join(unknown)}; "
                                         f"known: {', '.join(sorted(known))}")
    return fields


def main(argv: list[str] | None = None) -> None:
    from common.settings import RunSettings

    defaults = RunSettings()
    parser = argparse.ArgumentParser(prog="python -m simulations.benchmarks.fedavg_gap", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sites_dir", type=Path, help="a site layout with vaults (genofed split ... --vaults)")
    parser.add_argument("--rounds", type=int, default=defaults.cnn_rounds, help="default: the run's cnn-rounds")
    parser.add_argument("--local-epochs", type=int, default=defaults.local_epochs,
                        help="default: the run's local-epochs")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--batch-size", type=int, help="default: the run's batch-size")
    parser.add_argument("--lr", type=float, help="default: the run's lr")
    parser.add_argument("--seed", type=int, default=0, help="how fedavg-iid deals the records")
    parser.add_argument("--init-seed", type=int, default=0,
                        help="seeds the initial weights and the sites' shuffles (repeat a replay over seeds)")
    parser.add_argument("--strategy", choices=("fedavg", "fedadam"), default="fedavg",
                        help="the server's rule for the federated variants (the run's own aggregator)")
    parser.add_argument("--server-lr", type=float,
                        help="fedavg: step along the averaged update (default 1: plain FedAvg); "
                             f"fedadam: its server-lr (default {defaults.server_lr})")
    parser.add_argument("--server-momentum", type=float, default=0.0,
                        help="server momentum on the averaged update (0: plain FedAvg)")
    parser.add_argument("--model", type=_model_fields, default={},
                        help='deep-model layout fields to override, as a JSON object, e.g. \'{"groups": null}\'')
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    emit(run(sites_dir=args.sites_dir, rounds=args.rounds, local_epochs=args.local_epochs, variants=args.variants,
             batch_size=args.batch_size, lr=args.lr, seed=args.seed, strategy=args.strategy,
             server_lr=args.server_lr, server_momentum=args.server_momentum, init_seed=args.init_seed,
             model=args.model), args.json)


if __name__ == "__main__":
    run_main(main, "python -m simulations.benchmarks.fedavg_gap")
