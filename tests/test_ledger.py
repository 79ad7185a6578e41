"""The privacy ledger: accounting against Opacus, refusal, persistence, tampering, concurrency, CLI.

Real vaults (AES-GCM) and real Opacus accountants throughout. Processes, not threads, play the
second writer, as a second ClientApp or a restarted site would.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opacus.accountants import RDPAccountant

from client.cohort_store import save_cohort
from client.privacy.ledger import (
    LEDGER_ROLE,
    ORDERS,
    LedgerError,
    PrivacyBudgetExceeded,
    PrivacyLedger,
    Release,
    gaussian_noise_multiplier,
    gaussian_noise_std,
)
from client.ledger_cli import register
from client.vault import KeySource, Vault, VaultError, generate_key_file
from tests.test_vault import small_cohort, tree

ROOT = Path(__file__).resolve().parents[1]
DELTA = 1e-5

# ---------------------------------------------------------------------------------------------
# Helpers


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    return generate_key_file(tmp_path / "key")


@pytest.fixture
def vault(tmp_path: Path, key_file: Path) -> Vault:
    """A site's vault in the ``SITES/<site>/vault`` layout, holding one unrelated blob."""
    return Vault.create(tmp_path / "site-1" / "vault", KeySource.from_key_file(key_file), {"model/forest": b"f"})


def dp_sgd(sigma: float, q: float, steps: int, *, run: str = "run-a", round: int | None = 1) -> Release:
    return Release(kind="dp-sgd", noise_multiplier=sigma, sample_rate=q, steps=steps, label="cnn-update",
                   run_id=run, round=round)


def opacus_epsilon(history: list[tuple[float, float, int]], delta: float = DELTA, *,
                   default_orders: bool = False) -> float:
    """Epsilon of ``history`` by an independent Opacus RDPAccountant (at the ledger's orders)."""
    acc = RDPAccountant()
    acc.history = list(history)
    return float(acc.get_epsilon(delta=delta, alphas=None if default_orders else list(ORDERS)))


def history_of(releases: tuple[Release, ...] | list[Release]) -> list[tuple[float, float, int]]:
    return [(r.noise_multiplier, r.sample_rate, r.steps) for r in releases]


# ---------------------------------------------------------------------------------------------
# Accounting


def test_orders_extend_opacus_default_alphas() -> None:
    assert list(ORDERS[:len(RDPAccountant.DEFAULT_ALPHAS)]) == RDPAccountant.DEFAULT_ALPHAS
    assert list(ORDERS) == sorted(ORDERS) and ORDERS[-1] == 1024


def test_spent_epsilon_equals_an_independent_opacus_accountant(vault: Vault) -> None:
    ledger = PrivacyLedger.open(vault, site="site-1", default_epsilon=100.0)
    sigma_meta = gaussian_noise_multiplier(epsilon=0.5, delta=DELTA)
    charges = [
        [dp_sgd(1.1, 0.02, 250, round=1)],
        [dp_sgd(1.1, 0.02, 250, round=2)],  # same mechanism again: grouped, still composed
        [Release.gaussian(noise_multiplier=sigma_meta, label="meta-statistics", run_id="run-a", round=3, count=2)],
        [dp_sgd(0.8, 0.05, 40, run="run-b", round=0), dp_sgd(2.0, 0.01, 500, run="run-b", round=0)],
        [Release.gaussian(noise_multiplier=3.0, label="explanation-summary", run_id="run-b", round=None)],
    ]
    expected_after = []
    for batch in charges:
        assert ledger.would_spend(batch) == pytest.approx(opacus_epsilon(history_of([*ledger.releases, *batch])),
                                                          rel=1e-12)
        ledger.charge(batch)
        expected_after.append(opacus_epsilon(history_of(ledger.releases)))
    assert len(ledger.releases) == 6
    assert ledger.spent_epsilon() == pytest.approx(expected_after[-1], rel=1e-12)
    assert ledger.remaining_epsilon() == pytest.approx(100.0 - expected_after[-1], rel=1e-12)
    rows = ledger.per_round()
    assert [r["epsilon"] for r in rows] == pytest.approx(expected_after, rel=1e-12)
    assert [(r["run_id"], r["round"], r["labels"]) for r in rows] == [
        ("run-a", 1, ["cnn-update"]), ("run-a", 2, ["cnn-update"]), ("run-a", 3, ["meta-statistics"]),
        ("run-b", 0, ["cnn-update"]), ("run-b", None, ["explanation-summary"])]
    assert sum(r["increase"] for r in rows) == pytest.approx(expected_after[-1], rel=1e-12)
    # More orders only tighten the bound: never above Opacus with its default orders.
    assert ledger.spent_epsilon() <= opacus_epsilon(history_of(ledger.releases), default_orders=True)


