"""``prov4ml-dist plot``: PNG plots of a merged run, drawn with matplotlib's Agg backend (no
display needed; matplotlib is the optional extra ``plot``).

One figure per metric and context, one line per rank — or, above --max-lines ranks, the
min-max band and the mean across ranks (lines for a thousand ranks are ink, not information).
System series (process CPU and memory, node load, GPU power and utilisation, energy counters)
are drawn the same way over wall-clock time since the run started; a per-rank energy bar chart
is added when energy was measured. What a run lacks (no GPU, no energy counter) is said, not
drawn empty. Each series is read thinned to what a figure can show, so memory stays bounded.
"""

from __future__ import annotations

import argparse
import re
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..merge import MergedRun
from ..merge.means import nanmean
from ..merge.model import SeriesSummary
from .output import CliError, byte_unit, note, rank_attempt
from .points import series_points
from .rundir import load_run, open_merged, run_directory, unavailable_sensors

MAX_LINES = 8
MAX_POINTS = 4000  # per series and figure: more than a 1000-pixel-wide plot can show
BAND_GRID = 400  # x positions at which a band is evaluated
FEW_POINTS = 30  # fewer x values than this are drawn with markers
SIZE_IN, DPI = (8.0, 4.5), 110
MARGINS = {"left": 0.1, "right": 0.97, "bottom": 0.12, "top": 0.92}
UNIT_NAMES = {"1": "count", "%": "%"}
MARKERS = "os^vD<>p"
ENERGY_LABELS = {"gpu_joules": "GPUs", "rapl_joules": "RAPL (CPU packages, DRAM)", "total_joules": "GPUs + RAPL"}
DASHES = ("-", "--", "-.", ":")
SINGLE_SAMPLE = ("one system sample per series: the run was shorter than its sample interval "
                 "(start_run(sample_interval=...)), so these plots show single points")
HUGE_SPAN = ("values too far apart for a linear axis (near the float limit): those plots use a symmetric "
             "log scale; infinities and NaN are not drawn")


def _span_overflows(finite: np.ndarray) -> bool:
    """Whether finite values span more than a float holds (1.7e308 and -1.7e308 in one plot),
    or so close to it that the axis's margins would."""
    with np.errstate(over="ignore"):
        return len(finite) > 0 and not np.isfinite(2 * (float(finite.max()) - float(finite.min())))


