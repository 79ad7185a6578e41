"""``genofed certs``: the coordinator's command that makes a federation's deployment credentials.

It writes a CA, the SuperLink's TLS certificate and one SuperNode authentication key per site
(see :mod:`server.certs` for the files, key types and extensions), plus a README.txt saying which
file goes where. Nothing is ever overwritten.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from server.certs import DEFAULT_DAYS, MAX_SITES, generate_certs

_FORMATTER = argparse.RawDescriptionHelpFormatter

CERTS_DESCRIPTION = f"""\
Make the credentials of a deployment, with TLS and SuperNode authentication:

  DIR/ca.crt, ca.key            the federation's CA (ca.key: 0600, keep it offline)
  DIR/superlink.crt, .key       the SuperLink's TLS certificate, signed by the CA
  DIR/sites/site-<i>, .pub      site i's SuperNode key (OpenSSH EC P-384) and its public key
  DIR/README.txt                which file goes where, and the commands that use them

The SuperLink certificate is valid for localhost, 127.0.0.1 and ::1, plus every --host (the
name or IP address SuperNodes use to reach the coordinator). The SuperLink gets ca.crt and
superlink.crt/.key; each hospital gets ca.crt and its own site key; the coordinator registers
every sites/site-<i>.pub with `flwr supernode register`. DIR must not exist or be empty
(up to {MAX_SITES} sites)."""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``certs`` command to the console script."""
    certs = subparsers.add_parser("certs", help="make a CA, the SuperLink certificate and per-site SuperNode keys",
                                  description=CERTS_DESCRIPTION, formatter_class=_FORMATTER)
    certs.add_argument("--out", required=True, type=Path, metavar="DIR",
                       help="folder to create (must not exist, or be empty)")
    certs.add_argument("--sites", required=True, type=int, metavar="N", help="number of hospitals (SuperNode keys)")
    certs.add_argument("--host", action="append", default=[], metavar="NAME",
                       help="DNS name or IP address of the SuperLink to add to its certificate (repeatable)")
    certs.add_argument("--days", type=int, default=DEFAULT_DAYS, metavar="D",
                       help=f"validity of the certificates in days (default {DEFAULT_DAYS})")
    certs.set_defaults(func=certs_command)


def certs_command(args: argparse.Namespace) -> int:
    """Handler of ``genofed certs``."""
    bundle = generate_certs(args.out, sites=args.sites, hosts=args.host, days=args.days)
    print(f"{bundle.root}: wrote a CA, a SuperLink certificate and {len(bundle.sites)} SuperNode keys "
          f"({bundle.sites[0]}..{bundle.sites[-1]}); valid {args.days} days")
    print(f"read {bundle.root / 'README.txt'} for which file goes where; "
          "keep ca.key offline and give each hospital only ca.crt and its own site key")
    return 0
