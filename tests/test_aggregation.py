"""Aggregators: hand-made cases, Flower's own strategies as the reference, determinism, resume."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedTrimmedAvg, Krum
from flwr.supercore.task_identity import TaskIdentity
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays as np_arrays

from common.errors import GenofedError
from server.aggregation import (
    AGGREGATORS,
    RUN_CONFIG_KEYS,
    FedAdamAggregator,
    KrumAggregator,
    make_aggregator,
    params_from_run_config,
)
from server.checkpoint import load_latest, save_checkpoint

Arrays = dict[str, np.ndarray]


def _model(seed: int = 0) -> Arrays:
    rng = np.random.default_rng(seed)
    return {"conv.weight": rng.normal(size=(4, 2, 3)).astype(np.float32),
            "conv.bias": rng.normal(size=4).astype(np.float32),
            "out.weight": rng.normal(size=(3, 4)).astype(np.float32),
            "counter": np.array([5], dtype=np.int64)}


def _updates(g: Arrays, n: int, seed: int = 1, scale: float = 0.1) -> list[tuple[Arrays, int]]:
    rng = np.random.default_rng(seed)
    return [({k: (v + scale * rng.normal(size=v.shape)).astype(v.dtype) if v.dtype.kind == "f" else v.copy()
              for k, v in g.items()}, int(rng.integers(1, 100))) for _ in range(n)]


def _floats(a: Arrays) -> Arrays:
    return {k: v for k, v in a.items() if v.dtype.kind == "f"}


def _assert_bitwise(a: Arrays, b: Arrays) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), k


# ----------------------------------------------------------------------------- Flower as the reference

@pytest.fixture
def flower_replies(monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    """Build train replies for Flower's strategies outside a running app.

    ``Message`` needs a task identity (notes, pitfall 1); it is set for this test only.
    """
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)

    def build(updates: list[tuple[Arrays, int]]) -> list[Message]:
        replies = []
        for i, (arrays, n) in enumerate(updates):
            ins = Message(RecordDict(), dst_node_id=100 + i, message_type="train")
            content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in _floats(arrays).items()}),
                                  "metrics": MetricRecord({"num-examples": n})})
            replies.append(Message(content, reply_to=ins))
        return replies

    yield build


def _flower(strategy: FedAvg, replies: list[Message], server_round: int = 1) -> Arrays:
    arrays, _ = strategy.aggregate_train(server_round, replies)
    assert arrays is not None
    return {k: a.numpy() for k, a in arrays.items()}


@pytest.mark.parametrize("name,strategy", [("fedavg", FedAvg()), ("fedprox", FedAvg()), ("fedmedian", FedMedian()),
                                           ("fedtrimmedavg", FedTrimmedAvg(beta=0.2)),
                                           ("krum", Krum(num_malicious_nodes=1))])
@pytest.mark.parametrize("n", [1, 2, 5, 6])
def test_matches_flower_bit_for_bit(name: str, strategy: FedAvg, n: int, flower_replies: object) -> None:
    g = _model()
    updates = _updates(g, n, seed=n)
    params = {"krum-byzantine": 1} if name == "krum" else {}
    ours = make_aggregator(name, **params).aggregate(g, updates)
    theirs = _flower(strategy, flower_replies(updates))  # type: ignore[operator]
    _assert_bitwise(_floats(ours), theirs)
    assert ours["counter"].tobytes() == g["counter"].tobytes()


def test_fedadam_matches_flower_over_rounds(flower_replies: object) -> None:
    """Flower's FedAdam returns float64; ours is the same numbers cast back to float32."""
    params = {"server-lr": 0.05, "server-beta1": 0.8, "server-beta2": 0.95, "server-tau": 1e-2}
    ours = make_aggregator("fedadam", **params)
    theirs = FedAdam(eta=0.05, beta_1=0.8, beta_2=0.95, tau=1e-2)
    g = _model()
    for rnd in range(1, 5):
        updates = _updates(g, 3, seed=rnd)
        theirs.current_arrays = {k: v.copy() for k, v in _floats(g).items()}  # what configure_train would store
        expected = _flower(theirs, flower_replies(updates), server_round=rnd)  # type: ignore[operator]
        assert all(v.dtype == np.float64 for v in expected.values())
        new = ours.aggregate(g, updates)
        _assert_bitwise(_floats(new), {k: v.astype(np.float32) for k, v in expected.items()})
        g = new


