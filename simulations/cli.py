"""The ``genofed`` console script: one entry point, subcommands grouped by role.

Each package contributes its own commands through a ``register(subparsers)`` function; this
module only composes them (it lives in ``simulations`` because that is the one package allowed
to import both the hospital side and the coordinator side). Errors a user can fix are printed
as one line without a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from common.errors import GenofedError, error_text

DESCRIPTION = """\
genofed: privacy-preserving federated learning for genomic medicine.

Hospital IT:   genofed keygen, genofed vault import|inspect|verify|rekey, genofed supernode
Privacy:       genofed ledger show|set-budget
Clinicians:    genofed predict (one patient's predictions and explanations, on site)
Coordinator:   genofed certs (then flower-superlink / flwr run: see the README)
Researchers:   genofed cohort synth|split|recipe, genofed evaluate, genofed pretrain,
               genofed simulate, genofed report, genofed demo, genofed bench
Run `genofed COMMAND --help` for the options of each command."""


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser, with every role's commands registered."""
    # Imported here so that `genofed --help` stays fast and a broken optional part names itself.
    from client import ledger_cli, predict_cli, supernode_cli, vault_cli
    from server import certs_cli, report_cli
    from simulations import bench, cohort_cli, demo, evaluate_cli, pretrain, simulate_cli

    parser = argparse.ArgumentParser(prog="genofed", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"genofed {_version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug detail to stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    vault_cli.register(sub)
    ledger_cli.register(sub)
    predict_cli.register(sub)
    supernode_cli.register(sub)
    certs_cli.register(sub)
    cohort_cli.register(sub)
    evaluate_cli.register(sub)
    pretrain.register(sub)
    simulate_cli.register(sub)
    demo.register(sub)
    report_cli.register(sub)
    bench.register(sub)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("genofed")
    except PackageNotFoundError:
        return "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``genofed`` command; returns the process exit code."""
    parser = build_parser()
    # Only `genofed supernode` takes options it does not know (they go to flower-supernode).
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "passthrough", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.flower_args = extra
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        # A group given without its subcommand (e.g. `genofed vault`): show that group's help.
        (getattr(args, "_group_parser", None) or parser).print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except GenofedError as exc:
        print(f"genofed: error: {error_text(exc)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("genofed: interrupted; nothing half-written was kept", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Output piped into `head` and the like: not an error worth a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
