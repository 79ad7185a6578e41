"""`genofed vault import` killed at any moment leaves the previous vault or none, never half of one.

The real command runs in a child process on a synthetic cohort and is killed after a range of
delays that cover start-up, parsing, encryption and the vault write. Each kill is made in two
steps: SIGSTOP, waiting until the child has stopped, then SIGKILL. While the child is stopped
nothing it does can change the disk, so what the test sees then is exactly what the kill
interrupts, with no race: a first import's hidden ``.partial-`` staging folder (the new vault
before its rename into place), or the vault folder's ``flock`` held (writers take it for a whole
update). A timed kill may miss the write, which is short next to parsing; if none of them landed
inside it, further runs are killed the moment their write is seen to begin, until one does.

After each kill the vault is absent ("not a vault") or opens, verifies, and holds one complete
cohort: the previous one (re-import with --force) or the new one. A kill inside the staging
leaves no vault and the staging folder still on disk; every step of the vault write itself is
also covered deterministically in test_vault_interrupt.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from client.cohort_store import load_cohort, save_cohort
from client.importers import import_cohort
from client.vault import KeySource, Vault, VaultError, generate_key_file
from common.durable import directory_lock
from common.spec import load_spec
from simulations.synthetic import write_synthetic_cohort

ENV = {**os.environ, "GENOFED_NO_PROGRESS": "1"}
WATCHED_RUNS = 5
"""Runs killed the moment their write begins, when no timed kill landed inside a write."""


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("import-kill")
    write_synthetic_cohort(out=root / "old", patients=300, seed=1)
    write_synthetic_cohort(out=root / "new", patients=1500, seed=2)
    return {"old": root / "old", "new": root / "new"}


def _import_cmd(spec: Path, vault: Path, key: Path, force: bool) -> list[str]:
    cmd = [sys.executable, "-m", "simulations.cli", "vault", "import", "--spec", str(spec), "--out", str(vault),
           "--key-file", str(key)]
    return cmd + (["--force"] if force else [])


def _full_run_seconds(spec: Path, tmp: Path) -> float:
    key = generate_key_file(tmp / "timing.key")
    t0 = time.perf_counter()
    subprocess.run(_import_cmd(spec, tmp / "timing-vault", key, False), check=True, env=ENV, capture_output=True)
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# Stopping, looking, killing


def _partials(vault: Path) -> list[str]:
    """Hidden ``.partial-`` siblings: a first import's vault before it is renamed into place."""
    return [p.name for p in vault.parent.iterdir() if p.name.startswith(f".{vault.name}.partial-")]


def _write_in_progress(vault: Path) -> str | None:
    """The vault write a *stopped* importer is inside: "staging" (its staging folder exists),
    "update" (it holds the vault folder's flock, held by writers for a whole update) or None.
    Taking the flock for a moment here is harmless: the importer cannot run until it is killed."""
    if _partials(vault):
        return "staging"
    if vault.is_dir():
        with directory_lock(vault, wait_s=0.0) as free:
            if not free:
                return "update"
    return None


def _stop(child: subprocess.Popen) -> bool:
    """SIGSTOP ``child`` and wait until it has stopped; False if it ended first (then reaped)."""
    if child.poll() is not None:
        return False
    os.kill(child.pid, signal.SIGSTOP)  # a process that just exited is a zombie: no error
    _, status = os.waitpid(child.pid, os.WUNTRACED)
    if os.WIFSTOPPED(status):
        return True
    child.returncode = os.waitstatus_to_exitcode(status)
    return False


@dataclass
class Kill:
    """What one run came to: whether it was killed, and inside which vault write (if any)."""

    killed: bool
    phase: str | None


def _run_and_kill(cmd: list[str], vault: Path, wait: Callable[[subprocess.Popen], None]) -> Kill:
    """Start ``cmd``, ``wait(child)``, then stop it, note the write it is inside and kill it."""
    child = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait(child)
        if not _stop(child):
            return Kill(killed=False, phase=None)
        phase = _write_in_progress(vault)
        os.kill(child.pid, signal.SIGKILL)
        return Kill(killed=True, phase=phase)
    finally:
        if child.returncode is None:
            child.kill()
        child.wait()