# ----------------------------------------------------------------------------- formulas and hand-made cases

def test_fedavg_is_the_weighted_mean() -> None:
    g = _model()
    updates = _updates(g, 4)
    out = make_aggregator("fedavg").aggregate(g, updates)
    total = sum(n for _, n in updates)
    for k in _floats(g):
        ref = sum(a[k].astype(np.float64) * n for a, n in updates) / total
        np.testing.assert_allclose(out[k], ref, rtol=1e-6, atol=1e-6)
    # The exact arithmetic: python-float factors n_i / N, summed in order in float32.
    for k in _floats(g):
        acc = updates[0][0][k] * (updates[0][1] / total)
        for a, n in updates[1:]:
            acc += a[k] * (n / total)
        assert acc.tobytes() == out[k].tobytes()


def test_fedprox_aggregates_like_fedavg_and_configures_clients() -> None:
    g = _model()
    updates = _updates(g, 3)
    prox = make_aggregator("fedprox", **{"proximal-mu": 0.1})
    _assert_bitwise(prox.aggregate(g, updates), make_aggregator("fedavg").aggregate(g, updates))
    assert prox.params == {"proximal-mu": 0.1}


def test_fedadam_formula_by_hand() -> None:
    """One coordinate, two rounds, against the formula written out in float64."""
    eta, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    agg = make_aggregator("fedadam", **{"server-lr": eta})
    x = np.array([1.0], np.float64)  # float64 model: no cast, so the formula is checked exactly
    m = v = 0.0
    for t, target in enumerate([2.0, 1.5], start=1):
        out = agg.aggregate({"w": x}, [({"w": np.array([target])}, 1)])
        delta = target - x[0]
        m = b1 * m + (1 - b1) * delta
        v = b2 * v + (1 - b2) * delta**2
        eta_t = eta * np.sqrt(1 - b2 ** (t + 1)) / (1 - b1 ** (t + 1))
        expected = x[0] + eta_t * m / (np.sqrt(v) + tau)
        assert out["w"][0] == pytest.approx(expected, rel=1e-15)
        x = out["w"]


def test_fedmedian_by_hand() -> None:
    g = {"w": np.zeros(3, np.float32)}
    ups = [({"w": np.array(r, np.float32)}, n) for r, n in
           [([1, 10, -5], 1), ([2, 20, 0], 1000), ([100, 30, 5], 1)]]
    np.testing.assert_array_equal(make_aggregator("fedmedian").aggregate(g, ups)["w"], [2, 20, 0])
    ups.append(({"w": np.array([3, 40, 7], np.float32)}, 1))  # even count: mean of the middle two
    np.testing.assert_array_equal(make_aggregator("fedmedian").aggregate(g, ups)["w"], [2.5, 25, 2.5])


def test_trimmed_mean_ignores_extremes() -> None:
    g = {"w": np.zeros(2, np.float32)}
    vals = [[1, 5], [2, 6], [3, 7], [4, 8], [-1000, 1000]]
    ups = [({"w": np.array(r, np.float32)}, 1) for r in vals]
    # beta 0.2 of 5 cuts one value at each end, per coordinate: mean(1, 2, 3), mean(6, 7, 8).
    out = make_aggregator("fedtrimmedavg", **{"trim-beta": 0.2}).aggregate(g, ups)["w"]
    np.testing.assert_allclose(out, [2.0, 7.0])
    # beta 0 is the plain mean: the outlier is back.
    out0 = make_aggregator("fedtrimmedavg", **{"trim-beta": 0.0}).aggregate(g, ups)["w"]
    np.testing.assert_allclose(out0, np.mean(np.array(vals, np.float32), axis=0))


def test_krum_rejects_an_obvious_outlier() -> None:
    g = {"w": np.zeros(4, np.float32)}
    honest = [np.array([1.0, 1.0, 1.0, 1.0]) + d for d in
              (np.array([0.01, 0, 0, 0]), np.array([0, 0.01, 0, 0]), np.array([0, 0, 0, 0]), np.array([0, 0, 0.02, 0]))]
    ups = [({"w": np.full(4, 50.0, np.float32)}, 1000)] + [({"w": h.astype(np.float32)}, 1) for h in honest]
    agg = KrumAggregator(**{"krum-byzantine": 1})
    out = agg.aggregate(g, ups)["w"]
    assert agg.last_selected == 3  # the honest update in the middle of the others
    np.testing.assert_array_equal(out, ups[3][0]["w"])