def test_from_accountant_state_charges_only_the_new_steps() -> None:
    acc = RDPAccountant()
    for _ in range(30):
        acc.step(noise_multiplier=1.2, sample_rate=0.01)
    first = {"mechanism": "rdp", "history": [list(h) for h in acc.history], "noise_multiplier": 1.2,
             "sample_rate": 0.01}
    for _ in range(20):  # the next round resumes the same accountant: Opacus grows the last entry
        acc.step(noise_multiplier=1.2, sample_rate=0.01)
    for _ in range(5):
        acc.step(noise_multiplier=0.9, sample_rate=0.01)
    second = {**first, "history": [list(h) for h in acc.history]}

    round1 = Release.from_accountant_state(first, label="cnn-update", run_id="r", round=1)
    round2 = Release.from_accountant_state(second, previous=first, label="cnn-update", run_id="r", round=2)
    assert history_of(round1) == [(1.2, 0.01, 30)]
    assert history_of(round2) == [(1.2, 0.01, 20), (0.9, 0.01, 5)]
    assert opacus_epsilon(history_of(round1 + round2)) == pytest.approx(acc.get_epsilon(delta=DELTA), rel=1e-12)
    assert Release.from_accountant_state(second, previous=second, label="x", run_id="r", round=3) == []
    with pytest.raises(ValueError, match="does not extend"):
        Release.from_accountant_state(first, previous=second, label="x", run_id="r", round=3)
    other = {**first, "history": [[1.3, 0.01, 40]]}
    with pytest.raises(ValueError, match="does not extend"):
        Release.from_accountant_state(other, previous=first, label="x", run_id="r", round=3)


def test_gaussian_calibration_spends_at_most_the_asked_epsilon() -> None:
    for epsilon, count in ((0.02, 1), (0.1, 1), (1.0, 1), (2.0, 5)):
        sigma = gaussian_noise_multiplier(epsilon=epsilon, delta=DELTA, count=count)
        spent = opacus_epsilon([(sigma, 1.0, count)])
        assert epsilon * 0.999 <= spent <= epsilon
    assert gaussian_noise_std(epsilon=1.0, delta=DELTA, sensitivity=3.0) == pytest.approx(
        3.0 * gaussian_noise_multiplier(epsilon=1.0, delta=DELTA))
    with pytest.raises(ValueError, match="epsilon must be a finite number > 0"):
        gaussian_noise_multiplier(epsilon=0.0, delta=DELTA)


@pytest.mark.parametrize(("field", "value", "match"), [
    ("noise_multiplier", 0.0, "noise_multiplier must be a finite number > 0"),
    ("noise_multiplier", float("nan"), "noise_multiplier must be a finite number > 0"),
    ("sample_rate", 1.5, r"sample_rate must be in \(0, 1\]"),
    ("steps", 0, "steps must be an int >= 1"),
    ("kind", "laplace", "release kind must be one of"),
    ("label", "", "label must be a non-empty string"),
    ("round", -1, "round must be None or an int >= 0"),
])
def test_bad_releases_are_refused(field: str, value: object, match: str) -> None:
    args = {"kind": "dp-sgd", "noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 10, "label": "l",
            "run_id": "r", "round": 0, field: value}
    with pytest.raises(ValueError, match=match):
        Release(**args)  # type: ignore[arg-type]


def test_releases_take_numpy_numbers_and_store_plain_ones() -> None:
    from_numpy = Release(kind="dp-sgd", noise_multiplier=np.float32(1.5), sample_rate=np.float64(0.25),
                         steps=np.int64(4), label="l", run_id="r")
    assert from_numpy == Release(kind="dp-sgd", noise_multiplier=1.5, sample_rate=0.25, steps=4, label="l",
                                 run_id="r")
    assert type(from_numpy.steps) is int and type(from_numpy.noise_multiplier) is float
    with pytest.raises(ValueError, match="a gaussian release uses the whole data"):
        Release(kind="gaussian", noise_multiplier=1.0, sample_rate=0.5, steps=1, label="l", run_id="r")