def _sleep(seconds: float) -> Callable[[subprocess.Popen], None]:
    return lambda child: time.sleep(seconds)


def _until_write_starts(vault: Path, before: set[str]) -> Callable[[subprocess.Popen], None]:
    """Wait until the importer's staging folder appears, or (re-import) a file the vault did not have."""
    def wait(child: subprocess.Popen) -> None:
        deadline = time.monotonic() + 120
        while child.poll() is None and time.monotonic() < deadline:
            if _partials(vault) or (vault.is_dir() and set(os.listdir(vault)) - before):
                return
            time.sleep(0.0005)
    return wait


# ---------------------------------------------------------------------------------------------
# What a kill left


def _outcome(vault: Path, key: KeySource, ids: dict[str, set[str]], previous: bool) -> str:
    """"none", "old" or "new": the vault after a kill, which must verify and hold one whole cohort."""
    try:
        Vault.open(vault, key).verify()
        held = set(load_cohort(vault, key).patient_ids.tolist())
    except VaultError as exc:
        assert not previous, f"previous vault lost: {exc}"
        assert "not a vault" in str(exc)
        return "none"
    assert held in (ids["old"], ids["new"]), "vault holds a mixture of two cohorts"
    return "new" if held == ids["new"] else "old"


def _check_kill_inside_write(kill: Kill, outcome: str, vault: Path, previous: bool) -> None:
    """A kill inside the staging leaves no vault (the rename is the commit) and the staging folder;
    inside an update, the vault is whole either way, and a first import's vault is already the new one."""
    if kill.phase == "staging":
        assert not previous and outcome == "none", outcome
        assert _partials(vault), "the staging folder of the killed write is gone"
    elif kill.phase == "update" and not previous:
        assert outcome == "new", outcome


@pytest.mark.parametrize("previous", [False, True], ids=["first-import", "re-import"])
@pytest.mark.slow
def test_killed_import_leaves_previous_vault_or_none(cohorts: dict[str, Path], tmp_path: Path, previous: bool) -> None:
    new_spec = cohorts["new"] / "spec.toml"
    total = _full_run_seconds(new_spec, tmp_path)
    key_path = generate_key_file(tmp_path / "key")
    key = KeySource.from_key_file(key_path)
    old = import_cohort(load_spec(cohorts["old"] / "spec.toml"))
    ids = {"old": set(old.patient_ids.tolist()), "new": set(import_cohort(load_spec(new_spec)).patient_ids.tolist())}
    outcomes: set[str] = set()
    kills: list[Kill] = []

    def run(name: str, wait_for: Callable[[Path, set[str]], Callable[[subprocess.Popen], None]]) -> None:
        vault = tmp_path / name
        if previous:
            save_cohort(vault, old, key)
        before = set(os.listdir(vault)) if previous else set()
        kill = _run_and_kill(_import_cmd(new_spec, vault, key_path, previous), vault, wait_for(vault, before))
        outcome = _outcome(vault, key, ids, previous)
        _check_kill_inside_write(kill, outcome, vault, previous)
        kills.append(kill)
        outcomes.add(outcome)

    # Delays from start-up to past the measured run time: a loaded machine shifts every moment,
    # so the invariant is checked at each kill, whatever it interrupted.
    for i, fraction in enumerate(np.linspace(0.1, 1.2, 10)):
        run(f"vault-{i}", lambda vault, before, s=total * fraction: _sleep(s))
    for i in range(WATCHED_RUNS):
        if any(k.phase for k in kills):
            break
        run(f"vault-watched-{i}", _until_write_starts)

    assert sum(k.killed for k in kills) >= 3, f"only {sum(k.killed for k in kills)} runs were still going when killed"
    assert any(k.phase for k in kills), f"no kill landed inside a vault write in {len(kills)} runs"
    # A re-import never loses the previous vault; a first import never finds an old one.
    assert outcomes <= ({"old", "new"} if previous else {"none", "new"}), outcomes
    assert ("old" if previous else "none") in outcomes, outcomes
