"""Update validation: every failure kind has its reason; valid updates pass with the right norm."""

from __future__ import annotations

import math

import numpy as np
import pytest

from server.validation import UpdateSpec, partition_replies, update_norm, validate_update


def _global() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"towers.0.body.0.weight": rng.normal(size=(64, 4, 11)).astype(np.float32),
            "out.bias": rng.normal(size=3).astype(np.float32),
            "steps": np.array([7], dtype=np.int64)}


def _update(g: dict[str, np.ndarray], scale: float = 0.01, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (v + scale * rng.normal(size=v.shape)).astype(v.dtype) if v.dtype.kind == "f" else v.copy()
            for k, v in g.items()}


def _check(spec: UpdateSpec, g: dict[str, np.ndarray], u: dict[str, np.ndarray], n: object = 10) -> str | None:
    return validate_update(spec, global_arrays=g, update_arrays=u, num_examples=n).reason


def test_spec_from_arrays() -> None:
    g = _global()
    spec = UpdateSpec.from_arrays(g, max_norm=5, max_examples=100)
    assert spec.names == ("towers.0.body.0.weight", "out.bias", "steps")
    assert spec.shapes == ((64, 4, 11), (3,), (1,))
    assert spec.dtypes == ("<f4", "<f4", "<i8")
    assert spec.max_norm == 5.0 and spec.max_examples == 100


def test_valid_update_passes_with_norm() -> None:
    g = _global()
    u = _update(g)
    v = validate_update(UpdateSpec.from_arrays(g, max_norm=100), global_arrays=g, update_arrays=u, num_examples=12)
    expected = math.sqrt(sum(float(np.sum((u[k].astype(np.float64) - g[k].astype(np.float64)) ** 2))
                             for k in ("towers.0.body.0.weight", "out.bias")))
    assert v.ok and v.reason is None
    assert v.norm == pytest.approx(expected, rel=1e-12)


def test_norm_known_value() -> None:
    g = {"a": np.zeros(2, np.float32), "b": np.zeros((1, 1), np.float32), "i": np.zeros(1, np.int32)}
    u = {"a": np.array([3.0, 0.0], np.float32), "b": np.array([[4.0]], np.float32), "i": np.zeros(1, np.int32)}
    assert update_norm(global_arrays=g, update_arrays=u) == 5.0


def test_shape_mismatch() -> None:
    g = _global()
    u = _update(g)
    u["towers.0.body.0.weight"] = np.zeros((64, 4, 9), np.float32)
    assert _check(UpdateSpec.from_arrays(g), g, u) == \
        "array 'towers.0.body.0.weight' has shape (64, 4, 9), expected (64, 4, 11)"


def test_non_finite() -> None:
    g = _global()
    for bad in (np.nan, np.inf, -np.inf):
        u = _update(g)
        u["out.bias"][1] = bad
        assert _check(UpdateSpec.from_arrays(g), g, u) == "non-finite values in 'out.bias'"


def test_norm_bound() -> None:
    g = {"w": np.zeros(2, np.float32)}
    u = {"w": np.array([300.0, 80.0], np.float32)}  # norm 310.48...
    v = validate_update(UpdateSpec.from_arrays(g, max_norm=100), global_arrays=g, update_arrays=u, num_examples=1)
    assert not v.ok and v.reason == "update norm 310.5 exceeds bound 100"
    assert v.norm == pytest.approx(math.hypot(300, 80))


def test_norm_at_bound_passes() -> None:
    g = {"w": np.zeros(2, np.float32)}
    u = {"w": np.array([3.0, 4.0], np.float32)}
    assert validate_update(UpdateSpec.from_arrays(g, max_norm=5), global_arrays=g, update_arrays=u, num_examples=1).ok


def test_missing_and_unexpected() -> None:
    g = _global()
    u = _update(g)
    del u["out.bias"]
    assert _check(UpdateSpec.from_arrays(g), g, u) == "missing array 'out.bias'"
    u = _update(g)
    u["x"] = np.zeros(1, np.float32)
    assert _check(UpdateSpec.from_arrays(g), g, u) == "unexpected array 'x'"
    u["y"] = np.zeros(1, np.float32)
    assert _check(UpdateSpec.from_arrays(g), g, u) == "unexpected array 'x' (and 1 more)"


