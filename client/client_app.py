"""The hospital's Flower ClientApp: Flower records in, :mod:`client.handlers` out, egress enforced.

Message types
-------------
``query.census``     schema hash, counts, budget, whether the run's plan fits the policy  (phase 0)
``query.moments``    additive moments of the shared columns (one scaler for all)          (phase 0)
``train``            one round of local DP-SGD from the global CNN                        (phase 1)
``train.glm``        Newton terms of the federated GLM                                    (phase 2)
``train.meta``       forest + meta-features, Newton terms of the meta LR                  (phases 2-3)
``train.alone``      the site's own models alone (stay on the site; only the count leaves)
``query.validation`` validation statistics: thresholds and the stacking fallback          (phase 4)
``query.explain``    clipped, noised attribution sums for the global explanation         (phase 5)
``query.secure_keys``, ``query.secure_shares``, ``query.secure_unmask``
                     the secure sum's keys, mask-key shares and unmasking (client/secure_release.py)
``evaluate``         test statistics of every model (once per run); stores final models
                     and the global explanation                                           (phase 6)

Every handler parses the run config into :class:`RunSettings` (what the run asks for, checked
against the site's policy) and the message into :class:`RoundFacts`; no setting is read from a
message. Before a reply is handed to Flower it is checked against its egress contract
(:mod:`client.privacy.egress`) and recorded in the site's egress log: a reply that breaks the
contract becomes an error reply and its content never leaves.

Imports stay light at module level: Flower starts a fresh ClientApp process for every message
in deployment, so torch and scikit-learn are imported inside the handlers that need them.
Errors a site raises on purpose (policy refusal, budget exceeded, wrong schema) become Flower
error replies whose reason the coordinator logs with the site's name.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.site import resolve_site
from common.errors import GenofedError
from common.records import from_record, to_record
from common.settings import RoundFacts, RunSettings

log = logging.getLogger("genofed.client")
app = ClientApp()


class EgressBlocked(GenofedError):
    """A reply broke the site's egress contract and was not sent."""


def _facts(msg: Message) -> RoundFacts:
    return RoundFacts.from_config(dict(msg.content.config_records.get("config", ConfigRecord())))


def _answer(msg: Message, context: Context, handler: Callable[..., Any], *arrays: str) -> Message:
    """Run ``handler``, enforce the egress contract, log the reply, and build the Flower reply."""
    t0 = time.perf_counter()
    settings = RunSettings.from_run_config(dict(context.run_config))
    facts = _facts(msg)
    site = resolve_site(dict(context.node_config), dict(context.run_config))
    inputs = [from_record(msg.content.array_records[name]) for name in arrays]
    reply = handler(site, *inputs, settings, facts)
    reply.records.setdefault("metrics", ("metric", {}))[1]["handler-seconds"] = time.perf_counter() - t0
    return _send(msg, reply, facts, site, settings)


def _observe(reply: Any) -> dict[str, dict[str, Any]]:
    from client.privacy.egress import observe

    return {name: {key: observe(_plain(value)) for key, value in values.items()}
            for name, (_, values) in reply.records.items()}


def _send(msg: Message, reply: Any, facts: RoundFacts, site: Any, settings: RunSettings) -> Message:
    """Check ``reply`` against its contract, mask its summed record for a secure exchange (checked
    again as masked), log it, and build the Flower reply."""
    from common.summands import summed_record

    observed = _observe(reply)
    problems = reply.contract.violations(observed)
    message_type = msg.metadata.message_type
    if summed_record(message_type) and not facts.secure and settings.secure_sum:
        # a curious coordinator could ask one round in the clear: the run's secure-sum binds every sum
        problems.append("the run asks for secure-sum = true and this request for a sum carries no secure-sum facts")
    secure = None
    if not problems and facts.secure and summed_record(message_type):
        secure, problems = _mask(reply, message_type, facts, site)
        observed = _observe(reply)
    if problems:
        reason = "; ".join(problems)
        reply.privacy.log_reply(message_type=message_type, round=facts.server_round, observed=observed,
                                status="blocked", reason=reason, secure=secure)
        raise EgressBlocked(f"reply to {message_type} blocked by the site's egress contract (nothing was sent): "
                            f"{reason}")
    reply.privacy.log_reply(message_type=message_type, round=facts.server_round, observed=observed, secure=secure)
    return Message(RecordDict({name: _record(kind, values) for name, (kind, values) in reply.records.items()}),
                   reply_to=msg)


