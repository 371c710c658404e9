"""The merged journal: every record kept, params compared across ranks, artifacts
content-addressed, energy summed per rank, node and job.

Energy records (``kind: energy``, written by the sampler at stop; see shard/schema.py) give
per rank ``gpu_joules`` and per GPU ``gpus[].joules`` (each GPU is meant to be sampled only by
the rank that owns it), and, from the rank that sampled its node's RAPL counters,
``rapl_joules`` and ``rapl[].joules`` per domain. A GPU (by UUID) and RAPL measure one device
of one node: each counts once per node (the largest total among the ranks that report it,
should several: ranks that all claimed GPU 0), never per rank; a node's ``gpu_joules`` is the
sum over its GPUs. ``total_joules`` of a node or the job is its GPU plus its RAPL (package +
DRAM) energy.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py

from ..paths import relative_inside
from ..shard.reader import MAX_RANK
from . import layout
from .scan import ShardInfo, as_text
from .store import Appender, write_table

_SHA256 = re.compile(r"[0-9a-f]{64}")
def dumps(value: Any) -> str:
    """Canonical JSON: the same value always gives the same text."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False, default=repr)


def hostname(shard: ShardInfo) -> str:
    topology = shard.start.get("topology")
    host = topology.get("hostname") if isinstance(topology, dict) else None
    return host if isinstance(host, str) and host else f"node-{node_rank(shard)}"


def node_rank(shard: ShardInfo) -> int:
    topology = shard.start.get("topology")
    return rank_number(topology.get("node_rank") if isinstance(topology, dict) else None)


