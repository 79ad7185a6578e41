"""The warm ClientApp worker behind ``genofed supernode``: a long-lived process per SuperNode.

Stock Flower 1.42 starts a fresh ``flwr-clientapp`` process for every message (Python, torch and
the app imported again each time). ``genofed supernode`` runs the SuperNode with
``--isolation process`` and, in place of ``flower-superexec``, this worker:

- the **dispatcher** (``python -m client.warm_node``, started by ``genofed supernode``) acquires
  each ClientApp task from its own SuperNode's Runtime API on loopback and hands the task's token
  to the worker of that task's run;
- a **run worker** serves every task of one run (one FAB) in one process. Workers are forked from
  a server process that imported the heavy libraries once (torch, opacus, scikit-learn, Flower);
  a worker forgets any genofed module it inherited, so the run's ClientApp is loaded from the
  run's own FAB, as ``flwr-clientapp`` loads it. A new run gets a new worker: no run sees another
  run's module state. One spare worker waits ready, so a new run does not wait for a fork;
- a handler that raises gives an error reply (:func:`common.flower_internals.run_task`) and the
  worker goes on; a worker idle for :data:`IDLE_EXIT_S`, or whose run is superseded by a newer
  one, exits after its current task.

Flower's internal modules are used only through :mod:`common.flower_internals`.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import multiprocessing
import multiprocessing.connection
import os
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.flower_internals import (PRELOAD, RuntimeLink, TaskSource, check_flower_internals,
                                     load_superexec_auth_secret, quiet_logs, run_task, shorten_polls)
from common.processes import die_with_parent

log = logging.getLogger("genofed.warm_node")

DEFAULT_POLL_S = 0.1
"""Seconds between polls (SuperNode <-> SuperLink, worker <-> SuperNode); Flower's own: 0.5-3 s."""
IDLE_EXIT_S = 900.0
"""A run worker without a task for this long exits (its memory returned); a later task of the
same run starts a fresh one."""
LIBRARIES = ("numpy", "scipy.stats", "pandas", "sklearn.ensemble", "sklearn.linear_model", "torch", "opacus",
             "cryptography.hazmat.primitives.ciphers.aead")
"""Third-party libraries the fork server imports once. Never genofed's own modules: those come
from the run's FAB."""
_GENOFED_PACKAGES = ("client", "common", "server", "simulations")
_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@dataclass
class _Worker:
    process: Any
    conn: multiprocessing.connection.Connection
    last_used: float = field(default_factory=time.monotonic)


class Dispatcher:
    """Acquires ClientApp tasks from one SuperNode and runs each in its run's warm worker."""

    def __init__(self, link: RuntimeLink, *, poll_s: float = DEFAULT_POLL_S, idle_exit_s: float = IDLE_EXIT_S) -> None:
        self.link = link
        self.poll_s = poll_s
        self.idle_exit_s = idle_exit_s
        self.workers: dict[tuple[int, str], _Worker] = {}
        self._ctx = multiprocessing.get_context("forkserver")
        self._ctx.set_forkserver_preload([m for m in (*LIBRARIES, *PRELOAD)
                                          if importlib.util.find_spec(m.split(".")[0]) is not None])
        self._spare: _Worker | None = None

    def serve(self, stop: threading.Event) -> None:
        """Dispatch until ``stop`` is set; then ask every worker to finish its task and exit."""
        source = TaskSource(self.link)
        self._spare = self._start_worker()  # also starts the fork server, which imports the libraries
        try:
            while not stop.is_set():
                self._retire_idle()
                task = source.acquire()
                if task is None:
                    stop.wait(self.poll_s)
                    continue
                worker = self._worker_for((task.run_id, task.fab_hash))
                worker.conn.send(task.token)
                worker.last_used = time.monotonic()
        finally:
            for worker in [*self.workers.values(), *([self._spare] if self._spare else [])]:
                _stop(worker)
            source.close()

    def _worker_for(self, key: tuple[int, str]) -> _Worker:
        worker = self.workers.get(key)
        if worker is not None and worker.process.is_alive():
            return worker
        for other in [k for k in self.workers if k[0] != key[0]]:
            _stop(self.workers.pop(other))  # a newer run supersedes: its worker finishes and exits
        spare, self._spare = self._spare, None
        worker = spare if spare is not None and spare.process.is_alive() else self._start_worker()
        self.workers[key] = worker
        self._spare = self._start_worker()
        return worker

    def _start_worker(self) -> _Worker:
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(target=serve_run, args=(child, self.link, self.poll_s), daemon=True)
        proc.start()
        child.close()
        return _Worker(process=proc, conn=parent)

    def _retire_idle(self) -> None:
        now = time.monotonic()
        for key in [k for k, w in self.workers.items()
                    if not w.process.is_alive() or now - w.last_used > self.idle_exit_s]:
            _stop(self.workers.pop(key))


