"""Every byte that leaves a site is declared: the egress contract and the egress log.

The contract
------------
For every message type a site answers, :func:`contract_for` declares which records and keys a
reply may hold and the exact shape of each, as functions of the model layout, the number of
classes and the run's settings: never of the number of patients. The ClientApp describes each
reply (:class:`Observed` per key) and checks it with :meth:`EgressContract.violations` before
it is sent; a reply that breaks the contract is replaced by an error and its content never
leaves. Strings are bounded too (a string can carry anything), and numbers must be finite.

The log
-------
:class:`EgressLog` keeps, in the vault role ``privacy/egress``, one entry per reply: when, which
run and round, the message type, each key with its shape and bytes, the epsilon charged for it
and whether it was sent or blocked (with the reason). It is appended under the ledger lock before
the reply is handed to Flower, so nothing leaves unrecorded. It holds no patient data.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from common.errors import GenofedError

EGRESS_ROLE = "privacy/egress"
FORMAT = "genofed-egress-log"
VERSION = 1
NAME_LEN = 128        # a site name
TEXT_LEN = 4096       # a refusal: reasons built from the run's settings and the site's policy
SCHEMA_JSON_LEN = 1 << 20
PUBLIC_KEY_LEN = 1024  # a PEM public key (SECP384R1: 215 characters)
SHARE_LEN = 4096       # a sealed Shamir share (a mask key's: about 1,100 characters)


class EgressViolation(GenofedError):
    """A reply holds something the egress contract does not declare; it was not sent."""


@dataclass(frozen=True)
class Field:
    """One declared key: ``kind`` is ``"int"``, ``"float"``, ``"str"``, ``"bool"``, ``"ints"``
    (a list of ints), ``"floats"`` or ``"array"``; ``shape`` is a list's length or an array's
    shape; ``max_len`` bounds a string; ``dtype`` is an array's numpy kind (``"f"`` or ``"i"``)."""

    kind: str
    shape: tuple[int, ...] = ()
    max_len: int = 0
    dtype: str = "f"


@dataclass(frozen=True)
class Observed:
    """What a reply actually holds under one key."""

    kind: str
    shape: tuple[int, ...] = ()
    nbytes: int = 0
    finite: bool = True
    dtype: str = ""


Records = dict[str, dict[str, Field]]


@dataclass(frozen=True)
class EgressContract:
    """The records a reply to ``message_type`` may hold: record -> key -> :class:`Field`."""

    message_type: str
    records: Records

    def violations(self, observed: Mapping[str, Mapping[str, Observed]]) -> list[str]:
        """Every way ``observed`` (record -> key -> :class:`Observed`) breaks the contract."""
        out = []
        for record, keys in observed.items():
            declared = self.records.get(record)
            if declared is None:
                out.append(f"undeclared record {record!r}")
                continue
            for key, seen in keys.items():
                field = declared.get(key)
                if field is None:
                    out.append(f"undeclared key {record}.{key}")
                elif (why := _mismatch(field, seen)) is not None:
                    out.append(f"{record}.{key}: {why}")
        return out

    def describe(self) -> dict[str, Any]:
        """The contract as plain data (for documentation and ``genofed ledger egress --contract``)."""
        return {rec: {k: _field_text(f) for k, f in keys.items()} for rec, keys in self.records.items()}


def _mismatch(field: Field, seen: Observed) -> str | None:
    if seen.kind != field.kind:
        return f"is {seen.kind}, declared {field.kind}"
    if field.kind == "str":
        return None if seen.shape[0] <= field.max_len else f"string of {seen.shape[0]} characters, at most " \
                                                            f"{field.max_len} declared"
    if seen.shape != field.shape:
        return f"shape {seen.shape}, declared {field.shape}"
    if field.kind == "array" and seen.dtype != field.dtype:
        return f"dtype kind {seen.dtype!r}, declared {field.dtype!r}"
    if not seen.finite:
        return "holds non-finite values"
    return None


def _field_text(f: Field) -> str:
    if f.kind == "str":
        return f"str (at most {f.max_len} characters)"
    if f.kind in ("ints", "floats"):
        return f"{f.kind[:-1]}[{f.shape[0]}]"
    if f.kind == "array":
        return f"array{list(f.shape)} ({'float' if f.dtype == 'f' else 'int'})"
    return f.kind


# ---------------------------------------------------------------------------------------------
# The contracts

SCALAR_METRICS = {"num-examples": Field("int"), "handler-seconds": Field("float")}


