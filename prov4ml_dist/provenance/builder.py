"""The merged run → a W3C PROV-JSON document (plain dicts, see ``document.py``).

The model (README "The PROV model", DESIGN.md): the user (prov:Person) and one
prov:SoftwareAgent per rank on the user's behalf; the run, one activity per rank attempt
(associated with its agent under the script's prov:Plan) and per (rank attempt, context); the
merge as its own activity that used each shard and generated ``merged.h5`` and the cross-rank
statistics. Every file a rank saved is its own entity, ``specializationOf`` one content entity
named by its sha256, so no entity is generated twice (PROV-CONSTRAINTS). Series: one entity
per (key, context, source, attempt), a member of ``merged.h5``; one per rank only while the
run has at most ``rank_series_limit`` of them, so the document grows with ranks + keys +
artifacts, never ranks x keys, and never with the number of points. Values not measured are
absent (with the reason), never a default 0.
"""

from __future__ import annotations

import gc
import hashlib
import os
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from itertools import groupby
from operator import attrgetter
from typing import Any
from urllib.parse import quote

from prov.model import ProvDocument

from ..merge.journal import dumps
from ..merge.layout import STATUS_NOT_LOGGING
from ..merge.model import Artifact, Generation, GroupSummary, MergedRun, RankAttempt, RankRecord, SeriesSummary
from .attributes import (
    SLURM_ALLOCATION,
    agent_attrs,
    as_dict,
    content_attrs,
    file_attrs,
    group_attrs,
    key_series_attrs,
    rank_attrs,
    sensor_reasons,
    series_attrs,
    software_pairs,
    value_attrs,
)
from .document import ProvJson, qname
from .terms import (
    KEY_NAMESPACE,
    P4D_NAMESPACE,
    XSD_NAMESPACE,
    attempt_name,
    flat,
    keys,
    local_name,
    p4d,
    site_of,
    user_namespace_iri,
)

RANK_SERIES_LIMIT_ENV = "PROV4ML_PROV_RANK_SERIES"
DEFAULT_RANK_SERIES_LIMIT = 1000
ENERGY_PARTS = (("gpu_joules", "gpu.", "nvml"), ("rapl_joules", "rapl.", "rapl"))


def _digest(value: Any) -> str:
    return hashlib.sha256(dumps(value).encode()).hexdigest()[:12]


def rank_series_limit() -> int:
    """The documented option: PROV4ML_PROV_RANK_SERIES (default 1000) per-rank series entities at most."""
    try:
        return max(0, int(os.environ.get(RANK_SERIES_LIMIT_ENV, DEFAULT_RANK_SERIES_LIMIT)))
    except ValueError:
        return DEFAULT_RANK_SERIES_LIMIT


