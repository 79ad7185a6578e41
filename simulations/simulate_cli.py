"""``genofed simulate`` on the command line; the work is in :mod:`simulations.simulate`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

DESCRIPTION = """\
Run the federation on one machine with Flower's Simulation Engine: one simulated SuperNode per
site folder of DIR (the layout `genofed cohort split --vaults` and `genofed cohort recipe
--vaults` write), each bound to its own vault. Writes RUNDIR/metrics.json (the schema of
`genofed evaluate`, plus per-site metrics and a privacy object keyed by site), metrics.md,
run.log, events.jsonl and checkpoints/. DP is on by default (epsilon 8), as in `genofed evaluate`.

Any run setting of pyproject.toml's [tool.flwr.app.config] can be set with --set KEY=VALUE."""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``genofed simulate``."""
    p = subparsers.add_parser("simulate", help="federated run of N local sites through Flower's Simulation Engine",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sites-dir", type=Path, required=True, help="DIR/<site>/vault + DIR/<site>/key per site")
    p.add_argument("--out", type=Path, required=True, help="run directory (must not exist, unless --resume)")
    p.add_argument("--rounds", type=int, help="CNN rounds (run config cnn-rounds, default 10)")
    dp = p.add_mutually_exclusive_group()
    dp.add_argument("--epsilon", type=float, help="DP-SGD target epsilon per site for the whole run (default 8)")
    dp.add_argument("--no-dp", action="store_true", help="no differential privacy (the non-private reference)")
    p.add_argument("--strategy", choices=("fedavg", "fedprox", "fedadam", "fedmedian", "fedtrimmedavg", "krum"),
                   help="aggregation of the CNN updates (default fedavg)")
    p.add_argument("--local-epochs", type=int, help="local epochs per round (default 2)")
    p.add_argument("--seed", type=int, help="seed of the initial model and local training (default 0)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--init-from", type=Path, metavar="PATH",
                   help="start the deep model from an earlier run directory or checkpoint file (warm start)")
    p.add_argument("--hold-out-site", metavar="NAME",
                   help="a site that does not train and joins only the evaluation (an independent test cohort)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other run setting, e.g. --set meta-rounds=4 (repeatable)")
    p.add_argument("--cpus-per-site", type=int, default=1, help="CPUs per simulated site (default 1)")
    p.set_defaults(func=_command)


def build_run_config(args: argparse.Namespace) -> dict[str, Any]:
    """Run-config overrides from the options (only those given)."""
    import tomllib

    from simulations.simulate import SimulationError

    cfg: dict[str, Any] = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SimulationError(f"--set {item!r}: expected KEY=VALUE")
        try:
            cfg[key.strip()] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            cfg[key.strip()] = value
    named = {"cnn-rounds": args.rounds, "epsilon": args.epsilon, "strategy": args.strategy,
             "local-epochs": args.local_epochs, "seed": args.seed, "hold-out-site": args.hold_out_site}
    cfg.update({k: v for k, v in named.items() if v is not None})
    if args.init_from is not None:
        if not args.init_from.exists():
            raise SimulationError(f"--init-from {args.init_from}: no such run directory or checkpoint file")
        cfg["init-from"] = str(args.init_from.resolve())
    if args.no_dp:
        cfg["dp"] = False
    if args.resume:
        cfg["resume"] = True
    return cfg


def _command(args: argparse.Namespace) -> int:
    from simulations.simulate import SimulationRequest, simulate

    doc = simulate(SimulationRequest(sites_dir=args.sites_dir, out=args.out, run_config=build_run_config(args),
                                     cpus_per_site=args.cpus_per_site))
    print((args.out / "metrics.md").read_text())
    print(f"run directory: {args.out}  (metrics.json, metrics.md, run.log, checkpoints/)")
    return 0 if doc else 1
