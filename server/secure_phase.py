"""The coordinator's steps of the secure sum (common/secure_sum.py, docs/security.md).

With ``secure-sum = true`` the coordinator runs :func:`setup` once after the census (every
training site's public keys, then its mask key's sealed shares, kept in ``RunState.secure``),
asks for every additive reply with :func:`request` in the message, and turns the masked replies
into their sum with :func:`unmask_sum`, one ``query.secure_unmask`` exchange with the survivors.
It never holds a site's vector: only masked vectors, shares it cannot open, and the sum.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, RecordDict
from flwr.serverapp import Grid

from common.records import from_record
from common.secure_sum import Roster, SecureSumError, decode, default_threshold, unmask
from common.settings import RoundFacts, RunSettings
from common.summands import summed_record, unflatten
from server.exchange import ExchangeResult, TooFewSitesError, exchange
from server.runlog import RunLog


def setup(grid: Grid, settings: RunSettings, state: Any, nodes: list[int], log: RunLog) -> None:
    """Keys and mask-key shares of the training sites ``nodes``, into ``state.secure``.

    Raises
    ------
    TooFewSitesError
        Fewer than ``min-sites`` (or than two) sites took part in both steps.
    """
    cfg = ConfigRecord(RoundFacts(run_id=state.run_id).to_config())
    res = exchange(grid, nodes, lambda n: RecordDict({"config": cfg}), message_type="query.secure_keys",
                   group_id=f"{state.run_id}-secure-keys", timeout=settings.round_timeout)
    _exclude(state, log, res.failures, "secure sum keys")
    state.rounds.append({"phase": "secure-keys", **res.cost(), "sites": sorted(map(state.site_of, res.replies))})
    order = sorted(res.replies, key=state.site_of)
    keys = [dict(res.replies[n].content.config_records["keys"]) for n in order]
    _quorum(settings, len(order), "secure sum keys")
    roster = Roster(tuple(str(k["cipher"]).encode() for k in keys), tuple(str(k["mask"]).encode() for k in keys),
                    settings.secure_sum_threshold or default_threshold(len(order)))
    index = {state.site_of(n): i for i, n in enumerate(order, start=1)}
    cfg = ConfigRecord(RoundFacts(run_id=state.run_id, secure=json.dumps({"roster": roster.to_dict()})).to_config())
    res2 = exchange(grid, order, lambda n: RecordDict({"config": cfg}), message_type="query.secure_shares",
                    group_id=f"{state.run_id}-secure-shares", timeout=settings.round_timeout)
    _exclude(state, log, res2.failures, "secure sum shares")
    sealed: dict[str, dict[str, str]] = {}  # holder index -> {owner index: sealed share of the owner's mask key}
    for node, reply in res2.replies.items():
        owner = index[state.site_of(node)]
        for key, token in dict(reply.content.config_records["sealed"]).items():
            sealed.setdefault(key.removeprefix("to-"), {})[str(owner)] = str(token)
    _quorum(settings, len(res2.replies), "secure sum shares")
    state.secure = {"roster": roster.to_dict(), "index": index, "sealed": sealed}
    state.rounds.append({"phase": "secure-shares", **res2.cost(), "sites": sorted(index),
                         "threshold": roster.threshold})
    log.info(f"secure sum: {len(index)} sites exchanged keys and mask-key shares; any {roster.threshold} of them "
             "unmask a sum, and no sum is unmasked with fewer")


def _exclude(state: Any, log: RunLog, failures: dict[int, str], where: str) -> None:
    for node, reason in failures.items():
        site = state.site_of(node)
        state.excluded.setdefault(site, f"{where}: {reason}")
        log.warning(f"{where}: site {site} failed and leaves the run: {reason}")


def _quorum(settings: RunSettings, n: int, where: str) -> None:
    if n < max(settings.min_sites, 2):
        raise TooFewSitesError(f"{where}: only {n} site(s) took part; a secure sum needs at least "
                               f"{max(settings.min_sites, 2)}")


def roster(state: Any) -> Roster:
    return Roster.from_dict(state.secure["roster"])


def request(state: Any, label: str, nodes: list[int]) -> str:
    """``RoundFacts.secure`` of a masked exchange: its label, participants and roster digest."""
    if not state.secure:
        return ""
    parts = sorted(state.secure["index"][state.site_of(n)] for n in nodes)
    return json.dumps({"label": label, "participants": parts, "roster": roster(state).digest()})


def unmask_sum(grid: Grid, settings: RunSettings, state: Any, log: RunLog, res: ExchangeResult, *, label: str,
               nodes: list[int], message_type: str, where: str) -> tuple[dict[str, np.ndarray], list[int]]:
    """The sum of the masked replies in ``res`` (name -> array), and the nodes it holds.

    A reply whose masked vector is malformed or whose layout differs from the majority's is
    treated as dropped: its site leaves the run, and its pairwise masks are taken out with its
    rebuilt mask key (its self mask never is).

    Raises
    ------
    TooFewSitesError
        Fewer survivors than the threshold, or too few shares to unmask.
    """
    ros = roster(state)
    index = {n: state.secure["index"][state.site_of(n)] for n in nodes}
    masked, layouts, sealed_self = {}, {}, {}
    for node, reply in sorted(res.replies.items(), key=lambda kv: index[kv[0]]):
        try:
            vec, shape, seal = _masked_reply(reply, message_type)
        except (KeyError, ValueError) as exc:
            _exclude(state, log, {node: f"malformed masked reply: {exc}"}, where)
            continue
        masked[node], layouts[node], sealed_self[node] = vec, shape, seal
    if masked:
        common = max(set(layouts.values()), key=lambda lay: sum(v == lay for v in layouts.values()))
        for node in [n for n, lay in layouts.items() if lay != common or len(masked[n]) != _size(common)]:
            _exclude(state, log, {node: "its masked reply's layout differs from the other sites'"}, where)
            del masked[node]
    survivors = sorted(masked, key=index.get)
    if len(survivors) < ros.threshold:
        raise TooFewSitesError(f"{where}: {len(survivors)} masked repl(ies), the secure sum's threshold is "
                               f"{ros.threshold}: the sum cannot be unmasked")
    alive, dropped = [index[n] for n in survivors], sorted(set(index.values()) - {index[n] for n in survivors})
    facts = RoundFacts(run_id=state.run_id, secure=json.dumps({"label": label, "survivors": alive, "dropped": dropped,
                                                                "roster": ros.digest()}))
    cfg = ConfigRecord(facts.to_config())

    def content(node: int) -> RecordDict:
        me = str(index[node])
        sealed = {f"self-{index[u]}": sealed_self[u][me] for u in survivors}
        sealed |= {f"key-{d}": state.secure["sealed"][me][str(d)] for d in dropped
                   if str(d) in state.secure["sealed"].get(me, {})}
        return RecordDict({"config": cfg, "sealed": ConfigRecord(sealed)})

    res2 = exchange(grid, survivors, content, message_type="query.secure_unmask", group_id=f"{label}-unmask",
                    timeout=settings.round_timeout)
    _exclude(state, log, res2.failures, f"{where} (unmask)")
    self_shares: dict[int, list[bytes]] = {i: [] for i in alive}
    key_shares: dict[int, list[bytes]] = {d: [] for d in dropped}
    for reply in res2.replies.values():
        for key, value in dict(reply.content.config_records["shares"]).items():
            kind, owner = key.split("-")
            (self_shares if kind == "self" else key_shares).setdefault(int(owner), []).append(bytes.fromhex(str(value)))
    try:
        total = unmask({index[n]: masked[n] for n in survivors}, ros, label=label, participants=sorted(index.values()),
                       self_mask_shares=self_shares, mask_key_shares=key_shares)
    except SecureSumError as exc:
        raise TooFewSitesError(f"{where}: {exc}") from None
    state.rounds.append({"phase": "secure-unmask", "label": label, **res2.cost(),
                         "sites": sorted(state.site_of(n) for n in res2.replies)})
    return unflatten(decode(total), json.loads(layouts[survivors[0]])), survivors


def _size(layout_json: str) -> int:
    return sum(int(np.prod(shape)) for _, shape in json.loads(layout_json))


def _masked_reply(reply: Any, message_type: str) -> tuple[np.ndarray, str, dict[str, str]]:
    arrays = from_record(reply.content.array_records[summed_record(message_type)])
    vec = arrays["masked"]
    if set(arrays) != {"masked"} or vec.dtype != np.uint64 or vec.ndim != 1:
        raise ValueError("not one uint64 vector")
    secure = dict(reply.content.config_records["secure"])
    sealed = {k.removeprefix("self-"): str(v) for k, v in secure.items() if k.startswith("self-")}
    return vec, str(secure["layout"]), sealed
