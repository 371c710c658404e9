"""The merged run → a W3C PROV document (``prov.model.ProvDocument``).

Agents: the user (prov:Person) and one prov:SoftwareAgent per rank acting on the user's
behalf. Activities: the run; one per rank attempt (informed by the run); one per (rank
attempt, context). Entities: params, one per metric series (a summary and a pointer into
``merged.h5``, never points), cross-rank statistics with the straggler report, content-
addressed artifacts and model versions, datasets, model descriptions and energy. The
document's size grows with ranks, keys and artifacts, never with the number of points.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from typing import Any
from urllib.parse import quote

from prov.constants import PROV, PROV_LABEL, PROV_TYPE, PROV_VALUE, XSD_BOOLEAN, XSD_DOUBLE, XSD_LONG
from prov.model import Literal, ProvDocument, QualifiedName

from ..merge.journal import dumps
from ..merge.model import Artifact, GroupSummary, MergedRun, RankAttempt, RankRecord, SeriesSummary
from ..shard import schema

P4D_NAMESPACE = "https://prov4ml-dist.org/ns#"
XSD_NAMESPACE = "http://www.w3.org/2001/XMLSchema#"
DEFAULT_USER_NAMESPACE = "http://example.org/"
_IRI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:[^\s<>\"{}|\\^`]+")


def user_namespace_iri(value: str) -> str:
    """The user's namespace if it is an IRI (ending in / or #, so it can prefix names), else the default."""
    if not _IRI.fullmatch(value or ""):
        return DEFAULT_USER_NAMESPACE
    return value if value.endswith(("/", "#")) else value + "/"


def local_name(*parts: object) -> str:
    """A local name from parts joined by '.'; each part percent-encoded so any key is safe."""
    return ".".join(quote(str(part), safe="-_~").replace(".", "%2E") for part in parts)


def literal(value: Any) -> Any:
    """A typed PROV literal; NaN and infinities as xsd:double words, never JSON numbers."""
    if isinstance(value, bool):
        return Literal("true" if value else "false", XSD_BOOLEAN)
    if isinstance(value, int):
        return Literal(str(value), XSD_LONG) if -(1 << 63) <= value < 1 << 63 else str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return Literal("NaN", XSD_DOUBLE)
        if math.isinf(value):
            return Literal("INF" if value > 0 else "-INF", XSD_DOUBLE)
        return Literal(repr(value), XSD_DOUBLE)
    if isinstance(value, (str, datetime)):
        return value
    return dumps(value)


def timestamp(value: float | None) -> datetime | None:
    """A unix time as an aware datetime; None for a missing, non-finite or out-of-range one
    (a bit-flipped time column must not fail the merge)."""
    if value is None or not math.isfinite(value):
        return None
    try:
        return datetime.fromtimestamp(value, tz=timezone.utc)
    except (OverflowError, OSError, ValueError):
        return None


def attempt_name(rank: int, attempt: int) -> str:
    """Mirrors the shard names: ``rank-00003``, ``rank-00003.restart-1``, ``rank-00003.requeue-1``."""
    return schema.attempt_stem(rank, max(attempt, 0))