def _stop(worker: _Worker) -> None:
    """Ask a worker to exit after its current task: a sentinel behind any tokens it has not read."""
    try:
        worker.conn.send(None)
    except OSError:
        pass
    worker.conn.close()


def serve_run(conn: multiprocessing.connection.Connection, link: RuntimeLink, poll_s: float) -> None:
    """A run worker: run each task whose token arrives on ``conn``, until the sentinel ``None``."""
    die_with_parent()  # the fork server, which exits with the dispatcher
    _forget_genofed_modules()
    logging.basicConfig(level=logging.WARNING, format=_LOG_FORMAT)
    logging.getLogger("genofed.flower").setLevel(logging.INFO)
    quiet_logs()
    shorten_polls(poll_s)
    flw = check_flower_internals()
    apps: dict[str, Any] = {}
    while True:
        try:
            token = conn.recv()
        except EOFError:
            return
        if token is None:
            return
        try:
            run_task(flw, link, token, apps)
        except Exception:  # noqa: BLE001 - a worker that died here would take the next task's token with it
            log.exception("a ClientApp task failed outside its handler; the worker goes on")


def _forget_genofed_modules() -> None:
    """Drop the genofed modules a worker inherits, so that the run's FAB provides its own."""
    for name in [m for m in sys.modules if m.split(".")[0] in _GENOFED_PACKAGES]:
        del sys.modules[name]


def worker_command(address: str, *, poll_s: float, parent_pid: int, root_certificates: str | None = None,
                   superexec_auth_secret_file: str | None = None) -> list[str]:
    """The dispatcher's command line, for a SuperNode whose Runtime API is at ``address``."""
    argv = [sys.executable, "-m", "client.warm_node", "--runtime-api-address", address,
            "--poll-interval", str(poll_s), "--parent-pid", str(parent_pid)]
    if root_certificates:
        argv += ["--root-certificates", root_certificates]
    if superexec_auth_secret_file:
        argv += ["--superexec-auth-secret-file", superexec_auth_secret_file]
    return argv


def main(argv: Sequence[str] | None = None) -> int:
    """The dispatcher process (started by ``genofed supernode``, not a user command)."""
    parser = argparse.ArgumentParser(prog="python -m client.warm_node",
                                     description="genofed's warm ClientApp worker for one SuperNode")
    parser.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API, host:port")
    parser.add_argument("--poll-interval", type=float, default=DEFAULT_POLL_S, metavar="S")
    parser.add_argument("--parent-pid", type=int, help="stop when this process (the SuperNode) is gone")
    parser.add_argument("--root-certificates", metavar="PATH", help="CA of the Runtime API's TLS certificate")
    parser.add_argument("--superexec-auth-secret-file", metavar="PATH")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format=_LOG_FORMAT)
    quiet_logs()
    link = RuntimeLink(address=args.runtime_api_address,
                       root_certificates=Path(args.root_certificates).read_bytes() if args.root_certificates else None,
                       superexec_auth_secret=load_superexec_auth_secret(args.superexec_auth_secret_file)
                       if args.superexec_auth_secret_file else None)
    stop = threading.Event()
    if args.parent_pid is not None:
        threading.Thread(target=_watch_parent, args=(args.parent_pid, stop), daemon=True).start()
    Dispatcher(link, poll_s=args.poll_interval).serve(stop)
    return 0


def _watch_parent(pid: int, stop: threading.Event) -> None:
    """Stop dispatching once the SuperNode process is gone."""
    while not stop.is_set():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            stop.set()
            return
        time.sleep(0.5)


if __name__ == "__main__":
    # Run the importable copy, so that workers unpickle client.warm_node.serve_run, not __main__'s.
    from client import warm_node

    sys.exit(warm_node.main())
