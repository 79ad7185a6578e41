"""A hospital owns its privacy: policy, façade, egress contract and log, coordinator-side rejections.

In process (real ServerApp phases, real ClientApp, real vaults and ledgers over a LocalGrid) on
sites created with the *default* policy, as a hospital would import them.
"""

from __future__ import annotations

import json
import multiprocessing
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from client.client_app import EgressBlocked
from client.client_app import app as client_app
from client.privacy.egress import EgressLog
from client.privacy.facade import load_policy
from client.privacy.ledger import PrivacyLedger, Release
from client.vault import KeySource, Vault
from common.records import from_record, to_record
from common.settings import RunSettings
from server.phases import CensusError
from server.server_app import run_federation
from simulations.site_layout import set_layout_policy, split_cohort
from simulations.synthetic import write_synthetic_cohort
from tests.local_grid import LocalGrid, node_configs

FAST = dict(cnn_rounds=2, local_epochs=1, forest_trees=20, wait_timeout=2.0, round_timeout=120.0, epsilon=3.0, site_alone=False,
            glm_rounds=2)


def _layout(root: Path, patients: int) -> Path:
    write_synthetic_cohort(out=root / "cohort", patients=patients, seed=5)
    split_cohort(spec_path=root / "cohort" / "spec.toml", sites=3, by="iid", out=root / "sites", seed=0,
                 vaults=True, show_progress=False)
    return root / "sites"


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _layout(tmp_path_factory.mktemp("policy"), 300)


@pytest.fixture()
def sites(template: Path, tmp_path: Path) -> Path:
    shutil.copytree(template, tmp_path / "sites")
    return tmp_path / "sites"


def _vaults(sites: Path) -> dict[str, Vault]:
    return {p.name: Vault.open(p / "vault", KeySource.from_key_file(p / "key"))
            for p in sorted(q for q in sites.iterdir() if (q / "vault").is_dir())}


def _run(sites: Path, run_dir: Path, *, app: Any = client_app, fail: Any = None, **settings: Any) -> dict:
    run = RunSettings(run_dir=str(run_dir), **{**FAST, **settings})
    grid = LocalGrid(app, node_configs(sites), run_config=run.to_run_config(), fail=fail)
    return run_federation(grid, run)


# ---------------------------------------------------------------------------------------------
# Policy


def test_import_creates_the_protective_default_policy(sites: Path) -> None:
    for vault in _vaults(sites).values():
        p = load_policy(vault)
        assert (p.require_dp, p.budget_epsilon, p.max_run_epsilon, p.test_statistics) == (True, 10.0, 10.0, "noised")
        assert p.delta <= 1e-5
        assert PrivacyLedger.load(vault).spent_epsilon() == 0.0


def test_default_policy_refuses_a_run_without_dp(sites: Path, tmp_path: Path) -> None:
    # the three sites refused for one reason: named together, the reason said once
    with pytest.raises(CensusError, match=r"site-1, site-2, site-3: census: refused by the site's privacy policy: "
                                          r"its policy requires differential privacy and the run asks for dp = false"):
        _run(sites, tmp_path / "run", dp=False)
    log = (tmp_path / "run" / "run.log").read_text().splitlines()
    assert sum("refuses the run: its policy requires differential privacy" in line for line in log) == 3
    failed = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert failed["run"]["status"] == "failed" and failed["models"] == {}
    assert set(failed["refusals"]) == {"site-1", "site-2", "site-3"}
    for vault in _vaults(sites).values():
        assert PrivacyLedger.load(vault).spent_epsilon() == 0.0


@pytest.mark.slow
def test_refusals_are_named_in_metrics_when_the_others_go_on(sites: Path, tmp_path: Path) -> None:
    set_layout_policy(sites, max_run_epsilon=5.0)
    vault = _vaults(sites)["site-3"]
    from client.privacy.facade import set_policy

    set_policy(vault, site="site-3", n_records=100, max_run_epsilon=10.0)
    doc = _run(sites, tmp_path / "run", epsilon=6.0, min_sites=1, test_statistics="none")
    assert set(doc["refusals"]) == {"site-1", "site-2"}
    assert all("the run asks for epsilon 6, above the site's max-run-epsilon 5" in r for r in doc["refusals"].values())
    on_disk = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(on_disk["refusals"]) == {"site-1", "site-2"} and set(on_disk["sites"]) == {"site-3"}


