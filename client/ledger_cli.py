"""``genofed ledger show|set-budget``: a site's privacy ledger, for its privacy officer and IT.

The ledger (client/ledger.py) lives inside the site's encrypted vault, so both commands take the
vault's key as exactly one of ``--key-file KEY`` or ``--passphrase-file FILE``, like the vault
commands. Neither prints patient data: the ledger holds none.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from client.ledger import DEFAULT_DELTA, DEFAULT_EPSILON, PrivacyLedger
from client.vault import Vault
from client.vault_cli import key_from_args

_FORMATTER = argparse.RawDescriptionHelpFormatter

LEDGER_DESCRIPTION = f"""\
Look after a site's privacy ledger: every release that left the site (DP-SGD trained CNN updates,
noised statistics, ...) composed with Renyi DP into one (epsilon, delta), kept inside the vault.
The site refuses any release that would take its spend above its budget. The ledger is never
reset: not by a new run, not by re-importing the cohort.

  show          budget, spend, remaining, and every charge with the epsilon after it
  set-budget    set the site's budget (it may only be lowered unless --allow-raise)

A vault without a ledger gets one at its first federated run, with the run's default budget
(epsilon {DEFAULT_EPSILON:g}, delta {DEFAULT_DELTA:g} unless configured); set-budget before that
run makes the site's own budget the one recorded."""

SHOW_DESCRIPTION = """\
Show a site's privacy budget, its spend so far and what remains, and a table of every charge:
when, which run and round, what was released, the mechanism (kind, noise multiplier sigma,
sample rate q, steps), the epsilon it added and the site's total epsilon after it. All epsilons
are at the ledger's delta, composed with Renyi DP (Opacus' RDP analysis)."""