def test_dtype_mismatch() -> None:
    g = _global()
    u = _update(g)
    u["out.bias"] = u["out.bias"].astype(np.float64)
    assert _check(UpdateSpec.from_arrays(g), g, u) == "array 'out.bias' has dtype float64, expected float32"
    # Same kind, other byte order: the reason must not read "float32, expected float32".
    u["out.bias"] = g["out.bias"].astype(">f4")
    assert _check(UpdateSpec.from_arrays(g), g, u) == "array 'out.bias' has dtype >f4, expected float32"


def test_not_an_array() -> None:
    g = _global()
    u = _update(g)
    u["out.bias"] = [0.0, 0.0, 0.0]  # type: ignore[assignment]
    assert _check(UpdateSpec.from_arrays(g), g, u) == "array 'out.bias' is a list, not a numpy array"


def test_non_float_arrays_must_be_unchanged_and_stay_out_of_the_norm() -> None:
    g = _global()
    u = _update(g, scale=0.0)
    assert validate_update(UpdateSpec.from_arrays(g), global_arrays=g, update_arrays=u, num_examples=1).norm == 0.0
    u["steps"] = np.array([8], dtype=np.int64)
    assert _check(UpdateSpec.from_arrays(g), g, u) == \
        "array 'steps' (int64) differs from the global model; non-float arrays are not trained"


@pytest.mark.parametrize("n", [-3, 0, 2.5, True, "12", None, float("nan"), float("inf")])
def test_bad_num_examples(n: object) -> None:
    g = _global()
    assert _check(UpdateSpec.from_arrays(g), g, _update(g), n) == f"num-examples must be a positive integer, got {n!r}"


@pytest.mark.parametrize("n", [1, 12, 12.0, np.int64(5)])
def test_good_num_examples(n: object) -> None:
    g = _global()
    assert _check(UpdateSpec.from_arrays(g), g, _update(g), n) is None


def test_num_examples_bound() -> None:
    g = _global()
    spec = UpdateSpec.from_arrays(g, max_examples=1000)
    assert _check(spec, g, _update(g), 10**9) == "num-examples 1000000000 exceeds bound 1000"
    assert _check(spec, g, _update(g), 1000) is None


def test_non_finite_norm_of_finite_float64_weights() -> None:
    g = {"w": np.array([-1e300], np.float64)}
    u = {"w": np.array([1e300], np.float64)}
    assert _check(UpdateSpec.from_arrays(g), g, u) == "update norm is not finite"


def test_spec_rejects_bad_bounds() -> None:
    with pytest.raises(ValueError):
        UpdateSpec.from_arrays(_global(), max_norm=0)
    with pytest.raises(ValueError):
        UpdateSpec.from_arrays(_global(), max_examples=0)


def test_partition_sorts_by_site_and_keeps_reasons() -> None:
    g = _global()
    spec = UpdateSpec.from_arrays(g, max_norm=10)
    bad = _update(g)
    bad["out.bias"][0] = np.nan
    replies = [("site-c", _update(g, seed=3), 30), ("site-a", bad, 10), ("site-b", _update(g, seed=2), 20),
               ("site-d", _update(g, scale=100.0), 5)]
    part = partition_replies(spec, global_arrays=g, replies=replies)
    assert [u.site for u in part.accepted] == ["site-b", "site-c"]
    assert [(r.site, r.reason) for r in part.rejected][0] == ("site-a", "non-finite values in 'out.bias'")
    assert part.rejected[1].site == "site-d" and part.rejected[1].reason.startswith("update norm ")
    assert [n for _, n in part.updates()] == [20, 30]
    shuffled = partition_replies(spec, global_arrays=g, replies=list(reversed(replies)))
    assert [u.site for u in shuffled.accepted] == ["site-b", "site-c"]


def test_partition_rejects_every_reply_of_a_duplicated_site() -> None:
    g = _global()
    part = partition_replies(UpdateSpec.from_arrays(g), global_arrays=g,
                             replies=[("a", _update(g), 1), ("b", _update(g), 1), ("a", _update(g, seed=5), 1)])
    assert [u.site for u in part.accepted] == ["b"]
    assert [(r.site, r.reason) for r in part.rejected] == [("a", "2 replies from this site in one round")] * 2
