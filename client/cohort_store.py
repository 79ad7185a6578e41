"""A cohort in a vault: save, load and describe it without plaintext touching disk.

A cohort is stored as the blobs of :func:`common.cohort.cohort_to_blobs` (roles ``cohort/meta``,
``cohort/index`` and one per modality) plus ``cohort/summary``: the counts-only summary of
:meth:`common.cohort.Cohort.summary`, so that ``genofed vault inspect`` can describe a vault
without decrypting any patient-level array. Roles outside ``cohort/`` (models fitted on site,
the privacy ledger) belong to later phases; re-importing a cohort leaves them in place.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from client.vault import KeySource, Vault, VaultError, is_vault
from common.cohort import Cohort, cohort_from_blobs, cohort_to_blobs

COHORT_PREFIX = "cohort/"
SUMMARY_ROLE = "cohort/summary"


def cohort_blobs(cohort: Cohort) -> dict[str, bytes]:
    """The vault blobs of ``cohort``: its serialised parts and its counts-only summary."""
    blobs = cohort_to_blobs(cohort)
    # Not sorted: the summary lists classes and splits in the cohort's own order, for display.
    blobs[SUMMARY_ROLE] = json.dumps(cohort.summary(), separators=(",", ":")).encode("utf-8")
    return blobs


def save_cohort(path: str | Path, cohort: Cohort, key: KeySource, *, overwrite: bool = False) -> Vault:
    """Store ``cohort`` in the vault at ``path``, creating the vault if there is none.

    With ``overwrite=True`` an existing vault (which ``key`` must open) gets the new cohort in
    one atomic update: every ``cohort/*`` role is replaced or removed, other roles are kept.
    Without it, an existing vault is an error and nothing is written.

    Raises
    ------
    VaultError
        The vault exists (without ``overwrite``), the key does not open it, or writing failed.
    """
    path = Path(path)
    blobs = cohort_blobs(cohort)
    if not is_vault(path):
        from client.privacy.facade import ensure_site_privacy
        from client.site import site_name_of

        vault = Vault.create(path, key, blobs)
        # The site's privacy policy and ledger, with protective defaults, from the first write on.
        ensure_site_privacy(vault, site=site_name_of(path), n_records=cohort.n)
        return vault
    if not overwrite:
        raise VaultError(f"{path}: a vault already exists here; pass --force to replace its cohort "
                         "(other stored roles are kept), or choose another path")
    vault = Vault.open(path, key)
    stale = [role for role in vault.roles if role.startswith(COHORT_PREFIX) and role not in blobs]
    vault.update(put=blobs, remove=stale)
    return vault


def _as_vault(path_or_vault: str | Path | Vault, key: KeySource | None) -> Vault:
    if isinstance(path_or_vault, Vault):
        return path_or_vault
    if key is None:
        raise VaultError(f"{path_or_vault}: a key is needed to open the vault; pass --key-file or --passphrase-file")
    return Vault.open(path_or_vault, key)


def load_cohort(path_or_vault: str | Path | Vault, key: KeySource | None = None) -> Cohort:
    """Decrypt the cohort stored in a vault (an opened :class:`Vault`, or a path and ``key``).

    Raises
    ------
    VaultError
        The vault cannot be opened, holds no cohort, or a cohort blob fails authentication.
    """
    vault = _as_vault(path_or_vault, key)
    blobs = vault.read_prefix(COHORT_PREFIX)
    for role in ("cohort/meta", "cohort/index"):
        if role not in blobs:
            raise VaultError(f"{vault.path}: holds no cohort (no {role!r} blob); "
                             "import one with `genofed vault import`")
    try:
        return cohort_from_blobs(blobs)
    except (ValueError, KeyError, TypeError) as exc:
        raise VaultError(f"{vault.path}: the stored cohort cannot be decoded ({exc}); re-import it with "
                         "`genofed vault import --force`") from None


def inspect_vault(path: str | Path | Vault, key: KeySource | None = None) -> dict[str, Any]:
    """What a vault holds, as counts only: no patient ids, no values.

    Returns
    -------
    dict
        ``vault``: path, format, version, cipher, kdf kind, blob count, stored bytes and roles;
        ``cohort``: :meth:`Cohort.summary` (patients, classes, per-split class counts,
        modalities with their feature counts, missing values per column, schema hash), or None
        if no cohort is stored.
    """
    vault = _as_vault(path, key)
    info = {"vault": {**vault.stats(), "roles": vault.roles}, "cohort": None}
    if SUMMARY_ROLE in vault:
        info["cohort"] = json.loads(vault.read(SUMMARY_ROLE).decode("utf-8"))
        if "missing" not in info["cohort"] and "cohort/meta" in vault:
            # A summary from an import that predates the missing-value counts: they follow exactly
            # from the stored cohort (NaN and -1 cells), so count them, in memory only.
            info["cohort"]["missing"] = load_cohort(vault).missing_values()
    elif "cohort/meta" in vault:
        # Written without a summary (an older import): compute it, in memory only.
        info["cohort"] = load_cohort(vault).summary()
    return info
