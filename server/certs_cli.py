"""``genofed certs``: the deployment credentials, made by the coordinator or, key by key, by the sites.

Three modes, one per option:

- ``--sites N``: the coordinator writes a CA, the SuperLink's TLS certificate and one SuperNode
  authentication key per site (see :mod:`server.certs` for the files, key types and
  extensions), plus a README.txt saying which file goes where.
- ``--site-key NAME``: a hospital makes its own SuperNode key pair on its own machine: the
  private key (mode 0600) stays there, only ``NAME.pub`` is sent to the coordinator.
- ``--register NAME.pub``: the coordinator files that public key in its credentials folder and,
  with ``--connection``, registers it with the running SuperLink (``flwr supernode register``),
  so the site's private key never exists at the coordinator.

Nothing is ever overwritten.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from server.certs import (DEFAULT_DAYS, MAX_SITES, CertsError, add_site_public_key, generate_certs,
                          ssh_fingerprint, write_supernode_key)

_FORMATTER = argparse.RawDescriptionHelpFormatter
REGISTER_TIMEOUT_S = 60.0

CERTS_DESCRIPTION = f"""\
Make the credentials of a deployment, with TLS and SuperNode authentication.

Coordinator, all at once (--sites N):
  DIR/ca.crt, ca.key            the federation's CA (ca.key: 0600, keep it offline)
  DIR/superlink.crt, .key       the SuperLink's TLS certificate, signed by the CA
  DIR/sites/site-<i>, .pub      site i's SuperNode key (OpenSSH EC P-384) and its public key
  DIR/README.txt                which file goes where, and the commands that use them

The SuperLink certificate is valid for localhost, 127.0.0.1 and ::1, plus every --host (the
name or IP address SuperNodes use to reach the coordinator). The SuperLink gets ca.crt and
superlink.crt/.key; each hospital gets ca.crt and its own site key; the coordinator registers
every sites/site-<i>.pub with `flwr supernode register`. DIR must not exist or be empty
(up to {MAX_SITES} sites).

