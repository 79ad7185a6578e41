"""The app runs when driven directly with Flower's own CLI, as the README says users can.

From the repository root, with nothing of genofed's own driver in between::

    flwr run . --run-config 'sites-dir="/abs/sites" run-dir="/abs/run" ...' \
        --federation-config "num-supernodes=3 client-resources-num-cpus=1" --stream

on a three-site vault layout written by ``cohort split --vaults``. The ``flwr`` CLI, given an
empty ``FLWR_HOME``, writes its default ``config.toml`` (connection ``local`` at ``:local:``),
starts Flower's managed local SuperLink in simulation mode on 127.0.0.1:39091 (Control API
address 39093) and streams the run's logs until it ends. The test checks the run directory the
ServerApp wrote (``metrics.json`` with a finite pooled hybrid AUC, the three sites, a privacy
entry per site, one exchange per round of every phase; ``run.log``).

Notes
-----
The managed SuperLink outlives ``flwr run`` (docs: ../shared/notes/flower-1.42.md, pitfall 6).
The fixture stops every process that carries this test's temporary ``FLWR_HOME`` in its
environment or command line (the SuperLink, its SuperExec and whatever they started), then
asserts that none is left and that port 39091 is free again. The ports are fixed by Flower, so
the test refuses to start, with a clear message, when either is already taken: another local
SuperLink there would silently receive this run.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from client.site import site_dirs
from simulations.site_layout import split_cohort
from simulations.synthetic import write_synthetic_cohort

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

APP_DIR = Path(__file__).resolve().parents[1]
BIN_DIR = Path(sys.executable).parent
LOCAL_PORTS = (39091, 39093)  # Flower 1.42's managed SuperLink: HTTP API, Control API
ROUNDS = 1
EPSILON = 4.0
FLWR_RUN_TIMEOUT = 300.0
QUIET_ENV = {"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_DISABLE_UPDATE_CHECK": "1",
             "FLWR_TELEMETRY_ENABLED": "0", "GENOFED_NO_PROGRESS": "1", "RAY_USAGE_STATS_ENABLED": "0"}


def _port_in_use(port: int) -> bool:
    """Whether something listens on 127.0.0.1:``port``.

    Parameters
    ----------
    port : int
        The TCP port.

    Returns
    -------
    bool
        True if binding it fails. ``SO_REUSEADDR`` lets sockets in TIME_WAIT from an earlier
        run pass, while a listener (also on 0.0.0.0) still makes the bind fail.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def _started_under(home: Path) -> dict[int, str]:
    """Live processes started for ``home``: ``FLWR_HOME=home`` in their environment, or ``home`` in their command line.

    Parameters
    ----------
    home : Path
        The test's temporary ``FLWR_HOME``.

    Returns
    -------
    dict[int, str]
        pid -> command line, from a scan of ``/proc`` (zombies and other users' processes,
        whose environment cannot be read, are left out).
    """
    marker_env = b"FLWR_HOME=" + os.fsencode(home)
    marker_cmd = os.fsencode(home)
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            stat = (entry / "stat").read_bytes()
            if stat[stat.rindex(b")") + 2:][:1] in (b"Z", b"X"):
                continue
            cmdline = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes()
        except (OSError, ValueError):
            continue
        if marker_env in environ.split(b"\0") or marker_cmd in cmdline:
            found[int(entry.name)] = cmdline.replace(b"\0", b" ").decode(errors="replace").strip()
    return found


