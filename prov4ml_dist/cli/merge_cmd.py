"""``prov4ml-dist merge``: the offline merge of a run whose online merge did not happen (a
crash, a time limit, no process group) or failed: the same ``merge_run`` as at ``end_run``,
over the shards alone, so a clean job merges to the same files either way."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from pathlib import Path

from ..errors import MergeError
from ..merge import load_merged, merge_run
from ..merge.combine import combine_parts
from ..merge.hierarchy import node_parts
from ..merge.parallel import PARALLEL_MIN_SHARDS, default_jobs
from ..merge.parts import PARTS_DIR
from ..merge.prune import remove_merged_shards
from ..merge.scan import BAD_SHARD, choose_run_id, default_shards
from ..shard import ShardReader, schema
from .localdirs import import_local_dirs
from .output import EXIT_OK, EXIT_PROBLEMS, CliError, duration, warn_all
from .progress import MergeProgress
from .rundir import existing_directory, one_run_in

DESCRIPTION = """\
Build merged.h5 and prov.json of RUN_DIR from its shards alone. A crashed job merges up to
each shard's last flush; ranks that ended without end_run are marked incomplete. Running it
again, or after an online merge that timed out, replaces the outputs (it never duplicates).
Exit status: 0 merged; 1 merged, but a shard or a --local-dirs file was left out (listed);
2 nothing merged."""


def register(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = commands.add_parser("merge", parents=[common], help="build merged.h5 and prov.json from the shards",
                            description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="<provenance_save_dir>/<experiment>/<run_id>")
    p.add_argument("--local-dirs", type=Path, nargs="+", default=[], metavar="DIR",
                   help="directories copied back from node-local disks, holding <experiment>/<run_id>/shards "
                        "and artifacts of some ranks: their files are verified and copied into RUN_DIR first")
    p.add_argument("--remove-shards", action="store_true",
                   help="after the merge, remove each shard whose sha256 merged.h5 records (the file merged "
                        "is the file removed); shards with a crash ring beside them are kept")
    p.add_argument("--jobs", type=_jobs, default=None, metavar="N",
                   help="processes to merge with (default: the cores available to this process, for a run "
                        f"of at least {PARALLEL_MIN_SHARDS} shards; 1 below); the files are the "
                        "same whatever N")
    p.add_argument("--single-file", action="store_true",
                   help="for a run merged hierarchically at end_run (merged.h5's rows point into the node parts "
                        f"under RUN_DIR/{PARTS_DIR}): copy the rows into one self-contained merged.h5, from the "
                        "parts, and remove them; other runs' merged.h5 is self-contained already")
    p.set_defaults(func=run)


def _jobs(text: str) -> int:
    try:
        jobs = int(text)
    except ValueError:
        jobs = 0
    if jobs < 1:
        raise argparse.ArgumentTypeError(f"--jobs wants a whole number of processes, at least 1 (got {text!r})")
    return jobs


def run(args: argparse.Namespace) -> int:
    run_dir = existing_directory(args.run_dir)
    if not (run_dir / schema.SHARDS_DIR).is_dir() and not args.local_dirs:
        run_dir = one_run_in(run_dir) or run_dir  # an experiment directory holding one run
    refused = 0
    if args.local_dirs:
        _check_writable(run_dir)
        run_id = expected_run_id(run_dir, list(shard_identities(default_shards(run_dir)).values()))
        report = import_local_dirs(run_dir, args.local_dirs, run_id)
        warn_all(report.problems)
        refused = len(report.problems)
        print(f"--local-dirs: {report.copied} files copied into {run_dir}, {report.present} already there")
    if args.single_file and node_parts(run_dir):
        return _single_file(run_dir)
    paths = default_shards(run_dir)
    _check_parts_covered(run_dir, paths)
    if not paths:
        raise CliError(f"{run_dir} is not a run directory with shards (no {schema.SHARDS_DIR}/rank-*.h5); "
                       "shards left on node-local disks are brought in with --local-dirs")
    _check_writable(run_dir)
    jobs = args.jobs or default_jobs(paths)
    started = time.monotonic()
    progress = MergeProgress(sys.stderr)
    try:  # shards of another run are left out by the merge, and listed among its problems
        result = merge_run(run_dir, shard_paths=paths, progress=progress, jobs=jobs)
    finally:
        progress.finish()
    warn_all(result.problems, rest=" (merged.h5 keeps them all, in its 'problems' attribute)")
    merged = load_merged(result.merged_h5)
    used = {r.shard for r in merged.ranks if r.shard}
    skipped = [p for p in paths if p.name not in used]
    states = Counter(r.status for r in merged.ranks if not r.complete)
    print(f"merged {len(used)} shard(s) of {merged.world_size} rank(s)"
          + (" (" + ", ".join(f"{n} {s}" for s, n in sorted(states.items())) + ")" if states else "")
          + f", {sum(s.count for s in merged.series)} points in {duration(time.monotonic() - started)}: "
          f"{result.merged_h5} and {result.prov_json.name}")
    for stale in node_parts(run_dir):  # merged.h5 is self-contained now: nothing points into them
        stale.unlink()
    if args.remove_shards:
        removed, kept = remove_merged_shards(run_dir, result.merged_h5)
        warn_all(kept)
        print(f"--remove-shards: {len(removed)} shard(s) removed, {len(kept)} kept")
    return EXIT_PROBLEMS if skipped or refused else EXIT_OK


def _check_parts_covered(run_dir: Path, paths: list[Path]) -> None:
    """A run merged by node may hold fewer shards than its merged.h5 (the other nodes' stayed on
    their disks): merging those alone would replace a complete merged.h5 with a partial one."""
    if not node_parts(run_dir):
        return
    try:
        listed = {row.shard for row in load_merged(run_dir / "merged.h5").ranks if row.shard}
    except MergeError:
        return
    absent = sorted(listed - {p.name for p in paths})
    if absent:
        raise CliError(f"{run_dir} was merged node by node and {len(absent)} of its shards stayed on their nodes "
                       f"({', '.join(absent[:5])}{' ...' if len(absent) > 5 else ''}): merging the rest would "
                       "leave them out. --single-file makes merged.h5 self-contained from the node parts; "
                       "--local-dirs brings the shards in")


def _single_file(run_dir: Path) -> int:
    """merged.h5 made self-contained from the node parts its rows point into; the parts removed."""
    _check_writable(run_dir)
    parts = node_parts(run_dir)
    started = time.monotonic()
    progress = MergeProgress(sys.stderr)
    try:
        result = combine_parts(run_dir, parts, single_file=True, progress=progress)
    finally:
        progress.finish()
    warn_all(result.problems, rest=" (merged.h5 keeps them all, in its 'problems' attribute)")
    for path in parts:
        path.unlink()
    print(f"--single-file: the rows of {len(parts)} node part(s) copied into {result.merged_h5} in "
          f"{duration(time.monotonic() - started)}; the parts removed")
    return EXIT_OK


def shard_identities(paths: list[Path]) -> dict[Path, tuple[str, int, int]]:
    """(run id, rank, attempt) of each shard that opens; unreadable ones are left for the merge."""
    ids = {}
    for path in paths:
        try:
            with ShardReader(path) as reader:
                ids[path] = (reader.run_id, reader.rank, reader.attempt)
        except BAD_SHARD:
            continue
    return ids


def expected_run_id(run_dir: Path, identities: list[tuple[str, int, int]]) -> str:
    """The run id the merge will keep (``choose_run_id``); the directory's name when no shard opens."""
    return choose_run_id(run_dir.name, identities) if identities else run_dir.name


def _check_writable(run_dir: Path) -> None:
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise CliError(f"cannot write to {run_dir}: permission denied")
