"""The vault: a site's data and site-fitted models, encrypted at rest with AES-256-GCM.

Everything a hospital keeps about its patients (the imported cohort, the forest fitted on it,
the privacy ledger's inputs) lives in one vault. Plaintext exists only in memory: blobs are
encrypted before they are written and authenticated every time they are read.

On-disk format (version 1)
--------------------------
A vault is a directory::

    VAULT/manifest.json               plaintext JSON (below)
    VAULT/index.<16 hex>.gfv          the encrypted index (role "index")
    VAULT/<role slug>.<16 hex>.gfv    one encrypted blob per role, e.g. cohort-omics.3f9a05c1d2e4b6a8.gfv

``manifest.json``::

    {"format": "genofed-vault", "version": 1, "cipher": "AES-256-GCM",
     "kdf": {"kind": "raw"}                                   # a 32-byte key file
         or {"kind": "scrypt", "salt": "<base64, 16 bytes>", "n": 32768, "r": 8, "p": 1},
     "key_check": "<base64 of nonce || AES-GCM(key, KEY_CHECK_PLAINTEXT, aad('key-check'))>",
     "index": "index.<16 hex>.gfv"}

Every encrypted file (blob, index) is ``12-byte random nonce || AES-256-GCM ciphertext || 16-byte
tag``, with associated data ``b"genofed-vault/v1/" + role.encode("utf-8")``. Binding the role means
a blob renamed onto another role's file fails authentication. The index is JSON mapping each role
to ``{"file", "sha256" (of the file's bytes), "size"}``, so a deleted, truncated or substituted
file is detected and named before decryption is even tried. Role names are visible (as a slug)
in file names: they are chosen by code (``cohort/omics``, ``model/forest``), never from data.

Writes and crashes
------------------
Files are never modified in place. An update writes its new blobs under fresh random names
(each ``fsync``-ed), a new index, and a temporary manifest; fsyncs the directory; then
``os.replace``-s the manifest (the single commit point) and fsyncs the directory again. Only
then are the blobs the old manifest named deleted. A new vault is assembled in a hidden sibling
directory ``.<name>.partial-<hex>`` and renamed into place. So at every instant the path holds
either the previous complete vault, the new complete vault, or (for a first import) nothing.
Files left by a killed writer (unreferenced ``.gfv`` files, a temporary manifest, a
``.partial-*`` sibling) are never read; ``verify`` lists them as warnings, the next update or
create removes them. Writers take an ``flock`` on the vault directory, so two concurrent updates
cannot lose each other's blobs.

Limits
------
One blob holds at most 2**31 - 1 bytes (the ``cryptography`` package's AES-GCM limit); each
blob is read whole into memory. Random 96-bit nonces are safe far beyond any vault's lifetime
number of writes. The manifest is not itself authenticated: tampering with its kdf or key check
shows up as a wrong key, with its index name as a failed index blob. Rolling the whole folder
back to an older copy is not detectable from the folder alone.
"""

from __future__ import annotations

import base64
import binascii
import errno
import glob
import hashlib
import hmac
import json
import os
import re
import secrets
import shutil
import unicodedata
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from common import durable
from common.durable import directory_lock
from common.errors import GenofedError

FORMAT = "genofed-vault"
VERSION = 1
CIPHER = "AES-256-GCM"
MANIFEST = "manifest.json"
KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
AAD_PREFIX = b"genofed-vault/v1/"
INDEX_ROLE = "index"
KEY_CHECK_ROLE = "key-check"
RESERVED_ROLES = frozenset({INDEX_ROLE, KEY_CHECK_ROLE})
KEY_CHECK_PLAINTEXT = b"genofed-vault key check v1"
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1
SALT_BYTES = 16
MAX_BLOB_BYTES = 2**31 - 1
MAX_ROLE_CHARS = 200
LOCK_WAIT_S = 30.0

_BLOB_NAME = re.compile(r"^[a-z0-9-]{1,40}\.[0-9a-f]{16}\.gfv$")
_TMP_MANIFEST = re.compile(r"^\.manifest\.json\.tmp-[0-9a-f]{16}$")
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
_MAX_MANIFEST_BYTES = 1 << 20
_FIX = "restore it from backup"
_RETRIES = 5  # re-reads when another writer commits mid-read (each retry needs a new commit)


class VaultError(GenofedError):
    """A vault or key problem, as one line naming the vault (or key file), the blob and the fix."""


class WrongKeyError(VaultError):
    """The key (or passphrase) does not open this vault: its key check failed."""


# ---------------------------------------------------------------------------------------------
# Keys