def test_an_epsilon_above_max_run_epsilon_is_refused(sites: Path, tmp_path: Path) -> None:
    set_layout_policy(sites, max_run_epsilon=5.0)
    with pytest.raises(CensusError, match=r"the run asks for epsilon 8, above the site's max-run-epsilon 5"):
        _run(sites, tmp_path / "run", epsilon=8.0)


@pytest.mark.slow
def test_a_looser_delta_or_test_release_is_refused_a_stricter_one_honoured(sites: Path, tmp_path: Path) -> None:
    with pytest.raises(CensusError, match=r"the run asks for delta 0.5, above the site's delta 1e-05"):
        _run(sites, tmp_path / "a", delta=0.5)
    with pytest.raises(CensusError, match=r"test-statistics = exact, the site's policy allows at most noised"):
        _run(sites, tmp_path / "b", test_statistics="exact")
    doc = _run(sites, tmp_path / "c", delta=1e-7, test_statistics="none", cnn_rounds=1)
    assert doc["models"] == {} and doc["test_statistics"]["mode"] == "none"
    for vault in _vaults(sites).values():
        labels = {r.label for r in PrivacyLedger.load(vault).releases}
        # no test-statistics release; no meta statistics either (public weights: meta-dp-rounds = 0)
        assert labels == {"moments", "cnn-update", "glm-statistics", "explanation"}


@pytest.mark.slow
def test_coordinator_sent_budget_or_delta_changes_nothing(sites: Path, tmp_path: Path) -> None:
    """Privacy numbers in a message are ignored: a site reads its request from the run config only."""
    def inject(node: int, msg: Message) -> None:
        cfg = msg.content.config_records["config"]
        cfg.update({"site-epsilon-budget": 1e6, "site-delta": 0.99, "dp": False, "epsilon": 1e3,
                    "test-statistics": "exact"})
        return None

    doc = _run(sites, tmp_path / "run", fail=inject)
    for site, vault in _vaults(sites).items():
        ledger = PrivacyLedger.load(vault)
        assert (ledger.budget_epsilon, ledger.delta) == (10.0, 1e-5)
        assert [h["change"] for h in ledger.budget_history] == ["created"]
        # DP-SGD 3, moments 2, GLM 1, validation 1, explanation 1, test 1, composed (no meta statistics:
        # public weights)
        assert 3.0 < ledger.spent_epsilon() < 5.5, (site, ledger.spent_epsilon())
        assert {r.label for r in ledger.releases} == {"moments", "cnn-update", "glm-statistics",
                                                      "validation-statistics", "explanation", "test-statistics"}
    assert doc["test_statistics"]["mode"] == "noised"


# ---------------------------------------------------------------------------------------------
# Releases: once per run, distinct noise


def _context(sites: Path, site: str, run: RunSettings) -> Context:
    cfg = next(c for c in node_configs(sites) if c["site"] == site)
    return Context(run_id=1, node_id=101, node_config=cfg, state=RecordDict(), run_config=run.to_run_config())


@pytest.mark.slow
def test_a_second_evaluation_request_gets_the_stored_release(sites: Path, tmp_path: Path) -> None:

    doc = _run(sites, tmp_path / "run")
    vault = _vaults(sites)["site-1"]
    spent = PrivacyLedger.load(vault).spent_epsilon()
    first_eval = [e for e in EgressLog(vault).entries() if e["message_type"] == "evaluate"]
    assert len(first_eval) == 1 and first_eval[0]["epsilon"] > 0
    from client.model_store import CNN_ROLE, SHARED_ROLE, arrays_from_bytes

    cnn, meta = arrays_from_bytes(vault.read(CNN_ROLE))
    shared, _ = arrays_from_bytes(vault.read(SHARED_ROLE))
    run = RunSettings(**{**FAST})
    coef = [c + 1.0 for c in doc["meta"]["coef"]]  # another request: other coefficients
    msg = Message(RecordDict({"cnn": to_record(cnn), "shared": to_record(shared), "config": ConfigRecord(
        {"run-id": doc["run"]["run_id"], "server-round": 0, "warm-start": False, "coef": coef,
         "model-config": json.dumps(meta["config"])})}), dst_node_id=101, message_type="evaluate", group_id="again")
    again = client_app(msg, _context(sites, "site-1", run))
    vault = _vaults(sites)["site-1"]
    assert PrivacyLedger.load(vault).spent_epsilon() == pytest.approx(spent)  # not charged again
    stats = from_record(again.content.array_records["stats"])
    evals = [e for e in EgressLog(vault).entries() if e["message_type"] == "evaluate"]
    assert len(evals) == 2 and evals[1]["epsilon"] == 0.0 and evals[1]["keys"] == evals[0]["keys"]
    from client.model_store import arrays_from_bytes as unpack
    from client.model_store import run_role

    stored, _ = unpack(vault.read(run_role(doc["run"]["run_id"], "evaluate-release")))
    for key, value in stats.items():
        np.testing.assert_array_equal(value, stored[key])


