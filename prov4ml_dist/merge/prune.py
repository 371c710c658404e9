"""Removing shards once merged.h5 holds them (``prov4ml-dist merge --remove-shards``; off by default).

A shard goes only when merged.h5 names it with a sha256 that its bytes still have: the file
merged is the file removed. A shard with a crash ring or WAL beside it is kept (its recovered
rows are merged, but the ring is not part of the checksum), as is one merged.h5 does not list.
"""

from __future__ import annotations

from pathlib import Path

import h5py

from ..artifacts import sha256_file
from ..shard import ring, schema
from . import layout


def remove_merged_shards(run_dir: Path, merged_h5: Path) -> tuple[list[Path], list[str]]:
    """Remove the shards of ``run_dir`` verified against ``merged_h5``; the removed paths and
    why each other shard was kept."""
    with h5py.File(merged_h5, "r") as f:
        listed = {row["shard"].decode(): row["shard_sha256"].decode() for row in f[layout.RANKS][()] if row["shard"]}
    removed, kept = [], []
    for name, expected in sorted(listed.items()):
        path = run_dir / schema.SHARDS_DIR / name
        if Path(name).name != name or not path.is_file():
            continue
        if ring.ring_path(path).exists() or ring.wal_path(path).exists():
            kept.append(f"{name}: kept, it has a crash ring beside it")
            continue
        try:
            actual = sha256_file(path)[0]
        except OSError as exc:
            kept.append(f"{name}: kept, unreadable ({exc.strerror or exc})")
            continue
        if not expected or actual != expected:
            kept.append(f"{name}: kept, its sha256 is not the one merged.h5 recorded")
            continue
        path.unlink()
        removed.append(path)
    return removed, kept
