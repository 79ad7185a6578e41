"""A real Flower deployment on this machine: one SuperLink with TLS and SuperNode authentication,
N SuperNodes, and the ``flwr`` CLI wired to them; for end-to-end tests and for trying a deployment.

Everything the harness starts is a real Flower 1.42 process (``flower-superlink``, ``flwr``, and
each site's SuperNode through ``genofed supernode``, or stock ``flower-supernode`` with
``warm=False``), launched exactly as a coordinator and hospitals would launch them, with these
local choices:

- TLS with credentials from :func:`server.certs.generate_certs` (made in ``WORKDIR/certs`` unless
  an existing folder is given), ``--enable-supernode-auth`` and
  ``--disable-runtime-dependency-installation`` on the SuperLink (no ``uv sync``, no network).
- Free ports chosen by the OS at run time, never fixed ones, so parallel runs do not collide: one
  for the SuperLink (Fleet, Control and Runtime APIs share it in 1.42) and one per SuperNode
  (its local Runtime API, ``--port``). A start that loses a port race is retried on a new port.
- Every process has its own ``FLWR_HOME`` and working directory under ``WORKDIR`` (so FABs,
  relative writes and logs never mix), the SuperLink its state in memory (a SQLite ``--database``
  with ``database=True``), and every process
  the environment ``FLWR_DISABLE_UPDATE_CHECK=1``, ``FLWR_TELEMETRY_ENABLED=0``,
  ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL=0.2`` and a ``PATH`` that starts with this Python's
  ``bin/`` (Flower launches ``flower-superexec``, ``flwr-serverapp`` and ``flwr-clientapp`` by
  bare name).
- Everything on 127.0.0.1 by default; ``host=`` (the SuperLink's bind and dial address, named
  in the certificate) and ``prefix_for=`` (a command prefix per process, e.g. ``ip netns exec
  NS``) put the coordinator and each site on hosts of their own (tests/test_network_partition.py).
- The ``flwr`` CLI gets its own ``FLWR_HOME`` whose ``config.toml`` holds one connection
  (``[superlink.<name>] address, root-certificates``); :meth:`LocalDeployment.flwr_env` returns
  that environment for running further ``flwr`` commands by hand.

Layout of ``WORKDIR``::

    certs/                  CA, SuperLink certificate, site keys (unless ``certs=`` was given)
    superlink/              cwd + FLWR_HOME of the SuperLink; state.db; superlink.log
    supernodes/<name>/      cwd + FLWR_HOME of each SuperNode; supernode.log (ClientApp output too)
    cli/                    FLWR_HOME of the flwr CLI (config.toml); flwr.log (every CLI call)
    keys/                   extra SuperNode keys made by :meth:`LocalDeployment.new_supernode_key`

Every wait has a timeout, and a failure raises :class:`DeploymentError` naming the process, its
log file and the last lines of that log. Processes start in their own sessions and are torn down
by :meth:`LocalDeployment.close` (also on leaving the ``with`` block, on an exception, and at
interpreter exit): SIGTERM to each process group and to every descendant recorded from ``/proc``
(the SuperLink's SuperExec runs detached, in its own session), then SIGKILL after a grace period,
and a last sweep for any process whose environment holds one of the deployment's FLWR_HOMEs.
On Linux each daemon also gets ``PR_SET_PDEATHSIG`` so that it dies with the harness even if the
harness is killed with SIGKILL; Flower's own child processes follow their parent (``--parent-pid``).

Example (also what the end-to-end test does)::

    with LocalDeployment(tmp_path / "deploy") as dep:
        dep.start({"site-1": {"vault": "/v1"}, "site-2": {"vault": "/v2"}, "site-3": {"vault": "/v3"}})
        result = dep.run(app_dir, run_config={"rounds": 2}, timeout=180)
        assert result.status.completed, result.log

Command line (a local TLS federation for people)::

    python -m simulations.deployment WORKDIR --sites 3 \
        [--certs DIR] [--node-config site-1 'vault="/abs/v1" key-file="/abs/k1"' ...] \
        [--app DIR [--run-config 'k=v ...'] [--timeout S]]

Without ``--app`` it starts the federation, prints the ``flwr`` commands to use it and waits for
Ctrl-C; with ``--app`` it submits one run, prints its status and ServerApp log, and tears down.

Timings of the harness itself are in docs/federation.md ("Measured").
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.errors import GenofedError
from server.certs import CertBundle, generate_certs, write_supernode_key
from simulations.flower_cli import FlowerAppError, check_app, cli_failure, format_config, last_json, tail
from simulations.process_tree import alive, descendants, pids_with_environ, signal_pids, start_time, wait_gone
from simulations.superlink import (HOST, PORT_IN_USE, SuperLinkConfig, SuperLinkError, free_port, spawn,
                                   start_superlink)

DEFAULT_CONNECTION = "genofed-local"
FLWR_ENV = {
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2",
    "PYTHONUNBUFFERED": "1",
}
"""Environment every process of the deployment gets (on top of the caller's)."""
RUN_FINISHED_PREFIX = "finished:"
STATUS_COMPLETED = "finished:completed"
REFUSED_MARKERS = ("Exit Code: 305", "Failed to activate SuperNode")
"""What a refused (unregistered) SuperNode logs before it exits. Flower's "exit code" 305 is
only logged: the process itself exits with status 1, as for every Flower error exit (1.42)."""
_LOG_TAIL_LINES = 30
_BLANK_LOG_LINES = {"\x1b[92mINFO \x1b[0m:", "INFO :"}
"""Flower's empty log lines (coloured or not), left out of :meth:`LocalDeployment.log_tails`."""
_EXECUTABLES = ("genofed", "flwr", "flower-superlink", "flower-supernode", "flower-superexec", "flwr-serverapp",
                "flwr-clientapp")
_ACTIVATED = "SuperNode ID:"
"""What flower-supernode logs once the SuperLink has accepted it (1.42)."""


class DeploymentError(GenofedError):
    """A deployment process failed, exited early, or did not reach a state in time."""


# ---------------------------------------------------------------------------------------------
# Processes


@dataclass
class ManagedProcess:
    """One daemon the harness started: its command, log file, home and port."""

    name: str
    argv: list[str]
    log_path: Path
    home: Path
    port: int
    popen: subprocess.Popen[bytes]
    started_at: float = field(default_factory=time.monotonic)

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        """Exit code, or None while it runs."""
        return self.popen.poll()

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        return tail(self.log_text(), lines)

    def describe(self) -> str:
        state = "running" if self.alive() else f"exited with code {self.returncode}"
        return f"{self.name} (pid {self.pid}, {state}, log {self.log_path})"

    def wait_exit(self, timeout: float) -> int:
        """Wait for the process to exit by itself; returns its exit code."""
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise DeploymentError(f"{self.describe()} still running after {timeout:.0f} s; "
                                  f"last log lines:\n{self.log_tail()}") from None


@dataclass
class SuperNode(ManagedProcess):
    """A SuperNode process plus what identifies it to the SuperLink."""

    private_key: Path = Path()
    node_config: str = ""
    node_id: int | None = None

    @property
    def refused(self) -> bool:
        """Whether the node has exited because the SuperLink refused its key (not registered)."""
        return not self.alive() and all(marker in self.log_text() for marker in REFUSED_MARKERS)


@dataclass(frozen=True)
class RunStatus:
    """A run's status as ``flwr ls --run-id N --format json`` reports it."""

    run_id: int
    status: str
    details: str
    raw: dict[str, Any]

    @property
    def finished(self) -> bool:
        return self.status.startswith(RUN_FINISHED_PREFIX)

    @property
    def completed(self) -> bool:
        return self.status == STATUS_COMPLETED


@dataclass(frozen=True)
class RunResult:
    """A finished run: its final status, the ServerApp log, and the wall time from submission."""

    run_id: int
    status: RunStatus
    log: str
    seconds: float


# ---------------------------------------------------------------------------------------------
# The harness


class LocalDeployment(contextlib.AbstractContextManager["LocalDeployment"]):
    """A SuperLink (TLS + SuperNode authentication) and SuperNodes on 127.0.0.1, plus the flwr CLI.

    Parameters
    ----------
    workdir : path
        Folder for all state and logs (created; reuse across instances is not supported).
    certs : path or CertBundle, optional
        Existing credentials from ``genofed certs``; by default new ones are made in
        ``workdir/certs`` with ``sites`` site keys.
    sites : int
        Number of site keys to generate when ``certs`` is not given.
    connection : str
        Name of the SuperLink connection in the CLI's ``config.toml``.
    env : mapping, optional
        Extra environment for every process (after :data:`FLWR_ENV`).
    die_with_parent : bool
        On Linux, have every daemon killed when the thread that started it exits (PR_SET_PDEATHSIG),
        so that nothing outlives a harness killed by SIGKILL. Start the deployment from a thread
        that lives as long as it (the main thread, normally).
    database : bool
        Keep the SuperLink's state in ``superlink/state.db`` (SQLite) rather than in memory. It
        makes registrations survive a SuperLink restart, and costs a write per message object
        (``simulations.benchmarks.deployment_rounds``: 62.2 s with it, 54.3 s without; docs/federation.md).
    warm : bool
        Start SuperNodes with ``genofed supernode`` (vault checked, warm ClientApp worker, short
        polls), as sites do; ``False`` starts stock ``flower-supernode``. Per node:
        :meth:`start_supernode`'s ``warm``.
    host : str
        Address the SuperLink binds and every process dials (default 127.0.0.1). Credentials made
        here name it in the SuperLink certificate; given ones must already.
    prefix_for : callable, optional
        The command prefix of each process role, ``"superlink"``, ``"cli"`` (every ``flwr`` call)
        or a SuperNode's name, e.g. ``["ip", "netns", "exec", NAME]`` to run each host in its own
        network namespace (tests/test_network_partition.py); by default everything runs here.
        A SuperNode's Runtime API stays on its own host's loopback.
    """

    def __init__(self, workdir: Path | str, *, certs: Path | str | CertBundle | None = None, sites: int = 3,
                 connection: str = DEFAULT_CONNECTION, env: Mapping[str, str] | None = None,
                 die_with_parent: bool = True, warm: bool = True, database: bool = False, host: str = HOST,
                 prefix_for: Callable[[str], Sequence[str]] | None = None) -> None:
        self.warm = warm
        self.database = database
        self.host = host
        self.prefix_for = prefix_for or (lambda role: ())
        self.workdir = Path(workdir).expanduser().absolute()
        self.workdir.mkdir(parents=True, exist_ok=True)
        if certs is None:
            certs = self.workdir / "certs"
            self.certs = CertBundle.load(certs) if certs.is_dir() and any(certs.iterdir()) \
                else generate_certs(certs, sites=sites, hosts=[host])
        else:
            self.certs = certs if isinstance(certs, CertBundle) else CertBundle.load(certs)
        self.connection = connection
        self.die_with_parent = die_with_parent
        self.superlink: ManagedProcess | None = None
        self.supernodes: dict[str, SuperNode] = {}
        self.node_ids: dict[str, int] = {}
        self.timings: dict[str, float] = {}
        self._reserved_ports: set[int] = set()
        self._seen: dict[int, int | None] = {}  # pid -> start time (clock ticks), for safe kills
        self._closed = False
        self._lock = threading.Lock()
        bin_dir = str(Path(sys.executable).parent)
        self.env = {**os.environ, **FLWR_ENV, **(env or {})}
        self.env["PATH"] = os.pathsep.join([bin_dir, self.env.get("PATH", "")])
        missing = [exe for exe in _EXECUTABLES if shutil.which(exe, path=self.env["PATH"]) is None]
        if missing:
            raise DeploymentError(f"{', '.join(missing)} not found next to {sys.executable} or on PATH; "
                                  "install flwr 1.42 into this environment")
        self.cli_home = self.workdir / "cli"
        self.cli_log = self.cli_home / "flwr.log"
        _OPEN.add(self)

    # -- lifecycle --------------------------------------------------------------------------

    def start(self, supernodes: Mapping[str, Mapping[str, Any] | str | None] | Sequence[str] | int | None = None,
              *, timeout: float = 90.0) -> LocalDeployment:
        """Start the SuperLink, register and start SuperNodes, and wait until all are online.

        ``supernodes`` names the sites to start: a mapping ``{name: node_config}``, a list of
        names, or a count ``n`` (``site-1`` .. ``site-n``); by default every site of the
        credentials. Node configs are passed to ``--node-config`` (see :func:`format_config`).
        """
        deadline = time.monotonic() + timeout
        if supernodes is None:
            supernodes = list(self.certs.sites)
        if isinstance(supernodes, int):
            supernodes = [f"site-{i}" for i in range(1, supernodes + 1)]
        configs = dict(supernodes) if isinstance(supernodes, Mapping) else {n: None for n in supernodes}
        self.start_superlink(timeout=_left(deadline))
        t0 = time.monotonic()
        # Registration is one short `flwr` process per site: run them side by side. The daemons
        # themselves are started from this thread (PR_SET_PDEATHSIG follows the forking thread).
        with ThreadPoolExecutor(max_workers=min(4, max(1, len(configs)))) as pool:
            futures = [pool.submit(self.register_supernode, self.certs.site_public_key(name), name=name,
                                   timeout=_left(deadline)) for name in configs]
            for future in futures:
                future.result()
        for name, node_config in configs.items():
            self.start_supernode(name, node_config=node_config)
        self.wait_supernodes_online(list(configs), timeout=_left(deadline))
        self.timings["supernodes_online_s"] = time.monotonic() - t0
        return self

    def start_superlink(self, *, timeout: float = 60.0) -> ManagedProcess:
        """Start ``flower-superlink`` with TLS and SuperNode auth (:mod:`simulations.superlink`); wait until healthy."""
        if self.superlink is not None:
            raise DeploymentError(f"the SuperLink already runs: {self.superlink.describe()}")
        self._check_open()
        home = self.workdir / "superlink"
        database = home / "state.db" if self.database else None
        started = time.monotonic()
        try:
            popen, config = start_superlink(
                home, env=self.env, timeout=timeout, die_with_parent=self.die_with_parent, taken=self._reserved_ports,
                config_for=lambda port: SuperLinkConfig(port, certs=self.certs, supernode_auth=True, database=database,
                                                        host=self.host, prefix=tuple(self.prefix_for("superlink"))),
                on_spawn=self._record)
        except SuperLinkError as exc:
            raise DeploymentError(str(exc)) from None
        self.superlink = ManagedProcess(name="SuperLink", argv=config.command(), log_path=home / "superlink.log",
                                        home=home, port=config.port, popen=popen, started_at=started)
        self.timings["superlink_healthy_s"] = time.monotonic() - started
        self.cli_home.mkdir(parents=True, exist_ok=True)
        (self.cli_home / "config.toml").write_text(config.cli_config(self.connection), encoding="utf-8")
        return self.superlink

    @property
    def address(self) -> str:
        """``host:port`` of the SuperLink (Fleet, Control and Runtime APIs)."""
        if self.superlink is None:
            raise DeploymentError("the SuperLink has not been started")
        return f"{self.host}:{self.superlink.port}"

    def register_supernode(self, public_key: Path | str, *, name: str, timeout: float = 30.0) -> int:
        """``flwr supernode register KEY.pub CONNECTION --name NAME``; returns the new node id."""
        if not Path(public_key).is_file():
            raise DeploymentError(f"SuperNode {name}: public key {public_key} does not exist")
        out = self.flwr(["supernode", "register", str(public_key), self.connection, "--name", name,
                         "--format", "json"], timeout=timeout)
        data = last_json(out.stdout)
        if not (data and data.get("success") and data.get("node-id")):
            raise DeploymentError(f"could not register SuperNode {name} ({public_key}): "
                                  f"{cli_failure(out, data)}")
        node_id = int(data["node-id"])
        self.node_ids[name] = node_id
        return node_id

    def start_supernode(self, name: str, *, private_key: Path | str | None = None,
                        node_config: Mapping[str, Any] | str | None = None, warm: bool | None = None) -> SuperNode:
        """Start site ``name``'s SuperNode (not waiting for it to come online).

        ``warm`` (default: the deployment's) starts it as a site does, with ``genofed supernode``
        (the vault in ``node_config`` must open; tasks run in a warm worker); otherwise as stock
        ``flower-supernode``. ``private_key`` defaults to the site's key in the credentials
        folder. The node gets its own FLWR_HOME, working directory and Runtime API port.
        """
        if self.superlink is None:
            raise DeploymentError("start the SuperLink before any SuperNode")
        old = self.supernodes.get(name)
        if old is not None and old.alive():
            raise DeploymentError(f"SuperNode {old.describe()} already runs")
        key = Path(private_key) if private_key is not None else self.certs.site_key(name)
        if not key.is_file():
            raise DeploymentError(f"SuperNode {name}: private key {key} does not exist")
        config = format_config(node_config)
        home = self.workdir / "supernodes" / name
        home.mkdir(parents=True, exist_ok=True)
        port = free_port(self._reserved_ports)
        warm = self.warm if warm is None else warm
        argv = [*self.prefix_for(name), *(["genofed", "supernode"] if warm else ["flower-supernode"])]
        argv += ["--superlink", self.address,
                "--root-certificates", str(self.certs.ca_cert),
                "--auth-supernode-private-key", str(key),
                "--host", HOST, "--port", str(port)]
        if config:
            argv += ["--node-config", config]
        proc = self._launch(f"SuperNode {name}", argv, home, home / "supernode.log", port)
        node = SuperNode(name=proc.name, argv=argv, log_path=proc.log_path, home=home, port=port,
                         popen=proc.popen, started_at=proc.started_at, private_key=key, node_config=config,
                         node_id=self.node_ids.get(name))
        self.supernodes[name] = node
        return node

    def new_supernode_key(self, name: str) -> tuple[Path, Path]:
        """A fresh (unregistered) SuperNode key pair in ``workdir/keys``: (private, public)."""
        return write_supernode_key(self.workdir / "keys", name)

    def wait_supernodes_online(self, names: Iterable[str] | None = None, *, timeout: float = 60.0) -> None:
        """Wait until the named SuperNodes (default: all started) are ``online`` at the SuperLink.

        A SuperNode that exits meanwhile fails the wait with its log tail, except one that lost
        the race for its Runtime API port, which is restarted on another port.
        """
        names = list(names) if names is not None else list(self.supernodes)
        deadline = time.monotonic() + timeout
        restarts = 0
        while True:
            for name in names:
                node = self.supernodes.get(name)
                if node is None:
                    raise DeploymentError(f"SuperNode {name} was never started")
                if not node.alive():
                    if PORT_IN_USE.search(node.log_text()) and restarts < 3:
                        restarts += 1
                        self.start_supernode(name, private_key=node.private_key, node_config=node.node_config)
                        continue
                    raise DeploymentError(f"{node.describe()} exited before coming online; "
                                          f"last log lines:\n{node.log_tail()}")
            self._check_superlink()
            self.pids()
            if not all(_ACTIVATED in self.supernodes[n].log_text() for n in names) \
                    and time.monotonic() < deadline:
                time.sleep(0.2)  # not activated yet by their own logs: skip the (slow) CLI call
                continue
            statuses = self.supernode_statuses(timeout=max(5.0, min(30.0, _left(deadline))))
            missing = [n for n in names if statuses.get(self.node_ids.get(n, -1)) != "online"]
            if not missing:
                return
            if time.monotonic() > deadline:
                tails = "\n".join(f"--- {self.supernodes[n].describe()}\n{self.supernodes[n].log_tail(10)}"
                                  for n in missing)
                raise DeploymentError(f"SuperNodes {', '.join(missing)} not online after {timeout:.0f} s "
                                      f"(SuperLink reports {statuses}); last log lines:\n{tails}")
            time.sleep(0.3)

    def supernode_statuses(self, *, timeout: float = 30.0) -> dict[int, str]:
        """``{node_id: status}`` from ``flwr supernode ls --format json`` (online, offline, registered, ...)."""
        out = self.flwr(["supernode", "ls", self.connection, "--format", "json"], timeout=timeout)
        data = last_json(out.stdout)
        if not (data and data.get("success")):
            raise DeploymentError(f"`flwr supernode ls` failed: {cli_failure(out, data)}")
        return {int(n["node-id"]): str(n["status"]) for n in data.get("nodes", [])}

    # -- runs -------------------------------------------------------------------------------

    def submit_run(self, app_dir: Path | str, *, run_config: Mapping[str, Any] | str | Path | None = None,
                   timeout: float = 120.0) -> int:
        """``flwr run APP_DIR CONNECTION --format json [--run-config ...]``; returns the run id.

        ``run_config`` is a mapping (formatted with :func:`format_config`), a ready
        ``'k=v k2="s"'`` string, or a TOML file. The app's ``pyproject.toml`` must not hold
        ``[tool.flwr.federations]`` (``flwr run`` would rewrite it).
        """
        app_dir = Path(app_dir).expanduser().absolute()
        try:
            check_app(app_dir)
        except FlowerAppError as exc:
            raise DeploymentError(str(exc)) from None
        self._check_superlink()
        argv = ["run", str(app_dir), self.connection, "--format", "json"]
        if isinstance(run_config, Path):
            argv += ["--run-config", str(run_config.absolute())]
        elif run_config:
            argv += ["--run-config", format_config(run_config)]
        out = self.flwr(argv, timeout=timeout, cwd=app_dir)
        data = last_json(out.stdout)
        if not (data and data.get("success") and data.get("run-id")):
            raise DeploymentError(f"`flwr run {app_dir}` failed: {cli_failure(out, data)}")
        return int(data["run-id"])

    def run_status(self, run_id: int, *, timeout: float = 30.0) -> RunStatus:
        """The run's status from ``flwr ls CONNECTION --run-id N --format json``."""
        out = self.flwr(["ls", self.connection, "--run-id", str(run_id), "--format", "json"], timeout=timeout)
        data = last_json(out.stdout)
        runs = (data or {}).get("runs") or []
        if not (data and data.get("success") and runs):
            raise DeploymentError(f"`flwr ls --run-id {run_id}` failed: {cli_failure(out, data)}")
        run = runs[0]
        details = str(run.get("status-details") or "")
        return RunStatus(run_id=run_id, status=str(run.get("status", "")),
                         details="" if details == "N/A" else details, raw=run)

    def wait_run(self, run_id: int, *, timeout: float = 300.0, poll: float = 0.5) -> RunStatus:
        """Poll until the run is ``finished:*`` (completed, failed or stopped); returns that status.

        Raises :class:`DeploymentError` with the ServerApp log tail when ``timeout`` passes, or
        at once with the SuperLink's log tail if the SuperLink exits.
        """
        deadline = time.monotonic() + timeout
        status = None
        while True:
            self._check_superlink()
            self.pids()  # record descendants (ServerApp, ClientApps) for teardown
            status = self.run_status(run_id, timeout=max(5.0, min(30.0, _left(deadline) + 5.0)))
            if status.finished:
                return status
            if time.monotonic() > deadline:
                try:
                    where, log = "ServerApp log", self.run_log(run_id, timeout=20.0)
                except DeploymentError as exc:
                    where, log = f"SuperLink log ({exc})", self.superlink.log_text() if self.superlink else ""
                raise DeploymentError(f"run {run_id} still {status.status!r} after {timeout:.0f} s; "
                                      f"last {where} lines:\n{tail(log, _LOG_TAIL_LINES)}")
            time.sleep(poll)

    def run_log(self, run_id: int, *, timeout: float = 30.0) -> str:
        """The ServerApp's log of a run (``flwr log RUN_ID CONNECTION --show``)."""
        out = self.flwr(["log", str(run_id), self.connection, "--show"], timeout=timeout)
        if out.returncode != 0:
            raise DeploymentError(f"`flwr log {run_id}` failed: {cli_failure(out, None)}")
        return out.stdout

    def run(self, app_dir: Path | str, *, run_config: Mapping[str, Any] | str | Path | None = None,
            timeout: float = 300.0) -> RunResult:
        """Submit a run, wait for it to finish, and fetch its ServerApp log (any final status)."""
        t0 = time.monotonic()
        run_id = self.submit_run(app_dir, run_config=run_config, timeout=min(timeout, 120.0))
        self.timings["submit_s"] = time.monotonic() - t0
        status = self.wait_run(run_id, timeout=max(1.0, timeout - (time.monotonic() - t0)))
        seconds = time.monotonic() - t0
        self.timings["run_s"] = seconds
        return RunResult(run_id=run_id, status=status, log=self.run_log(run_id), seconds=seconds)

    def stop_run(self, run_id: int, *, timeout: float = 30.0) -> None:
        """``flwr stop RUN_ID CONNECTION``."""
        out = self.flwr(["stop", str(run_id), self.connection], timeout=timeout)
        if out.returncode != 0:
            raise DeploymentError(f"`flwr stop {run_id}` failed: {cli_failure(out, None)}")

    # -- faults and teardown ----------------------------------------------------------------

    def kill_supernode(self, name: str, sig: int = signal.SIGKILL, *, timeout: float = 10.0) -> int:
        """Send ``sig`` (default SIGKILL, a crash) to SuperNode ``name`` and its processes; returns its exit code.

        The SuperLink notices a killed node only when its heartbeats stop (about a minute in
        1.42); a SIGTERM lets the node leave gracefully.
        """
        node = self.supernodes.get(name)
        if node is None:
            raise DeploymentError(f"no SuperNode named {name!r} (started: {', '.join(self.supernodes) or 'none'})")
        self._terminate([node], sig, grace=timeout)
        return node.popen.wait(timeout=1.0)

    def log_tails(self, lines: int = 40) -> str:
        """The last ``lines`` non-blank lines of the SuperLink's and every SuperNode's log, for a
        failed run's message: a site's warm worker logs each task it ran, and what raised."""
        parts = []
        for proc in self._processes():
            text = [ln for ln in proc.log_text().splitlines() if ln.strip() and ln.strip() not in _BLANK_LOG_LINES]
            parts.append(f"--- {proc.describe()}\n" + "\n".join(text[-lines:]))
        return "\n".join(parts)

    def pids(self) -> set[int]:
        """Process ids of every live process the deployment runs (daemons and their descendants).

        Each call also records them, so that teardown finds descendants whose parent died first.
        """
        procs = self._processes()
        found = {p.pid for p in procs if p.alive()}
        for proc in procs:
            found |= descendants(proc.pid)
        for pid in found:
            if pid not in self._seen:
                self._seen[pid] = start_time(pid)
        return {pid for pid in found if alive(pid)}

    def close(self, *, grace: float = 5.0) -> None:
        """Stop every process (SuperNodes first), SIGKILL whatever outlives ``grace`` seconds. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        t0 = time.monotonic()
        try:
            nodes = list(self.supernodes.values())
            self._terminate(nodes, signal.SIGTERM, grace=grace)
            if self.superlink is not None:
                self._terminate([self.superlink], signal.SIGTERM, grace=grace)
            # Anything recorded earlier that is still around (e.g. re-parented grandchildren).
            leftovers = [pid for pid in self._seen if self._same_process(pid)]
            signal_pids(leftovers, signal.SIGKILL)
            wait_gone(leftovers, 2.0)
            # Last sweep: a process born while its parent was being stopped was never recorded,
            # but it carries one of our FLWR_HOMEs in its environment (Linux).
            marker = f"FLWR_HOME={self.workdir}{os.sep}".encode()
            for _ in range(3):
                strays = pids_with_environ(marker)
                if not strays:
                    break
                signal_pids(strays, signal.SIGKILL)
                wait_gone(strays, 2.0)
        finally:
            self.timings["teardown_s"] = time.monotonic() - t0
            _OPEN.discard(self)

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- CLI --------------------------------------------------------------------------------

    def flwr_env(self) -> dict[str, str]:
        """Environment for running ``flwr`` against this deployment (its FLWR_HOME, PATH, flags)."""
        return {**self.env, "FLWR_HOME": str(self.cli_home)}

    def flwr(self, args: Sequence[str], *, timeout: float = 60.0, cwd: Path | None = None,
             ) -> subprocess.CompletedProcess[str]:
        """Run ``flwr ARGS`` with the deployment's CLI home; output is returned and appended to ``cli/flwr.log``."""
        argv = [*self.prefix_for("cli"), "flwr", *args]
        self.cli_home.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        try:
            out = subprocess.run(argv, env=self.flwr_env(), cwd=cwd or self.cli_home, capture_output=True,
                                 text=True, timeout=timeout, stdin=subprocess.DEVNULL, start_new_session=True)
        except subprocess.TimeoutExpired as exc:
            raise DeploymentError(f"`{' '.join(argv)}` did not return within {timeout:.0f} s; output:\n"
                                  f"{tail(_text(exc.stdout) + _text(exc.stderr), 20)}") from None
        with self.cli_log.open("a", encoding="utf-8") as log:
            log.write(f"$ {' '.join(argv)}  # rc={out.returncode} {time.monotonic() - t0:.2f}s\n"
                      f"{out.stdout}{out.stderr}\n")
        return out

    # -- internals --------------------------------------------------------------------------

    def _launch(self, name: str, argv: list[str], home: Path, log_path: Path, port: int) -> ManagedProcess:
        self._check_open()
        popen = spawn(argv, home=home, env={**self.env, "FLWR_HOME": str(home)}, log_path=log_path,
                      die_with_parent=self.die_with_parent)
        self._record(popen)
        return ManagedProcess(name=name, argv=argv, log_path=log_path, home=home, port=port, popen=popen)

    def _check_open(self) -> None:
        if self._closed:
            raise DeploymentError("this deployment has been closed")

    def _record(self, popen: subprocess.Popen) -> None:
        self._seen[popen.pid] = start_time(popen.pid)

    def _check_superlink(self) -> None:
        if self.superlink is None:
            raise DeploymentError("the SuperLink has not been started")
        if not self.superlink.alive():
            raise DeploymentError(f"{self.superlink.describe()} is gone; last log lines:\n"
                                  f"{self.superlink.log_tail()}")

    def _processes(self) -> list[ManagedProcess]:
        procs: list[ManagedProcess] = list(self.supernodes.values())
        return procs + ([self.superlink] if self.superlink is not None else [])

    def _same_process(self, pid: int) -> bool:
        """Whether ``pid`` is alive and still the process recorded under it (not a reused pid)."""
        return alive(pid) and start_time(pid) == self._seen.get(pid)

    def _terminate(self, procs: Sequence[ManagedProcess], sig: int, *, grace: float) -> None:
        """Signal each daemon's process group and every recorded descendant; SIGKILL what outlives grace."""
        pids: set[int] = set()
        for proc in procs:
            for pid in descendants(proc.pid):
                self._seen.setdefault(pid, start_time(pid))
                pids.add(pid)
        for proc in procs:
            if proc.alive():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, sig)  # its own session: pgid == pid
        signal_pids([p for p in pids if self._same_process(p)], sig)
        deadline = time.monotonic() + grace
        for proc in procs:
            try:
                proc.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.popen.wait(timeout=5.0)
        rest = [p for p in pids if self._same_process(p)]
        wait_gone(rest, max(0.0, deadline - time.monotonic()))
        rest = [p for p in rest if self._same_process(p)]
        signal_pids(rest, signal.SIGKILL)
        wait_gone(rest, 2.0)