def _krum_brute_force(vectors: list[np.ndarray], f: int) -> int:
    """Blanchard et al.: argmin_i sum of squared distances to the n - f - 2 nearest others."""
    n = len(vectors)
    k = max(1, n - f - 2)
    scores = []
    for i, vi in enumerate(vectors):
        d = sorted(float(np.sum((vi - vj) ** 2)) for j, vj in enumerate(vectors) if j != i)
        scores.append(sum(d[:k]))
    return int(np.argmin(scores))


@pytest.mark.parametrize("seed", range(5))
def test_krum_matches_the_definition(seed: int) -> None:
    g = _model()
    ups = _updates(g, 7, seed=seed, scale=1.0)
    agg = KrumAggregator(**{"krum-byzantine": 2})
    agg.aggregate(g, ups)
    flat = [np.concatenate([a[k].astype(np.float64).ravel() for k in _floats(g)]) for a, _ in ups]
    assert agg.last_selected == _krum_brute_force(flat, 2)


def test_krum_warns_without_its_guarantee(caplog: pytest.LogCaptureFixture) -> None:
    g = _model()
    with caplog.at_level(logging.WARNING, logger="server.aggregation"):
        make_aggregator("krum", **{"krum-byzantine": 1}).aggregate(g, _updates(g, 3))
    assert "guarantee needs more than 4 updates" in caplog.text


@pytest.mark.parametrize("name", AGGREGATORS)
def test_keeps_layout_dtypes_and_non_float_arrays(name: str) -> None:
    g = _model()
    g["half"] = np.ones(2, np.float16)
    g["double"] = np.ones(2, np.float64)
    ups = _updates(g, 4)
    out = make_aggregator(name).aggregate(g, ups)
    assert list(out) == list(g)
    for k in g:
        assert out[k].dtype == g[k].dtype and out[k].shape == g[k].shape
    np.testing.assert_array_equal(out["counter"], g["counter"])
    assert out["counter"] is not g["counter"]


@pytest.mark.parametrize("name", AGGREGATORS)
def test_deterministic(name: str) -> None:
    g = _model()
    ups = _updates(g, 5)
    _assert_bitwise(make_aggregator(name).aggregate(g, ups), make_aggregator(name).aggregate(g, ups))


@pytest.mark.parametrize("name", AGGREGATORS)
def test_does_not_modify_inputs(name: str) -> None:
    g = _model()
    ups = _updates(g, 4)
    g_before = {k: v.copy() for k, v in g.items()}
    ups_before = [({k: v.copy() for k, v in a.items()}, n) for a, n in ups]
    make_aggregator(name).aggregate(g, ups)
    _assert_bitwise(g, g_before)
    for (a, _), (b, _) in zip(ups, ups_before, strict=True):
        _assert_bitwise(a, b)


# ----------------------------------------------------------------------------- state and resume

def _run_fedadam(agg: FedAdamAggregator, g: Arrays, rounds: range) -> Arrays:
    for rnd in rounds:
        g = agg.aggregate(g, _updates(g, 3, seed=100 + rnd))
    return g


def test_fedadam_resume_through_a_checkpoint_is_bit_identical(tmp_path: object) -> None:
    params = {"server-lr": 0.03, "server-beta1": 0.9, "server-beta2": 0.999}
    straight = _run_fedadam(FedAdamAggregator(**params), _model(), range(6))

    first = FedAdamAggregator(**params)
    mid = _run_fedadam(first, _model(), range(3))
    save_checkpoint(tmp_path, phase="cnn", round=3, arrays=mid, state={"aggregator": first.state_dict()})
    del first
    ckpt = load_latest(tmp_path)
    assert ckpt is not None
    resumed = FedAdamAggregator(**params)
    resumed.load_state_dict(ckpt.state["aggregator"])
    assert resumed.step == 3
    _assert_bitwise(_run_fedadam(resumed, ckpt.arrays, range(3, 6)), straight)


