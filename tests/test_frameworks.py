"""Late and spawned ranks: a framework that starts the other processes, or initialises
torch.distributed, after the script's start_run still gives one run per job."""

from __future__ import annotations

import sys

import pytest

from .frameworks_support import SCRIPTS, assert_one_run, needs, run_job, torchrun

pytestmark = pytest.mark.slow


def test_start_run_before_init_process_group_under_torchrun_gives_one_run(tmp_path):
    """Logged before init_process_group, the point is kept; both ranks are one run."""
    run_job([*torchrun(2), str(SCRIPTS / "start_then_init.py"), str(tmp_path / "prov")], tmp_path)
    run_dir = assert_one_run(tmp_path / "prov", "late", 2, ("loss", "before_init"))
    assert run_dir.name.startswith("torchrun-")


def test_lightning_own_launcher_without_our_logger_gives_one_run_of_two_ranks(tmp_path):
    """`python train.py` with devices=2, strategy="ddp": Lightning starts rank 1 after rank 0's
    start_run; rank 1 joins rank 0's run (it inherits the run id), and rank 0 learns the world
    size at end_run. Old code: two runs, each "rank 0 of 1"."""
    needs("lightning")
    run_job([sys.executable, str(SCRIPTS / "lightning_train.py"), str(tmp_path / "prov"), "ddp", "2", "none"],
            tmp_path)
    assert_one_run(tmp_path / "prov", "lightning", 2, ("train_loss",))


def test_a_process_a_framework_started_on_one_node_knows_its_rank_from_local_rank():
    """Lightning's subprocess launcher exports NODE_RANK, LOCAL_RANK and WORLD_SIZE, not RANK."""
    from prov4ml_dist.topology import detect

    child = detect({"LOCAL_RANK": "1", "WORLD_SIZE": "2", "NODE_RANK": "0", "MASTER_PORT": "1234"})
    assert (child.rank, child.world_size, child.local_rank, child.launcher) == (1, 2, 1, "framework")
    # On another node the node's process count is unknown: no guess (settled at end_run).
    assert detect({"LOCAL_RANK": "1", "WORLD_SIZE": "4", "NODE_RANK": "1"}).launcher == "single"


def test_the_inherited_run_is_joined_by_a_framework_child_not_by_a_plain_subprocess(tmp_path, monkeypatch):
    """A script that runs another script with `subprocess` must not have it write into its run."""
    import prov4ml_dist as prov4ml

    monkeypatch.setenv("PROV4ML_DIST_RUN_ID", "parents-run")
    plain = prov4ml.start_run("e", provenance_save_dir=tmp_path, sample_interval=None)
    assert plain.name != "parents-run"
    prov4ml.api.get_active_run().close("test")
    monkeypatch.setenv("PROV4ML_DIST_RUN_ID", "parents-run")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    child = prov4ml.start_run("e", provenance_save_dir=tmp_path, sample_interval=None)
    assert child.name == "parents-run" and (child / "shards" / "rank-00001.h5").exists()
    import os

    assert os.environ["PROV4ML_DIST_RUN_ID"] == "parents-run"  # and passes it on to its own children


def test_a_rank_that_changes_after_start_run_is_a_clear_error_not_a_wrong_shard(tmp_path, monkeypatch):
    import prov4ml_dist as prov4ml
    from prov4ml_dist.errors import RunStateError

    prov4ml.start_run("e", provenance_save_dir=tmp_path, sample_interval=None)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RunStateError, match="rank 0 of 1, but is rank 1 of 2"):
        prov4ml.api.get_active_run().settle_topology()


def _revisions(run_dir) -> int:
    """Model-version lineage in prov.json: wasDerivedFrom typed prov:Revision."""
    import json

    derived = json.loads((run_dir / "prov.json").read_text()).get("wasDerivedFrom", {})
    return sum(1 for d in derived.values() if (d.get("prov:type") or {}).get("$") == "prov:Revision")


def _lightning_params(run_dir) -> dict:
    from prov4ml_dist.merge.load import load_merged

    return {p.key: p.value for p in load_merged(run_dir / "merged.h5").params if p.majority}


