"""The coordinator's memory of every site's privacy ledger across runs (run config ``ledger-registry``).

A site's ledger lives inside its vault, which is encrypted and authenticated but cannot tell when
the whole folder is put back to an older copy (a backup restored) or created anew: either resets
the site's privacy spend without a trace on the site. The coordinator sees each ledger at every
census, so, given a registry file, it remembers per site the ledger's creation time and the
highest revision and spend it has seen. At a later census a site whose ledger is another one, or
has fewer writes or a lower spend than remembered, leaves the run with the reason; its privacy
officer must find out why, and the coordinator accepts the site again once its entry is removed
from the registry. Sites are known by the names they report (the SuperNode's authentication key
says who may connect, not which name it uses), so this guards against accidents, not against a
site that lies about its own ledger.

Format (JSON, written atomically)::

    {"format": "genofed-ledger-registry", "version": 1,
     "sites": {"<site>": {"ledger-created": "<ISO 8601>", "revision": <int>, "spent": <float>,
                          "run-id": "<last run>", "seen-at": "<ISO 8601>"}}}
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from common.errors import GenofedError
from common.files import write_text_atomic

FORMAT = "genofed-ledger-registry"
VERSION = 1
_SLACK = 1e-9  # spends are recomputed from the same releases: equal up to float rounding


class RegistryError(GenofedError):
    """The registry file cannot be read or written; the message names it and what to do."""


def load_registry(path: Path) -> dict[str, dict[str, Any]]:
    """Every site's remembered ledger, or nothing when the file does not exist yet."""
    if not path.exists():
        return {}
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise RegistryError(f"{path}: not a readable ledger registry ({exc}); restore it from a backup or move it "
                            "away (every site is then trusted as new)") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("sites"), dict):
        raise RegistryError(f"{path}: not a {FORMAT} file; give ledger-registry a path of its own")
    return doc["sites"]


def went_backwards(seen: dict[str, Any] | None, census: dict[str, Any]) -> str | None:
    """Why a site's ledger at this census is older than the one remembered, or None if it is not."""
    if not seen:
        return None
    created, revision, spent = str(census["ledger-created"]), int(census["ledger-revision"]), float(census["ledger-spent"])
    if created != seen["ledger-created"]:
        return (f"its privacy ledger was created at {created}, not at {seen['ledger-created']} as when last seen "
                f"(run {seen['run-id']}, epsilon {seen['spent']:.4g}): the vault was re-created or replaced")
    if revision < int(seen["revision"]) or spent < float(seen["spent"]) - _SLACK:
        return (f"its privacy ledger went back from revision {seen['revision']} (epsilon {seen['spent']:.4g}, "
                f"run {seen['run-id']}) to revision {revision} (epsilon {spent:.4g}): the vault may have been "
                "restored from an older copy")
    return None


def remember(path: Path, marks: dict[str, dict[str, Any]], *, run_id: str) -> None:
    """Record each site's ledger as now seen (never lowering what was remembered)."""
    sites = load_registry(path)
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    for site, mark in marks.items():
        old = sites.get(site, {})
        same = old.get("ledger-created") == mark["ledger-created"]
        sites[site] = {"ledger-created": mark["ledger-created"],
                       "revision": max(int(mark["revision"]), int(old.get("revision", 0)) if same else 0),
                       "spent": max(float(mark["spent"]), float(old.get("spent", 0.0)) if same else 0.0),
                       "run-id": run_id, "seen-at": now}
    try:
        write_text_atomic(path, json.dumps({"format": FORMAT, "version": VERSION, "sites": sites}, indent=2,
                                           sort_keys=True))
    except OSError as exc:
        raise RegistryError(f"{path}: cannot write the ledger registry ({exc}); give ledger-registry a writable "
                            "path") from None
