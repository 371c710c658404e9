"""``merge_run``: the shards (and artifact files) of a run → ``merged.h5`` + ``prov.json``.

A pure function of what is in the run directory: the online merge (rank 0 at end_run) and
the offline ``prov4ml-dist merge`` call it alike and get the same files. Outputs are written
under temporary names and moved into place, so a reader never sees half a merge and a
second merge replaces the first.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import h5py

from .. import __version__  # the code that merged, also when run from a checkout
from ..errors import MergeError
from ..paths import atomic_target, remove_stale_temporaries
from ..shard import schema
from ..shard.reader import MAX_RANK
from . import compress, layout
from .crossrank import CrossRank
from .journal import Journal, dumps, hostname, node_rank, rank_number
from .load import load_merged
from .parallel import MergeWorkers
from .rowstage import RowStage
from .scan import (
    RowBudget,
    RowCountMismatch,
    ShardHasher,
    ShardInfo,
    close_kept,
    default_shards,
    read_shards,
    recount,
    select_shards,
)
from .series import SeriesIndex, build_index, copy_shard, table_plan
from .store import write_table

Progress = Callable[[str, int, int], None]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MergeResult:
    merged_h5: Path
    prov_json: Path
    problems: list[str]


# merged.h5 + prov.json against the shards' size: rows grow by a rank column, and cross-rank
# statistics add a row per step of each key logged by several ranks.
SPACE_FACTOR = 1.5


def recorded_missing_ranks(run_dir: Path) -> dict[int, str]:
    """The ranks the online merge had to do without, and why, from ``aggregate.json``: so an
    offline merge of the same run gives the same result. Untrusted input: checked, never fatal."""
    try:
        report = json.loads((run_dir / layout.AGGREGATE_REPORT).read_text(encoding="utf-8"))
        missing = report["missing"]
        return {int(rank): str(reason)[:1000] for rank, reason in missing.items()
                if str(rank).isdigit() and isinstance(reason, str)}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def merge_run(run_dir: Path, *, shard_paths: Sequence[Path] | None = None,
              missing_ranks: Mapping[int, str] | None = None, world_size: int | None = None,
              progress: Progress | None = None, jobs: int = 1) -> MergeResult:
    """Merge the shards of ``run_dir``; bad shards are reported in ``problems``, not raised.
    ``jobs`` > 1 reads, copies and compares the shards in that many processes
    (``parallel.py``); the files are the same as with one.

    Raises ``MergeError`` only when no shard of the run can be read or the outputs cannot
    be written.
    """
    run_dir = Path(run_dir)
    report = progress or _silent
    problems: list[str] = []
    paths = list(shard_paths) if shard_paths is not None else default_shards(run_dir)
    jobs = max(1, min(int(jobs), len(paths)))
    with contextlib.ExitStack() as stack:
        workers = stack.enter_context(MergeWorkers(jobs)) if jobs > 1 else None
        report("scan", 0, len(paths))
        if workers is not None:
            found = workers.scan(paths, problems, lambda n: report("scan", n, len(paths)))
        else:
            found = read_shards(paths, problems, RowBudget(), lambda n: report("scan", n, len(paths)))
        stack.callback(close_kept, found)
        shards = select_shards(found, problems, run_dir.name)
        report("scan", len(paths), len(paths))
        if not shards:
            raise MergeError(f"no readable shard in {run_dir / schema.SHARDS_DIR}"
                             + (": " + "; ".join(problems) if problems else ""))
        with merge_outputs(run_dir, report) as tmp_merged:
            _check_space(run_dir, shards)
            with ShardHasher(shards) as hasher, h5py.File(tmp_merged, "w") as out:
                missing = dict(missing_ranks) if missing_ranks is not None else recorded_missing_ranks(run_dir)
                _write(out, run_dir, shards, world_size, problems, report, workers)
                hasher.fill(problems)
                _write_ranks(out, shards, missing, problems)
    return MergeResult(run_dir / layout.MERGED_NAME, run_dir / layout.PROV_NAME, problems)


@contextlib.contextmanager
def merge_outputs(run_dir: Path, report: Progress) -> Iterator[Path]:
    """Where the block writes merged.h5; prov.json is then made from it, and both are moved
    into place only once complete. An ``OSError`` becomes a ``MergeError``."""
    # Imported here: provenance builds on merge.model, so a module-level import would be a cycle.
    from ..provenance import build_prov_json, write_prov_json

    for name in remove_stale_temporaries(run_dir):  # a merge that crashed: its space is needed now
        log.warning("prov4ml_dist: removed %s, left by a merge that did not finish", name)
    try:
        with (atomic_target(run_dir / layout.MERGED_NAME) as tmp_merged,
              atomic_target(run_dir / layout.PROV_NAME) as tmp_prov):
            yield tmp_merged
            report("prov", 0, 1)
            write_prov_json(build_prov_json(load_merged(tmp_merged)), tmp_prov)
            report("prov", 1, 1)
    except OSError as exc:
        raise MergeError(f"cannot write the merge of {run_dir}: {exc}") from None


def _check_space(run_dir: Path, shards: list[ShardInfo]) -> None:
    """Refuse a merge that cannot fit before HDF5 starts writing: h5py leaves a file whose
    writes failed on a full disk half-closed, and the process then dies at exit (SIGSEGV)."""
    need = int(SPACE_FACTOR * sum(s.path.stat().st_size for s in shards)) + (256 << 10)
    try:
        stat = os.statvfs(run_dir)
    except OSError:
        return
    free = stat.f_bavail * stat.f_frsize
    if free < need:
        raise MergeError(f"not enough space to merge {run_dir}: {free:,} bytes free, about {need:,} needed; "
                         "free some space and run `prov4ml-dist merge` on it")


def _silent(stage: str, done: int, total: int) -> None:
    """The default progress callback."""



def _write(out: h5py.File, run_dir: Path, shards: list[ShardInfo], world_size: int | None, problems: list[str],
           report: Progress, workers: MergeWorkers | None) -> None:
    write_header(out, shards, world_size)
    write_journal(out, run_dir, shards, problems)

    # The rows, staged uncompressed until complete (rowstage.py), compressed into merged.h5 chunk by
    # chunk as they are (compress.py): during the copy and the cross-rank pass, in threads.
    with compress.staging(run_dir) as stage, compress.threads() as pool:
        rows = RowStage(stage)
        indexes, compressors = _copy_all(out, rows, shards, problems, report, workers, pool)
        try:
            if workers is None:
                for compressor in compressors.values():
                    compressor.submit_all()  # what the copy did not complete
            for done, index in enumerate(indexes):
                report("crossrank", done, len(indexes))
                group = out[index.table]
                if workers is not None:
                    workers.crossrank(group, index, rows, compressors[index.table])
                else:
                    CrossRank.in_threads(group, index, rows.rows(index.table), compress.cores())
                write_table(group, layout.SERIES, layout.SERIES_DTYPE, index.series)
                write_table(group, layout.GROUPS, layout.GROUP_DTYPE, index.groups)
            for compressor in compressors.values():
                compressor.finish()
        finally:
            for compressor in compressors.values():
                compressor.abandon()
        report("crossrank", len(indexes), len(indexes))


def write_header(out: h5py.File, shards: list[ShardInfo], world_size: int | None) -> None:
    """The root attributes but the problems (they come last, with the ranks table)."""
    first = shards[0].start
    out.attrs["format"] = layout.FORMAT
    out.attrs["layout_version"] = layout.LAYOUT_VERSION
    out.attrs["run_id"] = str(first.get("run_id", ""))
    out.attrs["experiment_name"] = str(first.get("experiment_name", ""))
    namespace = first.get("user_namespace")
    out.attrs["user_namespace"] = namespace if isinstance(namespace, str) else ""
    environment = first.get("environment")
    user = environment.get("user") if isinstance(environment, dict) else None
    out.attrs["user"] = user if isinstance(user, str) else ""
    out.attrs["world_size"] = _world_size(shards, world_size)
    # pid and host: the PROV merge activity is online when they are rank 0's (issue 13).
    out.attrs[layout.STAMP_ATTR] = json.dumps({"merged_at": time.time(), "version": __version__, "pid": os.getpid(),
                                               "host": socket.gethostname()})


def write_journal(out: h5py.File, run_dir: Path, shards: list[ShardInfo], problems: list[str]) -> None:
    """The journal tables, and each shard's own problems, in (rank, attempt) order."""
    journal = Journal(out, run_dir, problems)
    for shard in shards:
        journal.add(shard)
        problems.extend(_shard_problems(shard))
    journal.write(out)


