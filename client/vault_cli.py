"""``genofed keygen`` and ``genofed vault import|inspect|verify|rekey``: hospital IT's commands.

Every vault command takes the vault's key as exactly one of ``--key-file KEY`` (32 random bytes
from ``genofed keygen``) or ``--passphrase-file FILE`` (a UTF-8 text file whose first line is
the passphrase). Nothing decrypted is ever written to disk, and no command prints patient ids
or values.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from client.vault import KeySource, Vault, VaultError, generate_key_file, is_vault

_FORMATTER = argparse.RawDescriptionHelpFormatter

KEYGEN_DESCRIPTION = """\
Write a new random 256-bit vault key to a file readable only by you (mode 0600).

The key is the only way into a vault made with it: keep it safe, back it up somewhere other
than the vault's disk, and never send it to the coordinator. An existing file is never
overwritten."""

VAULT_DESCRIPTION = """\
Create and look after a site's encrypted vault (AES-256-GCM; see client/vault.py for the format).

  import    validate the files a cohort spec names and write them into a new vault
  inspect   show what a vault holds: counts, classes, splits, modalities, missing values per
            column (no patient data)
  verify    authenticate every blob; names the first missing, edited or truncated file
  rekey     re-encrypt the vault under a new key or passphrase"""

IMPORT_DESCRIPTION = """\
Validate every file a cohort spec names (FASTA, VCF, CSV/TSV), then write the cohort into an
encrypted vault. Nothing is written unless every file is valid; every problem is reported with
its file, line or patient, and column. With --force an existing vault (which the given key must
open) gets the new cohort in one atomic step; other stored roles, such as fitted models, stay.
The summary counts, per modality, the patients without a value in each column, and warns of a
column no patient has a value in (column names and counts only)."""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``keygen`` and the ``vault`` command group to the console script."""
    keygen = subparsers.add_parser("keygen", help="write a new random vault key file (mode 0600)",
                                   description=KEYGEN_DESCRIPTION, formatter_class=_FORMATTER)
    keygen.add_argument("--out", required=True, type=Path, metavar="KEY",
                        help="key file to create; its folder must exist and the file must not")
    keygen.set_defaults(func=keygen_command)

    vault = subparsers.add_parser("vault", help="import, inspect, verify or rekey an encrypted vault",
                                  description=VAULT_DESCRIPTION, formatter_class=_FORMATTER)
    vault.set_defaults(_group_parser=vault)
    commands = vault.add_subparsers(dest="vault_command", metavar="COMMAND")

    imp = commands.add_parser("import", help="validate a cohort spec's files and write an encrypted vault",
                              description=IMPORT_DESCRIPTION, formatter_class=_FORMATTER)
    imp.add_argument("--spec", required=True, type=Path, help="cohort spec (TOML) naming the input files")
    imp.add_argument("--out", required=True, type=Path, metavar="VAULT", help="vault folder to write")
    _add_key_options(imp)
    imp.add_argument("--force", action="store_true",
                     help="replace the cohort in an existing vault (the key must open it)")
    imp.set_defaults(func=import_command)

    ins = commands.add_parser("inspect", help="show counts, classes, splits, modalities and missing values "
                              "(no patient data)",
                              description="Open a vault and show what it holds: patients, classes per split, "
                              "modalities with their feature counts, how many patients lack a value in each "
                              "column (and a warning for a column no patient has a value in), schema hash, and "
                              "the vault's format, key kind, blob count and size. No patient ids or values "
                              "are shown.")
    ins.add_argument("vault", type=Path, metavar="VAULT", help="vault folder")
    _add_key_options(ins)
    ins.add_argument("--json", action="store_true", help="print machine-readable JSON instead of a table")
    ins.set_defaults(func=inspect_command)

    ver = commands.add_parser("verify", help="authenticate every blob of a vault",
                              description="Decrypt and authenticate every blob of a vault in memory. "
                              "Fails with a one-line error naming the first missing, edited, truncated or "
                              "swapped file; lists leftover files from interrupted writes as warnings.")
    ver.add_argument("vault", type=Path, metavar="VAULT", help="vault folder")
    _add_key_options(ver)
    ver.set_defaults(func=verify_command)

    rek = commands.add_parser("rekey", help="re-encrypt a vault under a new key or passphrase",
                              description="Re-encrypt every blob of a vault under a new key file or "
                              "passphrase, atomically: if interrupted, the old key still opens the old "
                              "vault. Afterwards only the new key opens it; back the new key up first.")
    rek.add_argument("vault", type=Path, metavar="VAULT", help="vault folder")
    _add_key_options(rek)
    new = rek.add_mutually_exclusive_group(required=True)
    new.add_argument("--new-key-file", type=Path, metavar="NEW",
                     help="the new 32-byte key file (make one with `genofed keygen`)")
    new.add_argument("--new-passphrase-file", type=Path, metavar="FILE",
                     help="a text file whose first line is the new passphrase")
    rek.set_defaults(func=rekey_command)


