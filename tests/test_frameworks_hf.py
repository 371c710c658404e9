"""Hugging Face: the Trainer with ProvMLCallback and an Accelerate loop with ProvMLTracker, as
2 CPU processes under torchrun and `accelerate launch`; a tiny GPT-2 built from a config."""

from __future__ import annotations

import sys

import pytest

from prov4ml_dist.merge.load import load_merged

from .frameworks_support import SCRIPTS, assert_one_run, needs, run_job, torchrun

pytestmark = pytest.mark.slow


def accelerate_launch() -> list[str]:
    """`accelerate launch` with 2 processes on CPU (its torchrun-based launcher)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


def _check_trainer_run(save_dir) -> None:
    """TrainingArguments as params, every rank's logs and eval metrics, checkpoints as versions."""
    run_dir = assert_one_run(save_dir, "hf", 2, ("loss", "learning_rate", "eval_loss"), model_versions=2)
    merged = load_merged(run_dir / "merged.h5")
    params = {p.key: p.value for p in merged.params if p.majority}
    assert params["args/max_steps"] == 4 and params["args/per_device_train_batch_size"] == 2
    assert params["trainer/model_class"] == "GPT2LMHeadModel"
    assert {s.context for s in merged.series if s.key == "eval_loss"} == {"EVALUATION"}
    versions = [g for a in merged.artifacts for g in a.generations if g.item == "model_version"]
    assert {g.rank for g in versions} == {0}  # the process that saved them


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_hf_trainer_callback_gives_one_run_with_every_ranks_logs_and_checkpoints(tmp_path, launcher):
    needs("transformers")
    needs("accelerate")
    start = torchrun(2) if launcher == "torchrun" else accelerate_launch()
    run_job([*start, str(SCRIPTS / "hf_train.py"), str(tmp_path / "prov"), "trainer"], tmp_path)
    _check_trainer_run(tmp_path / "prov")


def test_accelerate_tracker_records_init_config_and_logs(tmp_path):
    """init_trackers' config as params and accelerator.log points (Accelerate calls trackers on
    the main process only); the tracker's own log records on every rank."""
    needs("accelerate")
    needs("transformers")
    run_job([*accelerate_launch(), str(SCRIPTS / "hf_train.py"), str(tmp_path / "prov"), "accelerate"], tmp_path)
    run_dir = assert_one_run(tmp_path / "prov", "hf", 2, ("rank_loss",))
    merged = load_merged(run_dir / "merged.h5")
    assert {p.key: p.value for p in merged.params if p.majority} == {"config/lr": 0.001, "config/batch": 2}
    assert {s.rank for s in merged.series if s.key == "loss"} == {0}


@pytest.mark.parametrize("mode", ["notebook", "both"])
def test_notebook_launcher_gives_one_run_of_the_forked_ranks_with_the_notebooks_records(tmp_path, mode):
    """notebook_launcher(fn, num_processes=2) on CPU after the notebook's start_run: the ranks
    are forked from the notebook's process, which is their launcher, not a rank. One run of 2
    ranks; the notebook's param and point are rank 0's (handed over); its end_run returns
    prov.json. "notebook": fn only logs (the ranks join at their first call and end at exit);
    "both": fn calls start_run/end_run too. Old code: one run of the notebook alone, the ranks'
    calls refused ("notebook"), or two runs ("both")."""
    needs("accelerate")
    proc = run_job([sys.executable, str(SCRIPTS / "notebook_launch.py"), str(tmp_path / "prov"), mode], tmp_path)
    run_dir = assert_one_run(tmp_path / "prov", "notebook", 2, ("loss", "rank_marker"))
    merged = load_merged(run_dir / "merged.h5")
    assert {s.rank: s.last for s in merged.series if s.key == "rank_marker"} == {0: 0.0, 1: 1.0}
    assert [(s.rank, s.last) for s in merged.series if s.key == "before_launch"] == [(0, 1.5)]
    assert [(p.value, p.ranks) for p in merged.params if p.key == "notebook_param"] == [(7, (0,))]
    assert sorted(p.name for p in (run_dir / "shards").iterdir()) == ["rank-00000.h5", "rank-00001.h5"]
    assert f"END_RUN {run_dir / 'prov.json'}" in proc.stdout
