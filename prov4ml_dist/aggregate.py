"""The end of a run on every rank: bring every rank's files under the run directory, then
merge them on rank 0.

``finish_run`` is called by ``Run.end()`` on every rank once the rank's shard is closed:

1. each rank describes its files (shard, artifacts: relative path, size, sha256) in a
   manifest, and rank 0 gathers the manifests for up to ``merge_timeout`` seconds;
2. rank 0 decides, and broadcasts, which files it must be sent: those it cannot already read,
   with the announced size, at the same relative path under the run directory (a shared
   filesystem makes that all of them; ranks with a private ``local_dir`` none). A file whose
   sha256 rank 0 already has or will have is not sent again: it is hard-linked (copied
   where links are impossible) from the first copy;
3. the ranks asked for files stream them to rank 0 in bounded chunks, every rank's shard
   first (small, and the provenance itself), then the artifacts, one rank after the other;
   rank 0 verifies each file against its sha256 before it appears under the run directory;
4. rank 0 merges (``merge_run``), passing the ranks it had to do without and why.

No wall clock is compared across processes (nodes' clocks disagree): waits are durations on
each process's monotonic clock. A rank queued for its turn waits as long as rank 0 reports
progress (bytes moving), not for an assumed transfer rate.

Nothing here raises into training code: a failure is logged, with where the files are and
the command that merges them later, and ``finish_run`` returns None; a rank whose files did
not all reach rank 0 says which.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from .artifacts import sha256_file
from .merge.layout import AGGREGATE_REPORT
from .node_merge import collect_parts, discard_parts, leader_part, plan_nodes, shard_paths
from .paths import atomic_target, relative_inside
from .run import merge_command
from .shard import schema
from .topology import _initialised_dist
from .transport import (
    FileSpec,
    Transport,
    TransportError,
    TransportTimeout,
    connect,
    read_chunks,
    receive_files,
    write_files,
)
from .transport.base import Deadline

log = logging.getLogger(__name__)

# A rank waits for rank 0's plan this much longer than merge_timeout (rank 0 may still be
# checking files after its own wait); rank 0 asks nothing of a rank with less than
# DEPARTURE_MARGIN_S of that wait left, counted from the manifest's arrival on rank 0's
# monotonic clock (an overestimate by the time it sat in the transport: never an early exit).
PLAN_GRACE_S = 30.0
DEPARTURE_MARGIN_S = 10.0
# A queued rank gives up its turn after TURN_WAIT_FACTOR x merge_timeout without progress
# from rank 0: rank 0 itself waits up to merge_timeout on a stalled sender before moving on.
TURN_WAIT_FACTOR = 2.0
# Streams a rank may be asked for, in this order: its shard, then its artifacts.
STREAM_KINDS = ("shard", "artifact")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def finish_run(run: Any) -> Path | None:
    """Rank 0: the merged ``prov.json``, or None when the merge failed or was left to the
    offline CLI. Other ranks: None. Never raises."""
    topology = run.topology
    namespace = f"finish/{run.run_id}/attempt-{topology.attempt}"
    try:
        with connect(topology, namespace, run.config.merge_timeout) as transport:
            if not transport.reaches_peers:
                _leave_to_offline_merge(run, _unreachable(run))
                return None
            if transport.rank == 0:
                return _collect_and_merge(run, transport)
            _contribute(run, transport)
            return None
    except Exception as exc:  # noqa: BLE001 - the end of a run must never fail the training script
        log.debug("prov4ml_dist: aggregation failed", exc_info=True)
        _leave_to_offline_merge(run, f"{type(exc).__name__}: {exc}")
        return None


def _unreachable(run: Any) -> str:
    """Why the ranks cannot reach each other at end_run, naming the call order when a torch
    process group was there at start_run and is gone now."""
    torch = sys.modules.get("torch")
    dist = getattr(torch, "distributed", None) if torch is not None else None
    if run.topology.launcher == "torch.distributed" and _initialised_dist() is None:
        return ("the ranks cannot reach each other: the torch.distributed process group was destroyed before "
                "end_run (destroy_process_group() was called first; outside torchrun the ranks reach each other "
                "through its store, so call end_run before destroy_process_group), and the program initialised "
                "no MPI")
    if run.topology.launcher == "env" and dist is not None and _initialised_dist() is None:
        return ("the ranks cannot reach each other: no torch.distributed process group at end_run (if the program "
                "called destroy_process_group() before end_run, call end_run first: outside torchrun the ranks "
                "reach each other through the group's store), and the program initialised no MPI")
    return ("the ranks cannot reach each other (no torchrun store, no torch.distributed process group, and no MPI "
            "initialised by the program)")


def _leave_to_offline_merge(run: Any, reason: str) -> None:
    local = run.local_roots()
    log.warning("prov4ml_dist: rank %d: %s. This rank's shard and artifacts are under %s%s; merge the run "
                "later with: %s", run.topology.rank, reason, run.rank_root,
                " (node-local: copy it back to where the command can read it)" if local else "",
                merge_command(run.run_dir, local))


# -- every rank --------------------------------------------------------------------------
def build_manifest(run: Any, plan_wait: float) -> dict[str, Any]:
    """Who this rank is, the files it holds under its rank root (hashed), and for how many
    more seconds it waits for rank 0's plan (a duration: clocks of two nodes disagree)."""
    topology = run.topology
    files: dict[str, dict[str, Any]] = {}
    problems: list[str] = []
    _add_file(files, problems, run.rank_root, run.shard_path, "shard")
    for record in run.artifact_records():
        if not record.get("copied"):
            continue  # left where the user keeps it: not part of the run directory
        path = run.rank_root / record["path"]
        if record.get("directory"):
            for member in sorted(p for p in path.rglob("*") if p.is_file() and not p.is_symlink()):
                _add_file(files, problems, run.rank_root, member, "artifact")
        else:
            _add_file(files, problems, run.rank_root, path, "artifact", record.get("sha256"), record.get("size"))
    return {"rank": topology.rank, "local_rank": topology.local_rank, "node_rank": topology.node_rank,
            "hostname": topology.hostname, "pid": os.getpid(), "rank_root": str(run.rank_root),
            "waits_s": plan_wait, "files": list(files.values()), "problems": problems}


