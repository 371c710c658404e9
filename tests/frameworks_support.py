"""Checks shared by the framework tests: a job gave one run, one agent per rank, every rank's
metrics with cross-rank statistics, checkpoints as model versions, a valid prov.json."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from prov.model import ProvDocument

from prov4ml_dist.merge.load import load_merged

from .conftest import BIN, REPO, child_env

SCRIPTS = REPO / "tests" / "scripts"


def framework_env(**extra: str) -> dict[str, str]:
    """The child environment with this test's PYTHONPATH (the frameworks may live in a --target
    directory on it) and no variables a previous run exported."""
    env = child_env(**extra)
    env = {k: v for k, v in env.items() if not k.startswith("PROV4ML_DIST_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    return env


def run_job(args: list[str], cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run one framework job to the end; its output is shown when it fails."""
    proc = subprocess.run(args, cwd=cwd, env=framework_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args} exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc


def torchrun(nproc: int) -> list[str]:
    return [str(BIN / "torchrun"), f"--nproc_per_node={nproc}", "--standalone"]


def assert_one_run(save_dir: Path, experiment: str, world_size: int, per_rank_keys: tuple[str, ...],
                   model_versions: int = 0) -> Path:
    """The job's one run directory, after checking it (see the module docstring)."""
    runs = sorted(p for p in (save_dir / experiment).iterdir() if p.is_dir())
    assert len(runs) == 1, f"expected one run, got {[p.name for p in runs]}"
    run_dir = runs[0]
    merged = load_merged(run_dir / "merged.h5")
    assert merged.world_size == world_size
    assert sorted(r.rank for r in merged.ranks) == list(range(world_size))
    assert all(r.complete for r in merged.ranks), [(r.rank, r.status) for r in merged.ranks]
    for key in per_rank_keys:
        ranks = {s.rank for s in merged.series if s.key == key and s.count > 0}
        assert ranks == set(range(world_size)), f"{key}: points from ranks {ranks}"
        groups = [g for g in merged.groups if g.key == key]
        assert groups and max(g.multi_rank_steps for g in groups) > 0, f"{key}: no cross-rank statistics"
    versions = sorted(g.version for a in merged.artifacts for g in a.generations if g.item == "model_version")
    assert len(versions) >= model_versions, versions
    if model_versions:
        assert versions[:model_versions] == list(range(model_versions))
    doc = json.loads((run_dir / "prov.json").read_text())
    ProvDocument.deserialize(content=json.dumps(doc), format="json")
    check = subprocess.run([str(BIN / "prov4ml-dist"), "validate", str(run_dir)], capture_output=True, text=True,
                           env=framework_env(), timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"{world_size} rank agents" in check.stdout, check.stdout
    return run_dir


def needs(module: str) -> None:
    """Skip where the framework is not installed (``pip install prov4ml-dist[lightning,hf]``)."""
    pytest.importorskip(module)