def generate_key_file(path: str | Path) -> Path:
    """Write 32 fresh random bytes to a new key file readable by its owner only (mode 0600).

    Raises
    ------
    VaultError
        If the file already exists (a key is never overwritten) or its folder does not exist.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise VaultError(f"{path}: folder {path.parent} does not exist; create it first")
    try:
        # O_EXCL: refuse to clobber an existing key; 0o600 from the first instant, no chmod race.
        durable.write_new(path, secrets.token_bytes(KEY_BYTES), mode=0o600)
    except FileExistsError:
        raise VaultError(f"{path}: already exists; a key file is never overwritten (a lost key is a lost "
                         "vault); choose another path") from None
    except OSError as exc:
        raise VaultError(f"{path}: cannot create key file: {exc.strerror}") from None
    _fsync_dir_quiet(path.parent)
    return path


class KeySource:
    """Where a vault's key comes from: a 32-byte key file, or a passphrase stretched by scrypt.

    Use :meth:`from_key_file`, :meth:`from_passphrase` or :meth:`from_passphrase_file`. A
    passphrase source derives its key from the salt and parameters a vault's manifest records,
    and caches derived keys, so opening and then updating a vault costs one scrypt run.
    """

    def __init__(self, *, kind: str, secret: bytes, label: str) -> None:
        self._kind, self._secret, self._label = kind, secret, label
        self._derived: dict[tuple[bytes, int, int, int], bytes] = {}

    @classmethod
    def from_key_file(cls, path: str | Path) -> KeySource:
        """A raw key read from ``path``, which must hold exactly 32 bytes and be readable by its
        owner only (:mod:`common.keyfiles`; checked before it is read)."""
        from common.keyfiles import check_private_file

        path = Path(path)
        check_private_file(path, "vault key file")
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise VaultError(f"{path}: key file not found; pass the key file the vault was created with "
                             "(`genofed keygen` makes a new one)") from None
        except IsADirectoryError:
            raise VaultError(f"{path}: is a folder, not a key file; pass the 32-byte key file") from None
        except OSError as exc:
            raise VaultError(f"{path}: cannot read key file: {exc.strerror}") from None
        if len(data) != KEY_BYTES:
            raise VaultError(f"{path}: key file is {len(data)} bytes, expected {KEY_BYTES}; "
                             "pass the file written by `genofed keygen`")
        return cls(kind="raw", secret=data, label=str(path))

    @classmethod
    def from_passphrase(cls, passphrase: str) -> KeySource:
        """A key stretched from ``passphrase`` by scrypt (n=2**15, r=8, p=1; the salt is per vault).

        The passphrase is NFC-normalised, so the same words typed on different systems agree.
        """
        if not isinstance(passphrase, str):
            raise TypeError("passphrase must be a str")
        if not passphrase:
            raise VaultError("passphrase is empty; choose a non-empty passphrase")
        secret = unicodedata.normalize("NFC", passphrase).encode("utf-8")
        return cls(kind="scrypt", secret=secret, label="passphrase")

    @classmethod
    def from_passphrase_file(cls, path: str | Path) -> KeySource:
        """A passphrase read from a UTF-8 text file (one trailing newline is ignored), readable by
        its owner only (:mod:`common.keyfiles`; checked before it is read)."""
        from common.keyfiles import check_private_file

        path = Path(path)
        check_private_file(path, "vault passphrase file")
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise VaultError(f"{path}: passphrase file not found") from None
        except UnicodeDecodeError:
            raise VaultError(f"{path}: passphrase file is not UTF-8 text") from None
        except OSError as exc:
            raise VaultError(f"{path}: cannot read passphrase file: {exc.strerror}") from None
        text = text[:-1] if text.endswith("\n") else text
        text = text[:-1] if text.endswith("\r") else text
        if not text:
            raise VaultError(f"{path}: passphrase file is empty; write the passphrase on its first line")
        return cls.from_passphrase(text)

    @property
    def kind(self) -> str:
        """``"raw"`` (key file) or ``"scrypt"`` (passphrase)."""
        return self._kind

    def __repr__(self) -> str:
        return f"KeySource({self._kind}, {self._label})"

    def new_kdf(self) -> dict[str, Any]:
        """A fresh kdf record for a new vault (or a rekey): a new random salt for a passphrase."""
        if self._kind == "raw":
            return {"kind": "raw"}
        salt = base64.b64encode(secrets.token_bytes(SALT_BYTES)).decode("ascii")
        return {"kind": "scrypt", "salt": salt, "n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P}

    def derive(self, kdf: Mapping[str, Any], *, vault: str | Path) -> bytes:
        """The 32-byte AES key for a vault whose manifest records ``kdf`` (already validated)."""
        if kdf["kind"] != self._kind:
            if kdf["kind"] == "scrypt":
                raise WrongKeyError(f"{vault}: this vault is locked with a passphrase, not a key file; "
                                 "pass --passphrase-file")
            raise WrongKeyError(f"{vault}: this vault is locked with a key file, not a passphrase; pass --key-file")
        if self._kind == "raw":
            return self._secret
        salt = base64.b64decode(kdf["salt"])
        params = (salt, int(kdf["n"]), int(kdf["r"]), int(kdf["p"]))
        if params not in self._derived:
            self._derived[params] = Scrypt(salt=salt, length=KEY_BYTES, n=params[1], r=params[2],
                                           p=params[3]).derive(self._secret)
        return self._derived[params]

    def wrong_key_message(self, vault: str | Path) -> str:
        """The one-line message for a key that fails this vault's key check."""
        if self._kind == "raw":
            return f"{vault}: wrong key (key check failed); use the key file this vault was created with"
        return f"{vault}: wrong passphrase (key check failed); use the passphrase this vault was created with"


