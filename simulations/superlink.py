"""One way to start a SuperLink on this machine, for ``genofed simulate`` and the deployment harness.

``genofed simulate`` runs it in simulation mode without TLS (everything stays on 127.0.0.1 inside
one run folder); the harness (:mod:`simulations.deployment`) runs it with TLS and SuperNode
authentication, as a coordinator would. Both get the same launch: a free port chosen by the OS
(a start that loses a port race is retried on a new one), the SuperLink's own ``FLWR_HOME`` and
log file, its own session (so its process group can be signalled), no runtime dependency
installation, and a wait until ``/health`` answers, or one error naming the log and its last lines.
With TLS, nothing starts if a credential file is missing, the SuperLink's private key is readable
by other users (:mod:`common.keyfiles`: one line with the ``chmod 600`` fix) or its certificate
is expired or not yet valid (SuperNodes would refuse it).
"""

from __future__ import annotations

import re
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from common.errors import GenofedError
from common.keyfiles import check_private_file
from common.processes import PREEXEC
from server.certs import CertBundle, check_certificate_dates
from simulations.flower_cli import tail, toml_str

HOST = "127.0.0.1"
PORT_TRIES = 3
PORT_IN_USE = re.compile(r"address already in use|errno 98|only one usage of each socket", re.IGNORECASE)


class SuperLinkError(GenofedError):
    """The SuperLink did not start or did not become healthy: ``summary`` is one line, the message adds its log's tail."""

    def __init__(self, summary: str, log_path: Path) -> None:
        self.summary = f"{summary}; see {log_path}"
        super().__init__(f"{self.summary}; last lines:\n{_log_tail(log_path)}")


@dataclass(frozen=True)
class SuperLinkConfig:
    """How to run the SuperLink: mode, TLS credentials, SuperNode authentication, where its state lives."""

    port: int
    simulation: bool = False
    certs: CertBundle | None = None
    """TLS with these credentials; ``None``: ``--insecure`` (simulation on loopback only)."""
    supernode_auth: bool = False
    database: Path | None = None
    """SQLite file for the SuperLink's state; ``None`` keeps it in memory."""
    host: str = HOST
    """Address it binds and everyone dials (with TLS it must be one of the certificate's SANs)."""
    prefix: tuple[str, ...] = ()
    """Command prefix that runs it elsewhere, e.g. ``("ip", "netns", "exec", NAME)``; the health
    check then runs through the same prefix (its address may be unreachable from here)."""

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def command(self) -> list[str]:
        """The process to start: :attr:`prefix` then :meth:`argv`."""
        return [*self.prefix, *self.argv()]

    def argv(self) -> list[str]:
        """The ``flower-superlink`` command line."""
        argv = ["flower-superlink"]
        if self.certs is None:
            argv.append("--insecure")
        else:
            argv += ["--ssl-ca-certfile", str(self.certs.ca_cert), "--ssl-certfile", str(self.certs.server_cert),
                     "--ssl-keyfile", str(self.certs.server_key)]
        if self.simulation:
            argv.append("--simulation")
        if self.supernode_auth:
            argv.append("--enable-supernode-auth")
        if self.database is not None:
            argv += ["--database", str(self.database)]
        return argv + ["--disable-runtime-dependency-installation", "--host", self.host, "--port", str(self.port)]

    def cli_config(self, connection: str) -> str:
        """``config.toml`` for a ``flwr`` CLI home whose one (default) connection is this SuperLink."""
        trust = "insecure = true" if self.certs is None else f"root-certificates = {toml_str(str(self.certs.ca_cert))}"
        return (f'[superlink]\ndefault = "{connection}"\n\n'
                f'[superlink.{connection}]\naddress = "{self.address}"\n{trust}\n')


def free_port(taken: set[int] | None = None) -> int:
    """A TCP port on 127.0.0.1 that the OS calls free and that is not in ``taken`` (which it joins)."""
    taken = set() if taken is None else taken
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((HOST, 0))
            port = int(sock.getsockname()[1])
        if port not in taken:
            taken.add(port)
            return port
    raise GenofedError(f"no free TCP port found on {HOST}")


def spawn(argv: list[str], *, home: Path, env: Mapping[str, str], log_path: Path,
          die_with_parent: bool = False) -> subprocess.Popen:
    """Start a daemon in its own session, cwd ``home``, output appended to ``log_path`` after its command line."""
    with log_path.open("ab") as log:
        log.write(f"# {' '.join(argv)}\n".encode())
        log.flush()
        return subprocess.Popen(argv, cwd=home, env=dict(env), stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=PREEXEC if die_with_parent else None)