def test_composition_does_not_import_torch() -> None:
    # A census or meta round must not pay torch's import time just to read the ledger.
    code = ("import sys; from client.privacy.ledger import _epsilon_of; "
            "assert _epsilon_of({(1.0, 0.1): 10}, delta=1e-5) > 0; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.floats(0.5, 8.0), st.sampled_from([0.001, 0.01, 0.1, 1.0]), st.integers(1, 2000)),
                min_size=1, max_size=6))
def test_spent_epsilon_never_decreases_as_releases_are_added(key_file: Path,
                                                             mechanisms: list[tuple[float, float, int]]) -> None:
    with tempfile.TemporaryDirectory() as folder:
        vault = Vault.create(Path(folder) / "vault", KeySource.from_key_file(key_file), {})
        ledger = PrivacyLedger.open(vault, site="s", default_epsilon=1e9)
        before = ledger.spent_epsilon()
        assert before == 0.0
        for i, (sigma, q, steps) in enumerate(mechanisms):
            kind = "gaussian" if q == 1.0 else "dp-sgd"
            after = ledger.charge(Release(kind=kind, noise_multiplier=sigma, sample_rate=q, steps=steps,
                                          label="x", run_id="r", round=i))
            assert after >= before
            assert after == ledger.spent_epsilon()
            before = after


# ---------------------------------------------------------------------------------------------
# Budget


def test_a_charge_over_budget_is_refused_and_nothing_is_written(vault: Vault) -> None:
    ledger = PrivacyLedger.open(vault, site="site-1", default_epsilon=2.0)
    spent = ledger.charge([dp_sgd(1.0, 0.01, 200, round=1)])
    snapshot = tree(vault.path.parent)
    with pytest.raises(PrivacyBudgetExceeded) as info:
        ledger.charge([dp_sgd(1.0, 0.01, 2000, round=2), Release.gaussian(noise_multiplier=1.0,
                       label="meta-statistics", run_id="run-a", round=2)])
    exc = info.value
    assert str(exc) == (
        f"site site-1: refused to release cnn-update, meta-statistics (run run-a, round 2): it would take the "
        f"site's privacy spend from epsilon {spent:.4g} to {exc.would_reach:.4g} (delta 1e-05), above its budget "
        "epsilon 2; nothing was released or recorded; raise the site's budget with `genofed ledger set-budget "
        "--allow-raise` only if the site's privacy officer agrees")
    assert exc.spent == pytest.approx(spent) and exc.would_reach > 2.0 and exc.budget == 2.0
    copy = pickle.loads(pickle.dumps(exc))  # a worker's error crosses process boundaries
    assert str(copy) == str(exc) and copy.labels == ["cnn-update", "meta-statistics"] and copy.round == 2
    assert tree(vault.path.parent) == snapshot  # byte for byte: nothing written, not even a lock file
    assert PrivacyLedger.open(vault, site="site-1").refresh().spent_epsilon() == pytest.approx(spent)
    # An override (e.g. recording a release that already happened) is recorded, over budget.
    assert ledger.charge([dp_sgd(1.0, 0.01, 2000, round=2)], require_within_budget=False) > 2.0


def test_set_budget_lowers_refuses_a_silent_raise_and_restates_at_a_new_delta(vault: Vault) -> None:
    ledger = PrivacyLedger.open(vault, site="site-1", default_epsilon=8.0)
    ledger.charge([dp_sgd(1.0, 0.02, 300)])
    spent = ledger.spent_epsilon()
    ledger.set_budget(epsilon=5.0)
    assert (ledger.budget_epsilon, ledger.delta) == (5.0, DELTA)
    with pytest.raises(LedgerError, match="refusing to raise the privacy budget from epsilon 5, delta 1e-05 to "
                                          "epsilon 6, delta 1e-05 without allow_raise"):
        ledger.set_budget(epsilon=6.0)
    with pytest.raises(LedgerError, match="refusing to raise"):
        ledger.set_budget(epsilon=5.0, delta=1e-4)  # a larger delta is a weaker guarantee
    ledger.set_budget(epsilon=5.0, delta=1e-7)
    assert ledger.spent_epsilon() > spent  # the same releases cost more epsilon at a smaller delta
    assert ledger.spent_epsilon() == pytest.approx(opacus_epsilon(history_of(ledger.releases), 1e-7), rel=1e-12)
    ledger.set_budget(epsilon=6.0, delta=1e-5, allow_raise=True)
    assert [h["change"] for h in ledger.budget_history] == ["created", "lowered", "lowered", "raised"]
    with pytest.raises(LedgerError, match="epsilon must be a finite number > 0"):
        ledger.set_budget(epsilon=-1.0)


