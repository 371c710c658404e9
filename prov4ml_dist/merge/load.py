"""Reading ``merged.h5`` back into the plain data model (small tables only, never the rows)."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..errors import MergeError
from ..shard import schema
from . import layout
from .model import (
    Artifact,
    EnergyTotal,
    Generation,
    GroupSummary,
    MergedRun,
    ParamValue,
    RankAttempt,
    RankRecord,
    SeriesSummary,
)

RECORD_BLOCK_ROWS = 65536


def load_merged(path: str | Path) -> MergedRun:
    """The merged run described by ``merged.h5`` (raises ``MergeError`` if it is not one)."""
    try:
        with h5py.File(path, "r") as f:
            if _str(f.attrs.get("format")) != layout.FORMAT:
                raise MergeError(f"{path}: not a merged prov4ml_dist file")
            return _load(f)
    except (OSError, KeyError, ValueError) as exc:
        raise MergeError(f"{path}: unreadable merged file ({exc})") from None


def _load(f: h5py.File) -> MergedRun:
    per_rank = _per_rank_records(f[layout.RECORDS])
    series, groups = [], []
    for table in schema.TABLES:
        series += _series(f, table)
        groups += _groups(f, table)
    return MergedRun(
        run_id=_str(f.attrs["run_id"]), experiment_name=_str(f.attrs["experiment_name"]),
        user_namespace=_str(f.attrs["user_namespace"]), user=_str(f.attrs["user"]),
        world_size=int(f.attrs["world_size"]),
        ranks=[_rank(row, per_rank) for row in f[layout.RANKS][()]],
        params=[ParamValue(_str(r["key"]), json.loads(r["value"]), tuple(json.loads(r["ranks"])), bool(r["majority"]))
                for r in f[layout.PARAMS][()]],
        series=series, groups=groups, artifacts=_artifacts(f[layout.ARTIFACTS]),
        datasets=per_rank["datasets"], models=per_rank["models"], energy=_energy(f[layout.ENERGY][()]),
        problems=json.loads(f.attrs[layout.PROBLEMS_ATTR]), merge_stamp=_stamp(f))


def _stamp(f: h5py.File) -> dict[str, Any]:
    """When, by which version and in which process the file was merged ({} if unreadable)."""
    try:
        stamp = json.loads(f.attrs.get(layout.STAMP_ATTR, "{}"))
    except ValueError:
        return {}
    return stamp if isinstance(stamp, dict) else {}


def _str(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else "" if value is None else str(value)


def _num(value: Any) -> float | None:
    value = float(value)
    return None if math.isnan(value) else value


def _records(ds: h5py.Dataset) -> Iterator[np.ndarray]:
    for start in range(0, ds.shape[0], RECORD_BLOCK_ROWS):
        yield ds[start:start + RECORD_BLOCK_ROWS]


def _per_rank_records(ds: h5py.Dataset) -> dict[str, Any]:
    """Datasets and models as lists; sensors and warning counts per (rank, attempt)."""
    found: dict[str, Any] = {"datasets": [], "models": [], "sensors": defaultdict(list), "warnings": defaultdict(int)}
    for block in _records(ds):
        for row in block:
            kind, who = _str(row["kind"]), (int(row["rank"]), int(row["attempt"]))
            if kind == "warning":
                found["warnings"][who] += 1
            elif kind in ("dataset", "model", "sensor"):
                record = json.loads(row["json"])
                fields = {k: v for k, v in record.items() if k not in ("kind", "time")}
                if kind == "sensor":
                    found["sensors"][who].append(fields)
                else:
                    name = fields.pop("label" if kind == "dataset" else "model_name", "")
                    found[f"{kind}s"].append(RankRecord(*who, _str(name), fields))
    return found


def _rank(row: np.void, per_rank: dict[str, Any]) -> RankAttempt:
    start = json.loads(row["start"]) if _str(row["start"]) else {}
    who = (int(row["rank"]), int(row["attempt"]))
    sensors = tuple(per_rank["sensors"].get(who, ()))
    return RankAttempt(
        rank=who[0], attempt=who[1], status=_str(row["status"]), complete=bool(row["complete"]),
        node_rank=int(row["node_rank"]), local_rank=int(row["local_rank"]), hostname=_str(row["hostname"]),
        start_time=_num(row["start_time"]), end_time=_num(row["end_time"]), last_time=_num(row["last_time"]),
        shard=_str(row["shard"]), shard_sha256=_str(row["shard_sha256"]), reason=_str(row["reason"]),
        topology=start.get("topology") if isinstance(start.get("topology"), dict) else {},
        environment=start.get("environment") if isinstance(start.get("environment"), dict) else {},
        gpu_uuids=tuple(sorted(set(_uuids(sensors)))), sensors=sensors,
        warnings=per_rank["warnings"].get(who, 0))


def _uuids(value: Any, under_uuid_key: bool = False) -> Iterator[str]:
    """GPU UUIDs wherever the sampler put them: string values under a key naming 'uuid'."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _uuids(item, "uuid" in str(key).lower())
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _uuids(item, under_uuid_key)
    elif under_uuid_key and isinstance(value, str):
        yield value


