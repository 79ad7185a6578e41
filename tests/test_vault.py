"""The encrypted vault: round trips, every error message, atomic writes, cohort storage and CLI.

Real AES-GCM and scrypt throughout (no mocks of cryptography). After every failure the vault's
files are compared byte for byte with a snapshot taken before: a failed open, read, verify or
refused write changes nothing.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import client.vault as vault_mod
from client.cohort_store import SUMMARY_ROLE, inspect_vault, load_cohort, save_cohort
from client.vault import (
    RESERVED_ROLES,
    KeySource,
    Vault,
    VaultError,
    WrongKeyError,
    generate_key_file,
)
from client.vault_cli import register
from common.cohort import ClinicalTable, Cohort, FeatureMatrix

# ---------------------------------------------------------------------------------------------
# Helpers


def tree(root: Path) -> dict[str, bytes | None]:
    """Every file (bytes) and folder (None) under ``root``, hidden ones included."""
    out: dict[str, bytes | None] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root) + "/"] = None
        for f in filenames:
            out[os.path.relpath(os.path.join(dirpath, f), root)] = Path(dirpath, f).read_bytes()
    return out


def blob_file(path: Path, role: str, key: KeySource) -> Path:
    """The file holding ``role``'s blob (read from the encrypted index)."""
    return path / Vault.open(path, key)._entries[role].file


def assert_fails(match: str, call: Callable[[], object], *, unchanged: Path) -> VaultError:
    """``call`` raises a one-line VaultError matching ``match`` and ``unchanged`` stays byte-identical."""
    before = tree(unchanged)
    with pytest.raises(VaultError, match=match) as info:
        call()
    assert "\n" not in str(info.value)
    assert tree(unchanged) == before
    return info.value


def contents(path: Path, key: KeySource) -> dict[str, bytes]:
    v = Vault.open(path, key)
    return {role: v.read(role) for role in v.roles}


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[KeySource, KeySource]:
    """Two different raw keys (module-scoped so hypothesis tests can share them)."""
    d = tmp_path_factory.mktemp("keys")
    return (KeySource.from_key_file(generate_key_file(d / "a.key")),
            KeySource.from_key_file(generate_key_file(d / "b.key")))


@pytest.fixture
def key(keys: tuple[KeySource, KeySource]) -> KeySource:
    return keys[0]


@pytest.fixture
def vault(tmp_path: Path, key: KeySource) -> Path:
    """A small vault with three blobs."""
    path = tmp_path / "vault"
    Vault.create(path, key, {"cohort/omics": b"omics " * 50, "cohort/meta": b"{}", "model/forest": b"trees" * 9})
    return path


roles = st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=24).filter(
    lambda r: r not in RESERVED_ROLES)
blob_maps = st.dictionaries(roles, st.binary(max_size=300), max_size=6)

# ---------------------------------------------------------------------------------------------
# Round trips (property tests)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(first=blob_maps, second=blob_maps, data=st.data())
def test_round_trip_create_update_rekey(keys: tuple[KeySource, KeySource], first: dict[str, bytes],
                                        second: dict[str, bytes], data: st.DataObject) -> None:
    old, new = keys
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "v"
        Vault.create(path, old, first)
        assert contents(path, old) == first
        remove = data.draw(st.lists(st.sampled_from(sorted(first)), unique=True) if first else st.just([]))
        remove = [r for r in remove if r not in second]
        Vault.open(path, old).update(put=second, remove=remove)
        expected = {**{r: b for r, b in first.items() if r not in remove}, **second}
        assert contents(path, old) == expected
        Vault.open(path, old).rekey(new)
        assert contents(path, new) == expected
        assert Vault.open(path, new).verify()["blobs"] == len(expected)
        with pytest.raises(WrongKeyError):
            Vault.open(path, old)
        # Exactly the manifest, the index and one file per role: nothing stale is left behind.
        assert sorted(os.listdir(path)) == sorted(["manifest.json", Vault.open(path, new)._manifest.index,
                                                   *(e.file for e in Vault.open(path, new)._entries.values())])