def test_charges_of_one_call_must_share_run_and_round(vault: Vault) -> None:
    ledger = PrivacyLedger.open(vault, site="site-1")
    with pytest.raises(ValueError, match="one charge holds the releases of one run and round"):
        ledger.charge([dp_sgd(1.0, 0.01, 10, round=1), dp_sgd(1.0, 0.01, 10, round=2)])
    assert ledger.charge([]) == 0.0 and ledger.revision == 1  # nothing to charge: nothing written


# ---------------------------------------------------------------------------------------------
# Persistence and tampering


SECOND_RUN = """
import json, sys
from client.privacy.ledger import PrivacyLedger, Release
from client.vault import KeySource, Vault
vault = Vault.open(sys.argv[1], KeySource.from_key_file(sys.argv[2]))
ledger = PrivacyLedger.open(vault, site="site-1", default_epsilon=1000.0, default_delta=0.1)
ledger.charge([Release(kind="dp-sgd", noise_multiplier=0.9, sample_rate=0.05, steps=60, label="cnn-update",
                       run_id="run-2", round=1)])
print(json.dumps({"budget": ledger.budget_epsilon, "delta": ledger.delta, "releases": len(ledger.releases)}))
"""


def test_a_second_run_in_a_new_process_continues_the_same_ledger(vault: Vault, key_file: Path) -> None:
    ledger = PrivacyLedger.open(vault, site="site-1", default_epsilon=7.0)
    ledger.charge([dp_sgd(1.1, 0.02, 100, run="run-1", round=1)])
    ledger.charge([Release.gaussian(noise_multiplier=4.0, label="meta-statistics", run_id="run-1", round=2)])
    out = subprocess.run([sys.executable, "-c", SECOND_RUN, str(vault.path), str(key_file)], cwd=ROOT,
                         capture_output=True, text=True, check=True)
    # The new process's defaults are ignored: the budget is the one recorded at creation.
    assert json.loads(out.stdout) == {"budget": 7.0, "delta": DELTA, "releases": 3}
    reopened = PrivacyLedger.open(Vault.open(vault.path, KeySource.from_key_file(key_file)), site="site-1")
    assert history_of(reopened.releases) == [(1.1, 0.02, 100), (4.0, 1.0, 1), (0.9, 0.05, 60)]
    assert reopened.spent_epsilon() == pytest.approx(opacus_epsilon(history_of(reopened.releases)), rel=1e-12)
    summary = reopened.to_summary()
    assert set(summary["runs"]) == {"run-1", "run-2"} and summary["runs"]["run-1"]["charges"] == 2
    assert summary["runs"]["run-2"]["epsilon"] == pytest.approx(opacus_epsilon([(0.9, 0.05, 60)]), rel=1e-12)


def test_reimporting_the_cohort_keeps_the_ledger(tmp_path: Path, key_file: Path) -> None:
    key = KeySource.from_key_file(key_file)
    vault = save_cohort(tmp_path / "vault", small_cohort(), key)  # import creates the ledger (budget 10)
    ledger = PrivacyLedger.open(vault, site="site-1", default_epsilon=50.0)
    ledger.set_budget(epsilon=3.0)
    ledger.charge([dp_sgd(1.0, 0.01, 100)])
    save_cohort(tmp_path / "vault", small_cohort(events=False), key, overwrite=True)  # `vault import --force`
    ledger = PrivacyLedger.open(Vault.open(tmp_path / "vault", key), site="site-1", default_epsilon=50.0)
    assert ledger.budget_epsilon == 3.0 and history_of(ledger.releases) == [(1.0, 0.01, 100)]


def test_an_edited_ledger_blob_is_named(vault: Vault, key_file: Path) -> None:
    PrivacyLedger.open(vault, site="site-1").charge([dp_sgd(1.0, 0.01, 100)])
    (blob,) = vault.path.glob("privacy-ledger.*.gfv")
    data = bytearray(blob.read_bytes())
    data[-20] ^= 1
    blob.write_bytes(bytes(data))
    with pytest.raises(VaultError, match=rf"blob 'privacy/ledger' \({blob.name}\) failed authentication"):
        PrivacyLedger.open(Vault.open(vault.path, KeySource.from_key_file(key_file)), site="site-1")


