"""What each PROV record says: the attributes of a rank's agent and activity, its software, a
series, a key across ranks, cross-rank statistics, a content and a file. Pure functions of the
merged run's model, so the builder (``builder.py``) only decides which records exist and how
they relate."""

from __future__ import annotations

import math
import shlex
from collections import defaultdict
from collections.abc import Iterator
from operator import attrgetter
from typing import Any

from ..merge.layout import STATUS_NOT_LOGGING
from ..merge.model import Artifact, Generation, GroupSummary, RankAttempt, SeriesSummary
from ..shard import schema
from .terms import flat, keys, p4d, timestamp

# series extras the library itself writes (sampler): vocabulary terms; any other extra is a user key
KNOWN_EXTRAS = ("unit", "device", "scope", "sensor", "sampled_by")

def as_dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def value_attrs(value: Any) -> list[tuple[str, Any]]:
    """A param value: prov:value for a scalar; a structured one as one key: attribute per leaf."""
    if isinstance(value, (dict, list)):
        return keys(("value." + path if path else "value", leaf) for path, leaf in flat(value))
    return [("prov:value", value)] if value is not None else [("p4d:null", True)]


def software_pairs(r: RankAttempt) -> list[tuple[str, Any]]:
    env = r.environment
    software, versions = as_dict(env.get("software")), as_dict(env.get("versions"))
    container = as_dict(software.get("container"))
    drivers = sorted({s.get("driver_version") for s in r.sensors if isinstance(s.get("driver_version"), str)})
    pairs = [("python", env.get("python")), ("implementation", env.get("implementation")),
             ("platform", env.get("platform")), ("executable", env.get("executable")), ("torch", env.get("torch")),
             ("cuda", env.get("cuda")), ("nccl", software.get("nccl")), ("mpi", software.get("mpi")),
             ("nvidia_driver", drivers[0] if drivers else None),
             *((f"version_{name.replace('-', '_')}", versions.get(name)) for name in sorted(_PACKAGES)),
             ("container_runtime", container.get("runtime")), ("container_image", container.get("container")),
             ("container_name", container.get("name")), ("container_version", container.get("version"))]
    return [(k, v) for k, v in pairs if isinstance(v, str)]


_PACKAGES = ("prov4ml-dist", "h5py", "numpy", "prov", "psutil")


def sensor_reasons(ranks: list[RankAttempt]) -> dict[str, dict[str, list[str]]]:
    """host → energy part → why its sensor was unavailable, from the ranks' sensor records."""
    found: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for r in ranks:
        for s in r.sensors:
            name = str(s.get("name", ""))
            part = "gpu_joules" if name == "nvml" or name.startswith("gpu") else "rapl_joules" if name == "rapl" else ""
            if part and s.get("available") is False and s.get("reason"):
                found[r.hostname][part].add(str(s["reason"]))
    return {host: {part: sorted(v) for part, v in parts.items()} for host, parts in found.items()}


def agent_attrs(attempts: list[RankAttempt]) -> Iterator[tuple[str, Any]]:
    first = attempts[0]
    topology = first.topology
    yield "rank", first.rank
    yield "status", "missing" if first.status == "missing" else STATUS_NOT_LOGGING if all(
        a.status == STATUS_NOT_LOGGING for a in attempts) else (
        "complete" if all(a.complete for a in attempts) else "incomplete")
    for name in ("local_rank", "node_rank", "local_world_size", "world_size", "hostname", "launcher",
                 "job_id", "array_id", "step_id", "elastic_run_id"):
        value = topology.get(name)
        yield name, value if isinstance(value, (int, str)) and not isinstance(value, bool) else None
    if first.attempt >= 0:  # the most torchrun restarts within one run of the job, and Slurm requeues
        requeues, restarts = zip(*(divmod(a.attempt, schema.RESTARTS_PER_REQUEUE) for a in attempts), strict=True)
        yield "restart_count", max(restarts)
        yield "requeue_count", max(requeues) or None
    yield "pid", [a.topology["pid"] for a in attempts if isinstance(a.topology.get("pid"), int)]
    yield "gpu_uuid", sorted({u for a in attempts for u in a.gpu_uuids})


def rank_attrs(r: RankAttempt) -> Iterator[tuple[str, Any]]:
    yield "rank", r.rank
    yield "attempt", r.attempt if r.attempt >= 0 else None
    yield "status", r.status
    yield "complete", r.complete
    yield "shard", r.shard or None
    yield "shard_sha256", r.shard_sha256 or None
    yield "reason", r.reason or None
    yield "last_seen", None if r.complete or r.last_time is None else timestamp(r.last_time)
    yield "warnings", r.warnings or None
    argv = r.environment.get("argv")
    if isinstance(argv, list) and all(isinstance(a, str) for a in argv):
        yield "command_line", shlex.join(argv)
    yield "sensor_available", sorted({str(s.get("name")) for s in r.sensors if s.get("available") is True})
    yield "sensor_unavailable", sorted({f"{s.get('name')}: {s.get('reason')}" for s in r.sensors
                                        if s.get("available") is False})