def _signal_all(pids: dict[int, str], sig: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _wait_gone(home: Path, timeout: float) -> dict[int, str]:
    deadline = time.monotonic() + timeout
    left = _started_under(home)
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = _started_under(home)
    return left


def _stop_everything_under(home: Path) -> dict[int, str]:
    """Stop what was started for ``home`` (SIGTERM, then SIGKILL after 20 s); returns what was running."""
    before = _started_under(home)
    # The SuperLinks first: their SuperExec watches --parent-pid and exits with them.
    _signal_all({p: c for p, c in before.items() if "flower-superlink" in c}, signal.SIGTERM)
    left = _wait_gone(home, timeout=10.0)
    _signal_all(left, signal.SIGTERM)
    left = _wait_gone(home, timeout=10.0)
    _signal_all(left, signal.SIGKILL)
    _wait_gone(home, timeout=5.0)
    return before


@pytest.fixture
def flwr_home(tmp_path: Path) -> Iterator[Path]:
    """A fresh ``FLWR_HOME`` (not yet created: the CLI makes it); afterwards nothing it started runs on.

    Yields
    ------
    Path
        The temporary ``FLWR_HOME``.
    """
    busy = [p for p in LOCAL_PORTS if _port_in_use(p)]
    if busy:
        pytest.fail(f"127.0.0.1 port(s) {busy} already in use: Flower's managed local SuperLink (`:local:`) needs "
                    f"{LOCAL_PORTS[0]}/{LOCAL_PORTS[1]}, and `flwr run` would hand this run to whatever SuperLink "
                    "listens there. Stop it (e.g. a SuperLink left by an earlier `flwr run`) and rerun.",
                    pytrace=False)
    home = tmp_path / "flwr-home"
    try:
        yield home
    finally:
        before = _stop_everything_under(home)
        left = _started_under(home)
        assert not left, f"processes started by the test still run after SIGKILL: {left}"
        assert not _port_in_use(LOCAL_PORTS[0]), (
            f"port {LOCAL_PORTS[0]} still taken after stopping {sorted(before)}: the managed SuperLink was not found")


@pytest.fixture
def three_sites(tmp_path: Path) -> Path:
    """A small synthetic cohort split iid over three sites, each imported into its own vault.

    Returns
    -------
    Path
        The layout folder (``site-1`` .. ``site-3``, each with ``vault/`` and ``key``).
    """
    write_synthetic_cohort(out=tmp_path / "cohort", patients=240, seed=11)
    split_cohort(spec_path=tmp_path / "cohort" / "spec.toml", sites=3, by="iid", out=tmp_path / "sites", seed=0,
                 vaults=True, show_progress=False)
    return tmp_path / "sites"


def test_flwr_run_from_the_repository_root_completes(flwr_home: Path, three_sites: Path, tmp_path: Path) -> None:
    """``flwr run . --stream`` with the README's flags trains, evaluates and writes the run directory."""
    sites = [p.name for p in site_dirs(three_sites)]
    assert len(sites) == 3
    run_dir = (tmp_path / "run").resolve()
    run_config = (f'sites-dir="{three_sites.resolve()}" run-dir="{run_dir}" cnn-rounds={ROUNDS} local-epochs=1 glm-rounds=2 dp=true '
                  f"epsilon={EPSILON} forest-trees=10")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLWR_")}  # e.g. no inherited port overrides
    env.update(QUIET_ENV, FLWR_HOME=str(flwr_home))
    env["PATH"] = str(BIN_DIR) + os.pathsep + env.get("PATH", "")  # the CLI starts flower-superlink by bare name
    cmd = [str(BIN_DIR / "flwr"), "run", ".", "--run-config", run_config,
           "--federation-config", f"num-supernodes={len(sites)} client-resources-num-cpus=1", "--stream"]

    started = time.monotonic()
    try:
        done = subprocess.run(cmd, cwd=APP_DIR, env=env, capture_output=True, text=True, check=False,
                              timeout=FLWR_RUN_TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"`flwr run` did not finish within {FLWR_RUN_TIMEOUT:.0f} s; output tail:\n"
                    f"{(exc.stdout or b'')[-3000:]!r}\n{(exc.stderr or b'')[-3000:]!r}")
    print(f"flwr run: {time.monotonic() - started:.1f} s wall")
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    # The CLI wrote its default config and started its own managed SuperLink (not someone else's).
    assert '":local:"' in (flwr_home / "config.toml").read_text()
    assert "Starting local SuperLink on 127.0.0.1:39091" in output, output[-3000:]

    metrics = run_dir / "metrics.json"
    assert metrics.exists(), f"no metrics.json; run.log / output tail:\n{output[-3000:]}"
    doc = json.loads(metrics.read_text())
    auc = doc["models"]["hybrid"]["auc"]
    assert isinstance(auc, float) and math.isfinite(auc) and 0.0 <= auc <= 1.0
    assert set(doc["sites"]) == set(sites)
    assert set(doc["privacy"]) == set(sites)
    for p in doc["privacy"].values():  # DP-SGD near its target; the ledger adds the other releases, composed
        assert 0.0 < p["run_epsilon"] <= EPSILON + 0.02
        assert p["run_epsilon"] < p["epsilon"] <= EPSILON + 1.5
    # census, moments, CNN, GLM and meta rounds, the sites' own models alone, validation, explanation, evaluation
    assert doc["run"]["exchanges"] == 2 + ROUNDS + doc["glm"]["rounds"] + doc["meta"]["rounds"] + 4
    assert not doc["missing_sites"]
    assert (run_dir / "run.log").is_file() and (run_dir / "run.log").read_text().strip()