def test_a_vanished_ledger_is_never_silently_restarted_by_a_charge(vault: Vault) -> None:
    ledger = PrivacyLedger.open(vault, site="site-1")
    ledger.charge([dp_sgd(1.0, 0.01, 100)])
    vault.update(remove=[LEDGER_ROLE])
    with pytest.raises(LedgerError, match="the privacy ledger disappeared from the vault; restore the vault"):
        ledger.charge([dp_sgd(1.0, 0.01, 100, round=2)])


# ---------------------------------------------------------------------------------------------
# Concurrency


CHARGER = """
import sys, time
from pathlib import Path
from client.privacy.ledger import PrivacyBudgetExceeded, PrivacyLedger, Release
from client.vault import KeySource, Vault
vault_path, key_path, name, count, budget, go = sys.argv[1:]
vault = Vault.open(vault_path, KeySource.from_key_file(key_path))
ledger = PrivacyLedger.open(vault, site="site-1", default_epsilon=float(budget))
ledger.spent_epsilon()  # warm the RDP cache so that the charges below overlap
Path(go + "." + name).touch()
while not Path(go).exists():
    time.sleep(0.001)
for i in range(int(count)):
    try:
        ledger.charge([Release(kind="dp-sgd", noise_multiplier=1.0, sample_rate=0.01, steps=50,
                               label="cnn-update", run_id=name, round=i)])
    except PrivacyBudgetExceeded:
        pass
"""


def _run_two(vault: Vault, key_file: Path, *, count: int, budget: float) -> None:
    """Two ClientApps of the same site, started together, each charging ``count`` times."""
    go = vault.path.parent.parent / "go"
    procs = [subprocess.Popen([sys.executable, "-c", CHARGER, str(vault.path), str(key_file), name, str(count),
                               str(budget), str(go)], cwd=ROOT) for name in ("a", "b")]
    try:
        while not all(Path(f"{go}.{name}").exists() for name in "ab") and all(p.poll() is None for p in procs):
            time.sleep(0.01)
        go.touch()
        assert [p.wait(timeout=120) for p in procs] == [0, 0]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def test_two_processes_charging_concurrently_lose_no_charge(vault: Vault, key_file: Path) -> None:
    count = 12
    _run_two(vault, key_file, count=count, budget=1000.0)
    ledger = PrivacyLedger.open(vault, site="site-1").refresh()
    rows = ledger.per_round()
    assert len(rows) == 2 * count and [r["charge"] for r in rows] == list(range(1, 2 * count + 1))
    assert sorted((r["run_id"], r["round"]) for r in rows) == sorted((n, i) for n in "ab" for i in range(count))
    assert ledger.revision == 2 * count + 1  # creation + one write per charge
    assert Vault.open(vault.path, KeySource.from_key_file(key_file)).verify()["warnings"] == []


def test_concurrent_charges_never_overrun_the_budget(vault: Vault, key_file: Path) -> None:
    one = [(1.0, 0.01, 50)]
    # A budget that fits exactly 7 charges: the 8th would exceed it.
    budget = (opacus_epsilon(one * 7) + opacus_epsilon(one * 8)) / 2
    _run_two(vault, key_file, count=10, budget=budget)
    ledger = PrivacyLedger.open(vault, site="site-1").refresh()
    assert len(ledger.releases) == 7 and ledger.spent_epsilon() <= budget


# ---------------------------------------------------------------------------------------------
# Command line


def cli(*argv: str | Path) -> int:
    parser = argparse.ArgumentParser(prog="genofed")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args([str(a) for a in argv])
    return args.func(args)


