"""``prov4ml-dist summary``: a merged run at a glance, for a person at a terminal.

Everything comes from the small tables of ``merged.h5`` (never the points), and every line
fits 100 columns. Up to ``--max-ranks`` ranks are listed one by one; a bigger job is shown
aggregated across ranks (min / mean / max) with only its outliers named.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import textwrap
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path

from ..merge import MergedRun
from ..merge.layout import STAMP_ATTR, STATUS_NOT_LOGGING
from ..merge.means import mean_of
from ..merge.model import Artifact, RankAttempt, SeriesSummary
from ..shard.schema import attempt_label
from .output import WIDTH, clip, clock, duration, number, rank_attempt, ranks_text, size, table
from .rundir import absent_sensors, load_run, open_merged, run_directory

MAX_RANKS = 8
MAX_LISTED = 12  # rows of a list (problems, incomplete ranks, nodes) before "… and N more"
OUTLIER_MADS = 5.0  # a rank's last value this many (scaled) median absolute deviations away is an outlier
PRESENT = {1: "yes", 0: "MISSING", -1: "external"}


def register(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = commands.add_parser("summary", parents=[common], help="a merged run at a glance",
                            description="Ranks, nodes, GPUs, duration, params, metrics (last/min/max), energy, "
                                        "stragglers, artifacts, model versions and incomplete ranks of a merged "
                                        "run, read from its merged.h5.")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a merged run directory (or its merged.h5)")
    p.add_argument("--max-ranks", type=int, default=MAX_RANKS, metavar="N",
                   help=f"list ranks one by one up to N ranks, aggregate above (default {MAX_RANKS})")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    run_dir = run_directory(args.run_dir)
    merged = load_run(run_dir)
    with open_merged(run_dir) as f:
        stamp = _stamp(f.attrs.get(STAMP_ATTR))
    for line in render(merged, run_dir, stamp, args.max_ranks):
        print(clip(line, WIDTH))
    return 0


def render(run: MergedRun, run_dir: Path, stamp: dict, max_ranks: int = MAX_RANKS) -> list[str]:
    """The summary as lines (each command prints; tests read)."""
    per_rank = len({r.rank for r in run.ranks}) <= max_ranks
    lines = _overview(run, run_dir, stamp)
    for section in (_params(run), _series(run, "metrics", per_rank), _series(run, "system", per_rank),
                    _datasets(run), _sample_indices(run_dir),
                    _energy(run, max_ranks), _stragglers(run), _artifacts(run, per_rank), _models(run),
                    _unfinished(run), _problems(run)):
        if section:
            lines += ["", *section]
    return lines


# -- overview ----------------------------------------------------------------------------
def _stamp(value: object) -> dict:
    try:
        stamp = json.loads(value)
    except (TypeError, ValueError):
        return {}
    return stamp if isinstance(stamp, dict) else {}


def _overview(run: MergedRun, run_dir: Path, stamp: dict) -> list[str]:
    present = [r for r in run.ranks if r.attempt >= 0]
    first = present[0].topology if present else {}
    launcher = first.get("launcher") or "-"
    job = f" (job {first['job_id']})" if first.get("job_id") else ""
    states = Counter(r.status if r.status == STATUS_NOT_LOGGING else "complete" if r.complete else r.status
                     for r in run.ranks)
    merged_at = stamp.get("merged_at")
    return [
        f"Run          {run.run_id}",
        f"Experiment   {run.experiment_name}    user {run.user or '-'}    launcher {launcher}{job}",
        f"Directory    {run_dir}",
        f"Time         {clock(run.start_time)}  for {_span(run.start_time, run.end_time)}",
        f"Ranks        {len({r.rank for r in run.ranks})} of world size {run.world_size}: "
        + ", ".join(f"{n} {s}" for s, n in sorted(states.items())),
        f"Nodes        {_nodes(present)}",
        *_gpus(run, present),
        f"Merged       {clock(merged_at) if isinstance(merged_at, (int, float)) else '-'}"
        f" by prov4ml-dist {stamp.get('version', '?')}; {len(run.problems)} problem(s)",
    ]


def _span(start: float | None, end: float | None) -> str:
    return duration(end - start) if start is not None and end is not None else "-"


def _nodes(ranks: list[RankAttempt]) -> str:
    by_host: dict[str, set[int]] = defaultdict(set)
    for r in ranks:
        by_host[r.hostname or "?"].add(r.rank)
    if not by_host:
        return "none"
    hosts = sorted(by_host, key=lambda h: min(by_host[h]))
    if len(hosts) <= 4:
        return f"{len(hosts)}: " + ", ".join(f"{h} (ranks {ranks_text(by_host[h])})" for h in hosts)
    counts = sorted(len(v) for v in by_host.values())
    return (f"{len(hosts)}, {counts[0]}-{counts[-1]} ranks each: " + ", ".join(hosts[:3])
            + f", … {hosts[-1]}")


def _gpus(run: MergedRun, ranks: list[RankAttempt]) -> list[str]:
    uuids = {u for r in ranks for u in r.gpu_uuids}
    if uuids:
        nodes = {r.hostname for r in ranks if r.gpu_uuids}
        return [f"GPUs         {len(uuids)} on {len(nodes)} node(s)"]
    return _none("GPUs", "none recorded", *absent_sensors(run, "nvml"))


def _none(title: str, headline: str, absent: str, reasons: list[str]) -> list[str]:
    """A line saying what was not measured and why, the reasons in full on indented lines."""
    indent = " " * 13
    return [f"{title:<13}{headline}" + (f" ({absent})" if absent else ""),
            *(line for reason in reasons for line in textwrap.wrap(
                reason, WIDTH, initial_indent=indent, subsequent_indent=indent + "  ", break_on_hyphens=False))]


# -- params ------------------------------------------------------------------------------
def _params(run: MergedRun) -> list[str]:
    by_key: dict[str, list] = defaultdict(list)
    for p in run.params:
        by_key[p.key].append(p)
    if not by_key:
        return []
    rows = []
    logging = {r.rank for r in run.ranks if r.status not in ("missing", STATUS_NOT_LOGGING)}
    for key in sorted(by_key):
        values = sorted(by_key[key], key=lambda p: not p.majority)
        for n, p in enumerate(values):
            shown = p.value if isinstance(p.value, str) else json.dumps(p.value)
            if len(values) > 1:
                who = f"{'' if p.majority else '! '}ranks {ranks_text(p.ranks)}"
            else:  # "all" only where every rank that logged said it, not where only rank 0 did
                who = "all" if logging <= set(p.ranks) else f"ranks {ranks_text(p.ranks)}"
            rows.append((key if n == 0 else "", shown, who))
    disagree = sum(len(v) > 1 for v in by_key.values())
    title = f"Params ({len(by_key)}" + (f"; {disagree} differ across ranks, marked !)" if disagree else ")")
    return [title, *table(("key", "value", "ranks"), rows, flex=1)]


# -- metric and system series ------------------------------------------------------------
def _unit(s: SeriesSummary) -> str:
    return str(s.extra.get("unit", ""))


def _formatter(unit: str) -> Callable[[float], str]:
    if unit in ("B", "B/s"):
        per = unit[1:]
        return lambda v: "-" if math.isnan(v) else size(v) + per
    suffix = "" if unit in ("", "1") else f" {unit}"
    return lambda v: "-" if math.isnan(v) else number(v) + suffix


def _series(run: MergedRun, table_name: str, per_rank: bool) -> list[str]:
    groups: dict[tuple[str, str, str], list[SeriesSummary]] = defaultdict(list)
    for s in run.series:
        if s.dataset.split("/")[1] == table_name:
            groups[(s.key, s.context, s.source)].append(s)
    if not groups:
        return []
    metrics = table_name == "metrics"
    second = "context" if metrics else "unit"
    title = "Metrics" if metrics else "System series"
    rows, outliers = [], []
    for (key, context, _), members in sorted(groups.items()):
        label = context if metrics else _unit(members[0])
        fmt = _formatter(_unit(members[0]))
        if per_rank:
            rows += [(key, label, _who(s), str(s.count), f"{s.first_step}-{s.last_step}" if s.count else "-",
                      fmt(s.last), fmt(s.min), fmt(s.max)) for s in members]
            continue
        lasts = [s.last for s in members if s.count and not math.isnan(s.last)]
        rows.append((key, label, str(len({s.rank for s in members})), str(sum(s.count for s in members)),
                     *((fmt(min(lasts)), fmt(mean_of(lasts)), fmt(max(lasts))) if lasts else ("-",) * 3),
                     fmt(_nanmin(s.min for s in members)), fmt(_nanmax(s.max for s in members))))
        outliers += [f"  {key} ({label}): {o}" for o in _outliers(members, fmt)]
    if per_rank:
        head = ("key", second, "rank", "points", "steps", "last", "min", "max")
        lines = [f"{title}: last / min / max per rank", *table(head, rows, numeric=(2, 3, 5, 6, 7))]
    else:
        head = ("key", second, "ranks", "points", "last:min", "last:mean", "last:max", "min", "max")
        lines = [f"{title}: last value across ranks (min / mean / max), overall min and max",
                 *table(head, rows, numeric=(2, 3, 4, 5, 6, 7, 8))]
    if outliers:
        lines += [f"Outliers (last value over {OUTLIER_MADS:g} MADs from the ranks' median):",
                  *_capped(outliers)]
    return lines


def _who(s: SeriesSummary) -> str:
    return rank_attempt(s.rank, s.attempt)


def _nanmin(values: Iterable[float]) -> float:
    return min((v for v in values if not math.isnan(v)), default=math.nan)


def _nanmax(values: Iterable[float]) -> float:
    return max((v for v in values if not math.isnan(v)), default=math.nan)


def _outliers(members: list[SeriesSummary], fmt: Callable[[float], str]) -> list[str]:
    """Ranks whose last value is far from the others' (median and MAD: robust to the outliers
    themselves), and ranks that logged fewer points than most."""
    found = []
    lasts = [(s, s.last) for s in members if s.count and not math.isnan(s.last)]
    if len(lasts) >= 3:
        median = statistics.median(v for _, v in lasts)
        mad = 1.4826 * statistics.median(abs(v - median) for _, v in lasts)
        found += [f"rank {_who(s)} last {fmt(v)} (median {fmt(median)})" for s, v in lasts
                  if mad > 0 and abs(v - median) > OUTLIER_MADS * mad]
    usual = Counter(s.count for s in members).most_common(1)[0][0]
    found += [f"rank {_who(s)} has {s.count} points (most have {usual})" for s in members if s.count < usual]
    return found


# -- datasets ----------------------------------------------------------------------------
def _datasets(run: MergedRun) -> list[str]:
    """One row per label: what it is, its size, and each rank's share (a DistributedSampler's)."""
    by_label: dict[str, list] = defaultdict(list)
    for d in run.datasets:
        by_label[d.name].append(d)
    rows = []
    for label in sorted(by_label):
        members = by_label[label]
        stats = [d.fields.get("stats") if isinstance(d.fields.get("stats"), dict) else {} for d in members]
        fields = stats[0]
        kind = str(fields.get("dataset_type") or fields.get("type") or "?").rsplit(".", 1)[-1]
        shares = sorted({s["rank_samples"] for s in stats if isinstance(s.get("rank_samples"), int)})
        share = "-" if not shares else number(shares[0]) if len(shares) == 1 else f"{shares[0]}-{shares[-1]}"
        total = number(fields["total_samples"]) if isinstance(fields.get("total_samples"), int) else "-"
        rows.append((label, kind, total, ranks_text({d.rank for d in members}), share,
                     str(fields.get("batch_size", "-")), str(fields.get("num_batches", "-"))))
    if not rows:
        return []
    return [f"Datasets ({len(rows)})", *table(("label", "type", "samples", "ranks", "per rank", "batch", "batches"),
                                               rows, numeric=(2, 4, 5, 6), flex=1)]


def _sample_indices(run_dir: Path) -> list[str]:
    """Which ranks consumed which samples (IndexedDatasetWrapper): disjoint? the whole dataset?"""
    from ..compat.indices import coverage_of_merged, describe_coverage
    from ..merge.layout import MERGED_NAME

    merged = run_dir / MERGED_NAME
    entries = coverage_of_merged(merged) if merged.is_file() else []
    if not entries:
        return []
    lines = ["  " + describe_coverage(e) for e in entries]
    return ["Sample indices per epoch (IndexedDatasetWrapper)", *_capped(lines)]


# -- energy ------------------------------------------------------------------------------
def _energy(run: MergedRun, max_ranks: int) -> list[str]:
    # Totals only: the per-GPU and per-RAPL-domain fields ("gpu.<uuid>.joules") are for PROV.
    fields = sorted({f for e in run.energy for f in e.fields if f.endswith("joules") and "." not in f})
    if not any(e.fields.get(f) for e in run.energy for f in fields):
        return _none("Energy", "none measured", *absent_sensors(run, "nvml", "rapl"))
    rows = []
    for scope in ("rank", "node", "job"):
        members = [e for e in run.energy if e.scope == scope]
        if len(members) > max(max_ranks, 1):
            for label, pick in (("min", min), ("mean", mean_of), ("max", max)):
                rows.append((f"{scope} ({len(members)})", label, *(
                    _joules(pick(values)) if values else "-"
                    for values in ([e.fields[f] for e in members if f in e.fields] for f in fields))))
            continue
        members.sort(key=lambda e: int(e.name) if scope == "rank" else e.name)
        rows += [(scope, e.name or "job", *(_joules(e.fields.get(f, math.nan)) for f in fields)) for e in members]
    return ["Energy", *table(("scope", "name", *fields), rows, numeric=tuple(range(2, 2 + len(fields))), flex=1)]


def _joules(value: float) -> str:
    if math.isnan(value):
        return "-"
    for unit, scale in (("MJ", 1e6), ("kJ", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.4g} {unit}"
    return f"{value:.4g} J"


# -- stragglers --------------------------------------------------------------------------
def _stragglers(run: MergedRun) -> list[str]:
    groups = [g for g in run.groups if g.table == "metrics" and g.multi_rank_steps]
    if not groups:
        return []
    rows = []
    overall: Counter = Counter()
    for g in sorted(groups, key=lambda g: (g.key, g.context, g.attempt)):
        overall.update(g.slowest_counts)
        rows.append((g.key, g.context, str(g.multi_rank_steps), str(g.slowest_rank),
                     f"{g.slowest_steps}/{g.multi_rank_steps}", _short(g.skew_mean),
                     f"{_short(g.skew_max)} @{g.skew_max_step}"))
    top = ", ".join(f"rank {r} ({n})" for r, n in sorted(overall.items(), key=lambda rc: (-rc[1], rc[0]))[:3])
    return ["Stragglers: the rank logging a step last, and the spread of its wall-clock times (skew)",
            *table(("key", "context", "steps", "slowest", "share", "mean skew", "max skew @step"), rows,
                   numeric=(2, 3, 4, 5, 6)),
            f"  slowest most often: {top}"]


def _short(seconds: float) -> str:
    if math.isnan(seconds):
        return "-"
    return f"{seconds * 1000:.3g} ms" if abs(seconds) < 1 else duration(seconds)


# -- artifacts and models ----------------------------------------------------------------
def _artifacts(run: MergedRun, per_rank: bool) -> list[str]:
    if not run.artifacts:
        return []
    kinds = Counter(a.item for a in run.artifacts)
    missing = sum(a.present == 0 for a in run.artifacts)
    title = (f"Artifacts: {len(run.artifacts)} distinct contents, {size(sum(a.size for a in run.artifacts))} ("
             + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) + f"); {missing} missing")
    if per_rank:
        rows = [(a.name, a.item, size(a.size), ranks_text(g.rank for g in a.generations), PRESENT[a.present],
                 a.sha256[:12]) for a in sorted(run.artifacts, key=_artifact_order)]
        return [title, *table(("name", "kind", "size", "ranks", "present", "sha256"), rows, numeric=(2,))]
    by_name: dict[tuple[str, str], list[Artifact]] = defaultdict(list)
    for a in run.artifacts:
        by_name[(a.name, a.item)].append(a)
    rows = [(name, item, str(len({g.rank for a in group for g in a.generations})), str(len(group)),
             size(sum(a.size for a in group)), str(sum(a.present == 0 for a in group)))
            for (name, item), group in sorted(by_name.items(), key=lambda kv: (kv[0][1], kv[0][0]))]
    return [title, *table(("name", "kind", "ranks", "contents", "size", "missing"), rows, numeric=(2, 3, 4, 5))]


def _artifact_order(a: Artifact) -> tuple:
    return a.item, a.name, min((g.rank for g in a.generations), default=-1)


def _models(run: MergedRun) -> list[str]:
    versions: dict[str, set[int]] = defaultdict(set)
    savers: dict[str, set[int]] = defaultdict(set)
    for a in run.artifacts:
        for g in a.generations:
            if g.model_name:
                savers[g.model_name].add(g.rank)
                if g.version >= 0:
                    versions[g.model_name].add(g.version)
    described = {m.name: m.fields for m in run.models}
    names = sorted(set(savers) | set(described))
    if not names:
        return []
    lines = ["Models"]
    for name in names:
        info = described.get(name, {})
        params = info.get("parameters")
        kind = str(info.get("class", "")).rsplit(".", 1)[-1]
        parts = [f"{params:,} parameters" if isinstance(params, int) else "", kind,
                 f"versions {ranks_text(versions[name])}" if versions[name] else "no versions",
                 f"saved by ranks {ranks_text(savers[name])}" if savers[name] else ""]
        lines.append(f"  {name}: " + ", ".join(p for p in parts if p))
    return lines


# -- what did not finish -----------------------------------------------------------------
def _unfinished(run: MergedRun) -> list[str]:
    lines = []
    incomplete = [r for r in run.ranks if r.status != "missing" and not r.complete]
    if incomplete:
        end = run.end_time
        rows = [(str(r.rank), attempt_label(r.attempt) or "first", r.hostname, clock(r.last_time),
                 duration(end - r.last_time) if end is not None and r.last_time is not None else "-", r.shard)
                for r in incomplete]
        lines += [f"Incomplete ranks ({len(incomplete)}): no end_run; merged up to their last flush",
                  *_capped(table(("rank", "attempt", "node", "last seen", "before end", "shard"), rows,
                                 numeric=(0, 4), flex=2), MAX_LISTED + 1)]
    missing = [r for r in run.ranks if r.status == "missing"]
    if missing:
        why = Counter(r.reason for r in missing)
        lines += [f"Missing ranks ({len(missing)}): no shard merged",
                  *(f"  ranks {ranks_text(r.rank for r in missing if r.reason == reason)}: {reason}"
                    for reason in why)]
    silent = [r for r in run.ranks if r.status == STATUS_NOT_LOGGING]
    if silent:  # a choice, not a failure: listed so that no one looks for their data
        why = Counter(r.reason for r in silent)
        lines += [f"Not logging ({len(silent)}): ended as planned, recording nothing by choice",
                  *(f"  ranks {ranks_text(r.rank for r in silent if r.reason == reason)}: {reason}"
                    for reason in why)]
    return lines


def _problems(run: MergedRun) -> list[str]:
    if not run.problems:
        return []
    return [f"Problems reported by the merge ({len(run.problems)})", *_capped([f"  - {p}" for p in run.problems])]


def _capped(lines: list[str], limit: int = MAX_LISTED) -> list[str]:
    return lines if len(lines) <= limit else [*lines[:limit], f"  … and {len(lines) - limit} more"]
