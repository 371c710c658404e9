"""The merged run as plain data: what the PROV builder and the CLI read, never h5py objects.

Everything here is small (per rank, key, artifact); points stay in ``merged.h5``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class RankAttempt:
    """One process of the job: a rank's attempt (torchrun restarts get new attempts)."""

    rank: int
    attempt: int  # -1 for a rank without any shard
    status: str  # end status, "incomplete" (no end record) or "missing" (no shard)
    complete: bool
    node_rank: int
    local_rank: int
    hostname: str
    start_time: float | None
    end_time: float | None
    last_time: float | None  # the latest time seen in its shard: how far a crashed rank got
    shard: str
    shard_sha256: str
    reason: str
    topology: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)
    gpu_uuids: tuple[str, ...] = ()
    sensors: tuple[dict[str, Any], ...] = ()
    warnings: int = 0


@dataclass(frozen=True)
class SeriesSummary:
    """One (key, context, source) of one rank attempt; ``row_start:row_stop`` of ``dataset``."""

    dataset: str
    index: int
    key: str
    context: str
    source: str
    rank: int
    attempt: int
    group: int
    row_start: int
    row_stop: int
    count: int
    nonfinite: int
    runs: int  # 1 + how often the step went backwards
    first_step: int
    last_step: int
    min: float
    max: float
    last: float
    first_time: float
    last_time: float
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class GroupSummary:
    """A (key, context, source, attempt) across ranks, with its straggler report."""

    table: str
    dataset: str  # the crossrank dataset; ``stat_start:stat_stop`` are this group's steps
    index: int
    key: str
    context: str
    source: str
    attempt: int
    series: tuple[int, ...]
    stat_start: int
    stat_stop: int
    multi_rank_steps: int
    slowest_rank: int  # -1 when no step was logged by two ranks
    slowest_steps: int
    skew_mean: float
    skew_max: float
    skew_max_step: int
    slowest_counts: dict[int, int] = field(default_factory=dict)


@dataclass(frozen=True)
class ParamValue:
    """One value of a param and the ranks that logged it; ``majority`` is the agreed value."""

    key: str
    value: Any
    ranks: tuple[int, ...]
    majority: bool


@dataclass(frozen=True)
class Generation:
    """A rank saving a content: under which name, path, version and context."""

    rank: int
    attempt: int
    name: str
    path: str
    item: str
    model_name: str
    version: int  # -1 when not a model version
    context: str
    time: float


@dataclass(frozen=True)
class Artifact:
    """A content (sha256) and every rank that saved it."""

    sha256: str
    size: int
    item: str
    name: str
    path: str
    present: int  # 1 found in the run directory, 0 missing, -1 not copied (not checked)
    directory: bool
    generations: tuple[Generation, ...]


@dataclass(frozen=True)
class RankRecord:
    """A dataset or model description logged by a rank."""

    rank: int
    attempt: int
    name: str
    fields: dict[str, Any]


@dataclass(frozen=True)
class EnergyTotal:
    """Energy fields summed for a rank (``name`` = rank), a node (hostname) or the job."""

    scope: str
    name: str
    fields: dict[str, float]


@dataclass
class MergedRun:
    """Everything the PROV document says about a run."""

    run_id: str
    experiment_name: str
    user_namespace: str
    user: str
    world_size: int
    ranks: list[RankAttempt]
    params: list[ParamValue]
    series: list[SeriesSummary]
    groups: list[GroupSummary]
    artifacts: list[Artifact]
    datasets: list[RankRecord]
    models: list[RankRecord]
    energy: list[EnergyTotal]
    problems: list[str]
    merge_stamp: dict[str, Any] = field(default_factory=dict)  # merged_at, version, pid, host of the merge

    @property
    def start_time(self) -> float | None:
        times = [r.start_time for r in self.ranks if r.start_time is not None]
        return min(times) if times else None

    @property
    def end_time(self) -> float | None:
        times = [t for r in self.ranks for t in (r.end_time if r.complete else r.last_time,) if t is not None]
        return max(times) if times else None
