"""``genofed evaluate`` on the command line; the work is in :mod:`simulations.evaluate`.

Kept apart so that registering the command does not import torch and scikit-learn: every
other ``genofed`` command starts faster for it.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from common.errors import GenofedError
from common.site_names import natural_key

if TYPE_CHECKING:
    from common.cohort import Cohort


DESCRIPTION = """\
Train every model on pooled data: the reference every federated result is judged against.

Writes RUNDIR/metrics.json and RUNDIR/metrics.md:
  models        hybrid, cnn, forest, logreg (the GLM): auc, accuracy, precision, recall, specificity, f1,
                auprc on the test split, each with a bootstrap 95% interval under "ci"
  privacy       epsilon, delta and the accountant of the deep model's DP-SGD (or dp: false)
  paired_tests  the hybrid against each base model on the test patients: DeLong's test of the AUCs,
                McNemar's of the decisions at the operating thresholds (argmax for multi-class)
  folds         with --folds K: per-fold AUC and paired tests of the hybrid against each model
and RUNDIR/report.html (curves and paired tests; `genofed report RUNDIR` writes it again from
RUNDIR/metrics.json and RUNDIR/pooled_stats.npz).
DP is on by default (epsilon 8, delta min(1e-5, 0.1/n_train)); --no-dp is the non-private reference."""


class EvaluateInputError(GenofedError):
    """The cohort to evaluate could not be found or pooled."""


def add_cohort_source(parser: argparse.ArgumentParser) -> argparse._MutuallyExclusiveGroup:
    """``--spec`` or ``--sites-dir`` (one required), read by :func:`load_input_cohort`; returns the group."""
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--spec", type=Path, help="a cohort spec: its files are imported in memory")
    src.add_argument("--sites-dir", type=Path, help="pool every DIR/<site>/vault with its DIR/<site>/key")
    return src


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``genofed evaluate``."""
    p = subparsers.add_parser("evaluate", help="train every model on pooled data: the reference for the federation",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = add_cohort_source(p)
    src.add_argument("--vault", type=Path, help="one vault (with --key-file)")
    p.add_argument("--key-file", type=Path, help="key of --vault")
    p.add_argument("--out", type=Path, required=True, help="run directory for metrics.json and metrics.md")
    dp = p.add_mutually_exclusive_group()
    dp.add_argument("--epsilon", type=float, default=8.0, help="DP target epsilon for the deep model (default 8)")
    dp.add_argument("--no-dp", action="store_true", help="train without differential privacy (reference)")
    p.add_argument("--delta", type=float, help="DP delta (default: min(1e-5, 0.1/n_train))")
    p.add_argument("--folds", type=int, default=0, help="also run K-fold cross-validation with paired tests")
    p.add_argument("--epochs", type=int, help="deep model epochs at most; early stopping on the validation "
                   "split usually ends sooner (default 60, or 20 with DP: the noise is calibrated to all of them)")
    p.add_argument("--batch-size", type=int, default=128, help="expected batch size (default 128)")
    p.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate (default 2e-3)")
    p.add_argument("--seed", type=int, default=0, help="seed of training and bootstrap (default 0)")
    p.add_argument("--arch", choices=("cnn", "lstm"), default="cnn", help="deep model towers (default cnn)")
    p.add_argument("--forest-cnn-features", action="store_true",
                   help="also feed the deep model's penultimate embedding to the forest")
    p.add_argument("--omics-pca", type=int, metavar="N",
                   help="replace the omics block by its first N principal components (forest and baseline)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the intervals")
    p.set_defaults(func=_command)


def load_input_cohort(args: argparse.Namespace) -> tuple[Cohort, str]:
    """The cohort named by --spec, --vault or --sites-dir."""
    from client.cohort_store import load_cohort
    from client.vault import KeySource

    if getattr(args, "spec", None) is not None:
        from client.importers import import_cohort
        from common.spec import load_spec

        return import_cohort(load_spec(args.spec)), f"spec {args.spec}"
    from common.cohort import concat_cohorts

    if getattr(args, "vault", None) is not None:
        if args.key_file is None:
            raise EvaluateInputError("--vault needs --key-file")
        return load_cohort(args.vault, KeySource.from_key_file(args.key_file)), f"vault {args.vault}"
    sites = sorted((p for p in Path(args.sites_dir).iterdir() if (p / "vault").is_dir()),
                   key=lambda p: natural_key(p.name)) if args.sites_dir.is_dir() else []
    if not sites:
        raise EvaluateInputError(f"{args.sites_dir}: no DIR/<site>/vault folders; make them with `genofed cohort split --vaults`")
    cohorts = [load_cohort(s / "vault", KeySource.from_key_file(s / "key")) for s in sites]
    try:
        return concat_cohorts(cohorts), f"sites {', '.join(s.name for s in sites)} (pooled)"
    except ValueError as exc:
        raise EvaluateInputError(f"{args.sites_dir}: {exc}") from None


def _command(args: argparse.Namespace) -> int:
    from simulations.evaluate import EvaluateSettings, render_table, run_evaluate

    cohort, source = load_input_cohort(args)
    settings = EvaluateSettings(epsilon=None if args.no_dp else args.epsilon, delta=args.delta, epochs=args.epochs,
                                batch_size=args.batch_size, lr=args.lr, folds=args.folds, seed=args.seed,
                                n_boot=args.bootstrap, arch=args.arch, forest_cnn_features=args.forest_cnn_features,
                                omics_pca=args.omics_pca)
    report = run_evaluate(cohort, settings, args.out, source=source)
    print(render_table(report))
    print(f"wrote {args.out / 'metrics.json'}, {args.out / 'metrics.md'} and {args.out / 'report.html'}")
    return 0
