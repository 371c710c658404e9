"""What the report shows, as one compact JSON-able dict read from ``merged.h5`` and ``prov.json``.

The size of the dict is bounded whatever the size of the run (``BOUNDS``): each chart holds a
band of at most ``BAND_POINTS`` steps (min / mean / max across ranks, from the merge's
``crossrank`` table) and at most ``MAX_LINES`` per-rank lines of at most ``2 * LINE_BUCKETS``
points each (min/max per bucket, ``downsample``); the straggler heat map is at most
``HEAT_RANKS`` x ``HEAT_STEPS`` cells; tables list at most ``MAX_ROWS`` rows. The exact points
stay in ``merged.h5`` (``prov4ml-dist export RUN --format csv``).
"""

from __future__ import annotations

import json
import math
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..cli.output import duration, ranks_text
from ..cli.points import series_points
from ..cli.rundir import unavailable_sensors
from ..merge import MergedRun
from ..merge.model import GroupSummary, RankAttempt, SeriesSummary
from .downsample import band_buckets, minmax_points

BAND_POINTS = 1000  # x positions of a cross-rank band
LINE_BUCKETS = 200  # a rank's line: at most 2 * LINE_BUCKETS points (its min and max per bucket)
MAX_LINES = 32  # per-rank lines stored per chart; the others are in merged.h5
LINE_READ = 1_000_000  # points read of one series before thinning (a longer one is read every k-th point)
HEAT_RANKS, HEAT_STEPS = 128, 120  # straggler heat map cells (ranks and steps bucketed beyond)
HEAT_READ = 4_000_000  # rows of the heat map's metric read at most (each series thinned beyond)
MAX_ROWS = 200  # rows of a table (artifacts, params) before "and N more"
DIGITS = 6  # significant digits of a number in the page
MAX_TEXT = 120  # characters of a host name or a reason kept per rank
BOUNDS = {"band_points": BAND_POINTS, "line_points": 2 * LINE_BUCKETS, "lines_per_chart": MAX_LINES,
          "heat_ranks": HEAT_RANKS, "heat_steps": HEAT_STEPS, "table_rows": MAX_ROWS}

# The worst case of each part of the model, in bytes of JSON: what ``model_bound`` adds up.
NUMBER_BYTES = 14  # "-1.23457e-05," at DIGITS significant digits
CHART_BYTES = NUMBER_BYTES * (4 * BAND_POINTS + MAX_LINES * 4 * LINE_BUCKETS) + MAX_LINES * 300 + 2000
HEAT_BYTES = NUMBER_BYTES * (HEAT_RANKS * HEAT_STEPS + 3 * BAND_POINTS) + (HEAT_RANKS + HEAT_STEPS) * 40 + 20 * 40
RANK_BYTES = 2 * MAX_TEXT + 200  # a rank in the status grid and in the energy list
ROW_BYTES = 12 * MAX_TEXT  # a row of a table (params, artifacts, nodes, problems, stragglers), text capped
TABLES = 5
GRAPH_BYTES = 300 * (8 * MAX_TEXT)  # lineage.MAX_NODES nodes and as many edges per node, at most
BASE_BYTES = 64 * 1024  # program, software, Slurm, bounds, absent sensors

Progress = Callable[[str], None]


def model_bound(charts: int, ranks: int) -> int:
    """The most bytes the JSON model of a run with this many charts and ranks can take, however
    many points it logged: the report's size bound, less the inlined libraries."""
    return BASE_BYTES + charts * CHART_BYTES + HEAT_BYTES + ranks * RANK_BYTES + TABLES * MAX_ROWS * ROW_BYTES \
        + GRAPH_BYTES


def compact(values: Iterable[float]) -> list[float | None]:
    """Numbers to ``DIGITS`` significant digits (the page's size), NaN and ±inf as null (a gap)."""
    return [float(f"{v:.{DIGITS}g}") if math.isfinite(v) else None for v in map(float, values)]