def _mask(reply: Any, message_type: str, facts: RoundFacts, site: Any) -> tuple[dict[str, Any] | None, list[str]]:
    """The summed record masked (common/secure_sum.py); what the log notes, and the masked reply's
    contract violations (a step that fails sends nothing: its reason is the violation)."""
    from client.privacy.egress import masked_contract
    from client.secure_release import mask_reply
    from common.secure_sum import SecureSumError
    from common.summands import plain_metrics

    try:
        note = mask_reply(reply, message_type, facts, site)
    except SecureSumError as exc:
        return None, [str(exc)]
    contract = masked_contract(reply.contract, summed=note["summed"], length=note["length"],
                               participants=note["participants"],
                               metrics=list(plain_metrics(message_type, reply.contract.records.get("metrics", {}))))
    return note, contract.violations(_observe(reply))


def _plain(value: Any) -> Any:
    """Values as Flower will carry them (numpy scalars as Python numbers)."""
    if isinstance(value, np.generic):
        return value.item()
    return value


def _record(kind: str, values: dict[str, Any]) -> ArrayRecord | MetricRecord | ConfigRecord:
    if kind == "array":
        return to_record({k: np.asarray(v) for k, v in values.items()})
    if kind == "metric":
        return MetricRecord({k: _plain(v) for k, v in values.items()})
    return ConfigRecord({k: _plain(v) for k, v in values.items()})


@app.query("census")
def census(msg: Message, context: Context) -> Message:
    from client import handlers

    return _answer(msg, context, handlers.census)


@app.query("moments")
def moments(msg: Message, context: Context) -> Message:
    from client import handlers

    return _answer(msg, context, handlers.moments)


@app.train()
def train(msg: Message, context: Context) -> Message:
    from client import handlers

    out = _answer(msg, context, handlers.train_round, "arrays", "shared")
    log.info("site round %s trained", _facts(msg).server_round)
    return out


@app.train("meta")
def train_meta(msg: Message, context: Context) -> Message:
    from client import handlers

    return _answer(msg, context, handlers.meta_round, "cnn", "shared")


@app.train("glm")
def train_glm(msg: Message, context: Context) -> Message:
    from client import handlers

    return _answer(msg, context, handlers.glm_round, "shared")


@app.train("alone")
def train_alone(msg: Message, context: Context) -> Message:
    from client import handlers

    return _answer(msg, context, handlers.train_alone)


@app.query("validation")
def validation(msg: Message, context: Context) -> Message:
    from client import handlers

    return _answer(msg, context, handlers.validation, "cnn", "shared")


@app.query("explain")
def explain(msg: Message, context: Context) -> Message:
    from client import explain_release

    return _answer(msg, context, explain_release.explain, "cnn", "shared")


@app.query("secure_keys")
def secure_keys(msg: Message, context: Context) -> Message:
    from client import secure_release

    return _answer(msg, context, secure_release.secure_keys)


@app.query("secure_shares")
def secure_shares(msg: Message, context: Context) -> Message:
    from client import secure_release

    return _answer(msg, context, secure_release.secure_shares)


@app.query("secure_unmask")
def secure_unmask(msg: Message, context: Context) -> Message:
    from client import secure_release

    sealed = dict(msg.content.config_records.get("sealed", ConfigRecord()))
    return _answer(msg, context, lambda site, settings, facts: secure_release.secure_unmask(
        site, settings, facts, {str(k): str(v) for k, v in sealed.items()}))


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    from client import handlers

    return _answer(msg, context, handlers.evaluate, "cnn", "shared")