# ---------------------------------------------------------------------------------------------
# Crypto and names


def _aad(role: str) -> bytes:
    return AAD_PREFIX + role.encode("utf-8")


def _seal(key: bytes, role: str, plaintext: bytes) -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, _aad(role))


def _open_sealed(key: bytes, role: str, sealed: bytes) -> bytes:
    """Decrypt ``nonce || ciphertext+tag``; raises InvalidTag if edited, truncated or mis-roled."""
    if len(sealed) < NONCE_BYTES + TAG_BYTES:
        raise InvalidTag()
    view = memoryview(sealed)  # slices of a view: no copy of a large blob
    return AESGCM(key).decrypt(view[:NONCE_BYTES], view[NONCE_BYTES:], _aad(role))


def _slug(role: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", role.lower()).strip("-")[:40].strip("-")
    return slug or "blob"


def check_role(role: object) -> str:
    """Return ``role`` if it can name a blob, else raise VaultError saying why."""
    if not isinstance(role, str) or not role:
        raise VaultError(f"blob role must be a non-empty string, got {role!r}")
    if role in RESERVED_ROLES:
        raise VaultError(f"blob role {role!r} is reserved by the vault format; choose another role")
    if len(role) > MAX_ROLE_CHARS:
        raise VaultError(f"blob role {role[:40]!r}... is {len(role)} characters; the limit is {MAX_ROLE_CHARS}")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in role):
        raise VaultError(f"blob role {role!r} contains a control character")
    try:
        role.encode("utf-8")
    except UnicodeEncodeError:
        raise VaultError(f"blob role {role!r} is not valid Unicode text") from None
    return role


def _checked_blobs(blobs: Mapping[str, bytes]) -> dict[str, bytes]:
    """Validate roles and payloads before anything touches the disk."""
    out: dict[str, bytes] = {}
    for role, data in blobs.items():
        check_role(role)
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"blob {role!r}: expected bytes, got {type(data).__name__}")
        data = bytes(data)
        if len(data) > MAX_BLOB_BYTES:
            raise VaultError(f"blob {role!r} is {len(data)} bytes; one vault blob holds at most "
                             f"{MAX_BLOB_BYTES} bytes (AES-GCM limit); split it into several roles")
        out[role] = data
    return out


# ---------------------------------------------------------------------------------------------
# File primitives. Every disk mutation goes through these five functions (tests inject faults here).


def _write_new(path: Path, *chunks: bytes) -> None:
    """Create ``path`` (it must not exist) with mode 0600, write ``chunks`` and fsync it."""
    durable.write_new(path, *chunks, mode=0o600)


def _replace(src: Path, dst: Path) -> None:
    """Atomically put ``src`` in place of ``dst`` (same directory)."""
    os.replace(src, dst)


def _rename_dir(src: Path, dst: Path) -> None:
    """Rename a directory; fails if ``dst`` is a non-empty directory."""
    os.rename(src, dst)


def _fsync_dir(path: Path) -> None:
    """Make a directory's entries (creations, renames, deletions) durable."""
    durable.fsync_dir(path)


def _unlink(path: Path) -> None:
    os.unlink(path)


def _discard(path: Path) -> None:
    """Best-effort removal of a file this process wrote and no manifest names."""
    with suppress(OSError):
        _unlink(path)


def _fsync_dir_quiet(path: Path) -> None:
    with suppress(OSError):
        _fsync_dir(path)


def _partial_dirs(path: Path) -> list[Path]:
    """Hidden sibling directories left by interrupted creates of ``path``."""
    if not path.parent.is_dir():
        return []
    pattern = os.path.join(glob.escape(str(path.parent)), f".{glob.escape(path.name)}.partial-*")
    return [Path(p) for p in glob.glob(pattern) if os.path.isdir(p)]


