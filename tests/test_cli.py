"""The prov4ml-dist command line on runs written in-process (no torchrun): every error a person
can make gives one line and the right exit status; summary, plot, export, validate and the
--local-dirs import behave on small and many-rank runs."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

import prov4ml_dist as prov4ml
from prov4ml_dist.cli import main
from prov4ml_dist.cli.progress import MergeProgress
from prov4ml_dist.cli.summary import render
from prov4ml_dist.merge import load_merged, merge_run
from prov4ml_dist.paths import is_temporary
from prov4ml_dist.run import Run, RunConfig
from prov4ml_dist.topology import Topology

from .conftest import child_env
from .test_cli_support import (
    RUN_ID,
    assert_same_points,
    cli,
    merged_content,
    merged_points,
    shard_points,
    unwritable,
    write_run,
)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    """A merged 2-rank run, shared read-only by the tests of this module."""
    return write_run(tmp_path_factory.mktemp("small"), 2)


@pytest.fixture
def small_copy(small, tmp_path) -> Path:
    """A private copy of ``small`` to modify."""
    return Path(shutil.copytree(small, tmp_path / "exp" / small.name))


def _one_line_error(done: subprocess.CompletedProcess, code: int, *words: str) -> None:
    assert done.returncode == code, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("prov4ml-dist "), done.stderr
    for word in words:
        assert word in done.stderr, done.stderr


# -- entry points ------------------------------------------------------------------------
def test_version_from_console_script_and_python_m():
    script = cli("--version")
    module = subprocess.run([sys.executable, "-m", "prov4ml_dist", "--version"], capture_output=True, text=True,
                            env=child_env(), timeout=60)
    assert script.returncode == module.returncode == 0
    assert script.stdout == module.stdout == f"prov4ml-dist {__import__('prov4ml_dist').__version__}\n"


def test_python_m_runs_commands(small):
    done = subprocess.run([sys.executable, "-m", "prov4ml_dist", "summary", str(small)], capture_output=True,
                          text=True, env=child_env(), timeout=60)
    assert done.returncode == 0 and RUN_ID in done.stdout


def test_no_command_is_a_usage_error(capsys):
    assert main([]) == 2
    assert "merge" in capsys.readouterr().err


# -- errors for humans -------------------------------------------------------------------
def test_wrong_path(tmp_path):
    _one_line_error(cli("summary", tmp_path / "nope"), 2, "no such file or directory")
    _one_line_error(cli("validate", tmp_path / "nope"), 2, "no such file or directory")


def test_a_file_or_a_directory_that_is_not_a_run(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    _one_line_error(cli("plot", tmp_path / "notes.txt"), 2, "is a file, not a run directory")
    _one_line_error(cli("summary", tmp_path), 2, "is not a run directory")
    _one_line_error(cli("merge", tmp_path), 2, "no shards/rank-*.h5", "--local-dirs")


def test_a_run_never_merged_says_how(small_copy):
    (small_copy / "merged.h5").unlink()
    _one_line_error(cli("summary", small_copy), 2, f"prov4ml-dist merge {small_copy}")


@pytest.mark.parametrize("damage", ["truncated", "foreign"])
def test_a_damaged_merged_file(small_copy, damage):
    merged = small_copy / "merged.h5"
    if damage == "truncated":
        merged.write_bytes(merged.read_bytes()[:3000])
    else:
        merged.unlink()
        with h5py.File(merged, "w") as f:
            f["x"] = np.arange(3)
    for command in ("summary", "plot"):
        _one_line_error(cli(command, small_copy), 2, "merged.h5")
    _one_line_error(cli("export", small_copy, "--format", "csv"), 2, "merged.h5")


def test_merge_of_only_foreign_hdf5_files(tmp_path):
    shards = tmp_path / "run" / "shards"
    shards.mkdir(parents=True)
    with h5py.File(shards / "rank-00000.h5", "w") as f:
        f["x"] = np.arange(3)
    _one_line_error(cli("merge", tmp_path / "run"), 2, "no readable shard")


def test_bad_shards_are_reported_and_the_others_merged(small_copy, tmp_path):
    """A foreign HDF5 file, a truncated shard and a shard of another run: each is one line on
    stderr, exit status 1, and the good shards merge all the same."""
    shards = small_copy / "shards"
    good = {r: shard_points(shards / f"rank-0000{r}.h5") for r in (0, 1)}
    with h5py.File(shards / "rank-00002.h5", "w") as f:
        f["x"] = np.arange(3)
    (shards / "rank-00003.h5").write_bytes((shards / "rank-00001.h5").read_bytes()[:2048])
    other = write_run(tmp_path / "other", 1, run_id="another-run")
    shutil.copy(other / "shards" / "rank-00000.h5", shards / "rank-00004.h5")
    done = cli("merge", small_copy)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert any("rank-00002.h5" in line and "not a prov4ml_dist shard" in line for line in lines), lines
    assert any("rank-00003.h5" in line for line in lines), lines
    assert any("rank-00004.h5" in line and "another-run" in line for line in lines), lines
    assert done.stdout.startswith("merged 2 shard(s)")
    for r in (0, 1):
        assert_same_points(merged_points(small_copy / "merged.h5", r), good[r])


def test_no_write_permission(small_copy):
    with unwritable(small_copy):
        done = cli("merge", small_copy)
    _one_line_error(done, 2, "permission denied")


def test_debug_shows_the_traceback(tmp_path):
    done = cli("--debug", "summary", tmp_path / "nope")
    assert done.returncode == 2 and "Traceback" in done.stderr
    assert "Traceback" in cli("summary", "--debug", tmp_path / "nope").stderr


def test_plot_without_matplotlib_says_what_to_install(small, tmp_path):
    blocker = tmp_path / "block"
    (blocker / "matplotlib").mkdir(parents=True)
    (blocker / "matplotlib" / "__init__.py").write_text("raise ImportError('no matplotlib here')\n")
    done = cli("plot", small, "-o", tmp_path / "plots", env=child_env(PYTHONPATH=str(blocker)))
    _one_line_error(done, 2, "pip install 'prov4ml-dist[plot]'")


def test_svg_without_graphviz_says_what_to_install(small, tmp_path):
    bare = tmp_path / "bin"
    bare.mkdir()
    done = cli("export", small, "--format", "svg", "-o", tmp_path / "x.svg", env=child_env(PATH=str(bare)))
    _one_line_error(done, 2, "Graphviz", "apt-get install graphviz")
    assert not (tmp_path / "x.svg").exists()


# -- merge -------------------------------------------------------------------------------
def test_merge_is_idempotent(small_copy):
    before = merged_content(small_copy / "merged.h5")
    for _ in range(2):
        done = cli("merge", small_copy)
        assert done.returncode == 0 and done.stderr == "", done.stderr
        assert merged_content(small_copy / "merged.h5") == before
    assert not [p for p in small_copy.iterdir() if p.name.startswith(".")]


def test_local_dirs_are_verified_and_never_overwrite(tmp_path):
    local = tmp_path / "local"
    run_dir = write_run(tmp_path / "prov", 3, local_dir=local, merge=False)
    assert not (run_dir / "shards").exists()
    # rank 1's artifact was changed on its node after it was recorded: it must not be imported
    note1 = local / "rank-1" / "fab" / RUN_ID / "artifacts" / "rank-00001" / "note.txt"
    note1.write_text("tampered\n")
    # the run directory already holds a different file where rank 2's note goes
    note2 = run_dir / "artifacts" / "rank-00002" / "note.txt"
    note2.parent.mkdir(parents=True)
    note2.write_text("someone else's\n")
    done = cli("merge", run_dir, "--local-dirs", *(local / f"rank-{r}" for r in range(3)))
    assert done.returncode == 1, done.stderr  # merged, but two files were left out
    assert "sha256" in done.stderr and "note.txt" in done.stderr
    assert "exists and differs" in done.stderr and note2.read_text() == "someone else's\n"
    assert not (run_dir / "artifacts" / "rank-00001" / "note.txt").exists()
    for r in range(3):
        assert_same_points(merged_points(run_dir / "merged.h5", r),
                           shard_points(local / f"rank-{r}" / "fab" / RUN_ID / "shards" / f"rank-0000{r}.h5"))
    again = cli("merge", run_dir, "--local-dirs", local)  # the nodes' folders under one directory
    assert again.returncode == 1 and "0 files copied" in again.stdout
    (tmp_path / "empty").mkdir()
    _one_line_error(cli("merge", run_dir, "--local-dirs", tmp_path / "empty"), 2, "holds no <experiment>/fab-1")


# -- progress ----------------------------------------------------------------------------
class _Clock:
    def __init__(self, *times: float) -> None:
        self.times = list(times)

    def __call__(self) -> float:
        return self.times.pop(0) if len(self.times) > 1 else self.times[0]


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_quiet_in_a_pipe_for_a_quick_merge():
    out = io.StringIO()
    progress = MergeProgress(out, clock=_Clock(0.0, 0.1, 0.2, 0.3))
    for stage in ("scan", "copy", "prov"):
        progress(stage, 0, 1)
    progress.finish()
    assert out.getvalue() == ""


def test_progress_writes_plain_lines_in_a_pipe_once_slow():
    out = io.StringIO()
    progress = MergeProgress(out, clock=_Clock(0.0, 0.5, 1.5, 1.6, 1.7, 9.0))
    progress("scan", 0, 4)  # 0.5 s: still quiet
    progress("copy", 1, 4)  # 1.5 s: a new stage, shown
    progress("copy", 2, 4)  # 1.6 s: same stage, too soon
    progress("copy", 3, 4)  # 1.7 s: too soon
    progress("copy", 4, 4)  # 9.0 s: shown again
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and len(lines) == 2
    assert lines[0].startswith("merging: copying points 1/4") and "4/4" in lines[1]


def test_progress_is_a_live_line_on_a_terminal():
    out = _Tty()
    progress = MergeProgress(out, clock=_Clock(0.0, 0.01, 0.02))
    progress("scan", 0, 2)
    progress("scan", 2, 2)
    progress.finish()
    text = out.getvalue()
    assert text.count("\r") >= 3 and "\n" not in text and "reading shards 2/2" in text
    assert text.endswith("\r")


# -- summary, plot, export, validate -----------------------------------------------------
def _section(lines: list[str], title: str) -> list[str]:
    start = next(i for i, line in enumerate(lines) if line.startswith(title))
    end = next((i for i in range(start, len(lines)) if not lines[i]), len(lines))
    return lines[start:end]


@pytest.fixture(scope="module")
def many(tmp_path_factory) -> Path:
    """12 ranks on 3 nodes with a GPU each; rank 5 ends far from the others."""
    return write_run(tmp_path_factory.mktemp("many"), 12, steps=200, outlier=5, gpu=True)


def test_summary_of_many_ranks_is_aggregated_and_fits_100_columns(many):
    done = cli("summary", many)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert max(len(line) for line in lines) <= 100
    text = done.stdout
    assert "Ranks        12 of world size 12: 12 complete" in text
    assert "Nodes        3: node0 (ranks 0-3), node1 (ranks 4-7), node2 (ranks 8-11)" in text
    assert "last:mean" in text and "rank 5 last" in text  # aggregated, with the outlier named
    assert len([line for line in _section(lines, "Metrics") if line.split()[:2] == ["loss", "TRAINING"]]) == 1
    energy = _section(lines, "Energy")
    assert energy[1].split() == ["scope", "name", "gpu_joules", "total_joules"]  # totals, not per GPU
    assert [row.split() for row in energy[2:]] == [
        ["rank", "(12)", "min", "3", "kJ", "-"], ["rank", "(12)", "mean", "3.006", "kJ", "-"],
        ["rank", "(12)", "max", "3.011", "kJ", "-"], ["node", "node0", "12.01", "kJ", "12.01", "kJ"],
        ["node", "node1", "12.02", "kJ", "12.02", "kJ"], ["node", "node2", "12.04", "kJ", "12.04", "kJ"],
        ["job", "job", "36.07", "kJ", "36.07", "kJ"]]
    assert _section(lines, "Artifacts")[2].split() == ["note.txt", "artifact", "12", "12", "86", "B", "0"]


def test_summary_per_rank_lists_each_rank(small):
    lines = render(load_merged(small / "merged.h5"), small, {})
    loss = [line.split() for line in _section(lines, "Metrics") if line.strip().startswith("loss")]
    assert [row[2] for row in loss] == ["0", "1"]
    assert any(line.startswith("Params (1)") for line in lines)


def test_summary_says_all_ranks_only_where_every_rank_logged_the_param(tmp_path):
    """A param only rank 0 logged (a yProv4ML script guarding log_param with `if rank == 0`)
    is shown with its ranks, not as agreed by all."""
    run_dir = write_run(tmp_path, 3, steps=2, params_of=lambda r: {"seed": 7} if r == 0 else {})
    params = dict((row.split()[0], row.split()[2:]) for row in _section(
        render(load_merged(run_dir / "merged.h5"), run_dir, {}), "Params")[2:] if row.strip())
    assert params == {"lr": ["all"], "seed": ["ranks", "0"]}


def test_plot_many_ranks_as_bands_with_gpu_and_energy(many, tmp_path):
    done = cli("plot", many, "-o", tmp_path)
    assert done.returncode == 0, done.stderr
    pngs = sorted(tmp_path.glob("*.png"))
    assert [p.name for p in pngs] == [
        "energy_per_rank.png", "metric_loss_TRAINING.png", "metric_val_acc_VALIDATION.png", "system_gpu_energy.png",
        "system_gpu_power.png", "system_gpu_utilization.png"]
    assert all(p.stat().st_size > 10_000 and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert done.stderr == "" and [Path(line) for line in done.stdout.splitlines()] == [
        tmp_path / name for name in ("metric_loss_TRAINING.png", "metric_val_acc_VALIDATION.png",
                                     "system_gpu_energy.png", "system_gpu_power.png", "system_gpu_utilization.png",
                                     "energy_per_rank.png")]


def test_plot_notes_what_a_run_lacks(small, tmp_path):
    done = cli("plot", small, "-o", tmp_path)
    assert done.returncode == 0, done.stderr
    assert "no GPU series" in done.stderr and "no energy series" in done.stderr
    assert {p.name for p in tmp_path.glob("*.png")} == {"metric_loss_TRAINING.png", "metric_val_acc_VALIDATION.png"}


def test_plot_of_values_at_the_float_limit_and_infinities(tmp_path):
    """A loss that reached ±1.7e308 and ±inf: a linear axis would span inf (matplotlib failed
    placing ticks); the plot uses a symmetric log scale and says so."""
    run = Run(RunConfig(experiment_name="huge", provenance_save_dir=tmp_path, sample_interval=None), Topology())
    for step, value in enumerate([1.0, np.inf, -np.inf, 1.7e308, -1.7e308, np.nan, 2.0]):
        run.log_metric("loss", value, prov4ml.Context.TRAINING, step=step)
        run.log_metric("acc", 0.5, prov4ml.Context.TRAINING, step=step)
    run.close()
    merge_run(run.run_dir, world_size=1)
    done = cli("plot", run.run_dir, "-o", tmp_path / "png")
    assert done.returncode == 0, done.stderr
    assert {p.name for p in (tmp_path / "png").glob("*.png")} == {"metric_loss_TRAINING.png", "metric_acc_TRAINING.png"}
    assert done.stderr.count("symmetric log scale") == 1, done.stderr


def test_export_csv_streams_every_point(small, tmp_path):
    merged = load_merged(small / "merged.h5")
    total = sum(s.count for s in merged.series if s.dataset == "/metrics/rows")
    done = cli("export", small, "--format", "csv", "-o", "-")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "rank,key,context,step,value,time" and len(lines) == total + 1
    assert lines[1].split(",")[:4] == ["0", "loss", "TRAINING", "0"]
    tsv = cli("export", small, "--format", "tsv", "-o", tmp_path / "m.tsv")
    assert tsv.returncode == 0 and (tmp_path / "m.tsv").read_text().splitlines()[1].count("\t") == 5


def test_validate_a_clean_in_process_run(small):
    done = cli("validate", small)
    assert done.returncode == 0 and done.stdout.startswith("valid:"), done.stdout


def test_merge_in_process_main_matches_the_online_merge(small_copy, capsys):
    online = merged_content(small_copy / "merged.h5")
    assert main(["merge", str(small_copy)]) == 0
    assert merged_content(small_copy / "merged.h5") == online
    assert capsys.readouterr().out.startswith("merged 2 shard(s) of 2 rank(s)")


def test_export_dot_and_provn_defaults_beside_prov_json(small_copy):
    for fmt, start in (("provn", "document"), ("dot", "digraph prov")):
        done = cli("export", small_copy, "--format", fmt)
        assert done.returncode == 0, done.stderr
        assert (small_copy / f"prov.{fmt}").read_text().startswith(start)
    assert not [p for p in os.listdir(small_copy) if is_temporary(p)]



def test_validate_catches_a_shard_changed_after_the_merge(small_copy):
    main(["merge", str(small_copy)])
    assert main(["validate", str(small_copy / "prov.json")]) == 0
    shard = sorted((small_copy / "shards").glob("rank-*.h5"))[-1]
    with h5py.File(shard, "r+") as f:  # still a readable shard of the run, but not the one merged
        f.attrs["created"] = 0.0
    done = cli("validate", small_copy / "prov.json")
    assert done.returncode == 1 and "does not match its recorded sha256" in done.stdout + done.stderr


def test_validate_refuses_a_copied_artifact_rewritten_to_an_absolute_path(small_copy):
    import json

    prov_json = small_copy / "prov.json"
    doc = json.loads(prov_json.read_text())
    entity = next(e for e in doc["entity"].values() if e.get("p4d:present") is True)
    entity["p4d:path"] = "/etc/hostname"
    prov_json.write_text(json.dumps(doc))
    done = cli("validate", prov_json)
    assert done.returncode == 1 and "its path is absolute" in done.stdout + done.stderr
