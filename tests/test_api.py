"""The public API on a single process: states, contexts, values, yProv4ML compatibility, bad input."""

from __future__ import annotations

import math
import os
from enum import Enum

import numpy as np
import pytest
import torch

import prov4ml_dist as prov4ml
from prov4ml_dist.errors import ArtifactError, InvalidInputError, ModelSaveError, RunStateError
from prov4ml_dist.shard import ShardReader


class MyNewContext(Enum):  # the seed's example
    PREPROCESSING = 3
    INFERENCE = 4


def _close_and_read():
    run = prov4ml.get_active_run()
    run.close()
    prov4ml.api._active = None
    return ShardReader(run.shard_path), run


def _points(reader) -> dict[tuple[str, str], list[tuple[int, float]]]:
    series = reader.series("metrics")
    out: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for row in reader.read_table("metrics"):
        s = series[int(row["series"])]
        out.setdefault((s["key"], s["context"]), []).append((int(row["step"]), float(row["value"])))
    return out


def test_start_run_layout_and_return_value(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_dir = prov4ml.start_run(experiment_name="mnist", provenance_save_dir=tmp_path / "prov", sample_interval=None)
    assert run_dir.parent == (tmp_path / "prov" / "mnist").absolute()
    assert (run_dir / "shards" / "rank-00000.h5").is_file()
    reader, _ = _close_and_read()
    with reader:
        start = reader.start_record()
    assert start["topology"]["rank"] == 0 and start["environment"]["python"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prov"]  # nothing else in the cwd


def test_metrics_with_all_context_kinds_and_value_types(run_dir):
    prov4ml.log_metric("loss", 1.5, prov4ml.Context.TRAINING, step=0)
    prov4ml.log_metric("loss", torch.tensor(0.5), prov4ml.Context.TRAINING, step=1)
    prov4ml.log_metric("loss", np.float32(0.25), prov4ml.Context.VALIDATION, step=1)
    prov4ml.log_metric("acc", 3, MyNewContext.INFERENCE)
    prov4ml.log_metric("acc", True, MyNewContext.INFERENCE)
    prov4ml.log_metric("acc", np.array([7.0]), "custom")
    prov4ml.log_metric("diverged", float("nan"), prov4ml.Context.TRAINING)
    prov4ml.log_metric("diverged", float("inf"), prov4ml.Context.TRAINING)
    prov4ml.log_metrics({"a": 1.0, "b": 2.0}, prov4ml.Context.TESTING, step=5)
    reader, _ = _close_and_read()
    with reader:
        points = _points(reader)
        sources = {s["key"]: s["source"] for s in reader.series("metrics").values()}
    assert points[("loss", "TRAINING")] == [(0, 1.5), (1, 0.5)]
    assert points[("loss", "VALIDATION")] == [(1, 0.25)]
    assert points[("acc", "INFERENCE")] == [(0, 3.0), (1, 1.0)]  # step None counts up per series
    assert points[("acc", "custom")] == [(0, 7.0)]
    assert math.isnan(points[("diverged", "TRAINING")][0][1]) and points[("diverged", "TRAINING")][1][1] == math.inf
    assert points[("a", "TESTING")] == [(5, 1.0)] and points[("b", "TESTING")] == [(5, 2.0)]
    assert sources["loss"] is None


def test_source_is_recorded(run_dir):
    prov4ml.log_metric("flops", 1e9, prov4ml.Context.TRAINING, source=prov4ml.LoggingItemKind.FLOPS_PER_BATCH)
    prov4ml.log_current_execution_time("elapsed", prov4ml.Context.TRAINING, step=0)
    reader, _ = _close_and_read()
    with reader:
        sources = {s["key"]: s["source"] for s in reader.series("metrics").values()}
    assert sources == {"flops": "FLOPS_PER_BATCH", "elapsed": "EXECUTION_TIME"}


@pytest.mark.parametrize("value", ["1.0", b"1", None, [1.0], torch.ones(3), np.zeros(2), 1 + 2j, object()])
def test_bad_metric_values_are_refused_and_nothing_is_lost(run_dir, value):
    prov4ml.log_metric("loss", 1.0, prov4ml.Context.TRAINING)
    with pytest.raises(InvalidInputError):
        prov4ml.log_metric("loss", value, prov4ml.Context.TRAINING)
    prov4ml.log_metric("loss", 2.0, prov4ml.Context.TRAINING)
    reader, _ = _close_and_read()
    with reader:
        assert [v for _, v in _points(reader)[("loss", "TRAINING")]] == [1.0, 2.0]


@pytest.mark.parametrize("key", ["", 5, None, "a\nb", "x" * 5000, ["list"]])
def test_bad_keys_are_refused(run_dir, key):
    with pytest.raises(InvalidInputError):
        prov4ml.log_metric(key, 1.0, prov4ml.Context.TRAINING)


@pytest.mark.parametrize("key", ["a/b/c", "λ-loss ✓", "x" * 1024, "../../etc/passwd"])
def test_odd_but_valid_keys_round_trip(run_dir, key):
    prov4ml.log_metric(key, 1.0, prov4ml.Context.TRAINING)
    reader, _ = _close_and_read()
    with reader:
        assert list(_points(reader)) == [(key, "TRAINING")]


@pytest.mark.parametrize("context", [3, 1.5, ("TRAINING",)])  # None: TRAINING (yProv4ML 3.x)
def test_bad_contexts_are_refused(run_dir, context):
    with pytest.raises(InvalidInputError):
        prov4ml.log_metric("loss", 1.0, context)


@pytest.mark.parametrize("step", [1.5, "3", 2**70])
def test_bad_steps_are_refused(run_dir, step):
    with pytest.raises(InvalidInputError):
        prov4ml.log_metric("loss", 1.0, prov4ml.Context.TRAINING, step=step)


def test_the_automatic_step_after_the_largest_step_is_refused(run_dir):
    """Nothing a call accepted may fail later in the flusher (it used to drop the whole batch)."""
    top = 2**63 - 1
    prov4ml.log_metric("loss", 1.0, prov4ml.Context.TRAINING, step=top)
    prov4ml.log_metric("acc", 2.0, prov4ml.Context.TRAINING)
    with pytest.raises(InvalidInputError, match="automatic step"):
        prov4ml.log_metric("loss", 3.0, prov4ml.Context.TRAINING)
    prov4ml.log_metric("loss", 4.0, prov4ml.Context.TRAINING, step=0)
    prov4ml.log_metric("loss", 5.0, prov4ml.Context.TRAINING)
    reader, _ = _close_and_read()
    with reader:
        points = _points(reader)
        assert reader.end_record()["lost_rows"] == {"metrics": 0, "system": 0}
    assert points[("loss", "TRAINING")] == [(top, 1.0), (0, 4.0), (1, 5.0)]
    assert points[("acc", "TRAINING")] == [(0, 2.0)]


def test_numpy_and_tensor_steps(run_dir):
    prov4ml.log_metric("loss", 1.0, prov4ml.Context.TRAINING, step=np.int64(4))
    prov4ml.log_metric("loss", 1.0, prov4ml.Context.TRAINING, step=torch.tensor(5))
    reader, _ = _close_and_read()
    with reader:
        assert [s for s, _ in _points(reader)[("loss", "TRAINING")]] == [4, 5]


def test_logging_outside_a_run(tmp_path):
    with pytest.raises(RunStateError, match="start_run"):
        prov4ml.log_metric("loss", 1.0, prov4ml.Context.TRAINING)
    with pytest.raises(RunStateError):
        prov4ml.log_param("lr", 1)
    # end_run() and a second start_run: tests/test_yprov4ml_compat.py (yProv4ML's behaviour)


def test_yprov4ml_start_run_keywords_are_accepted(tmp_path):
    prov4ml.start_run(prov_user_namespace="www.example.org", experiment_name="y", prov_save_path=tmp_path,
                      collect_all_processes=True, save_after_n_logs=100, rank=0, metrics_file_type="zarr",
                      csv_separator=";", use_compressor=None, disable_codecarbon=True, sample_interval=None)
    reader, run = _close_and_read()
    with reader:
        settings = reader.start_record()["settings"]
    assert run.run_dir.is_relative_to(tmp_path.absolute())
    assert settings["yprov4ml_options"]["save_after_n_logs"] == 100


def test_unknown_start_run_keyword_is_a_type_error(tmp_path):
    with pytest.raises(TypeError, match="save_after_n_log"):
        prov4ml.start_run(experiment_name="y", provenance_save_dir=tmp_path, save_after_n_log=1)


def test_params(run_dir):
    prov4ml.log_param("lr", 1e-3)
    prov4ml.log_params({"optimizer": "adam", "betas": (0.9, 0.99), "tensor": torch.tensor(2),
                        "ctx": prov4ml.Context.TRAINING, "obj": object})
    reader, _ = _close_and_read()
    with reader:
        params = {r["key"]: r["value"] for r in reader.records("param")}
    assert params["lr"] == 1e-3 and params["betas"] == [0.9, 0.99] and params["tensor"] == 2
    assert params["ctx"] == "TRAINING" and params["obj"] == repr(object)


def test_artifacts_are_copied_hashed_and_never_overwritten(run_dir, tmp_path):
    src = tmp_path / "conf.yaml"
    src.write_text("lr: 0.1\n")
    first = prov4ml.log_artifact("config.yaml", str(src), prov4ml.Context.TRAINING, step=1)
    src.write_text("lr: 0.2\n")
    second = prov4ml.log_artifact("config.yaml", src, prov4ml.Context.TRAINING, step=2)
    not_copied = prov4ml.log_artifact("raw", src, prov4ml.Context.TRAINING, log_copy_in_prov_directory=False)
    legacy = prov4ml.log_artifact(str(src), prov4ml.Context.VALIDATION)  # yProv4ML 2.x order
    value = prov4ml.log_artifact("summary.json", {"acc": 0.9}, prov4ml.Context.TESTING)
    assert first["path"] == "artifacts/rank-00000/config.yaml"
    assert second["path"] == "artifacts/rank-00000/config.1.yaml"
    assert (run_dir / first["path"]).read_text() == "lr: 0.1\n"
    assert (run_dir / second["path"]).read_text() == "lr: 0.2\n"
    assert first["sha256"] != second["sha256"] and first["size"] == 8
    assert not_copied["copied"] is False and not_copied["path"] == str(src.resolve())
    assert legacy["context"] == "VALIDATION" and legacy["path"] == "artifacts/rank-00000/conf.yaml"
    assert (run_dir / value["path"]).read_text() == '{"acc": 0.9}'


def test_directory_artifact(run_dir, tmp_path):
    d = tmp_path / "outputs"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("a")
    (d / "sub" / "b.txt").write_text("b")
    os.symlink("/etc/passwd", d / "link")
    record = prov4ml.log_artifact("outputs", d, prov4ml.Context.TRAINING)
    copied = run_dir / record["path"]
    assert (copied / "sub" / "b.txt").read_text() == "b"
    assert not (copied / "link").exists() and record["skipped"] == ["link"] and record["files"] == 2


@pytest.mark.parametrize("name", ["../../x", "/etc/x", "a/../../b", "", "a\x00b"])
def test_artifact_names_cannot_escape(run_dir, tmp_path, name):
    src = tmp_path / "f"
    src.write_text("x")
    with pytest.raises(ArtifactError):
        prov4ml.log_artifact(name, src, prov4ml.Context.TRAINING)
    assert not (tmp_path / "x").exists() and not (run_dir.parent / "b").exists()


def test_bad_artifact_sources(run_dir, tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        prov4ml.log_artifact("x", tmp_path / "missing", prov4ml.Context.TRAINING)
    os.symlink("/etc/passwd", tmp_path / "link")
    with pytest.raises(ArtifactError, match="symlink"):
        prov4ml.log_artifact("x", tmp_path / "link", prov4ml.Context.TRAINING)
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(ArtifactError, match="not a regular file"):
        prov4ml.log_artifact("x", tmp_path / "fifo", prov4ml.Context.TRAINING)
    with pytest.raises(ArtifactError, match="cannot store"):
        prov4ml.log_artifact("x", object(), prov4ml.Context.TRAINING)


def test_artifact_directory_symlinked_away_is_refused(run_dir, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, run_dir / "artifacts" / "rank-00000" / "evil")
    src = tmp_path / "f"
    src.write_text("x")
    with pytest.raises(ArtifactError, match="outside"):
        prov4ml.log_artifact("evil/f", src, prov4ml.Context.TRAINING)
    assert list(outside.iterdir()) == []


def test_artifacts_respect_the_umask(run_dir, tmp_path):
    src = tmp_path / "f"
    src.write_text("x")
    record = prov4ml.log_artifact("f", src, prov4ml.Context.TRAINING)
    assert not (run_dir / record["path"]).stat().st_mode & 0o002


def test_model_versions_and_log_model(run_dir):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
    v0 = prov4ml.save_model_version(model, "mlp", prov4ml.Context.TRAINING, step=0)
    with torch.no_grad():
        model[0].weight.add_(1)
    v1 = prov4ml.save_model_version("mlp", model, prov4ml.Context.TRAINING, step=1)  # 3.x order
    prov4ml.log_model("mlp", model, log_model_layers=True)  # 3.x order
    assert (v0["version"], v1["version"]) == (0, 1) and v0["sha256"] != v1["sha256"]
    assert v1["path"] == "artifacts/rank-00000/models/mlp/mlp_v0001.pt"
    state = torch.load(run_dir / v1["path"], weights_only=True)
    assert torch.equal(state["0.weight"], model[0].weight)
    reader, _ = _close_and_read()
    with reader:
        info = next(reader.records("model"))
        items = sorted(r["item"] for r in reader.records("artifact"))
    assert info["parameters"] == 4 * 3 + 3 + 3 + 1 and info["memory_bytes"] == 19 * 4
    assert items == ["model", "model_layers", "model_version", "model_version"]


def test_unsaveable_model_leaves_nothing(run_dir):
    class Holder:
        fn = None

    holder = Holder()
    holder.fn = lambda x: x
    with pytest.raises(ModelSaveError):
        prov4ml.save_model_version(holder, "weird", prov4ml.Context.TRAINING)
    models_dir = run_dir / "artifacts" / "rank-00000" / "models" / "weird"
    assert list(models_dir.iterdir()) == []
    prov4ml.log_metric("still", 1.0, prov4ml.Context.TRAINING)  # the run goes on


def test_datasets(run_dir):
    data = torch.utils.data.TensorDataset(torch.zeros(103, 2))
    sampler = torch.utils.data.DistributedSampler(data, num_replicas=4, rank=1, shuffle=True)
    prov4ml.log_dataset(torch.utils.data.DataLoader(data, batch_size=10, sampler=sampler, num_workers=0), "train")
    prov4ml.log_dataset("subset", torch.utils.data.Subset(data, range(10)))  # 3.x order
    prov4ml.log_dataset(data, "full")
    reader, _ = _close_and_read()
    with reader:
        stats = {r["label"]: r["stats"] for r in reader.records("dataset")}
    assert stats["train"]["total_samples"] == 103 and stats["train"]["rank_samples"] == 26
    assert stats["train"]["num_batches"] == 3 and stats["train"]["shuffle"] is True
    assert stats["train"]["num_replicas"] == 4 and stats["train"]["batch_size"] == 10
    assert stats["subset"]["total_samples"] == 10 and stats["subset"]["parent_samples"] == 103
    assert stats["full"]["total_samples"] == 103


def test_identical_weights_are_identical_bytes_whatever_the_process(run_dir, tmp_path):
    """Ranks saving the same weights must produce the same sha256 (content-addressed dedup)."""
    import subprocess
    import sys

    model = torch.nn.Linear(3, 2)
    torch.nn.init.constant_(model.weight, 0.5)
    torch.nn.init.zeros_(model.bias)
    here = prov4ml.save_model_version(model, "m", prov4ml.Context.TRAINING)
    code = ("import torch, sys; from pathlib import Path; from prov4ml_dist.models import save_model; "
            "m = torch.nn.Linear(3, 2); torch.nn.init.constant_(m.weight, 0.5); torch.nn.init.zeros_(m.bias); "
            "d = Path(sys.argv[1]) / 'm_v0000.pt'; save_model(m, d)")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True)
    from prov4ml_dist.artifacts import sha256_file

    assert sha256_file(tmp_path / "m_v0000.pt")[0] == here["sha256"]


def test_experiment_name_must_be_a_directory_name(tmp_path):
    with pytest.raises(InvalidInputError):
        prov4ml.start_run(experiment_name="../up", provenance_save_dir=tmp_path)
