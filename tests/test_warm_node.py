"""``genofed supernode``'s warm worker on a real deployment: a SuperLink with TLS and SuperNode
authentication, two SuperNodes started as sites start them, a throwaway Flower app.

Checked through what the ClientApp itself reports (its process id and a module-level counter):
every message of a run is served by one warm process; a handler that raises becomes an error
reply naming the exception, and the next message is still served by the same process; a second
run gets a new process whose module state starts afresh.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from client.vault import KeySource, Vault, generate_key_file
from simulations.deployment import LocalDeployment
from tests.test_deployment_harness import PROBE_PYPROJECT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300),
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG, /proc")]

SERVER = '''\
"""Three exchanges with every node: query, query.fail, query; the replies go to out-file."""

import json
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


def answers(grid, nodes, kind):
    msgs = [Message(RecordDict({"q": ConfigRecord({"x": 1})}), dst_node_id=n, message_type=kind) for n in nodes]
    out = []
    for reply in grid.send_and_receive(msgs, timeout=60):
        if reply.has_error():
            out.append({"error": reply.error.reason})
        else:
            out.append(dict(reply.content["a"]))
    return out


@app.main()
def main(grid: Grid, context: Context) -> None:
    deadline = time.monotonic() + 60
    while len(list(grid.get_node_ids())) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    nodes = sorted(grid.get_node_ids())
    steps = [answers(grid, nodes, kind) for kind in ("query", "query.fail", "query")]
    Path(str(context.run_config["out-file"])).write_text(json.dumps(steps))
'''

CLIENT = '''\
"""Answers with this process's id and how many messages this module has served."""

import os

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()
SERVED = 0


@app.query()
def query(msg: Message, context: Context) -> Message:
    global SERVED
    SERVED += 1
    return Message(RecordDict({"a": ConfigRecord({"pid": os.getpid(), "served": SERVED})}), reply_to=msg)


@app.query("fail")
def fail(msg: Message, context: Context) -> Message:
    raise ValueError("planted failure")
'''


def _write_app(folder: Path) -> Path:
    (folder / "genofed_probe").mkdir(parents=True)
    (folder / "pyproject.toml").write_text(PROBE_PYPROJECT.replace('expected-nodes = 3', 'expected-nodes = 2'))
    (folder / "genofed_probe" / "__init__.py").write_text("")
    (folder / "genofed_probe" / "server_app.py").write_text(SERVER)
    (folder / "genofed_probe" / "client_app.py").write_text(CLIENT)
    return folder


def _site(folder: Path) -> dict[str, str]:
    folder.mkdir(parents=True)
    key = generate_key_file(folder / "key")
    Vault.create(folder / "vault", KeySource.from_key_file(key), {})
    return {"vault": str(folder / "vault"), "key-file": str(key), "site": folder.name}


def test_warm_worker_serves_a_run_in_one_process_and_each_run_afresh(tmp_path: Path) -> None:
    app = _write_app(tmp_path / "app")
    nodes = {name: _site(tmp_path / name) for name in ("site-1", "site-2")}
    with LocalDeployment(tmp_path / "deploy", sites=2, warm=True) as dep:
        dep.start(nodes, timeout=90)
        assert all(node.argv[:2] == ["genofed", "supernode"] for node in dep.supernodes.values())
        runs = []
        for i in range(2):
            out = tmp_path / f"run{i}.json"
            result = dep.run(app, run_config={"out-file": str(out)}, timeout=120)
            assert result.status.completed, result.log[-3000:]
            runs.append(json.loads(out.read_text()))
        logs = {name: node.log_text() for name, node in dep.supernodes.items()}

    for steps in runs:
        first, failed, last = steps
        assert len(first) == len(failed) == len(last) == 2
        assert all("planted failure" in r["error"] and "ValueError" in r["error"] for r in failed)
        # the same process answers before and after the failure, and its module state carried on
        assert sorted(r["pid"] for r in first) == sorted(r["pid"] for r in last)
        assert all(r["served"] == 1 for r in first) and all(r["served"] == 2 for r in last)
    # the second run: new processes, fresh module state (served restarts at 1 above)
    assert not {r["pid"] for r in runs[0][0]} & {r["pid"] for r in runs[1][0]}
    assert all("task query.fail: failed" in text for text in logs.values()), logs
