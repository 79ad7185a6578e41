"""A site killed at any step of a DP release never under-counts its ledger, nor releases unrecorded.

Item 5 of the attack campaign (ledger integrity). A child process plays one site: it answers real
DP messages through the real ClientApp (``query.moments``, a Gaussian release; two DP-SGD ``train``
rounds; and round 2 asked again, which replays the stored release), and records each reply in a
trace file only after the ClientApp returned it: the moment Flower would send it. The parent kills
the child

* at every disk step of the vault (each blob write, fsync, rename, unlink) and on the return of
  every vault update: a hook in the child counts these points and the child SIGKILLs itself at
  point k, for every k until the message completes, so kills land before the ledger write, during
  it (before and after its commit), after it while the release is computed, during and after the
  stored release's write, and during and after the egress-log write;
* right after the reply was produced (the site died before Flower sent it);
* after random delays: SIGSTOP first, so the trace read while it is stopped says where the kill
  lands (to within the one disk step it may be inside), then SIGKILL.

After every kill the parent opens the vault and asserts

(a) the vault verifies and the ledger parses; it keeps every earlier charge, and its spend is at
    least the epsilon every released reply reported (never under-counts);
(b) every released reply has a sent egress-log entry; a freshly computed one names its charges,
    which are in the ledger with the release's label and round; a replay's charge was in the
    ledger before; no logged charge is missing from the ledger;
(c) the same request sent again to a fresh child either replays the stored release (no new
    charge, the very content stored, and the content the killed child released if it released
    one) or charges anew and logs that charge: never a release without a charge.

Each message starts from a snapshot of the vault taken before it in one clean run, so a kill run
costs one message and its recovery one more. The kills per landing place are printed (``-s``).

A kill after the stored release's commit and before the egress entry's leaves a charge that no
entry of the killed child names; the replay's entry (epsilon 0, no new charges) names it as
``replay_of``, so every charge stays tied to a reply that carried its release.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import random
import shutil
import signal
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytestmark = [pytest.mark.attack, pytest.mark.slow, pytest.mark.timeout(900)]

RUN_ID = "ledger-kills"
SITE = "site-1"
# batch-size above the train split: Poisson rate 1, whose noise calibration is closed-form (a rate
# below 1 costs Opacus' bisection seconds per process, times a hundred processes).
SETTINGS_FIELDS = dict(cnn_rounds=2, local_epochs=1, epsilon=3.0, batch_size=128, moments_epsilon=0.5,
                       site_alone=False, explain=False)
TINY_MODEL = dict(filters=(8, 8), groups=4, dense_hidden=8, head_hidden=8)
"""The coordinator chooses the layers (a site checks only its tracks): small ones train fast."""
RANDOM_KILLS = 8
"""Random-delay kills per message."""
VAULT_OPS = ("_write_new", "_replace", "_rename_dir", "_fsync_dir", "_unlink")
PRELOAD = ("numpy", "torch", "torch._dynamo", "torch.func", "opacus", "opacus.utils.batch_memory_manager",
           "cryptography.hazmat.primitives.ciphers.aead", "flwr.app", "client.client_app", "client.secure_release",
           "client.handlers", "client.pipeline", "client.dp_training", "client.model_store", "client.cohort_store",
           "client.privacy.facade", "tests.local_grid", "tests.test_ledger_kills")
"""Imported once by the fork server: each child then starts in milliseconds, not seconds."""


@dataclass(frozen=True)
class Step:
    """One message of the site's run: its type, round, released record and ledger label."""

    name: str
    message_type: str
    round: int
    record: str
    label: str
    role: str

    @property
    def charge_round(self) -> int | None:
        """The round its charge is recorded with (a one-off release has none)."""
        return self.round if self.message_type == "train" else None


STEPS = (Step("moments", "query.moments", 0, "moments", "moments", "moments-release"),
         Step("train-1", "train", 1, "arrays", "cnn-update", "cnn-release"),
         Step("train-2", "train", 2, "arrays", "cnn-update", "cnn-release"),
         Step("train-2-again", "train", 2, "arrays", "cnn-update", "cnn-release"))