def _add_file(files: dict[str, dict[str, Any]], problems: list[str], root: Path, path: Path, kind: str,
              sha256: str | None = None, size: int | None = None) -> None:
    """One manifest entry; the artifact store's sha256 is reused when the size still matches."""
    rel = path.relative_to(root).as_posix()
    try:
        if sha256 is None or os.lstat(path).st_size != size:
            sha256, size = sha256_file(path)
    except OSError as exc:
        problems.append(f"{kind} {rel} unreadable: {exc.strerror or exc}")
        return
    files[rel] = {"path": rel, "size": size, "sha256": sha256, "kind": kind}


def _contribute(run: Any, transport: Transport) -> None:
    """A rank other than 0: hand in the manifest, then send the files rank 0 asks for."""
    timeout = run.config.merge_timeout
    plan_wait = timeout + PLAN_GRACE_S
    waiting = Deadline(plan_wait)  # from here on: rank 0 counts from the manifest's arrival
    manifest = build_manifest(run, plan_wait)
    files = manifest["files"]
    transport.gather(manifest, timeout)
    try:
        plan = transport.broadcast(None, waiting.remaining())
    except TransportTimeout:
        for _ in STREAM_KINDS:  # should rank 0 still ask, it hears at once that this rank is gone
            transport.decline_stream(0)
        why = f"rank 0's plan did not come within {plan_wait:g} s"
        if run.local_roots():
            _not_at_rank_0(run, files, why)
        else:  # rank 0, if it merges, reads them where they are
            _leave_to_offline_merge(run, why)
        return
    if transport.rank not in plan.get("ranks", ()):
        _leave_to_offline_merge(run, "rank 0 merged without this rank (it arrived after merge_timeout)")
        return
    streams = plan.get("streams", {}).get(str(transport.rank), [])
    left_out = plan.get("left_out", {}).get(str(transport.rank))
    unsent: list[dict[str, Any]] = [files[i] for i in left_out["files"]] if left_out else []
    why = [left_out["why"]] if left_out else []
    for number, indices in enumerate(streams):
        stream = [files[i] for i in indices]
        handed = [0]
        try:
            transport.send_stream(0, _counted(run.rank_root, stream, handed), timeout,
                                  float(plan.get("turn_wait", TURN_WAIT_FACTOR * timeout)))
        except (TransportError, OSError) as exc:
            for _ in streams[number + 1:]:
                transport.decline_stream(0)
            unsent += stream[handed[0]:] + [files[i] for later in streams[number + 1:] for i in later]
            why.append(f"{type(exc).__name__}: {exc}" + (f" (after {handed[0]} file(s) of that stream had been "
                                                          "sent: rank 0's aggregate.json says if they arrived)"
                                                          if handed[0] else ""))
            break
    if unsent:
        _not_at_rank_0(run, unsent, "; ".join(why))
    if plan.get("hierarchical"):
        leader_part(run, transport, plan, timeout)


