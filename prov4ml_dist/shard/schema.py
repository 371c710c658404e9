"""The on-disk layout of a rank's shard: every name lives here, nowhere else.

A shard is an HDF5 file written by exactly one process, in SWMR mode so that a SIGKILL at
any moment leaves a file that opens (with ``swmr=True``) and holds everything flushed.
SWMR forbids creating objects once writing starts, so the layout is fixed:

- file attributes (written before SWMR starts): ``format``, ``schema_version``, ``run_id``,
  ``experiment_name``, ``rank``, ``attempt`` (see ``attempt_number``; both in [0, 2**20)),
  ``created`` (unix s);
- ``/metrics`` and ``/system``: append-only tables of ``ROW_DTYPE`` rows; ``series`` is an id
  declared by a ``series`` record in the journal before its first row is flushed;
- ``/journal``: append-only UTF-8 JSON Lines as ``uint8``; every record is a JSON object with
  ``kind`` and ``time`` (unix seconds). A torn last line (crash mid-write) is ignored.

Beside the shard while it is open (removed at a clean close): ``<shard>.ring`` and
``<shard>.wal``, the crash ring and journal WAL that hold what is not flushed yet (``ring.py``).

Journal record kinds and their fields (besides ``kind`` and ``time``):

- ``start``: ``run_id``, ``experiment_name``, ``user_namespace``, ``topology`` (dict),
  ``environment`` (dict), ``settings`` (dict); always the first record;
- ``series``: ``table`` (``metrics``/``system``), ``id``, ``key``, ``context``, ``source``,
  plus free-form extras for system series (``unit``, ``device``, ``scope``);
- ``param``: ``key``, ``value`` (JSON value; non-JSON values as their ``repr``);
- ``artifact``: ``name``, ``context``, ``step``, ``timestamp``, ``path`` (relative to the rank
  root when ``copied``, else absolute), ``size``, ``sha256``, ``copied``, ``item`` (``artifact``,
  ``model``, ``model_version``, ``model_layers``), ``model_name`` and ``version`` for models;
- ``model``: ``model_name`` and model information (parameters, memory footprint, class);
- ``dataset``: ``label`` and ``stats`` (dict);
- ``sensor``: what the sampler found or lost (``name``, ``available``, ``reason``, ...);
- ``energy``: the sampler's totals at stop: ``gpus`` (per GPU: ``uuid``, ``joules``, ``method``
  ``counter``/``integrated_power``), ``rapl`` (per domain), ``gpu_joules``, ``rapl_joules``;
- ``warning``: ``where``, ``message`` — a failure that was survived, never silent (the shard
  writer records the first failed flush of a series, and the flush that works again);
- ``end``: ``status``, ``rows`` (dict table → rows written), ``series_rows`` (dict table → list
  of rows written per series id, so the merge need not count them), ``failures`` (the first
  messages of failed flushes), ``failure_count``, ``lost_rows`` (dict table → rows dropped by failed
  flushes), ``lost_journal_bytes``, ``ring_waits`` (dict table → logging calls that found the
  crash ring full and waited for the flusher) and ``written_by`` (``flusher thread`` or ``drain
  process``: see ``drain.py``); present only after a clean close. Every point logged
  before the close is in ``rows`` or in ``lost_rows``.
"""

from __future__ import annotations

import numpy as np

FORMAT = "prov4ml_dist.shard"
SCHEMA_VERSION = 1

TABLES = ("metrics", "system")
JOURNAL = "journal"

ROW_DTYPE = np.dtype([("series", "<i4"), ("step", "<i8"), ("value", "<f8"), ("time", "<f8")])

# Small chunks: a chunk is allocated whole, so a 200-point run's shard is tens of KB, not a
# 16,384-row chunk (458 KB); the flusher's batches still span whole chunks at 10⁶ points.
TABLE_CHUNK_ROWS = 1024
JOURNAL_CHUNK_BYTES = 4096

SHARDS_DIR = "shards"
ARTIFACTS_DIR = "artifacts"


# A rank runs again after a torchrun restart (TORCHELASTIC_RESTART_COUNT) and after Slurm
# requeues the job (SLURM_RESTART_COUNT: same job id, hence same run id), and torchrun counts
# from 0 again in each requeued run. One number names the attempt, so that the merge keeps its
# (rank, attempt) key: requeue * RESTARTS_PER_REQUEUE + restart, chronological, and readable
# in decimal (1002 = requeue 1, restart 2).
RESTARTS_PER_REQUEUE = 1000
MAX_ATTEMPT = 1 << 20  # the reader refuses attempts from here on


def attempt_number(restart_count: int, requeue_count: int = 0) -> int:
    """The shard's ``attempt`` for a torchrun restart count within a Slurm requeue count."""
    if not 0 <= restart_count < RESTARTS_PER_REQUEUE:
        raise ValueError(f"torchrun restart count {restart_count} outside [0, {RESTARTS_PER_REQUEUE})")
    attempt = requeue_count * RESTARTS_PER_REQUEUE + restart_count
    if not 0 <= attempt < MAX_ATTEMPT:
        raise ValueError(f"Slurm requeue count {requeue_count} outside [0, {MAX_ATTEMPT // RESTARTS_PER_REQUEUE})")
    return attempt


def attempt_label(attempt: int) -> str:
    """``""`` for the first attempt, else ``restart-2``, ``requeue-1`` or ``requeue-1.restart-2``."""
    requeue, restart = divmod(attempt, RESTARTS_PER_REQUEUE) if attempt > 0 else (0, 0)
    return ".".join([f"requeue-{requeue}"] * bool(requeue) + [f"restart-{restart}"] * bool(restart))


def attempt_stem(rank: int, attempt: int = 0) -> str:
    """``rank-00003``, ``rank-00003.restart-1``, ``rank-00003.requeue-1``: the shard's name
    without ``.h5``, also the name of the rank attempt in PROV."""
    label = attempt_label(attempt)
    return f"rank-{rank:05d}.{label}" if label else f"rank-{rank:05d}"


def shard_name(rank: int, attempt: int = 0) -> str:
    """``rank-00003.h5``; every further attempt its own file (``attempt_stem``)."""
    return f"{attempt_stem(rank, attempt)}.h5"


def rank_artifacts_dir(rank: int) -> str:
    """Per-rank artifact directory, relative to the run directory."""
    return f"{ARTIFACTS_DIR}/rank-{rank:05d}"