def test_provml_logger_with_csv_logger_records_every_rank_hparams_setup_and_checkpoints(tmp_path):
    """`logger=[ProvMLLogger(), CSVLogger(...)]` under Lightning's own launcher: every rank's
    self.log values (rank 1's marker is 1: its own values, not rank 0's), the module's
    hyperparameters, the Trainer's set-up, each ModelCheckpoint file a model version derived
    from the previous one; the CSVLogger still writes its file."""
    needs("lightning")
    run_job([sys.executable, str(SCRIPTS / "lightning_train.py"), str(tmp_path / "prov"), "ddp", "2", "csv+prov"],
            tmp_path)
    run_dir = assert_one_run(tmp_path / "prov", "lightning", 2, ("train_loss", "rank_marker"), model_versions=2)
    from prov4ml_dist.merge.load import load_merged

    markers = {s.rank: s.last for s in load_merged(run_dir / "merged.h5").series if s.key == "rank_marker"}
    assert markers == {0: 0.0, 1: 1.0}
    params = _lightning_params(run_dir)
    assert params["lr"] == 0.05 and params["hidden"] == 4 and params["script_param"] == 7
    assert params["trainer/strategy"] == "DDPStrategy" and params["trainer/devices"] == 2
    assert params["trainer/num_nodes"] == 1 and params["trainer/precision"] == "32-true"
    assert _revisions(run_dir) >= 1
    assert list((tmp_path / "prov" / "csv").rglob("metrics.csv"))


def test_provml_logger_under_torchrun(tmp_path):
    needs("lightning")
    run_job([*torchrun(2), str(SCRIPTS / "lightning_train.py"), str(tmp_path / "prov"), "ddp", "2", "prov"],
            tmp_path)
    run_dir = assert_one_run(tmp_path / "prov", "lightning", 2, ("train_loss", "rank_marker"), model_versions=2)
    assert run_dir.name.startswith("torchrun-")
    assert _lightning_params(run_dir)["trainer/strategy_launcher"] == "_SubprocessScriptLauncher"


