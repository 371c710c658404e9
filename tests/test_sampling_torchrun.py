"""Node-wide sensors are sampled once per node: by local rank 0 only (real torchrun, 2 ranks)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from prov4ml_dist.shard import ShardReader

from .conftest import BIN, child_env

SCRIPT = Path(__file__).parent / "scripts" / "sample_briefly.py"


@pytest.mark.slow
def test_only_local_rank_0_samples_node_series(tmp_path):
    done = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", str(SCRIPT), str(tmp_path)],
                          env=child_env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    (run_dir,) = (tmp_path / "sampling").iterdir()
    keys: dict[int, set[str]] = {}
    for rank in (0, 1):
        with ShardReader(run_dir / "shards" / f"rank-{rank:05d}.h5") as r:
            series = r.series("system")
            keys[rank] = {s["key"] for s in series.values()}
            assert {s["sampled_by"] for s in series.values()} == {rank}
            assert r.rows("system") > 0
    assert any(k.startswith("node_") for k in keys[0])
    assert not any(k.startswith("node_") for k in keys[1])
    assert {k for k in keys[1] if k.startswith("process_")} == {k for k in keys[0] if k.startswith("process_")}
    assert (run_dir / "prov.json").is_file()