def _counted(root: Path, files: list[dict[str, Any]], handed: list[int]) -> Iterator[bytes]:
    """The files' chunks; ``handed[0]`` counts the files whose every byte went to the transport."""
    for f in files:
        yield from read_chunks([(root / f["path"], f["size"])])
        handed[0] += 1


def _not_at_rank_0(run: Any, files: list[dict[str, Any]], why: str) -> None:
    """Say loudly which of this rank's files rank 0 does not have, and how to merge them later."""
    names = ", ".join(f["path"] for f in files[:20]) + (f" and {len(files) - 20} more" if len(files) > 20 else "")
    _leave_to_offline_merge(run, f"{len(files)} file(s) did not reach rank 0 ({why}): {names}")


# -- rank 0 ------------------------------------------------------------------------------
@dataclass
class _Plan:
    """What rank 0 does with every file of every rank."""

    fetch: dict[int, list[dict[str, Any]]] = field(default_factory=dict)  # rank → files to stream, in order
    copy: list[dict[str, Any]] = field(default_factory=list)  # rank 0's own, from its private rank root
    link: list[tuple[Path, dict[str, Any]]] = field(default_factory=list)  # (first copy, duplicate)
    shards: dict[int, Path] = field(default_factory=dict)  # rank → its shard under the run directory
    left_out: dict[int, list[dict[str, Any]]] = field(default_factory=dict)  # rank → files not asked for
    left_out_why: dict[int, str] = field(default_factory=dict)
    present: int = 0
    problems: list[str] = field(default_factory=list)
    missing: dict[int, str] = field(default_factory=dict)
    not_transferred: dict[str, list[str]] = field(default_factory=dict)  # rank → paths rank 0 lacks

    def streams(self) -> dict[int, list[list[dict[str, Any]]]]:
        """Each rank's streams, in the order it sends them: its shard, then its artifacts."""
        return {rank: [stream for kind in STREAM_KINDS if (stream := [f for f in files if f["kind"] == kind])]
                for rank, files in self.fetch.items()}

    def lacks(self, rank: int, entry: dict[str, Any], why: str) -> None:
        """A file of ``rank`` that will not be under the run directory."""
        self.not_transferred.setdefault(str(rank), []).append(entry["path"])
        self.problems.append(f"rank {rank}: {entry['path']} not transferred: {why}")


