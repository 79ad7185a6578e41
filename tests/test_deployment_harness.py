"""The local deployment harness (simulations/deployment.py) against real Flower processes.

The end-to-end test starts a SuperLink with TLS and SuperNode authentication, registers and
starts 3 SuperNodes, runs a tiny throwaway Flower app written into tmp_path (one ``query``
exchange), checks that every site answered, that an unregistered SuperNode is refused, and
that nothing the deployment started outlives it. The other tests are fast checks of the
harness's own logic (config strings, app checks, teardown of detached descendants).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from simulations.deployment import DeploymentError, LocalDeployment, ManagedProcess
from simulations.flower_cli import FlowerAppError, check_app, format_config
from simulations.process_tree import alive, pids_with_environ

PROBE_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "genofed-probe"
version = "1.0.0"
description = "Throwaway Flower app for the deployment harness test"
license = "Apache-2.0"
dependencies = ["flwr>=1.42,<1.43"]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "genofed-tests"

[tool.flwr.app.components]
serverapp = "genofed_probe.server_app:app"
clientapp = "genofed_probe.client_app:app"

[tool.flwr.app.config]
out-file = ""
expected-nodes = 3
wait-timeout = 60.0
"""

PROBE_SERVER = '''\
"""Sends one query to every node and writes the sites that answered to run_config["out-file"]."""

import json
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    out, expected = Path(str(cfg["out-file"])), int(cfg["expected-nodes"])
    deadline = time.monotonic() + float(cfg["wait-timeout"])
    node_ids = sorted(grid.get_node_ids())
    while len(node_ids) < expected:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(node_ids)} of {expected} nodes connected")
        time.sleep(0.2)
        node_ids = sorted(grid.get_node_ids())
    messages = [Message(RecordDict({"config": ConfigRecord({"ask": "site"})}), dst_node_id=node_id,
                        message_type=MessageType.QUERY) for node_id in node_ids]
    # push + pull every 0.1 s rather than send_and_receive, which polls every 3 s
    pending = set(grid.push_messages(messages))
    replies = []
    while pending:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(pending)} replies missing")
        for reply in grid.pull_messages(list(pending)):
            pending.discard(reply.metadata.reply_to_message_id)
            replies.append(reply)
        time.sleep(0.1)
    sites = {str(r.metadata.src_node_id): str(r.content["answer"]["site"]) for r in replies if not r.has_error()}
    errors = [f"{r.error.code}: {r.error.reason}" for r in replies if r.has_error()]
    out.write_text(json.dumps({"nodes": [str(n) for n in node_ids], "sites": sites, "errors": errors}))
    print(f"probe: {len(sites)} sites answered: {sorted(sites.values())}")
'''

PROBE_CLIENT = '''\
"""Answers a query with this node's node_config["site"]."""

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    site = str(context.node_config.get("site", "unknown"))
    return Message(RecordDict({"answer": ConfigRecord({"site": site})}), reply_to=msg)
'''


def write_probe_app(folder: Path) -> Path:
    (folder / "genofed_probe").mkdir(parents=True)
    (folder / "pyproject.toml").write_text(PROBE_PYPROJECT)
    (folder / "genofed_probe" / "__init__.py").write_text("")
    (folder / "genofed_probe" / "server_app.py").write_text(PROBE_SERVER)
    (folder / "genofed_probe" / "client_app.py").write_text(PROBE_CLIENT)
    return folder


@pytest.mark.slow
@pytest.mark.timeout(175)  # measured 22-30 s on 2 cores; the waits below fail first
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="checks processes through /proc")
def test_tls_deployment_runs_refuses_unregistered_node_and_cleans_up(tmp_path: Path) -> None:
    app = write_probe_app(tmp_path / "app")
    out = tmp_path / "result.json"
    workdir = tmp_path / "deploy"
    t0 = time.monotonic()
    # the plain path: stock flower-supernode (no vaults needed) and a SuperLink with its SQLite state
    with LocalDeployment(workdir, sites=3, warm=False, database=True) as dep:
        dep.start({f"site-{i}": {"site": f"site-{i}"} for i in (1, 2, 3)}, timeout=75)
        link = dep.superlink
        assert link is not None
        for flag in ("--enable-supernode-auth", "--disable-runtime-dependency-installation", "--ssl-certfile",
                     "--ssl-keyfile", "--ssl-ca-certfile", "--database"):
            assert flag in link.argv
        assert "--insecure" not in link.argv
        ports = {link.port} | {node.port for node in dep.supernodes.values()}
        assert len(ports) == 4 and 8000 not in ports and 9094 not in ports  # chosen at run time
        config = (dep.cli_home / "config.toml").read_text()
        assert f'address = "{dep.address}"' in config and "root-certificates" in config
        assert "insecure" not in config

        # A fourth SuperNode with a key the coordinator never registered, started alongside the run.
        intruder_key, _ = dep.new_supernode_key("intruder")
        intruder = dep.start_supernode("intruder", private_key=intruder_key, node_config={"site": "intruder"})

        result = dep.run(app, run_config={"out-file": str(out)}, timeout=75)
        live = dep.pids()
        assert result.status.completed, f"{result.status}\n{result.log}"
        answer = json.loads(out.read_text())
        assert sorted(answer["sites"].values()) == ["site-1", "site-2", "site-3"], answer
        assert answer["errors"] == [] and len(answer["nodes"]) == 3
        assert set(answer["sites"]) == {str(n) for n in dep.node_ids.values()}
        assert "probe: 3 sites answered" in result.log
        tails = dep.log_tails(lines=5)  # what a failed run's message carries: every daemon's last lines
        assert tails.count("--- ") == 5 and "SuperLink" in tails and "SuperNode site-3" in tails
        assert "\x1b[92mINFO \x1b[0m:\n" not in tails  # Flower's blank lines left out

        # Refused: Flower logs exit code 305 / "Failed to activate SuperNode" and the process exits with 1.
        assert intruder.wait_exit(30) == 1, intruder.log_tail()
        assert intruder.refused, intruder.log_tail()
        statuses = dep.supernode_statuses()
        assert statuses == {node_id: "online" for node_id in dep.node_ids.values()}

        # Every wait names the process and shows its log when it times out.
        with pytest.raises(DeploymentError, match=r"SuperLink \(pid \d+, running, log .*superlink\.log\) still running"):
            link.wait_exit(0.1)

        # Fault injection: a killed SuperNode takes its SuperExec (and any ClientApp) with it.
        site3 = dep.supernodes["site-3"]
        site3_tree = {site3.pid} | {pid for pid in live if _is_descendant(pid, site3.pid)}
        assert dep.kill_supernode("site-3") == -signal.SIGKILL
        assert not any(alive(pid) for pid in site3_tree)
        assert dep.supernodes["site-1"].alive() and link.alive()
        live |= dep.pids()
    elapsed = time.monotonic() - t0

    assert live, "no deployment processes were seen"
    assert not [pid for pid in live if alive(pid)], "processes outlived the deployment"
    assert pids_with_environ(str(workdir).encode()) == []
    print(f"\ntimings: {dep.timings}; total {elapsed:.1f} s")