def build_model(run: MergedRun, f: h5py.File, run_dir: Path, prov: dict[str, Any] | None,
            progress: Progress = lambda _: None) -> dict[str, Any]:
    """The whole page model; ``progress`` is told what is being read (a big run takes a while)."""
    from .lineage import lineage
    t0 = run.start_time or 0.0
    progress("reading the metrics")
    metrics = [_chart(f, run, g, t0) for g in _groups(run, "metrics")]
    progress("reading the system series")
    system = [_chart(f, run, g, t0) for g in _groups(run, "system")]
    progress("reading the stragglers")
    stragglers = _stragglers(f, run)
    return {
        "bounds": BOUNDS, "overview": overview(run, run_dir, prov), "metrics": metrics, "system": system,
        "absent": {"gpu": "; ".join(unavailable_sensors(run, "nvml")),
                   "energy": "; ".join(unavailable_sensors(run, "nvml", "rapl"))},
        "stragglers": stragglers, "energy": _energy(run), "params": _params(run),
        "artifacts": _artifacts(run), "lineage": lineage(prov),
    }


# -- the run at a glance -------------------------------------------------------------------
def rank_state(r: RankAttempt) -> str:
    """ok / incomplete / missing: what the status grid colours."""
    return "missing" if r.status == "missing" else "ok" if r.complete else "incomplete"


def overview(run: MergedRun, run_dir: Path, prov: dict[str, Any] | None) -> dict[str, Any]:
    present = [r for r in run.ranks if r.attempt >= 0]
    latest = {r.rank: r for r in run.ranks}  # a rank's latest attempt (rows are sorted by rank, attempt)
    by_host: dict[str, set[int]] = defaultdict(set)
    gpus_by_host: dict[str, set[str]] = defaultdict(set)
    host_of = {r.rank: r.hostname or "?" for r in present}
    for r in present:
        by_host[r.hostname or "?"].add(r.rank)
        gpus_by_host[r.hostname or "?"].update(r.gpu_uuids)
    for s in run.series:  # the GPUs the sampler measured, should a rank's record not list them
        if s.extra.get("scope") == "gpu" and s.extra.get("device") and s.rank in host_of:
            gpus_by_host[host_of[s.rank]].add(str(s.extra["device"]))
    env = present[0].environment if present else {}
    topo = present[0].topology if present else {}
    start, end = run.start_time, run.end_time
    return {
        "run_id": run.run_id, "experiment": run.experiment_name, "user": run.user, "world_size": run.world_size,
        "directory": str(run_dir), "start": start, "end": end,
        "duration": end - start if start is not None and end is not None else None,
        "launcher": topo.get("launcher"), "merge": run.merge_stamp,
        "ranks": [[r.rank, r.attempt, rank_state(r), r.hostname[:MAX_TEXT], _why(r, end)[:MAX_TEXT]]
                  for r in latest.values()],
        "attempts": len(run.ranks), "states": dict(Counter(rank_state(r) for r in latest.values())),
        "nodes": [{"host": h[:MAX_TEXT], "ranks": _ranks(by_host[h]), "count": len(by_host[h]),
                   "gpus": len(gpus_by_host[h])} for h in sorted(by_host, key=lambda h: min(by_host[h]))][:MAX_ROWS],
        "node_count": len(by_host), "gpus": sum(len(g) for g in gpus_by_host.values()),
        "program": _program(env), "software": _software(env), "slurm": _slurm(topo, env),
        "problems": [p[:MAX_TEXT * 4] for p in run.problems[:MAX_ROWS]], "problem_count": len(run.problems),
        "absent_sensors": unavailable_sensors(run, "nvml", "rapl"),
        "prov": prov is not None,
    }


def _why(r: RankAttempt, end: float | None) -> str:
    """What a person wants to know of a rank's status: why it is missing, how long before the end
    an incomplete one was last heard of."""
    if r.status == "missing" or r.complete:
        return r.reason or r.status
    if r.last_time is not None and end is not None:
        return f"no end record; last flushed {duration(end - r.last_time)} before the run's end"
    return "no end record"


def _program(env: dict[str, Any]) -> dict[str, Any]:
    git = env.get("git") or {}
    script = (env.get("software") or {}).get("script") or {}
    return {"script": script.get("path"), "sha256": script.get("sha256"), "argv": env.get("argv"),
            "cwd": env.get("cwd"), "git_commit": git.get("commit"), "git_branch": git.get("branch"),
            "git_dirty": git.get("dirty"), "git_remote": (env.get("software") or {}).get("git_remote")}