def contract_for(message_type: str, *, dp: bool, n_classes: int, model_shapes: Mapping[str, tuple[int, ...]]
                 | None = None, meta_dim: int = 0, warm_start: bool = False,
                 stats_shapes: Mapping[str, tuple[int, ...]] | None = None, n_columns: int = 0,
                 glm_dim: int = 0, summary_shapes: Mapping[str, tuple[int, ...]] | None = None,
                 secure_keys: Sequence[str] = (), stats_dtype: str = "i") -> EgressContract:
    """The contract of a reply to ``message_type``.

    Parameters
    ----------
    dp : whether the run is private (then no exact loss may leave).
    n_classes : classes of the agreed schema.
    model_shapes : the deep model's float arrays (``train``).
    meta_dim : the meta-classifier's flat coefficient count (``train.meta``).
    warm_start : a non-DP first GLM or meta round that also returns the local fit.
    stats_shapes : the released test-statistics arrays, name -> shape (``evaluate``).
    stats_dtype : their numpy kind: ``"i"`` (whole counts), or ``"f"`` for a secure sum, which adds
        floats and leaves rounding to the coordinator.
    n_columns : the shared preprocessing's column count (``query.moments``).
    glm_dim : the GLM's flat coefficient count (``train.glm``).
    summary_shapes : the explanation release's arrays, name -> shape (``query.explain``,
        :func:`common.explanation.summary_shapes`).
    secure_keys : the sealed shares a secure-sum step returns, from the request (``to-J`` per other
        site for ``query.secure_shares``; ``self-J`` per survivor and ``key-J`` per dropped site for
        ``query.secure_unmask``).
    """
    if message_type == "query.census":
        return EgressContract(message_type, _census(n_classes))
    if message_type == "query.moments":
        moments = {key: Field("array", (n_columns,)) for key in ("count", "sum", "sumsq")}
        metrics = {**SCALAR_METRICS, **({"epsilon": Field("float"), "noise-multiplier": Field("float")} if dp
                                        else {})}
        return EgressContract(message_type, {"moments": moments, "metrics": metrics})
    if message_type == "train.glm":
        # Under DP the GLM releases its gradient only (the coordinator uses a public curvature).
        return EgressContract(message_type, _newton_records(glm_dim, dp=dp, warm_start=warm_start, hessian=not dp))
    if message_type == "train":
        metrics = {**SCALAR_METRICS, **({"epsilon": Field("float"), "run-epsilon": Field("float"),
                                         "delta": Field("float")} if dp else
                                        {"train-loss": Field("float"), "val-loss": Field("float")})}
        arrays = {name: Field("array", tuple(shape)) for name, shape in (model_shapes or {}).items()}
        return EgressContract(message_type, {"arrays": arrays, "metrics": metrics,
                                             "site": {"site": Field("str", max_len=NAME_LEN)}})
    if message_type == "train.meta":
        return EgressContract(message_type, _newton_records(meta_dim, dp=dp, warm_start=warm_start))
    if message_type == "train.alone":  # the site's own models stay home: only the train count leaves
        return EgressContract(message_type, {"metrics": dict(SCALAR_METRICS)})
    if message_type in ("evaluate", "query.validation"):
        stats = {name: Field("array", tuple(shape), dtype=stats_dtype) for name, shape in (stats_shapes or {}).items()}
        metrics = {**SCALAR_METRICS, "epsilon": Field("float"), "noise-std": Field("float")}
        return EgressContract(message_type, {"stats": stats, "metrics": metrics})
    if message_type == "query.explain":
        summary = {name: Field("array", tuple(shape)) for name, shape in (summary_shapes or {}).items()}
        metrics = {**SCALAR_METRICS, "epsilon": Field("float"), "noise-std": Field("float")}
        return EgressContract(message_type, {"summary": summary, "metrics": metrics})
    if message_type == "query.secure_keys":  # two public keys (PEM)
        return EgressContract(message_type, {"keys": {k: Field("str", max_len=PUBLIC_KEY_LEN) for k in ("cipher", "mask")},
                                             "metrics": dict(SCALAR_METRICS)})
    if message_type in ("query.secure_shares", "query.secure_unmask"):  # sealed (or opened) Shamir shares
        record = "sealed" if message_type == "query.secure_shares" else "shares"
        return EgressContract(message_type, {record: {k: Field("str", max_len=SHARE_LEN) for k in secure_keys},
                                             "metrics": dict(SCALAR_METRICS)})
    raise EgressViolation(f"no egress contract for message type {message_type!r}: the site answers none")


def masked_contract(contract: EgressContract, *, summed: str, length: int, participants: Sequence[int],
                    metrics: Sequence[str]) -> EgressContract:
    """``contract`` for a reply whose ``summed`` record went through the secure sum: that record
    holds one masked uint64 vector of ``length``, a ``secure`` record its layout and one sealed
    self-mask share per participant, and ``metrics`` only the plain ``metrics`` it declared."""
    records = dict(contract.records)
    records[summed] = {"masked": Field("array", (int(length),), dtype="i")}  # uint64
    records["secure"] = {"layout": Field("str", max_len=SCHEMA_JSON_LEN),
                         **{f"self-{j}": Field("str", max_len=SHARE_LEN) for j in participants}}
    records["metrics"] = {k: f for k, f in contract.records.get("metrics", {}).items() if k in metrics}
    return EgressContract(contract.message_type, records)