@settings(max_examples=5, deadline=None)
@given(blobs=blob_maps, words=st.text(min_size=1, max_size=40), other=st.text(min_size=1, max_size=40))
def test_round_trip_with_passphrases(blobs: dict[str, bytes], words: str, other: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "v"
        Vault.create(path, KeySource.from_passphrase(words), blobs)
        # A fresh KeySource: the key is re-derived from the salt in the manifest.
        assert contents(path, KeySource.from_passphrase(words)) == blobs
        Vault.open(path, KeySource.from_passphrase(words)).rekey(KeySource.from_passphrase(other))
        assert contents(path, KeySource.from_passphrase(other)) == blobs


def test_create_with_overwrite_holds_exactly_the_new_blobs(vault: Path, key: KeySource) -> None:
    old_files = set(os.listdir(vault))
    Vault.create(vault, key, {"cohort/omics": b"new", "x": b""}, overwrite=True)
    assert contents(vault, key) == {"cohort/omics": b"new", "x": b""}
    assert not old_files & set(os.listdir(vault)) - {"manifest.json"}


def test_manifest_records_format_and_kdf(tmp_path: Path, key: KeySource) -> None:
    Vault.create(tmp_path / "raw", key, {"a": b"1"})
    Vault.create(tmp_path / "pw", KeySource.from_passphrase("correct horse"), {"a": b"1"})
    raw = json.loads((tmp_path / "raw" / "manifest.json").read_text())
    pw = json.loads((tmp_path / "pw" / "manifest.json").read_text())
    assert raw["format"] == "genofed-vault" and raw["version"] == 1 and raw["kdf"] == {"kind": "raw"}
    assert pw["kdf"]["kind"] == "scrypt" and (pw["kdf"]["n"], pw["kdf"]["r"], pw["kdf"]["p"]) == (2**15, 8, 1)
    assert len(vault_mod.base64.b64decode(pw["kdf"]["salt"])) == 16
    assert (tmp_path / "raw" / raw["index"]).is_file()
    # Blob files: nonce || ciphertext || tag, owner-only, named by role slug.
    (name,) = [n for n in os.listdir(tmp_path / "raw") if n.startswith("a.")]
    assert (tmp_path / "raw" / name).stat().st_size == 12 + 1 + 16
    assert stat.S_IMODE((tmp_path / "raw" / name).stat().st_mode) == 0o600


def test_blob_role_is_bound_as_associated_data(key: KeySource) -> None:
    raw = key.derive({"kind": "raw"}, vault="v")
    sealed = vault_mod._seal(raw, "cohort/omics", b"data")
    assert vault_mod._open_sealed(raw, "cohort/omics", sealed) == b"data"
    with pytest.raises(vault_mod.InvalidTag):
        vault_mod._open_sealed(raw, "cohort/clinical", sealed)


def test_update_and_read_prefix(vault: Path, key: KeySource) -> None:
    v = Vault.open(vault, key)
    v.update(put={"cohort/sequences": b"ACGT"}, remove=["cohort/meta", "not-there"])
    assert v.read_prefix("cohort/") == {"cohort/omics": b"omics " * 50, "cohort/sequences": b"ACGT"}
    assert v.roles == ["cohort/omics", "cohort/sequences", "model/forest"]


def test_reader_sees_a_commit_made_by_another_handle(vault: Path, key: KeySource) -> None:
    reader = Vault.open(vault, key)
    Vault.open(vault, key).update(put={"cohort/omics": b"replaced"})
    assert reader.read("cohort/omics") == b"replaced"  # its old file is gone: it reloads the index


def test_update_refuses_a_role_both_put_and_removed(vault: Path, key: KeySource) -> None:
    assert_fails(r"role 'a' is both stored and removed", lambda: Vault.open(vault, key).update({"a": b""}, ["a"]),
                 unchanged=vault)


@pytest.mark.parametrize("role", ["", "index", "key-check", "a\nb"])
def test_bad_roles_are_refused(tmp_path: Path, key: KeySource, role: str) -> None:
    with pytest.raises(VaultError, match="role"):
        Vault.create(tmp_path / "v", key, {role: b""})
    assert not (tmp_path / "v").exists()


# ---------------------------------------------------------------------------------------------
# Keys


def test_key_file_is_32_random_bytes_with_mode_0600(tmp_path: Path) -> None:
    a, b = generate_key_file(tmp_path / "a"), generate_key_file(tmp_path / "b")
    assert stat.S_IMODE(a.stat().st_mode) == 0o600
    assert len(a.read_bytes()) == 32 and a.read_bytes() != b.read_bytes()


def test_keygen_refuses_an_existing_file(tmp_path: Path) -> None:
    path = generate_key_file(tmp_path / "key")
    assert_fails(r"key: already exists; a key file is never overwritten", lambda: generate_key_file(path),
                 unchanged=tmp_path)


def test_keygen_needs_an_existing_folder(tmp_path: Path) -> None:
    assert_fails(r"folder .*nope does not exist; create it first", lambda: generate_key_file(tmp_path / "nope" / "k"),
                 unchanged=tmp_path)


def test_wrong_key_size(tmp_path: Path) -> None:
    (tmp_path / "short.key").write_bytes(b"x" * 31)
    (tmp_path / "short.key").chmod(0o600)
    assert_fails(r"short\.key: key file is 31 bytes, expected 32; pass the file written by `genofed keygen`",
                 lambda: KeySource.from_key_file(tmp_path / "short.key"), unchanged=tmp_path)


def test_a_key_or_passphrase_file_others_can_read_is_refused_before_it_is_read(tmp_path: Path,
                                                                              capsys: pytest.CaptureFixture) -> None:
    from common.keyfiles import KeyFilePermissionError

    key = generate_key_file(tmp_path / "key")
    Vault.create(tmp_path / "v", KeySource.from_key_file(key), {})
    key.chmod(0o644)
    before = tree(tmp_path / "v")
    with pytest.raises(KeyFilePermissionError, match=r"key: vault key file is accessible by other users \(mode "
                                                     r"0644\); refusing to use it: run `chmod 600 .*key`"):
        KeySource.from_key_file(key)
    from simulations.cli import main as genofed

    assert genofed(["vault", "inspect", str(tmp_path / "v"), "--key-file", str(key)]) != 0
    err = capsys.readouterr().err.strip()
    assert "vault key file is accessible by other users" in err and "\n" not in err and "Traceback" not in err
    (tmp_path / "pw").write_text("a long passphrase\n")
    (tmp_path / "pw").chmod(0o640)
    with pytest.raises(KeyFilePermissionError, match=r"pw: vault passphrase file is accessible by other users"):
        KeySource.from_passphrase_file(tmp_path / "pw")
    assert tree(tmp_path / "v") == before  # nothing was opened or written
    key.chmod(0o600)
    assert Vault.open(tmp_path / "v", KeySource.from_key_file(key)).roles is not None


def test_missing_key_file(tmp_path: Path) -> None:
    assert_fails(r"absent\.key: key file not found; pass the key file the vault was created with",
                 lambda: KeySource.from_key_file(tmp_path / "absent.key"), unchanged=tmp_path)


def test_empty_passphrase_is_refused(tmp_path: Path) -> None:
    with pytest.raises(VaultError, match="passphrase is empty"):
        KeySource.from_passphrase("")
    (tmp_path / "pw").write_text("\n")
    (tmp_path / "pw").chmod(0o600)
    assert_fails(r"pw: passphrase file is empty", lambda: KeySource.from_passphrase_file(tmp_path / "pw"),
                 unchanged=tmp_path)


def test_passphrase_file_ignores_one_trailing_newline(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("s3cret words\n")
    (tmp_path / "pw").chmod(0o600)
    Vault.create(tmp_path / "v", KeySource.from_passphrase_file(tmp_path / "pw"), {"a": b"1"})
    assert contents(tmp_path / "v", KeySource.from_passphrase("s3cret words")) == {"a": b"1"}


def test_key_source_repr_hides_the_secret() -> None:
    assert "hunter2" not in repr(KeySource.from_passphrase("hunter2"))


# ---------------------------------------------------------------------------------------------
# Every failure: one line, names the vault and the file, changes nothing


def test_wrong_key(vault: Path, keys: tuple[KeySource, KeySource]) -> None:
    assert_fails(rf"^{vault}: wrong key \(key check failed\); use the key file this vault was created with$",
                 lambda: Vault.open(vault, keys[1]), unchanged=vault.parent)


def test_wrong_passphrase_and_wrong_kind_of_key(tmp_path: Path, key: KeySource) -> None:
    path = tmp_path / "v"
    Vault.create(path, KeySource.from_passphrase("right"), {"a": b"1"})
    assert_fails(r"wrong passphrase \(key check failed\); use the passphrase this vault was created with",
                 lambda: Vault.open(path, KeySource.from_passphrase("wrong")), unchanged=tmp_path)
    assert_fails(r"locked with a passphrase, not a key file; pass --passphrase-file",
                 lambda: Vault.open(path, key), unchanged=tmp_path)


def test_edited_blob_names_the_blob(vault: Path, key: KeySource) -> None:
    f = blob_file(vault, "cohort/omics", key)
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    msg = rf"^{vault}: blob 'cohort/omics' \({f.name}\) failed authentication: it was edited, truncated or " \
          r"swapped; restore it from backup$"
    v = Vault.open(vault, key)  # the manifest and index are intact
    assert v.read("model/forest") == b"trees" * 9
    assert_fails(msg, lambda: v.read("cohort/omics"), unchanged=vault.parent)
    assert_fails(msg, lambda: Vault.open(vault, key).verify(), unchanged=vault.parent)


def test_truncated_blob_names_the_blob(vault: Path, key: KeySource) -> None:
    f = blob_file(vault, "cohort/omics", key)
    size = f.stat().st_size
    f.write_bytes(f.read_bytes()[:-10])
    assert_fails(rf"blob 'cohort/omics' \({f.name}\) has {size - 10} bytes, {size} expected: it was truncated, "
                 r"extended or swapped; restore it from backup", lambda: Vault.open(vault, key).verify(),
                 unchanged=vault.parent)


@pytest.mark.parametrize("same_size", [True, False])
def test_swapped_blobs_name_a_blob(tmp_path: Path, key: KeySource, same_size: bool) -> None:
    path = tmp_path / "v"
    Vault.create(path, key, {"a": b"A" * 40, "b": b"B" * (40 if same_size else 41)})
    fa, fb = blob_file(path, "a", key), blob_file(path, "b", key)
    os.rename(fa, path / "tmp")
    os.rename(fb, fa)
    os.rename(path / "tmp", fb)
    reason = "failed authentication" if same_size else "has 69 bytes, 68 expected"
    assert_fails(rf"blob 'a' \({fa.name}\) {reason}", lambda: Vault.open(path, key).read("a"), unchanged=tmp_path)
    assert_fails(rf"blob 'a' \({fa.name}\)", lambda: Vault.open(path, key).verify(), unchanged=tmp_path)


def test_deleted_blob_names_the_blob(vault: Path, key: KeySource) -> None:
    f = blob_file(vault, "model/forest", key)
    f.unlink()
    msg = rf"blob 'model/forest' \({f.name}\) is missing: it was deleted or moved; restore it from backup"
    assert_fails(msg, lambda: Vault.open(vault, key).read("model/forest"), unchanged=vault.parent)
    assert_fails(msg, lambda: Vault.open(vault, key).verify(), unchanged=vault.parent)


def test_deleted_or_edited_index(vault: Path, key: KeySource) -> None:
    index = vault / json.loads((vault / "manifest.json").read_text())["index"]
    index.write_bytes(index.read_bytes()[:-1])
    assert_fails(rf"blob 'index' \({index.name}\) failed authentication", lambda: Vault.open(vault, key),
                 unchanged=vault.parent)
    index.unlink()
    assert_fails(rf"blob 'index' \({index.name}\) is missing", lambda: Vault.open(vault, key), unchanged=vault.parent)


def test_truncated_manifest(vault: Path, key: KeySource) -> None:
    manifest = vault / "manifest.json"
    manifest.write_bytes(manifest.read_bytes()[:40])
    assert_fails(rf"^{vault}/manifest.json is not a genofed vault manifest \(truncated or not JSON: .*\); "
                 r"restore it from backup$", lambda: Vault.open(vault, key), unchanged=vault.parent)
    manifest.write_bytes(b"")
    assert_fails(r"manifest.json is not a genofed vault manifest \(empty\)", lambda: Vault.open(vault, key),
                 unchanged=vault.parent)


@pytest.mark.parametrize(("field", "value", "reason"), [
    ("format", "zip", "format is not 'genofed-vault'"),
    ("index", "../../etc/passwd", "index '../../etc/passwd' is not a vault blob name"),
    ("kdf", {"kind": "scrypt", "salt": "AAAAAAAAAAAAAAAAAAAAAA==", "n": 2**30, "r": 8, "p": 1},
     "kdf scrypt parameters are out of range"),
    ("key_check", "!!", "key_check is not base64"),
])
def test_tampered_manifest_fields(vault: Path, key: KeySource, field: str, value: object, reason: str) -> None:
    doc = json.loads((vault / "manifest.json").read_text())
    doc[field] = value
    (vault / "manifest.json").write_text(json.dumps(doc))
    assert_fails(rf"manifest.json is not a genofed vault manifest \({reason}", lambda: Vault.open(vault, key),
                 unchanged=vault.parent)


def test_newer_format_version(vault: Path, key: KeySource) -> None:
    doc = json.loads((vault / "manifest.json").read_text())
    (vault / "manifest.json").write_text(json.dumps({**doc, "version": 2}))
    assert_fails(r"vault format version 2 was written by a newer genofed .*; upgrade genofed",
                 lambda: Vault.open(vault, key), unchanged=vault.parent)


def test_not_a_vault(tmp_path: Path, key: KeySource) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    for name, what in (("empty", r"no manifest\.json"), ("missing", "no such folder"),
                       ("file", "it is a file, not a folder")):
        assert_fails(rf"^{tmp_path / name}: not a vault \({what}\); create one with `genofed vault import`$",
                     lambda name=name: Vault.open(tmp_path / name, key), unchanged=tmp_path)


def test_unknown_role(vault: Path, key: KeySource) -> None:
    assert_fails(r"no blob with role 'model/cnn' \(stored roles: cohort/meta, cohort/omics, model/forest\)",
                 lambda: Vault.open(vault, key).read("model/cnn"), unchanged=vault.parent)


def test_overwrite_needs_force(vault: Path, key: KeySource) -> None:
    assert_fails(r"a vault already exists here; pass --force \(overwrite=True\)",
                 lambda: Vault.create(vault, key, {"a": b""}), unchanged=vault.parent)


def test_overwrite_with_another_key_is_refused(vault: Path, keys: tuple[KeySource, KeySource]) -> None:
    assert_fails(r"wrong key \(key check failed\).*; an existing vault is only overwritten with its own key",
                 lambda: Vault.create(vault, keys[1], {"a": b""}, overwrite=True), unchanged=vault.parent)


def test_create_refuses_a_non_vault_folder(tmp_path: Path, key: KeySource) -> None:
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "notes.txt").write_text("mine")
    assert_fails(r"stuff: exists and is not a vault; choose another path or remove it",
                 lambda: Vault.create(tmp_path / "stuff", key, {"a": b""}, overwrite=True), unchanged=tmp_path)


def test_create_into_an_empty_folder(tmp_path: Path, key: KeySource) -> None:
    (tmp_path / "v").mkdir()
    Vault.create(tmp_path / "v", key, {"a": b"1"})
    assert contents(tmp_path / "v", key) == {"a": b"1"}


def test_rekey_old_key_stops_working(vault: Path, keys: tuple[KeySource, KeySource]) -> None:
    old, new = keys
    before = contents(vault, old)
    old_files = set(os.listdir(vault)) - {"manifest.json"}
    Vault.open(vault, old).rekey(new)
    assert contents(vault, new) == before
    assert not old_files & set(os.listdir(vault))  # every blob was re-encrypted to a new file
    assert_fails("wrong key", lambda: Vault.open(vault, old), unchanged=vault.parent)


def test_rekey_refuses_a_damaged_vault_and_changes_nothing(vault: Path, keys: tuple[KeySource, KeySource]) -> None:
    f = blob_file(vault, "model/forest", keys[0])
    f.write_bytes(f.read_bytes()[:-1] + bytes([f.read_bytes()[-1] ^ 1]))
    assert_fails(r"blob 'model/forest' .* failed authentication", lambda: Vault.open(vault, keys[0]).rekey(keys[1]),
                 unchanged=vault.parent)


def test_verify_counts_and_warns_about_extra_files(vault: Path, key: KeySource) -> None:
    (vault / "stray.0123456789abcdef.gfv").write_bytes(b"x" * 40)
    (vault / "README").write_text("hello")
    before = tree(vault)
    result = Vault.open(vault, key).verify()
    assert tree(vault) == before
    assert result["blobs"] == 3
    assert result["plaintext_bytes"] == 300 + 2 + 45
    assert result["bytes"] == 300 + 2 + 45 + 3 * 28
    assert any("unreferenced blob file stray.0123456789abcdef.gfv" in w for w in result["warnings"])
    assert any("unknown file README" in w for w in result["warnings"])
    # The next update removes its own kind of leftovers, never a file it does not recognise.
    Vault.open(vault, key).update(put={"x": b""})
    assert not (vault / "stray.0123456789abcdef.gfv").exists() and (vault / "README").exists()


# ---------------------------------------------------------------------------------------------
# Interrupted writes: fail at every disk step, the vault is the old one, the new one, or absent


class Faults:
    """Wrap the vault's disk primitives; the ``fail_at``-th call (0-based) raises EIO."""

    PRIMITIVES = ("_write_new", "_replace", "_rename_dir", "_fsync_dir", "_unlink")

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fail_at: int | None) -> None:
        self.calls = 0
        self.fail_at = fail_at
        self.failed = False
        for name in self.PRIMITIVES:
            monkeypatch.setattr(vault_mod, name, self._wrap(getattr(vault_mod, name)))

    def _wrap(self, real: Callable[..., None]) -> Callable[..., None]:
        def step(*args: object) -> None:
            n, self.calls = self.calls, self.calls + 1
            if n == self.fail_at:
                self.failed = True
                raise OSError(errno.EIO, "injected I/O error")
            real(*args)
        return step


