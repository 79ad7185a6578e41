"""A vault writer killed with SIGKILL leaves the previous vault, the new one, or (first import) none.

Two kinds of real process death, no Python cleanup running in either:

* timed: a child writes several MB of blobs (a first create, an overwrite of an existing vault,
  a rekey) and the test kills it after a range of delays;
* at every step: the child kills itself at the k-th disk operation (each file write, fsync,
  rename, unlink), for every k, so every window between two steps is covered deterministically.

After each kill the vault is opened and verified: it must be exactly the old or the new
contents (for a rekey: the old contents under the old or the new key), or absent with "not a
vault" when there was no previous vault. A later write must then clean up what the killed
writer left behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from client.vault import KeySource, Vault, VaultError, WrongKeyError, generate_key_file

REPO = Path(__file__).resolve().parents[1]

# Shared by the child and the parent, so both build byte-identical contents from a seed.
MAKE_BLOBS = """
import random
def make_blobs(seed, count, size):
    rng = random.Random(seed)
    return {f"cohort/part{i}": rng.randbytes(size + i) for i in range(count)}
"""

CHILD = MAKE_BLOBS + """
import os, signal, sys
from pathlib import Path
import client.vault as vault_mod
from client.vault import KeySource, Vault

mode, path, key, new_key, seed, count, size, kill_at = sys.argv[1:9]
seed, count, size, kill_at = int(seed), int(count), int(size), int(kill_at)
if kill_at >= 0:
    calls = [0]
    def wrap(real):
        def step(*args):
            if calls[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            calls[0] += 1
            real(*args)
        return step
    for name in ("_write_new", "_replace", "_rename_dir", "_fsync_dir", "_unlink"):
        setattr(vault_mod, name, wrap(getattr(vault_mod, name)))
source = KeySource.from_key_file(key)
blobs = make_blobs(seed, count, size)
print("ready", flush=True)
if mode == "create":
    Vault.create(path, source, blobs)
elif mode == "overwrite":
    Vault.create(path, source, blobs, overwrite=True)
elif mode == "rekey":
    Vault.open(path, source).rekey(KeySource.from_key_file(new_key))
print("done", flush=True)
"""

_ns: dict = {}
exec(MAKE_BLOBS, _ns)
make_blobs = _ns["make_blobs"]

OLD_SEED, NEW_SEED = 1, 2
BIG = (6, 1_000_000)  # six blobs of about 1 MB: several MB per write
SMALL = (3, 1_000)


@pytest.fixture
def key_files(tmp_path: Path) -> tuple[Path, Path]:
    return generate_key_file(tmp_path / "old.key"), generate_key_file(tmp_path / "new.key")


def spawn(mode: str, path: Path, keys: tuple[Path, Path], shape: tuple[int, int], *,
          kill_at: int = -1) -> subprocess.Popen[str]:
    """Start a writer child and wait until it is about to write."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    argv = [sys.executable, "-c", CHILD, mode, str(path), str(keys[0]), str(keys[1]), str(NEW_SEED),
            str(shape[0]), str(shape[1]), str(kill_at)]
    child = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert child.stdout is not None
    line = child.stdout.readline()
    assert line == "ready\n", child.stderr.read() if child.stderr else line
    return child


def finish(child: subprocess.Popen[str]) -> bool:
    """Wait for the child; True if it completed its write, False if it was killed."""
    out, err = child.communicate(timeout=60)
    if child.returncode == -signal.SIGKILL:
        return False
    assert child.returncode == 0 and out == "done\n", err
    return True


def outcome(path: Path, keys: tuple[Path, Path]) -> tuple[str, dict[str, bytes]] | None:
    """Which key opens the vault and what it holds (verify must pass); None if there is no vault."""
    for name, key in zip(("old", "new"), keys, strict=True):
        try:
            vault = Vault.open(path, KeySource.from_key_file(key))
        except WrongKeyError:
            continue
        except VaultError as exc:
            assert "not a vault" in str(exc), str(exc)
            return None
        vault.verify()
        return name, {role: vault.read(role) for role in vault.roles}
    raise AssertionError(f"{path}: neither key opens it")


def setup(mode: str, path: Path, keys: tuple[Path, Path], shape: tuple[int, int]) -> dict[str, bytes] | None:
    if mode == "create":
        return None
    old = make_blobs(OLD_SEED, *shape)
    Vault.create(path, KeySource.from_key_file(keys[0]), old)
    return old


def allowed(mode: str, old: dict[str, bytes] | None, shape: tuple[int, int]) -> list:
    new = make_blobs(NEW_SEED, *shape)
    return {"create": [None, ("old", new)],
            "overwrite": [("old", old), ("old", new)],
            "rekey": [("old", old), ("new", old)]}[mode]


def assert_cleaned_by_next_write(mode: str, path: Path, keys: tuple[Path, Path]) -> None:
    """A later write removes the killed writer's leftovers (partial folder, orphan blobs)."""
    state = outcome(path, keys)
    key = KeySource.from_key_file(keys[0] if state is None or state[0] == "old" else keys[1])
    vault = Vault.create(path, key, {"after": b"kill"}, overwrite=True)
    assert [p.name for p in path.parent.iterdir() if ".partial-" in p.name] == []
    assert vault.verify()["warnings"] == []


@pytest.mark.parametrize("mode", ["create", "overwrite", "rekey"])
def test_sigkill_after_delays(tmp_path: Path, key_files: tuple[Path, Path], mode: str) -> None:
    killed_midway = 0
    for i, delay in enumerate((0.0, 0.002, 0.005, 0.01, 0.02, 0.05)):
        path = tmp_path / f"run{i}" / "vault"
        path.parent.mkdir()
        old = setup(mode, path, key_files, BIG)
        child = spawn(mode, path, key_files, BIG)
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        killed_midway += not finish(child)
        assert outcome(path, key_files) in allowed(mode, old, BIG), f"delay {delay}"
        assert_cleaned_by_next_write(mode, path, key_files)
    assert killed_midway >= 1  # at least one kill landed while the write was in progress


@pytest.mark.parametrize("mode", ["create", "overwrite", "rekey"])
def test_sigkill_at_every_disk_step(tmp_path: Path, key_files: tuple[Path, Path], mode: str) -> None:
    seen = set()
    for step in range(100):
        path = tmp_path / f"step{step}" / "vault"
        path.parent.mkdir()
        old = setup(mode, path, key_files, SMALL)
        completed = finish(spawn(mode, path, key_files, SMALL, kill_at=step))
        state = outcome(path, key_files)
        assert state in allowed(mode, old, SMALL), f"killed at step {step}"
        seen.add(allowed(mode, old, SMALL).index(state))
        assert_cleaned_by_next_write(mode, path, key_files)
        if completed:
            break
    else:
        raise AssertionError("the writer never completed")
    assert seen == {0, 1}  # kills landed both before and after the commit point