def rank_number(value: Any) -> int:
    """A rank-like number read back from a shard, or NO_VALUE when it is not one (a crafted
    10**30 must not overflow the merged tables' integer columns)."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < MAX_RANK:
        return value
    return layout.NO_VALUE


@dataclass
class _Content:
    size: int
    item: str
    name: str
    path: str
    directory: bool
    present: int = -1
    generations: list[tuple] = field(default_factory=list)


class Journal:
    """Takes the shards' records in (rank, attempt) order; writes the journal tables."""

    def __init__(self, out: h5py.File, run_dir: Path, problems: list[str]) -> None:
        self.run_dir = run_dir
        self.problems = problems
        self.records = Appender(out, layout.RECORDS, layout.RECORD_DTYPE)
        self.params: dict[str, dict[int, str]] = defaultdict(dict)
        self.contents: dict[str, _Content] = {}
        self.rank_energy: dict[int, Counter] = defaultdict(Counter)
        self.node_rank_energy: dict[str, dict[int, Counter]] = defaultdict(lambda: defaultdict(Counter))

    def add(self, shard: ShardInfo) -> None:
        for record in shard.records:
            when = record.get("time")
            when = float(when) if isinstance(when, (int, float)) and not isinstance(when, bool) else math.nan
            self.records.add((shard.rank, shard.attempt, record["kind"], when, dumps(record)))
            if record["kind"] == "param" and isinstance(record.get("key"), str):
                self.params[record["key"]][shard.rank] = dumps(record.get("value"))
            elif record["kind"] == "artifact":
                self._artifact(shard, record, when)
            elif record["kind"] == "energy":
                self._energy(shard, record)

    def _artifact(self, shard: ShardInfo, record: dict[str, Any], when: float) -> None:
        sha, size, path = record.get("sha256"), record.get("size"), record.get("path")
        if not (isinstance(sha, str) and _SHA256.fullmatch(sha) and isinstance(size, int) and isinstance(path, str)):
            self.problems.append(f"rank {shard.rank}: artifact record without a valid sha256, size and path: "
                                 f"{dumps(record)[:120]}")
            return
        name, item = as_text(record.get("name")), as_text(record.get("item")) or "artifact"
        content = self.contents.setdefault(sha, _Content(size, item, name, path, bool(record.get("directory"))))
        if record.get("copied") is True:
            found = self._present(shard.rank, name, path, size, content.directory)
            content.present = max(content.present, found)
        version = record.get("version")
        version = version if isinstance(version, int) and not isinstance(version, bool) else layout.NO_VALUE
        content.generations.append((shard.rank, shard.attempt, name, path, item, as_text(record.get("model_name")),
                                    version, as_text(record.get("context")), when, dumps(record)))

    def _present(self, rank: int, name: str, path: str, size: int, directory: bool) -> int:
        """1 when the copied file is in the run directory (a missing one is a problem, not a failure)."""
        rel = relative_inside(path)
        if rel is None:
            self.problems.append(f"rank {rank}: artifact {name!r} has an unsafe path {path!r}; not checked")
            return 0
        target = self.run_dir.joinpath(*rel.parts)
        try:
            found = target.is_dir() if directory else target.is_file() and target.stat().st_size == size
            state = "missing" if not target.exists() else "not the recorded size"
        except OSError as exc:
            found, state = False, f"unreadable ({exc.strerror})"
        if found:
            return 1
        self.problems.append(f"rank {rank}: artifact {name!r} is {state} at {path}")
        return 0

    def _energy(self, shard: ShardInfo, record: dict[str, Any]) -> None:
        rank = self.rank_energy[shard.rank]
        node = self.node_rank_energy[hostname(shard)][shard.rank]
        for gpu in _dicts(record.get("gpus")):
            joules = _finite(gpu.get("joules"))
            if joules is not None:
                name = f"gpu.{as_text(gpu.get('uuid')) or gpu.get('index')}.joules"
                rank[name] += joules
                rank["gpu_joules"] += joules
                node[name] += joules
        for zone in _dicts(record.get("rapl")):
            joules = _finite(zone.get("joules"))
            if joules is not None:
                node[f"rapl.{as_text(zone.get('domain')) or as_text(zone.get('zone'))}.joules"] += joules
                if zone.get("in_total") is True:
                    node["rapl_joules"] += joules

    def write(self, out: h5py.File) -> None:
        self.records.flush()
        write_table(out, layout.PARAMS, layout.PARAM_DTYPE, self._param_rows())
        group = out.create_group(layout.ARTIFACTS)
        shas = sorted(self.contents)
        write_table(group, layout.CONTENT, layout.CONTENT_DTYPE, [
            (sha, c.size, c.item, c.name, c.path, c.present, c.directory)
            for sha, c in ((sha, self.contents[sha]) for sha in shas)])
        write_table(group, layout.GENERATIONS, layout.GENERATION_DTYPE, [
            (i, *g) for i, sha in enumerate(shas) for g in self.contents[sha].generations])
        write_table(out, layout.ENERGY, layout.ENERGY_DTYPE, list(self._energy_rows()))

    def _param_rows(self) -> Iterator[tuple]:
        for key in sorted(self.params):
            by_value: dict[str, list[int]] = defaultdict(list)
            for rank, value in sorted(self.params[key].items()):
                by_value[value].append(rank)
            majority = min(by_value, key=lambda v: (-len(by_value[v]), by_value[v][0]))
            for value in sorted(by_value, key=lambda v: by_value[v][0]):
                yield key, value, dumps(by_value[value]), value == majority

    def _energy_rows(self) -> Iterator[tuple]:
        nodes: dict[str, Counter] = defaultdict(Counter)
        for rank in sorted(self.rank_energy):
            yield from (("rank", str(rank), f, v) for f, v in sorted(self.rank_energy[rank].items()))
        for host, reporters in self.node_rank_energy.items():
            for name in {f for fields in reporters.values() for f in fields}:
                nodes[host][name] += max(fields.get(name, 0.0) for fields in reporters.values())
            gpus = [v for f, v in nodes[host].items() if f.startswith("gpu.")]
            if gpus:
                nodes[host]["gpu_joules"] = sum(gpus)
        job: Counter = Counter()
        for host in sorted(nodes):
            measured = [nodes[host][f] for f in ("gpu_joules", "rapl_joules") if f in nodes[host]]
            if measured:  # a node that measured nothing has no total, not a total of 0 J
                nodes[host]["total_joules"] = sum(measured)
            job.update(nodes[host])
            yield from (("node", host, f, v) for f, v in sorted(nodes[host].items()))
        yield from (("job", "", f, v) for f, v in sorted(job.items()))


def _dicts(value: Any) -> Iterator[dict[str, Any]]:
    """The dict items of a list read back from a shard (anything else is ignored)."""
    if isinstance(value, list):
        yield from (v for v in value if isinstance(v, dict))


def _finite(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None
