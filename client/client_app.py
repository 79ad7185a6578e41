"""The hospital's Flower ClientApp: Flower records in, :mod:`client.handlers` out.

Message types
-------------
``query.census``    schema hash, counts, privacy budget                  (phase 0)
``train``           one round of local DP-SGD from the global CNN         (phase 1)
``train.meta``      forest + meta-features, Newton terms of the meta LR   (phases 2-3)
``evaluate``        test statistics of every model; stores final models   (phase 4)

Imports stay light at module level: Flower starts a fresh ClientApp process for every message
in deployment, so torch and scikit-learn are imported inside the handlers that need them.
Errors a site raises on purpose (budget exceeded, wrong schema) become Flower error replies
whose reason the coordinator logs with the site's name.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.site import resolve_site
from common.records import from_record, to_record

log = logging.getLogger("genofed.client")
app = ClientApp()
META_ARRAYS = ("grad", "hess", "local_coef", "local_hess")


def _config(msg: Message) -> dict[str, Any]:
    return dict(msg.content.config_records.get("config", ConfigRecord()))


def _site(context: Context) -> Any:
    return resolve_site(dict(context.node_config), dict(context.run_config))


def _run_config(msg: Message, context: Context) -> dict[str, Any]:
    # The coordinator's per-message settings win over the run config (both are run-wide).
    return {**dict(context.run_config), **_config(msg)}


@app.query("census")
def census(msg: Message, context: Context) -> Message:
    from client import handlers

    t0 = time.perf_counter()
    info = handlers.census(_site(context), _run_config(msg, context))
    metrics = {"num-examples": int(info["n-train"]), "handler-seconds": time.perf_counter() - t0}
    return Message(RecordDict({"census": ConfigRecord(info), "metrics": MetricRecord(metrics)}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    from client import handlers

    t0 = time.perf_counter()
    site = _site(context)
    weights, metrics = handlers.train_round(site, from_record(msg.content.array_records["arrays"]),
                                            _run_config(msg, context))
    metrics["handler-seconds"] = time.perf_counter() - t0
    log.info("site %s: round %s trained", site.name, _config(msg).get("server-round"))
    return Message(RecordDict({"arrays": to_record(weights), "metrics": MetricRecord(metrics),
                               "site": ConfigRecord({"site": site.name})}), reply_to=msg)


@app.train("meta")
def train_meta(msg: Message, context: Context) -> Message:
    from client import handlers

    t0 = time.perf_counter()
    out = handlers.meta_round(_site(context), from_record(msg.content.array_records["cnn"]), _run_config(msg, context))
    arrays = {k: np.asarray(out[k], dtype=np.float64) for k in META_ARRAYS if k in out}
    metrics = {"num-examples": int(out["n"]), "loss": float(out["loss"]), "handler-seconds": time.perf_counter() - t0}
    metrics.update({k: float(out[k]) for k in ("epsilon", "noise-multiplier") if k in out})
    return Message(RecordDict({"terms": to_record(arrays), "metrics": MetricRecord(metrics)}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    from client import handlers

    t0 = time.perf_counter()
    arrays, metrics = handlers.evaluate(_site(context), from_record(msg.content.array_records["cnn"]),
                                        _run_config(msg, context))
    metrics["handler-seconds"] = time.perf_counter() - t0
    return Message(RecordDict({"stats": to_record(arrays), "metrics": MetricRecord(metrics)}), reply_to=msg)