OLD = {"cohort/omics": b"old omics" * 100, "cohort/meta": b"old meta", "model/forest": b"forest"}
NEW = {"cohort/omics": b"new omics" * 120, "cohort/clinical": b"new clinical", "cohort/meta": b"new meta"}


def _run_create(path: Path, keys: tuple[KeySource, KeySource]) -> None:
    Vault.create(path, keys[0], NEW)


def _run_overwrite(path: Path, keys: tuple[KeySource, KeySource]) -> None:
    Vault.create(path, keys[0], NEW, overwrite=True)


def _run_update(path: Path, keys: tuple[KeySource, KeySource]) -> None:
    Vault.open(path, keys[0]).update(put={k: v for k, v in NEW.items() if k != "cohort/meta"},
                                     remove=["model/forest"])


def _run_rekey(path: Path, keys: tuple[KeySource, KeySource]) -> None:
    Vault.open(path, keys[0]).rekey(keys[1])


UPDATED = {**{k: v for k, v in NEW.items() if k != "cohort/meta"}, "cohort/meta": OLD["cohort/meta"]}
SCENARIOS = {  # name: (operation, vault before, acceptable outcomes by key index)
    "create": (_run_create, None, [(0, NEW)]),
    "overwrite": (_run_overwrite, OLD, [(0, OLD), (0, NEW)]),
    "update": (_run_update, OLD, [(0, OLD), (0, UPDATED)]),
    "rekey": (_run_rekey, OLD, [(0, OLD), (1, OLD)]),
}