def _software(env: dict[str, Any]) -> dict[str, Any]:
    software = {"python": env.get("python"), "implementation": env.get("implementation"),
                "torch": env.get("torch"), "cuda": env.get("cuda"), "platform": env.get("platform"),
                "executable": env.get("executable")}
    extra = env.get("software") or {}
    software.update({k: extra.get(k) for k in ("mpi", "nccl", "container") if extra.get(k)})
    software.update(env.get("versions") or {})
    return {k: v if isinstance(v, (str, int, float)) else str(v) for k, v in software.items() if v is not None}


SLURM_ENV = ("SLURM_JOB_NAME", "SLURM_JOB_PARTITION", "SLURM_JOB_NODELIST", "SLURM_JOB_NUM_NODES", "SLURM_NTASKS",
             "SLURM_CPUS_PER_TASK", "SLURM_JOB_ACCOUNT", "SLURM_JOB_QOS", "SLURM_GPUS_ON_NODE")


def _slurm(topo: dict[str, Any], env: dict[str, Any]) -> dict[str, Any]:
    """The allocation: job, step, array, requeues and the SLURM_* variables the rank saw."""
    if not topo.get("job_id"):
        return {}
    found = {k: topo.get(k) for k in ("job_id", "step_id", "array_id", "requeue_count") if topo.get(k) is not None}
    launcher_env = env.get("launcher_env") or {}
    found.update({k: launcher_env[k] for k in SLURM_ENV if k in launcher_env})
    return found


# -- charts ----------------------------------------------------------------------------------
def _groups(run: MergedRun, table: str) -> list[tuple[GroupSummary | None, list[SeriesSummary]]]:
    """Each chart: a cross-rank group and its series (a lone series has no group row)."""
    by_index = {s.index: s for s in run.series if s.dataset == f"/{table}/rows"}
    charts, grouped = [], set()
    for g in run.groups:
        if g.table == table:
            members = [by_index[i] for i in g.series if i in by_index and by_index[i].count]
            grouped.update(g.series)
            if members:
                charts.append((g, members))
    for s in by_index.values():
        if s.index not in grouped and s.count:
            charts.append((None, [s]))
    return sorted(charts, key=lambda c: (c[1][0].key, c[1][0].context, c[1][0].source, c[1][0].attempt))


