"""The hierarchical merge at end_run: each node's leader merges its node's shards into a part,
in parallel across nodes, and rank 0 combines the parts (``merge/hierarchy.py`` says how).

Used when the job spans two nodes or more with more ranks than nodes
(``PROV4ML_HIERARCHICAL_MERGE``: ``auto``, the default; ``on`` forces it, even on one node;
``off`` never). A node is a
(hostname, node rank) of the ranks' manifests; its leader is its lowest rank. After the file
transfers of ``aggregate.py`` (artifacts as always; shards only of rank 0's node), every rank
takes part in three more rank-0-rooted steps, each bounded by ``merge_timeout``:

1. the leaders scan their node's shards where the ranks left them (their node-local disk when
   there is no shared filesystem) and gather their series to rank 0;
2. rank 0 numbers the series as merged.h5 does and broadcasts each leader its numbers (or
   that the merge falls back);
3. the leaders write their parts (rank 0 its own node's, at the same time) and gather where
   they are; a part not already under the run directory is streamed to rank 0, sha256-checked.

Rank 0's own part also takes every shard in the run directory that no leader reads (earlier
attempts, ranks that left before end_run), as ``merge_run`` would. Rank 0 then combines the
parts. A leader that fails, dies or is late at any step makes rank 0 fall back to
``merge_run`` over the shards it can read (all of them on a shared filesystem); the ranks
whose shards it cannot read are merged as missing, and the command that merges them later is
logged. Nothing waits longer than its timeout; a rank that never reached end_run is not
waited for again.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .artifacts import sha256_file
from .errors import MergeError
from .merge.hierarchy import part_path
from .merge.numbering import NODE_SERIES_DTYPE, number_series
from .merge.parts import PARTS_DIR, NodeScan, scan_node, write_part
from .merge.scan import default_shards
from .transport import FileSpec, Transport, TransportError, read_chunks, receive_files

log = logging.getLogger(__name__)

SETTING_ENV = "PROV4ML_HIERARCHICAL_MERGE"
SETTINGS = ("auto", "on", "off")


def plan_nodes(manifests: Mapping[int, Any]) -> dict[int, list[int]] | None:
    """Leader rank → its node's ranks, when the merge is hierarchical; None otherwise."""
    setting = os.environ.get(SETTING_ENV, "auto").strip().lower()
    if setting not in SETTINGS:
        log.warning("prov4ml_dist: %s=%r is none of %s; using auto", SETTING_ENV, setting, ", ".join(SETTINGS))
        setting = "auto"
    if setting == "off" or 0 not in manifests:
        return None
    by_node: dict[tuple[str, int], list[int]] = {}
    for rank, manifest in manifests.items():
        if isinstance(manifest, dict) and manifest.get("rank") == rank:
            key = (str(manifest.get("hostname")), manifest.get("node_rank"))
            by_node.setdefault(key, []).append(rank)
    nodes = sorted(sorted(ranks) for ranks in by_node.values())
    if setting == "auto" and not (len(nodes) >= 2 and sum(map(len, nodes)) > len(nodes)):
        return None
    return {ranks[0]: ranks for ranks in nodes}


def shard_paths(manifests: Mapping[int, Any], ranks: list[int]) -> list[str]:
    """Where each rank left its shard, as the rank (and its node) sees it."""
    paths = []
    for rank in ranks:
        manifest = manifests[rank]
        root = manifest.get("rank_root") if isinstance(manifest, dict) else None
        for entry in manifest.get("files", []) if isinstance(manifest, dict) else []:
            if isinstance(entry, dict) and entry.get("kind") == "shard" and isinstance(root, str):
                paths.append(str(Path(root) / str(entry.get("path"))))
    return paths


def _series_message(scan: NodeScan) -> dict[str, list[list[Any]]]:
    """Round one's message: the node's series, as JSON rows."""
    return {table: [[str(r["key"]), str(r["context"]), str(r["source"]), int(r["attempt"]), int(r["rank"]),
                     int(r["decl"]), int(r["rows"])] for r in _decoded(rows)] for table, rows in scan.series().items()}


def _decoded(rows: np.ndarray) -> list[dict[str, Any]]:
    return [{name: (v.decode() if isinstance(v, bytes) else v) for name, v in zip(rows.dtype.names, row, strict=True)}
            for row in rows.tolist()]


def _series_arrays(message: Any) -> dict[str, np.ndarray]:
    """Round one's message back as ``NODE_SERIES_DTYPE`` (raises on anything else)."""
    if not isinstance(message, dict):
        raise ValueError("not a series message")
    return {table: np.array([tuple(row) for row in rows], dtype=NODE_SERIES_DTYPE) for table, rows in message.items()}