class _Builder:
    def __init__(self, run: MergedRun) -> None:
        self.run = run
        self.doc = ProvDocument()
        self.p4d = self.doc.add_namespace("p4d", P4D_NAMESPACE)
        self.doc.add_namespace("xsd", XSD_NAMESPACE)
        user_ns = user_namespace_iri(run.user_namespace)
        self.user_ns = self.doc.add_namespace("user", user_ns)
        self.ns = self.doc.add_namespace("run", f"{user_ns}{quote(run.run_id, safe='-_~.')}/")
        self.activities: dict[tuple[int, int], QualifiedName] = {}
        self.context_activities: dict[tuple[int, int, str], QualifiedName] = {}
        self.agent_of: dict[int, QualifiedName] = {}
        self.attr_names: dict[str, QualifiedName] = {}

    def attrs(self, pairs: Iterable[tuple[str, Any]]) -> list[tuple[QualifiedName, Any]]:
        """p4d attributes from (name, value) pairs; None values are left out."""
        return [(self._attr_name(name), literal(value)) for name, value in pairs if value is not None]

    def _attr_name(self, name: str) -> QualifiedName:
        """Cached: thousands of series share a dozen attribute names."""
        if name not in self.attr_names:
            self.attr_names[name] = self.p4d[local_name(name)]
        return self.attr_names[name]

    def build(self) -> ProvDocument:
        run = self.run
        user = self.doc.agent(self.user_ns[local_name(run.user or "user")],
                              [(PROV_TYPE, PROV["Person"]), (PROV_LABEL, run.user or "user")])
        self.run_activity = self.doc.activity(
            self.ns["run"], timestamp(run.start_time), timestamp(run.end_time),
            [(PROV_TYPE, self.p4d["Run"]), (PROV_LABEL, run.experiment_name), *self.attrs(self._run_attrs())])
        self.doc.wasAssociatedWith(self.run_activity, user)
        self._ranks(user)
        self._params()
        series_ids = self._series()
        self._groups(series_ids)
        self._artifacts()
        self._described("Dataset", "dataset", run.datasets, used=True)
        self._described("ModelDescription", "model", run.models, used=False)
        self._energy()
        return self.doc

    def _run_attrs(self) -> Iterator[tuple[str, Any]]:
        run = self.run
        yield "run_id", run.run_id
        yield "experiment_name", run.experiment_name
        yield "world_size", run.world_size
        incomplete = sorted({r.rank for r in run.ranks if not r.complete and r.status != "missing"})
        yield "incomplete_ranks", incomplete or None
        yield "missing_ranks", sorted({r.rank for r in run.ranks if r.status == "missing"}) or None
        yield "merged_file", "merged.h5"
        yield "problems", len(run.problems)
        launcher = next((r.environment.get("launcher_env") for r in run.ranks if r.environment), None)
        if isinstance(launcher, dict):  # the Slurm allocation the job ran in, as rank 0 saw it
            for name in SLURM_ALLOCATION:
                if isinstance(launcher.get(name), str):
                    yield name.lower(), launcher[name]

    def _ranks(self, user: Any) -> None:
        by_rank: dict[int, list[RankAttempt]] = defaultdict(list)
        for r in self.run.ranks:
            by_rank[r.rank].append(r)
        for rank, attempts in sorted(by_rank.items()):
            agent = self.doc.agent(self.ns[local_name(f"rank-{rank:05d}")],
                                   [(PROV_TYPE, PROV["SoftwareAgent"]), *self.attrs(self._agent_attrs(attempts))])
            self.doc.actedOnBehalfOf(agent, user)
            for r in attempts:
                activity = self.doc.activity(
                    self.ns[local_name("process", attempt_name(r.rank, r.attempt))], timestamp(r.start_time),
                    timestamp(r.end_time), [(PROV_TYPE, self.p4d["RankProcess"]), *self.attrs(self._rank_attrs(r))])
                self.doc.wasAssociatedWith(activity, agent)
                self.doc.wasInformedBy(activity, self.run_activity)
                self.activities[(r.rank, r.attempt)] = activity.identifier
            self.agent_of[rank] = agent.identifier

    def _agent_attrs(self, attempts: list[RankAttempt]) -> Iterator[tuple[str, Any]]:
        first = attempts[0]
        topology = first.topology
        yield "rank", first.rank
        yield "status", "missing" if first.status == "missing" else (
            "complete" if all(a.complete for a in attempts) else "incomplete")
        for name in ("local_rank", "node_rank", "local_world_size", "world_size", "hostname", "launcher",
                     "job_id", "array_id", "step_id", "elastic_run_id"):
            value = topology.get(name)
            yield name, value if isinstance(value, (int, str)) and not isinstance(value, bool) else None
        if first.attempt >= 0:  # the most torchrun restarts within one run of the job, and Slurm requeues
            requeues, restarts = zip(*(divmod(a.attempt, schema.RESTARTS_PER_REQUEUE) for a in attempts), strict=True)
            yield "restart_count", max(restarts)
            yield "requeue_count", max(requeues) or None
        for a in attempts:
            yield "pid", a.topology.get("pid") if isinstance(a.topology.get("pid"), int) else None
        for uuid in sorted({u for a in attempts for u in a.gpu_uuids}):
            yield "gpu_uuid", uuid

    def _rank_attrs(self, r: RankAttempt) -> Iterator[tuple[str, Any]]:
        yield "rank", r.rank
        yield "attempt", r.attempt if r.attempt >= 0 else None
        yield "status", r.status
        yield "complete", r.complete
        yield "shard", r.shard or None
        yield "shard_sha256", r.shard_sha256 or None
        yield "reason", r.reason or None
        yield "last_seen", None if r.complete or r.last_time is None else timestamp(r.last_time)
        yield "warnings", r.warnings or None
        for sensor in r.sensors:
            yield "sensor", sensor

    def _params(self) -> None:
        by_key: dict[str, list] = defaultdict(list)
        for p in self.run.params:
            by_key[p.key].append(p)
        for key, values in sorted(by_key.items()):
            agreed = next(p for p in values if p.majority)
            pairs: list[tuple[str, Any]] = [("key", key)]
            if len(values) > 1:
                pairs += [("disagreement", True),
                          ("disagreeing_ranks", sorted(r for p in values if not p.majority for r in p.ranks)),
                          ("values", [{"value": p.value, "ranks": list(p.ranks)} for p in values])]
            entity = self.doc.entity(self.ns[local_name("param", key)], [
                (PROV_TYPE, self.p4d["Param"]), (PROV_VALUE, literal(agreed.value)), *self.attrs(pairs)])
            self.doc.used(self.run_activity, entity)

    def _context_activity(self, rank: int, attempt: int, context: str) -> QualifiedName:
        """The (rank attempt, context) activity, made on first use."""
        key = (rank, attempt, context)
        if key not in self.context_activities:
            parent = self.activities[(rank, attempt)]
            activity = self.doc.activity(self.ns[local_name("process", attempt_name(rank, attempt), context)],
                                         other_attributes=[
                (PROV_TYPE, self.p4d["ContextActivity"]), *self.attrs([("context", context), ("rank", rank)])])
            self.doc.wasInformedBy(activity, parent)
            self.doc.wasAssociatedWith(activity, self.agent_of[rank])
            self.context_activities[key] = activity.identifier
        return self.context_activities[key]

    def _series(self) -> dict[tuple[str, int], QualifiedName]:
        ids: dict[tuple[str, int], QualifiedName] = {}
        used: set[str] = set()
        for s in self.run.series:
            table = s.dataset.split("/")[1]
            parts = [table, s.key, s.context, *([s.source] if s.source else []), attempt_name(s.rank, s.attempt)]
            name = local_name(*parts)
            name = name if name not in used else local_name(*parts, s.index)
            used.add(name)
            entity = self.doc.entity(self.ns[name], [
                (PROV_TYPE, self.p4d["SystemSeries" if table == "system" else "MetricSeries"]),
                (PROV_LABEL, s.key), *self.attrs(_series_attrs(s))])
            activity = (self._context_activity(s.rank, s.attempt, s.context) if s.context
                        else self.activities[(s.rank, s.attempt)])
            self.doc.wasGeneratedBy(entity, activity, timestamp(s.last_time))
            ids[(table, s.index)] = entity.identifier
        return ids

    def _groups(self, series_ids: dict[tuple[str, int], QualifiedName]) -> None:
        """Cross-rank statistics of groups logged by several ranks, and the job's straggler report."""
        overall: Counter = Counter()
        worst: GroupSummary | None = None
        for g in self.run.groups:
            if len(g.series) < 2:
                continue
            parts = ["crossrank", g.table, g.key, g.context, *([g.source] if g.source else []), f"attempt-{g.attempt}"]
            entity = self.doc.entity(self.ns[local_name(*parts)], [
                (PROV_TYPE, self.p4d["CrossRankStatistics"]), (PROV_LABEL, g.key), *self.attrs(_group_attrs(g))])
            self.doc.wasGeneratedBy(entity, self.run_activity)
            for s in g.series:
                self.doc.wasDerivedFrom(entity, series_ids[(g.table, s)])
            if g.table == "metrics" and g.multi_rank_steps:
                overall.update(g.slowest_counts)
                if worst is None or g.skew_max > worst.skew_max:
                    worst = g
        if overall:
            rank, steps = min(overall.items(), key=lambda rc: (-rc[1], rc[0]))
            report = self.doc.entity(self.ns["stragglers"], [(PROV_TYPE, self.p4d["StragglerReport"]), *self.attrs([
                ("slowest_rank", rank), ("slowest_steps", steps),
                ("slowest_counts", {str(r): c for r, c in sorted(overall.items())}),
                ("worst_skew", worst.skew_max), ("worst_skew_key", worst.key),
                ("worst_skew_context", worst.context), ("worst_skew_step", worst.skew_max_step)])])
            self.doc.wasGeneratedBy(report, self.run_activity)

    def _artifacts(self) -> None:
        ids: dict[str, QualifiedName] = {}
        for a in self.run.artifacts:
            kind = {"model_version": "ModelVersion", "model": "Model", "input_model": "Model"}.get(a.item, "Artifact")
            entity = self.doc.entity(self.ns[local_name("artifact", a.sha256)], [
                (PROV_TYPE, self.p4d[kind]), (PROV_LABEL, a.name), *self.attrs(_artifact_attrs(a))])
            ids[a.sha256] = entity.identifier
            for rank, attempt, is_input in sorted({(g.rank, g.attempt, g.item.startswith("input"))
                                                   for g in a.generations}):
                when = min(g.time for g in a.generations if (g.rank, g.attempt) == (rank, attempt))
                if is_input:  # yProv4ML's is_input=True: the rank read it
                    self.doc.used(self.activities[(rank, attempt)], entity, timestamp(when))
                else:
                    self.doc.wasGeneratedBy(entity, self.activities[(rank, attempt)], timestamp(when))
        versions: dict[tuple[int, int, str], list[tuple[int, str]]] = defaultdict(list)
        for a in self.run.artifacts:
            for g in a.generations:
                if g.item == "model_version" and g.version >= 0:
                    versions[(g.rank, g.attempt, g.model_name)].append((g.version, a.sha256))
        derived: set[tuple[str, str]] = set()
        for chain in versions.values():
            chain.sort()
            derived |= {(new, old) for (_, old), (_, new) in zip(chain, chain[1:], strict=False) if new != old}
        for new, old in sorted(derived):
            self.doc.wasDerivedFrom(ids[new], ids[old], other_attributes=[(PROV_TYPE, PROV["Revision"])])

    def _described(self, kind: str, prefix: str, records: list[RankRecord], used: bool) -> None:
        """Datasets and model descriptions: one entity per distinct (name, fields), shared by ranks."""
        entities: dict[tuple[str, str], QualifiedName] = {}
        for r in sorted(records, key=lambda r: (r.name, r.rank, r.attempt)):
            text = dumps(r.fields)
            key = (r.name, text)
            if key not in entities:
                digest = hashlib.sha256(text.encode()).hexdigest()[:12]
                entities[key] = self.doc.entity(self.ns[local_name(prefix, r.name, digest)], [
                    (PROV_TYPE, self.p4d[kind]), (PROV_LABEL, r.name),
                    *self.attrs(_flat(r.fields))]).identifier
            activity = self.activities[(r.rank, r.attempt)]
            if used:
                self.doc.used(activity, entities[key])
            else:
                self.doc.wasGeneratedBy(entities[key], activity)

    def _energy(self) -> None:
        by_scope: dict[str, list] = defaultdict(list)
        for e in self.run.energy:
            by_scope[e.scope].append(e)
        nodes: dict[str, QualifiedName] = {}
        rank_entities: dict[str, list[QualifiedName]] = defaultdict(list)
        host_of = {r.rank: r.hostname for r in self.run.ranks}
        for e in by_scope["rank"]:
            entity = self.doc.entity(self.ns[local_name("energy", f"rank-{int(e.name):05d}")],
                                     [(PROV_TYPE, self.p4d["Energy"]), *self.attrs(_energy_attrs(e))])
            self.doc.wasAttributedTo(entity, self.agent_of[int(e.name)])
            rank_entities[host_of.get(int(e.name), "")].append(entity.identifier)
        for e in by_scope["node"]:
            entity = self.doc.entity(self.ns[local_name("energy", "node", e.name)],
                                     [(PROV_TYPE, self.p4d["Energy"]), *self.attrs(_energy_attrs(e))])
            for part in rank_entities.get(e.name, []):
                self.doc.wasDerivedFrom(entity, part)
            nodes[e.name] = entity.identifier
        for e in by_scope["job"]:
            entity = self.doc.entity(self.ns["energy.job"], [(PROV_TYPE, self.p4d["Energy"]),
                                                            *self.attrs(_energy_attrs(e))])
            self.doc.wasGeneratedBy(entity, self.run_activity)
            for node in nodes.values():
                self.doc.wasDerivedFrom(entity, node)


