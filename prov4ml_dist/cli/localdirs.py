"""Bringing ranks' files back from node-local disks into the run directory before a merge.

A job run with ``local_dir`` leaves each rank's shard and artifacts under
``<local_dir>/<experiment>/<run_id>/`` on its node; when the online merge did not happen
(crash, timeout) they must be copied back, e.g. to a shared filesystem, and passed with
``--local-dirs``. Everything read here is untrusted: a shard of another run is refused, an
artifact is copied only if it matches the sha256 its shard recorded, paths may only name the
rank's own artifact directory, and an existing different file is never overwritten. Files
already in place are left alone, so importing twice changes nothing. A shard's crash ring and
WAL (``shard/ring.py``) come with it: a killed rank's last points are there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from ..artifacts import directory_entries, sha256_file
from ..merge.scan import BAD_SHARD
from ..paths import relative_inside
from ..shard import ShardReader, ring, schema
from ..transport import FileSpec, read_chunks, write_files
from .content import content_sha256
from .output import CliError


@dataclass
class ImportReport:
    """What ``import_local_dirs`` did: files copied, files already in place, and problems."""

    copied: int = 0
    present: int = 0
    shards: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def rank_roots(local_dir: Path, run_id: str) -> list[Path]:
    """The rank roots of ``run_id`` under a local directory: ``<dir>/<experiment>/<run_id>``,
    one level further down (one folder per node copied back), ``<dir>/<run_id>``, or the
    directory itself when it holds ``shards/``."""
    if not local_dir.is_dir():
        raise CliError(f"--local-dirs {local_dir}: no such directory")
    if (local_dir / schema.SHARDS_DIR).is_dir():
        return [local_dir]
    found = [*local_dir.glob(f"{run_id}/{schema.SHARDS_DIR}"), *local_dir.glob(f"*/{run_id}/{schema.SHARDS_DIR}"),
             *local_dir.glob(f"*/*/{run_id}/{schema.SHARDS_DIR}")]
    roots = sorted(p.parent for p in found if p.is_dir())
    if not roots:
        raise CliError(f"--local-dirs {local_dir} holds no <experiment>/{run_id}/{schema.SHARDS_DIR}/ "
                       "(pass the local_dir the job was given, as copied back from the nodes)")
    return roots


def import_local_dirs(run_dir: Path, local_dirs: list[Path], run_id: str) -> ImportReport:
    """Copy the shards of ``run_id`` and their recorded artifacts from ``local_dirs`` into ``run_dir``."""
    report = ImportReport()
    roots = [root for d in local_dirs for root in rank_roots(d, run_id)]
    for root in roots:
        for shard in sorted((root / schema.SHARDS_DIR).glob("rank-*.h5")):
            _import_shard(run_dir, root, shard, run_id, report)
    return report


def _import_shard(run_dir: Path, root: Path, shard: Path, run_id: str, report: ImportReport) -> None:
    try:
        with ShardReader(shard) as reader:
            shard_run, rank = reader.run_id, reader.rank
            artifacts = [r for r in reader.records("artifact") if r.get("copied") is True]
    except BAD_SHARD as exc:
        report.problems.append(f"not imported: {exc}")
        return
    if shard_run != run_id:
        report.problems.append(f"not imported: {shard} belongs to run {shard_run!r}, not {run_id!r}")
        return
    target = run_dir / schema.SHARDS_DIR / shard.name
    if _bring(shard, target, None, report):
        report.shards.append(shard.name)
        for crash_file in (ring.ring_path(shard), ring.wal_path(shard)):  # what a killed rank had not flushed
            if crash_file.is_file():
                _bring(crash_file, target.with_name(crash_file.name), None, report)
    for record in artifacts:
        _import_artifact(run_dir, root, rank, record, report)


def _import_artifact(run_dir: Path, root: Path, rank: int, record: dict[str, Any], report: ImportReport) -> None:
    rel = _own_artifact_path(rank, record.get("path"))
    sha, size = record.get("sha256"), record.get("size")
    if rel is None or not isinstance(sha, str) or type(size) is not int:
        report.problems.append(f"rank {rank}: artifact record refused (bad path, sha256 or size): "
                               f"{str(record)[:120]}")
        return
    source, target = root.joinpath(*rel.parts), run_dir.joinpath(*rel.parts)
    if not record.get("directory"):
        _bring(source, target, sha, report)
        return
    if target.is_dir() and _sha_or_none(target, True) == sha:
        report.present += 1
        return
    if _sha_or_none(source, True) != sha:
        report.problems.append(f"rank {rank}: directory artifact {source} is missing or differs from its "
                               "record; not imported")
        return
    for relpath in directory_entries(source)[0]:
        _bring(source / relpath, target / relpath, None, report)


def _own_artifact_path(rank: int, path: object) -> PurePosixPath | None:
    """A recorded path that stays inside this rank's artifact directory, else None."""
    rel = relative_inside(path)
    return rel if rel is not None and PurePosixPath(schema.rank_artifacts_dir(rank)) in rel.parents else None


def _sha_or_none(path: Path, directory: bool) -> str | None:
    try:
        return content_sha256(path, directory)[0]
    except OSError:
        return None


def _bring(source: Path, target: Path, sha: str | None, report: ImportReport) -> bool:
    """Copy one file unless an identical one is there; ``sha`` is what it must hash to (None:
    whatever the source holds). True when the target now holds it."""
    try:
        expected, length = sha256_file(source) if sha is None else (sha, source.stat().st_size)
    except OSError as exc:
        report.problems.append(f"not imported: {source}: {exc.strerror or exc}")
        return False
    if target.exists() or target.is_symlink():
        if _sha_or_none(target, False) == expected:
            report.present += 1
            return True
        report.problems.append(f"not imported: {target} exists and differs from {source}; left as it is")
        return False
    (problem,) = write_files(read_chunks([(source, length)]), [FileSpec(target, length, expected)])
    if problem is not None:
        report.problems.append(f"not imported: {source}: {problem}")
        return False
    report.copied += 1
    return True

