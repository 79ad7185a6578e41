"""``genofed simulate``: N hospitals on one machine through Flower's Simulation Engine.

It starts a private SuperLink in simulation mode (:mod:`simulations.superlink`: a free port, its
own FLWR_HOME and log under ``RUNDIR/.flower``, no runtime dependency installation), submits this
app through Flower's Control API from this process, as ``flwr run`` would
(:class:`common.flower_internals.ControlClient`), with ``num-supernodes`` = the number of site
folders and ``sites-dir`` in the run config (each simulated SuperNode binds to the site folder of
its partition: see ``client/site.py``), follows the run's events to show progress, and stops the
SuperLink at the end, also on failure or Ctrl-C. The same app runs unchanged under a real SuperLink with SuperNodes (see the README).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from common.errors import GenofedError
from common.flower_internals import ControlClient
from common.progress import progress_bar
from simulations.flower_cli import format_config
from simulations.superlink import SuperLinkConfig, SuperLinkError, start_superlink, stop

APP_DIR = Path(__file__).resolve().parents[1]
QUIET_ENV = {"FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_TELEMETRY_ENABLED": "0",
             "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "GENOFED_NO_PROGRESS": "1",
             "RAY_DEDUP_LOGS": "0", "RAY_USAGE_STATS_ENABLED": "0"}


class SimulationError(GenofedError):
    """The simulation could not start or did not complete."""


@dataclass
class SimulationRequest:
    """What to simulate: the site layout, where results go, and run-config overrides."""

    sites_dir: Path
    out: Path
    run_config: dict[str, Any] = field(default_factory=dict)
    cpus_per_site: int = 1
    timeout: float = 3600.0

    def __post_init__(self) -> None:
        # Flower's processes run elsewhere (flwr in the app folder, the ServerApp in its own):
        # every path they are given must be absolute.
        self.sites_dir = Path(self.sites_dir).expanduser().absolute()
        self.out = Path(self.out).expanduser().absolute()


STATUS_EVERY_S = 5.0  # how often Flower is asked for the run's status while events keep coming
ENDED_POLL_S = 0.1  # and once the run's events say it ended


def _env(home: Path) -> dict[str, str]:
    env = {**os.environ, **QUIET_ENV, "FLWR_HOME": str(home)}
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")  # flwr launches its tools by bare name
    return env


def _sites(sites_dir: Path) -> list[Path]:
    from client.site import site_dirs

    if not sites_dir.is_dir():
        raise SimulationError(f"{sites_dir}: not a folder; make one with `genofed cohort split --vaults` "
                              "or `genofed cohort recipe ... --vaults`")
    sites = site_dirs(sites_dir)
    if len(sites) < 2:
        raise SimulationError(f"{sites_dir}: {len(sites)} site folder(s) with vault/ and key; a federation needs 2+")
    return sites


class LocalSuperLink:
    """A private SuperLink in simulation mode (:mod:`simulations.superlink`); a context manager that always stops it."""

    def __init__(self, home: Path) -> None:
        self.home, self.proc, self.control = home, None, None

    def __enter__(self) -> LocalSuperLink:
        try:
            self.proc, config = start_superlink(
                self.home, env=_env(self.home), timeout=60.0,
                config_for=lambda port: SuperLinkConfig(port, simulation=True, database=self.home / "state.db"))
        except SuperLinkError as exc:
            raise SimulationError(exc.summary) from None
        (self.home / "config.toml").write_text(config.cli_config("sim"), encoding="utf-8")  # for `flwr log`
        self.control = ControlClient(config.address)
        return self

    def flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        return subprocess.run(["flwr", *args], env=_env(self.home), capture_output=True, text=True, timeout=timeout,
                              cwd=APP_DIR)

    def __exit__(self, *exc: object) -> None:
        if self.control is not None:
            self.control.close()
        if self.proc is not None:
            stop(self.proc)


def simulate(req: SimulationRequest) -> dict[str, Any]:
    """Run the federation on ``req.sites_dir``; returns the run's ``metrics.json``."""
    sites = _sites(req.sites_dir)
    held_out = str(req.run_config.get("hold-out-site", "") or "")
    if held_out and held_out not in {s.name for s in sites}:
        raise SimulationError(f"--hold-out-site {held_out}: not a site of {req.sites_dir} "
                              f"({', '.join(s.name for s in sites)})")
    if held_out and len(sites) < 3:
        raise SimulationError(f"--hold-out-site {held_out}: needs at least 3 sites (2 to train, 1 held out)")
    resume = bool(req.run_config.get("resume", False))
    if req.out.exists() and any(req.out.iterdir()) and not resume:
        raise SimulationError(f"{req.out}: already exists; give a new --out (or --resume to continue that run)")
    req.out.mkdir(parents=True, exist_ok=True)
    cfg = {**req.run_config, "run-dir": str(req.out.resolve()), "sites-dir": str(req.sites_dir.resolve())}
    cfg.setdefault("min-sites", min(len(sites) - (1 if held_out else 0), 2))
    fed = {"num-supernodes": len(sites), "client-resources-num-cpus": req.cpus_per_site}
    with LocalSuperLink(req.out / ".flower") as link:
        try:
            run_id = link.control.start_run(APP_DIR, run_config=format_config(cfg), federation_config=fed)
        except (httpx.HTTPError, ValueError) as exc:
            raise SimulationError(f"the SuperLink did not start the run: {exc}; see {link.home}/superlink.log") \
                from None
        status = _follow(link, run_id, req, n_exchanges=_planned_exchanges(cfg))
        failed = status != "finished:completed" or not (req.out / "metrics.json").exists()
        if failed:  # Flower's own log (simulation engine, ClientApps) helps only when something went wrong
            (req.out / "flower.log").write_text(link.flwr("log", str(run_id), "sim", "--show").stdout)
    if failed:
        reason = _failure_reason(req.out)
        raise SimulationError(f"run {run_id} ended as {status}: {reason} (see {req.out / 'run.log'})")
    return json.loads((req.out / "metrics.json").read_text())