def _collect_and_merge(run: Any, transport: Transport) -> Path | None:
    started = time.monotonic()
    timeout = run.config.merge_timeout
    manifests = transport.gather(build_manifest(run, 0.0), timeout)
    received = time.monotonic()
    plan = make_plan(run.run_dir, manifests, transport.world_size, timeout, waited=time.monotonic() - received)
    nodes = plan_nodes(manifests)
    by_leaders = _leave_shards_to_leaders(plan, nodes) if nodes else set()
    transport.broadcast({
        "ranks": sorted(manifests), "turn_wait": TURN_WAIT_FACTOR * timeout,
        "streams": {str(rank): [[f["index"] for f in stream] for stream in streams]
                    for rank, streams in plan.streams().items()},
        "left_out": {str(rank): {"files": [f["index"] for f in files], "why": plan.left_out_why[rank]}
                     for rank, files in plan.left_out.items()},
        "hierarchical": bool(nodes),
        "nodes": {str(leader): {"index": n, "shards": shard_paths(manifests, ranks)}
                  for n, (leader, ranks) in enumerate((nodes or {}).items()) if leader != 0}}, timeout)
    streamed_files, streamed_bytes = _fetch(run, transport, plan, timeout)
    for rank, path in plan.shards.items():
        if rank not in plan.missing and rank not in by_leaders and not path.is_file():
            plan.missing[rank] = "its shard did not reach rank 0 (see aggregate.json)"
    report = {"transport": transport.name, "world_size": transport.world_size, "ranks": sorted(manifests),
              "missing": {str(r): why for r, why in sorted(plan.missing.items())}, "files_present": plan.present,
              "files_streamed": streamed_files, "bytes_streamed": streamed_bytes, "files_copied": len(plan.copy),
              "files_linked": len(plan.link), "seconds": time.monotonic() - started,
              "not_transferred": plan.not_transferred, "problems": plan.problems}
    _write_json(run.run_dir / AGGREGATE_REPORT, report)
    from .merge import merge_run
    from .merge.parallel import default_jobs
    from .merge.scan import default_shards

    # The whole allocation waits for this merge: rank 0 uses the cores it may run on (its node's
    # other ranks are idle, waiting for it), for a run large enough to gain from them. Not under
    # MPI, where some interconnect drivers forbid a rank to start processes.
    jobs = 1 if transport.name == "mpi" else default_jobs(default_shards(run.run_dir))
    result = _merge_by_nodes(run, transport, nodes, manifests, plan, report) if nodes else None
    if result is None:
        result = merge_run(run.run_dir, world_size=transport.world_size, missing_ranks=plan.missing, jobs=jobs)
    for problem in plan.problems + list(result.problems):
        log.warning("prov4ml_dist: merge of %s: %s", run.run_dir, problem)
    if plan.missing or plan.not_transferred:
        roots = [Path(m["rank_root"]) for r, m in sorted(manifests.items())
                 if (r in plan.missing or str(r) in plan.not_transferred) and isinstance(m, dict)
                 and isinstance(m.get("rank_root"), str) and Path(m["rank_root"]) != Path(run.run_dir)]
        log.warning("prov4ml_dist: %s merged without %s; once their files are under %s, merge again with: %s",
                    run.run_dir, "; ".join([f"rank {r} ({why})" for r, why in sorted(plan.missing.items())]
                                           + [f"{len(files)} file(s) of rank {r}"
                                              for r, files in plan.not_transferred.items()]),
                    run.run_dir, merge_command(run.run_dir, roots))
    return result.prov_json


def _leave_shards_to_leaders(plan: _Plan, nodes: dict[int, list[int]]) -> set[int]:
    """A hierarchical merge: the shards of ranks on other nodes than rank 0's reach rank 0 in
    their node's part, not one by one (their artifacts still come). Those ranks."""
    others = {rank for leader, ranks in nodes.items() if leader != 0 for rank in ranks}
    plan.fetch = {rank: kept for rank, files in plan.fetch.items()
                  if (kept := [f for f in files if not (f["kind"] == "shard" and rank in others)])}
    return others


