"""Benchmark: where ``genofed simulate``'s fixed cost goes, step by step.

Runs a tiny federation (3 sites, 240 synthetic patients, one round of everything, no DP) through
:func:`simulations.simulate.simulate`, timing each step of the driver: starting the private
SuperLink, submitting the run (building the FAB and sending it through the Control API), the
wait from submission until the ServerApp's first line of work (the simulation runtime and Ray
starting), the ServerApp itself, the wait from its last event until Flower reports the run
finished (status queries through the Control API), and stopping the SuperLink. Everything but the ServerApp is fixed cost.

Usage::

    python -m simulations.benchmarks.simulate_overhead [--repeats 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from simulations.benchmarks import emit, run_main


def _layout(root: Path) -> Path:
    from simulations.site_layout import set_layout_policy, split_cohort
    from simulations.synthetic import write_synthetic_cohort

    write_synthetic_cohort(out=root / "cohort", patients=240, seed=11)
    split_cohort(spec_path=root / "cohort" / "spec.toml", sites=3, by="iid", out=root / "sites", seed=0,
                 vaults=True, show_progress=False)
    set_layout_policy(root / "sites", require_dp=False)  # the benchmark stands in for every site's officer
    return root / "sites"


def run_once(sites: Path, out: Path) -> dict[str, float]:
    """One simulated run; seconds per driver step (wall clock)."""
    from simulations import simulate as sim

    marks: dict[str, Any] = {"status_queries": []}
    link_cls, follow = sim.LocalSuperLink, sim._follow

    class TimedLink(link_cls):  # type: ignore[misc,valid-type]
        def __enter__(self):  # noqa: ANN204
            t = time.time()
            res = super().__enter__()
            marks["superlink_start_s"] = time.time() - t
            control = self.control
            start_run, status = control.start_run, control.status

            def timed_start_run(*args: Any, **kw: Any) -> int:
                t = time.time()
                run_id = start_run(*args, **kw)
                marks["submit"] = (t, time.time())
                return run_id

            def timed_status(*args: Any, **kw: Any) -> str:
                t = time.time()
                res = status(*args, **kw)
                marks["status_queries"].append(time.time() - t)
                return res

            control.start_run, control.status = timed_start_run, timed_status
            return res

        def __exit__(self, *exc: object) -> None:
            t = time.time()
            super().__exit__(*exc)
            marks["superlink_stop_s"] = time.time() - t

    def timed_follow(*args: Any, **kw: Any) -> str:
        res = follow(*args, **kw)
        marks["follow_end"] = time.time()
        return res

    sim.LocalSuperLink, sim._follow = TimedLink, timed_follow
    try:
        t0 = time.time()
        doc = sim.simulate(sim.SimulationRequest(sites_dir=sites, out=out, run_config={
            "cnn-rounds": 1, "dp": False, "forest-trees": 10, "glm-rounds": 1, "meta-rounds": 1,
            "site-alone": False}))
        total = time.time() - t0
    finally:
        sim.LocalSuperLink, sim._follow = link_cls, follow
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    done = events[-1]
    serverapp_start = done["time"] - done["seconds"]
    return {"total_s": total, "superlink_start_s": marks["superlink_start_s"],
            "submit_s": marks["submit"][1] - marks["submit"][0],
            "until_serverapp_s": serverapp_start - marks["submit"][1],
            "serverapp_s": doc["run"]["timing"]["total_s"],
            "until_finished_s": marks["follow_end"] - done["time"],
            "status_query_s": statistics.median(marks["status_queries"]),
            "superlink_stop_s": marks["superlink_stop_s"],
            "fixed_s": total - doc["run"]["timing"]["total_s"]}


def run(*, repeats: int) -> dict[str, Any]:
    """``repeats`` runs on one layout; medians per step."""
    with tempfile.TemporaryDirectory() as tmp:
        sites = _layout(Path(tmp))
        runs = [run_once(sites, Path(tmp) / f"run{i}") for i in range(repeats)]
    return {"repeats": repeats, "median": {k: round(statistics.median(r[k] for r in runs), 2) for k in runs[0]},
            "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    emit(run(repeats=args.repeats), args.json)


if __name__ == "__main__":
    run_main(main, "python -m simulations.benchmarks.simulate_overhead")
