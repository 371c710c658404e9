"""A new user's first hour: installing the package into one's own environment, reusing the
set-up venvs, and output that says what happened and what to do next."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import prov4ml_dist as prov4ml
from prov4ml_dist.cli.plot import SINGLE_SAMPLE
from prov4ml_dist.cli.summary import render
from prov4ml_dist.merge import load_merged, merge_run
from prov4ml_dist.models import model_info
from prov4ml_dist.run import Run, RunConfig
from prov4ml_dist.topology import Topology

from .conftest import REPO, child_env
from .test_cli_support import cli, write_run

MAKE_VENV = REPO / "scripts" / "make_venv.sh"
NVML_REASON = "NVML unavailable: NVMLError_LibraryNotFound: NVML Shared Library Not Found"
RAPL_REASON = "no RAPL zones under /sys/class/powercap and no amd_energy hwmon under /sys/class/hwmon"


# -- installing into one's own environment -----------------------------------------------
@pytest.mark.slow
def test_the_built_wheel_installs_into_a_clean_venv_and_works_without_torch(tmp_path):
    source = tmp_path / "src"  # a copy: building must not litter the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "prov4ml_dist", source / "prov4ml_dist", ignore=shutil.ignore_patterns("__pycache__"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", tmp_path / "dist", source],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr
    assert "deprecated" not in build.stdout + build.stderr  # setuptools' license banner, for one
    (wheel,) = (tmp_path / "dist").glob("prov4ml_dist-*.whl")

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", venv], check=True, timeout=120)
    install = subprocess.run([venv / "bin" / "python", "-m", "pip", "install", "-q", wheel],
                             capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr
    env = {k: v for k, v in child_env().items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}/usr/bin:/bin"
    assert subprocess.run(["python", "-c", "import torch"], env=env, capture_output=True).returncode != 0

    script = ("import prov4ml_dist as p\n"
              "p.start_run(experiment_name='own', provenance_save_dir='prov', sample_interval=None)\n"
              "p.log_param('lr', 0.1)\n"
              "[p.log_metric('loss', 1 / (s + 1), p.Context.TRAINING, step=s) for s in range(5)]\n"
              "print(p.end_run())\n")
    done = subprocess.run(["python", "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()).is_file()
    summary = subprocess.run(["prov4ml-dist", "summary", "prov/own"], env=env, cwd=tmp_path, capture_output=True,
                             text=True, timeout=120)
    assert summary.returncode == 0, summary.stderr
    assert "loss" in summary.stdout and "Params (1)" in summary.stdout
    validate = subprocess.run(["prov4ml-dist", "validate", "prov/own"], env=env, cwd=tmp_path, capture_output=True,
                              text=True, timeout=120)
    assert validate.returncode == 0, validate.stdout + validate.stderr  # vocabulary.ttl is in the wheel


# -- the set-up scripts reuse their venvs ------------------------------------------------
def _check(venv: Path, extras: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", MAKE_VENV, "--check", venv, extras], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


def test_make_venv_reuses_the_test_venv_and_says_why_it_would_rebuild(tmp_path):
    venv = Path(sys.prefix)
    if not (venv / ".prov4ml-stamp").is_file():
        if os.environ.get("CI"):
            pytest.fail(f"{venv} was not made by scripts/make_venv.sh, which scripts/test.sh uses")
        pytest.skip(f"{venv} was not made by scripts/make_venv.sh")
    assert _check(venv, "test").returncode == 0
    # the real call then reuses it (and must not touch the venv these tests run in)
    reused = subprocess.run(["bash", MAKE_VENV, venv, "test"], capture_output=True, text=True, timeout=120)
    assert reused.returncode == 0 and reused.stdout.startswith("venv reused: "), reused.stdout + reused.stderr
    assert (venv / ".prov4ml-stamp").is_file()

    for args, env, why in (((venv, "plot"), {}, "the extras"), ((venv, "test"), {"PROV4ML_REBUILD_VENV": "1"},
                                                                  "PROV4ML_REBUILD_VENV=1"),
                           ((tmp_path / "none", "test"), {}, "no venv at")):
        done = _check(*args, **env)
        assert done.returncode == 1 and done.stdout.startswith("would rebuild: ") and why in done.stdout, done.stdout


def test_a_venv_made_elsewhere_or_half_built_is_not_reused(tmp_path):
    venv = tmp_path / "v"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True, timeout=120)
    done = _check(venv, "test")
    assert done.returncode == 1 and "was not made by this script" in done.stdout
    (venv / ".prov4ml-stamp").write_text("0" * 64 + "\n")  # a build of other inputs
    done = _check(venv, "test")
    assert done.returncode == 1 and "changed since" in done.stdout, done.stdout


# -- output that says what happened ------------------------------------------------------
def _two_ranks_with_datasets(save_dir: Path) -> Path:
    """Two ranks, each logging its DistributedSampler's share of one dataset; no GPU, no RAPL."""
    dataset = torch.utils.data.TensorDataset(torch.zeros(100, 3))
    run_dir = None
    for rank in range(2):
        run = Run(RunConfig(experiment_name="data", provenance_save_dir=save_dir, run_id="d-1", sample_interval=None),
                  Topology(rank=rank, world_size=2, local_rank=rank, local_world_size=2, launcher="torchrun"))
        sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=2, rank=rank, shuffle=True)
        run.log_dataset(torch.utils.data.DataLoader(dataset, batch_size=8, sampler=sampler), "train")
        for name, reason in (("nvml", NVML_REASON), ("rapl", RAPL_REASON)):
            run.writer.record({"kind": "sensor", "time": run.started, "name": name, "scope": "node", "device": name,
                               "available": False, "reason": reason, "unavailable": {}})
        run.log_metric("loss", 0.5, prov4ml.Context.TRAINING, step=0)
        run.close()
        run_dir = run.run_dir
    merge_run(run_dir, world_size=2)
    return run_dir


