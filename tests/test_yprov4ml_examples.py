"""yProv4ML's example scripts, re-written in the same style (same calls, same order, our own tiny
data), run unchanged under python and torchrun (2 ranks; 4 for the HPC example). Each script
checks the merged output on rank 0 itself (tests/scripts/yprov4ml_examples/_check.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import BIN, REPO, child_env

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).parent / "scripts" / "yprov4ml_examples"
TORCHRUN = BIN / "torchrun"


def run_example(cwd: Path, script: str, ranks: int | None, *args: str) -> str:
    """``python script`` (ranks None) or ``torchrun --nproc_per_node=ranks script`` in ``cwd``."""
    if ranks is None:
        cmd = [sys.executable, str(EXAMPLES / script), *args]
    else:
        if not TORCHRUN.exists():
            pytest.skip("torchrun is not installed")
        cmd = [str(TORCHRUN), "--standalone", f"--nproc_per_node={ranks}", str(EXAMPLES / script), *args]
    proc = subprocess.run(cmd, cwd=cwd, env=child_env(PYTHONPATH=str(REPO)), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


@pytest.mark.parametrize(("script", "ranks"), [
    ("torch_example.py", None), ("torch_example.py", 2),
    ("wrappers_example.py", None), ("wrappers_example.py", 2),
    ("cnn_example.py", None), ("cnn_example.py", 2),
    ("hpc_example.py", None), ("hpc_example.py", 2),
    ("plot_example.py", None), ("plot_example.py", 2),
    ("benchmark_example.py", None), ("benchmark_example.py", 2),
    ("logger_example.py", None), ("logger_example.py", 2),
])
def test_example_runs_unchanged_and_merges(tmp_path, script, ranks):
    out = run_example(tmp_path, script, ranks)
    assert out.count(f"CHECKED {ranks or 1} ranks") == (3 if script == "benchmark_example.py" else 1)
    if script == "hpc_example.py":
        assert "INDICES disjoint and covering" in out


def test_reading_example_reads_a_merged_run(tmp_path):
    run_example(tmp_path, "torch_example.py", None)
    prov_json = next((tmp_path / "prov" / "example").glob("*/prov.json"))
    out = run_example(tmp_path, "reading_example.py", None, str(prov_json), "example")
    assert "READ OK" in out and f"run_id          : {prov_json.parent.name}" in out


def test_summary_says_whether_ranks_indices_are_disjoint_and_cover_the_dataset(tmp_path):
    run_example(tmp_path, "hpc_example.py", 2)
    run_dir = next((tmp_path / "prov" / "experiment_name").iterdir())
    out = subprocess.run([str(BIN / "prov4ml-dist"), "summary", str(run_dir)], env=child_env(PYTHONPATH=str(REPO)),
                         capture_output=True, text=True, timeout=120, check=True).stdout
    assert "train_dataset epoch 1: 2 ranks, 88 samples, disjoint, cover all 88" in out
