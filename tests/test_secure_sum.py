"""The secure sum: the protocol (common/secure_sum.py) and a federated run through it.

Protocol: the unmasked sum equals the survivors' sum with sites dropped; a masked vector alone is
noise to the coordinator; sites refuse to reveal both halves of one site's mask, to unmask with
fewer than the threshold, or shares sealed for another release. Run: with ``secure-sum = true``
the final models equal the plain run's to fixed-point error, the coordinator's view of a round
holds only masked vectors, shares and the sum, a site lost mid-round is unmasked around, DP noise
is distributed, and refused combinations are named.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from client.client_app import app as client_app
from client.privacy.egress import EgressLog
from client.privacy.facade import set_policy
from common import secure_sum as ss
from common.records import from_record
from common.settings import RunSettings, SettingsError
from server.checkpoint import load_latest
from server.phases import CensusError, RunState
from server.server_app import run_federation
from tests.local_grid import LocalGrid, node_configs, reference_layout

FAST = dict(cnn_rounds=2, local_epochs=1, forest_trees=20, wait_timeout=2.0, round_timeout=60.0,
            test_statistics="exact", site_alone=False, glm_rounds=2, explain=False)


def _roster(n: int, threshold: int | None = None) -> tuple[list[ss.SiteKeys], ss.Roster]:
    keys = [ss.SiteKeys.generate() for _ in range(n)]
    pub = [k.public() for k in keys]
    return keys, ss.Roster(tuple(p[0] for p in pub), tuple(p[1] for p in pub), threshold or ss.default_threshold(n))


def _secure_round(keys: list[ss.SiteKeys], roster: ss.Roster, xs: list[np.ndarray], drop: set[int],
                  label: str = "run-cnn-1") -> np.ndarray:
    mask_key = {i: ss.share_mask_key(k, roster) for i, k in enumerate(keys, start=1)}
    parts = list(range(1, len(keys) + 1))
    sent = {i: ss.mask(ss.encode(xs[i - 1]), keys[i - 1], roster, label=label, participants=parts) for i in parts}
    alive = [i for i in parts if i not in drop]
    self_shares: dict[int, list[bytes]] = {u: [] for u in alive}
    key_shares: dict[int, list[bytes]] = {d: [] for d in drop}
    for v in alive:
        opened = ss.reveal(keys[v - 1], roster, label=label, survivors=alive, dropped=sorted(drop),
                           self_mask_shares={u: sent[u][1][v] for u in alive},
                           mask_key_shares={d: mask_key[d][v] for d in drop})
        for u, share in opened[ss.SELF_MASK].items():
            self_shares[u].append(share)
        for d, share in opened[ss.MASK_KEY].items():
            key_shares[d].append(share)
    total = ss.unmask({u: sent[u][0] for u in alive}, roster, label=label, participants=parts,
                      self_mask_shares=self_shares, mask_key_shares=key_shares)
    return ss.decode(total)


@pytest.mark.parametrize("drop", [set(), {2}, {1, 5}])
def test_the_unmasked_sum_is_the_survivors_sum_to_fixed_point_error(drop: set[int]) -> None:
    keys, roster = _roster(5)
    xs = [np.random.default_rng(i).normal(scale=50.0, size=2000) for i in range(5)]
    total = _secure_round(keys, roster, xs, drop)
    expected = sum(xs[i - 1] for i in range(1, 6) if i not in drop)
    assert np.abs(total - expected).max() <= 5 * 2.0 ** -ss.FRACTION_BITS


def test_a_masked_vector_alone_says_nothing_of_its_value() -> None:
    keys, roster = _roster(3)
    x = np.full(4096, 7.0)
    masked, _ = ss.mask(ss.encode(x), keys[0], roster, label="r", participants=[1, 2, 3])
    seen = ss.decode(masked)
    # uniform over 2**64 in fixed point: values spread over +-2**(63 - FRACTION_BITS), nowhere near 7
    assert np.median(np.abs(seen)) > 2.0 ** (60 - ss.FRACTION_BITS)
    assert abs(np.corrcoef(seen[:-1], seen[1:])[0, 1]) < 0.1
    again, _ = ss.mask(ss.encode(x), keys[0], roster, label="r", participants=[1, 2, 3])
    assert not np.array_equal(masked, again)  # a fresh self mask every time


def test_sites_never_reveal_both_halves_of_one_mask_nor_unmask_below_the_threshold() -> None:
    keys, roster = _roster(4)  # threshold 3
    shares = ss.share_mask_key(keys[1], roster)
    _, sealed = ss.mask(ss.encode(np.ones(3)), keys[1], roster, label="r", participants=[1, 2, 3, 4])
    with pytest.raises(ss.SecureSumError, match="named both survivor and dropped"):
        ss.reveal(keys[0], roster, label="r", survivors=[1, 2, 3], dropped=[2], self_mask_shares={2: sealed[1]},
                  mask_key_shares={2: shares[1]})
    with pytest.raises(ss.SecureSumError, match="fewer than the threshold 3"):
        ss.reveal(keys[0], roster, label="r", survivors=[1, 2], dropped=[3, 4], self_mask_shares={2: sealed[1]},
                  mask_key_shares={})
    with pytest.raises(ss.SecureSumError, match="for another release"):
        ss.reveal(keys[0], roster, label="other", survivors=[1, 2, 3], dropped=[4], self_mask_shares={2: sealed[1]},
                  mask_key_shares={})
    with pytest.raises(ss.SecureSumError, match="does not open"):  # sealed for site 1, opened by site 3
        ss.reveal(keys[2], roster, label="r", survivors=[1, 2, 3], dropped=[4], self_mask_shares={2: sealed[1]},
                  mask_key_shares={})
    with pytest.raises(ss.SecureSumError, match="more than half"):
        _roster(4, threshold=2)


def test_values_that_could_wrap_or_are_not_finite_are_refused() -> None:
    with pytest.raises(ss.SecureSumError, match="not finite"):
        ss.encode(np.array([1.0, np.inf]))
    with pytest.raises(ss.SecureSumError, match="beyond the fixed-point limit"):
        ss.encode(np.array([ss.LIMIT]))
    x = np.array([-ss.LIMIT / 2, -1e-3, 0.0, 12345.678])
    assert np.abs(ss.decode(ss.encode(x)) - x).max() <= 2.0 ** -ss.FRACTION_BITS


# ---------------------------------------------------------------------------------------------
# A federated run


@pytest.fixture(scope="module")
def sites_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return reference_layout(tmp_path_factory.mktemp("secure"), patients=300)


@pytest.fixture()
def sites(sites_template: Path, tmp_path: Path) -> Path:
    shutil.copytree(sites_template, tmp_path / "sites")
    return tmp_path / "sites"


def _run(sites: Path, run_dir: Path, *, fail=None, record=None, **settings) -> dict:
    run = RunSettings(run_dir=str(run_dir), **{**FAST, **settings})
    grid = LocalGrid(client_app, node_configs(sites), run_config=run.to_run_config(), fail=fail)
    if record is not None:  # everything the coordinator receives
        pull = grid.pull_messages
        grid.pull_messages = lambda ids: [record.append(m) or m for m in pull(ids)]  # type: ignore[method-assign]
    return run_federation(grid, run)


@pytest.mark.slow
def test_a_secure_run_ends_at_the_plain_runs_models(sites_template: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # the sites seed their forests from the run id: one id for both runs
    monkeypatch.setattr("server.server_app.new_state", lambda: RunState(run_id="fixedrun0001"))
    states, weights, docs = {}, {}, {}
    for secure in (False, True):
        copy = tmp_path / f"sites-{secure}"
        shutil.copytree(sites_template, copy)
        docs[secure] = doc = _run(copy, tmp_path / f"run-{secure}", dp=False, secure_sum=secure, explain=True,
                                  explanation_patients=40)
        ckpt = load_latest(tmp_path / f"run-{secure}")
        states[secure], weights[secure] = ckpt.state, ckpt.arrays
        assert doc["models"]["hybrid"]["auc"] > 0
        assert (doc["secure_sum"]["threshold"] == 2 and doc["secure_sum"]["sites"] == ["site-1", "site-2", "site-3"]
                and "Secure sum: the coordinator saw" in doc["privacy_note"]) if secure else doc["secure_sum"] == {}
    for name in weights[False]:
        assert np.allclose(weights[True][name], weights[False][name], atol=1e-5), name
    for key in ("glm_coef", "meta_coef"):
        assert np.allclose(states[True][key], states[False][key], atol=1e-5), key
    for key, value in states[False]["shared"].items():
        assert np.allclose(states[True]["shared"][key], value, rtol=1e-6, atol=1e-6), key
    assert states[True]["secure"]["roster"]["threshold"] == 2 and not states[False]["secure"]
    # exact statistics go through the sum as whole counts: the pooled figures, thresholds and paired tests are the same
    assert docs[True]["models"] == docs[False]["models"] and docs[True]["thresholds"] == docs[False]["thresholds"]
    assert docs[True]["paired_tests"] == docs[False]["paired_tests"]
    assert all(set(v) == {"n", "class_counts", "noise_std"} for v in docs[True]["sites"].values())
    assert any("hybrid" in v for v in docs[False]["sites"].values())
    assert "no site's own AUC: the test statistics reached the coordinator only summed" in \
        (tmp_path / "run-True" / "metrics.md").read_text()
    explained = {s: json.loads((tmp_path / f"run-{s}" / "explanation.json").read_text()) for s in (False, True)}
    assert [f["feature"] for f in explained[True]["features"]] == [f["feature"] for f in explained[False]["features"]]
    for a, b in zip(explained[True]["features"], explained[False]["features"]):
        assert a["importance"] == pytest.approx(b["importance"], abs=1e-6), a["feature"]


@pytest.mark.slow
def test_the_coordinator_sees_only_masked_vectors_shares_and_the_sum(sites: Path, tmp_path: Path) -> None:
    seen: list = []
    _run(sites, tmp_path / "run", record=seen, dp=False, secure_sum=True, explain=True, explanation_patients=40)
    train = [m for m in seen if m.metadata.message_type == "train"]
    assert len(train) == 3 * FAST["cnn_rounds"]
    for reply in train:
        arrays = from_record(reply.content.array_records["arrays"])
        assert set(arrays) == {"masked"} and arrays["masked"].dtype == np.uint64
        assert np.median(np.abs(ss.decode(arrays["masked"]))) > 1e6  # weights are O(1), times O(100) examples
        assert set(reply.content.metric_records["metrics"]) <= {"num-examples", "handler-seconds"}
    for kind in ("query.moments", "train.glm", "train.meta", "query.explain", "query.validation", "evaluate"):
        replies = [m for m in seen if m.metadata.message_type == kind]
        assert replies and all(set(from_record(next(iter(m.content.array_records.values())))) == {"masked"}
                               for m in replies), kind
    unmask = [m for m in seen if m.metadata.message_type == "query.secure_unmask"]
    assert unmask and all(set(m.content.array_records) == set() for m in unmask)
    assert all(k.startswith(("self-", "key-")) for m in unmask for k in m.content.config_records["shares"])
    for p in sorted(q for q in sites.iterdir() if (q / "vault").is_dir()):
        from client.vault import KeySource, Vault

        log = list(EgressLog(Vault.open(p / "vault", KeySource.from_key_file(p / "key"))))
        secure = [e for e in log if "secure_sum" in e]
        assert {e["message_type"] for e in secure} == {"query.moments", "train", "train.glm", "train.meta",
                                                        "query.explain", "query.validation", "evaluate"}
        assert all(set(e["keys"]) >= {"secure.layout"} for e in secure)


@pytest.mark.slow
def test_a_site_lost_mid_round_is_unmasked_around_and_named(sites: Path, tmp_path: Path) -> None:
    def fail(node: int, msg) -> str | None:
        lost = node == 103 and msg.metadata.message_type == "train" and msg.metadata.group_id.endswith("-cnn-2")
        return "silent" if lost else None

    doc = _run(sites, tmp_path / "run", fail=fail, dp=False, secure_sum=True, round_timeout=5.0)
    assert "CNN round 2" in doc["missing_sites"]["site-3"]
    assert set(doc["sites"]) == {"site-1", "site-2"}
    log = (tmp_path / "run" / "run.log").read_text()
    assert "CNN round 2/2: the secure sum of 2 updates aggregated" in log
    unmask = [r for r in load_latest(tmp_path / "run").state["rounds"] if r.get("phase") == "secure-unmask"]
    assert any(r["label"].endswith("-cnn-2") for r in unmask)


def _replies(seen: list, kind: str) -> list:
    return [m for m in seen if m.metadata.message_type == kind and m.content.metric_records]


@pytest.mark.slow
def test_distributed_noise_adds_a_share_and_charges_the_same_epsilon(sites_template: Path, tmp_path: Path) -> None:
    seen: dict[bool, list] = {False: [], True: []}
    docs = {}
    for secure in (False, True):
        copy = tmp_path / f"sites-{secure}"
        shutil.copytree(sites_template, copy)
        docs[secure] = _run(copy, tmp_path / f"run-{secure}", record=seen[secure], dp=True, epsilon=4.0,
                            secure_sum=secure, test_statistics="noised", meta_dp_rounds=1)  # a noised meta round
    for kind in ("query.moments", "train.glm", "train.meta"):
        sigma = {s: {float(m.content.metric_records["metrics"]["noise-multiplier"]) for m in _replies(seen[s], kind)}
                 for s in (False, True)}
        assert len(sigma[False]) == 1 and len(sigma[True]) == 1, kind
        # threshold 2 of 3: each site adds 1/sqrt(2) of the noise; any two shares carry all of it
        assert next(iter(sigma[True])) == pytest.approx(next(iter(sigma[False])) / np.sqrt(2)), kind
    for kind in ("query.validation", "evaluate"):
        std = {s: {float(m.content.metric_records["metrics"]["noise-std"]) for m in _replies(seen[s], kind)}
               for s in (False, True)}
        assert len(std[True]) == 1 and next(iter(std[True])) == pytest.approx(next(iter(std[False])) / np.sqrt(2)), kind
    # the coordinator makes the noised sum whole counts: each model's histograms hold the summed class counts
    tests = sum(np.asarray(c["test-class-counts"]) for c in load_latest(tmp_path / "run-True").state["census"].values())
    for name, m in docs[True]["models"].items():
        assert m["n"] == int(tests.sum()) and 0.0 <= m["auc"] <= 1.0, name
    # the report's noise error is the sum's: all the sites' noise, made whole counts once
    errors = {s: docs[s]["test_statistics"]["pooled_metric_error_sd"]["hybrid"]["auc"] for s in (False, True)}
    assert 0.0 < errors[True] < 0.5 and 0.0 < errors[False] < 0.5, errors
    for site, plain in docs[False]["privacy"].items():
        assert docs[True]["privacy"][site]["epsilon"] == pytest.approx(plain["epsilon"]), site


def test_refused_combinations_are_named(sites: Path, tmp_path: Path) -> None:
    for rule in ("krum", "fedmedian", "fedtrimmedavg"):
        with pytest.raises(SettingsError, match="reads each site's update, which secure-sum hides"):
            RunSettings(strategy=rule, secure_sum=True)
    with pytest.raises(SettingsError, match="hold-out-site = 'site-1' reports one site's statistics, which secure"):
        RunSettings(secure_sum=True, hold_out_site="site-1")
    assert not RunSettings(secure_sum=True).releases_site_alone and RunSettings().releases_site_alone
    with pytest.raises(SettingsError, match="secure-sum-threshold = -1: must be >= 0"):
        RunSettings(secure_sum_threshold=-1)
    from client.vault import KeySource, Vault

    for p in sorted(q for q in sites.iterdir() if (q / "vault").is_dir()):
        set_policy(Vault.open(p / "vault", KeySource.from_key_file(p / "key")), site=p.name, n_records=100,
                   require_secure_sum=True)
    with pytest.raises(CensusError, match="its policy requires secure sum and the run asks for secure-sum = false"):
        _run(sites, tmp_path / "run", dp=False)


def test_a_site_refuses_a_sum_in_the_clear_when_the_run_asks_for_secure_sum(sites: Path) -> None:
    from flwr.app import ConfigRecord, Context, Message, RecordDict

    from client.client_app import EgressBlocked
    from client.vault import KeySource, Vault

    cfg = node_configs(sites)[0]
    ctx = Context(run_id=1, node_id=101, node_config=cfg, state=RecordDict(),
                  run_config=RunSettings(dp=False, secure_sum=True).to_run_config())
    msg = Message(RecordDict({"config": ConfigRecord({"run-id": "r1"})}), dst_node_id=101,
                  message_type="query.moments", group_id="m")
    with pytest.raises(EgressBlocked, match="secure-sum = true and this request for a sum carries no secure-sum"):
        client_app(msg, ctx)
    vault = Vault.open(sites / "site-1" / "vault", KeySource.from_key_file(sites / "site-1" / "key"))
    assert [e["status"] for e in EgressLog(vault).entries()] == ["blocked"]


@pytest.mark.slow
def test_a_secure_run_that_releases_no_statistics_sums_an_empty_release(sites: Path, tmp_path: Path) -> None:
    doc = _run(sites, tmp_path / "run", dp=False, secure_sum=True, test_statistics="none")
    assert doc["models"] == {} and set(doc["sites"]) == {"site-1", "site-2", "site-3"}
