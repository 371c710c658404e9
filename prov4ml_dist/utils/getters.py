"""yProv4ML's reading API (``yprov4ml.utils.getters``) over a merged run.

``source`` is a run directory, its ``prov.json`` or ``merged.h5`` (or an already loaded
PROV-JSON dict for the graph questions). Questions about the PROV graph (activities,
entities, their attributes) are answered from ``prov.json``; metrics — every point of every
rank — from ``merged.h5``. Tables are pandas DataFrames when pandas is installed, else lists
of dicts (metric points: a dict of NumPy columns).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..merge import load_merged
from ..merge.layout import MERGED_NAME, PROV_NAME, ROWS, table_path

PREFIXES = ("p4d:", "prov:", "run:", "")
YPROV_PREFIXES = ("yprov:", "provml:")  # yProv4ML's prefixes; ours is p4d:


def _run_dir(source: str | os.PathLike) -> Path:
    path = Path(source)
    return path.parent if path.is_file() else path


def _doc(source: dict | str | os.PathLike) -> dict[str, Any]:
    if isinstance(source, dict):
        return source
    path = Path(source)
    if path.is_dir() or path.name == MERGED_NAME:
        path = _run_dir(path) / PROV_NAME
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def _ours(name: str) -> str:
    """yProv4ML's ``yprov:x`` / ``provml:X`` as our ``p4d:`` term."""
    for prefix in YPROV_PREFIXES:
        if name.startswith(prefix):
            return "p4d:" + name[len(prefix):]
    return name


def _unwrap(value: Any) -> Any:
    return value["$"] if isinstance(value, dict) and "$" in value else value


def _table(rows: list[dict[str, Any]]) -> Any:
    try:
        import pandas as pd
    except ImportError:
        return rows
    return pd.DataFrame(rows)


def _find(doc: dict[str, Any], name: str) -> dict[str, Any]:
    """An activity or entity by id, id without prefix, or label."""
    records = {**doc.get("activity", {}), **doc.get("entity", {}), **doc.get("agent", {})}
    for prefix in PREFIXES:
        if prefix + name in records:
            return records[prefix + name]
    for key, record in records.items():
        if key.split(":", 1)[-1] == name or record.get("prov:label") == name:
            return record
    raise KeyError(f"no activity, entity or agent named {name!r}; list_activities() / list_entities() list them")


def list_activities(source: dict | str | os.PathLike) -> list[str]:
    return list(_doc(source).get("activity", {}))


def list_entities(source: dict | str | os.PathLike, entity_type: str | None = None) -> list[str]:
    """Entity ids, optionally of one ``prov:type`` (``p4d:Model``; yProv4ML's ``provml:Model`` too)."""
    entities = _doc(source).get("entity", {})
    if entity_type is None:
        return list(entities)
    wanted = _ours(entity_type)
    return [k for k, v in entities.items() if wanted in _types(v)]


def _types(record: dict[str, Any]) -> set[Any]:
    """A record's ``prov:type`` values (PROV-JSON gives one, or a list when there are several)."""
    types = record.get("prov:type")
    return {_unwrap(t) for t in (types if isinstance(types, list) else [types])}


def get_parameter(source: dict | str | os.PathLike, name: str, param: str, unwrap: bool = True) -> Any:
    """One attribute of an activity or entity (``run_id``, ``p4d:run_id``, ``yprov:run_id``,
    ``prov:startTime``); None when it has no such attribute."""
    record = _find(_doc(source), name)
    param = _ours(param)
    for candidate in (param, *(p + param for p in PREFIXES if ":" not in param)):
        if candidate in record:
            return _unwrap(record[candidate]) if unwrap else record[candidate]
    return None


def list_parameters(source: dict | str | os.PathLike, name: str | None = None, unwrap: bool = True) -> dict[str, Any]:
    doc = _doc(source)
    records = [_find(doc, name)] if name else [*doc.get("activity", {}).values(), *doc.get("entity", {}).values()]
    out: dict[str, Any] = {}
    for record in records:
        out.update({k: _unwrap(v) if unwrap else v for k, v in record.items()})
    return out


def _series(source: str | os.PathLike, context: str | None, origin: str | None, key: str | None = None) -> list:
    run = load_merged(_run_dir(source) / MERGED_NAME)
    return [s for s in run.series if s.dataset == table_path("metrics", ROWS)
            and (context is None or s.context == context) and (origin is None or s.source == origin)
            and (key is None or s.key == key)]


def list_metrics(data: str | os.PathLike, context: str | None = None, source: str | None = None) -> Any:
    """One row per metric series and rank: label, context, source, rank, points, steps, min,
    max, last, and where its points are in merged.h5."""
    return _table([{"label": s.key, "context": s.context, "source": s.source, "rank": s.rank, "attempt": s.attempt,
                    "points": s.count, "first_step": s.first_step, "last_step": s.last_step, "min": s.min,
                    "max": s.max, "last": s.last, "path": f"{MERGED_NAME}:{s.dataset}[{s.row_start}:{s.row_stop}]"}
                   for s in _series(data, context, source)])


def list_metric_paths(data: str | os.PathLike, context: str | None = None, source: str | None = None,
                      file_type: str | None = None) -> dict[str, str]:
    """``{key_context_source_rankN: "merged.h5:/metrics/rows[a:b]"}`` (every series is HDF5 here:
    a ``file_type`` other than h5/hdf5 matches nothing)."""
    if file_type not in (None, "h5", "hdf5"):
        return {}
    return {f"{s.key}_{s.context}_{s.source}_rank{s.rank}": f"{MERGED_NAME}:{s.dataset}[{s.row_start}:{s.row_stop}]"
            for s in _series(data, context, source)}


def get_metric(data: str | os.PathLike, name: str | None = None, context: str | None = None,
               source: str | None = None) -> Any:
    """Every point of metric ``name`` (in ``context``, from ``source``) of every rank: columns
    rank, step, value, time; None when there is no such metric."""
    found = _series(data, context, source, name)
    if not found:
        return None
    parts = []
    with h5py.File(_run_dir(data) / MERGED_NAME, "r") as f:
        rows = f[found[0].dataset]
        for s in found:
            parts.append(rows[s.row_start:s.row_stop])
    points = np.concatenate(parts)
    columns = {"rank": points["rank"], "step": points["step"], "value": points["value"], "time": points["time"]}
    try:
        import pandas as pd
    except ImportError:
        return columns
    return pd.DataFrame(columns)


def list_runs_in_proj(path: str | os.PathLike) -> list[Path]:
    """The run directories of an experiment directory."""
    return sorted(p for p in Path(path).iterdir() if p.is_dir())


def list_provjson_in_proj(path: str | os.PathLike) -> list[Path]:
    """The prov.json of each merged run of an experiment directory."""
    return [run / PROV_NAME for run in list_runs_in_proj(path) if (run / PROV_NAME).is_file()]