# ---------------------------------------------------------------------------------------------
# Small helpers


_OPEN: weakref.WeakSet[LocalDeployment] = weakref.WeakSet()


@atexit.register
def _close_open_deployments() -> None:
    for deployment in list(_OPEN):
        with contextlib.suppress(Exception):
            deployment.close(grace=2.0)


def _left(deadline: float) -> float:
    return max(0.5, deadline - time.monotonic())


def _text(value: str | bytes | None) -> str:
    if value is None:
        return ""
    return value.decode(errors="replace") if isinstance(value, bytes) else value


# ---------------------------------------------------------------------------------------------
# Command line


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m simulations.deployment",
        description="Start a local Flower federation with TLS and SuperNode authentication on 127.0.0.1 "
                    "(SuperLink + N SuperNodes), optionally submit one run, and tear it all down.")
    parser.add_argument("workdir", type=Path, help="folder for credentials, state and logs")
    parser.add_argument("--sites", type=int, default=3, help="number of SuperNodes (default 3)")
    parser.add_argument("--certs", type=Path, help="existing `genofed certs` folder (default: make one)")
    parser.add_argument("--node-config", nargs=2, action="append", default=[], metavar=("SITE", "CONFIG"),
                        help="--node-config for one site, e.g. site-1 'vault=\"/abs/v1\"' (repeatable)")
    parser.add_argument("--app", type=Path, help="Flower app folder to run once (default: just serve)")
    parser.add_argument("--run-config", help="--run-config for the run, e.g. 'cnn-rounds=2'")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the run")
    parser.add_argument("--plain", action="store_true",
                        help="start stock flower-supernode (default: genofed supernode, which needs each site's "
                             "vault in its --node-config)")
    parser.add_argument("--database", action="store_true", help="keep the SuperLink's state in SQLite, not memory")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m simulations.deployment``."""
    args = _parse_args(argv)
    configs = {name: cfg for name, cfg in args.node_config}
    sites = {f"site-{i}": configs.pop(f"site-{i}", None) for i in range(1, args.sites + 1)}
    if configs:
        print(f"error: --node-config for unknown sites: {', '.join(configs)}", file=sys.stderr)
        return 2
    try:
        with LocalDeployment(args.workdir, certs=args.certs, sites=args.sites, warm=not args.plain,
                             database=args.database) as dep:
            dep.start(sites)
            print(f"SuperLink at {dep.address} (TLS, SuperNode auth); {len(sites)} SuperNodes online; "
                  f"logs under {dep.workdir}", flush=True)
            if args.app is None:
                print(f"use it with:\n  export FLWR_HOME={dep.cli_home} PATH={Path(sys.executable).parent}:$PATH\n"
                      f"  flwr run APP_DIR {dep.connection}\n  flwr ls {dep.connection}\n"
                      f"  flwr log RUN_ID {dep.connection} --show\nCtrl-C stops everything.", flush=True)
                with contextlib.suppress(KeyboardInterrupt):
                    while dep.superlink is not None and dep.superlink.alive():
                        time.sleep(1.0)
                return 0
            result = dep.run(args.app, run_config=args.run_config, timeout=args.timeout)
            print(result.log)
            print(f"run {result.run_id}: {result.status.status} {result.status.details} "
                  f"({result.seconds:.1f} s)")
            return 0 if result.status.completed else 1
    except GenofedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
