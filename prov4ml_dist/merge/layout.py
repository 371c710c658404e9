"""The layout of ``merged.h5``: every name and row type lives here, nowhere else.

``merged.h5`` is written by ``merge_run`` only, from the shards of one run; readers use
``load_merged`` (small tables) or slice the row tables directly (points).

Root attributes: ``format``, ``layout_version``, ``run_id``, ``experiment_name``,
``user_namespace``, ``user``, ``world_size``, ``problems`` (JSON list) and ``merge_stamp``
(JSON: when and by which version it was merged) — the only attribute that differs between
two merges of the same shards; equality checks ignore it.

- ``/ranks`` (``RANK_DTYPE``): one row per (rank, attempt) sorted by rank and attempt, with
  completeness (``status``: the end record's status, ``incomplete`` for a shard without an
  end record, ``missing`` for a rank without a shard, attempt -1), topology columns and the
  full ``start`` / ``end`` records as JSON.
- ``/records`` (``RECORD_DTYPE``): every other journal record (param, artifact, model,
  dataset, energy, sensor, warning, ...) as JSON, in (rank, attempt, journal) order.
- ``/params`` (``PARAM_DTYPE``): one row per (key, distinct value) with the ranks holding it;
  ``majority`` marks the value most ranks hold (a tie: the lowest rank's), so disagreements
  are rows with majority 0. A rank's value is the last it logged (its latest attempt's);
  values are compared as canonical JSON, so ``1`` and ``1.0`` differ.
- ``/artifacts/content`` (``CONTENT_DTYPE``): artifacts and model versions content-addressed
  by sha256, sorted by it; ``/artifacts/generations`` (``GENERATION_DTYPE``): which rank
  saved which content under which name, version and path.
- ``/energy`` (``ENERGY_DTYPE``): energy fields summed per rank, per node and for the job.
- ``/metrics`` and ``/system``, one group per shard table, each with:
  - ``rows`` (``ROW_DTYPE``): every point of every rank, ordered by cross-rank group, then
    rank and attempt; each series is one contiguous row range, in logging order; stored with
    shuffle + deflate (``compress.write_compressed``), which every HDF5 reader has;
  - ``series`` (``SERIES_DTYPE``): one row per (key, context, source, rank, attempt); its
    index is the ``series`` column of ``rows``; ``row_start``/``row_stop`` point into ``rows``;
    ``first_step``/``last_step`` are the first and last point's steps in logging order (not
    the least and greatest), ``runs`` is 1 + how often the step went back (0 without points),
    ``min``/``max`` ignore NaN and include ±inf, ``last`` is the last value (NaN too),
    ``nonfinite`` counts NaN and ±inf values;
  - ``groups`` (``GROUP_DTYPE``): one row per (key, context, source, attempt) — the ranks that
    ran together — with its series range, its ``crossrank`` range and the straggler report;
  - ``crossrank`` (``CROSSRANK_DTYPE``): per group of two or more series (every such group,
    whatever its size or step pattern), and step: ranks, points, min, mean, max (NaN ignored;
    the mean never overflows: of finite values it is finite, ``+inf`` or ``-inf`` among them
    gives that infinity, both give NaN), the slowest rank (the latest wall-clock time, a
    rank's latest point when it logged the step again; ties go to the lower rank; -1 when no
    rank has a time, NaN times being ignored) and the time skew (latest minus earliest time
    of that step, over every point: a rank's own gap between repeats counts);
  - the straggler columns of ``groups``: ``slowest_rank`` the rank slowest at most steps
    (ties go to the lower rank), ``skew_mean``/``skew_max`` over steps logged by two or more
    ranks, ``skew_max_step`` the lowest step with the largest skew;
  - ``slowest`` (``SLOWEST_DTYPE``): per group, how many steps each rank was the slowest of
    (steps logged by at least two ranks only).
"""

from __future__ import annotations

import h5py
import numpy as np

FORMAT = "prov4ml_dist.merged"
LAYOUT_VERSION = 1

MERGED_NAME = "merged.h5"
PROV_NAME = "prov.json"
AGGREGATE_REPORT = "aggregate.json"  # written by the online aggregation (aggregate.py); its missing ranks are reused