def leader_part(run: Any, transport: Transport, plan: dict[str, Any], timeout: float) -> None:
    """A rank other than 0 after its file transfers: a leader merges its node's part; every
    rank takes its turn in the three steps (a non-leader with nothing to say)."""
    node = plan.get("nodes", {}).get(str(transport.rank))
    scan: NodeScan | None = None
    said: Any = None
    if node is not None:
        try:
            scan = scan_node([Path(p) for p in node["shards"]], run.run_dir.name)
            said = {"series": _series_message(scan)}
        except Exception as exc:  # noqa: BLE001 - reported to rank 0, which falls back
            said = {"error": f"{type(exc).__name__}: {exc}"}
    try:
        transport.gather(said, timeout)
        numbers = transport.broadcast(None, timeout + float(plan.get("turn_wait", timeout)))
        if not numbers.get("go"):
            return  # rank 0 falls back: the third step is not taken
        if scan is None or str(transport.rank) not in numbers.get("ids", {}):
            transport.gather(None, timeout)
            return
        ids = {table: np.asarray(v, dtype=np.int64) for table, v in numbers["ids"][str(transport.rank)].items()}
        target = part_path(run.rank_root, int(node["index"]))
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            write_part(scan, ids, target)
        except Exception as exc:  # noqa: BLE001 - said to rank 0 at once, which falls back
            transport.gather({"error": f"{type(exc).__name__}: {exc}"}, timeout)
            raise
        finally:
            scan = None  # write_part closed it
        size, sha = target.stat().st_size, sha256_file(target)[0]
        shared = target.resolve() == part_path(run.run_dir, int(node["index"])).resolve()
        transport.gather({"size": size, "sha256": sha, "stream": not shared}, timeout)
        if not shared:
            transport.send_stream(0, read_chunks([(target, size)]), timeout, float(plan.get("turn_wait", timeout)))
            target.unlink()  # the node-local copy: rank 0 has it now (a failed stream keeps it)
    except Exception as exc:  # noqa: BLE001 - rank 0 falls back; this rank only says so
        log.warning("prov4ml_dist: rank %d: the node part of the hierarchical merge failed (%s: %s); rank 0 "
                    "merges without it", transport.rank, type(exc).__name__, exc)
    finally:
        if scan is not None:
            scan.close()


def collect_parts(run: Any, transport: Transport, nodes: dict[int, list[int]], manifests: Mapping[int, Any],
                  timeout: float) -> tuple[list[Path] | None, str]:
    """Rank 0's side of the three steps: the parts, in node order, under the run directory; or
    None and why when the merge must fall back (the steps are still taken to their end, so no
    rank waits in vain)."""
    own = scan_node(_own_shards(run.run_dir, nodes, manifests), run.run_dir.name)
    there = sorted(manifests)  # a rank that never reached end_run is not waited for again
    try:
        said = transport.gather(None, timeout, ranks=there) or {}
        series, why = [], ""
        for leader in nodes:
            message = {"series": _series_message(own)} if leader == 0 else said.get(leader)
            try:
                series.append(_series_arrays(message["series"]))
            except (TypeError, KeyError, ValueError):
                why = why or f"node leader rank {leader}: " + (str(message.get("error"))[:300]
                                                                if isinstance(message, dict) else "no series")
        numbers = number_series(series) if not why else []
        transport.broadcast({"go": not why, "ids": {str(leader): {t: ids.tolist() for t, ids in numbered.items()}
                                                    for leader, numbered in zip(nodes, numbers, strict=True)}},
                            timeout)
        if why:
            return None, why
        parts = [part_path(run.run_dir, n) for n in range(len(nodes))]
        try:
            parts[0].parent.mkdir(parents=True, exist_ok=True)
            write_part(own, numbers[0], parts[0])
        except (MergeError, OSError) as exc:
            return None, f"rank 0's own part: {exc}"
        located = transport.gather(None, timeout, ranks=there) or {}
        for n, leader in enumerate(nodes):
            if leader == 0:
                continue
            where = located.get(leader)
            if not isinstance(where, dict):
                return None, f"node leader rank {leader}: no part within merge_timeout ({timeout:g} s)"
            if "error" in where:
                return None, f"node leader rank {leader}: {str(where['error'])[:300]}"
            if where.get("stream"):
                outcome = receive_files(transport, leader, [FileSpec(parts[n], int(where["size"]),
                                                                     str(where["sha256"]))], timeout)[0]
                if outcome is not None:
                    return None, f"node leader rank {leader}: its part did not arrive ({outcome})"
            elif not parts[n].is_file():
                return None, f"node leader rank {leader}: its part is not at {parts[n]}"
        return parts, ""
    except TransportError as exc:
        return None, f"{type(exc).__name__}: {exc}"
    finally:
        own.close()


def _own_shards(run_dir: Path, nodes: dict[int, list[int]], manifests: Mapping[int, Any]) -> list[Path]:
    """Rank 0's node's shards, and every other shard in the run directory that no leader reads
    (earlier attempts, ranks that left before end_run): all that ``merge_run`` would merge. A
    shard's name says its (rank, attempt): a copy of one a leader reads is not taken twice."""
    read = {Path(p).name for ranks in nodes.values() for p in shard_paths(manifests, ranks)}
    return [Path(p) for p in shard_paths(manifests, nodes[0])] + [p for p in default_shards(run_dir)
                                                                   if p.name not in read]


def discard_parts(run_dir: Path) -> None:
    """The parts of a hierarchical merge that fell back: merged.h5 does not point into them."""
    shutil.rmtree(Path(run_dir) / PARTS_DIR, ignore_errors=True)