class _Builder:
    def __init__(self, run: MergedRun, series_limit: int, built_at: float) -> None:
        self.run = run
        self.series_limit = series_limit
        self.built_at = built_at
        user_ns = user_namespace_iri(run.user_namespace, site_of(run))
        self.doc = ProvJson({"p4d": P4D_NAMESPACE, "key": KEY_NAMESPACE, "xsd": XSD_NAMESPACE, "user": user_ns,
                             "run": f"{user_ns}{quote(run.run_id, safe='-_~.')}/"})
        self.attempts = {(r.rank, r.attempt): r for r in run.ranks}
        self.activities: dict[tuple[int, int], str] = {}
        self.context_activities: dict[tuple[int, int, str], str] = {}
        self.agent_of: dict[int, str] = {}
        self.used: set[tuple[str, str]] = set()
        self.dataset_parts: dict[tuple[int, int], list[str]] = defaultdict(list)

    def use(self, activity: str, entity: str, when: float | None = None) -> None:
        """``used``, once per (activity, entity) pair."""
        if (activity, entity) not in self.used:
            self.used.add((activity, entity))
            self.doc.relation("used", activity, entity, time=when)

    def build(self) -> dict[str, Any]:
        run, doc = self.run, self.doc
        self.user = doc.element("agent", f"user:{local_name(run.user or 'user')}", ["prov:Person"],
                                label=run.user or "user")
        plans = self._plans()
        self.run_activity = doc.activity("run:run", run.start_time, run.end_time, ["p4d:Run"],
                                         p4d(self._run_attrs()), label=run.experiment_name)
        first = min(plans, default=None)
        doc.relation("wasAssociatedWith", self.run_activity, self.user, plans[first] if first else None)
        self._ranks(plans, self._software())
        self._merge()
        self._params()
        self._series()
        self._datasets()
        self._artifacts()
        self._models()
        self._energy()
        return doc.data

    def _run_attrs(self) -> Iterator[tuple[str, Any]]:
        run = self.run
        yield "run_id", run.run_id
        yield "experiment_name", run.experiment_name
        yield "world_size", run.world_size
        yield "incomplete_ranks", sorted({r.rank for r in run.ranks if not r.complete and r.status != "missing"})
        yield "missing_ranks", sorted({r.rank for r in run.ranks if r.status == "missing"})
        yield "not_logging_ranks", sorted({r.rank for r in run.ranks if r.status == STATUS_NOT_LOGGING})
        yield "merged_file", "merged.h5"
        yield "problems", len(run.problems)
        launcher = next((r.environment.get("launcher_env") for r in run.ranks if r.environment), None)
        if isinstance(launcher, dict):  # the Slurm allocation the job ran in, as rank 0 saw it
            for name in SLURM_ALLOCATION:
                if isinstance(launcher.get(name), str):
                    yield name.lower(), launcher[name]

    def _plans(self) -> dict[tuple[int, int], str]:
        """The script each rank attempt ran, as a prov:Plan; one entity per distinct script state.
        Only local rank 0 hashes the script: its sha256 stands for its node's ranks with the same path."""
        node_sha: dict[tuple[str, str], str] = {}
        for r in self.run.ranks:
            script = as_dict(as_dict(r.environment.get("software")).get("script"))
            if isinstance(script.get("sha256"), str):
                node_sha[(r.hostname, str(script.get("path")))] = script["sha256"]
        plans: dict[tuple[int, int], str] = {}
        made: dict[str, str] = {}
        for r in sorted(self.run.ranks, key=lambda r: (r.rank, r.attempt)):
            env = r.environment
            script, git = as_dict(as_dict(env.get("software")).get("script")), as_dict(env.get("git"))
            if not script and not git:
                continue
            path = script.get("path")
            pairs = [("path", path), ("sha256", node_sha.get((r.hostname, str(path)))), ("size", script.get("size")),
                     ("git_commit", git.get("commit")), ("git_branch", git.get("branch")),
                     ("git_dirty", git.get("dirty")), ("git_directory", git.get("directory")),
                     ("git_remote", as_dict(env.get("software")).get("git_remote"))]
            pairs = [(k, v) for k, v in pairs if isinstance(v, (str, int, bool))]
            digest = _digest(pairs)
            if digest not in made:
                label = os.path.basename(path) if isinstance(path, str) else "script"
                made[digest] = self.doc.element("entity", f"run:plan.{digest}", ["prov:Plan", "p4d:Script"],
                                                p4d(pairs), label=label)
            plans[(r.rank, r.attempt)] = made[digest]
        return plans

    def _software(self) -> dict[tuple[int, int], str]:
        """The software stack of each rank attempt: one entity per distinct stack (per node where it differs)."""
        stacks: dict[tuple[int, int], str] = {}
        made: dict[str, str] = {}
        for r in sorted(self.run.ranks, key=lambda r: (r.rank, r.attempt)):
            pairs = software_pairs(r)
            if not pairs:
                continue
            digest = _digest(pairs)
            if digest not in made:
                made[digest] = self.doc.element("entity", f"run:software.{digest}", ["p4d:SoftwareStack"],
                                                p4d(pairs), label="software stack")
            stacks[(r.rank, r.attempt)] = made[digest]
        return stacks

    def _ranks(self, plans: dict[tuple[int, int], str], stacks: dict[tuple[int, int], str]) -> None:
        by_rank: dict[int, list[RankAttempt]] = defaultdict(list)
        for r in self.run.ranks:
            by_rank[r.rank].append(r)
        for rank, attempts in sorted(by_rank.items()):
            agent = self.doc.element("agent", f"run:rank-{rank:05d}", ["prov:SoftwareAgent"],
                                     p4d(agent_attrs(attempts)))
            self.doc.relation("actedOnBehalfOf", agent, self.user)
            self.agent_of[rank] = agent
            for r in attempts:
                who = (r.rank, r.attempt)
                activity = self.doc.activity(
                    f"run:process.{attempt_name(r.rank, r.attempt)}", r.start_time, r.end_time if r.complete else None,
                    ["p4d:RankProcess"], p4d(rank_attrs(r)))
                self.doc.relation("wasAssociatedWith", activity, agent, plans.get(who))
                self.doc.relation("wasInformedBy", activity, self.run_activity)
                if who in stacks:
                    self.use(activity, stacks[who])
                self.activities[who] = activity

    def _merge(self) -> None:
        """The merge: online (in rank 0's process at end_run) or offline (``prov4ml-dist merge``)."""
        stamp = self.run.merge_stamp
        merged_at = stamp.get("merged_at") if isinstance(stamp.get("merged_at"), (int, float)) else None
        online = next((r for r in self.run.ranks if r.rank == 0 and stamp.get("pid") is not None
                       and r.topology.get("pid") == stamp.get("pid") and r.hostname == stamp.get("host")), None)
        self.merge = self.doc.activity("run:merge", merged_at, max(self.built_at, merged_at or self.built_at),
                                       ["p4d:Merge"], p4d([
                                           ("mode", "online" if online else "offline"),
                                           ("library_version", stamp.get("version")), ("host", stamp.get("host"))]),
                                       label="merge")
        if online is not None:
            self.doc.relation("wasAssociatedWith", self.merge, self.agent_of[0])
            self.doc.relation("wasInformedBy", self.merge, self.activities[(online.rank, online.attempt)])
        else:
            self.doc.relation("wasAssociatedWith", self.merge, self.user)
        self.merged = self.doc.element("entity", "run:merged.h5", ["p4d:MergedFile", "prov:Collection"],
                                       p4d([("file", "merged.h5")]), label="merged.h5")
        self.doc.relation("wasGeneratedBy", self.merged, self.merge)
        for r in sorted(self.run.ranks, key=lambda r: (r.rank, r.attempt)):
            if not r.shard:
                continue
            shard = self.doc.element("entity", f"run:shard.{attempt_name(r.rank, r.attempt)}", ["p4d:Shard"],
                                     p4d([("file", r.shard), ("sha256", r.shard_sha256 or None), ("rank", r.rank)]),
                                     label=r.shard)
            self.doc.relation("wasGeneratedBy", shard, self.activities[(r.rank, r.attempt)])
            self.use(self.merge, shard)
            self.doc.relation("wasDerivedFrom", self.merged, shard, self.merge)

    def _params(self) -> None:
        by_key: dict[str, list] = defaultdict(list)
        for p in self.run.params:
            by_key[p.key].append(p)
        for key, values in sorted(by_key.items()):
            agreed = next(p for p in values if p.majority)
            pairs: list[tuple[str, Any]] = [("key", key)]
            if len(values) > 1:
                pairs += [("disagreement", True),
                          ("disagreeing_ranks", sorted(r for p in values if not p.majority for r in p.ranks))]
            param = self.doc.element("entity", f"run:param.{local_name(key)}", ["p4d:Param"],
                                     [*value_attrs(agreed.value), *p4d(pairs)], label=key)
            self.use(self.run_activity, param)
            if len(values) > 1:
                for i, p in enumerate(values):
                    variant = self.doc.element("entity", f"run:param.{local_name(key)}.value-{i}", ["p4d:ParamValue"],
                                               [*value_attrs(p.value), *p4d([("rank", list(p.ranks)),
                                                                              ("majority", p.majority)])])
                    self.doc.relation("specializationOf", variant, param)

    def _context_activity(self, rank: int, attempt: int, context: str) -> str:
        """The (rank attempt, context) activity, made on first use."""
        key = (rank, attempt, context)
        if key not in self.context_activities:
            activity = self.doc.activity(f"run:process.{attempt_name(rank, attempt)}.{local_name(context)}", None,
                                         None, ["p4d:ContextActivity"], p4d([("context", context), ("rank", rank)]))
            self.doc.relation("wasInformedBy", activity, self.activities[(rank, attempt)])
            self.doc.relation("wasAssociatedWith", activity, self.agent_of[rank])
            self.context_activities[key] = activity
        return self.context_activities[key]

    def _activity(self, rank: int, attempt: int, context: str) -> str:
        return self._context_activity(rank, attempt, context) if context else self.activities[(rank, attempt)]

    def _series(self) -> None:
        """Per (key, context, source, attempt) entities, their cross-rank statistics and the
        straggler report; per-rank series entities only while there are few."""
        names: set[str] = set()
        by_table: dict[str, list[SeriesSummary]] = defaultdict(list)
        for dataset, series in groupby(self.run.series, attrgetter("dataset")):  # loaded table by table
            by_table[dataset.split("/")[1]].extend(series)
        per_rank = len(self.run.series) <= self.series_limit
        crossrank: dict[int, str] = {}
        for g in self.run.groups:
            members = by_table[g.table][g.series[0]:g.series[-1] + 1] if g.series else []  # a contiguous range
            base = [g.table, g.key, g.context, *([g.source] if g.source else []),
                    *([f"attempt-{g.attempt}"] if g.attempt > 0 else [])]
            name = _unique(local_name(*base), names)
            kind = "p4d:SystemSeries" if g.table == "system" else "p4d:MetricSeries"
            series = self.doc.element("entity", f"run:{name}", [kind, "prov:Collection"],
                                      key_series_attrs(g, members), label=g.key)
            self.doc.relation("wasGeneratedBy", series, self.run_activity)
            self.doc.relation("hadMember", self.merged, series)
            if per_rank:
                for s in members:
                    own = _unique(f"{name}.{attempt_name(s.rank, s.attempt)}", names)
                    entity = self.doc.element("entity", f"run:{own}", [kind],
                                              series_attrs(s), label=s.key)
                    self.doc.relation("wasGeneratedBy", entity, self._activity(s.rank, s.attempt, s.context))
                    self.doc.relation("hadMember", series, entity)
            if len(g.series) >= 2:
                stats = self.doc.element("entity", f"run:crossrank.{name}", ["p4d:CrossRankStatistics"],
                                         p4d(group_attrs(g)), label=g.key)
                self.doc.relation("wasGeneratedBy", stats, self.merge)
                self.doc.relation("wasDerivedFrom", stats, series, self.merge)
                self.doc.relation("hadMember", self.merged, stats)
                crossrank[id(g)] = stats
        self._stragglers(crossrank)

    def _stragglers(self, crossrank: dict[int, str]) -> None:
        overall: Counter = Counter()
        worst: GroupSummary | None = None
        for g in self.run.groups:
            if g.table == "metrics" and g.multi_rank_steps and id(g) in crossrank:
                overall.update(g.slowest_counts)
                if worst is None or g.skew_max > worst.skew_max:
                    worst = g
        if not overall or worst is None:
            return
        rank, steps = min(overall.items(), key=lambda rc: (-rc[1], rc[0]))
        report = self.doc.element("entity", "run:stragglers", ["p4d:StragglerReport", "prov:Collection"], p4d([
            ("slowest_rank", rank), ("slowest_steps", steps), ("worst_skew", worst.skew_max),
            ("worst_skew_key", worst.key), ("worst_skew_context", worst.context),
            ("worst_skew_step", worst.skew_max_step)]), label="straggler report")
        self.doc.relation("wasGeneratedBy", report, self.merge)
        self.doc.relation("wasDerivedFrom", report, crossrank[id(worst)], self.merge)
        for r, count in sorted(overall.items()):
            part = self.doc.element("entity", f"run:stragglers.rank-{r:05d}", ["p4d:StragglerCount"],
                                    p4d([("rank", r), ("slowest_steps", count)]))
            self.doc.relation("hadMember", report, part)

    def _datasets(self) -> None:
        """Each dataset whole (a collection used by the run) and each rank's part of it (used by the rank)."""
        by_name: dict[str, list[RankRecord]] = defaultdict(list)
        for r in self.run.datasets:
            by_name[r.name].append(r)
        for name, parts in sorted(by_name.items()):
            flats = [dict(flat(r.fields)) for r in parts]
            common = {k: v for k, v in flats[0].items() if all(f.get(k, _MISSING) == v for f in flats[1:])}
            whole = self.doc.element("entity", f"run:dataset.{local_name(name)}", ["p4d:Dataset", "prov:Collection"],
                                     [*p4d([("name", name), ("parts", len(parts))]), *keys(sorted(common.items()))],
                                     label=name)
            self.use(self.run_activity, whole)
            seen: Counter = Counter()
            for r, fields in sorted(zip(parts, flats, strict=True), key=lambda rf: (rf[0].rank, rf[0].attempt)):
                who = attempt_name(r.rank, r.attempt)
                seen[who] += 1
                suffix = who if seen[who] == 1 else f"{who}.{seen[who]}"
                part = self.doc.element("entity", f"{whole}.{suffix}", ["p4d:DatasetPart"],
                                        [*p4d([("rank", r.rank)]), *keys(sorted(fields.items()))], label=name)
                self.doc.relation("hadMember", whole, part)
                self.use(self.activities[(r.rank, r.attempt)], part)
                self.dataset_parts[(r.rank, r.attempt)].append(part)

    def _artifacts(self) -> None:
        """One content entity per sha256; one file entity per save by a rank, specializationOf its content."""
        saves: list[tuple[Generation, Artifact, str]] = []
        counts: Counter = Counter()
        for a in self.run.artifacts:
            kind = {"model_version": "p4d:ModelVersion", "model": "p4d:Model", "input_model": "p4d:Model"}.get(
                a.item, "p4d:Artifact")
            content = self.doc.element("entity", f"run:content.{a.sha256}", ["p4d:Content", kind],
                                       p4d(content_attrs(a)), label=a.name)
            for g in sorted(a.generations, key=lambda g: (g.rank, g.attempt, g.time, g.path)):
                who = attempt_name(g.rank, g.attempt)
                counts[who] += 1
                file = self.doc.element("entity", f"run:file.{who}.{counts[who]}", ["p4d:ArtifactFile"],
                                        p4d(file_attrs(g)), label=g.name)
                self.doc.relation("specializationOf", file, content)
                if (g.rank, g.attempt) not in self.activities:
                    continue
                activity = self._activity(g.rank, g.attempt, g.context)
                if g.item.startswith("input"):  # yProv4ML's is_input=True: the rank read it
                    self.use(activity, file, g.time)
                else:
                    self.doc.relation("wasGeneratedBy", file, activity, time=g.time)
                saves.append((g, a, file))
        self._lineage(saves)

    def _lineage(self, saves: list[tuple[Generation, Artifact, str]]) -> None:
        """Each model version derived from the previous one (a prov:Revision), the final model from the
        last version saved before it; the activity that made a model used that rank's dataset parts."""
        chains: dict[tuple[int, int, str], list[tuple[float, int, str]]] = defaultdict(list)
        finals: list[tuple[Generation, str]] = []
        for g, _, file in saves:
            if g.item == "model_version":
                chains[(g.rank, g.attempt, g.model_name)].append((g.time, g.version, file))
            elif g.item == "model":
                finals.append((g, file))
            if g.item in ("model_version", "model"):
                for part in self.dataset_parts.get((g.rank, g.attempt), []):
                    self.use(self._activity(g.rank, g.attempt, g.context), part)
        for chain in chains.values():
            chain.sort(key=lambda c: (c[1], c[0]))
            for (t_old, _, old), (t_new, _, new) in zip(chain, chain[1:], strict=False):
                if t_old <= t_new:  # a version saved before its predecessor is not derived from it
                    self.doc.relation("wasDerivedFrom", new, old, attrs=[("prov:type", qname("prov:Revision"))])
        for g, file in finals:
            chain = chains.get((g.rank, g.attempt, g.model_name))
            if chain is None:  # the final model saved under another name: the rank's only chain
                mine = [c for (rank, attempt, _), c in chains.items() if (rank, attempt) == (g.rank, g.attempt)]
                chain = mine[0] if len(mine) == 1 else []
            before = [c for c in chain if c[0] <= g.time]
            if before:
                self.doc.relation("wasDerivedFrom", file, max(before, key=lambda c: (c[0], c[1]))[2])

    def _models(self) -> None:
        """Model descriptions: one content per distinct description, one entity per rank that logged it."""
        made: dict[str, str] = {}
        seen: Counter = Counter()
        for r in sorted(self.run.models, key=lambda r: (r.name, r.rank, r.attempt)):
            fields = sorted(flat(r.fields))
            digest = _digest([r.name, fields])
            if digest not in made:
                made[digest] = self.doc.element("entity", f"run:model.{local_name(r.name)}.{digest}",
                                                ["p4d:ModelDescription"],
                                                [*p4d([("name", r.name)]), *keys(fields)], label=r.name)
            who = attempt_name(r.rank, r.attempt)
            seen[(r.name, who)] += 1
            suffix = who if seen[(r.name, who)] == 1 else f"{who}.{seen[(r.name, who)]}"
            entity = self.doc.element("entity", f"run:model.{local_name(r.name)}.{suffix}",
                                      ["p4d:RankModelDescription"], p4d([("rank", r.rank)]), label=r.name)
            self.doc.relation("specializationOf", entity, made[digest])
            self.doc.relation("wasGeneratedBy", entity, self.activities[(r.rank, r.attempt)])

    def _energy(self) -> None:
        """Energy per rank (its GPUs), node (its ranks + RAPL) and job; a part not measured is
        absent, named in p4d:not_measured with the sensors' reasons."""
        by_scope: dict[str, list] = defaultdict(list)
        for e in self.run.energy:
            by_scope[e.scope].append(e)
        host_of = {r.rank: r.hostname for r in self.run.ranks}
        reasons = sensor_reasons(self.run.ranks)
        rank_entities: dict[str, list[str]] = defaultdict(list)
        for e in by_scope["rank"]:
            rank = int(e.name)
            entity = self._energy_entity(f"run:energy.rank-{rank:05d}", e.fields, [("rank", rank)],
                                         reasons.get(host_of.get(rank, ""), {}))
            self.doc.relation("wasAttributedTo", entity, self.agent_of[rank])
            rank_entities[host_of.get(rank, "")].append(entity)
        # every node and the job get an entity, measured or not: one that measured nothing says why
        node_fields = {e.name: e.fields for e in by_scope["node"]}
        hosts = sorted(set(node_fields) | {r.hostname for r in self.run.ranks if r.hostname and r.status != "missing"})
        nodes = []
        for host in hosts:
            entity = self._energy_entity(f"run:energy.node.{local_name(host)}", node_fields.get(host, {}),
                                         [("host", host)], reasons.get(host, {}))
            self.doc.relation("wasGeneratedBy", entity, self.merge)
            for part in rank_entities.get(host, []):
                self.doc.relation("wasDerivedFrom", entity, part, self.merge)
            nodes.append(entity)
        everywhere = {part: "; ".join(sorted({r for host in reasons.values() for r in host.get(part, [])}))
                      for part in ("gpu_joules", "rapl_joules")}
        entity = self._energy_entity("run:energy.job", by_scope["job"][0].fields if by_scope["job"] else {}, [],
                                     {k: [v] for k, v in everywhere.items() if v})
        self.doc.relation("wasGeneratedBy", entity, self.merge)
        for node in nodes:
            self.doc.relation("wasDerivedFrom", entity, node, self.merge)

    def _energy_entity(self, identifier: str, fields: dict[str, float], pairs: list[tuple[str, Any]],
                       reasons: dict[str, list[str]]) -> str:
        measured = [(total, prefix) for total, prefix, _ in ENERGY_PARTS
                    if any(f.startswith(prefix) for f in fields)]
        missing = [total for total, _, _ in ENERGY_PARTS if total not in dict(measured)]
        attrs = [*pairs, *((total, fields.get(total)) for total, _ in measured)]
        if measured:
            attrs.append(("total_joules", sum(fields.get(total, 0.0) for total, _ in measured)))
        attrs += [("not_measured", missing),
                  ("not_measured_reason", [f"{part}: {r}" for part in missing for r in reasons.get(part, [])])]
        devices = sorted(f for f in fields if f.startswith(("gpu.", "rapl.")) and f.endswith(".joules"))
        types = ["p4d:Energy", "prov:Collection"] if devices else ["p4d:Energy"]
        entity = self.doc.element("entity", identifier, types, p4d(attrs))
        for i, name in enumerate(devices):
            kind, device = name.split(".", 1)[0], name.split(".", 1)[1].rsplit(".", 1)[0]
            part = self.doc.element("entity", f"{identifier}.{kind}-{i}", ["p4d:DeviceEnergy"],
                                    p4d([("sensor", "nvml" if kind == "gpu" else "rapl"), ("device", device),
                                         ("joules", fields[name])]))
            self.doc.relation("hadMember", entity, part)
        return entity


_MISSING = object()


def _unique(name: str, names: set[str]) -> str:
    n, candidate = 1, name
    while candidate in names:
        n += 1
        candidate = f"{name}.{n}"
    names.add(candidate)
    return candidate


def build_prov_json(run: MergedRun, *, series_limit: int | None = None, built_at: float | None = None) -> dict:
    """The PROV-JSON document of a merged run, as the dict ``json.dumps`` writes."""
    limit = rank_series_limit() if series_limit is None else series_limit
    enabled = gc.isenabled()
    gc.disable()  # tens of thousands of small acyclic dicts: cyclic GC passes would cost more than the build
    try:
        return _Builder(run, limit, time.time() if built_at is None else built_at).build()
    finally:
        if enabled:
            gc.enable()


def build_document(run: MergedRun, *, series_limit: int | None = None) -> ProvDocument:
    """The same document as a ``prov.model.ProvDocument`` (parsed by ``prov``: slow on big runs)."""
    import json

    return ProvDocument.deserialize(content=json.dumps(build_prov_json(run, series_limit=series_limit)),
                                    format="json")
