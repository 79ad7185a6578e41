"""Poisoning: one of five sites sends a bad CNN update every round, under each aggregation rule.

In process (real ServerApp phases, real ClientApp and vaults over a LocalGrid, no DP, exact test
statistics, one run id for every run so that only the attack differs) on splice over 5 sites
(``genofed cohort recipe splice --sites 5``: a CNN that learns in three rounds). Site 5 trains honestly, then its reply is replaced by
an attack before it leaves: NaN or Inf weights, a wrong shape, an update scaled x100 (beyond the
derived norm bound) and a 10x example count must be rejected by validation every round; a
sign-flipped update and random noise of the honest update's norm pass validation and are
measured under each rule: the pooled test AUC of the federated deep model and of the hybrid
against the clean run of the same rule.
``pytest -s`` prints the table docs/security.md quotes. CI runs FedAvg and FedTrimmedAvg for three
rounds of one local epoch and asserts that no attack breaks the deep model or moves the hybrid; ``GENOFED_POISONING_DEFAULTS=1`` runs the four rules at the default
``cnn-rounds`` and ``local-epochs`` (about 25 minutes), where the default rule must keep every drop
under 0.02 that a robust rule keeps under 0.02.
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Message

from client.client_app import app as client_app
from common.records import from_record, to_record
from common.settings import RunSettings
from server.server_app import run_federation
from server.phases import RunState
from simulations import recipes
from simulations.site_layout import set_layout_policy
from tests.local_grid import LocalGrid, node_configs

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

pytestmark = [pytest.mark.attack, pytest.mark.realdata, pytest.mark.slow, pytest.mark.timeout(1200),
              pytest.mark.skipif(not DATA.is_dir(), reason=f"shared data folder {DATA} not present")]

ATTACKER = 105  # site-5
RUN = dict(dp=False, cnn_rounds=3, local_epochs=1, forest_trees=20, wait_timeout=2.0, round_timeout=60.0,
           test_statistics="exact", site_alone=False, glm_rounds=2, explain=False, krum_byzantine=1, seed=0)
RULES = ("fedavg", "fedmedian", "fedtrimmedavg", "krum")
AT_DEFAULTS = os.environ.get("GENOFED_POISONING_DEFAULTS") == "1"
MATRIX_RULES = RULES if AT_DEFAULTS else ("fedavg", "fedtrimmedavg")
MATRIX = {**RUN, **({"cnn_rounds": RunSettings().cnn_rounds, "local_epochs": RunSettings().local_epochs}
                    if AT_DEFAULTS else {})}
Arrays = dict[str, np.ndarray]


def _floats(arrays: Arrays) -> list[str]:
    return [k for k, v in arrays.items() if np.issubdtype(v.dtype, np.floating)]


def _scaled(factor: float) -> Callable[..., tuple[Arrays, int]]:
    def attack(g: Arrays, w: Arrays, n: int, rng: np.random.Generator) -> tuple[Arrays, int]:
        return {k: (g[k] + factor * (w[k] - g[k])).astype(w[k].dtype) if k in _floats(w) else w[k] for k in w}, n
    return attack


def _noise(g: Arrays, w: Arrays, n: int, rng: np.random.Generator) -> tuple[Arrays, int]:
    keys = _floats(w)
    norm = np.sqrt(sum(float(np.sum((w[k] - g[k]) ** 2)) for k in keys))
    draws = {k: rng.normal(size=w[k].shape) for k in keys}
    scale = norm / np.sqrt(sum(float(np.sum(d ** 2)) for d in draws.values()))
    return {k: (g[k] + scale * draws[k]).astype(w[k].dtype) if k in keys else w[k] for k in w}, n


def _poke(value: float) -> Callable[..., tuple[Arrays, int]]:
    def attack(g: Arrays, w: Arrays, n: int, rng: np.random.Generator) -> tuple[Arrays, int]:
        k = _floats(w)[0]
        bad = w[k].copy()
        bad.flat[0] = value
        return {**w, k: bad}, n
    return attack


def _shape(g: Arrays, w: Arrays, n: int, rng: np.random.Generator) -> tuple[Arrays, int]:
    k = _floats(w)[0]
    return {**w, k: w[k].ravel()[:-1]}, n


def _count(g: Arrays, w: Arrays, n: int, rng: np.random.Generator) -> tuple[Arrays, int]:
    return w, 10 * n


REJECTED = {"NaN": _poke(np.nan), "Inf": _poke(np.inf), "wrong shape": _shape, "x100": _scaled(100.0),
            "10x example count": _count}
ACCEPTED = {"sign flip": _scaled(-1.0), "random noise": _noise}


def _poisoned(attack: Callable[..., tuple[Arrays, int]] | None, seen: list[str], *,
              before: bool = False) -> Callable[[Message, Any], Message]:
    """The ClientApp, with site 5's CNN replies replaced by ``attack`` of them (``seen`` gets each
    round's group id; ``before``: appended before the attack runs, so it can count rounds)."""
    rng = np.random.default_rng(7)

    def app(msg: Message, ctx: Any) -> Message:
        reply = client_app(msg, ctx)
        if attack is None or ctx.node_id != ATTACKER or msg.metadata.message_type != "train":
            return reply
        if before:
            seen.append(msg.metadata.group_id)
        g = from_record(msg.content.array_records["arrays"])
        w = from_record(reply.content.array_records["arrays"])
        metrics = reply.content.metric_records["metrics"]
        arrays, n = attack(g, w, int(metrics["num-examples"]), rng)
        reply.content["arrays"] = to_record(arrays)
        metrics["num-examples"] = n
        if not before:
            seen.append(msg.metadata.group_id)
        return reply

    return app


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("poison")
    rng = random.Random(0)  # fixed vault keys: sites seed local training from them, so runs repeat exactly
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("client.vault.secrets.token_bytes", lambda n=32: rng.randbytes(n))
        recipes.run_recipe("splice", data=DATA, sites=5, out=root / "sites", vaults=True, seed=0,
                           show_progress=False)
    set_layout_policy(root / "sites", require_dp=False, test_statistics="exact")
    return root / "sites"


