"""``genofed pretrain``: train the deep model on a public cohort, as a starting point for federations.

DP-SGD needs far more records than a hospital has before a deep model learns anything (at epsilon 8
our motif detector stays at chance on 250-1,400 training records a site: docs/learning.md). The
usual way out is to start the private training from weights learned on public data, where no
privacy is owed: a published cohort, a reference panel, a synthetic cohort. This command trains
the deep model, without DP, on such a cohort's train split (early stopping on its validation
split) and writes a checkpoint that ``genofed simulate --init-from`` and the run config's
``init-from`` accept: the same layout check as any warm start applies.

Only data that is public may go in: the pretrained weights carry no guarantee at all about the
cohort they were trained on. The hospitals' guarantee is unchanged by a warm start (the starting
weights are a public input to their DP-SGD), which every report of a warm-started run states.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from common.errors import GenofedError


class PretrainError(GenofedError):
    """The deep model could not be pretrained (for example the output folder already exists)."""


PATIENCE = 10
"""Early-stopping patience of pretraining (public data, no DP: epochs are cheap)."""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``genofed pretrain``."""
    from simulations.evaluate_cli import add_cohort_source

    p = subparsers.add_parser("pretrain", help="train the deep model on a PUBLIC cohort, for --init-from",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cohort_source(p)
    p.add_argument("--out", type=Path, required=True, help="run directory to create for the checkpoint")
    p.add_argument("--epochs", type=int, default=60, help="epochs at most; early stopping on validation (default 60)")
    p.add_argument("--batch-size", type=int, default=128, help="batch size (default 128)")
    p.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate (default 2e-3)")
    p.add_argument("--patience", type=int, default=PATIENCE,
                   help=f"stop after this many epochs without a lower validation loss (default {PATIENCE})")
    p.add_argument("--seed", type=int, default=0, help="seed of the start and the batches (default 0)")
    p.add_argument("--arch", choices=("cnn", "lstm"), default="cnn", help="deep model towers (default cnn)")
    p.set_defaults(func=_command)


def _command(args: argparse.Namespace) -> int:
    from simulations.evaluate_cli import load_input_cohort

    cohort, source = load_input_cohort(args)
    summary = pretrain(cohort, out=args.out, source=source, epochs=args.epochs, batch_size=args.batch_size,
                       lr=args.lr, seed=args.seed, arch=args.arch, patience=args.patience)
    print(f"pretrained on {source}: validation AUC {summary['validation_auc']:.3f} after {summary['best_epoch']} "
          f"epoch(s) of {summary['epochs_run']}, no DP (public data only)")
    print(f"checkpoint: {summary['checkpoint']}  (genofed simulate --init-from {args.out})")
    return 0


def pretrain(cohort: Any, *, out: Path, source: str, epochs: int, batch_size: int, lr: float, seed: int,
             arch: str = "cnn", patience: int = PATIENCE) -> dict[str, Any]:
    """Train the deep model on ``cohort`` without DP; write ``out/checkpoints/`` and ``out/pretrain.json``.

    ``patience``: epochs without a lower validation loss before stopping. A convolutional model
    often sits on a loss plateau for several epochs before it finds a motif, so the pooled
    training default of 3 can stop it at chance (measured in docs/learning.md).

    Returns
    -------
    dict
        What ``out/pretrain.json`` holds: the source, the split sizes, epochs, validation AUC,
        the model configuration and the checkpoint's path.
    """
    from client.dp_training import TrainConfig
    from client.pipeline import SiteData, deep_config, deep_proba, fit_shared_scaler, train_deep
    from common.files import write_text_atomic
    from common.metrics import compute_metrics
    from common.progress import progress_bar
    from server.checkpoint import save_checkpoint

    out = Path(out)
    if out.exists():
        raise PretrainError(f"{out}: already exists; give a new --out folder (pretrain never overwrites)")
    if epochs < 1:
        raise PretrainError(f"--epochs must be at least 1, got {epochs}")
    data = SiteData.from_cohort(cohort)
    if not data.masks["validation"].any():
        raise PretrainError(f"{source}: no validation split to stop early on; give the cohort one in its spec")
    cfg = deep_config(data, arch=arch)
    # A dense-only model is fed shared-scaled inputs; here the public cohort's own exact scaling
    # (the GLM's column choice, which the cap sets, plays no part in the deep model).
    scaler = fit_shared_scaler(data, max_glm_columns=1) if cfg.n_tabular else None
    if patience < 1:
        raise PretrainError(f"--patience must be at least 1, got {patience}")
    train = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, patience=patience)
    with progress_bar() as bar:
        task = bar.add_task("pretraining the deep model (no DP: public data)", total=epochs)
        model, result = train_deep(data, cfg=cfg, train=train, dp=None, seed=seed, scaler=scaler,
                                   on_epoch=lambda rec: bar.advance(task))
        bar.update(task, completed=epochs)
    val_y = data.y[data.masks["validation"]]
    val_auc = compute_metrics(val_y, deep_proba(model, data, "validation", scaler), n_classes=data.n_classes)["auc"]
    origin = {"kind": "pretrained without DP on a public cohort", "source": source,
              "n_train": int(data.masks["train"].sum()), "validation_auc": round(float(val_auc), 4),
              "epochs_run": result.epochs_run, "best_epoch": result.best_epoch}
    out.mkdir(parents=True)
    arrays = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    path = save_checkpoint(out, phase="pretrain", round=0, arrays=arrays,
                           state={"model_config": cfg.to_dict(), "origin": origin})
    summary = {**origin, "model_config": cfg.to_dict(), "checkpoint": str(path)}
    write_text_atomic(out / "pretrain.json", json.dumps(summary, indent=2))
    return summary
