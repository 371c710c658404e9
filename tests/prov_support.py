"""Shared by the PROV tests and benchmarks/bench_prov.py: a synthetic merged run of any size
(plain data, no HDF5: building 1,024 x 2,000 series takes seconds) and the check every real
job's prov.json must pass."""

from __future__ import annotations

import json
from pathlib import Path

from prov.model import ProvDocument

from prov4ml_dist.merge.model import GroupSummary, MergedRun, RankAttempt, SeriesSummary
from prov4ml_dist.provenance.constraints import check
from prov4ml_dist.provenance.vocabulary import undefined_terms

T0 = 1_700_000_000.0


def synthetic_run(ranks: int, keys: int, ranks_per_node: int = 4) -> MergedRun:
    """``ranks`` complete ranks, each logging ``keys`` metric keys of 100 points, grouped per key."""
    attempts = [RankAttempt(rank=r, attempt=0, status="ok", complete=True, node_rank=r // ranks_per_node,
                            local_rank=r % ranks_per_node, hostname=f"node{r // ranks_per_node}", start_time=T0,
                            end_time=T0 + 1000, last_time=T0 + 999, shard=f"rank-{r:05d}.h5", shard_sha256="0" * 64,
                            reason="", topology={"rank": r, "pid": 1000 + r, "hostname": f"node{r // ranks_per_node}"},
                            environment={"python": "3.11.7", "torch": "2.5.0", "user": "bench"})
                for r in range(ranks)]
    series, groups, extra = [], [], {}
    for k in range(keys):
        start = len(series)
        for r in range(ranks):
            row = (k * ranks + r) * 100
            series.append(SeriesSummary("/metrics/rows", len(series), f"metric_{k:05d}", "TRAINING", "", r, 0, k, row,
                                        row + 100, 100, 0, 1, 0, 99, 0.0, 1.0, 0.5, T0 + 1, T0 + 900, extra))
        groups.append(GroupSummary("metrics", "/metrics/crossrank", k, f"metric_{k:05d}", "TRAINING", "", 0,
                                   tuple(range(start, len(series))), k * 100, k * 100 + 100, 100, k % ranks, 10, 0.01,
                                   0.1, 5, {k % ranks: 10}))
    return MergedRun(run_id="bench", experiment_name="bench", user_namespace="http://example.org/", user="bench",
                     world_size=ranks, ranks=attempts, params=[], series=series, groups=groups, artifacts=[],
                     datasets=[], models=[], energy=[], problems=[], merge_stamp={"merged_at": T0 + 1001,
                                                                                 "version": "0.1.0"})


def records(doc: dict) -> int:
    """Elements and relations of a PROV-JSON document."""
    return sum(len(v) for k, v in doc.items() if k != "prefix")


def assert_prov_model_valid(prov_json: Path) -> dict:
    """Zero PROV-CONSTRAINTS violations, every p4d: term defined, and prov parses it; returns the doc."""
    doc = json.loads(Path(prov_json).read_text())
    violations = check(doc)
    assert violations == [], "\n".join(map(str, violations[:20]))
    assert undefined_terms(doc) == {}
    ProvDocument.deserialize(source=str(prov_json), format="json")
    return doc
