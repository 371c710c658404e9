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
3. the ranks asked for files stream them to rank 0, one rank after the other, in bounded
   chunks; rank 0 verifies each against its sha256 before it appears under the run directory;
4. rank 0 merges (``merge_run``), passing the ranks it had to do without and why.

Nothing here raises into training code: a failure is logged, with where the shards are and
the command that merges them later, and ``finish_run`` returns None.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from .artifacts import sha256_file
from .merge.layout import AGGREGATE_REPORT
from .shard import schema
from .transport import (
    FileSpec,
    Transport,
    connect,
    read_chunks,
    receive_files,
    send_files,
    write_files,
)

log = logging.getLogger(__name__)

# The slowest rate (bytes/s) rank 0 is assumed to take streamed files in: a rank queued
# behind others waits merge_timeout plus their bytes at this rate for its turn.
MIN_STREAM_RATE = 8 << 20
# A rank waits for rank 0's plan this much longer than merge_timeout (rank 0 may still be
# checking files after its own wait); rank 0 asks nothing of a rank with less than
# DEPARTURE_MARGIN_S of its wait left (wall clocks of an HPC job agree far better than that).
PLAN_GRACE_S = 30.0
DEPARTURE_MARGIN_S = 10.0
_SHA256 = re.compile(r"[0-9a-f]{64}")


def finish_run(run: Any) -> Path | None:
    """Rank 0: the merged ``prov.json``, or None when the merge failed or was left to the
    offline CLI. Other ranks: None. Never raises."""
    topology = run.topology
    namespace = f"finish/{run.run_id}/attempt-{topology.attempt}"
    try:
        with connect(topology, namespace, run.config.merge_timeout) as transport:
            if not transport.reaches_peers:
                _leave_to_offline_merge(run, "the ranks cannot reach each other (no torch.distributed store, "
                                             "and no MPI initialised by the program)")
                return None
            if transport.rank == 0:
                return _collect_and_merge(run, transport)
            _contribute(run, transport)
            return None
    except Exception as exc:  # noqa: BLE001 - the end of a run must never fail the training script
        log.debug("prov4ml_dist: aggregation failed", exc_info=True)
        _leave_to_offline_merge(run, f"{type(exc).__name__}: {exc}")
        return None


def _leave_to_offline_merge(run: Any, reason: str) -> None:
    log.warning("prov4ml_dist: rank %d: %s. This rank's shard and artifacts are under %s; merge the run "
                "later with: prov4ml-dist merge %s", run.topology.rank, reason, run.rank_root, run.run_dir)


# -- every rank --------------------------------------------------------------------------
def build_manifest(run: Any, plan_wait: float) -> dict[str, Any]:
    """Who this rank is and the files it holds under its rank root, hashed."""
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
            "waits_until": time.time() + plan_wait, "files": list(files.values()), "problems": problems}


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
    manifest = build_manifest(run, plan_wait)
    transport.gather(manifest, timeout)
    plan = transport.broadcast(None, plan_wait)
    rank = transport.rank
    if rank not in plan.get("ranks", ()):
        _leave_to_offline_merge(run, "rank 0 merged without this rank (it arrived after merge_timeout)")
        return
    job = plan.get("fetch", {}).get(str(rank))
    if not job:
        return
    files = [manifest["files"][i] for i in job["files"]]
    send_files(transport, 0, [(run.rank_root / f["path"], f["size"]) for f in files], timeout,
               float(job["start_within"]))


# -- rank 0 ------------------------------------------------------------------------------
@dataclass
class _Plan:
    """What rank 0 does with every file of every rank."""

    fetch: dict[int, list[dict[str, Any]]] = field(default_factory=dict)  # rank → files to stream, in order
    copy: list[dict[str, Any]] = field(default_factory=list)  # rank 0's own, from its private rank root
    link: list[tuple[Path, dict[str, Any]]] = field(default_factory=list)  # (first copy, duplicate)
    shards: dict[int, Path] = field(default_factory=dict)  # rank → its shard under the run directory
    present: int = 0
    problems: list[str] = field(default_factory=list)
    missing: dict[int, str] = field(default_factory=dict)


def _collect_and_merge(run: Any, transport: Transport) -> Path | None:
    started = time.monotonic()
    timeout = run.config.merge_timeout
    manifests = transport.gather(build_manifest(run, 0.0), timeout)
    plan = make_plan(run.run_dir, manifests, transport.world_size, timeout)
    starts = _stream_starts(plan, timeout)
    transport.broadcast({"ranks": sorted(manifests), "fetch": {
        str(rank): {"files": [f["index"] for f in files], "start_within": starts[rank]}
        for rank, files in plan.fetch.items()}}, timeout)
    streamed_files, streamed_bytes = _fetch(run, transport, plan, timeout)
    for rank, path in plan.shards.items():
        if rank not in plan.missing and not path.is_file():
            plan.missing[rank] = "its shard did not reach rank 0 (see aggregate.json)"
    report = {"transport": transport.name, "world_size": transport.world_size, "ranks": sorted(manifests),
              "missing": {str(r): why for r, why in sorted(plan.missing.items())}, "files_present": plan.present,
              "files_streamed": streamed_files, "bytes_streamed": streamed_bytes, "files_copied": len(plan.copy),
              "files_linked": len(plan.link), "seconds": time.monotonic() - started,
              "problems": plan.problems}
    _write_json(run.run_dir / AGGREGATE_REPORT, report)
    from .merge import merge_run

    result = merge_run(run.run_dir, world_size=transport.world_size, missing_ranks=plan.missing)
    for problem in plan.problems + list(result.problems):
        log.warning("prov4ml_dist: merge of %s: %s", run.run_dir, problem)
    if plan.missing:
        log.warning("prov4ml_dist: %s merged without rank(s) %s; once their shards are under %s, merge again "
                    "with: prov4ml-dist merge %s", run.run_dir,
                    "; ".join(f"{r} ({why})" for r, why in sorted(plan.missing.items())),
                    run.run_dir / schema.SHARDS_DIR, run.run_dir)
    return result.prov_json