def _release_many(vault_path: str, key_path: str, count: int, out: Any) -> None:
    from client.privacy.facade import SitePrivacy

    vault = Vault.open(Path(vault_path), KeySource.from_key_file(Path(key_path)))
    seeds = []
    for i in range(count):
        privacy = SitePrivacy.open(vault, site="site-1", settings=RunSettings(), run_id="same-run", n_records=100)
        release = Release.gaussian(noise_multiplier=50.0, label="test-statistics", run_id="same-run", round=i)
        seeds.append(privacy.release(release, purpose="noise"))
    out.put(seeds)


def test_two_processes_handling_one_site_never_draw_the_same_noise(sites: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    site = sites / "site-1"
    procs = [ctx.Process(target=_release_many, args=(str(site / "vault"), str(site / "key"), 5, out))
             for _ in range(2)]
    for p in procs:
        p.start()
    seeds = out.get(timeout=120) + out.get(timeout=120)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert len(seeds) == 10 and len(set(seeds)) == 10
    ledger = PrivacyLedger.load(_vaults(sites)["site-1"])
    assert len(ledger.per_round()) == 10 and len({row["charge"] for row in ledger.per_round()}) == 10


# ---------------------------------------------------------------------------------------------
# Egress


def test_a_reply_breaking_the_egress_contract_is_not_sent(sites: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from client import handlers

    real = handlers.census

    def leaky(site: Any, settings: Any, facts: Any) -> Any:
        reply = real(site, settings, facts)
        reply.values("census")["patient-ids"] = "P001,P002"
        return reply

    monkeypatch.setattr(handlers, "census", leaky)

    msg = Message(RecordDict({"config": ConfigRecord({"run-id": "r1"})}), dst_node_id=101,
                  message_type="query.census", group_id="c")
    with pytest.raises(EgressBlocked, match=r"blocked by the site's egress contract \(nothing was sent\): "
                                            r"undeclared key census.patient-ids"):
        client_app(msg, _context(sites, "site-1", RunSettings()))
    entries = EgressLog(_vaults(sites)["site-1"]).entries()
    assert [e["status"] for e in entries] == ["blocked"] and "patient-ids" in entries[0]["reason"]


@pytest.mark.slow
def test_egress_is_the_same_at_300_and_3000_patients_and_every_dp_release_is_in_the_ledger(
        template: Path, tmp_path: Path) -> None:
    small = tmp_path / "small"
    shutil.copytree(template, small)
    large = _layout(tmp_path / "large", 3000)
    logs = {}
    for name, sites in (("small", small), ("large", large)):
        # One noised meta round (meta-dp-rounds = 1; the default has none), so that its release is checked too.
        doc = _run(sites, tmp_path / f"run-{name}", cnn_rounds=1, meta_dp_rounds=1)
        logs[name] = {}
        for site, vault in _vaults(sites).items():
            # The plan the site checked at the census never under-states what the run then charged.
            charged = PrivacyLedger.load(vault).to_summary()["runs"][doc["run"]["run_id"]]["epsilon"]
            planned = doc["census"][site]["plan-epsilon"]
            assert charged <= planned + 1e-9 and planned < charged + 0.25, (name, site, planned, charged)
            entries = EgressLog(vault).entries()
            logs[name][site] = [(e["message_type"], e["round"], e["keys"]) for e in entries]
            ledger = PrivacyLedger.load(vault)
            seqs = {row["charge"]: row for row in ledger.per_round()}
            assert all(e["status"] == "sent" for e in entries)
            charged = [seq for e in entries for seq in e["charges"]]
            assert sorted(charged) == sorted(seqs)  # every charge left in exactly one logged reply
            for e in entries:
                if e["epsilon"] > 0:
                    assert e["charges"] and all(seq in seqs for seq in e["charges"])
    assert logs["small"] == logs["large"]  # sizes never grow with the number of patients
    kinds = {m for m, _, _ in logs["small"]["site-1"]}
    assert kinds == {"query.census", "query.moments", "train", "train.glm", "train.meta", "query.validation",
                     "query.explain", "evaluate"}
    released = {m: set(keys) for m, _, keys in logs["small"]["site-1"] if m in ("query.validation", "evaluate")}
    # The reduced stacks (the fallback's candidates) are released on validation only.
    assert released["query.validation"] - released["evaluate"] == {
        f"stats.hybrid-without-{m}.{h}" for m in ("cnn", "forest", "logreg", "site-logreg", "cnn-logreg")
        for h in ("hist_pos", "hist_neg")}


# ---------------------------------------------------------------------------------------------
# The coordinator rejects and names


def _tampering_app(tamper: dict[tuple[int, str, int], Any]) -> Any:
    """The real ClientApp, whose reply one site then corrupts (a poisoned or buggy site)."""
    def call(msg: Message, ctx: Context) -> Message:
        reply = client_app(msg, ctx)
        key = (ctx.node_id, msg.metadata.message_type, int(msg.content.config_records["config"]["server-round"]))
        if key in tamper:
            tamper[key](msg, reply)
        return reply

    return call


def _scale_update(msg: Message, reply: Message) -> None:
    start = from_record(msg.content.array_records["arrays"])
    new = from_record(reply.content.array_records["arrays"])
    reply.content["arrays"] = to_record({k: (start[k] + 100.0 * (new[k] - start[k])).astype(new[k].dtype)
                                         for k in new})


def _inflate(msg: Message, reply: Message) -> None:
    reply.content["metrics"]["num-examples"] = 10**6


def _nan_terms(msg: Message, reply: Message) -> None:
    terms = from_record(reply.content.array_records["terms"])
    terms["grad"][0] = np.nan
    reply.content["terms"] = to_record(terms)


@pytest.mark.slow
def test_poisoned_updates_and_terms_are_rejected_and_named(sites: Path, tmp_path: Path) -> None:
    app = _tampering_app({(101, "train", 1): _scale_update, (102, "train", 2): _inflate,
                          (103, "train.meta", 1): _nan_terms})
    doc = _run(sites, tmp_path / "run", app=app, min_sites=2, meta_dp_rounds=1)  # a noised meta round to poison
    cnn = [r for r in doc["rounds"] if r["phase"] == "cnn"]
    assert set(cnn[0]["rejected"]) == {"site-1"} and "norm" in cnn[0]["rejected"]["site-1"]
    assert set(cnn[1]["rejected"]) == {"site-2"}
    assert "num-examples 1000000 exceeds bound" in cnn[1]["rejected"]["site-2"]
    assert "site-3" in doc["missing_sites"] and "non-finite" in doc["missing_sites"]["site-3"]
    log = (tmp_path / "run" / "run.log").read_text()
    assert "update of site site-1 rejected" in log and "terms of site site-3 rejected" in log


# ---------------------------------------------------------------------------------------------
# The privacy officer's commands


def test_policy_command_shows_sets_and_refuses_a_silent_raise(sites: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from simulations.cli import main

    vault, key = str(sites / "site-1" / "vault"), str(sites / "site-1" / "key")
    assert main(["ledger", "policy", vault, "--key-file", key]) == 0
    assert "require-dp yes; budget epsilon 10 at delta 1e-05; max-run-epsilon 10; test-statistics noised " \
           "(test-epsilon 1); require-secure-sum no; distributed-noise yes; stack-forest yes" in capsys.readouterr().out
    assert main(["ledger", "policy", vault, "--key-file", key, "--require-dp", "no", "--max-run-epsilon", "4",
                 "--test-statistics", "none", "--require-secure-sum", "yes", "--stack-forest", "no"]) == 0
    assert "site policy updated: require-dp no" in capsys.readouterr().out
    assert main(["ledger", "policy", vault, "--key-file", key, "--budget", "20"]) == 1
    err = capsys.readouterr().err
    assert "refusing to raise the privacy budget" in err and len(err.strip().splitlines()) == 1
    assert main(["ledger", "policy", vault, "--key-file", key, "--budget", "20", "--allow-raise", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["policy"] == {"require_dp": False, "budget_epsilon": 20.0, "delta": 1e-5, "max_run_epsilon": 4.0,
                             "test_statistics": "none", "test_epsilon": 1.0, "require_secure_sum": True,
                             "distributed_noise": True, "stack_forest": False}
    assert [h["change"] for h in doc["budget_history"]] == ["created", "raised"]
    assert doc["history"][-1]["change"]["require-dp"] == [True, False]
    with pytest.raises(SystemExit) as stop:  # argparse: one usage line, exit 2
        main(["ledger", "policy", vault, "--key-file", key, "--test-statistics", "loud"])
    assert stop.value.code == 2


@pytest.mark.slow
def test_egress_command_lists_every_reply(sites: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from simulations.cli import main

    vault, key = str(sites / "site-2" / "vault"), str(sites / "site-2" / "key")
    assert main(["ledger", "egress", vault, "--key-file", key]) == 0
    assert "nothing has left this site" in capsys.readouterr().out
    _run(sites, tmp_path / "run", cnn_rounds=1)
    capsys.readouterr()
    assert main(["ledger", "egress", vault, "--key-file", key, "--json"]) == 0
    entries = json.loads(capsys.readouterr().out)["entries"]
    kinds = [e["message_type"] for e in entries]
    # Under DP the GLM takes one round (a noised gradient), whatever glm-rounds says, and the stack's
    # weights are public (meta-dp-rounds = 0): no train.meta.
    assert kinds == ["query.census", "query.moments", "train", "train.glm", "query.validation", "query.explain",
                     "evaluate"]
    assert [k for k in entries[3]["keys"] if k.startswith("terms.")] == ["terms.grad"]  # no Hessian
    assert entries[2]["epsilon"] > 0 and any(k.startswith("arrays.") for k in entries[2]["keys"])
    assert all("metrics.train-loss" not in e["keys"] for e in entries)  # no loss leaves under DP
    assert main(["ledger", "egress", vault, "--key-file", key]) == 0
    out = capsys.readouterr().out
    assert f"{len(kinds)} replies" in out and "egress log (values are never logged)" in out


def test_the_run_plan_counts_the_validation_release_for_any_number_of_classes(sites: Path) -> None:
    """Multi-class runs release validation statistics too (the stacking fallback reads them), so
    the plan a site checks at the census must include that release, not only the test one."""
    from client.privacy.facade import SitePrivacy

    vault = Vault.open(sites / "site-1" / "vault", KeySource.from_key_file(sites / "site-1" / "key"))
    for dp in (True, False):
        settings = RunSettings(dp=dp, test_statistics="noised")
        privacy = SitePrivacy.open(vault, site="site-1", settings=settings, run_id="plan", n_records=100)
        labels = [r.label for r in privacy.plan_run(n_train=70)]
        assert labels.count("validation-statistics") == 1 and labels.count("test-statistics") == 1, labels


def test_the_run_plan_charges_meta_dp_rounds_releases_whatever_meta_rounds_says(sites: Path) -> None:
    """Under DP the meta-classifier's releases are meta-dp-rounds; meta-rounds caps only a fit without DP."""
    from client.privacy.facade import SitePrivacy

    vault = Vault.open(sites / "site-1" / "vault", KeySource.from_key_file(sites / "site-1" / "key"))
    settings = RunSettings(meta_rounds=8, meta_dp_rounds=2)
    privacy = SitePrivacy.open(vault, site="site-1", settings=settings, run_id="plan", n_records=100)
    meta = [r for r in privacy.plan_run(n_train=70) if r.label == "meta-statistics"]
    assert [r.steps for r in meta] == [2]  # one Gaussian release per meta round
    assert privacy.meta_noise_multiplier() < SitePrivacy.open(
        vault, site="site-1", settings=RunSettings(meta_dp_rounds=3), run_id="plan", n_records=100).meta_noise_multiplier()


def test_a_policy_stored_before_secure_sum_reads_as_it_meant() -> None:
    from client.privacy.policy import ADDED_LATER, PolicyError, SitePolicy, parse_policy_blob, policy_blob

    doc = json.loads(policy_blob(SitePolicy(require_dp=False)))
    for key in ADDED_LATER:
        del doc[key]
    fields, _ = parse_policy_blob(json.dumps(doc).encode(), where="site-1")
    assert fields["require_secure_sum"] is False and fields["distributed_noise"] is True
    assert fields["require_dp"] is False
    del doc["test_statistics"]
    with pytest.raises(PolicyError, match="site-1: the site policy lacks test_statistics"):
        parse_policy_blob(json.dumps(doc).encode(), where="site-1")
