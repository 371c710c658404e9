"""Shared fixtures: every test leaves no active run behind and writes only under tmp_path."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

import prov4ml_dist as prov4ml
from prov4ml_dist import api

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


@pytest.fixture(autouse=True)
def no_active_run():
    """Close (without merging) any run a failing test left open."""
    yield
    api._ended = api._handed_over = None  # what a previous test ended or handed over is not this test's
    run = api.get_active_run()
    if run is not None:
        run.close("test-teardown")
        api._active = None
        if api._hooks is not None:
            api._hooks.remove()
            api._hooks = None


@pytest.fixture(autouse=True)
def clean_launcher_env(monkeypatch):
    """Tests decide their own topology: drop launcher variables inherited from the shell."""
    for name in list(os.environ):
        if name.startswith(("SLURM_", "TORCHELASTIC_", "PMI_", "OMPI_", "PMIX_", "PROV4ML_DIST_")) or name in (
                "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MPI_LOCALRANKID", "NODE_RANK"):
            monkeypatch.delenv(name, raising=False)


@pytest.fixture
def run_dir(tmp_path):
    """An active single-process run without sampling; yields its directory."""
    path = prov4ml.start_run(experiment_name="t", provenance_save_dir=tmp_path / "prov", sample_interval=None)
    yield path


def child_env(**extra: str) -> dict[str, str]:
    """Environment for subprocesses: this interpreter's venv first, one thread per process."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "TORCHELASTIC_", "PMI_", "OMPI_"))}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env