def _write_ranks(out: h5py.File, shards: list[ShardInfo], missing: dict[int, str], problems: list[str]) -> None:
    """The ranks table and the problems, last: they need the shards' sha256."""
    write_table(out, layout.RANKS, layout.RANK_DTYPE, _rank_rows(shards, missing, int(out.attrs["world_size"])))
    problems.extend(f"rank {r}: missing ({missing.get(r) or 'no shard found'})"
                    for r in _missing(shards, missing, int(out.attrs["world_size"])))
    out.attrs[layout.PROBLEMS_ATTR] = json.dumps(problems)


def _copy_all(out: h5py.File | None, stage: RowStage, shards: list[ShardInfo], problems: list[str],
              report: Progress, workers: MergeWorkers | None,
              pool: ThreadPoolExecutor | None) -> tuple[list[SeriesIndex], dict[str, compress.RowCompressor]]:
    """Lay out and copy every row; each table's compressor (into ``out``, in ``pool``) gets the
    chunks the copy completes. Without ``out`` the rows are only staged (a node's part numbers
    them anew before it compresses them). Row counts from end records are checked on the way; if
    one was wrong, those shards are counted and the copy is done again."""
    while True:  # twice at most: a recount leaves no count from an end record
        indexes = [build_index(table, shards) for table in schema.TABLES]
        compressors = {}
        for index in indexes:
            stage.create(index.table, index.total_rows)
            if out is None or pool is None:
                continue
            group = out.require_group(index.table)
            dataset = compress.create_rows(group, layout.ROWS, index.total_rows, layout.ROW_DTYPE)
            compressors[index.table] = compress.RowCompressor(dataset, stage.rows(index.table), pool)
        try:
            if workers is not None:
                workers.copy(shards, indexes, stage, lambda n: report("copy", n, len(shards)))
            else:
                _copy(shards, indexes, stage, report, compressors)
            report("copy", len(shards), len(shards))
            return indexes, compressors
        except RowCountMismatch as exc:
            trusted = [s for s in shards if any(decl.from_end for decl in s.tables.values())]
            _drop(out, compressors)
            if not trusted:
                raise
            problems.append(f"row counts in end records disagree with the rows ({exc}); counted them instead")
            recount(trusted)
        except BaseException:
            _drop(out, compressors)
            raise