RANKS = "ranks"
RECORDS = "records"
PARAMS = "params"
ARTIFACTS = "artifacts"
CONTENT = "content"
GENERATIONS = "generations"
ENERGY = "energy"
ROWS = "rows"
SERIES = "series"
GROUPS = "groups"
CROSSRANK = "crossrank"
SLOWEST = "slowest"

STAMP_ATTR = "merge_stamp"
PROBLEMS_ATTR = "problems"

STATUS_INCOMPLETE = "incomplete"
STATUS_MISSING = "missing"
STATUS_NOT_LOGGING = "not-logging"  # ended as planned, recording nothing by choice (its reason says why)
NO_VALUE = -1  # for integer columns that have no value (no attempt, no rank, no version)

STR = h5py.string_dtype()

ROW_DTYPE = np.dtype([("series", "<i4"), ("rank", "<i4"), ("step", "<i8"), ("value", "<f8"), ("time", "<f8")])

RANK_DTYPE = np.dtype([
    ("rank", "<i4"), ("attempt", "<i4"), ("node_rank", "<i4"), ("local_rank", "<i4"), ("hostname", STR),
    ("status", STR), ("complete", "u1"), ("start_time", "<f8"), ("end_time", "<f8"), ("last_time", "<f8"),
    ("shard", STR), ("shard_sha256", STR), ("reason", STR), ("start", STR), ("end", STR)])

RECORD_DTYPE = np.dtype([("rank", "<i4"), ("attempt", "<i4"), ("kind", STR), ("time", "<f8"), ("json", STR)])

PARAM_DTYPE = np.dtype([("key", STR), ("value", STR), ("ranks", STR), ("majority", "u1")])

CONTENT_DTYPE = np.dtype([("sha256", STR), ("size", "<i8"), ("item", STR), ("name", STR), ("path", STR),
                          ("present", "i1"), ("directory", "u1")])

GENERATION_DTYPE = np.dtype([
    ("content", "<i4"), ("rank", "<i4"), ("attempt", "<i4"), ("name", STR), ("path", STR), ("item", STR),
    ("model_name", STR), ("version", "<i8"), ("context", STR), ("time", "<f8"), ("json", STR)])

ENERGY_DTYPE = np.dtype([("scope", STR), ("name", STR), ("field", STR), ("value", "<f8")])

SERIES_DTYPE = np.dtype([
    ("key", STR), ("context", STR), ("source", STR), ("extra", STR), ("rank", "<i4"), ("attempt", "<i4"),
    ("group", "<i4"), ("row_start", "<i8"), ("row_stop", "<i8"), ("count", "<i8"), ("nonfinite", "<i8"),
    ("runs", "<i8"), ("first_step", "<i8"), ("last_step", "<i8"), ("min", "<f8"), ("max", "<f8"),
    ("last", "<f8"), ("first_time", "<f8"), ("last_time", "<f8")])

GROUP_DTYPE = np.dtype([
    ("key", STR), ("context", STR), ("source", STR), ("attempt", "<i4"), ("series_start", "<i8"),
    ("series_stop", "<i8"), ("row_start", "<i8"), ("row_stop", "<i8"), ("stat_start", "<i8"), ("stat_stop", "<i8"),
    ("multi_rank_steps", "<i8"), ("slowest_rank", "<i4"), ("slowest_steps", "<i8"), ("skew_mean", "<f8"),
    ("skew_max", "<f8"), ("skew_max_step", "<i8")])

CROSSRANK_DTYPE = np.dtype([
    ("group", "<i4"), ("step", "<i8"), ("ranks", "<i4"), ("count", "<i8"), ("min", "<f8"), ("mean", "<f8"),
    ("max", "<f8"), ("slowest_rank", "<i4"), ("skew", "<f8")])

SLOWEST_DTYPE = np.dtype([("group", "<i4"), ("rank", "<i4"), ("steps", "<i8")])

TABLE_CHUNK_ROWS = 16384
ROWS_CHUNK_ROWS = 65536  # 2 MiB chunks of ``rows`` (fewer for a smaller table: chunks sized to the data)
ROWS_DEFLATE_LEVEL = 1  # most of deflate's gain on these rows (6 B/point against 32), in the least time


def table_path(table: str, name: str) -> str:
    """``/metrics/rows`` and friends."""
    return f"/{table}/{name}"
