"""What every example checks on rank 0 after end_run: the merged run holds every rank, the
expected series for each of them, no disagreeing params and no problems."""

from __future__ import annotations

import os
from pathlib import Path

from prov4ml_dist.merge import load_merged
from prov4ml_dist.provenance.export import load_document


def check_merged(prov_json: Path | None, series: list[tuple[str, str]], files: tuple[str, ...] = ()) -> None:
    """Assert on rank 0 (``prov_json`` is None on the others); prints CHECKED for the test."""
    if prov_json is None:
        assert int(os.environ.get("RANK", "0")) != 0, "rank 0 got no prov.json"
        return
    world = int(os.environ.get("WORLD_SIZE", "1"))
    run = load_merged(prov_json.parent / "merged.h5")
    assert run.world_size == world and all(r.complete for r in run.ranks), run.ranks
    assert sorted(r.rank for r in run.ranks) == list(range(world))
    for key, context in series:
        ranks = sorted(s.rank for s in run.series if s.key == key and s.context == context and s.count)
        assert ranks == list(range(world)), f"{key}/{context}: ranks {ranks}"
    differing = sorted({p.key for p in run.params if not p.majority})
    assert not differing, f"params differ across ranks: {differing}"
    assert not run.problems, run.problems
    for name in files:
        assert (prov_json.parent / name).is_file(), name
    load_document(prov_json)  # parses with prov
    print(f"CHECKED {world} ranks: {prov_json.parent}")