def _add_key_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--key-file", type=Path, metavar="KEY", help="the vault's 32-byte key file")
    group.add_argument("--passphrase-file", type=Path, metavar="FILE",
                       help="a text file whose first line is the vault's passphrase (instead of --key-file)")


def key_from_args(args: argparse.Namespace, *, new: bool = False) -> KeySource:
    """The KeySource named by ``--key-file``/``--passphrase-file`` (or their ``--new-`` forms)."""
    key_file = getattr(args, "new_key_file" if new else "key_file", None)
    if key_file is not None:
        return KeySource.from_key_file(key_file)
    return KeySource.from_passphrase_file(getattr(args, "new_passphrase_file" if new else "passphrase_file"))


# ---------------------------------------------------------------------------------------------
# Handlers


def keygen_command(args: argparse.Namespace) -> int:
    """Handler of ``genofed keygen``."""
    path = generate_key_file(args.out)
    print(f"wrote a new 256-bit vault key to {path} (readable only by you, mode 0600)")
    print("keep it safe and back it up elsewhere: without it the vault cannot be opened, "
          "and anyone holding it can read the vault")
    return 0


def import_command(args: argparse.Namespace) -> int:
    """Handler of ``genofed vault import``."""
    from client.cohort_store import save_cohort
    from client.importers import import_cohort
    from common.spec import load_spec

    key = key_from_args(args)
    _check_import_target(args.out, key, force=args.force)  # fail before the (long) import
    spec = load_spec(args.spec)
    cohort = import_cohort(spec)
    vault = save_cohort(args.out, cohort, key, overwrite=args.force)
    summary = cohort.summary()
    mods = ", ".join(cohort.modalities)
    print(f"{vault.path}: imported {summary['patients']} patients ({_class_counts(summary['classes'])}); "
          f"modalities: {mods}")
    print(f"schema hash {summary['schema_hash']}; {len(vault.roles)} blobs encrypted")
    for line in missing_lines(summary["missing"], summary["patients"]):
        print(line)
    for warning in empty_columns(summary["missing"], summary["patients"]):
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def _check_import_target(out: Path, key: KeySource, *, force: bool) -> None:
    if is_vault(out):
        if not force:
            raise VaultError(f"{out}: a vault already exists here; pass --force to replace its cohort, "
                             "or choose another --out")
        Vault.open(out, key)  # the key must open the vault it will overwrite
    elif out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise VaultError(f"{out}: exists and is not a vault; choose another --out or remove it")


def inspect_command(args: argparse.Namespace) -> int:
    """Handler of ``genofed vault inspect``."""
    from client.cohort_store import inspect_vault

    info = inspect_vault(args.vault, key_from_args(args))
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        _print_inspect(info)
    return 0