def _clean_partials(path: Path) -> None:
    """Remove ``.partial-*`` siblings whose writer is gone (a live writer holds their lock)."""
    for partial in _partial_dirs(path):
        try:
            with directory_lock(partial, wait_s=0.0) as free:
                if free:
                    shutil.rmtree(partial, ignore_errors=True)
        except OSError:
            pass


# ---------------------------------------------------------------------------------------------
# Manifest and index


@dataclass(frozen=True)
class _Entry:
    """Where one role's blob lives and what its file's bytes must hash to."""

    file: str
    sha256: str
    size: int


@dataclass(frozen=True)
class _Manifest:
    kdf: dict[str, Any]
    key_check: bytes
    index: str

    def to_bytes(self) -> bytes:
        doc = {"format": FORMAT, "version": VERSION, "cipher": CIPHER, "kdf": self.kdf,
               "key_check": base64.b64encode(self.key_check).decode("ascii"), "index": self.index}
        return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _not_a_manifest(vault: Path, reason: str) -> VaultError:
    return VaultError(f"{vault / MANIFEST} is not a genofed vault manifest ({reason}); {_FIX}")


def _parse_manifest(vault: Path, raw: bytes) -> _Manifest:
    try:
        doc = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise _not_a_manifest(vault, "not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        what = "empty" if not raw.strip() else f"truncated or not JSON: {exc.msg} at line {exc.lineno}"
        raise _not_a_manifest(vault, what) from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise _not_a_manifest(vault, f"format is not {FORMAT!r}")
    version = doc.get("version")
    if version != VERSION:
        if isinstance(version, int) and not isinstance(version, bool) and version > VERSION:
            raise VaultError(f"{vault}: vault format version {version} was written by a newer genofed "
                             f"(this one reads version {VERSION}); upgrade genofed")
        raise _not_a_manifest(vault, f"unsupported version {version!r}")
    kdf = _parse_kdf(vault, doc.get("kdf"))
    try:
        key_check = base64.b64decode(str(doc.get("key_check", "")), validate=True)
    except (binascii.Error, ValueError):
        raise _not_a_manifest(vault, "key_check is not base64") from None
    if len(key_check) != NONCE_BYTES + len(KEY_CHECK_PLAINTEXT) + TAG_BYTES:
        raise _not_a_manifest(vault, "key_check has the wrong length")
    index = doc.get("index")
    # The manifest is plaintext: never let it name a file outside the vault.
    if not isinstance(index, str) or not _BLOB_NAME.match(index):
        raise _not_a_manifest(vault, f"index {index!r} is not a vault blob name")
    return _Manifest(kdf=kdf, key_check=key_check, index=index)


def _parse_kdf(vault: Path, kdf: Any) -> dict[str, Any]:
    if not isinstance(kdf, dict) or kdf.get("kind") not in ("raw", "scrypt"):
        raise _not_a_manifest(vault, "kdf.kind must be 'raw' or 'scrypt'")
    if kdf["kind"] == "raw":
        return {"kind": "raw"}
    try:
        salt = base64.b64decode(str(kdf.get("salt", "")), validate=True)
    except (binascii.Error, ValueError):
        raise _not_a_manifest(vault, "kdf.salt is not base64") from None
    params = [kdf.get(name) for name in ("n", "r", "p")]
    n, r, p = (v if isinstance(v, int) and not isinstance(v, bool) else -1 for v in params)
    # Bounds keep a tampered manifest from demanding gigabytes of memory or minutes of CPU.
    if not (2 <= n <= 2**20 and n & (n - 1) == 0 and 1 <= r <= 32 and 1 <= p <= 16
            and 128 * n * r <= 1 << 30) or len(salt) < 8:
        raise _not_a_manifest(vault, "kdf scrypt parameters are out of range")
    return {"kind": "scrypt", "salt": kdf["salt"], "n": n, "r": r, "p": p}


def _index_bytes(entries: Mapping[str, _Entry]) -> bytes:
    doc = {"format": f"{FORMAT}-index", "version": VERSION,
           "blobs": {role: {"file": e.file, "sha256": e.sha256, "size": e.size}
                     for role, e in sorted(entries.items())}}
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode("utf-8")


def _parse_index(vault: Path, file: str, raw: bytes) -> dict[str, _Entry]:
    def bad(reason: str) -> VaultError:
        return VaultError(f"{vault}: blob 'index' ({file}) is not a valid vault index ({reason}); {_FIX}")

    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise bad("not JSON") from None
    if not isinstance(doc, dict) or doc.get("version") != VERSION or not isinstance(doc.get("blobs"), dict):
        raise bad("unexpected structure")
    entries: dict[str, _Entry] = {}
    for role, e in doc["blobs"].items():
        if not isinstance(e, dict):
            raise bad(f"entry {role!r}")
        name, digest, size = e.get("file"), e.get("sha256"), e.get("size")
        if not (isinstance(name, str) and _BLOB_NAME.match(name) and isinstance(digest, str)
                and _SHA256_HEX.match(digest) and isinstance(size, int) and size >= NONCE_BYTES + TAG_BYTES):
            raise bad(f"entry {role!r}")
        entries[role] = _Entry(file=name, sha256=digest, size=size)
    return entries


def _read_manifest(vault: Path) -> _Manifest:
    """Read and parse ``vault``'s manifest; every failure is a one-line VaultError."""
    if not vault.is_dir():
        what = "it is a file, not a folder" if vault.exists() else "no such folder"
        raise VaultError(f"{vault}: not a vault ({what}); create one with `genofed vault import`")
    target = vault / MANIFEST
    try:
        with open(target, "rb") as fh:
            raw = fh.read(_MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError:
        raise VaultError(f"{vault}: not a vault (no {MANIFEST}); create one with `genofed vault import`") from None
    except OSError as exc:
        raise VaultError(f"{target}: cannot read the vault manifest: {exc.strerror}") from None
    if len(raw) > _MAX_MANIFEST_BYTES:
        raise _not_a_manifest(vault, "larger than 1 MiB")
    return _parse_manifest(vault, raw)


def is_vault(path: str | Path) -> bool:
    """Whether ``path`` looks like a vault (a folder with a manifest); nothing is checked or read."""
    return (Path(path) / MANIFEST).is_file()


# ---------------------------------------------------------------------------------------------
# The vault


class Vault:
    """An opened vault. Create one with :meth:`create`, open one with :meth:`open`.

    Blobs are decrypted and authenticated on every :meth:`read`; nothing decrypted is cached
    or written. :meth:`update` and :meth:`rekey` are atomic (see the module docstring).
    """

    def __init__(self, path: Path, source: KeySource, key: bytes, manifest: _Manifest,
                 entries: dict[str, _Entry]) -> None:
        self._path, self._source, self._key = path, source, key
        self._manifest, self._entries = manifest, entries

    def __repr__(self) -> str:
        return f"Vault({str(self._path)!r}, {len(self._entries)} blobs, kdf={self._manifest.kdf['kind']})"

    # -- opening and creating ------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path, key: KeySource) -> Vault:
        """Open an existing vault: check its manifest and key, and decrypt its index.

        Raises
        ------
        VaultError
            Not a vault, a damaged manifest or index, or the wrong key. Nothing is written.
        """
        path = Path(path)
        manifest, key_bytes, entries = _load(path, key)
        return cls(path, key, key_bytes, manifest, entries)

    @classmethod
    def create(cls, path: str | Path, key: KeySource, blobs: Mapping[str, bytes], *,
               overwrite: bool = False) -> Vault:
        """Write a vault holding exactly ``blobs`` at ``path``.

        A new vault is assembled in a hidden sibling folder and renamed into place. With
        ``overwrite=True`` an existing vault is opened with ``key`` (a different key is an error)
        and atomically updated to hold exactly ``blobs``; without it, an existing vault is an
        error. Leftovers of interrupted creates of ``path`` are removed first.
        """
        path = Path(path)
        blobs = _checked_blobs(blobs)
        _clean_partials(path)
        if is_vault(path):
            if not overwrite:
                raise VaultError(f"{path}: a vault already exists here; pass --force (overwrite=True) to "
                                 "replace its contents, or choose another path")
            vault = cls._open_for_overwrite(path, key)
            vault._write(blobs, replace_all=True)
            return vault
        if path.exists() and not (path.is_dir() and not any(path.iterdir())):
            raise VaultError(f"{path}: exists and is not a vault; choose another path or remove it")
        return cls._create_fresh(path, key, blobs)

    @classmethod
    def _open_for_overwrite(cls, path: Path, key: KeySource) -> Vault:
        try:
            return cls.open(path, key)
        except WrongKeyError as exc:
            raise WrongKeyError(f"{exc}; an existing vault is only overwritten with its own key "
                                "(remove it first to start over with another)") from None

    @classmethod
    def _create_fresh(cls, path: Path, key: KeySource, blobs: dict[str, bytes]) -> Vault:
        partial = path.parent / f".{path.name}.partial-{secrets.token_hex(8)}"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            os.mkdir(partial, 0o700)
        except OSError as exc:
            raise _write_failed(path, exc, created=True) from None
        # The lock tells a concurrent create's cleanup that this folder is still being written.
        with directory_lock(partial, wait_s=0.0):
            try:
                kdf = key.new_kdf()
                key_bytes = key.derive(kdf, vault=path)
                entries = {role: _write_blob(partial, key_bytes, role, data) for role, data in blobs.items()}
                index = _write_blob(partial, key_bytes, INDEX_ROLE, _index_bytes(entries))
                manifest = _Manifest(kdf=kdf, key_check=_seal(key_bytes, KEY_CHECK_ROLE, KEY_CHECK_PLAINTEXT),
                                     index=index.file)
                _write_new(partial / MANIFEST, manifest.to_bytes())
                _fsync_dir(partial)
                try:
                    _rename_dir(partial, path)
                except OSError as exc:
                    if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                        raise
                    raise VaultError(f"{path}: another vault appeared here while this one was being written "
                                     "(another import running?); nothing was written") from None
            except BaseException as exc:
                shutil.rmtree(partial, ignore_errors=True)
                if isinstance(exc, OSError):
                    raise _write_failed(path, exc, created=True) from None
                raise
        _fsync_dir_quiet(path.parent)
        return cls(path, key, key_bytes, manifest, entries)

    # -- reading -------------------------------------------------------------------------------

    @property
    def path(self) -> Path:
        """The vault folder."""
        return self._path

    @property
    def roles(self) -> list[str]:
        """The roles of the stored blobs, sorted."""
        return sorted(self._entries)

    @property
    def kdf_kind(self) -> str:
        """``"raw"`` (key file) or ``"scrypt"`` (passphrase)."""
        return str(self._manifest.kdf["kind"])

    def __contains__(self, role: object) -> bool:
        return role in self._entries

    def read(self, role: str) -> bytes:
        """Decrypt and authenticate the blob stored under ``role``.

        Raises
        ------
        VaultError
            Unknown role, or the blob's file is missing, truncated, edited or swapped.
        """
        for attempt in range(_RETRIES):
            if role not in self._entries:
                # Another process may have committed since we opened: look again before refusing.
                self._reload_if_changed()
            if role not in self._entries:
                known = ", ".join(self.roles) or "none"
                raise VaultError(f"{self._path}: no blob with role {role!r} (stored roles: {known})")
            try:
                return _read_blob(self._path, self._key, role, self._entries[role])
            except _Missing as missing:
                # A commit by another process removes the files our (older) index names.
                if attempt == _RETRIES - 1 or not self._reload_if_changed():
                    raise missing.error from None
        raise AssertionError("unreachable")

    def read_prefix(self, prefix: str) -> dict[str, bytes]:
        """Every blob whose role starts with ``prefix`` (for example ``"cohort/"``), by role."""
        return {role: self.read(role) for role in self.roles if role.startswith(prefix)}

    def derive_seed(self, label: str) -> int:
        """A 63-bit seed that only holders of this vault's key can compute.

        An HMAC-SHA256 of ``label`` under the vault key, with its own domain prefix so that it
        can never collide with an encryption use of the key. Sites seed their DP noise and
        sampling with it: a seed the coordinator knows (the run config's) would let it replay
        the noise and subtract it. The same vault and label always give the same seed, so a
        resumed run repeats its randomness; a rekeyed vault gives new seeds.
        """
        digest = hmac.new(self._key, b"genofed-seed\x00" + label.encode("utf-8"), hashlib.sha256).digest()
        return int.from_bytes(digest[:8], "big") >> 1

    def stats(self) -> dict[str, Any]:
        """Format, kdf kind, blob count and stored bytes (from the index; nothing decrypted)."""
        return {"path": str(self._path), "format": FORMAT, "version": VERSION, "cipher": CIPHER,
                "kdf": self.kdf_kind, "blobs": len(self._entries),
                "bytes": sum(e.size for e in self._entries.values())}

    def verify(self) -> dict[str, Any]:
        """Re-read the manifest and index from disk and authenticate every blob.

        Returns
        -------
        dict
            ``blobs`` (count), ``bytes`` (stored, encrypted), ``plaintext_bytes`` and
            ``warnings``: files in the folder the vault does not use (left by an interrupted
            write, or put there by hand). They are harmless; the next update removes its own.

        Raises
        ------
        VaultError
            Naming the first (in role order) missing, truncated, edited or swapped blob.
        """
        for attempt in range(_RETRIES):
            self._reload()
            stored = plain = 0
            try:
                for role in self.roles:
                    plain += len(_read_blob(self._path, self._key, role, self._entries[role]))
                    stored += self._entries[role].size
            except _Missing as missing:
                if attempt < _RETRIES - 1 and _manifest_changed(self._path, self._manifest):
                    continue  # another writer committed meanwhile: verify what is there now
                raise missing.error from None
            return {"path": str(self._path), "blobs": len(self._entries), "bytes": stored,
                    "plaintext_bytes": plain, "warnings": self._extra_files()}
        raise AssertionError("unreachable")

    # -- writing -------------------------------------------------------------------------------

    def update(self, put: Mapping[str, bytes] | None = None, remove: Iterable[str] = ()) -> None:
        """Atomically store ``put`` (adding or replacing roles) and drop the roles in ``remove``.

        Roles in ``remove`` that are not stored are ignored. Either the whole update is visible
        afterwards, or (on any error or crash) none of it.
        """
        put = _checked_blobs(put or {})
        drop = {check_role(r) for r in remove}
        both = sorted(drop & set(put))
        if both:
            raise VaultError(f"{self._path}: role {both[0]!r} is both stored and removed in one update")
        if put or drop:
            self._write(put, remove=drop)

    def rekey(self, new_key: KeySource) -> None:
        """Re-encrypt every blob under ``new_key``; afterwards only ``new_key`` opens the vault.

        Every blob is authenticated under the old key first; an interruption leaves the vault
        whole under the old key.
        """
        with self._writer_lock():
            self._reload()
            kdf = new_key.new_kdf()
            key_bytes = new_key.derive(kdf, vault=self._path)
            old_key, old_entries = self._key, dict(self._entries)

            def reencrypted() -> Iterator[tuple[str, bytes]]:
                for role in sorted(old_entries):
                    try:
                        yield role, _read_blob(self._path, old_key, role, old_entries[role])
                    except _Missing as missing:
                        raise missing.error from None

            self._commit({}, reencrypted(), key=key_bytes, kdf=kdf,
                         key_check=_seal(key_bytes, KEY_CHECK_ROLE, KEY_CHECK_PLAINTEXT), source=new_key)

    def _write(self, put: dict[str, bytes], *, remove: frozenset[str] | set[str] = frozenset(),
               replace_all: bool = False) -> None:
        with self._writer_lock():
            self._reload()  # under the lock: build on what is on disk now, not what we opened
            kept = {} if replace_all else {r: e for r, e in self._entries.items() if r not in remove}
            self._commit(kept, put.items(), key=self._key, kdf=self._manifest.kdf,
                         key_check=self._manifest.key_check, source=self._source)

    @contextmanager
    def _writer_lock(self) -> Iterator[None]:
        if not self._path.is_dir():
            raise VaultError(f"{self._path}: not a vault (the folder is gone); create one with `genofed vault import`")
        with directory_lock(self._path, wait_s=LOCK_WAIT_S) as free:
            if not free:
                raise VaultError(f"{self._path}: another process is writing this vault; "
                                 "try again when it has finished")
            yield

    def _commit(self, kept: dict[str, _Entry], items: Iterable[tuple[str, bytes]], *, key: bytes,
                kdf: dict[str, Any], key_check: bytes, source: KeySource) -> None:
        """Write new blobs, a new index and manifest; swap the manifest in; drop stale files."""
        written: list[Path] = []
        try:
            entries = dict(kept)
            for role, data in items:
                entries[role] = _write_blob(self._path, key, role, data)
                written.append(self._path / entries[role].file)
            index = _write_blob(self._path, key, INDEX_ROLE, _index_bytes(entries))
            written.append(self._path / index.file)
            manifest = _Manifest(kdf=kdf, key_check=key_check, index=index.file)
            tmp = self._path / f".{MANIFEST}.tmp-{secrets.token_hex(8)}"
            _write_new(tmp, manifest.to_bytes())
            written.append(tmp)
            _fsync_dir(self._path)  # the new blobs' names must be durable before a manifest names them
            _replace(tmp, self._path / MANIFEST)  # the commit point
        except BaseException as exc:
            for f in written:
                _discard(f)
            if isinstance(exc, OSError):
                raise _write_failed(self._path, exc, created=False) from None
            raise
        self._manifest, self._entries, self._key, self._source = manifest, entries, key, source
        try:
            _fsync_dir(self._path)
        except OSError as exc:
            # Committed but maybe not durable: keep the old blobs so that either manifest still works.
            raise VaultError(f"{self._path}: the update was written but could not be flushed to disk "
                             f"({exc.strerror}); run `genofed vault verify`") from None
        self._remove_unreferenced()

    def _remove_unreferenced(self) -> None:
        """Delete blob files and temp manifests no manifest names (we hold the writer lock)."""
        for name in self._unreferenced():
            if _BLOB_NAME.match(name) or _TMP_MANIFEST.match(name):
                _discard(self._path / name)
        _fsync_dir_quiet(self._path)

    def _unreferenced(self) -> list[str]:
        used = {MANIFEST, self._manifest.index} | {e.file for e in self._entries.values()}
        try:
            return sorted(n for n in os.listdir(self._path) if n not in used)
        except OSError:
            return []

    def _extra_files(self) -> list[str]:
        notes = []
        for name in self._unreferenced():
            if _BLOB_NAME.match(name):
                notes.append(f"unreferenced blob file {name} (left by an interrupted write; "
                             "the next update removes it)")
            elif _TMP_MANIFEST.match(name):
                notes.append(f"temporary manifest {name} (left by an interrupted write; the next update removes it)")
            else:
                notes.append(f"unknown file {name} (not part of the vault)")
        return notes

    # -- reloading -----------------------------------------------------------------------------

    def _reload(self) -> None:
        manifest, key_bytes, entries = _load(self._path, self._source)
        self._manifest, self._key, self._entries = manifest, key_bytes, entries

    def _reload_if_changed(self) -> bool:
        if not _manifest_changed(self._path, self._manifest):
            return False
        self._reload()
        return True


# ---------------------------------------------------------------------------------------------
# Blob I/O


class _Missing(Exception):
    """A blob file is gone; carries the user-facing error (a reader may retry after a reload)."""

    def __init__(self, error: VaultError) -> None:
        super().__init__(str(error))
        self.error = error


def _write_blob(folder: Path, key: bytes, role: str, plaintext: bytes) -> _Entry:
    # Nonce and ciphertext are written as two chunks: no concatenated copy of a large blob.
    nonce = os.urandom(NONCE_BYTES)
    ciphertext = AESGCM(key).encrypt(nonce, plaintext, _aad(role))
    name = f"{_slug(role)}.{secrets.token_hex(8)}.gfv"
    _write_new(folder / name, nonce, ciphertext)
    digest = hashlib.sha256(nonce)
    digest.update(ciphertext)
    return _Entry(file=name, sha256=digest.hexdigest(), size=NONCE_BYTES + len(ciphertext))


def _blob_error(vault: Path, role: str, file: str, problem: str) -> VaultError:
    return VaultError(f"{vault}: blob {role!r} ({file}) {problem}")


def _read_blob(vault: Path, key: bytes, role: str, entry: _Entry) -> bytes:
    """Read, check size and hash, and decrypt one blob; raises _Missing or VaultError."""
    try:
        sealed = (vault / entry.file).read_bytes()
    except FileNotFoundError:
        raise _Missing(_blob_error(vault, role, entry.file, f"is missing: it was deleted or moved; {_FIX}")) from None
    except OSError as exc:
        raise _blob_error(vault, role, entry.file, f"cannot be read: {exc.strerror}") from None
    if len(sealed) != entry.size:
        raise _blob_error(vault, role, entry.file, f"has {len(sealed)} bytes, {entry.size} expected: it was "
                          f"truncated, extended or swapped; {_FIX}")
    try:
        if hashlib.sha256(sealed).hexdigest() != entry.sha256:
            raise InvalidTag()
        return _open_sealed(key, role, sealed)
    except InvalidTag:
        raise _blob_error(vault, role, entry.file, f"failed authentication: it was edited, truncated or "
                          f"swapped; {_FIX}") from None


def _load(path: Path, source: KeySource) -> tuple[_Manifest, bytes, dict[str, _Entry]]:
    """Manifest, key and index of the vault at ``path``; reads only."""
    for attempt in range(_RETRIES):
        manifest = _read_manifest(path)
        key = source.derive(manifest.kdf, vault=path)
        try:
            if _open_sealed(key, KEY_CHECK_ROLE, manifest.key_check) != KEY_CHECK_PLAINTEXT:
                raise InvalidTag()
        except InvalidTag:
            raise WrongKeyError(source.wrong_key_message(path)) from None
        try:
            raw = (path / manifest.index).read_bytes()
        except FileNotFoundError:
            if attempt < _RETRIES - 1 and _manifest_changed(path, manifest):
                continue  # a writer committed between our two reads and removed the old index
            raise _blob_error(path, INDEX_ROLE, manifest.index,
                              f"is missing: it was deleted or moved; {_FIX}") from None
        except OSError as exc:
            raise _blob_error(path, INDEX_ROLE, manifest.index, f"cannot be read: {exc.strerror}") from None
        try:
            plaintext = _open_sealed(key, INDEX_ROLE, raw)
        except InvalidTag:
            raise _blob_error(path, INDEX_ROLE, manifest.index,
                              f"failed authentication: it was edited, truncated or swapped; {_FIX}") from None
        return manifest, key, _parse_index(path, manifest.index, plaintext)
    raise AssertionError("unreachable")


def _manifest_changed(path: Path, manifest: _Manifest) -> bool:
    """Whether the manifest on disk differs from ``manifest`` (another writer committed)."""
    try:
        return _read_manifest(path) != manifest
    except VaultError:
        return False


def _write_failed(vault: Path, exc: OSError, *, created: bool) -> VaultError:
    outcome = "nothing was written" if created else "the vault is unchanged"
    return VaultError(f"{vault}: could not write the vault ({exc.strerror or exc}); {outcome}")
