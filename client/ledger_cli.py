"""``genofed ledger show|set-budget``: a site's privacy ledger, for its privacy officer and IT.

The ledger (client/privacy/ledger.py) lives inside the site's encrypted vault, so both commands take the
vault's key as exactly one of ``--key-file KEY`` or ``--passphrase-file FILE``, like the vault
commands. Neither prints patient data: the ledger holds none.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from client.privacy.ledger import DEFAULT_DELTA, PrivacyLedger
from client.vault import Vault
from client.vault_cli import key_from_args

_FORMATTER = argparse.RawDescriptionHelpFormatter

LEDGER_DESCRIPTION = """\
Look after a site's privacy: its policy (what a run may ask of it), its ledger (every release that left
the site, composed with Renyi DP into one (epsilon, delta), never reset) and its egress log (every reply,
key by key). All three live inside the vault and are set only on site.

  show          budget, spend, remaining, and every charge with the epsilon after it
  set-budget    set the site's budget (it may only be lowered unless --allow-raise)
  policy        show or set the site's policy (DP required, budget, delta, per-run cap, test statistics)
  egress        every reply that left the site (or was blocked), with shapes, bytes and epsilon

Import creates the policy and the ledger with protective defaults (DP required, epsilon 10, delta 1e-5);
a coordinator can never create or change them."""

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
    _register_policy(commands)


POLICY_DESCRIPTION = """\
Show or set the site's privacy policy: what the site allows a federated run to release. It lives in
the vault and is set only here, on site; a coordinator can ask for less privacy loss, never more.
Every run is checked against it at the census and again in every exchange, and a run whose whole
planned spend does not fit the remaining budget is refused before anything is spent.