def start_superlink(home: Path, *, env: Mapping[str, str], config_for: Callable[[int], SuperLinkConfig],
                    timeout: float = 60.0, die_with_parent: bool = False, taken: set[int] | None = None,
                    on_spawn: Callable[[subprocess.Popen], None] | None = None,
                    ) -> tuple[subprocess.Popen, SuperLinkConfig]:
    """Start ``flower-superlink`` (``config_for(port)``, ``FLWR_HOME=home``) and wait until it is healthy.

    A start that loses a port race is retried on another free port (up to ``PORT_TRIES``).
    ``on_spawn`` sees every process started (for a caller that tracks pids to kill). Returns the
    running process and its configuration; raises :class:`SuperLinkError` with the log's last lines,
    and, before anything starts, :class:`common.keyfiles.KeyFilePermissionError` for a TLS key other
    users can read or :class:`server.certs.CertsError` for an expired certificate (one line each).
    """
    home.mkdir(parents=True, exist_ok=True)
    log_path = home / "superlink.log"
    certs = config_for(0).certs
    missing = [] if certs is None else [p for p in (certs.ca_cert, certs.server_cert, certs.server_key)
                                         if not p.is_file()]
    if missing:
        raise SuperLinkError(f"TLS file(s) missing: {', '.join(map(str, missing))}; make them with "
                             "`genofed certs`", log_path)
    if certs is not None:
        check_private_file(certs.server_key, "SuperLink TLS private key")
        check_certificate_dates(certs.server_cert)
    deadline = time.monotonic() + timeout
    for attempt in range(PORT_TRIES):
        config = config_for(free_port(taken))
        proc = spawn(config.command(), home=home, env={**env, "FLWR_HOME": str(home)}, log_path=log_path,
                     die_with_parent=die_with_parent)
        if on_spawn is not None:
            on_spawn(proc)
        try:
            wait_healthy(proc, config, log_path=log_path, deadline=deadline)
            return proc, config
        except SuperLinkError:
            lost_race = proc.poll() is not None and PORT_IN_USE.search(log_path.read_text(errors="replace"))
            if not lost_race or attempt == PORT_TRIES - 1:
                stop(proc)
                raise
    raise AssertionError("unreachable")


def wait_healthy(proc: subprocess.Popen, config: SuperLinkConfig, *, log_path: Path, deadline: float) -> None:
    """Return once the SuperLink's ``/health`` answers 200; raise if it exits or ``deadline`` passes."""
    scheme = "http" if config.certs is None else "https"
    url = f"{scheme}://{config.address}/health"
    cafile = None if config.certs is None else str(config.certs.ca_cert)
    last = ""
    while True:
        if proc.poll() is not None:
            raise SuperLinkError(f"SuperLink (pid {proc.pid}) exited with code {proc.returncode} before becoming "
                                 "healthy", log_path)
        last = _probe_through(config.prefix, url, cafile) if config.prefix else probe_health(url, cafile)
        if not last:
            return
        if time.monotonic() > deadline:
            raise SuperLinkError(f"SuperLink (pid {proc.pid}) not healthy at {url} in time (last: {last})", log_path)
        time.sleep(0.2)


def probe_health(url: str, cafile: str | None) -> str:
    """``""`` if ``url`` answers HTTP 200 (TLS verified against ``cafile``), else what went wrong."""
    context = None if cafile is None else ssl.create_default_context(cafile=cafile)
    try:
        with urllib.request.urlopen(url, context=context, timeout=2.0) as response:
            return "" if response.status == 200 else f"HTTP {response.status}"
    except (urllib.error.URLError, OSError) as exc:
        return str(getattr(exc, "reason", exc)) or type(exc).__name__


_PROBE = ("import sys; from simulations.superlink import probe_health; "
          "r = probe_health(sys.argv[1], sys.argv[2] or None); print(r); sys.exit(1 if r else 0)")


def _probe_through(prefix: Sequence[str], url: str, cafile: str | None) -> str:
    """:func:`probe_health` run through ``prefix`` (where the SuperLink runs), in a short Python process."""
    root = str(Path(__file__).resolve().parents[1])
    try:
        out = subprocess.run([*prefix, sys.executable, "-c", _PROBE, url, cafile or ""], capture_output=True,
                             text=True, timeout=10.0, cwd=root, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return "health probe timed out"
    return "" if out.returncode == 0 else (out.stdout + out.stderr).strip()[-300:] or f"exit {out.returncode}"


def stop(proc: subprocess.Popen, *, grace: float = 15.0) -> None:
    """SIGTERM the process's group (its own session), SIGKILL after ``grace`` seconds."""
    import os
    import signal

    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        proc.wait()


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        return tail(path.read_text(errors="replace"), lines)
    except OSError:
        return "(no log)"