def test_cli_show_and_set_budget(vault: Vault, key_file: Path, capsys: pytest.CaptureFixture[str],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps to the terminal; make the table one line a row
    path, key = vault.path, ("--key-file", key_file)
    assert cli("ledger", "show", path, *key) == 0
    assert "no privacy ledger yet" in capsys.readouterr().out

    assert cli("ledger", "set-budget", path, *key, "--epsilon", "4") == 0
    assert capsys.readouterr().out == f"{path}: created the privacy ledger of site site-1 with budget epsilon 4 " \
                                      "at delta 1e-05\n"
    ledger = PrivacyLedger.open(vault, site="site-1", default_epsilon=99.0)
    assert ledger.budget_epsilon == 4.0
    ledger.charge([dp_sgd(1.1, 0.02, 100, run="run-7", round=3)])
    spent = ledger.spent_epsilon()

    assert cli("ledger", "show", path, *key) == 0
    out = capsys.readouterr().out
    assert f"{path}: privacy ledger of site site-1 (Renyi DP accountant)" in out
    assert f"budget epsilon 4 at delta 1e-05; spent {spent:.4g}; remaining {4 - spent:.4g}; 1 releases in " \
           "1 charges over 1 runs" in out
    assert "run-7" in out and "cnn-update" in out and "dp-sgd sigma=1.1 q=0.02 x100" in out

    assert cli("ledger", "show", path, *key, "--json") == 0
    doc = json.loads(capsys.readouterr().out)["ledger"]
    assert doc["spent_epsilon"] == pytest.approx(spent) and doc["rounds"][0]["round"] == 3

    assert cli("ledger", "set-budget", path, *key, "--epsilon", "3") == 0
    assert capsys.readouterr().out == (f"{path}: privacy budget lowered from epsilon 4 at delta 1e-05 to epsilon 3 "
                                       f"at delta 1e-05; spent {spent:.4g}, remaining {3 - spent:.4g}\n")
    with pytest.raises(LedgerError, match="refusing to raise the privacy budget .* without allow_raise "
                                          r"\(--allow-raise\)"):
        cli("ledger", "set-budget", path, *key, "--epsilon", "5")
    assert cli("ledger", "set-budget", path, *key, "--epsilon", "5", "--allow-raise") == 0
    assert "privacy budget raised from epsilon 3" in capsys.readouterr().out
    assert cli("ledger", "set-budget", path, *key, "--epsilon", "0.1") == 0
    assert "it will refuse every further release" in capsys.readouterr().out


def test_cli_takes_a_passphrase_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "pw").write_text("a long passphrase\n")
    (tmp_path / "pw").chmod(0o600)
    Vault.create(tmp_path / "v", KeySource.from_passphrase_file(tmp_path / "pw"), {})
    assert cli("ledger", "set-budget", tmp_path / "v", "--passphrase-file", tmp_path / "pw", "--epsilon", "2",
               "--site", "hospital-a") == 0
    assert "site hospital-a with budget epsilon 2" in capsys.readouterr().out


def test_cli_help_is_useful(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, words in ((("ledger",), "never reset"), (("ledger", "show"), "sample rate q"),
                        (("ledger", "set-budget"), "--allow-raise"), (("ledger", "policy"), "--max-run-epsilon"),
                        (("ledger", "egress"), "--run RUN_ID")):
        with pytest.raises(SystemExit):
            cli(*argv, "--help")
        assert words in capsys.readouterr().out


def test_lock_wait_is_bounded(vault: Vault, monkeypatch: pytest.MonkeyPatch) -> None:
    import fcntl

    import client.privacy.ledger as ledger_mod

    ledger = PrivacyLedger.open(vault, site="site-1")
    monkeypatch.setattr(ledger_mod, "LOCK_WAIT_S", 0.1)
    fd = os.open(vault.path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another charger holds the ledger lock
        with pytest.raises(LedgerError, match="another process kept the privacy ledger locked"):
            ledger.charge([dp_sgd(1.0, 0.01, 10)])
    finally:
        os.close(fd)
    assert ledger.refresh().releases == ()


@pytest.mark.slow
def test_planning_calibration_never_needs_more_noise_than_opacus() -> None:
    """The census plans DP-SGD with the ledger's calibration: at most Opacus' noise, so plan >= charge."""
    from opacus.accountants.utils import get_noise_multiplier

    from client.privacy.ledger import dpsgd_noise_multiplier, epsilon_of

    for eps, q, steps in ((8.0, 0.1, 100), (3.0, 1 / 6, 12)):
        ours = dpsgd_noise_multiplier(epsilon=eps, delta=1e-5, sample_rate=q, steps=steps)
        theirs = get_noise_multiplier(target_epsilon=eps, target_delta=1e-5, sample_rate=q, steps=steps,
                                      accountant="rdp")
        assert ours <= theirs
        plan = Release(kind="dp-sgd", noise_multiplier=ours, sample_rate=q, steps=steps, label="p", run_id="r")
        charge = Release(kind="dp-sgd", noise_multiplier=theirs, sample_rate=q, steps=steps, label="p", run_id="r")
        assert epsilon_of([charge], delta=1e-5) <= eps <= epsilon_of([plan], delta=1e-5) <= eps * 1.01