With no option it shows the policy. Defaults (at import): DP required, budget epsilon 10, delta 1e-5
(smaller for cohorts above 10,000 records), at most epsilon 10 per run, test statistics noised at
epsilon 1 (--test-statistics none releases none; exact releases them without noise, outside the
guarantee)."""

EGRESS_DESCRIPTION = """\
Show every reply that left the site (or was blocked by its egress contract): when, which run and round,
the message type, each key with its shape and bytes, and the epsilon charged for it. Values are never
logged, only what was declared of them; the log holds no patient data."""


def _yes_no(text: str) -> bool:
    if text.lower() in ("yes", "true", "1"):
        return True
    if text.lower() in ("no", "false", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected yes or no, got {text!r}")


def _register_policy(commands: argparse._SubParsersAction) -> None:
    policy = commands.add_parser("policy", help="show or set the site's privacy policy (set only on site)",
                                 description=POLICY_DESCRIPTION, formatter_class=_FORMATTER)
    policy.add_argument("vault", type=Path, metavar="VAULT", help="vault folder")
    _add_key_options(policy)
    policy.add_argument("--json", action="store_true", help="print machine-readable JSON")
    policy.add_argument("--require-dp", type=_yes_no, metavar="yes|no", help="refuse runs without DP")
    policy.add_argument("--budget", type=float, metavar="E", help="the site's lifetime epsilon budget")
    policy.add_argument("--delta", type=float, metavar="D", help="the delta every epsilon is stated at")
    policy.add_argument("--max-run-epsilon", type=float, metavar="E", help="the most one run may spend")
    policy.add_argument("--test-statistics", choices=("noised", "exact", "none"),
                        help="how test statistics may leave the site")
    policy.add_argument("--test-epsilon", type=float, metavar="E", help="the most a noised test release may spend")
    policy.add_argument("--require-secure-sum", type=_yes_no, metavar="yes|no",
                        help="refuse runs whose sums would reach the coordinator site by site (secure-sum = false)")
    policy.add_argument("--distributed-noise", type=_yes_no, metavar="yes|no",
                        help="with secure sum, add only this site's share of each release's noise")
    policy.add_argument("--stack-forest", type=_yes_no, metavar="yes|no",
                        help="allow runs whose hybrid stacks this site's forest, which is fitted without DP "
                             "(no: refuse runs with stack-forest = true)")
    policy.add_argument("--allow-raise", action="store_true",
                        help="allow a larger budget or delta than the current one (privacy officer's decision)")
    policy.set_defaults(func=policy_command)
    egress = commands.add_parser("egress", help="every reply that left the site, with shapes, bytes and epsilon",
                                 description=EGRESS_DESCRIPTION, formatter_class=_FORMATTER)
    egress.add_argument("vault", type=Path, metavar="VAULT", help="vault folder")
    _add_key_options(egress)
    egress.add_argument("--json", action="store_true", help="print machine-readable JSON")
    egress.add_argument("--run", metavar="RUN_ID", help="only this run's replies")
    egress.set_defaults(func=egress_command)


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


POLICY_OPTIONS = ("require_dp", "budget", "delta", "max_run_epsilon", "test_statistics", "test_epsilon",
                  "require_secure_sum", "distributed_noise", "stack_forest")


def policy_command(args: argparse.Namespace) -> int:
    """Handler of ``genofed ledger policy``."""
    from client.cohort_store import load_cohort
    from client.privacy.facade import ensure_site_privacy, load_policy, policy_history, set_policy

    vault = Vault.open(args.vault, key_from_args(args))
    n = load_cohort(vault).n if any(r.startswith("cohort/") for r in vault.roles) else 1
    changes = {("budget_epsilon" if k == "budget" else k): getattr(args, k) for k in POLICY_OPTIONS
               if getattr(args, k) is not None}
    if changes:
        old = load_policy(vault) if _has_policy(vault) else None
        new = set_policy(vault, site=_site_name(args.vault), n_records=n, allow_raise=args.allow_raise, **changes)
        if not args.json:
            print(f"{args.vault}: site policy " + ("unchanged" if old == new else "updated") + ": " + _policy_line(new))
    else:
        ensure_site_privacy(vault, site=_site_name(args.vault), n_records=n)
        new = load_policy(vault)
        if not args.json:
            print(f"{args.vault}: site policy: " + _policy_line(new))
    if args.json:
        print(json.dumps({"vault": str(args.vault), "policy": new.state_dict(), "history": policy_history(vault),
                          "budget_history": PrivacyLedger.load(vault).budget_history}, indent=2))
    return 0


def _has_policy(vault: Vault) -> bool:
    from client.privacy.policy import POLICY_ROLE

    return POLICY_ROLE in vault and PrivacyLedger.exists(vault)


def _policy_line(p: Any) -> str:
    return (f"require-dp {'yes' if p.require_dp else 'no'}; budget epsilon {p.budget_epsilon:g} at delta {p.delta:g}; "
            f"max-run-epsilon {p.max_run_epsilon:g}; test-statistics {p.test_statistics}"
            + (f" (test-epsilon {p.test_epsilon:g})" if p.test_statistics == "noised" else "")
            + f"; require-secure-sum {'yes' if p.require_secure_sum else 'no'}; "
              f"distributed-noise {'yes' if p.distributed_noise else 'no'}; "
              f"stack-forest {'yes' if p.stack_forest else 'no'}")


def egress_command(args: argparse.Namespace) -> int:
    """Handler of ``genofed ledger egress``."""
    from client.privacy.egress import EgressLog

    vault = Vault.open(args.vault, key_from_args(args))
    entries = [e for e in EgressLog(vault).entries() if args.run is None or e["run_id"] == args.run]
    if args.json:
        print(json.dumps({"vault": str(args.vault), "entries": entries}, indent=2))
        return 0
    if not entries:
        print(f"{args.vault}: nothing has left this site" + (f" in run {args.run}" if args.run else ""))
        return 0
    _print_egress(args.vault, entries)
    return 0


def _print_egress(path: Path, entries: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    total = sum(e["bytes"] for e in entries)
    blocked = sum(e["status"] != "sent" for e in entries)
    console.print(f"[bold]{path}[/bold]: {len(entries)} replies, {total:,} bytes"
                  + (f", {blocked} blocked by the egress contract" if blocked else ""), highlight=False)
    table = Table(title="egress log (values are never logged)")
    for name in ("#", "when (UTC)", "run", "round", "message", "keys (shape, bytes)", "bytes", "+epsilon", "status"):
        table.add_column(name, overflow="fold")
    for e in entries:
        keys = "\n".join(f"{k} {list(v['shape'])} {v['bytes']}" for k, v in e["keys"].items())
        table.add_row(str(e["seq"]), _when(e["at"]), e["run_id"], str(e["round"]), e["message_type"], keys,
                      f"{e['bytes']:,}", f"{e['epsilon']:.4g}", e["status"] + (f": {e['reason']}" if e.get("reason") else ""))
    console.print(table)


def _site_name(vault: Path) -> str:
    from client.site import site_name_of

    return site_name_of(vault)


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