def _state(path: Path, keys: tuple[KeySource, KeySource]) -> tuple[int, dict[str, bytes]] | None:
    """(index of the key that opens it, its contents), or None if there is no vault; verify must pass."""
    if not (path / "manifest.json").exists():
        with pytest.raises(VaultError, match="not a vault"):
            Vault.open(path, keys[0])
        return None
    for i, k in enumerate(keys):
        try:
            v = Vault.open(path, k)
        except WrongKeyError:
            continue
        v.verify()
        return i, {role: v.read(role) for role in v.roles}
    raise AssertionError("no key opens the vault")


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_failure_at_every_step_leaves_old_or_new(tmp_path: Path, keys: tuple[KeySource, KeySource],
                                                 monkeypatch: pytest.MonkeyPatch, scenario: str) -> None:
    operation, before, outcomes = SCENARIOS[scenario]
    step = 0
    while True:
        path = tmp_path / f"step{step}" / "vault"
        path.parent.mkdir()
        if before is not None:
            Vault.create(path, keys[0], before)
        with monkeypatch.context() as m:
            faults = Faults(m, fail_at=step)
            try:
                operation(path, keys)
            except VaultError as exc:
                assert faults.failed and "injected I/O error" in str(exc) and "\n" not in str(exc)
        state = _state(path, keys)
        allowed = outcomes + ([(0, before)] if before is not None else [None])
        assert state in allowed, f"step {step}: {state}"
        assert not [p for p in os.listdir(path.parent) if ".partial-" in p]  # failed creates clean up
        if not faults.failed:  # the operation ran to the end: every step has been tried
            assert state == outcomes[-1]
            break
        step += 1
    assert step >= 6


