"""A merge spread over processes (``merge_run(jobs=N)``, ``prov4ml-dist merge --jobs N``).

h5py serialises every HDF5 call of a process, so threads cannot share a merge's work; processes
can. Each worker takes a contiguous range of the shard files and keeps, between the stages, the
shards it read (rows included, while they fit its share of the scan's budget), so a shard is
still opened once:

1. scan: each worker reads its shards' journals and row counts; the parent chooses the run's
   shards and lays out every series (``build_index``), as a single-process merge does;
2. copy: each worker writes its shards' rows into the staging file (``rowstage.py``) at
   the rows the layout gave them (disjoint ranges, so no locking) and returns their summaries;
3. cross-rank: the groups are split into ranges of about equal rows; each worker computes its
   range's statistics and straggler report with the same ``CrossRank`` code; a group's
   statistics do not depend on the range it is in, so the parent only concatenates them
   (``crossrank.gather``). Meanwhile each process compresses a share of the rows' chunks
   (deflate is most of the per-point work): the parent in its threads, straight into
   merged.h5; a worker into a file of its own (``compress.ChunkFile``) the parent stores from.

The parent writes every table of merged.h5 itself, so the file is the same as with one process
(``tests/test_merge_parallel.py`` compares them). A worker that fails or dies fails the merge
with a ``MergeError``, never a hang: the parent notices a closed pipe.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import h5py
from numpy.lib import recfunctions

from ..errors import MergeError
from .compress import ChunkFile, RowCompressor
from .crossrank import CrossRank, gather, ranges
from .rowstage import RowStage, RowWriter, open_rows
from .scan import ROW_CACHE_BYTES, RowBudget, ShardInfo, close_kept, read_shards
from .series import SeriesIndex, TablePlan, copy_shard, table_plan

Tick = Callable[[int], None]
JOIN_SECONDS = 10.0
# What a cross-rank worker needs of the series (the strings stay in the parent).
CROSSRANK_SERIES_FIELDS = ["rank", "group", "row_start", "row_stop", "count", "runs"]
# Below it, starting worker processes (an interpreter each) costs more than they save. What the
# workers share well is the per-shard cost (open, check, summarise), not the per-point cost: on 2
# idle cores `--jobs 2` took 0.53x at 128 shards, 0.98x at 256, 1.41x at 1,024 (x 10^3 points),
# and 0.96x at 32 shards x 10^6 points (README "Merge at thousands of ranks"). Measured again once the
# workers compressed their share too and one process used a second core better (load 0.2-2.7):
# 0.70x at 128, 0.98x at 256, 1.22x at 512, 1.03x at 1,024, 1.32x at 4,096, 0.65x at 8 x 10^6 and
# 0.76x at 32 x 10^6: the same threshold.
PARALLEL_MIN_SHARDS = 512
SYS_PATH_VARIABLE = "PROV4ML_MERGE_WORKER_SYS_PATH"
SCAN_BATCH = 64  # shards per scan request (fewer for a small run: about 4 batches per worker)


def default_jobs(paths: Sequence[Path]) -> int:
    """The cores this process may run on, for a run of enough shards to gain from them; else 1."""
    return len(os.sched_getaffinity(0)) if len(paths) >= PARALLEL_MIN_SHARDS else 1


class MergeWorkers:
    """``jobs`` workers: this process (worker 0, which would otherwise only wait) and
    ``jobs - 1`` processes, started at once so that their imports overlap worker 0's work.

    Each process is a fresh interpreter running ``python -c 'serve(fd)'`` on one end of a
    socket pair: not ``multiprocessing``'s spawn, which imports the caller's main script again
    (a training script without a ``__main__`` guard would start training in every worker), nor
    fork, as the parent may have threads."""

    def __init__(self, jobs: int) -> None:
        self.jobs = jobs
        self._conns: list[Connection] = []  # workers 1..jobs-1
        self._procs: list[subprocess.Popen] = []
        self._state = _State()  # worker 0's
        # The workers import exactly what this process imported: its sys.path, in its order.
        env = {**os.environ, SYS_PATH_VARIABLE: json.dumps(sys.path)}
        try:
            for _ in range(jobs - 1):
                mine, theirs = socket.socketpair()
                code = (f"import json, os, sys; sys.path[:] = json.loads(os.environ.pop({SYS_PATH_VARIABLE!r})); "
                        f"from prov4ml_dist.merge.parallel import serve; serve({theirs.fileno()})")
                self._procs.append(subprocess.Popen([sys.executable, "-c", code], pass_fds=[theirs.fileno()],
                                                    env=env, stdin=subprocess.DEVNULL))
                theirs.close()
                self._conns.append(Connection(mine.detach()))
        except OSError as exc:
            self.close()
            raise MergeError(f"cannot start merge workers: {exc}") from None
        self._owner: dict[Path, int] = {}  # the worker that holds each shard's ShardInfo
        self._pinned: set[Path] = set()  # shards whose rows their worker kept in memory

    def __enter__(self) -> MergeWorkers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        close_kept(list(self._state.kept.values()))
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.send(("stop",))
        for proc in self._procs:
            try:
                proc.wait(JOIN_SECONDS)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for conn in self._conns:
            conn.close()

    def scan(self, paths: Sequence[Path], problems: list[str], tick: Tick) -> list[ShardInfo]:
        """``read_shards`` of ``paths`` (path order), in batches handed to whichever worker is
        free: a worker still importing, or slowed by a busy core, takes fewer."""
        ordered = sorted(Path(p) for p in paths)
        size = max(1, min(SCAN_BATCH, -(-len(ordered) // (4 * self.jobs))))
        batches = [ordered[i:i + size] for i in range(0, len(ordered), size)]
        request = lambda b: ("scan", batches[b], ROW_CACHE_BYTES // self.jobs)  # noqa: E731
        done: dict[int, tuple[int, tuple[list[ShardInfo], list[str]]]] = {}  # batch → worker, answer
        next_batch, in_flight, failure = 0, {}, None
        for conn in self._conns:
            if next_batch < len(batches):
                self._send(conn, request(next_batch))
                in_flight[conn], next_batch = next_batch, next_batch + 1
        while in_flight or (next_batch < len(batches) and failure is None):
            for conn in wait(list(in_flight), timeout=0 if next_batch < len(batches) else None):
                n = self._conns.index(conn) + 1
                kind, payload = self._receive(conn, n)  # no ticks: a scan batch answers once
                b = in_flight.pop(conn)
                if kind == "done":
                    done[b] = (n, payload)
                    tick(sum(len(batches[i]) for i in done))
                    if next_batch < len(batches) and failure is None:
                        self._send(conn, request(next_batch))
                        in_flight[conn], next_batch = next_batch, next_batch + 1
                elif failure is None:
                    failure = payload
            if next_batch < len(batches) and failure is None:  # worker 0: one batch, then look again
                b, next_batch = next_batch, next_batch + 1
                done[b] = (0, _handle(request(b), self._state, lambda n: None))
                tick(sum(len(batches[i]) for i in done))
        if failure is not None:
            raise failure
        found: list[ShardInfo] = []
        for b in range(len(batches)):
            n, (infos, batch_problems, pinned) = done[b]
            found += infos
            problems += batch_problems
            self._owner.update((info.path, n) for info in infos)
            self._pinned.update(pinned)
        return found

    def copy(self, shards: list[ShardInfo], indexes: list[SeriesIndex], stage: RowStage, tick: Tick) -> None:
        """Every row of every shard; the summaries come back. A shard whose rows a worker kept
        is copied by it; the others (large: their rows dwarf opening them again) are spread so
        that each worker copies about as many rows, whoever scanned them."""
        files = {index.table: stage.where[index.table] for index in indexes}
        work: list[list[tuple[Path, ShardInfo | None, dict[str, TablePlan]]]] = [[] for _ in range(self.jobs)]
        load = [0] * self.jobs
        rows_of = {shard.path: sum(decl.rows for decl in shard.tables.values()) for shard in shards}
        order = sorted(range(len(shards)), key=lambda n: (shards[n].path not in self._pinned, -rows_of[shards[n].path]))
        for n in order:
            shard = shards[n]
            # The parent's counts are the truth (a recount may have replaced the worker's).
            tables = {index.table: table_plan(index, shard, n) for index in indexes}
            owner = self._owner[shard.path]
            worker = owner if shard.path in self._pinned else min(range(self.jobs), key=load.__getitem__)
            load[worker] += rows_of[shard.path]
            work[worker].append((shard.path, None if worker == owner else replace(shard, rows=None, reader=None),
                                 tables))
            if worker != owner:
                self._owner[shard.path] = worker
        for items in work:
            items.sort(key=lambda item: str(item[0]))
        answers = self._ask([("copy", items, files) for items in work], tick)
        last_times = {path: when for answer in answers for path, when, _ in answer}
        filled = {path: tables for answer in answers for path, _, tables in answer}
        for shard in shards:
            shard.last_time = last_times[shard.path]
            for index in indexes:
                plan = filled[shard.path][index.table]
                index.series[plan.ids] = plan.series

    def crossrank(self, group: h5py.Group, index: SeriesIndex, stage: RowStage, rows: RowCompressor) -> None:
        """``CrossRank`` of one table, its groups split into ranges of about equal rows; and its
        rows compressed, each process a share of the chunks: this one in its threads (they store
        the chunks), the others into a file of theirs that this one then stores from."""
        groups = index.groups
        bounds = ranges(groups["row_stop"], self.jobs)
        shares = [(rows.chunks * k // self.jobs, rows.chunks * (k + 1) // self.jobs) for k in range(self.jobs)]
        rows.submit(*shares[0])
        light = replace(index, series=recfunctions.repack_fields(index.series[CROSSRANK_SERIES_FIELDS]),
                        global_ids=[])
        files = stage.where[index.table]
        mine = [(shares[0][0], shares[0][0])]  # this process compresses in its threads, not in _handle
        answers = self._ask([("crossrank", light, files, a, b, c0, c1, rows.chunk)
                             for (a, b), (c0, c1) in zip(bounds, mine + shares[1:], strict=True)], lambda n: None,
                            discard=lambda answer: answer[3].remove())
        try:
            gather(group, groups, bounds, [answer[:3] for answer in answers])
            for *_, chunks in answers:
                chunks.store_into(rows)
        finally:
            for *_, chunks in answers:
                chunks.remove()

    def _ask(self, messages: list[tuple], tick: Tick, discard: Callable[[Any], None] | None = None) -> list[Any]:
        """Send each worker its message (worker 0's is handled here, meanwhile); gather the
        answers, passing on progress ticks. Every worker answers before a failure is raised;
        then ``discard`` gets the answers that came (files they name are removed)."""
        for conn, message in zip(self._conns, messages[1:], strict=True):
            self._send(conn, message)
        ticks = [0] * self.jobs
        answers: dict[int, Any] = {}
        failure: BaseException | None = None

        def local_tick(done: int) -> None:
            ticks[0] = done
            tick(sum(ticks))

        try:
            answers[0] = _handle(messages[0], self._state, local_tick)
        except MergeError as exc:
            failure = exc
        pending = {conn: n for n, conn in enumerate(self._conns, start=1)}
        while pending:
            for conn in wait(list(pending)):
                n = pending[conn]
                kind, payload = self._receive(conn, n)
                if kind == "tick":
                    ticks[n] = payload
                    tick(sum(ticks))
                    continue
                del pending[conn]
                if kind == "done":
                    answers[n] = payload
                elif failure is None:
                    failure = payload
        if failure is not None:
            for answer in answers.values() if discard is not None else ():
                discard(answer)
            raise failure
        return [answers[n] for n in range(self.jobs)]

    def _send(self, conn: Connection, message: tuple) -> None:
        try:
            conn.send(message)
        except OSError:
            n = self._conns.index(conn) + 1
            raise MergeError(f"merge worker {n} died (exit status {self._procs[n - 1].wait()})") from None

    def _receive(self, conn: Connection, n: int) -> tuple[str, Any]:
        try:
            return conn.recv()
        except (EOFError, OSError):
            raise MergeError(f"merge worker {n} died (exit status {self._procs[n - 1].wait()})") from None


def serve(fd: int) -> None:
    """A worker's loop on its socket: the parent's requests, one at a time, until ``stop``."""
    conn = Connection(fd)
    state = _State()
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return  # the parent is gone
        if request[0] == "stop":
            return
        try:
            answer = _handle(request, state, lambda n: conn.send(("tick", n)))
        except MergeError as exc:  # RowCountMismatch too: the parent recounts
            conn.send(("error", exc))
            continue
        except Exception as exc:  # noqa: BLE001 - anything else: the parent reports it, with where it came from
            conn.send(("error", MergeError(f"merge worker failed: {type(exc).__name__}: {exc}\n"
                                           + "".join(traceback.format_exc(limit=-3)))))
            continue
        conn.send(("done", answer))


@dataclass
class _State:
    """What a worker keeps between requests: the shards it read, and its scan budget."""

    kept: dict[Path, ShardInfo] = field(default_factory=dict)
    budget: RowBudget | None = None


def _handle(request: tuple, state: _State, tick: Tick) -> Any:
    kind = request[0]
    kept = state.kept
    if kind == "scan":
        _, paths, budget = request
        if state.budget is None:
            state.budget = RowBudget(budget)
        problems: list[str] = []
        infos = read_shards(paths, problems, state.budget)  # progress: the parent counts batches
        kept.update((info.path, info) for info in infos)
        pinned = [info.path for info in infos if info.rows is not None]
        return [replace(info, rows=None, reader=None) for info in infos], problems, pinned
    if kind == "copy":
        _, items, files = request
        writers = {table: RowWriter(where) for table, where in files.items()}
        done = []
        try:
            for n, (path, given, plans) in enumerate(items):
                tick(n)
                shard = kept.get(path) if given is None else given
                if shard is None:
                    raise MergeError(f"merge worker has no shard {path}")
                kept[path] = shard
                copy_shard(shard, plans, writers)
                done.append((path, shard.last_time, plans))
        finally:
            for writer in writers.values():
                writer.close()
            close_kept(list(kept.values()))  # those copied elsewhere: no file left open
        return done
    if kind == "crossrank":
        _, index, where, first, stop, chunk_first, chunk_stop, chunk_rows = request
        rows = open_rows(where)
        answer = CrossRank.in_range(index, rows, first, stop)
        chunks = ChunkFile.write(where.path.parent, rows, chunk_first, chunk_stop, chunk_rows)
        return (*answer, chunks)
    raise MergeError(f"unknown merge worker request {kind!r}")
