"""Finding, checking and reading the journals of the shards of a run (untrusted input).

A shard that cannot be read, is foreign, truncated, or belongs to another run than the
majority is reported as a problem and left out; the others merge.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..artifacts import sha256_file
from ..errors import MergeError, ShardError
from ..shard import ShardReader, schema
from .compress import behind

# What reading a damaged file can raise: the reader's own error, and HDF5's when a corrupt
# file gets past the reader's checks (e.g. a chunk index cut off by truncation).
BAD_SHARD = (ShardError, OSError, RuntimeError)
HASH_THREADS = 4
# The copy must not open and check a shard again (with thousands of small shards, opening
# them was most of a merge): the scan keeps the rows of a small shard in memory, and leaves a
# larger one open. Past these budgets a shard is opened again by the copy, where its own rows
# then dwarf the cost of opening it.
ROW_CACHE_BYTES = 512 << 20
SMALL_SHARD_BYTES = 4 << 20  # rows kept in memory up to this size; above, reading them twice costs more
OPEN_SHARDS = 256  # shards left open (file descriptors)


@dataclass
class TableDecl:
    """The series a shard declared for one table, and how many rows it had when scanned."""

    ids: np.ndarray  # sorted declared ids
    decls: list[dict[str, Any]]  # aligned with ids
    counts: np.ndarray  # rows per declared series
    rows: int  # rows in the table when scanned; later passes read no more
    undeclared: int  # rows whose series id was never declared (dropped)
    from_end: bool = False  # counts taken from the end record (checked while copying), not counted


class RowCountMismatch(MergeError):
    """A series had more or fewer rows than its count: the shard changed while it was merged,
    or its end record's per-series counts were wrong."""


@dataclass
class ShardInfo:
    """One readable shard of the run: identity, journal and row counts."""

    path: Path
    rank: int
    attempt: int
    start: dict[str, Any]
    end: dict[str, Any] | None
    records: list[dict[str, Any]]  # every record except start, end and series
    tables: dict[str, TableDecl]
    last_time: float = math.nan
    problems: list[str] = field(default_factory=list)
    sha256: str = ""  # of the shard file as merged (ShardHasher): validate checks the file against it
    run_id: str = ""
    rows: dict[str, np.ndarray] | None = None  # the tables' rows, read by the scan when they fit its budget
    reader: ShardReader | None = None  # left open by the scan for the copy, when its budget allowed


class RowBudget:
    """What is left of ``ROW_CACHE_BYTES`` and ``OPEN_SHARDS`` for what the scan keeps."""

    def __init__(self, limit: int | None = None, open_shards: int | None = None) -> None:
        self.left = ROW_CACHE_BYTES if limit is None else limit
        self.open_left = OPEN_SHARDS if open_shards is None else open_shards

    def keep_rows(self, nbytes: int) -> bool:
        if nbytes > min(self.left, SMALL_SHARD_BYTES):
            return False
        self.left -= nbytes
        return True

    def keep_open(self) -> bool:
        if self.open_left <= 0:
            return False
        self.open_left -= 1
        return True


def close_kept(shards: Sequence[ShardInfo]) -> None:
    """Close the shards the scan left open (and drop kept rows): the copy is done or failed."""
    for shard in shards:
        if shard.reader is not None:
            shard.reader.close()
        shard.reader, shard.rows = None, None


def default_shards(run_dir: Path) -> list[Path]:
    return sorted((run_dir / schema.SHARDS_DIR).glob("rank-*.h5"))


def choose_run_id(directory_name: str, identities: Sequence[tuple[str, int, int]]) -> str:
    """The run's id among its shards' (run id, rank, attempt): the run directory's name, which
    ``start_run`` gives it, when a shard has it; else (a renamed directory) the majority, ties
    going to the run id of the lowest (rank, attempt) — deterministic either way."""
    votes = Counter(run_id for run_id, _, _ in identities)
    if directory_name in votes:
        return directory_name
    top = max(votes.values())
    return min((rank, attempt, rid) for rid, rank, attempt in identities if votes[rid] == top)[2]


def scan_shards(paths: Sequence[Path], problems: list[str], directory_name: str = "",
                budget: RowBudget | None = None, progress: Callable[[int], None] | None = None) -> list[ShardInfo]:
    """The readable shards of the run (see ``choose_run_id``), sorted by (rank, attempt).
    Each is opened and checked once here; its rows are kept while ``budget`` allows, so that
    the copy need not open it again."""
    return select_shards(read_shards(paths, problems, budget, progress), problems, directory_name)


