"""``genofed supernode``: start a hospital's Flower SuperNode after checking its vault and key.

The site daemon. It checks, before connecting to anyone, that every private key file it is given
(the SuperNode authentication key, the Runtime API's TLS key, the vault's key or passphrase
file) is readable by its owner only (:mod:`common.keyfiles`), and that ``--node-config`` names a
vault that opens with the given key file (or passphrase file), then starts the SuperNode with genofed's
warm ClientApp worker (:mod:`client.warm_node`), or, with ``--plain``, as stock
``flower-supernode``. Every other option is passed to ``flower-supernode`` unchanged.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
from typing import Any

from common.errors import GenofedError
from common.keyfiles import check_private_file, check_private_files

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9094  # flower-supernode's own default for its Runtime API

DESCRIPTION = """\
Start this hospital's Flower SuperNode, bound to its vault.

The vault named in --node-config must open with its key (or passphrase) file, or nothing starts;
so must every private key file (--auth-supernode-private-key, the vault's key-file or
passphrase-file, --ssl-keyfile) be readable by its owner only: a key other users can read is
refused with the fix (`chmod 600 FILE`).
By default every message runs in a warm process that keeps torch and the run's models loaded
(about 0.3-0.5 s per exchange instead of about 6 s: docs/federation.md); --plain starts stock
flower-supernode instead. Every option not listed here (--superlink, --root-certificates,
--auth-supernode-private-key, --insecure, --max-retries, ...) goes to flower-supernode unchanged.

example:
  genofed supernode --superlink coordinator.example.org:9092 \\
      --root-certificates ca.crt --auth-supernode-private-key site.key \\
      --node-config 'vault="/srv/genofed/vault" key-file="/srv/genofed/key" site="st-mary"'"""


class SupernodeConfigError(GenofedError):
    """The SuperNode's options do not name a vault that opens."""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``supernode`` command to the console script."""
    from client.warm_node import DEFAULT_POLL_S

    cmd = subparsers.add_parser("supernode", help="start this hospital's SuperNode (checks the vault first)",
                                description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    cmd.add_argument("--node-config", required=True, metavar="CONFIG",
                     help="'vault=\"/abs/vault\" key-file=\"/abs/key\" site=\"NAME\"' (passphrase-file= may "
                          "replace key-file)")
    cmd.add_argument("--host", default=DEFAULT_HOST, help=f"host of the SuperNode's Runtime API (default {DEFAULT_HOST})")
    cmd.add_argument("--port", type=int, default=DEFAULT_PORT,
                     help=f"port of the SuperNode's Runtime API (default {DEFAULT_PORT})")
    cmd.add_argument("--poll-interval", type=float, default=DEFAULT_POLL_S, metavar="S",
                     help=f"seconds between polls of the SuperLink and of the Runtime API (default {DEFAULT_POLL_S})")
    cmd.add_argument("--plain", action="store_true",
                     help="run stock flower-supernode (a fresh process per message, Flower's own polls)")
    cmd.add_argument("--ssl-ca-certfile", metavar="PATH",
                     help="CA of the Runtime API's TLS certificate (with flower-supernode's --ssl-certfile/keyfile)")
    cmd.add_argument("--superexec-auth-secret-file", metavar="PATH",
                     help="shared secret the worker signs its task requests with (flower-supernode's option)")
    cmd.set_defaults(func=supernode_command, passthrough=True)


def private_flower_files(flower_args: list[str]) -> list[tuple[str, str]]:
    """``(path, what)`` of every private key file among the options passed on to ``flower-supernode``.

    Parsed as Flower parses them (argparse, abbreviations allowed), so that an abbreviated
    option is not missed.
    """
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--auth-supernode-private-key")
    parser.add_argument("--auth-supernode-public-key")  # listed so that abbreviations resolve as in Flower
    parser.add_argument("--ssl-keyfile", "--appio-ssl-keyfile", dest="ssl_keyfile")
    known, _ = parser.parse_known_args(flower_args)
    files = [(known.auth_supernode_private_key, "SuperNode authentication key"),
             (known.ssl_keyfile, "Runtime API TLS key")]
    return [(path, what) for path, what in files if path]


def check_site(node_config: str) -> Any:
    """The site the node config names, after opening its vault with its key (one clear error if not).

    The vault's key or passphrase file must be readable by its owner only
    (:class:`common.keyfiles.KeyFilePermissionError` otherwise), checked before it is read.
    """
    from flwr.common.config import parse_config_args

    from client.site import resolve_site

    try:
        parsed = parse_config_args([node_config])
    except Exception as exc:  # noqa: BLE001 - Flower's parser raises plain ValueErrors and others
        raise SupernodeConfigError(f"--node-config {node_config!r} is not 'key=value ...' ({exc})") from None
    if "vault" not in parsed:
        raise SupernodeConfigError("--node-config names no vault: give 'vault=\"/abs/vault\" key-file=\"/abs/key\"'")
    site = resolve_site(parsed, {})
    secrets = ((site.key_file, "vault key file"), (site.passphrase_file, "vault passphrase file"))
    check_private_files((path, what) for path, what in secrets if path is not None)
    site.open_vault()
    return site


def supernode_command(args: argparse.Namespace) -> int:
    """Check the key files and the vault, then run the SuperNode (warm by default) until it exits."""
    # Before the vault is opened: a loose key is refused without reading any secret.
    check_private_files(private_flower_files(args.flower_args))
    if args.superexec_auth_secret_file:
        check_private_file(args.superexec_auth_secret_file, "SuperExec auth secret file")
    site = check_site(args.node_config)
    print(f"genofed supernode: site {site.name}, vault {site.vault} opens; starting the SuperNode", flush=True)
    flower_args = [*args.flower_args, "--node-config", args.node_config, "--host", args.host, "--port", str(args.port)]
    if args.ssl_ca_certfile:
        flower_args += ["--ssl-ca-certfile", args.ssl_ca_certfile]
    if args.superexec_auth_secret_file:
        flower_args += ["--superexec-auth-secret-file", args.superexec_auth_secret_file]
    if args.plain:
        exe = shutil.which("flower-supernode") or "flower-supernode"
        os.execv(exe, [exe, *flower_args])
    return _run_warm(args, flower_args)


def _run_warm(args: argparse.Namespace, flower_args: list[str]) -> int:
    from client.warm_node import worker_command
    from common.processes import PREEXEC
    from common.flower_internals import check_flower_internals, run_supernode

    check_flower_internals(supernode=True)
    host = "127.0.0.1" if args.host in ("0.0.0.0", "") else args.host
    address = f"[{host}]:{args.port}" if ":" in host else f"{host}:{args.port}"
    worker = subprocess.Popen(worker_command(address, poll_s=args.poll_interval, parent_pid=os.getpid(),
                                             root_certificates=args.ssl_ca_certfile,
                                             superexec_auth_secret_file=args.superexec_auth_secret_file),
                              preexec_fn=PREEXEC)
    try:
        run_supernode([*flower_args, "--isolation", "process"], poll_s=args.poll_interval)
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=10)
        except subprocess.TimeoutExpired:
            worker.kill()
    return 0