def _planned_exchanges(cfg: dict[str, Any]) -> int:
    """Exchanges of a run at most: census, moments, CNN, GLM and meta rounds, the sites' own models
    alone, validation, evaluation."""
    from common.settings import RunSettings

    s = RunSettings.from_run_config(cfg)
    alone = 1 if s.site_alone and s.test_statistics != "none" else 0
    return 4 + s.cnn_rounds + s.glm_fit_rounds + s.meta_fit_rounds + alone


def _follow(link: LocalSuperLink, run_id: int, req: SimulationRequest, *, n_exchanges: int) -> str:
    """Wait for the run to finish, showing progress from the run's events.

    The ServerApp appends to ``events.jsonl`` after every exchange and at its end (``done`` or
    ``failed``). Flower's Control API is asked for the run's status every ``STATUS_EVERY_S``
    (in case the ServerApp dies without a word) and, once the events say the run ended, every
    ``ENDED_POLL_S`` until it reports the run finished: one HTTP request from this process each.
    """
    deadline = time.monotonic() + req.timeout
    first_new = len(_events(req.out))  # a resumed run directory already holds earlier events
    next_status = time.monotonic() + STATUS_EVERY_S
    with progress_bar() as bar:
        task = bar.add_task("federation", total=n_exchanges)
        while time.monotonic() < deadline:
            events = _events(req.out)[first_new:]
            ended = any(e.get("event") in ("done", "failed") for e in events)
            # GLM and meta rounds stop early once converged: the bar then jumps to its end.
            done = sum(1 for e in events if e.get("event") not in ("done", "failed"))
            bar.update(task, completed=n_exchanges if ended else min(done, n_exchanges))
            if ended or time.monotonic() >= next_status:
                status = _run_status(link, run_id)
                if status.startswith("finished"):
                    return status
                next_status = time.monotonic() + STATUS_EVERY_S
            time.sleep(ENDED_POLL_S if ended else 0.25)
    link.control.stop_run(run_id)
    raise SimulationError(f"run {run_id} did not finish within {req.timeout:.0f} s; stopped")


def _run_status(link: LocalSuperLink, run_id: int) -> str:
    try:
        return link.control.status(run_id)
    except (httpx.HTTPError, ValueError):
        return ""  # asked again at the next look


def _events(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "events.jsonl"
    if not path.exists():
        return []
    events = []
    for line in path.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line being written right now
    return events


def _failure_reason(run_dir: Path) -> str:
    for event in reversed(_events(run_dir)):
        if event.get("event") == "failed":
            return str(event.get("reason"))
    log = run_dir / "run.log"
    if log.exists() and log.read_text().strip():
        return log.read_text().strip().splitlines()[-1]
    return "no report was written"


def _last_line(text: str) -> str:
    lines = [ln for ln in (text or "").strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "no output"