def test_fedadam_state_survives_plain_lists() -> None:
    """Moments turned into JSON lists come back with their float32 dtype."""
    params = {"server-lr": 0.03}
    straight = _run_fedadam(FedAdamAggregator(**params), _model(), range(4))
    first = FedAdamAggregator(**params)
    mid = _run_fedadam(first, _model(), range(2))
    state = first.state_dict()
    state["m"] = {k: v.tolist() for k, v in state["m"].items()}
    state["v"] = {k: v.tolist() for k, v in state["v"].items()}
    resumed = FedAdamAggregator(**params)
    resumed.load_state_dict(state)
    _assert_bitwise(_run_fedadam(resumed, mid, range(2, 4)), straight)


def test_state_dict_does_not_alias() -> None:
    agg = FedAdamAggregator()
    g = _model()
    agg.aggregate(g, _updates(g, 2))
    state = agg.state_dict()
    state["m"]["conv.bias"][:] = 99.0
    assert not np.any(agg.m["conv.bias"] == 99.0)  # type: ignore[index]


@pytest.mark.parametrize("name", AGGREGATORS)
def test_state_round_trip_for_every_aggregator(name: str) -> None:
    agg = make_aggregator(name)
    g = _model()
    agg.aggregate(g, _updates(g, 4))
    other = make_aggregator(name)
    other.load_state_dict(agg.state_dict())
    g2 = _model(1)
    ups = _updates(g2, 4, seed=9)
    _assert_bitwise(agg.aggregate(g2, ups), other.aggregate(g2, ups))


def test_load_state_refuses_other_aggregator_or_parameters() -> None:
    with pytest.raises(GenofedError, match="'fedavg' aggregator state; this run uses 'fedadam'"):
        make_aggregator("fedadam").load_state_dict(make_aggregator("fedavg").state_dict())
    with pytest.raises(GenofedError, match="resume with the same run config"):
        make_aggregator("fedadam", server_lr=0.2).load_state_dict(make_aggregator("fedadam").state_dict())


# ----------------------------------------------------------------------------- construction

def test_unknown_name_lists_choices() -> None:
    with pytest.raises(GenofedError) as e:
        make_aggregator("fedsgd")
    assert "fedavg, fedprox, fedadam, fedmedian, fedtrimmedavg, krum" in str(e.value)


def test_names_and_parameter_spellings() -> None:
    assert make_aggregator(" FedAdam ").name == "fedadam"
    assert make_aggregator("fedadam", server_lr=0.5).params["server-lr"] == 0.5
    assert make_aggregator("fedadam", **{"server-lr": 1}).params["server-lr"] == 1.0
    assert make_aggregator("krum", **{"krum-byzantine": 2.0}).params["krum-byzantine"] == 2
    with pytest.raises(GenofedError, match="fedavg does not take server-lr; it takes: no parameters"):
        make_aggregator("fedavg", **{"server-lr": 0.1})
    with pytest.raises(GenofedError, match="krum does not take num-malicious; it takes: krum-byzantine"):
        make_aggregator("krum", num_malicious=1)
    with pytest.raises(GenofedError, match="server-lr given twice"):
        make_aggregator("fedadam", eta=0.1, server_lr=0.2)


def test_flower_keyword_names_are_accepted() -> None:
    adam = make_aggregator("fedadam", eta=0.2, beta_1=0.5, beta_2=0.6, tau=0.01)
    assert adam.params == {"server-lr": 0.2, "server-beta1": 0.5, "server-beta2": 0.6, "server-tau": 0.01}
    assert make_aggregator("fedtrimmedavg", beta=0.1).params == {"trim-beta": 0.1}
    assert make_aggregator("krum", num_malicious_nodes=2).params == {"krum-byzantine": 2}
    assert make_aggregator("fedprox", proximal_mu=0.3).params == {"proximal-mu": 0.3}


@pytest.mark.parametrize("name,params", [
    ("fedprox", {"proximal-mu": -1}), ("fedadam", {"server-lr": 0}), ("fedadam", {"server-beta1": 1.0}),
    ("fedadam", {"server-beta2": -0.1}), ("fedadam", {"server-tau": 0}), ("fedadam", {"server-lr": "0.1"}),
    ("fedtrimmedavg", {"trim-beta": 0.5}), ("krum", {"krum-byzantine": -1}), ("krum", {"krum-byzantine": 1.5}),
    ("krum", {"krum-byzantine": "2"}), ("fedprox", {"proximal-mu": float("nan")}),
])
def test_bad_parameters(name: str, params: dict[str, object]) -> None:
    with pytest.raises(GenofedError, match=next(iter(params))):
        make_aggregator(name, **params)  # type: ignore[arg-type]