def _merge_by_nodes(run: Any, transport: Transport, nodes: dict[int, list[int]], manifests: dict[int, Any],
                    plan: _Plan, report: dict[str, Any]) -> Any:
    """The hierarchical merge (``node_merge.py``); None when rank 0 must merge the shards itself,
    the ranks whose shards it lacks then marked missing."""
    from .errors import MergeError
    from .merge.combine import combine_parts

    timeout = run.config.merge_timeout
    try:
        parts, why = collect_parts(run, transport, nodes, manifests, timeout)
    except Exception as exc:  # noqa: BLE001 - rank 0 can still merge the shards itself
        log.debug("prov4ml_dist: the hierarchical merge failed", exc_info=True)
        parts, why = None, f"{type(exc).__name__}: {exc}"
    if parts is not None:
        try:
            result = combine_parts(run.run_dir, parts, world_size=transport.world_size, missing_ranks=plan.missing)
            report["hierarchical"] = {"nodes": len(nodes), "parts": len(parts)}
            _write_json(run.run_dir / AGGREGATE_REPORT, report)
            return result
        except MergeError as exc:
            why = str(exc)
    discard_parts(run.run_dir)
    log.warning("prov4ml_dist: the hierarchical merge of %s over %d nodes fell back to rank 0 merging the shards "
                "it can read: %s", run.run_dir, len(nodes), why)
    for rank, path in plan.shards.items():
        if rank not in plan.missing and not path.is_file():
            plan.missing[rank] = f"its shard stayed on its node, whose part did not reach rank 0 ({why[:300]})"
    report["hierarchical"] = {"nodes": len(nodes), "fell_back": why}
    report["missing"] = {str(r): reason for r, reason in sorted(plan.missing.items())}
    _write_json(run.run_dir / AGGREGATE_REPORT, report)
    return None


def make_plan(run_dir: Path, manifests: dict[int, Any], world_size: int, timeout: float,
              waited: float = 0.0) -> _Plan:
    """Which files rank 0 has, must fetch, copy from its own private root, or link;
    ``waited``: seconds since the manifests arrived.

    Manifests come from other processes: every entry is checked, and may only name the
    rank's own shard or a file under the rank's own artifact directory.
    """
    plan = _Plan(missing={r: f"did not reach end_run within merge_timeout ({timeout:g} s)"
                          for r in range(world_size) if r not in manifests})
    have: dict[str, Path] = {}  # sha256 → a verified (or about to be) copy under run_dir
    pending: list[tuple[int, dict[str, Any]]] = []
    for rank in sorted(manifests):
        manifest = manifests[rank]
        if not (isinstance(manifest, dict) and manifest.get("rank") == rank and isinstance(manifest.get("files"), list)
                and isinstance(manifest.get("problems"), list)):
            plan.problems.append(f"rank {rank} sent a malformed manifest")
            plan.missing[rank] = "malformed manifest"
            continue
        plan.problems += [f"rank {rank}: {p}" for p in manifest["problems"] if isinstance(p, str)]
        for index, entry in enumerate(manifest["files"]):
            target = _checked_target(run_dir, rank, entry)
            if target is None:
                plan.problems.append(f"rank {rank}: refused manifest entry {str(entry)[:120]}")
                continue
            entry = {**entry, "index": index, "target": target, "rank": rank}
            if entry["kind"] == "shard":
                plan.shards[rank] = target
            if _has(target, entry["size"]):
                plan.present += 1
                have.setdefault(entry["sha256"], target)
            else:
                pending.append((rank, entry))
        if rank not in plan.shards and rank not in plan.missing:
            plan.missing[rank] = "it reported no readable shard"
    for rank, entry in pending:
        if entry["sha256"] in have:
            plan.link.append((have[entry["sha256"]], entry))
        elif rank == 0:
            have[entry["sha256"]] = entry["target"]
            plan.copy.append(entry)
        elif _waits_for(manifests[rank], waited) < DEPARTURE_MARGIN_S:
            why = "the rank stops waiting for rank 0's plan too soon to be asked for it"
            plan.left_out.setdefault(rank, []).append(entry)
            plan.left_out_why[rank] = why
            plan.lacks(rank, entry, why)
        else:
            have[entry["sha256"]] = entry["target"]
            plan.fetch.setdefault(rank, []).append(entry)
    return plan