def _series_attrs(s: SeriesSummary) -> Iterator[tuple[str, Any]]:
    yield from (("key", s.key), ("context", s.context), ("source", s.source or None), ("rank", s.rank),
                ("attempt", s.attempt), ("count", s.count))
    if s.count:
        yield from (("first_step", s.first_step), ("last_step", s.last_step), ("min", s.min), ("max", s.max),
                    ("last", s.last), ("nonfinite", s.nonfinite or None), ("step_runs", s.runs if s.runs > 1 else None))
    yield from (("dataset", s.dataset), ("row_start", s.row_start), ("row_stop", s.row_stop))
    yield from ((f"extra.{k}", v) for k, v in sorted(s.extra.items()))


def _group_attrs(g: GroupSummary) -> Iterator[tuple[str, Any]]:
    yield from (("key", g.key), ("context", g.context), ("source", g.source or None), ("attempt", g.attempt),
                ("ranks", len(g.series)), ("dataset", g.dataset), ("row_start", g.stat_start),
                ("row_stop", g.stat_stop), ("multi_rank_steps", g.multi_rank_steps))
    if g.multi_rank_steps:
        yield from (("slowest_rank", g.slowest_rank), ("slowest_steps", g.slowest_steps),
                    ("slowest_counts", {str(r): c for r, c in sorted(g.slowest_counts.items())}),
                    ("skew_mean", g.skew_mean), ("skew_max", g.skew_max), ("skew_max_step", g.skew_max_step))


