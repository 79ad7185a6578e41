"""``genofed report RUNDIR``: (re)write a run's ``report.html`` from its ``metrics.json`` and pooled statistics.

``genofed simulate`` (and so ``genofed demo``) and ``genofed evaluate`` already write it at the end
of a run; this command writes it again, for example after an upgrade of genofed, or under another
title or file name. RUNDIR is a run folder of ``genofed simulate`` or an --out folder of ``genofed
evaluate`` (told apart by its metrics.json). The page stands alone: every figure is embedded as a PNG.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common.errors import GenofedError


class ReportError(GenofedError):
    """A run folder without what a report is made from."""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``report`` to the console script."""
    p = subparsers.add_parser("report", help="write a run's report.html (metrics, curves, privacy spend)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, metavar="RUNDIR", help="a run folder of genofed simulate or evaluate")
    p.add_argument("--out", type=Path, help="the HTML file to write (default RUNDIR/report.html)")
    p.add_argument("--title", help="the page's title (default: genofed run, or genofed evaluate)")
    p.set_defaults(func=report_command)


def report_command(args: argparse.Namespace) -> int:
    """Write the report and print where it is."""
    from server.report_html import POOLED_STATS, render_run_report
    from simulations.evaluate_report import is_evaluate_folder, render_evaluate_report

    run_dir = args.run_dir
    if is_evaluate_folder(run_dir):
        out = render_evaluate_report(run_dir, title=args.title or "genofed evaluate", out=args.out)
        print(f"report: {out}")
        return 0
    missing = [name for name in ("metrics.json", POOLED_STATS) if not (run_dir / name).is_file()]
    if missing:
        raise ReportError(f"{run_dir}: no {' or '.join(missing)}; give the folder a completed `genofed simulate` "
                          "or `genofed evaluate` wrote (its --out)")
    out = render_run_report(run_dir, title=args.title or "genofed run", out=args.out)
    print(f"report: {out}")
    return 0