SET_BUDGET_DESCRIPTION = """\
Set the site's privacy budget. It may only be tightened (a smaller epsilon or delta) unless
--allow-raise is given: raise a site's budget only if its privacy officer agrees, since every
earlier release still counts. A budget below what is already spent is allowed: the site then
refuses every further release. If the vault has no ledger yet, one is created with this budget."""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``ledger`` command group to the console script."""
    ledger = subparsers.add_parser("ledger", help="show a site's privacy ledger or set its budget",
                                   description=LEDGER_DESCRIPTION, formatter_class=_FORMATTER)
    ledger.set_defaults(_group_parser=ledger)
    commands = ledger.add_subparsers(dest="ledger_command", metavar="COMMAND")

    show = commands.add_parser("show", help="budget, spend, remaining and every charge (no patient data)",
                               description=SHOW_DESCRIPTION, formatter_class=_FORMATTER)
    show.add_argument("vault", type=Path, metavar="VAULT", help="vault folder")
    _add_key_options(show)
    show.add_argument("--json", action="store_true", help="print machine-readable JSON instead of a table")
    show.set_defaults(func=show_command)

    setb = commands.add_parser("set-budget", help="set the site's privacy budget (lower only, unless --allow-raise)",
                               description=SET_BUDGET_DESCRIPTION, formatter_class=_FORMATTER)
    setb.add_argument("vault", type=Path, metavar="VAULT", help="vault folder")
    _add_key_options(setb)
    setb.add_argument("--epsilon", required=True, type=float, metavar="E", help="the site's epsilon budget (> 0)")
    setb.add_argument("--delta", type=float, metavar="D",
                      help=f"the delta every epsilon is stated at, in (0, 1) (default: keep the current one; "
                           f"{DEFAULT_DELTA:g} for a new ledger)")
    setb.add_argument("--allow-raise", action="store_true",
                      help="allow a larger epsilon or delta than the current budget (privacy officer's decision)")
    setb.add_argument("--site", metavar="NAME",
                      help="site name recorded in a new ledger (default: the vault folder's name, or its "
                           "parent's when the folder is called 'vault')")
    setb.set_defaults(func=set_budget_command)


def _add_key_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--key-file", type=Path, metavar="KEY", help="the vault's 32-byte key file")
    group.add_argument("--passphrase-file", type=Path, metavar="FILE",
                       help="a text file whose first line is the vault's passphrase (instead of --key-file)")


# ---------------------------------------------------------------------------------------------
# Handlers


def show_command(args: argparse.Namespace) -> int:
    """Handler of ``genofed ledger show``."""
    vault = Vault.open(args.vault, key_from_args(args))
    if not PrivacyLedger.exists(vault):
        if args.json:
            print(json.dumps({"vault": str(args.vault), "ledger": None}, indent=2))
        else:
            print(f"{args.vault}: no privacy ledger yet: nothing has been released from this vault; the first "
                  "federated run creates one, or set the site's budget now with `genofed ledger set-budget`")
        return 0
    ledger = PrivacyLedger.load(vault)
    if args.json:
        doc = {"vault": str(args.vault), "ledger": {**ledger.to_summary(), "budget_history": ledger.budget_history,
                                                    "rounds": ledger.per_round()}}
        print(json.dumps(doc, indent=2))
    else:
        _print_show(args.vault, ledger)
    return 0


def set_budget_command(args: argparse.Namespace) -> int:
    """Handler of ``genofed ledger set-budget``."""
    vault = Vault.open(args.vault, key_from_args(args))
    if not PrivacyLedger.exists(vault):
        site = args.site or _site_name(args.vault)
        delta = DEFAULT_DELTA if args.delta is None else args.delta
        PrivacyLedger.open(vault, site=site, default_epsilon=args.epsilon, default_delta=delta)
        print(f"{args.vault}: created the privacy ledger of site {site} with budget epsilon {args.epsilon:g} "
              f"at delta {delta:g}")
        return 0
    ledger = PrivacyLedger.load(vault)
    old_eps, old_delta = ledger.budget_epsilon, ledger.delta
    ledger.set_budget(epsilon=args.epsilon, delta=args.delta, allow_raise=args.allow_raise)
    new = f"epsilon {ledger.budget_epsilon:g} at delta {ledger.delta:g}"
    if (ledger.budget_epsilon, ledger.delta) == (old_eps, old_delta):
        print(f"{args.vault}: privacy budget unchanged: {new}")
        return 0
    verb = "raised" if ledger.budget_history[-1]["change"] == "raised" else "lowered"
    spent = ledger.spent_epsilon()
    print(f"{args.vault}: privacy budget {verb} from epsilon {old_eps:g} at delta {old_delta:g} to {new}; "
          f"spent {spent:.4g}, remaining {ledger.remaining_epsilon():.4g}")
    if spent > ledger.budget_epsilon:
        print(f"note: the site has already spent epsilon {spent:.4g}, more than the new budget: "
              "it will refuse every further release")
    return 0


def _site_name(vault: Path) -> str:
    """The site a vault belongs to, from its path (``SITES/<site>/vault`` or ``.../<site>``)."""
    path = vault.resolve()
    return path.parent.name if path.name == "vault" and path.parent.name else path.name


# ---------------------------------------------------------------------------------------------
# Output


def _mechanism(row: list[Any]) -> str:
    kind, sigma, q, steps = row
    return f"{kind} sigma={sigma:.4g} q={q:.4g} x{steps}"


def _when(at: str) -> str:
    """``2026-01-31T09:15:00+00:00`` as ``2026-01-31 09:15`` (the column says UTC)."""
    return at[:16].replace("T", " ")


def _print_show(path: Path, ledger: PrivacyLedger) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    s = ledger.to_summary()
    console.print(f"[bold]{path}[/bold]: privacy ledger of site {s['site']} (Renyi DP accountant)",
                  highlight=False, soft_wrap=True)
    console.print(f"budget epsilon {s['budget_epsilon']:g} at delta {s['delta']:g}; spent {s['spent_epsilon']:.4g}; "
                  f"remaining {s['remaining_epsilon']:.4g}; {s['releases']} releases in {s['charges']} charges "
                  f"over {len(s['runs'])} runs", highlight=False, soft_wrap=True)
    rows = ledger.per_round()
    if not rows:
        console.print("nothing released yet")
        return
    table = Table(title="charges (epsilon at the ledger's delta)")
    for name, justify in (("#", "right"), ("when (UTC)", "left"), ("run", "left"), ("round", "right"),
                          ("released", "left"), ("mechanism", "left"), ("+epsilon", "right"),
                          ("epsilon after", "right")):
        # fold, not ellipsis: a narrow terminal must not hide part of a run id or a number
        table.add_column(name, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for row in rows:
        table.add_row(str(row["charge"]), _when(row["at"]), row["run_id"],
                      "-" if row["round"] is None else str(row["round"]),
                      ", ".join(row["labels"]), "\n".join(_mechanism(m) for m in row["mechanisms"]),
                      f"{row['increase']:.4g}", f"{row['epsilon']:.4g}")
    console.print(table)