def verify_command(args: argparse.Namespace) -> int:
    """Handler of ``genofed vault verify``."""
    result = Vault.open(args.vault, key_from_args(args)).verify()
    print(f"{args.vault}: {result['blobs']} blobs authenticated ({result['bytes']} bytes)")
    for warning in result["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def rekey_command(args: argparse.Namespace) -> int:
    """Handler of ``genofed vault rekey``."""
    old, new = key_from_args(args), key_from_args(args, new=True)
    vault = Vault.open(args.vault, old)
    vault.rekey(new)
    what = "key file" if new.kind == "raw" else "passphrase"
    print(f"{args.vault}: re-encrypted {len(vault.roles)} blobs under the new {what}; "
          "the old one no longer opens it")
    print(f"keep the new {what} safe and backed up: without it the vault cannot be opened")
    return 0


# ---------------------------------------------------------------------------------------------
# Output


MISSING_SHOWN = 6
"""Columns named per modality in the one-line view of missing values (the most missing first)."""


def missing_lines(missing: dict[str, dict[str, int]], n: int) -> list[str]:
    """One line per modality with missing values: its columns, most missing first, as counts of ``n``."""
    if not missing:
        return ["missing values: none"]
    lines = []
    for modality, columns in missing.items():
        ranked = sorted(columns.items(), key=lambda kv: (-kv[1], kv[0]))
        shown = ", ".join(f"{name} {k} ({k / max(n, 1):.0%})" for name, k in ranked[:MISSING_SHOWN])
        more = f", and {len(ranked) - MISSING_SHOWN} more column(s)" if len(ranked) > MISSING_SHOWN else ""
        lines.append(f"missing values in {modality} (patients without a value, of {n}): {shown}{more}")
    return lines


def empty_columns(missing: dict[str, dict[str, int]], n: int) -> list[str]:
    """A sentence for every column no patient has a value in (a site that never records it)."""
    return [f"{modality} column {name!r} has no values at all ({n} of {n} patients missing): the models will "
            "impute it everywhere at this site; check the export if the site does record it"
            for modality, columns in missing.items() for name, k in columns.items() if n and k >= n]


def _class_counts(classes: dict[str, int]) -> str:
    return ", ".join(f"{name} {count}" for name, count in classes.items())


def _print_inspect(info: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    v = info["vault"]
    console.print(f"[bold]{v['path']}[/bold]: {v['format']} v{v['version']}, {v['cipher']}, "
                  f"key: {'key file' if v['kdf'] == 'raw' else 'passphrase (scrypt)'}, "
                  f"{v['blobs']} blobs, {v['bytes']} bytes", highlight=False, soft_wrap=True)
    others = [r for r in v["roles"] if not r.startswith("cohort/")]
    if others:
        console.print(f"other roles: {', '.join(others)}", highlight=False, soft_wrap=True)
    c = info["cohort"]
    if c is None:
        console.print("no cohort stored; import one with `genofed vault import`")
        return
    console.print(f"cohort: {c['patients']} patients ({_class_counts(c['classes'])}); "
                  f"schema hash {c['schema_hash']}", highlight=False, soft_wrap=True)
    splits = Table(title="patients per split and class")
    splits.add_column("split")
    splits.add_column("patients", justify="right")
    classes = list(c["classes"])
    for name in classes:
        splits.add_column(name, justify="right")
    for split, row in c["splits"].items():
        splits.add_row(split, str(row["patients"]), *(str(row["classes"].get(n, 0)) for n in classes))
    console.print(splits)
    mods = Table(title="modalities")
    mods.add_column("modality")
    mods.add_column("shape")
    for name, shape in c["modalities"].items():
        mods.add_row(name, ", ".join(f"{k} {val}" for k, val in shape.items()))
    console.print(mods)
    if "missing" not in c:  # a summary stored by an older import: ask for it to be refreshed, not guessed
        console.print("missing values: not recorded by the import that wrote this vault (re-import to see them)")
        return
    for line in missing_lines(c["missing"], c["patients"]):
        console.print(line, highlight=False, soft_wrap=True)
    for warning in empty_columns(c["missing"], c["patients"]):
        console.print(f"warning: {warning}", highlight=False, soft_wrap=True)