def _line_order(members: list[SeriesSummary], group: GroupSummary | None, incomplete: set) -> list[SeriesSummary]:
    """Which ranks get a stored line when there are more than ``MAX_LINES``: incomplete ranks,
    the slowest ones, the outliers at the last value, then the lowest ranks."""
    if len(members) <= MAX_LINES:
        return members
    slow = group.slowest_counts if group else {}
    lasts = np.array([s.last for s in members], dtype=float)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        median = np.nanmedian(lasts) if np.isfinite(lasts).any() else 0.0
    far = np.nan_to_num(np.abs(lasts - median), nan=0.0)
    ranked = sorted(range(len(members)), key=lambda i: (
        (members[i].rank, members[i].attempt) not in incomplete, -slow.get(members[i].rank, 0), -far[i],
        members[i].rank))
    lead = ranked[:MAX_LINES // 2]
    rest = sorted(set(range(len(members))) - set(lead), key=lambda i: (members[i].rank, members[i].attempt))
    return [members[i] for i in sorted(lead + rest[:MAX_LINES - len(lead)],
                                       key=lambda i: (members[i].rank, members[i].attempt))]


def _line_label(s: SeriesSummary) -> str:
    who = f"rank {s.rank}" if s.attempt <= 0 else f"rank {s.rank}.{s.attempt}"
    scope, device = s.extra.get("scope"), str(s.extra.get("device", ""))
    if scope == "node" and device:
        return f"{device} (rank {s.rank})"
    if scope == "gpu" and device:
        return f"{who} {device[:16]}"
    return who


def _chart(f: h5py.File, run: MergedRun, chart: tuple[GroupSummary | None, list[SeriesSummary]],
           t0: float) -> dict[str, Any]:
    group, members = chart
    first = members[0]
    by_time = first.dataset.startswith("/system/")
    incomplete = {(r.rank, r.attempt) for r in run.ranks if not r.complete}
    lines, step_time = [], None
    for s in _line_order(members, group, incomplete):
        points = series_points(f, s.dataset, s.row_start, s.row_stop, LINE_READ)
        steps, times, values = points["step"].astype(float), points["time"] - t0, points["value"]
        order = np.argsort(times if by_time else steps, kind="stable")
        x = (times if by_time else steps)[order]
        if step_time is None and by_time:
            step_time = (steps[order], x)
        x, y = minmax_points(x, values[order], LINE_BUCKETS)
        lines.append({"label": _line_label(s), "rank": s.rank, "attempt": s.attempt, "count": s.count,
                      "incomplete": (s.rank, s.attempt) in incomplete, "x": compact(x), "y": compact(y)})
    band = None
    if group is not None and group.stat_stop > group.stat_start:
        stats = f[group.dataset][group.stat_start:group.stat_stop]
        x = stats["step"].astype(float)
        if step_time is not None:  # system samples: place each sample index at its time
            x = np.interp(x, *step_time)
        bx, low, mean, high = band_buckets(x, stats["min"], stats["mean"], stats["max"], BAND_POINTS)
        band = {"x": compact(bx), "min": compact(low), "mean": compact(mean), "max": compact(high),
                "steps": int(group.stat_stop - group.stat_start)}
    ranks = sorted({s.rank for s in members})
    return {"key": first.key, "context": first.context, "source": first.source, "attempt": first.attempt,
            "unit": str(first.extra.get("unit", "")), "scope": str(first.extra.get("scope", "")),
            "by_time": by_time, "series": len(members), "ranks": len(ranks), "points": sum(s.count for s in members),
            "nonfinite": sum(s.nonfinite for s in members), "band": band, "lines": lines,
            "omitted_lines": len(members) - len(lines)}


# -- stragglers ------------------------------------------------------------------------------
def _stragglers(f: h5py.File, run: MergedRun) -> dict[str, Any]:
    groups = [g for g in run.groups if g.table == "metrics" and g.multi_rank_steps > 0]
    overall: Counter[int] = Counter()
    for g in groups:
        overall.update(g.slowest_counts)
    table = [{"key": g.key, "context": g.context, "attempt": g.attempt, "steps": g.multi_rank_steps,
              "slowest": g.slowest_rank, "share": g.slowest_steps, "skew_mean": _num(g.skew_mean),
              "skew_max": _num(g.skew_max), "skew_max_step": g.skew_max_step} for g in groups]
    slowest = sorted(overall.items(), key=lambda rn: (-rn[1], rn[0]))[:20]
    found: dict[str, Any] = {"groups": table[:MAX_ROWS], "slowest": [[r, n] for r, n in slowest]}
    if not groups:
        return found
    main = max(groups, key=lambda g: (g.multi_rank_steps, -g.index))
    stats = f[main.dataset][main.stat_start:main.stat_stop]
    x, _, mean, high = band_buckets(stats["step"].astype(float), stats["skew"], stats["skew"], stats["skew"],
                                    BAND_POINTS)
    found["skew"] = {"key": main.key, "context": main.context, "x": compact(x), "mean": compact(mean),
                     "max": compact(high)}
    found["heat"] = _heat(f, run, main)
    return found


def _heat(f: h5py.File, run: MergedRun, group: GroupSummary) -> dict[str, Any]:
    """Rank x step: how far behind the step's first rank each rank logged it (seconds), the
    mean lag of each cell when ranks or steps are bucketed (a rank late at every step shows as
    a dark row; the worst single step is in the skew chart)."""
    members = [s for s in run.series if s.dataset == "/metrics/rows" and s.index in set(group.series) and s.count]
    per_series = max(2, HEAT_READ // max(1, len(members)))
    start, stop = min(s.row_start for s in members), max(s.row_stop for s in members)
    if stop - start <= HEAT_READ:  # the group's rows are contiguous: one read, not one per series
        rows = f[members[0].dataset][start:stop]
        rows = rows[np.isin(rows["series"], [s.index for s in members])]
    else:
        rows = np.concatenate([series_points(f, s.dataset, s.row_start, s.row_stop, per_series) for s in members])
    finite = np.isfinite(rows["time"])
    rows = rows[finite]
    steps, inverse = np.unique(rows["step"], return_inverse=True)
    earliest = np.full(len(steps), np.inf)
    np.minimum.at(earliest, inverse, rows["time"])
    lag = rows["time"] - earliest[inverse]
    ranks = np.unique(rows["rank"])
    rank_bucket = max(1, -(-len(ranks) // HEAT_RANKS))
    step_bucket = max(1, -(-len(steps) // HEAT_STEPS))
    row_of = np.searchsorted(ranks, rows["rank"]) // rank_bucket
    col_of = inverse // step_bucket
    shape = (int(row_of.max()) + 1, int(col_of.max()) + 1)
    total, count = np.zeros(shape), np.zeros(shape)
    np.add.at(total, (row_of, col_of), lag)
    np.add.at(count, (row_of, col_of), 1)
    with np.errstate(invalid="ignore"):
        cells = np.where(count > 0, total / np.maximum(count, 1), np.nan)  # the mean lag: a late rank stands out
    return {"key": group.key, "context": group.context,
            "rank_labels": [ranks_text(ranks[i:i + rank_bucket].tolist()) for i in range(0, len(ranks), rank_bucket)],
            "step_labels": [_span(steps[i:i + step_bucket]) for i in range(0, len(steps), step_bucket)],
            "cells": [compact(row) for row in cells], "thinned": stop - start > HEAT_READ}


def _ranks(ranks: Iterable[int]) -> str:
    """``0-3,5`` cut to ``MAX_TEXT`` characters (ranks that alternate would otherwise be long)."""
    text = ranks_text(ranks)
    return text if len(text) <= MAX_TEXT else text[:MAX_TEXT - 1] + "…"


def _span(steps: np.ndarray) -> str:
    return str(int(steps[0])) if len(steps) == 1 else f"{int(steps[0])}-{int(steps[-1])}"


def _num(v: float) -> float | None:
    return None if math.isnan(v) else float(v)


# -- energy, params, artifacts -------------------------------------------------------------------
def _energy(run: MergedRun) -> dict[str, Any]:
    def fields(e: Any) -> dict[str, float]:
        return {k: v for k, v in e.fields.items() if k.endswith("joules") and "." not in k}
    job = next((fields(e) for e in run.energy if e.scope == "job"), {})
    nodes = [{"name": e.name, **fields(e)} for e in run.energy if e.scope == "node"]
    ranks = sorted(({"name": e.name, **fields(e)} for e in run.energy if e.scope == "rank"),
                   key=lambda e: int(e["name"]) if str(e["name"]).isdigit() else -1)
    return {"job": job, "nodes": nodes[:MAX_ROWS], "ranks": ranks}


def _params(run: MergedRun) -> dict[str, Any]:
    by_key: dict[str, list] = defaultdict(list)
    for p in run.params:
        by_key[p.key].append(p)
    rows = []
    for key in sorted(by_key):
        values = sorted(by_key[key], key=lambda p: not p.majority)
        for p in values:
            value = p.value if isinstance(p.value, str) else json.dumps(p.value)
            rows.append({"key": key[:MAX_TEXT], "value": value[:MAX_TEXT * 4],
                         "ranks": _ranks(p.ranks), "count": len(p.ranks), "majority": p.majority,
                         "disagree": len(values) > 1})
    return {"rows": rows[:MAX_ROWS], "total": len(rows), "keys": len(by_key),
            "disagree": sum(len(v) > 1 for v in by_key.values())}


def _artifacts(run: MergedRun) -> dict[str, Any]:
    rows = [{"name": a.name[:MAX_TEXT], "item": a.item, "size": a.size, "sha256": a.sha256,
             "path": a.path[:MAX_TEXT * 2],
             "present": a.present, "ranks": _ranks({g.rank for g in a.generations}),
             "models": sorted({f"{g.model_name} v{g.version}" for g in a.generations
                               if g.model_name and g.version >= 0})}
            for a in sorted(run.artifacts, key=lambda a: (a.item, a.name, a.sha256))]
    return {"rows": rows[:MAX_ROWS], "total": len(rows), "bytes": sum(a.size for a in run.artifacts),
            "missing": sum(a.present == 0 for a in run.artifacts)}