def _waits_for(manifest: dict[str, Any], waited: float) -> float:
    """How much longer the rank waits for rank 0's plan: the duration it sent, less the time
    since its manifest arrived (never a comparison of two processes' clocks)."""
    waits = manifest.get("waits_s")
    return waits - waited if isinstance(waits, (int, float)) and not isinstance(waits, bool) else 0.0


def _checked_target(run_dir: Path, rank: int, entry: Any) -> Path | None:
    """Where a manifest entry goes under the run directory, or None when it is not a well-formed
    entry of this rank's own files (its shard, or under its own artifact directory)."""
    if not isinstance(entry, dict):
        return None
    path, size, sha, kind = entry.get("path"), entry.get("size"), entry.get("sha256"), entry.get("kind")
    if not (isinstance(path, str) and type(size) is int and size >= 0 and isinstance(sha, str)
            and _SHA256.fullmatch(sha) and kind in ("shard", "artifact")):
        return None
    rel = relative_inside(path)
    if rel is None:
        return None
    if kind == "shard":
        ours = rel.parent == PurePosixPath(schema.SHARDS_DIR) and rel.name.startswith(f"rank-{rank:05d}.")
    else:
        ours = PurePosixPath(schema.rank_artifacts_dir(rank)) in rel.parents
    return run_dir.joinpath(*rel.parts) if ours else None


def _has(target: Path, size: int) -> bool:
    try:
        return target.is_file() and not target.is_symlink() and target.stat().st_size == size
    except OSError:
        return False


def _fetch(run: Any, transport: Transport, plan: _Plan, timeout: float) -> tuple[int, int]:
    """Every rank's shard stream, then every rank's artifact stream; then rank 0's own copies,
    then links. The files and bytes streamed."""
    streams = plan.streams()
    queue = [(rank, ranks_streams[phase]) for phase in range(len(STREAM_KINDS))
             for rank, ranks_streams in streams.items() if phase < len(ranks_streams)]
    queued = Counter(rank for rank, _ in queue)
    files_ok = bytes_ok = 0
    for rank, files in queue:
        queued[rank] -= 1
        waiting = [r for r, count in queued.items() if count and r != rank]  # the sender itself is not waiting
        outcomes = receive_files(transport, rank, [FileSpec(f["target"], f["size"], f["sha256"]) for f in files],
                                 timeout, waiting)
        for f, problem in zip(files, outcomes, strict=True):
            if problem is None:
                files_ok, bytes_ok = files_ok + 1, bytes_ok + f["size"]
            else:
                plan.lacks(rank, f, problem)
    if plan.copy:
        sources = [(run.rank_root / f["path"], f["size"]) for f in plan.copy]
        outcomes = write_files(read_chunks(sources), [FileSpec(f["target"], f["size"], f["sha256"])
                                                        for f in plan.copy])
        for f, problem in zip(plan.copy, outcomes, strict=True):
            if problem:
                plan.lacks(0, f, problem)
    for source, entry in plan.link:
        problem = _link(source, entry["target"], entry["size"])
        if problem:
            plan.lacks(entry["rank"], entry, problem)
    return files_ok, bytes_ok


def _link(source: Path, target: Path, size: int) -> str | None:
    """Store a duplicate once: a hard link to the first copy (a copy where links fail)."""
    if not _has(source, size):
        return f"its first copy {source} did not arrive"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_target(target) as part:
            try:
                os.link(source, part)
            except OSError:
                shutil.copyfile(source, part)
    except OSError as exc:
        return f"cannot link {source}: {exc.strerror or exc}"
    return None


def _write_json(path: Path, value: Any) -> None:
    """The transfer record of the run, written whole or not at all."""
    with atomic_target(path) as part:
        part.write_text(json.dumps(value, indent=1, default=str))