def make_plan(run_dir: Path, manifests: dict[int, Any], world_size: int, timeout: float,
              now: float | None = None) -> _Plan:
    """Which files rank 0 has, must fetch, copy from its own private root, or link.

    Manifests come from other processes: every entry is checked, and may only name the
    rank's own shard or a file under the rank's own artifact directory.
    """
    now = time.time() if now is None else now
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
            entry = {**entry, "index": index, "target": target}
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
        elif _waits_for(manifests[rank], now) < DEPARTURE_MARGIN_S:
            plan.problems.append(f"rank {rank}: {entry['path']} not transferred: the rank stopped waiting for "
                                 f"rank 0 before it arrived")
        else:
            have[entry["sha256"]] = entry["target"]
            plan.fetch.setdefault(rank, []).append(entry)
    return plan


def _waits_for(manifest: dict[str, Any], now: float) -> float:
    """How much longer the rank waits for rank 0's plan (by its clock, sent in the manifest)."""
    until = manifest.get("waits_until")
    return until - now if isinstance(until, (int, float)) else 0.0


def _checked_target(run_dir: Path, rank: int, entry: Any) -> Path | None:
    """Where a manifest entry goes under the run directory, or None when it is not a well-formed
    entry of this rank's own files (its shard, or under its own artifact directory)."""
    if not isinstance(entry, dict):
        return None
    path, size, sha, kind = entry.get("path"), entry.get("size"), entry.get("sha256"), entry.get("kind")
    if not (isinstance(path, str) and type(size) is int and size >= 0 and isinstance(sha, str)
            and _SHA256.fullmatch(sha) and kind in ("shard", "artifact")):
        return None
    rel = PurePosixPath(path)
    if rel.is_absolute() or any(part in ("", ".", "..") or "\\" in part for part in rel.parts):
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


def _stream_starts(plan: _Plan, timeout: float) -> dict[int, float]:
    """How long each rank waits for its turn: the timeout plus the bytes queued before it."""
    starts, queued = {}, 0
    for rank, files in plan.fetch.items():
        starts[rank] = timeout + queued / MIN_STREAM_RATE
        queued += sum(f["size"] for f in files)
    return starts


def _fetch(run: Any, transport: Transport, plan: _Plan, timeout: float) -> tuple[int, int]:
    """Streams, then rank 0's own copies, then links; the files and bytes streamed."""
    files_ok = bytes_ok = 0
    for rank, files in plan.fetch.items():
        outcomes = receive_files(transport, rank, [FileSpec(f["target"], f["size"], f["sha256"]) for f in files],
                                 timeout)
        for f, problem in zip(files, outcomes, strict=True):
            if problem is None:
                files_ok, bytes_ok = files_ok + 1, bytes_ok + f["size"]
            else:
                plan.problems.append(f"rank {rank}: {f['path']}: {problem}")
    if plan.copy:
        sources = [(run.rank_root / f["path"], f["size"]) for f in plan.copy]
        outcomes = write_files(read_chunks(sources), [FileSpec(f["target"], f["size"], f["sha256"])
                                                        for f in plan.copy])
        plan.problems += [f"rank 0: {f['path']}: {p}" for f, p in zip(plan.copy, outcomes, strict=True) if p]
    for source, entry in plan.link:
        problem = _link(source, entry["target"], entry["size"])
        if problem:
            plan.problems.append(f"{entry['path']}: {problem}")
    return files_ok, bytes_ok


def _link(source: Path, target: Path, size: int) -> str | None:
    """Store a duplicate once: a hard link to the first copy (a copy where links fail)."""
    if not _has(source, size):
        return f"its first copy {source} did not arrive"
    part = target.with_name(f".{target.name}.part-{os.getpid()}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        part.unlink(missing_ok=True)
        try:
            os.link(source, part)
        except OSError:
            shutil.copyfile(source, part)
        os.replace(part, target)
    except OSError as exc:
        with contextlib.suppress(OSError):
            part.unlink(missing_ok=True)
        return f"cannot link {source}: {exc.strerror or exc}"
    return None


def _write_json(path: Path, value: Any) -> None:
    """The transfer record of the run, written whole or not at all."""
    part = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}")
    part.write_text(json.dumps(value, indent=1, default=str))
    os.replace(part, path)