def _series(f: h5py.File, table: str) -> list[SeriesSummary]:
    """Column by column (``tolist``), not row by row: 1,000 ranks x 2,000 keys are 2 million rows.
    Series with the same ``extra`` text share one (read-only) dict."""
    dataset = layout.table_path(table, layout.ROWS)
    rows = f[table][layout.SERIES][()]
    columns = {name: rows[name].tolist() for name in rows.dtype.names}
    texts = {name: [_str(v) for v in columns[name]] for name in ("key", "context", "source", "extra")}
    extras: dict[str, Any] = {}
    for text in set(texts["extra"]):
        extras[text] = json.loads(text)
    return [SeriesSummary(dataset, i, *fields) for i, fields in enumerate(zip(
        texts["key"], texts["context"], texts["source"], columns["rank"], columns["attempt"], columns["group"],
        columns["row_start"], columns["row_stop"], columns["count"], columns["nonfinite"], columns["runs"],
        columns["first_step"], columns["last_step"], columns["min"], columns["max"], columns["last"],
        columns["first_time"], columns["last_time"], (extras[t] for t in texts["extra"]), strict=True))]


def _groups(f: h5py.File, table: str) -> list[GroupSummary]:
    slowest: dict[int, dict[int, int]] = defaultdict(dict)
    for row in f[table][layout.SLOWEST][()]:
        slowest[int(row["group"])][int(row["rank"])] = int(row["steps"])
    dataset = layout.table_path(table, layout.CROSSRANK)
    return [GroupSummary(
        table=table, dataset=dataset, index=g, key=_str(r["key"]), context=_str(r["context"]),
        source=_str(r["source"]), attempt=int(r["attempt"]),
        series=tuple(range(int(r["series_start"]), int(r["series_stop"]))), stat_start=int(r["stat_start"]),
        stat_stop=int(r["stat_stop"]), multi_rank_steps=int(r["multi_rank_steps"]),
        slowest_rank=int(r["slowest_rank"]), slowest_steps=int(r["slowest_steps"]), skew_mean=float(r["skew_mean"]),
        skew_max=float(r["skew_max"]), skew_max_step=int(r["skew_max_step"]), slowest_counts=slowest.get(g, {}))
        for g, r in enumerate(f[table][layout.GROUPS][()])]


def _artifacts(group: h5py.Group) -> list[Artifact]:
    generations: dict[int, list[Generation]] = defaultdict(list)
    for r in group[layout.GENERATIONS][()]:
        generations[int(r["content"])].append(Generation(
            rank=int(r["rank"]), attempt=int(r["attempt"]), name=_str(r["name"]), path=_str(r["path"]),
            item=_str(r["item"]), model_name=_str(r["model_name"]), version=int(r["version"]),
            context=_str(r["context"]), time=float(r["time"])))
    return [Artifact(sha256=_str(r["sha256"]), size=int(r["size"]), item=_str(r["item"]), name=_str(r["name"]),
                     path=_str(r["path"]), present=int(r["present"]), directory=bool(r["directory"]),
                     generations=tuple(generations[i])) for i, r in enumerate(group[layout.CONTENT][()])]


def _energy(rows: np.ndarray) -> list[EnergyTotal]:
    totals: dict[tuple[str, str], dict[str, float]] = {}
    for r in rows:
        totals.setdefault((_str(r["scope"]), _str(r["name"])), {})[_str(r["field"])] = float(r["value"])
    return [EnergyTotal(scope, name, fields) for (scope, name), fields in totals.items()]