def extra_attrs(extra: dict[str, Any]) -> list[tuple[str, Any]]:
    known = p4d((k, extra[k]) for k in KNOWN_EXTRAS if isinstance(extra.get(k), (str, int, float)))
    return known + keys(sorted((k, v) for k, v in flat({k: v for k, v in extra.items() if k not in KNOWN_EXTRAS})))


def series_attrs(s: SeriesSummary) -> list[tuple[str, Any]]:
    pairs: list[tuple[str, Any]] = [("key", s.key), ("context", s.context), ("source", s.source or None),
                                    ("rank", s.rank), ("attempt", s.attempt), ("count", s.count)]
    if s.count:
        pairs += [("first_step", s.first_step), ("last_step", s.last_step), ("min", s.min), ("max", s.max),
                  ("last", s.last), ("nonfinite", s.nonfinite or None), ("step_runs", s.runs if s.runs > 1 else None),
                  ("first_time", timestamp(s.first_time)), ("last_time", timestamp(s.last_time))]
    pairs += [("dataset", s.dataset), ("row_start", s.row_start), ("row_stop", s.row_stop)]
    return p4d(pairs) + extra_attrs(s.extra)


def key_series_attrs(g: GroupSummary, members: list[SeriesSummary]) -> list[tuple[str, Any]]:
    """A key across ranks: totals, and where its per-rank series are in merged.h5 (rows of the series table).
    Built-in reductions over ``map``: at 1,024 ranks x 2,000 keys they see 2 million series."""
    counted = members if all(map(_COUNT, members)) else [s for s in members if s.count]
    finite = [*filter(math.isfinite, map(_MIN, counted)), *filter(math.isfinite, map(_MAX, counted))]
    extras = {id(s.extra): s.extra for s in members}  # series with the same extras share one dict
    first = members[0].extra if members else {}
    shared = {k: v for k, v in first.items() if all(e.get(k) == v for e in extras.values())}
    series_table = members[0].dataset.rsplit("/", 1)[0] + "/series" if members else None
    pairs: list[tuple[str, Any]] = [
        ("key", g.key), ("context", g.context), ("source", g.source or None), ("attempt", g.attempt),
        ("ranks", len(g.series)), ("count", sum(map(_COUNT, members))),
        ("nonfinite", sum(map(_NONFINITE, members)) or None),
        ("first_step", min(map(_FIRST_STEP, counted), default=None)),
        ("last_step", max(map(_LAST_STEP, counted), default=None)),
        ("min", min(finite, default=None)), ("max", max(finite, default=None)), ("dataset", series_table),
        ("row_start", g.series[0] if g.series else 0), ("row_stop", g.series[-1] + 1 if g.series else 0),
        ("rows", members[0].dataset if members else None)]
    return p4d(pairs) + extra_attrs(shared)


_COUNT, _NONFINITE, _MIN, _MAX = attrgetter("count"), attrgetter("nonfinite"), attrgetter("min"), attrgetter("max")
_FIRST_STEP, _LAST_STEP = attrgetter("first_step"), attrgetter("last_step")


def group_attrs(g: GroupSummary) -> Iterator[tuple[str, Any]]:
    """Key, context, source and ranks are on the series entity the statistics are derived from."""
    yield from (("dataset", g.dataset), ("row_start", g.stat_start), ("row_stop", g.stat_stop),
                ("multi_rank_steps", g.multi_rank_steps))
    if g.multi_rank_steps:
        yield from (("slowest_rank", g.slowest_rank), ("slowest_steps", g.slowest_steps),
                    ("skew_mean", g.skew_mean), ("skew_max", g.skew_max), ("skew_max_step", g.skew_max_step))


SLURM_ALLOCATION = (
    "SLURM_JOB_ID", "SLURM_JOB_NAME", "SLURM_CLUSTER_NAME", "SLURM_JOB_PARTITION", "SLURM_JOB_ACCOUNT",
    "SLURM_JOB_QOS", "SLURM_JOB_NODELIST", "SLURM_JOB_NUM_NODES", "SLURM_NTASKS", "SLURM_NTASKS_PER_NODE",
    "SLURM_CPUS_PER_TASK", "SLURM_JOB_CPUS_PER_NODE", "SLURM_GPUS", "SLURM_GPUS_PER_NODE", "SLURM_GPUS_PER_TASK",
    "SLURM_MEM_PER_NODE", "SLURM_MEM_PER_CPU", "SLURM_SUBMIT_HOST", "SLURM_JOB_START_TIME", "SLURM_JOB_END_TIME",
)


def content_attrs(a: Artifact) -> Iterator[tuple[str, Any]]:
    yield from (("sha256", a.sha256), ("size", a.size), ("item", a.item), ("path", a.path),
                ("directory", a.directory or None), ("generators", len({g.rank for g in a.generations})))
    yield "present", {1: True, 0: False}.get(a.present)


def file_attrs(g: Generation) -> Iterator[tuple[str, Any]]:
    yield from (("rank", g.rank), ("attempt", g.attempt), ("name", g.name), ("path", g.path), ("item", g.item),
                ("model_name", g.model_name or None), ("version", g.version if g.version >= 0 else None),
                ("context", g.context or None), ("saved_at", timestamp(g.time)))