def test_provml_logger_is_lazy_and_has_yprov4mls_module_path():
    """`import prov4ml_dist` imports no framework; the logger is found under both names."""
    import subprocess

    from .frameworks_support import framework_env

    code = ("import sys, prov4ml_dist; assert 'lightning' not in sys.modules and 'transformers' not in sys.modules; "
            "from prov4ml_dist.loggers.prov4ml_lightning_logger import ProvMLLogger as A; "
            "assert prov4ml_dist.ProvMLLogger is A; from lightning.pytorch.loggers import Logger; "
            "assert issubclass(A, Logger)")
    needs("lightning")
    proc = subprocess.run([sys.executable, "-c", code], env=framework_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("strategy", ["ddp_spawn", "ddp_fork"])
def test_lightning_ddp_spawn_hands_the_scripts_run_over_to_the_spawned_ranks(tmp_path, strategy):
    """ddp_spawn (ddp_fork): the script's process (start_run, a param and a point logged)
    spawns (forks) two ranks that do not run the script. One run of 2 ranks; the script's
    records are rank 0's (taken in from the handed-over shard, which is then gone); the
    script's end_run returns prov.json. Old code, ddp_fork: rank 0's shard clashed with the
    script's, still open (handed over now by the fork hook)."""
    needs("lightning")
    proc = run_job([sys.executable, str(SCRIPTS / "lightning_train.py"), str(tmp_path / "prov"), strategy, "2",
                    "prov"], tmp_path)
    run_dir = assert_one_run(tmp_path / "prov", "lightning", 2, ("train_loss", "rank_marker"), model_versions=2)
    from prov4ml_dist.merge.load import load_merged

    merged = load_merged(run_dir / "merged.h5")
    assert [(s.rank, s.last) for s in merged.series if s.key == "before_fit"] == [(0, 1.5)]
    assert [(p.value, p.ranks) for p in merged.params if p.key == "script_param"] == [(7, (0,))]
    assert _lightning_params(run_dir)["trainer/strategy_launcher"] == "_MultiProcessingLauncher"
    assert sorted(p.name for p in (run_dir / "shards").iterdir()) == ["rank-00000.h5", "rank-00001.h5"]
    assert f"END_RUN {run_dir / 'prov.json'}" in proc.stdout


def test_a_handed_over_shard_is_taken_in_by_the_new_process_of_its_rank(tmp_path, monkeypatch):
    """In one process, for speed: the launcher's shard leaves the merge's sight at once
    (not rank-*.h5), and the new rank 0 of the run replays its param and points, then deletes it."""
    import prov4ml_dist as prov4ml
    from prov4ml_dist import api
    from prov4ml_dist.shard import ShardReader

    run_dir = prov4ml.start_run("e", provenance_save_dir=tmp_path, sample_interval=None)
    prov4ml.log_param("p", 3)
    for step in range(5):
        prov4ml.log_metric("m", float(step), prov4ml.Context.TRAINING, step=step)
    handed = api.hand_over_to_spawned_ranks()
    assert handed is not None and handed.name.startswith("handover-")
    assert not list((run_dir / "shards").glob("rank-*.h5"))
    monkeypatch.setenv("LOCAL_RANK", "0")  # as a spawned rank 0 of 2 would be
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert prov4ml.start_run("e", provenance_save_dir=tmp_path, sample_interval=None) == run_dir
    assert not handed.exists()
    api.get_active_run().close("test")
    with ShardReader(run_dir / "shards" / "rank-00000.h5") as reader:
        assert [r["value"] for r in reader.records("param")] == [3]
        assert reader.read_table("metrics")["value"].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_lightning_nodes_launched_by_hand_without_slurm_give_one_run(tmp_path):
    """Multi-node without Slurm: two launcher processes (NODE_RANK 0 and 1, MASTER_ADDR/PORT set
    by the user, devices=1, num_nodes=2), each alone at its start_run. Once torch.distributed
    numbers them, node 1's process moves its records (its script's param and point) into rank
    0's run as rank 1: one run of 2 ranks with node ranks 0 and 1, no run directory left behind.
    Old code: a RunStateError ("started as rank 0 of 1, but is rank 1 of 2")."""
    import socket
    import subprocess

    from prov4ml_dist.merge.load import load_merged

    from .frameworks_support import framework_env

    needs("lightning")
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = str(free.getsockname()[1])
    nodes = [subprocess.Popen([sys.executable, str(SCRIPTS / "lightning_train.py"), str(tmp_path / "prov"), "ddp",
                               "1", "prov", "2"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env={**framework_env(), "NODE_RANK": str(node), "MASTER_ADDR": "127.0.0.1",
                                              "MASTER_PORT": port})
             for node in (0, 1)]
    outputs = [node.communicate(timeout=240)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(o[-4000:] for o in outputs)
    run_dir = assert_one_run(tmp_path / "prov", "lightning", 2, ("train_loss", "rank_marker", "before_fit"),
                             model_versions=2)
    merged = load_merged(run_dir / "merged.h5")
    assert {r.rank: r.node_rank for r in merged.ranks} == {0: 0, 1: 1}
    assert [(p.value, p.ranks) for p in merged.params if p.key == "script_param"] == [(7, (0, 1))]
    assert {s.rank: s.last for s in merged.series if s.key == "rank_marker"} == {0: 0.0, 1: 1.0}
    assert _lightning_params(run_dir)["trainer/num_nodes"] == 2
    assert f"END_RUN {run_dir / 'prov.json'}" in outputs[0]


def test_a_moved_run_takes_its_points_params_and_artifact_files_into_the_jobs_run(tmp_path):
    """In one process, for speed: move_run replays a run started alone into another run as rank
    1 — points, param, an artifact's file (into rank 1's artifacts directory) — and leaves no
    directory of the first run behind."""
    from dataclasses import replace

    import prov4ml_dist as prov4ml
    from prov4ml_dist import api
    from prov4ml_dist.handover import move_run
    from prov4ml_dist.shard import ShardReader

    alone = prov4ml.start_run("e", provenance_save_dir=tmp_path, sample_interval=None)
    prov4ml.log_param("p", 3)
    prov4ml.log_artifact("notes/config.txt", text="lr=0.1")
    for step in range(3):
        prov4ml.log_metric("m", float(step), prov4ml.Context.TRAINING, step=step)
    run = api.get_active_run()
    moved = move_run(run, "job-run", replace(run.topology, rank=1, world_size=2))
    api._active = None
    api._hooks.remove()
    api._hooks = None
    moved.close("test")
    assert not alone.exists() and moved.run_dir == tmp_path / "e" / "job-run"
    with ShardReader(moved.shard_path) as reader:
        assert reader.rank == 1 and [r["value"] for r in reader.records("param")] == [3]
        assert reader.read_table("metrics")["value"].tolist() == [0.0, 1.0, 2.0]
        (artifact,) = reader.records("artifact")
    assert artifact["path"].startswith("artifacts/rank-00001/")
    assert (moved.run_dir / artifact["path"]).read_text() == "lr=0.1"