def register(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = commands.add_parser("plot", parents=[common], help="PNG plots of metrics and system series",
                            description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a merged run directory (or its merged.h5)")
    p.add_argument("-o", "--output", type=Path, metavar="DIR", help="where the PNGs go (default RUN_DIR/plots)")
    p.add_argument("--max-lines", type=int, default=MAX_LINES, metavar="N",
                   help=f"one line per rank up to N ranks, a min/mean/max band above (default {MAX_LINES})")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    run_dir = run_directory(args.run_dir)
    merged = load_run(run_dir)
    mpl = _matplotlib()
    out = args.output if args.output is not None else run_dir / "plots"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CliError(f"cannot create {out}: {exc.strerror or exc}") from None
    with open_merged(run_dir) as f:
        plotter = _Plotter(f, merged, out, args.max_lines, mpl)
        plotter.all()
    for text in plotter.notes:
        note(text)
    for path in plotter.written:
        print(path)
    return 0


@dataclass(frozen=True)
class _Matplotlib:
    """The few matplotlib classes used: no pyplot, so no global figure state and no display."""

    canvas: Any
    figure: Any
    integer_ticks: Any


def _matplotlib() -> _Matplotlib:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise CliError("plot needs matplotlib, which is not installed: pip install 'prov4ml-dist[plot]'") from None
    return _Matplotlib(FigureCanvasAgg, Figure, lambda: MaxNLocator(integer=True))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "series"


class _Plotter:
    def __init__(self, f: h5py.File, run: MergedRun, out: Path, max_lines: int, mpl: _Matplotlib) -> None:
        self.f, self.run, self.out, self.max_lines, self.mpl = f, run, out, max_lines, mpl
        self.t0 = run.start_time or 0.0
        self.incomplete = {(r.rank, r.attempt) for r in run.ranks if not r.complete}
        self.written: list[Path] = []
        self.notes: list[str] = []

    def all(self) -> None:
        groups: dict[tuple[str, str, str, str], list[SeriesSummary]] = defaultdict(list)
        for s in self.run.series:
            if s.count:
                groups[(s.dataset.split("/")[1], s.key, s.context, s.source)].append(s)
        for (table, key, context, _), members in sorted(groups.items()):
            if table == "metrics":
                self._series_figure(members, f"{key} ({context})", key, f"metric_{key}_{context}", by_time=False)
            else:
                unit = str(members[0].extra.get("unit", ""))
                self._series_figure(members, key, key, f"system_{key}", by_time=True, unit=unit)
        if not any(table == "metrics" for table, *_ in groups):
            self.notes.append("no metric points in this run: no metric plots")
        self._energy_bars()
        self._say_what_is_missing({key for table, key, *_ in groups if table == "system"})

    # -- figures ------------------------------------------------------------------------
    def _new(self) -> tuple[Any, Any]:
        # Fixed margins rather than a layout engine: as readable here, and half the drawing time.
        fig = self.mpl.figure(figsize=SIZE_IN, dpi=DPI)
        fig.subplots_adjust(**MARGINS)
        self.mpl.canvas(fig)
        return fig, fig.add_subplot()

    def _save(self, fig: Any, ax: Any, title: str, name: str) -> None:
        ax.set_title(title, loc="left", fontsize=11)
        ax.set_title(f"{self.run.experiment_name} / {self.run.run_id}", loc="right", fontsize=7, color="0.4")
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best")
        path = self.out / f"{_slug(name)}.png"
        n = 1
        while path in self.written:
            n += 1
            path = self.out / f"{_slug(name)}-{n}.png"
        fig.savefig(path)
        self.written.append(path)

    def _series_figure(self, members: list[SeriesSummary], title: str, ylabel: str, name: str, *, by_time: bool,
                       unit: str = "") -> None:
        curves = []
        for s in members:
            points = series_points(self.f, s.dataset, s.row_start, s.row_stop, MAX_POINTS)
            x = points["time"] - self.t0 if by_time else points["step"].astype(float)
            curves.append((s, x, points["value"]))
        scale, unit_label = self._unit(unit, curves)
        fig, ax = self._new()
        if len(curves) <= self.max_lines:
            for i, (s, x, y) in enumerate(curves):
                # Shapes and dashes differ per rank: ranks that agree still show as several lines.
                marker = MARKERS[i % len(MARKERS)] if len(x) < FEW_POINTS else None
                ax.plot(x, y / scale, label=self._label(s), marker=marker, markersize=4,
                        linestyle=DASHES[i % len(DASHES)], linewidth=1.2, markerfacecolor="none")
        else:
            self._band(ax, curves, scale)
        ax.set_xlabel("time since the run started [s]" if by_time else "step")
        if by_time and max(len(x) for _, x, _ in curves) <= 1:
            self._note(ax, SINGLE_SAMPLE)
        ys = np.concatenate([y for _, _, y in curves]) / scale
        finite = ys[np.isfinite(ys)]
        if _span_overflows(finite):
            # A linear axis over ±1.7e308 spans inf: matplotlib cannot place a tick. Its
            # autoscale cannot either (the margins overflow), hence the explicit limits.
            ax.set_yscale("symlog")
            ax.set_ylim(float(finite.min()), float(finite.max()))
            self._note(ax, HUGE_SPAN, "values too far apart for a linear axis: symmetric log scale")
        xs = np.concatenate([x for _, x, _ in curves])
        if xs.min() == xs.max():  # one step: matplotlib would show a ±0.05 axis
            ax.set_xlim(xs.min() - 1, xs.max() + 1)
        if not by_time:
            ax.xaxis.set_major_locator(self.mpl.integer_ticks())
        ax.set_ylabel(f"{ylabel} [{unit_label}]" if unit_label else ylabel)
        self._save(fig, ax, title, name)

    def _note(self, ax: Any, note: str, label: str | None = None) -> None:
        """Say ``note`` on the plot (or its shorter ``label``), and once on stderr."""
        ax.text(0.5, 0.92, label or note, transform=ax.transAxes, ha="center", fontsize=8, color="0.3")
        if note not in self.notes:
            self.notes.append(note)

    @staticmethod
    def _unit(unit: str, curves: list) -> tuple[float, str]:
        """Bytes in the binary unit that fits the largest value; other units as recorded."""
        if unit in ("B", "B/s"):
            peak = max((float(np.nanmax(np.abs(y))) for _, _, y in curves if np.isfinite(y).any()), default=0.0)
            scale, name = byte_unit(peak)
            return scale, name + unit[1:]
        return 1.0, UNIT_NAMES.get(unit, unit)

    def _label(self, s: SeriesSummary) -> str:
        who = rank_attempt(s.rank, s.attempt, word="rank ")
        scope, device = s.extra.get("scope"), str(s.extra.get("device", ""))
        if scope == "node" and device:
            who = f"{device} (by rank {s.rank})"
        elif scope == "gpu" and device:
            who = f"{who} {device[:12]}"
        return who + (" (incomplete)" if (s.rank, s.attempt) in self.incomplete else "")

    def _band(self, ax: Any, curves: list, scale: float) -> None:
        """Min, mean and max across ranks at each x (the distinct x values, or a grid when there
        are many); each series counts only inside its own x range, so a crashed rank does not
        drag the band to its last value. Few x values get error bars: a band needs width."""
        xs_all = np.unique(np.concatenate([x for _, x, _ in curves]))
        grid = xs_all if len(xs_all) <= BAND_GRID else np.linspace(xs_all[0], xs_all[-1], BAND_GRID)
        stack = np.full((len(curves), len(grid)), np.nan)
        for i, (_, x, y) in enumerate(curves):
            order = np.argsort(x, kind="stable")
            xs, ys = x[order], y[order] / scale
            inside = (grid >= xs[0]) & (grid <= xs[-1])
            stack[i, inside] = np.interp(grid[inside], xs, ys)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # grid points no rank reached
            low, mean, high = np.nanmin(stack, axis=0), nanmean(stack), np.nanmax(stack, axis=0)
        ranks = len({s.rank for s, _, _ in curves})
        if len(grid) < FEW_POINTS:
            ax.errorbar(grid, mean, yerr=[mean - low, high - mean], fmt="o-", capsize=4, markersize=4,
                        label=f"mean, bars: min-max across {ranks} ranks")
            return
        ax.fill_between(grid, low, high, alpha=0.3, linewidth=0, label=f"min-max across {ranks} ranks")
        ax.plot(grid, mean, linewidth=1.5, label="mean across ranks")

    def _energy_bars(self) -> None:
        ranks = sorted((e for e in self.run.energy if e.scope == "rank"), key=lambda e: int(e.name))
        fields = sorted({f for e in ranks for f, v in e.fields.items() if f.endswith("joules") and "." not in f and v})
        if not fields:
            return
        peak = max(e.fields.get(f, 0.0) for e in ranks for f in fields)
        scale, unit = next((s, u) for s, u in ((1e6, "MJ"), (1e3, "kJ"), (1.0, "J")) if peak >= s or s == 1.0)
        fig, ax = self._new()
        width = 0.8 / len(fields)
        positions = np.array([int(e.name) for e in ranks], dtype=float)
        for i, field in enumerate(fields):
            ax.bar(positions + i * width, [e.fields.get(field, 0.0) / scale for e in ranks], width,
                   label=ENERGY_LABELS.get(field, field))
        if len(ranks) <= 32:
            ax.set_xticks(positions + width * (len(fields) - 1) / 2, [e.name for e in ranks])
        else:
            ax.xaxis.set_major_locator(self.mpl.integer_ticks())
        ax.set_axisbelow(True)
        ax.set_xlabel("rank")
        ax.set_ylabel(f"energy [{unit}]")
        self._save(fig, ax, "energy per rank", "energy_per_rank")

    def _say_what_is_missing(self, system_keys: set[str]) -> None:
        if not any(k.startswith("gpu_") for k in system_keys):
            why = "; ".join(unavailable_sensors(self.run, "nvml")) or "no GPU was sampled"
            self.notes.append(f"no GPU series in this run ({why}): GPU power, utilisation and energy plots skipped")
        energy = [s for s in self.run.series if s.extra.get("unit") == "J"]
        if not energy:
            why = "; ".join(unavailable_sensors(self.run, "nvml", "rapl")) or "no energy counter was sampled"
            self.notes.append(f"no energy series in this run ({why}): energy-over-time plots skipped")
