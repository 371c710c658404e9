"""``prov4ml-dist report``: one self-contained HTML page per run.

``collect.build_model`` reads ``merged.h5`` (and ``prov.json`` for the lineage graph) into a compact model
of bounded size (``collect.BOUNDS``); ``page`` inlines it with the vendored chart and graph
libraries (``vendor/``, re-fetched by ``scripts/vendor_js.sh``) and the page's own script.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..merge.layout import PROV_NAME
from .collect import BOUNDS, Progress, build_model, model_bound
from .page import fixed_bytes, render

__all__ = ["BOUNDS", "size_bound", "write_report"]

REPORT_NAME = "report.html"


def write_report(run_dir: Path, output: Path | None = None, progress: Progress = lambda _: None) -> Path:
    """Write the report of the merged run in ``run_dir`` (default ``run_dir/report.html``),
    atomically: a crash leaves the previous report, never half a page."""
    from ..cli.rundir import load_run, open_merged
    merged = load_run(run_dir)
    prov = _prov(run_dir / PROV_NAME)
    with open_merged(run_dir) as f:
        model = build_model(merged, f, run_dir, prov, progress)
    progress("writing the page")
    out = output if output is not None else run_dir / REPORT_NAME
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(render(model), encoding="utf-8")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def size_bound(charts: int, ranks: int) -> int:
    """The most bytes a report of a run with this many charts (metric keys x contexts, system
    keys) and ranks can take, however many points each logged."""
    return fixed_bytes() + model_bound(charts, ranks)


def _prov(path: Path) -> dict | None:
    """The PROV document, None when there is none or it is not JSON (the lineage view says so)."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None