def test_summary_shows_datasets_and_says_in_full_what_was_not_measured(tmp_path):
    run_dir = _two_ranks_with_datasets(tmp_path / "prov")
    lines = render(load_merged(run_dir / "merged.h5"), run_dir, {})
    i = lines.index("Datasets (1)")
    assert lines[i + 2].split() == ["train", "TensorDataset", "100", "0-1", "50", "8", "7"]
    text = "\n".join(lines)
    assert "GPUs         none recorded (no NVIDIA GPU)" in text
    assert "Energy       none measured (no NVIDIA GPU, no RAPL)" in text
    assert "…" not in text and all(len(line) <= 100 for line in lines)
    assert NVML_REASON in text and " ".join(RAPL_REASON.split()) in " ".join(text.split())


def test_an_experiment_or_save_directory_stands_for_its_one_run_and_lists_several(tmp_path):
    save = tmp_path / "prov"
    first = write_run(save, 1, run_id="r-1", merge=False)
    experiment = first.parent
    for command in (("merge",), ("summary",), ("validate",), ("export", "--format", "csv", "-o", "-")):
        done = cli(*command, experiment)
        assert done.returncode == 0, (command, done.stderr)
        assert done.stderr.startswith(f"note: {experiment} holds one run: {first}"), done.stderr
    second = write_run(save, 1, run_id="r-2")
    os.utime(first / "shards", (1, 1))  # r-1 began long ago: r-2 is the newer
    for command in ("summary", "validate", "plot", "merge"):
        done = cli(command, save)
        assert done.returncode == 2, done.stdout
        assert done.stderr.count("\n") == 1 and "holds 2 runs (listed above, newest first)" in done.stderr
        rows = [line.split() for line in done.stdout.splitlines()[1:]]
        assert [row[-1] for row in rows] == [str(second), str(first)]
        assert [row[3:6] for row in rows] == [["merged,", "1", "shard(s)"]] * 2


def test_a_wrapped_model_is_recorded_as_the_model_inside(tmp_path):
    import torch.distributed as dist

    model = torch.nn.Sequential(torch.nn.Linear(4, 2))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        info = model_info(ddp)
    finally:
        dist.destroy_process_group()
    assert info["class"] == "torch.nn.modules.container.Sequential"
    assert info["wrappers"] == ["torch.nn.parallel.distributed.DistributedDataParallel"]
    assert info["parameters"] == 10
    compiled = model_info(torch.compile(model))  # wraps without compiling until called
    assert compiled["class"] == "torch.nn.modules.container.Sequential"
    assert compiled["wrappers"] == ["torch._dynamo.eval_frame.OptimizedModule"]
    assert "wrappers" not in model_info(model)