def test_params_from_run_config() -> None:
    cfg = {"server-lr": 0.2, "trim-beta": 0.1, "cnn-rounds": 5}
    assert params_from_run_config("fedadam", cfg) == {"server-lr": 0.2}
    assert params_from_run_config("fedavg", cfg) == {}
    assert RUN_CONFIG_KEYS["fedadam"] == ("server-lr", "server-beta1", "server-beta2", "server-tau")
    assert RUN_CONFIG_KEYS["krum"] == ("krum-byzantine",)
    assert make_aggregator("fedadam", **params_from_run_config("fedadam", cfg)).params["server-lr"] == 0.2


def test_bad_inputs() -> None:
    g = _model()
    with pytest.raises(ValueError, match="no updates"):
        make_aggregator("fedavg").aggregate(g, [])
    bad = _updates(g, 1)[0][0]
    del bad["conv.bias"]
    with pytest.raises(ValueError, match="conv.bias"):
        make_aggregator("fedavg").aggregate(g, [(bad, 1)])
    bad = _updates(g, 1)[0][0]
    bad["conv.bias"] = np.zeros(5, np.float32)
    with pytest.raises(ValueError, match="shape"):
        make_aggregator("fedavg").aggregate(g, [(bad, 1)])


# ----------------------------------------------------------------------------- properties

_values = st.floats(-1e3, 1e3, width=32, allow_nan=False)


@st.composite
def _rounds(draw: st.DrawFn) -> tuple[list[np.ndarray], list[int]]:
    shape = draw(st.tuples(st.integers(1, 4), st.integers(1, 3)))
    n = draw(st.integers(1, 12))
    vecs = [draw(np_arrays(np.float32, shape, elements=_values)) for _ in range(n)]
    weights = [draw(st.integers(1, 10_000)) for _ in range(n)]
    return vecs, weights


@settings(max_examples=60, deadline=None)
@given(x=np_arrays(np.float32, (3, 2), elements=_values), weights=st.lists(st.integers(1, 10_000), min_size=1,
                                                                               max_size=6))
def test_identical_updates_average_to_themselves(x: np.ndarray, weights: list[int]) -> None:
    g = {"w": np.zeros_like(x)}
    ups = [({"w": x.copy()}, n) for n in weights]
    # Means round in float32 (sum_i (n_i / N) x, or sum / k): x up to a few ulps.
    for name in ("fedavg", "fedtrimmedavg"):
        np.testing.assert_allclose(make_aggregator(name).aggregate(g, ups)["w"], x, rtol=1e-5, atol=1e-30)
    np.testing.assert_array_equal(make_aggregator("fedmedian").aggregate(g, ups)["w"], x)


@settings(max_examples=60, deadline=None)
@given(data=_rounds(), perm_seed=st.integers(0, 2**32 - 1))
def test_permutation_invariance(data: tuple[list[np.ndarray], list[int]], perm_seed: int) -> None:
    vecs, weights = data
    g = {"w": np.zeros_like(vecs[0])}
    ups = [({"w": v}, n) for v, n in zip(vecs, weights, strict=True)]
    perm = np.random.default_rng(perm_seed).permutation(len(ups))
    shuffled = [ups[i] for i in perm]
    # The median picks values: exactly invariant.
    np.testing.assert_array_equal(make_aggregator("fedmedian").aggregate(g, ups)["w"],
                                  make_aggregator("fedmedian").aggregate(g, shuffled)["w"])
    # Means are float32 sums whose last bits depend on order (for the trimmed mean, the order
    # np.partition leaves the kept values in), hence partition_replies' sorting by site.
    for name in ("fedavg", "fedtrimmedavg"):
        a = make_aggregator(name).aggregate(g, ups)["w"].astype(np.float64)
        b = make_aggregator(name).aggregate(g, shuffled)["w"].astype(np.float64)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-3)
