"""Sample indices as ranges, and the cross-rank check of which rank consumed which samples.

``IndexedDatasetWrapper`` records, per rank and epoch, the indices it served as sorted
half-open ranges ``[start, stop)`` (a DistributedSampler's stride-N indices are many short
ranges; a contiguous shard is one). Here: building ranges, and from ``merged.h5`` whether the
ranks' sets are disjoint and together cover the dataset.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

RECORD_KIND = "indices"


def to_ranges(indices: Iterable[int]) -> list[list[int]]:
    """Sorted, merged half-open ranges covering exactly ``indices`` (duplicates collapse)."""
    ranges: list[list[int]] = []
    for i in sorted(set(indices)):
        if ranges and ranges[-1][1] == i:
            ranges[-1][1] = i + 1
        else:
            ranges.append([i, i + 1])
    return ranges


def union(range_lists: Iterable[list[list[int]]]) -> list[list[int]]:
    """The union of several range lists, merged (touching ranges join)."""
    merged: list[list[int]] = []
    for start, stop in sorted((r[0], r[1]) for ranges in range_lists for r in ranges):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], stop)
        else:
            merged.append([start, stop])
    return merged


def _count(ranges: list[list[int]]) -> int:
    return sum(stop - start for start, stop in ranges)


def _overlap(a: list[list[int]], b: list[list[int]]) -> int:
    """How many indices two sorted range lists share."""
    i = j = shared = 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        shared += max(0, hi - lo)
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return shared


def coverage(records: Iterable[tuple[int, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per (label, epoch): ranks, samples served, indices served by more than one rank
    (``overlap``), distinct indices, dataset length and whether the ranks covered it."""
    grouped: dict[tuple[str, int], dict[int, list[list[int]]]] = defaultdict(dict)
    lengths: dict[str, int | None] = {}
    for rank, record in records:
        key = (str(record.get("label", "")), int(record.get("epoch", 0)))
        grouped[key][rank] = [list(r) for r in record.get("ranges", [])]
        lengths[key[0]] = record.get("dataset_len")
    out = []
    for (label, epoch), per_rank in sorted(grouped.items()):
        covered = union(per_rank.values())
        served = sum(_count(r) for r in per_rank.values())
        ranks = sorted(per_rank)
        pairwise = sum(_overlap(per_rank[a], per_rank[b]) for n, a in enumerate(ranks) for b in ranks[n + 1:])
        total = lengths.get(label)
        distinct = _count(covered)
        out.append({"label": label, "epoch": epoch, "ranks": ranks, "served": served, "distinct": distinct,
                    "overlap": pairwise, "disjoint": pairwise == 0, "dataset_len": total,
                    "covers": total is not None and covered == [[0, total]]})
    return out


def coverage_of_merged(merged: str | Path) -> list[dict[str, Any]]:
    """``coverage`` of the index records in a ``merged.h5``."""
    import h5py

    from ..merge import layout

    with h5py.File(merged, "r") as f:
        rows = f[layout.RECORDS][()]
    found = []
    for row in rows:
        kind = row["kind"].decode() if isinstance(row["kind"], bytes) else str(row["kind"])
        if kind == RECORD_KIND:
            text = row["json"].decode() if isinstance(row["json"], bytes) else str(row["json"])
            found.append((int(row["rank"]), json.loads(text)))
    return coverage(found)


def describe_coverage(entry: dict[str, Any]) -> str:
    """One summary line: ``train epoch 0: 2 ranks, 100 samples, disjoint, cover all 100``."""
    shared = "disjoint" if entry["disjoint"] else f"{entry['overlap']} indices served by more than one rank"
    total = entry["dataset_len"]
    if entry["covers"]:
        cover = f"cover all {total}"
    elif total is not None:
        cover = f"cover {entry['distinct']} of {total}"
    else:
        cover = f"{entry['distinct']} distinct"
    return (f"{entry['label']} epoch {entry['epoch']}: {len(entry['ranks'])} ranks, {entry['served']} samples, "
            f"{shared}, {cover}")
