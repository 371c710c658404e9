"""Round one of the hierarchical merge, on rank 0: merged.h5's series numbers for every node.

merged.h5 numbers its series in (key, context, source, attempt, rank, id in the shard) order
and every row carries its series' number. Each node leader sends rank 0 its series (a few
fields per rank and key, ``NODE_SERIES_DTYPE``); rank 0 sorts them all once and answers each
node with the number of each of its series. The leaders then write their rows already
numbered as in merged.h5, so that rank 0 can point merged.h5 at the parts' rows (HDF5
virtual datasets) instead of reading and rewriting every point.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ..errors import MergeError
from ..shard import schema
from . import layout

NODE_SERIES_DTYPE = np.dtype([("key", layout.STR), ("context", layout.STR), ("source", layout.STR),
                              ("attempt", "<i4"), ("rank", "<i4"), ("decl", "<i8"), ("rows", "<i8")])


def number_series(nodes: Sequence[Mapping[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """Per node, per table: merged.h5's number of each of the node's series (in its order)."""
    out: list[dict[str, np.ndarray]] = [{} for _ in nodes]
    for table in schema.TABLES:
        keys: list[tuple] = []
        for n, node in enumerate(nodes):
            s = node[table]
            if s.dtype != NODE_SERIES_DTYPE:
                raise MergeError(f"node {n} sent series of another layout ({s.dtype})")
            keys += zip(_text(s["key"]), _text(s["context"]), _text(s["source"]), s["attempt"].tolist(),
                        s["rank"].tolist(), s["decl"].tolist(), [n] * len(s), range(len(s)), strict=True)
        keys.sort()
        for n, node in enumerate(nodes):
            out[n][table] = np.empty(len(node[table]), dtype=np.int64)
        for number, key in enumerate(keys):
            out[key[6]][table][key[7]] = number
    return out


def _text(column: np.ndarray) -> list[str]:
    """A string column as ``str`` (h5py and pickles may give bytes): sorted as merge_run sorts."""
    return [v.decode() if isinstance(v, bytes) else str(v) for v in column.tolist()]