def read_shards(paths: Sequence[Path], problems: list[str], budget: RowBudget | None = None,
                progress: Callable[[int], None] | None = None) -> list[ShardInfo]:
    """``_read_shard`` of each path, in path order; unreadable ones become problems."""
    found: list[ShardInfo] = []
    for n, path in enumerate(sorted(Path(p) for p in paths)):
        if progress is not None:
            progress(n)
        try:
            found.append(_read_shard(path, budget))
        except BAD_SHARD as exc:
            problems.append(f"skipped shard: {_described(exc, path)}")
    return found


def select_shards(found: list[ShardInfo], problems: list[str], directory_name: str) -> list[ShardInfo]:
    """The shards of the run's id, one per (rank, attempt), sorted by (rank, attempt)."""
    if not found:
        return []
    run_id = choose_run_id(directory_name, [(s.run_id, s.rank, s.attempt) for s in found])
    shards: list[ShardInfo] = []
    seen: set[tuple[int, int]] = set()
    for shard in sorted(found, key=lambda s: (s.rank, s.attempt, str(s.path))):
        if shard.run_id != run_id:
            problems.append(f"skipped shard {shard.path}: run id {shard.run_id!r} is not the run's {run_id!r}")
        elif (shard.rank, shard.attempt) in seen:
            problems.append(f"skipped shard {shard.path}: a second shard of rank {shard.rank} "
                            f"attempt {shard.attempt}")
        else:
            shards.append(shard)
            seen.add((shard.rank, shard.attempt))
    return shards


def _described(exc: BaseException, path: Path) -> str:
    return str(exc) if isinstance(exc, ShardError) else f"{path}: unreadable ({type(exc).__name__}: {exc})"


def _read_shard(path: Path, budget: RowBudget | None = None) -> ShardInfo:
    """Identity, journal and per-series row counts: from the end record of a shard that was
    closed, else counted (the first full read of the rows); the rows too when ``budget`` has
    room for them."""
    reader = ShardReader(path)
    left_open = False
    try:
        run_id, rank, attempt = reader.run_id, reader.rank, reader.attempt
        start, end, decls, records = None, None, {name: {} for name in schema.TABLES}, []
        last_time = -math.inf
        for record in reader.records():
            kind = record["kind"]
            if isinstance(record.get("time"), (int, float)):
                last_time = max(last_time, float(record["time"]))
            if kind == "start" and start is None:
                start = record
            elif kind == "end":
                end = record
            elif kind == "series":
                _declare(decls, record)
            elif kind == "topology" and start is not None and isinstance(record.get("topology"), dict):
                start = {**start, "topology": record["topology"]}  # settled late (Run.settle_topology)
            elif kind == "not_logging" and start is not None:  # a choice (Run.declare_not_logging)
                start = {**start, "not_logging": str(record.get("reason") or "declared not logging")}
            else:
                records.append(record)
        if start is None:
            raise ShardError(f"{path}: no start record (killed before its first flush?)")
        row_bytes = sum(reader.rows(name) for name in schema.TABLES) * schema.ROW_DTYPE.itemsize
        kept = ({name: reader.read_table(name) for name in schema.TABLES}
                if budget is not None and budget.keep_rows(row_bytes) else None)
        tables = {name: _count(reader, name, decls[name], end, None if kept is None else kept[name])
                  for name in schema.TABLES}
        corrupt, ring_rows, ring_records = reader.corrupt_records, sum(reader.ring_rows.values()), reader.ring_records
        left_open = kept is None and budget is not None and budget.keep_open()
    finally:
        if not left_open:
            reader.close()
    problems = [f"{path.name}: {corrupt} corrupt journal records skipped"] if corrupt else []
    if ring_rows or ring_records:  # the count the merge reports of what only the crash ring held
        problems.append(f"{path.name}: {ring_rows} points and {ring_records} journal records recovered from "
                        "its crash ring (accepted before it died, not yet flushed)")
    return ShardInfo(path, rank, attempt, start, end, records, tables,
                     last_time=last_time if last_time > -math.inf else math.nan,
                     problems=problems, run_id=run_id, rows=kept, reader=reader if left_open else None)