def test_partial_leftovers_are_ignored_and_cleaned(tmp_path: Path, key: KeySource) -> None:
    partial = tmp_path / ".vault.partial-0123456789abcdef"
    partial.mkdir()
    (partial / "a.0123456789abcdef.gfv").write_bytes(b"junk")
    with pytest.raises(VaultError, match="not a vault"):
        Vault.open(tmp_path / "vault", key)
    Vault.create(tmp_path / "vault", key, {"a": b"1"})
    assert sorted(os.listdir(tmp_path)) == ["vault"]


def test_a_concurrent_writer_is_waited_for(vault: Path, key: KeySource, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vault_mod, "LOCK_WAIT_S", 0.1)
    with vault_mod.directory_lock(vault, wait_s=0):  # another writer holds the lock
        assert_fails("another process is writing this vault; try again when it has finished",
                     lambda: Vault.open(vault, key).update({"a": b""}), unchanged=vault.parent)


def test_concurrent_writers_lose_nothing(vault: Path, key: KeySource) -> None:
    errors: list[BaseException] = []

    def writer(name: str) -> None:
        try:
            v = Vault.open(vault, key)  # opened once: each update must rebuild on the latest index
            for i in range(8):
                v.update(put={f"{name}/{i}": name.encode() * 100}, remove=[f"{name}/{i - 1}"] if i % 2 else [])
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in ("x", "y")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    expected = {f"{n}/{i}" for n in ("x", "y") for i in (1, 3, 5, 7)} | {"cohort/meta", "cohort/omics", "model/forest"}
    assert set(Vault.open(vault, key).roles) == expected
    assert Vault.open(vault, key).verify()["warnings"] == []