SLURM_ALLOCATION = (
    "SLURM_JOB_ID", "SLURM_JOB_NAME", "SLURM_CLUSTER_NAME", "SLURM_JOB_PARTITION", "SLURM_JOB_ACCOUNT",
    "SLURM_JOB_QOS", "SLURM_JOB_NODELIST", "SLURM_JOB_NUM_NODES", "SLURM_NTASKS", "SLURM_NTASKS_PER_NODE",
    "SLURM_CPUS_PER_TASK", "SLURM_JOB_CPUS_PER_NODE", "SLURM_GPUS", "SLURM_GPUS_PER_NODE", "SLURM_GPUS_PER_TASK",
    "SLURM_MEM_PER_NODE", "SLURM_MEM_PER_CPU", "SLURM_SUBMIT_HOST", "SLURM_JOB_START_TIME", "SLURM_JOB_END_TIME",
)


def _artifact_attrs(a: Artifact) -> Iterator[tuple[str, Any]]:
    yield from (("sha256", a.sha256), ("size", a.size), ("item", a.item), ("path", a.path),
                ("directory", a.directory or None), ("generators", len({g.rank for g in a.generations})))
    yield "present", {1: True, 0: False}.get(a.present)
    for name in sorted({g.name for g in a.generations} - {a.name}):
        yield "also_named", name
    for model in sorted({g.model_name for g in a.generations if g.model_name}):
        yield "model_name", model
    for version in sorted({g.version for g in a.generations if g.version >= 0}):
        yield "version", version


def _energy_attrs(e: Any) -> Iterator[tuple[str, Any]]:
    yield from (("scope", e.scope), ("name", e.name or None))
    yield from sorted(e.fields.items())


def _flat(fields: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in sorted(fields.items()):
        if isinstance(value, dict):
            yield from _flat(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def build_document(run: MergedRun) -> ProvDocument:
    """The PROV document of a merged run (deterministic: same run, same document)."""
    return _Builder(run).build()
