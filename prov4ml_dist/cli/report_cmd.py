"""``prov4ml-dist report``: the run as one HTML page that works offline (``prov4ml_dist.report``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .output import note
from .rundir import run_directory


def register(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    from ..report import BOUNDS  # here, not at the top: prov4ml_dist.report imports the cli's helpers
    p = commands.add_parser(
        "report", parents=[common], help="one self-contained HTML page of a merged run",
        description="Writes one HTML file with everything inlined (no network, no server: open it from disk or "
                    "mail it): the run at a glance, metrics per context (cross-rank band, any stored rank's line), "
                    "stragglers, system/GPU/energy, params, artifacts and their lineage. Long series are "
                    f"downsampled: at most {BOUNDS['band_points']} steps per band and {BOUNDS['line_points']} points "
                    f"per rank line, lines of at most {BOUNDS['lines_per_chart']} ranks per chart; the exact points "
                    "stay in merged.h5.")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a merged run directory (or its merged.h5)")
    p.add_argument("-o", "--output", type=Path, metavar="FILE", help="the HTML file (default RUN_DIR/report.html)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..report import write_report
    run_dir = run_directory(args.run_dir)
    out = write_report(run_dir, args.output, progress=note)
    print(out)
    return 0