def _drop(out: h5py.File | None, compressors: dict[str, compress.RowCompressor]) -> None:
    """Stop compressing rows laid out wrongly, and remove them."""
    for table, compressor in compressors.items():
        compressor.abandon()
        del out[table][layout.ROWS]


def _copy(shards: list[ShardInfo], indexes: list[SeriesIndex], stage: RowStage, report: Progress,
          compressors: dict[str, compress.RowCompressor]) -> None:
    """Every row of every shard, in this process; after each shard, the chunks it completed
    are compressed meanwhile."""
    writers = {index.table: stage.writer(index.table) for index in indexes}
    try:
        for n, shard in enumerate(shards):
            report("copy", n, len(shards))
            tables = {index.table: table_plan(index, shard, n) for index in indexes}
            copy_shard(shard, tables, writers)
            for index in indexes:
                plan = tables[index.table]
                index.series[plan.ids] = plan.series
                if index.table in compressors:
                    compressors[index.table].staged(plan.series["row_start"], plan.series["row_stop"])
    finally:
        for writer in writers.values():
            writer.close()


def _shard_problems(shard: ShardInfo) -> list[str]:
    who = f"rank {shard.rank} attempt {shard.attempt}"
    found = [f"{who}: {decl.undeclared} rows of {table!r} with undeclared series ids dropped"
             for table, decl in shard.tables.items() if decl.undeclared]
    found += [f"{who}: {problem}" for problem in shard.problems]
    if shard.end is None:
        found.append(f"{who}: incomplete (no end record: it crashed or is still running); "
                     "merged up to its last flush, and what its crash ring kept")
    elif shard.end.get("status") != "ok":
        found.append(f"{who}: incomplete (it closed its shard without end_run: {str(shard.end.get('status'))[:80]})")
    if shard.end is not None:
        failed = shard.end.get("failure_count")
        failed = failed if isinstance(failed, int) else len(shard.end.get("failures") or [])
        lost = shard.end.get("lost_rows")
        lost = sum(v for v in lost.values() if isinstance(v, int)) if isinstance(lost, dict) else 0
        if failed or lost:
            found.append(f"{who}: {failed} flush failures recorded, {lost} points lost")
    return found


def _world_size(shards: list[ShardInfo], expected: int | None) -> int:
    """The job's size: as told, else the largest a start record claims within MAX_RANK."""
    if expected is not None:
        return min(int(expected), MAX_RANK)
    sizes = [s.start["topology"].get("world_size") for s in shards if isinstance(s.start.get("topology"), dict)]
    sizes = [v for v in sizes if isinstance(v, int) and not isinstance(v, bool) and 0 < v <= MAX_RANK]
    return max([*sizes, max(s.rank for s in shards) + 1])


def _missing(shards: list[ShardInfo], missing: dict[int, str], world_size: int) -> list[int]:
    present = {s.rank for s in shards}
    return sorted((set(range(world_size)) | {r for r in missing if 0 <= r < MAX_RANK}) - present)


def _rank_rows(shards: list[ShardInfo], missing: dict[int, str], world_size: int) -> list[tuple]:
    rows = []
    for s in shards:
        topology = s.start.get("topology") if isinstance(s.start.get("topology"), dict) else {}
        local = rank_number(topology.get("local_rank"))
        status = (str(s.end.get("status", "ok")) if s.end is not None else layout.STATUS_INCOMPLETE)
        complete, reason = status == "ok", missing.get(s.rank, "")
        if complete and isinstance(s.start.get("not_logging"), str):  # ended as planned, by choice silent
            status, reason = layout.STATUS_NOT_LOGGING, s.start["not_logging"]
        end_time = s.end.get("time") if s.end is not None else None
        rows.append((s.rank, s.attempt, node_rank(s), local,
                     hostname(s), status, complete, _float(s.start.get("time")), _float(end_time),
                     s.last_time, s.path.name, s.sha256, reason, dumps(s.start),
                     dumps(s.end) if s.end is not None else ""))
    rows += [(r, layout.NO_VALUE, layout.NO_VALUE, layout.NO_VALUE, "", layout.STATUS_MISSING, False, math.nan,
              math.nan, math.nan, "", "", missing.get(r) or "no shard found", "", "")
             for r in _missing(shards, missing, world_size)]
    return sorted(rows, key=lambda row: (row[0], row[1]))


def _float(value: object) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


