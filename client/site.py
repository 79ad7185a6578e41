"""Which site a ClientApp process is, and where its vault and key are.

Deployment: the hospital starts its SuperNode with
``--node-config 'vault="/abs/vault" key-file="/abs/key" site="st-mary"'`` (``passphrase-file``
may replace ``key-file``; ``site`` defaults to the vault folder's parent's name).

Simulation: Flower gives every simulated SuperNode only ``partition-id`` and
``num-partitions``; the run config's ``sites-dir`` names the layout that ``genofed cohort split
--vaults`` writes, and partition ``i`` is the ``i``-th site folder in name order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import GenofedError
from common.site_names import natural_key


class SiteConfigError(GenofedError):
    """The node's configuration does not say where its vault is."""


@dataclass(frozen=True)
class SiteRef:
    """A site's name, vault path and key material location."""

    name: str
    vault: Path
    key_file: Path | None = None
    passphrase_file: Path | None = None

    def key(self) -> Any:
        """The vault key (read when needed, never cached across messages)."""
        from client.vault import KeySource

        if self.key_file is not None:
            return KeySource.from_key_file(self.key_file)
        return KeySource.from_passphrase_file(self.passphrase_file)

    def open_vault(self) -> Any:
        from client.vault import Vault

        return Vault.open(self.vault, self.key())


def site_name_of(vault: Path) -> str:
    """The site a vault belongs to, from its path (``SITES/<site>/vault`` or ``.../<site>``)."""
    path = Path(vault).resolve()
    return path.parent.name if path.name == "vault" and path.parent.name else path.name


def site_dirs(sites_dir: Path) -> list[Path]:
    """The site folders of a layout written by ``genofed cohort split --vaults``, in name order."""
    return sorted((p for p in Path(sites_dir).iterdir() if (p / "vault").is_dir() and (p / "key").is_file()),
                  key=lambda p: natural_key(p.name))


def resolve_site(node_config: dict[str, Any], run_config: dict[str, Any]) -> SiteRef:
    """The site of this node, from its node config (deployment) or its partition (simulation)."""
    if "vault" in node_config:
        vault = Path(str(node_config["vault"]))
        key = node_config.get("key-file")
        pw = node_config.get("passphrase-file")
        if key is None and pw is None:
            raise SiteConfigError("node config names a vault but neither key-file nor passphrase-file")
        return SiteRef(name=str(node_config.get("site", vault.resolve().parent.name)), vault=vault,
                       key_file=Path(str(key)) if key is not None else None,
                       passphrase_file=Path(str(pw)) if pw is not None else None)
    sites_dir = run_config.get("sites-dir", "")
    if "partition-id" in node_config and sites_dir:
        dirs = site_dirs(Path(str(sites_dir)))
        pid = int(node_config["partition-id"])
        if pid >= len(dirs):
            raise SiteConfigError(f"partition {pid} but {sites_dir} has only {len(dirs)} site folders")
        return SiteRef(name=dirs[pid].name, vault=dirs[pid] / "vault", key_file=dirs[pid] / "key")
    raise SiteConfigError("node config has no vault: start the SuperNode with "
                          "--node-config 'vault=\"/abs/vault\" key-file=\"/abs/key\"'")
