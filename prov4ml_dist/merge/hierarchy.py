"""The hierarchical merge in one process: what the node leaders and rank 0 do at end_run
(``aggregate.py``), done in turn, for a run whose shards are grouped by node here.

Used offline (tests, ``benchmarks/bench_merge.py``) and by rank 0 for a node whose leader
did not deliver its part. Same files as ``merge_run`` (``combine.py`` says what may differ).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path

import h5py

from ..shard import schema
from . import layout
from .combine import combine_parts
from .merger import MergeResult
from .numbering import number_series
from .parts import PARTS_DIR, NodeScan, scan_node, write_part


def part_path(run_dir: Path, node: int) -> Path:
    """Where node ``node``'s part lies in the run directory."""
    return Path(run_dir) / PARTS_DIR / f"node-{node:05d}.h5"


def missing_parts(merged: h5py.File) -> list[str]:
    """The node parts an open merged.h5's virtual rows name that are not beside it (HDF5 would
    read fill rows, series -1, in their place)."""
    found = []
    base = Path(merged.filename).parent
    for table in schema.TABLES:
        rows = merged.get(f"{table}/{layout.ROWS}")
        if isinstance(rows, h5py.Dataset) and rows.is_virtual:
            names = sorted({source.file_name for source in rows.virtual_sources()})
            found += [f"{table}/{layout.ROWS} reads {name}, which is not beside {Path(merged.filename).name}"
                      for name in names if not (base / name).is_file()]
    return found


def node_parts(run_dir: Path) -> list[Path]:
    """The node parts in the run directory, in node order (none: not merged hierarchically)."""
    return sorted((Path(run_dir) / PARTS_DIR).glob("node-*.h5"))


def merge_nodes(run_dir: Path, nodes: Sequence[Sequence[Path]], *, single_file: bool = False,
                **combine: object) -> MergeResult:
    """Merge ``run_dir`` from its shards grouped by node (``nodes``: each node's shard paths):
    a part per node under ``run_dir/parts``, then their combination (``combine_parts``;
    ``combine`` passes its keywords). With ``single_file`` the parts are removed afterwards."""
    run_dir = Path(run_dir)
    scans: list[NodeScan] = []
    try:
        for shards in nodes:
            scans.append(scan_node(shards, run_dir.name))
        numbers = number_series([scan.series() for scan in scans])
        paths = [part_path(run_dir, n) for n in range(len(scans))]
        paths[0].parent.mkdir(parents=True, exist_ok=True)
        for scan, ids, path in zip(scans, numbers, paths, strict=True):
            write_part(scan, ids, path)
    finally:
        for scan in scans:
            scan.close()
    result = combine_parts(run_dir, paths, single_file=single_file, **combine)  # type: ignore[arg-type]
    if single_file:
        for path in paths:
            with contextlib.suppress(OSError):
                path.unlink()
        with contextlib.suppress(OSError):
            paths[0].parent.rmdir()
    return result