WRITER = """
import sys
from client.vault import KeySource, Vault
v = Vault.open(sys.argv[1], KeySource.from_key_file(sys.argv[2]))
for i in range(int(sys.argv[3])):
    v.update(put={"cohort/omics": bytes([i % 256]) * 20000, "model/forest": bytes([i % 256]) * 10})
"""


def test_readers_never_fail_while_another_process_writes(tmp_path: Path) -> None:
    key_file = generate_key_file(tmp_path / "key")
    key = KeySource.from_key_file(key_file)
    Vault.create(tmp_path / "v", key, {"cohort/omics": b"", "model/forest": b""})
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    child = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path / "v"), str(key_file), "300"], env=env)
    reads = 0
    while child.poll() is None:
        v = Vault.open(tmp_path / "v", key)  # may race with a commit that removes the index it read
        v.verify()
        omics, forest = v.read("cohort/omics"), v.read("model/forest")
        assert len(set(omics)) <= 1 and len(set(forest)) <= 1
        reads += 1
    assert child.returncode == 0 and reads > 10


# ---------------------------------------------------------------------------------------------
# A cohort in a vault


def small_cohort(*, events: bool = True) -> Cohort:
    """Six patients with every modality, missing values of every kind included."""
    rng = np.random.default_rng(0)
    n = 6
    omics = rng.normal(size=(n, 3))
    omics[1, 2] = np.nan
    numeric = np.array([[61.0], [np.nan], [45.5], [70.0], [38.0], [52.25]])
    return Cohort(
        patient_ids=np.array([f"P{i:03d}" for i in range(n)]),
        labels=np.array([0, 1, 0, 1, 1, 0], dtype=np.int64),
        classes=("control", "case"),
        split=np.array([0, 0, 0, 0, 1, 2], dtype=np.int8),
        schema={"schema-version": 1, "label": {"classes": ["control", "case"], "positive": ["case"]},
                "modalities": ["sequences", "variants", "omics", "clinical"] + (["events"] if events else [])},
        groups=np.array(["f1", "f1", "f2", "f2", "f3", "f3"]),
        sequences=rng.integers(0, 5, size=(n, 12)).astype(np.uint8),
        variants=FeatureMatrix(values=np.array([[0, 1], [2, -1], [1, 1], [0, 0], [2, 2], [1, 0]], dtype=np.int8),
                               features=("1:100:A:G", "1:200:C:T")),
        omics=FeatureMatrix(values=omics, features=("BRCA1", "TP53", "ESR1")),
        clinical=ClinicalTable(numeric=numeric, numeric_names=("age",),
                               categorical=np.array([[0], [1], [-1], [1], [0], [0]], dtype=np.int16),
                               categorical_names=("sex",), categories={"sex": ("F", "M")}),
        events=FeatureMatrix(values=np.array([[1, 0], [0, 0], [np.nan, np.nan], [1, 1], [0, 1], [0, 0]],
                                             dtype=np.float32), features=("PIK3CA", "GATA3")) if events else None,
        report={"ambiguous_bases": 3},
    )