Or, so that a site's private key never leaves the site:
  at the site:         genofed certs --site-key NAME --out DIR
                       writes DIR/NAME (private, 0600: stays here) and DIR/NAME.pub (send it)
  at the coordinator:  genofed certs --register NAME.pub --out CREDS [--connection CONN]
                       files the public key as CREDS/sites/NAME.pub (a private key is refused)
                       and, with --connection, registers it with the SuperLink through
                       `flwr supernode register` (the flwr CLI's connection CONN)"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``certs`` command to the console script."""
    certs = subparsers.add_parser("certs", help="make a CA, the SuperLink certificate and per-site SuperNode keys "
                                                "(or one site's key pair, or register a site's public key)",
                                  description=CERTS_DESCRIPTION, formatter_class=_FORMATTER)
    certs.add_argument("--out", required=True, type=Path, metavar="DIR",
                       help="with --sites: folder to create (must not exist, or be empty); with --site-key: the "
                            "site's folder for its key pair; with --register: the coordinator's credentials folder")
    mode = certs.add_mutually_exclusive_group(required=True)
    mode.add_argument("--sites", type=int, metavar="N", help="number of hospitals (SuperNode keys)")
    mode.add_argument("--site-key", metavar="NAME",
                      help="at a site: write its own SuperNode key pair DIR/NAME (private, mode 0600, never "
                           "leaves the site) and DIR/NAME.pub (public, for the coordinator)")
    mode.add_argument("--register", type=Path, metavar="NAME.pub",
                      help="at the coordinator: file a site's public key as DIR/sites/NAME.pub (a private key "
                           "is refused) and, with --connection, register it with the SuperLink")
    certs.add_argument("--name", metavar="NAME",
                       help="with --register: the site's name (default: the key file's name without .pub)")
    certs.add_argument("--connection", metavar="CONN",
                       help="with --register: the flwr CLI's SuperLink connection to register the key with "
                            "(`flwr supernode register`, uses $FLWR_HOME/config.toml); without it the command "
                            "to run is printed")
    certs.add_argument("--host", action="append", default=[], metavar="NAME",
                       help="with --sites: DNS name or IP address of the SuperLink to add to its certificate "
                            "(repeatable)")
    certs.add_argument("--days", type=int, default=None, metavar="D",
                       help=f"with --sites: validity of the certificates in days (default {DEFAULT_DAYS})")
    certs.set_defaults(func=certs_command)


def certs_command(args: argparse.Namespace) -> int:
    """Handler of ``genofed certs``: one of the three modes."""
    _check_mode_options(args)
    if args.site_key is not None:
        return _site_key(args)
    if args.register is not None:
        return _register(args)
    days = DEFAULT_DAYS if args.days is None else args.days
    bundle = generate_certs(args.out, sites=args.sites, hosts=args.host, days=days)
    print(f"{bundle.root}: wrote a CA, a SuperLink certificate and {len(bundle.sites)} SuperNode keys "
          f"({bundle.sites[0]}..{bundle.sites[-1]}); valid {days} days")
    print(f"read {bundle.root / 'README.txt'} for which file goes where; "
          "keep ca.key offline and give each hospital only ca.crt and its own site key")
    return 0


def _check_mode_options(args: argparse.Namespace) -> None:
    """Options that belong to another mode are refused rather than silently ignored."""
    if args.sites is None and (args.host or args.days is not None):
        raise CertsError("--host and --days go with --sites (they describe the SuperLink certificate)")
    if args.register is None and (args.name or args.connection):
        raise CertsError("--name and --connection go with --register")


def _site_key(args: argparse.Namespace) -> int:
    """``--site-key NAME``: the site's own key pair; prints the public key and where it goes."""
    private, public = write_supernode_key(args.out, args.site_key)
    line = public.read_text().strip()
    print(f"{private}: this site's SuperNode private key (mode 0600); it never leaves this machine: "
          f"start the SuperNode with --auth-supernode-private-key {private}")
    print(f"{public}: send this public key to the coordinator, who runs "
          f"`genofed certs --register {public.name} --out CREDS --connection CONN`")
    print(f"fingerprint {ssh_fingerprint(line)} (compare it with the coordinator's over another channel)")
    print(line)
    return 0


def _register(args: argparse.Namespace) -> int:
    """``--register NAME.pub``: file the public key and, with ``--connection``, register it with the SuperLink."""
    target = add_site_public_key(args.out, args.register, name=args.name)
    name = target.name[:-4]
    print(f"{target}: filed {name}'s public key, fingerprint {ssh_fingerprint(target.read_bytes())}")
    if not args.connection:
        print(f"register it with the SuperLink: flwr supernode register {target} CONN --name {name}")
        return 0
    node_id = _flwr_register(["supernode", "register", str(target), args.connection, "--name", name])
    print(f"registered {name} with the SuperLink of connection {args.connection!r}: node id {node_id}")
    return 0


def _flwr_register(command: list[str]) -> int:
    """Run ``flwr supernode register ... --format json``; returns the node id (one-line error if refused)."""
    from simulations.flower_cli import last_json

    exe = shutil.which("flwr") or str(Path(sys.executable).with_name("flwr"))
    try:
        out = subprocess.run([exe, *command, "--format", "json"], capture_output=True, text=True,
                             timeout=REGISTER_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise CertsError("the flwr CLI was not found; install flwr in this environment or run the printed "
                         "`flwr supernode register` command by hand") from None
    except subprocess.TimeoutExpired:
        raise CertsError(f"`flwr {' '.join(command)}` did not answer within {REGISTER_TIMEOUT_S:.0f} s; "
                         "is the SuperLink running?") from None
    data = last_json(out.stdout) or {}
    if not (data.get("success") and data.get("node-id")):
        reason = " ".join(str(data.get("error-message") or (out.stderr or out.stdout)[-500:]).split())
        raise CertsError(f"`flwr {' '.join(command)}` failed: {reason or f'exit status {out.returncode}'}")
    return int(data["node-id"])