class ShardHasher:
    """The shards' sha256, computed in background threads while the merge reads their rows:
    hashlib releases the GIL, so on a node with a spare core the checksum costs no wall time
    (in line, it took as long as reading the rows)."""

    def __init__(self, shards: Sequence[ShardInfo]) -> None:
        workers = max(1, min(HASH_THREADS, (os.cpu_count() or 1) - 1))
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="prov4ml-sha256", initializer=behind)
        self._jobs = [(shard, self._pool.submit(sha256_file, shard.path)) for shard in shards]

    def __enter__(self) -> ShardHasher:
        return self

    def __exit__(self, *exc: object) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def fill(self, problems: list[str]) -> None:
        """Wait for the hashes and set each shard's ``sha256``."""
        for shard, job in self._jobs:
            try:
                shard.sha256 = job.result()[0]
            except OSError as exc:
                problems.append(f"rank {shard.rank} attempt {shard.attempt}: no sha256 of {shard.path.name} ({exc})")


def _declare(decls: dict[str, dict[int, dict[str, Any]]], record: dict[str, Any]) -> None:
    table, ident, key = record.get("table"), record.get("id"), record.get("key")
    if table in decls and isinstance(ident, int) and not isinstance(ident, bool) and isinstance(key, str):
        decls[table].setdefault(ident, record)


def recount(shards: Sequence[ShardInfo]) -> None:
    """Count the rows of shards whose end-record counts turned out wrong."""
    for shard in shards:
        try:
            with ShardReader(shard.path) as reader:
                shard.tables = {name: _count(reader, name, dict(zip(decl.ids.tolist(), decl.decls, strict=True)),
                                             None) for name, decl in shard.tables.items()}
        except BAD_SHARD as exc:
            raise MergeError(f"shard changed while it was merged: {exc}") from None


def _count(reader: ShardReader, table: str, declared: dict[int, dict[str, Any]],
           end: dict[str, Any] | None, kept: np.ndarray | None = None) -> TableDecl:
    """Rows per declared series of ``table``, counted in ``kept`` when the scan read the rows."""
    ids = np.array(sorted(declared), dtype=np.int64)
    rows = reader.rows(table) if kept is None else len(kept)
    known = _counts_in(end, table, rows)
    if known is not None:
        counts = np.zeros(len(ids), dtype=np.int64)
        listed = ids < len(known)
        counts[listed] = known[ids[listed]]
        return TableDecl(ids, [declared[i] for i in ids.tolist()], counts, rows, rows - int(counts.sum()),
                         from_end=True)
    counts = np.zeros(len(ids), dtype=np.int64)
    undeclared = 0
    for chunk in read_rows(reader, table, rows) if kept is None else [kept]:
        idx, valid = local_index(ids, chunk["series"])
        counts += np.bincount(idx[valid], minlength=len(ids))
        undeclared += int(len(chunk) - np.count_nonzero(valid))
    return TableDecl(ids, [declared[i] for i in ids.tolist()], counts, rows, undeclared)


def _counts_in(end: dict[str, Any] | None, table: str, rows: int) -> np.ndarray | None:
    """The end record's rows per series id of ``table`` if they add up to the table's rows."""
    listed = end.get("series_rows") if end is not None else None
    listed = listed.get(table) if isinstance(listed, dict) else None
    if not isinstance(listed, list) or not all(type(c) is int and 0 <= c <= rows for c in listed):
        return None
    known = np.array(listed, dtype=np.int64)
    return known if int(known.sum()) == rows else None


def read_rows(reader: ShardReader, table: str, limit: int):
    """The first ``limit`` rows of a table in bounded slices (a live shard may have grown)."""
    done = 0
    for chunk in reader.iter_rows(table):
        if done + len(chunk) >= limit:
            yield chunk[:limit - done]
            return
        done += len(chunk)
        yield chunk


def local_index(ids: np.ndarray, series: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Position of each row's series among the declared ids, and which rows are declared."""
    if len(ids) and ids[0] == 0 and ids[-1] == len(ids) - 1:  # 0..n-1, as the writer numbers them
        valid = (series >= 0) & (series < len(ids))
        return (series if valid.all() else np.where(valid, series, 0)), valid
    idx = np.searchsorted(ids, series)
    valid = idx < len(ids)
    valid[valid] = ids[idx[valid]] == series[valid]
    return idx, valid


def as_text(value: object) -> str:
    """A string field of an untrusted record: '' when absent, its ``str`` when not a string."""
    return value if isinstance(value, str) else "" if value is None else str(value)