def assert_same_cohort(a: Cohort, b: Cohort) -> None:
    for name in ("patient_ids", "labels", "split", "groups", "sequences"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and np.array_equal(x, y), name
    for name in ("variants", "omics", "events"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.features == y.features and x.values.dtype == y.values.dtype
            assert np.array_equal(x.values, y.values, equal_nan=x.values.dtype.kind == "f"), name
    ca, cb = a.clinical, b.clinical
    assert ca.numeric_names == cb.numeric_names and ca.categorical_names == cb.categorical_names
    assert ca.categories == cb.categories
    assert np.array_equal(ca.numeric, cb.numeric, equal_nan=True) and np.array_equal(ca.categorical, cb.categorical)
    assert ca.categorical.dtype == cb.categorical.dtype
    assert (a.classes, a.schema, a.report, a.modalities) == (b.classes, b.schema, b.report, b.modalities)
    assert a.schema_hash == b.schema_hash


def test_save_and_load_cohort_round_trip(tmp_path: Path, key: KeySource) -> None:
    cohort = small_cohort()
    vault = save_cohort(tmp_path / "vault", cohort, key)
    assert SUMMARY_ROLE in vault.roles
    assert_same_cohort(load_cohort(tmp_path / "vault", key), cohort)
    assert_same_cohort(load_cohort(vault), cohort)
    # Nothing in the folder is plaintext: no patient id appears in any file.
    for data in tree(tmp_path).values():
        assert data is None or b"P000" not in data


def test_save_cohort_overwrite_replaces_cohort_roles_and_keeps_others(tmp_path: Path, key: KeySource) -> None:
    path = tmp_path / "vault"
    save_cohort(path, small_cohort(), key).update(put={"model/forest": b"fitted"})
    assert_fails("a vault already exists here; pass --force", lambda: save_cohort(path, small_cohort(), key),
                 unchanged=tmp_path)
    save_cohort(path, small_cohort(events=False), key, overwrite=True)
    v = Vault.open(path, key)
    assert "cohort/events" not in v.roles and v.read("model/forest") == b"fitted"
    assert load_cohort(v).events is None


def test_inspect_vault_shows_counts_only(tmp_path: Path, key: KeySource) -> None:
    save_cohort(tmp_path / "vault", small_cohort(), key)
    info = inspect_vault(tmp_path / "vault", key)
    assert info["cohort"]["patients"] == 6 and info["cohort"]["classes"] == {"control": 3, "case": 3}
    assert info["cohort"]["splits"]["train"]["patients"] == 4
    assert info["cohort"]["modalities"]["omics"] == {"features": 3}
    assert info["cohort"]["modalities"]["clinical"] == {"numeric": 1, "categorical": 1}
    assert info["cohort"]["schema_hash"] == small_cohort().schema_hash
    assert info["vault"]["kdf"] == "raw" and info["vault"]["format"] == "genofed-vault"
    # 8 cohort blobs, plus the site's privacy policy and ledger, created at import
    assert info["vault"]["blobs"] == len(info["vault"]["roles"]) == 10
    assert {"privacy/policy", "privacy/ledger"} <= set(info["vault"]["roles"])
    # Missing values per column, as counts (the site's own screen: column names, never values or ids).
    assert info["cohort"]["missing"] == {"variants": {"1:200:C:T": 1}, "omics": {"ESR1": 1},
                                         "events": {"PIK3CA": 1, "GATA3": 1}, "clinical": {"age": 1, "sex": 1}}
    text = json.dumps(info)
    assert "P00" not in text and "BRCA1" not in text and "f1" not in text and "61" not in text


def test_load_cohort_from_a_vault_without_one(vault: Path, key: KeySource) -> None:
    Vault.open(vault, key).update(remove=["cohort/meta"])
    assert_fails(r"holds no cohort \(no 'cohort/meta' blob\)", lambda: load_cohort(vault, key), unchanged=vault.parent)


# ---------------------------------------------------------------------------------------------
# Command line


def cli(*argv: str | Path) -> int:
    parser = argparse.ArgumentParser(prog="genofed")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args([str(a) for a in argv])
    return args.func(args)


def test_cli_keygen_verify_inspect_rekey(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("keygen", "--out", tmp_path / "key") == 0
    assert "back it up" in capsys.readouterr().out
    assert stat.S_IMODE((tmp_path / "key").stat().st_mode) == 0o600
    save_cohort(tmp_path / "vault", small_cohort(), KeySource.from_key_file(tmp_path / "key"))

    assert cli("vault", "verify", tmp_path / "vault", "--key-file", tmp_path / "key") == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{tmp_path / 'vault'}: 10 blobs authenticated (") and out.rstrip().endswith(" bytes)")

    assert cli("vault", "inspect", tmp_path / "vault", "--key-file", tmp_path / "key", "--json") == 0
    assert json.loads(capsys.readouterr().out)["cohort"]["patients"] == 6
    assert cli("vault", "inspect", tmp_path / "vault", "--key-file", tmp_path / "key") == 0
    table = capsys.readouterr().out
    assert "6 patients" in table and "validation" in table and "P000" not in table
    assert "missing values in clinical (patients without a value, of 6): age 1 (17%), sex 1 (17%)" in table

    (tmp_path / "pw").write_text("a long passphrase\n")
    (tmp_path / "pw").chmod(0o600)
    assert cli("vault", "rekey", tmp_path / "vault", "--key-file", tmp_path / "key",
               "--new-passphrase-file", tmp_path / "pw") == 0
    assert "the old one no longer opens it" in capsys.readouterr().out
    assert cli("vault", "verify", tmp_path / "vault", "--passphrase-file", tmp_path / "pw") == 0
    with pytest.raises(VaultError, match="locked with a passphrase"):
        cli("vault", "verify", tmp_path / "vault", "--key-file", tmp_path / "key")


def test_cli_key_options_are_exclusive_and_required(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (("vault", "verify", "v"), ("vault", "verify", "v", "--key-file", "k", "--passphrase-file", "p")):
        with pytest.raises(SystemExit) as info:
            cli(*argv)
        assert info.value.code == 2
    capsys.readouterr()


def test_cli_help_is_useful(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, words in ((("keygen",), "back it up"), (("vault",), "authenticate every blob"),
                        (("vault", "import"), "Nothing is written unless every file is valid"),
                        (("vault", "rekey"), "--new-passphrase-file")):
        with pytest.raises(SystemExit):
            cli(*argv, "--help")
        assert words in capsys.readouterr().out


SPEC = """\
[label]
file = "clinical.csv"
column = "outcome"
classes = ["control", "case"]

[modalities.omics]
file = "omics.csv"
"""


def test_cli_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import client.importers

    seen = []
    monkeypatch.setattr(client.importers, "import_cohort", lambda spec: seen.append(spec) or small_cohort(),
                        raising=False)
    (tmp_path / "spec.toml").write_text(SPEC)
    generate_key_file(tmp_path / "key")
    argv = ("vault", "import", "--spec", tmp_path / "spec.toml", "--out", tmp_path / "vault",
            "--key-file", tmp_path / "key")
    assert cli(*argv) == 0
    assert "imported 6 patients (control 3, case 3)" in capsys.readouterr().out
    assert seen[0].label.column == "outcome"
    assert_fails("a vault already exists here; pass --force", lambda: cli(*argv), unchanged=tmp_path)
    assert len(seen) == 1  # refused before importing anything
    assert cli(*argv, "--force") == 0
    generate_key_file(tmp_path / "other")
    assert_fails("wrong key", lambda: cli(*argv[:-1], tmp_path / "other", "--force"), unchanged=tmp_path)
    assert_same_cohort(load_cohort(tmp_path / "vault", KeySource.from_key_file(tmp_path / "key")), small_cohort())


# ---------------------------------------------------------------------------------------------
# Seeds derived from the key


def test_derived_seeds_are_stable_per_key_and_label_and_differ_otherwise(
        vault: Path, keys: tuple[KeySource, KeySource], tmp_path: Path) -> None:
    import shutil

    first = Vault.open(vault, keys[0])
    seed = first.derive_seed("cnn-round|ledger-3|round-2")
    assert 0 <= seed < 2**63
    assert Vault.open(vault, keys[0]).derive_seed("cnn-round|ledger-3|round-2") == seed  # reopened
    assert first.derive_seed("cnn-round|ledger-4|round-2") != seed
    shutil.copytree(vault, tmp_path / "copy")
    assert Vault.open(tmp_path / "copy", keys[0]).derive_seed("cnn-round|ledger-3|round-2") == seed
    rekeyed = Vault.open(tmp_path / "copy", keys[0])
    rekeyed.rekey(keys[1])
    assert Vault.open(tmp_path / "copy", keys[1]).derive_seed("cnn-round|ledger-3|round-2") != seed


def test_cli_import_shows_missing_values_per_column_and_warns_of_an_empty_one(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A hospital whose export has no BMI at all: the import says so (counts and column names only)."""
    import csv

    from simulations.synthetic import write_synthetic_cohort

    write_synthetic_cohort(out=tmp_path / "c", patients=60, seed=2)
    rows = list(csv.reader((tmp_path / "c" / "clinical.csv").open()))
    col = rows[0].index("bmi")
    for row in rows[1:]:
        row[col] = ""
    with (tmp_path / "c" / "clinical.csv").open("w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    assert cli("keygen", "--out", tmp_path / "key") == 0
    assert cli("vault", "import", "--spec", tmp_path / "c" / "spec.toml", "--out", tmp_path / "v",
               "--key-file", tmp_path / "key") == 0
    out, err = capsys.readouterr()
    assert "missing values in clinical (patients without a value, of 60): bmi 60 (100%)" in out
    assert err.strip() == ("warning: clinical column 'bmi' has no values at all (60 of 60 patients missing): the "
                           "models will impute it everywhere at this site; check the export if the site does record it")
    assert cli("vault", "inspect", tmp_path / "v", "--key-file", tmp_path / "key") == 0
    assert "clinical column 'bmi' has no values at all" in capsys.readouterr().out
    assert cli("vault", "inspect", tmp_path / "v", "--key-file", tmp_path / "key", "--json") == 0
    cohort = json.loads(capsys.readouterr().out)["cohort"]
    assert cohort["missing"]["clinical"]["bmi"] == cohort["patients"] == 60


def test_inspect_counts_missing_values_of_a_vault_imported_before_they_were_stored(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An older import's summary has no missing-value counts: inspect counts them from the stored
    cohort (in memory) rather than asking for a re-import, in the table and in --json."""
    key_file = generate_key_file(tmp_path / "key")
    key = KeySource.from_key_file(key_file)
    save_cohort(tmp_path / "vault", small_cohort(), key)
    vault = Vault.open(tmp_path / "vault", key)
    summary = json.loads(vault.read(SUMMARY_ROLE))
    del summary["missing"]
    vault.update({SUMMARY_ROLE: json.dumps(summary).encode("utf-8")})
    expected = {"variants": {"1:200:C:T": 1}, "omics": {"ESR1": 1}, "events": {"PIK3CA": 1, "GATA3": 1},
                "clinical": {"age": 1, "sex": 1}}
    assert inspect_vault(tmp_path / "vault", key)["cohort"]["missing"] == expected
    assert cli("vault", "inspect", tmp_path / "vault", "--key-file", key_file, "--json") == 0
    assert json.loads(capsys.readouterr().out)["cohort"]["missing"] == expected
    assert cli("vault", "inspect", tmp_path / "vault", "--key-file", key_file) == 0
    table = capsys.readouterr().out
    assert "missing values in clinical (patients without a value, of 6): age 1 (17%), sex 1 (17%)" in table
    assert "not recorded" not in table