def _is_descendant(pid: int, ancestor: int) -> bool:
    from simulations.process_tree import parent_map

    parents = parent_map()
    while pid in parents and pid > 1:
        pid = parents[pid]
        if pid == ancestor:
            return True
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="checks processes through /proc")
def test_close_kills_detached_descendants(tmp_path: Path) -> None:
    """Teardown reaches a grandchild in its own session (as the SuperLink's SuperExec is), and is idempotent."""
    dep = LocalDeployment(tmp_path / "deploy", sites=1)
    script = textwrap.dedent("""
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)
        print(child.pid, flush=True)
        time.sleep(300)
    """)
    home = tmp_path / "fake"
    home.mkdir()
    (home / "daemon.py").write_text(script)
    dep.superlink = dep._launch("fake daemon", [sys.executable, str(home / "daemon.py")], home, home / "fake.log", 0)
    deadline = time.monotonic() + 30
    while len((home / "fake.log").read_text().splitlines()) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    grandchild = int((home / "fake.log").read_text().splitlines()[1])  # line 0 is the harness's "# argv"
    assert dep.pids() == {dep.superlink.pid, grandchild}
    dep.close(grace=2.0)
    dep.close()
    assert not alive(grandchild) and not dep.superlink.alive()
    with pytest.raises(DeploymentError, match="closed"):
        dep._launch("late", [sys.executable, "-c", "pass"], home, home / "late.log", 0)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # click deprecations raised by importing flwr
def test_format_config() -> None:
    assert format_config(None) == ""
    assert format_config(" a=1 ") == "a=1"
    assert format_config({"vault": "/a b/v", "n": 2, "x": 0.5, "dp": True, "w": "C:\\data"}) == \
        "vault='/a b/v' n=2 x=0.5 dp=true w='C:\\data'"
    assert format_config({"s": "it's"}) == 's="it\'s"'
    for bad in ({"s": "both ' and \""}, {"s": "two\nlines"}, {"bad key": 1}, {"x": float("nan")}, {"l": [1]}):
        with pytest.raises(ValueError):
            format_config(bad)
    # What Flower parses out of it is what went in.
    from flwr.common.config import parse_config_args

    values = {"vault": "/a b/v", "n": 2, "x": 0.5, "dp": True, "w": "C:\\data", "s": "it's"}
    assert parse_config_args([format_config(values)]) == values


def test_app_with_federations_section_is_refused(tmp_path: Path) -> None:
    app = write_probe_app(tmp_path / "app")
    check_app(app)
    (app / "pyproject.toml").write_text(PROBE_PYPROJECT + '\n[tool.flwr.federations]\ndefault = "x"\n')
    with pytest.raises(FlowerAppError, match=r"remove \[tool.flwr.federations\]"):
        check_app(app)
    with pytest.raises(FlowerAppError, match="no pyproject.toml"):
        check_app(tmp_path)


def test_managed_process_log_tail(tmp_path: Path) -> None:
    log = tmp_path / "p.log"
    log.write_text("\n".join(f"line {i}" for i in range(100)))
    popen = subprocess.Popen([sys.executable, "-c", "pass"])
    popen.wait()
    proc = ManagedProcess(name="P", argv=[], log_path=log, home=tmp_path, port=0, popen=popen)
    assert proc.log_tail(3) == "line 97\nline 98\nline 99"
    assert proc.describe() == f"P (pid {popen.pid}, exited with code 0, log {log})"