def _newton_records(dim: int, *, dp: bool, warm_start: bool, hessian: bool = True) -> Records:
    """Newton terms of a federated logistic fit (GLM or meta-classifier)."""
    terms = {"grad": Field("array", (dim,))} | ({"hess": Field("array", (dim, dim))} if hessian else {})
    if warm_start and not dp:
        terms |= {"local_coef": Field("array", (dim,)), "local_hess": Field("array", (dim, dim))}
    metrics = {**SCALAR_METRICS, **({"epsilon": Field("float"), "noise-multiplier": Field("float")} if dp
                                    else {"loss": Field("float")})}
    return {"terms": terms, "metrics": metrics}


def _census(n_classes: int) -> Records:
    census = {"site": Field("str", max_len=NAME_LEN), "schema-hash": Field("str", max_len=64),
              "schema-json": Field("str", max_len=SCHEMA_JSON_LEN),
              "n-train": Field("int"), "n-validation": Field("int"), "n-test": Field("int"),
              "class-counts": Field("ints", (n_classes,)),
              "test-class-counts": Field("ints", (n_classes,)),
              "validation-class-counts": Field("ints", (n_classes,)), "ledger-spent": Field("float"),
              "ledger-budget": Field("float"), "ledger-delta": Field("float"),
              "ledger-created": Field("str", max_len=40), "ledger-revision": Field("int"),
              "plan-epsilon": Field("float"), "refusal": Field("str", max_len=TEXT_LEN)}
    return {"census": census, "metrics": dict(SCALAR_METRICS)}


def observe(value: Any) -> Observed:
    """Describe one record value (a numpy array, a number, a string or a list of numbers)."""
    import numpy as np

    if isinstance(value, np.ndarray):
        kind = "f" if np.issubdtype(value.dtype, np.floating) else "i" if np.issubdtype(value.dtype, np.integer) \
            else value.dtype.kind
        finite = bool(np.isfinite(value).all()) if kind == "f" else True
        return Observed("array", tuple(int(d) for d in value.shape), int(value.nbytes), finite, kind)
    if isinstance(value, bool):
        return Observed("bool", (), 1)
    if isinstance(value, int):
        return Observed("int", (), 8)
    if isinstance(value, float):
        return Observed("float", (), 8, math.isfinite(value))
    if isinstance(value, str):
        return Observed("str", (len(value),), len(value.encode("utf-8")))
    if isinstance(value, (list, tuple)):
        kinds = {type(v) for v in value}
        kind = "ints" if kinds <= {int} else "floats" if kinds <= {int, float} else "other"
        finite = all(math.isfinite(float(v)) for v in value) if kind != "other" else True
        return Observed(kind, (len(value),), 8 * len(value), finite)
    return Observed(type(value).__name__, (), 0)


# ---------------------------------------------------------------------------------------------
# The log


def log_entry(*, run_id: str, message_type: str, round: int, observed: Mapping[str, Mapping[str, Observed]],
              epsilon: float, status: str, reason: str = "") -> dict[str, Any]:
    """One egress-log entry (no values, only what was declared of them)."""
    keys = {f"{rec}.{key}": {"shape": list(o.shape), "bytes": o.nbytes}
            for rec, fields in observed.items() for key, o in fields.items()}
    entry = {"at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "run_id": run_id,
             "message_type": message_type, "round": int(round), "keys": keys,
             "bytes": sum(k["bytes"] for k in keys.values()), "epsilon": float(epsilon), "status": status}
    if reason:
        entry["reason"] = reason
    return entry


class EgressLog:
    """The site's egress log, read from and appended to its vault (under the ledger lock)."""

    def __init__(self, vault: Any) -> None:
        self._vault = vault

    def entries(self) -> list[dict[str, Any]]:
        """Every entry so far, oldest first."""
        self._vault._reload_if_changed()  # noqa: SLF001 - another process may have appended
        if EGRESS_ROLE not in self._vault:
            return []
        doc = json.loads(self._vault.read(EGRESS_ROLE).decode("utf-8"))
        if doc.get("format") != FORMAT or doc.get("version") != VERSION:
            raise GenofedError(f"{self._vault.path}: the egress log is not a {FORMAT} version {VERSION}; "
                               "restore the vault from backup")
        return list(doc["entries"])

    def append(self, entry: dict[str, Any]) -> None:
        """Append ``entry``; the caller holds the ledger lock."""
        entries = [*self.entries(), {"seq": 0, **entry}]
        entries[-1]["seq"] = len(entries)
        doc = {"format": FORMAT, "version": VERSION, "entries": entries}
        self._vault.update({EGRESS_ROLE: json.dumps(doc, sort_keys=True, separators=(",", ":"),
                                                    allow_nan=False).encode("utf-8")})

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.entries())