@pytest.fixture(autouse=True)
def one_run_id(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sites seed their forests and training from the run id: one id, so only the attack differs."""
    monkeypatch.setattr("server.server_app.new_state", lambda: RunState(run_id="poisoning001"))


def _run(sites: Path, tmp: Path, name: str, rule: str, attack: Any) -> tuple[dict[str, Any], list[str]]:
    copy = tmp / f"sites-{name}-{rule}"
    shutil.copytree(sites, copy)
    seen: list[str] = []
    settings = RunSettings(run_dir=str(tmp / f"run-{name}-{rule}"), strategy=rule, **MATRIX)
    grid = LocalGrid(_poisoned(attack, seen), node_configs(copy), run_config=settings.to_run_config())
    return run_federation(grid, settings), seen


def _auc(doc: dict[str, Any]) -> tuple[float, float]:
    return doc["models"]["cnn"]["auc"], doc["models"]["hybrid"]["auc"]


def test_malformed_and_scaled_updates_are_rejected(sites: Path, tmp_path: Path) -> None:
    names = list(REJECTED)  # one run, one attack a round

    def by_round(g: Arrays, w: Arrays, n: int, rng: np.random.Generator) -> tuple[Arrays, int]:
        return REJECTED[names[len(seen) - 1]](g, w, n, rng)

    copy = tmp_path / "sites-rejected"
    shutil.copytree(sites, copy)
    seen: list[str] = []
    settings = RunSettings(run_dir=str(tmp_path / "run-rejected"), **{**RUN, "cnn_rounds": len(names)})
    app = _poisoned(by_round, seen, before=True)
    doc = run_federation(LocalGrid(app, node_configs(copy), run_config=settings.to_run_config()), settings)
    cnn = [r for r in doc["rounds"] if r.get("phase") == "cnn"]
    assert len(seen) == len(cnn) == len(names)
    for name, r in zip(names, cnn):
        assert "site-5" in r["rejected"] and "site-5" not in r["sites"] and len(r["sites"]) == 4, (name, r)
        print(f"{name}: rejected: {r['rejected']['site-5']}")
    assert "site-5" not in doc["missing_sites"]  # a rejected update is not a failed site


def test_updates_that_pass_validation_measured_under_every_rule(sites: Path, tmp_path: Path) -> None:
    clean = {rule: _auc(_run(sites, tmp_path, "clean", rule, None)[0]) for rule in MATRIX_RULES}
    rows = []
    for name, attack in ACCEPTED.items():
        for rule in MATRIX_RULES:
            doc, seen = _run(sites, tmp_path, name.replace(" ", "-"), rule, attack)
            cnn_rounds = [r for r in doc["rounds"] if r.get("phase") == "cnn"]
            rejected = sum("site-5" in r["rejected"] for r in cnn_rounds)
            cnn, hybrid = _auc(doc)
            rows.append((name, rule, rejected, clean[rule][0], cnn, clean[rule][1], hybrid))
    print(f"\n{MATRIX['cnn_rounds']} CNN rounds of {MATRIX['local_epochs']} local epochs")
    print("| attack | rule | rounds rejected | CNN AUC clean | CNN AUC attacked | drop | hybrid clean | hybrid "
          "attacked | drop |\n|---|---|---|---|---|---|---|---|---|")
    for name, rule, rejected, c0, c1, h0, h1 in rows:
        print(f"| {name} | {rule} | {rejected}/{MATRIX['cnn_rounds']} | {c0:.3f} | {c1:.3f} | {c0 - c1:+.3f} | "
              f"{h0:.3f} | {h1:.3f} | {h0 - h1:+.3f} |")
    print("clean: " + ", ".join(f"{rule} CNN {c:.3f} hybrid {h:.3f}" for rule, (c, h) in clean.items()))
    assert clean["fedavg"][0] > 0.8  # the clean federation learns, or the drops below mean nothing
    drop = {(name, rule): c0 - c1 for name, rule, _, c0, c1, _, _ in rows}
    assert all(rejected == 0 for _, _, rejected, *_ in rows)  # they pass validation
    if AT_DEFAULTS:
        # The default rule keeps every drop under 0.02 that some robust rule keeps under 0.02.
        for name in ACCEPTED:
            if min(drop[(name, rule)] for rule in MATRIX_RULES) < 0.02:
                assert drop[(name, "fedavg")] < 0.02, (name, drop)
    else:
        # Three short rounds: a flipped or random fifth of the mean slows the deep model's learning
        # (0.01-0.05 of AUC, varying with the sites' keys) and never breaks it; the hybrid, whose
        # forest carries it, does not move.
        assert all(d < 0.1 for d in drop.values()), drop
        assert all(abs(h0 - h1) < 0.01 for *_, h0, h1 in rows), rows