def test_plot_of_a_run_shorter_than_one_sample_interval_says_so(tmp_path):
    run = Run(RunConfig(experiment_name="short", provenance_save_dir=tmp_path / "prov", run_id="s-1",
                        sample_interval=60.0), Topology())
    run.log_metric("loss", 1.0, prov4ml.Context.TRAINING, step=0)
    run.close()
    merge_run(run.run_dir, world_size=1)
    pytest.importorskip("matplotlib")
    done = cli("plot", run.run_dir, "-o", tmp_path / "png")
    assert done.returncode == 0, done.stderr
    assert f"note: {SINGLE_SAMPLE}" in done.stderr
    assert done.stderr.count(SINGLE_SAMPLE) == 1  # once, not once per figure


# -- a rank that does not reach end_run says what was kept and how to finish -----------------
CRASHING = """
import os, signal, sys
import prov4ml_dist as p
how, local = sys.argv[1], sys.argv[2] or None
p.start_run(experiment_name="crash", provenance_save_dir="prov", run_id="c-1", local_dir=local, sample_interval=None)
for s in range(50):
    p.log_metric("loss", 1.0 / (s + 1), p.Context.TRAINING, step=s)
if how == "raise":
    raise RuntimeError("the loss went NaN")
os.kill(os.getpid(), signal.SIGTERM)
"""


@pytest.mark.parametrize("how, local", [("raise", False), ("sigterm", False), ("raise", True)])
def test_a_rank_that_dies_says_in_one_line_what_was_kept_and_the_command_that_finishes(tmp_path, how, local):
    local_dir = tmp_path / "node-local" if local else ""
    done = subprocess.run([sys.executable, "-c", CRASHING, how, str(local_dir)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env=child_env())
    assert done.returncode == (1 if how == "raise" else -15), done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("prov4ml_dist:")]
    assert len(lines) == 1, done.stderr  # once, in one line
    line = lines[0]
    run_dir = (tmp_path / "prov" / "crash" / "c-1").absolute()
    assert line.startswith("prov4ml_dist: rank 0 " + ("exited" if how == "raise" else "got SIGTERM")), line
    assert "keeps 50 points up to " in line and "shards/rank-00000.h5" in line
    command = line.split("complete the run with: ", 1)[1].split()
    assert command[:3] == ["prov4ml-dist", "merge", str(run_dir)]
    if local:
        assert command[3:] == ["--local-dirs", str(local_dir.absolute() / "crash" / "c-1")]
    merged = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120, env=child_env())
    assert merged.returncode == 0, merged.stderr  # the command works as printed
    run = load_merged(run_dir / "merged.h5")
    assert sum(s.count for s in run.series if s.key == "loss") == 50


def test_a_second_end_run_returns_what_the_first_returned_with_a_warning(tmp_path, caplog):
    prov4ml.start_run(experiment_name="twice", provenance_save_dir=tmp_path / "prov", sample_interval=None)
    prov4ml.log_metric("loss", 1.0, prov4ml.Context.TRAINING, step=0)
    first = prov4ml.end_run()
    assert first is not None and first.is_file()
    with caplog.at_level("WARNING"):
        assert prov4ml.end_run() == first
    assert "has already ended" in caplog.text and str(first.parent) in caplog.text


def test_text_goes_in_text_and_a_string_value_is_always_a_path(run_dir):
    record = prov4ml.log_artifact("notes.txt", text="loss went NaN at step 7\n", context=prov4ml.Context.TRAINING)
    stored = run_dir / record["path"]
    assert stored.read_text(encoding="utf-8") == "loss went NaN at step 7\n"
    assert record["size"] == len(b"loss went NaN at step 7\n") and record["name"] == "notes.txt"
    with pytest.raises(prov4ml.ArtifactError, match="a str value is a path: to store text as the artifact, pass text="):
        prov4ml.log_artifact("notes2.txt", "loss went NaN at step 7", prov4ml.Context.TRAINING)
    with pytest.raises(prov4ml.InvalidInputError, match="either as value or as text="):
        prov4ml.log_artifact("n.txt", b"x", text="y")
    with pytest.raises(prov4ml.InvalidInputError, match="takes a str"):
        prov4ml.log_artifact("n.txt", text=b"bytes")
    assert not (run_dir / "artifacts" / "rank-00000" / "notes2.txt").exists()