def _settings() -> Any:
    from common.settings import RunSettings

    return RunSettings(**SETTINGS_FIELDS)


# ---------------------------------------------------------------------------------------------
# The child: one site answering one message, traced at every vault disk step


def _digest(arrays: dict[str, np.ndarray]) -> str:
    """A digest of released arrays (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"\0{name}\0{a.dtype.str}\0{a.shape}\0".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _update_kind(put: dict[str, bytes]) -> str:
    """What a vault update writes: the ledger, the egress log, a stored release, or other state."""
    roles = set(put)
    for role, kind in (("privacy/ledger", "ledger"), ("privacy/egress", "egress")):
        if role in roles:
            return kind
    if any(r.endswith("-release") for r in roles):
        return "stored-release"
    return "+".join(sorted(r.rsplit("/", 1)[-1] for r in roles))


class _Tracer:
    """Writes one trace line per kill point and kills this process at point ``kill_at``: the trace
    then ends with the point the process died at.

    The points are every vault disk step (before it runs) and the return of every vault update
    (the moment after a write: for the ledger's, while the release is being computed).
    """

    def __init__(self, path: str, kill_at: int) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._kill_at, self._ops = kill_at, 0
        self._update: str | None = None
        self._committed = False

    def line(self, **doc: Any) -> None:
        """Append one JSON line (unbuffered: a killed process loses nothing it wrote)."""
        os.write(self._fd, (json.dumps(doc) + "\n").encode())

    def install(self) -> None:
        """Hook the vault's five disk primitives and ``Vault.update`` (this process only)."""
        import client.vault as vault_mod

        for name in VAULT_OPS:
            setattr(vault_mod, name, self._wrap(name, getattr(vault_mod, name)))
        real_update = vault_mod.Vault.update

        def update(vault: Any, put: Any = None, remove: Any = ()) -> None:
            self._update, self._committed = _update_kind(dict(put or {})), False
            real_update(vault, put, remove)
            self._point(done=self._update)
            self._update = None

        vault_mod.Vault.update = update

    def _point(self, **where: Any) -> None:
        self.line(op=self._ops, **where)
        if self._ops == self._kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        self._ops += 1

    def _wrap(self, name: str, real: Any) -> Any:
        def step(*args: Any) -> None:
            self._point(name=name, update=self._update, committed=self._committed)
            real(*args)
            if name == "_replace":  # the manifest's rename is a vault update's commit point
                self._committed = True
        return step


def _message(step: Step, inputs: dict[str, Any]) -> Any:
    from flwr.app import ConfigRecord, Message, RecordDict

    import tests.local_grid  # noqa: F401 - sets the TaskIdentity a bare Message needs
    from common.records import to_record
    from common.settings import RoundFacts

    facts = RoundFacts(run_id=RUN_ID, server_round=step.round, model_config=inputs["model-config"])
    content = {"config": ConfigRecord(facts.to_config())}
    if step.message_type == "train":
        content |= {"arrays": to_record(inputs[step.name]), "shared": to_record(inputs["shared"])}
    return Message(RecordDict(content), dst_node_id=101, message_type=step.message_type, group_id=step.name)


def _context(site: Path) -> Any:
    from flwr.app import Context, RecordDict

    node = {"vault": str(site / "vault"), "key-file": str(site / "key"), "site": SITE}
    return Context(run_id=1, node_id=101, node_config=node, state=RecordDict(),
                   run_config=_settings().to_run_config())


def _child(site: str, step: Step, inputs: dict[str, Any], trace: str, kill_at: int, kill_after_reply: bool,
           ready: Any) -> None:
    """Answer ``step`` as the site would; trace every disk step and the reply once it is produced."""
    import torch

    from client.client_app import app
    from common.records import from_record

    torch.set_num_threads(1)  # two cores, shared with other test runs
    tracer = _Tracer(trace, kill_at)
    tracer.install()
    try:
        msg = _message(step, inputs)
        ready.set()
        reply = app(msg, _context(Path(site)))
        metrics = dict(reply.content.metric_records["metrics"])
        digest = _digest(from_record(reply.content.array_records[step.record]))
    except BaseException:
        tracer.line(error=traceback.format_exc())
        raise
    # Only now would Flower send it: this line is what "released" means.
    tracer.line(released=step.name, epsilon=float(metrics.get("epsilon", 0.0)), digest=digest)
    if kill_after_reply:
        os.kill(os.getpid(), signal.SIGKILL)


def _noop() -> None:
    """A child that only proves the fork server is up."""


# ---------------------------------------------------------------------------------------------
# The parent: start, stop, kill, read the trace


@dataclass
class Outcome:
    """One child run: killed or completed, its trace, and where the kill landed."""

    killed: bool
    trace: list[dict[str, Any]]
    seconds: float

    @property
    def released(self) -> list[dict[str, Any]]:
        """The replies the child produced (at most one): what Flower would have sent."""
        return [t for t in self.trace if "released" in t]

    @property
    def ops(self) -> int:
        """Kill points the child reached."""
        return sum("op" in t for t in self.trace)

    def landing(self) -> str:
        """Where the kill landed: after the reply, inside or after a vault update, or before any."""
        if self.released:
            return "after the reply was produced"
        points = [t for t in self.trace if "op" in t]
        if not points:
            return "before any vault write"
        last = points[-1]
        if "done" in last:
            return f"after the {last['done']} write"
        return f"{last['update']} write, {'after' if last['committed'] else 'before'} its commit"


def _stopped(pid: int, timeout: float = 30.0) -> bool:
    """Wait until ``pid`` is stopped (True) or gone (False), read from /proc: the fork server is its
    parent, so this process cannot ``waitpid`` for it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            return False
        if state in ("T", "t"):
            return True
        if state in ("Z", "X"):
            return False
        time.sleep(0.001)
    raise AssertionError(f"process {pid} did not stop")


def _read_trace(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Site:
    """Runs children for one site folder from a fork server that imported everything once."""

    def __init__(self, work: Path, inputs: dict[str, Any]) -> None:
        self._ctx = multiprocessing.get_context("forkserver")
        self._ctx.set_forkserver_preload(list(PRELOAD))
        self._work, self._inputs, self._runs = work, inputs, 0
        warm = self._ctx.Process(target=_noop)  # starts the fork server, which imports PRELOAD
        warm.start()
        warm.join(300)

    def run(self, site: Path, step: Step, *, kill_at: int = -1, kill_after_reply: bool = False,
            delay: float | None = None) -> Outcome:
        """One child answering ``step`` on ``site``; killed at a disk step, after its reply, or after ``delay``."""
        self._runs += 1
        trace = self._work / f"trace-{self._runs}.jsonl"
        ready = self._ctx.Event()
        proc = self._ctx.Process(target=_child, args=(str(site), step, self._inputs, str(trace), kill_at,
                                                      kill_after_reply, ready), daemon=True)
        proc.start()
        try:
            deadline = time.monotonic() + 120
            while not ready.wait(0.05):  # the message is built: the handler starts now
                assert proc.is_alive() or ready.is_set(), f"the child ended before it began: {_read_trace(trace)}"
                assert time.monotonic() < deadline, "the child never started"
            t0 = time.perf_counter()
            if delay is not None:
                time.sleep(delay)
                if proc.pid is not None and _stopped_after_sigstop(proc.pid):
                    seen = _read_trace(trace)  # the child cannot write while stopped
                    proc.kill()
                    proc.join(60)
                    return Outcome(killed=True, trace=seen, seconds=time.perf_counter() - t0)
            proc.join(120)
        finally:
            if proc.is_alive():
                proc.kill()
                proc.join(60)
        seen = _read_trace(trace)
        errors = [t["error"] for t in seen if "error" in t]
        assert not errors, errors[0]
        assert proc.exitcode in (0, -signal.SIGKILL), f"child exit code {proc.exitcode}"
        return Outcome(killed=proc.exitcode == -signal.SIGKILL, trace=seen, seconds=time.perf_counter() - t0)


def _stopped_after_sigstop(pid: int) -> bool:
    """SIGSTOP ``pid``; True once it is stopped, False if it had already finished."""
    try:
        os.kill(pid, signal.SIGSTOP)
    except ProcessLookupError:
        return False
    return _stopped(pid)


# ---------------------------------------------------------------------------------------------
# What the parent sees on disk


@dataclass
class Books:
    """A site's ledger rows, egress entries and spend, read from its vault (which must verify)."""

    rows: list[dict[str, Any]]
    entries: list[dict[str, Any]]
    spent: float
    stored: str | None  # digest of the stored release answering the step's request, if any
    leftovers: list[str]  # files a killed writer left (never read; the next write removes them)


def _books(site: Path, step: Step, inputs: dict[str, Any]) -> Books:
    """Open the vault as the site's officer would: it must verify, its ledger must parse."""
    from client.privacy.egress import EgressLog
    from client.privacy.ledger import PrivacyLedger
    from client.vault import KeySource, Vault

    vault = Vault.open(site / "vault", KeySource.from_key_file(site / "key"))
    leftovers = vault.verify()["warnings"]  # every blob authenticates: no torn write
    ledger = PrivacyLedger.load(vault)  # raises LedgerError on a corrupt ledger
    return Books(rows=ledger.per_round(), entries=EgressLog(vault).entries(), spent=ledger.spent_epsilon(),
                 stored=_stored_digest(vault, step, inputs), leftovers=leftovers)


def _stored_digest(vault: Any, step: Step, inputs: dict[str, Any]) -> str | None:
    """The digest of the release the site stored for exactly this request (as the handler keys it)."""
    from client.model_store import read_release, request_digest, run_role
    from common.settings import RoundFacts

    if step.message_type == "train":
        facts = RoundFacts(run_id=RUN_ID, server_round=step.round, model_config=inputs["model-config"])
        request = request_digest({"settings": _settings().release_settings(), "facts": facts.to_config()},
                                 inputs[step.name])
    else:
        request = "one-per-run"
    again = read_release(vault, run_role(RUN_ID, step.role), request=request)
    return None if again is None else _digest(again[0])


def _is_charge_of(row: dict[str, Any], step: Step) -> bool:
    return row["run_id"] == RUN_ID and row["labels"] == [step.label] and row["round"] == step.charge_round


def _assert_books(before: Books, after: Books, step: Step, released: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """(a) and (b) for what one child did between ``before`` and ``after``; returns its new entries."""
    assert after.rows[:len(before.rows)] == before.rows, "the ledger lost or changed an earlier charge"
    assert after.entries[:len(before.entries)] == before.entries, "the egress log lost an earlier entry"
    new_rows, new_entries = after.rows[len(before.rows):], after.entries[len(before.entries):]
    seqs = {row["charge"]: row for row in after.rows}
    for entry in new_entries:  # a logged charge is always in the ledger, with this step's label
        assert all(seq in seqs and _is_charge_of(seqs[seq], step) for seq in entry["charges"]), entry
    assert len(new_entries) <= 1 and all(_is_charge_of(row, step) for row in new_rows), (new_entries, new_rows)
    for reply in released:
        assert reply["epsilon"] <= after.spent + 1e-9, "the ledger under-counts a released reply"
        sent = [e for e in new_entries if e["status"] == "sent" and e["message_type"] == step.message_type
                and e["round"] == step.round]
        assert len(sent) == 1, f"released {step.name} without its egress-log entry"
        if sent[0]["charges"]:  # computed afresh: charged by this very child
            assert sent[0]["epsilon"] > 0 and not before.stored
            assert set(sent[0]["charges"]) <= {row["charge"] for row in new_rows}, (sent[0], new_rows)
        else:  # a replay: its release was charged (and stored) before this child began
            assert before.stored == reply["digest"], "replayed something other than the stored release"
            assert any(_is_charge_of(r, step) for r in before.rows), f"replayed an uncharged release: {sent[0]}"
    return new_entries


def _assert_recovery(before: Books, after: Books, step: Step, outcome: Outcome,
                     killed: Outcome) -> str:
    """(c): the same request again replays the stored release uncharged, or charges anew."""
    assert not outcome.killed and len(outcome.released) == 1
    assert after.leftovers == [], after.leftovers  # the recovery's own writes removed the kill's debris
    reply = outcome.released[0]
    entry = _assert_books(before, after, step, outcome.released)[0]
    new_rows = after.rows[len(before.rows):]
    if killed.released:  # the killed child's reply may have reached the coordinator: the same content
        assert reply["digest"] == killed.released[0]["digest"]
    if before.stored:
        assert not new_rows and entry["charges"] == [] and reply["digest"] == before.stored
        paid = [row["charge"] for row in after.rows if _is_charge_of(row, step)]
        assert entry.get("replay_of") and set(entry["replay_of"]) <= set(paid), (entry, paid)
        named = {seq for e in after.entries if e["status"] == "sent" for seq in e["charges"] + e.get("replay_of", [])}
        assert set(entry["replay_of"]) <= named  # every charge tied to a reply that carried its release
        return "replayed"
    assert new_rows and entry["charges"] == [row["charge"] for row in new_rows], (entry, new_rows)
    assert after.stored == reply["digest"], "a fresh release was not stored for its replay"
    return "charged anew"


# ---------------------------------------------------------------------------------------------
# Setting up: a small cohort, one clean run, a snapshot of the site before each message


def _copy_site(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    shutil.copytree(src / "vault", dst / "vault")
    shutil.copy2(src / "key", dst / "key")
    return dst


def _inputs(site: Path) -> dict[str, Any]:
    """What the coordinator sends: the model layout, round 1's weights and the shared scaler."""
    from client.cohort_store import load_cohort
    from client.pipeline import SiteData, deep_config, fit_shared_scaler
    from client.vault import KeySource, Vault
    from common.models import build_model

    data = SiteData.from_cohort(load_cohort(Vault.open(site / "vault", KeySource.from_key_file(site / "key"))))
    model = deep_config(data, arch=_settings().arch, **TINY_MODEL)
    shared = fit_shared_scaler(data, max_glm_columns=_settings().glm_max_features).to_arrays()
    return {"model-config": json.dumps(model.to_dict()),
            "train-1": {k: v.numpy() for k, v in build_model(model).state_dict().items()},
            "shared": {k: np.asarray(v, dtype=np.int64 if k == "glm_columns" else np.float64)
                       for k, v in shared.items()}}


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from simulations.site_layout import split_cohort
    from simulations.synthetic import write_synthetic_cohort

    root = tmp_path_factory.mktemp("ledger-kills")
    write_synthetic_cohort(out=root / "cohort", patients=160, seed=3, sequence_length=100, variants=40, omics=20)
    split_cohort(spec_path=root / "cohort" / "spec.toml", sites=2, by="iid", out=root / "sites", seed=0,
                 vaults=True, show_progress=False)
    return root / "sites" / SITE


def _clean_run(site: Site, base: Path, snapshots: Path, inputs: dict[str, Any]) -> dict[str, float]:
    """Answer every step once, unkilled, keeping a snapshot of the site before each; returns their seconds."""
    from client.model_store import arrays_from_bytes, run_role
    from client.vault import KeySource, Vault

    seconds = {}
    for step in STEPS:
        _copy_site(base, snapshots / step.name)
        outcome = site.run(base, step)
        assert not outcome.killed and outcome.released, step
        seconds[step.name] = outcome.seconds
        if step.name == "train-1":  # round 2 starts from round 1's reply (one site: FedAvg of one)
            vault = Vault.open(base / "vault", KeySource.from_key_file(base / "key"))
            inputs["train-2"] = inputs["train-2-again"] = arrays_from_bytes(
                vault.read(run_role(RUN_ID, "cnn-release")))[0]
    return seconds


# ---------------------------------------------------------------------------------------------
# The campaign


def _kill_and_recover(site: Site, snapshot: Path, where: Path, step: Step, inputs: dict[str, Any],
                      **kill: Any) -> tuple[Outcome, str]:
    """Kill one child answering ``step`` from ``snapshot``, check the books, then send it again."""
    _copy_site(snapshot, where)
    start = _books(where, step, inputs)
    killed = site.run(where, step, **kill)
    after_kill = _books(where, step, inputs)
    _assert_books(start, after_kill, step, killed.released)
    again = site.run(where, step)
    result = _assert_recovery(after_kill, _books(where, step, inputs), step, again, killed)
    shutil.rmtree(where)
    return killed, result


def test_a_killed_site_never_releases_uncharged_or_unlogged(layout: Path, tmp_path: Path) -> None:
    t0 = time.perf_counter()
    inputs = _inputs(layout)
    base = _copy_site(layout, tmp_path / "base")
    site = Site(tmp_path, inputs)
    seconds = _clean_run(site, base, tmp_path / "snapshots", inputs)
    tally = Tally()
    rng = random.Random(5)
    for step in STEPS:
        snapshot = tmp_path / "snapshots" / step.name

        def attempt(how: str, **kill: Any) -> tuple[Outcome, str]:
            outcome, result = _kill_and_recover(site, snapshot, tmp_path / f"k-{tally.runs}", step, inputs, **kill)
            tally.note(step, how, outcome, result)
            return outcome, result

        for k in range(200):  # every kill point, until the child completes without reaching k
            killed, _ = attempt("at a kill point", kill_at=k)
            if not killed.killed:
                assert killed.ops == k, "the child completed before its last kill point"
                break
        else:
            raise AssertionError(f"{step.name}: the child never completed")
        _, result = attempt("after its reply", kill_after_reply=True)
        assert result == "replayed"  # died before Flower sent it: the coordinator's retry pays nothing again
        for _ in range(RANDOM_KILLS):
            attempt("after a random delay", delay=rng.uniform(0.0, 1.2 * seconds[step.name]))

    print(tally.report(time.perf_counter() - t0))
    places = {place for _, place in tally.landed}
    for place in ("ledger write, before its commit", "ledger write, after its commit", "after the ledger write",
                  "stored-release write, before its commit", "stored-release write, after its commit",
                  "after the stored-release write", "egress write, before its commit",
                  "egress write, after its commit", "after the egress write", "after the reply was produced"):
        assert place in places, f"no kill landed at: {place}"
    assert any(name == "train-1" and "start-weights" in place for name, place in tally.landed)  # before the charge
    assert tally.kills["after a random delay"] >= 1, "no random-delay kill landed"
    assert {"replayed", "charged anew"} <= set(tally.recovered)
    assert sum(tally.recovered.values()) == tally.runs


@dataclass
class Tally:
    """Where the kills landed, how each was made, and how the next request was answered."""

    landed: Counter[tuple[str, str]] = field(default_factory=Counter)
    kills: Counter[str] = field(default_factory=Counter)
    completed: Counter[str] = field(default_factory=Counter)
    recovered: Counter[str] = field(default_factory=Counter)
    runs: int = 0

    def note(self, step: Step, how: str, outcome: Outcome, result: str) -> None:
        self.runs += 1
        self.recovered[result] += 1
        if outcome.killed:
            self.landed[(step.name, outcome.landing())] += 1
            self.kills[how] += 1
        else:
            self.completed[how] += 1

    def report(self, seconds: float) -> str:
        lines = [f"\nledger kills: {sum(self.kills.values())} kills in {self.runs} runs (each followed by a "
                 f"fresh child sent the same request), {seconds:.0f} s"]
        lines += [f"  killed {how}: {n} (completed before the kill: {self.completed[how]})"
                  for how, n in sorted(self.kills.items())]
        lines += [f"  {name:14s} {place:42s} {n:3d}" for (name, place), n in sorted(self.landed.items())]
        lines.append("  next request: " + ", ".join(f"{k} {v}" for k, v in sorted(self.recovered.items())))
        return "\n".join(lines)
