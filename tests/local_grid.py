"""An in-process Grid for fast tests of the ServerApp phases (no Ray, no SuperLink).

It hands each Message synchronously to the real ClientApp with a per-node Context, so the
real handlers, vaults and ledgers run; only Flower's transport is skipped. It touches two
Flower internals (``TaskIdentity`` and the message id in ``metadata``), which is why it lives
in tests only; end-to-end tests use the real Simulation Engine and a real SuperLink.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Error, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from common.records import PACKED

TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1


class LocalGrid(Grid):
    """Nodes 101, 102, ... each bound to one node config; ``fail`` can make a node misbehave."""

    def __init__(self, client_app: Any, node_configs: list[dict[str, Any]], run_config: dict[str, Any],
                 *, fail: Callable[[int, Message], str | None] | None = None) -> None:
        self.app = client_app
        self.ctx = {101 + i: Context(run_id=1, node_id=101 + i, node_config=cfg, state=RecordDict(),
                                     run_config=run_config) for i, cfg in enumerate(node_configs)}
        self.fail = fail
        self.offline: set[int] = set()
        self._replies: dict[str, Message] = {}
        self.exchanges = 0

    def set_run(self, run_id: int) -> None:  # noqa: D102 - Grid API
        pass

    @property
    def run(self) -> Run:  # noqa: D102 - Grid API
        return Run.create_empty(run_id=1)

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:  # noqa: D102 - Grid API
        return Message(content, dst_node_id, message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:  # noqa: D102 - Grid API
        return [n for n in self.ctx if n not in self.offline]

    def get_nodes(self) -> Iterable[Any]:  # noqa: D102 - Grid API
        return []

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # noqa: D102 - Grid API
        self.exchanges += 1
        ids = []
        for m in messages:
            mid = uuid.uuid4().hex
            m.metadata.__dict__["_message_id"] = mid
            node = m.metadata.dst_node_id
            ids.append(mid)
            if node in self.offline:
                continue  # a dead node never answers
            reason = self.fail(node, m) if self.fail else None
            if reason == "silent":
                continue
            if reason == "garble":  # a real reply whose array records do not unpack
                reply = self.app(m, self.ctx[node])
                for name in list(reply.content.array_records):
                    reply.content[name] = ArrayRecord({PACKED: Array(np.frombuffer(b"garbage", dtype=np.uint8))})
                self._replies[mid] = reply
                continue
            if reason:
                self._replies[mid] = Message(Error(code=2, reason=reason), reply_to=m)
                continue
            self._replies[mid] = self.app(m, self.ctx[node])
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # noqa: D102 - Grid API
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))  # noqa: D102 - Grid API


def node_configs(sites: Path) -> list[dict[str, Any]]:
    """One deployment-style node config per site folder of a layout (vault, key file, name)."""
    return [{"vault": str(p / "vault"), "key-file": str(p / "key"), "site": p.name}
            for p in sorted(q for q in Path(sites).iterdir() if (q / "vault").is_dir())]


def reference_layout(root: Path, *, patients: int, sites: int = 3, seed: int = 5) -> Path:
    """``root/sites``: a synthetic cohort split iid over ``sites`` vaults whose policies allow the
    non-private reference (``dp = false``, exact test statistics), for in-process federation tests."""
    from simulations.site_layout import set_layout_policy, split_cohort
    from simulations.synthetic import write_synthetic_cohort

    write_synthetic_cohort(out=root / "cohort", patients=patients, seed=seed)
    split_cohort(spec_path=root / "cohort" / "spec.toml", sites=sites, by="iid", out=root / "sites", seed=0,
                 vaults=True, show_progress=False)
    set_layout_policy(root / "sites", require_dp=False, test_statistics="exact")
    return root / "sites"


def fixed_key_bytes(seed: int) -> Callable[..., bytes]:
    """``secrets.token_bytes`` made reproducible, for patching ``client.vault.secrets.token_bytes``
    while a layout's vaults are made: each site seeds its models, sampling and DP noise from its
    vault key and the run id, so fixed keys (with a fixed run id) make a whole run repeat exactly."""
    rng = random.Random(seed)
    return lambda n=32: rng.randbytes(n)
