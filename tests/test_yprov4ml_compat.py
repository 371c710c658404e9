"""A yProv4ML 3.x-style script runs unchanged after `import prov4ml_dist as prov4ml`."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from enum import Enum
from pathlib import Path

import h5py
import pytest
import torch

import prov4ml_dist as prov4ml
from prov4ml_dist import api
from prov4ml_dist.merge import load_merged
from prov4ml_dist.provenance.export import load_document
from prov4ml_dist.run import as_param_value
from prov4ml_dist.shard.reader import ShardReader

from .conftest import REPO, child_env


def test_a_yprov4ml_3_script_runs_unchanged(tmp_path):
    prov4ml.start_run(experiment_name="y3", prov_user_namespace="www.example.org", provenance_save_dir=tmp_path,
                      save_after_n_logs=100, collect_all_processes=True, rank=0, metrics_file_type="csv",
                      csv_separator=",", use_compressor=False, use_run_id=7, sample_interval=None)
    prov4ml.log_context("pretraining", is_subcontext_of="training")
    prov4ml.log_param("lr", 0.01, context="training")
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    batch = torch.zeros(16, 8)
    prov4ml.log_flops_per_batch("flops", model, batch, context="training", step=0)
    for step in range(3):
        prov4ml.log_metric("loss", 1.0 / (step + 1), "training", step=step, timestamp=123)
        prov4ml.log_system_metrics("training", step=step)
        prov4ml.save_model_version("net", model, "training", None, step)  # 3.x: (..., context, source, step)
    data = tmp_path / "data.csv"
    data.write_text("x,y\n1,2\n")
    prov4ml.log_artifact("data.csv", str(data), "training", is_input=True, log_copy_subdirectory="inputs")
    prov4ml.log_model("net", model, context="training", log_model_layers=True, log_copy_in_prov_directory=True)
    prov4ml.log_dataset("train", torch.utils.data.TensorDataset(batch), context="training", log_dataset_info=True)
    prov4ml.log_source_code(__file__)
    prov4ml.log_execution_command("python train.py", "--epochs 3")
    prov4ml.log_current_execution_time("elapsed", "training", step=0)
    prov_json = prov4ml.end_run(create_graph=True, create_svg=False, crate_ro_crate=False)

    assert prov_json.parent.name == "7" and (prov_json.parent / "prov.dot").is_file()
    doc = json.loads(prov_json.read_text())
    labels = {e.get("prov:label") for e in doc["entity"].values()}
    assert {"inputs/data.csv", "net_v0002.pt", "data.csv"} & labels
    used = [u["prov:entity"] for u in doc.get("used", {}).values()]
    assert any("ArtifactFile" in json.dumps(doc["entity"][e]) for e in used)  # the input file is used, not generated
    load_document(prov_json)  # parses with prov
    flops = next(e for e in doc["entity"].values() if e.get("p4d:key") == "flops" and "p4d:rank" in e)
    assert float(flops["p4d:last"]["$"]) == 2 * 16 * (8 * 4 + 4 * 2)  # two matmuls, 2 flops per MAC


# -- the 3.x surface, name by name -------------------------------------------------------
# Every public name of yProv4ML 3.x's top level that its examples and docs use.
YPROV4ML_3X_NAMES = [
    "start_run", "end_run", "log_metric", "log_metrics", "log_param", "log_params", "log_artifact", "log_model",
    "save_model_version", "log_dataset", "log_context", "create_context", "log_source_code",
    "log_execution_command", "log_current_execution_time", "log_system_metrics", "log_carbon_metrics",
    "log_flops_per_batch", "log_flops_per_epoch", "log_provenance_documents", "get_run_dir", "get_artifacts_dir",
    "Context", "Contexts", "LoggingItemKind", "MetricsType", "CompressorType", "FoldOperation",
    "ProvenanceTrackedFunction", "ProvenanceTrackedModel", "WeightDistributionTrackedModel", "IndexedDatasetWrapper",
    "ProvMLItwinAILogger",
]


def _merged_records(run_dir: Path, kind: str) -> list[dict]:
    with h5py.File(run_dir / "merged.h5", "r") as f:
        rows = f["records"][()]
    return [json.loads(r["json"]) for r in rows if r["kind"].decode() == kind]


def _start(tmp_path, name="y"):
    return prov4ml.start_run(name, provenance_save_dir=tmp_path, sample_interval=None)


@pytest.mark.parametrize("name", YPROV4ML_3X_NAMES)
def test_every_3x_name_exists_and_is_exported(name):
    assert getattr(prov4ml, name) is not None
    assert name in prov4ml.__all__
    namespace: dict = {}
    exec("from prov4ml_dist import *", namespace)  # as `from yprov4ml import *`
    assert namespace[name] is getattr(prov4ml, name)


def test_submodule_paths_of_the_examples_import():
    from prov4ml_dist.utils import getters
    from prov4ml_dist.wrappers.indexed_dataset import IndexedDatasetWrapper
    from prov4ml_dist.wrappers.tracked_function import ProvenanceTrackedFunction
    from prov4ml_dist.wrappers.tracked_layers import WeightDistributionTrackedModel
    from prov4ml_dist.wrappers.tracked_model import ProvenanceTrackedModel

    assert IndexedDatasetWrapper is prov4ml.IndexedDatasetWrapper and callable(getters.get_metric)
    assert {ProvenanceTrackedFunction, ProvenanceTrackedModel, WeightDistributionTrackedModel} <= {
        prov4ml.ProvenanceTrackedFunction, prov4ml.ProvenanceTrackedModel, prov4ml.WeightDistributionTrackedModel}


def test_the_wrappers_load_torch_only_when_first_used():
    code = ("import sys, prov4ml_dist; print('torch' in sys.modules); prov4ml_dist.ProvenanceTrackedModel; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], env=child_env(PYTHONPATH=str(REPO)), capture_output=True,
                         text=True, timeout=120, check=True).stdout
    assert out.split() == ["False", "True"]


def test_3x_contexts_and_contexts_made_at_run_time(tmp_path):
    assert prov4ml.Contexts is prov4ml.Context
    assert {"MODELS", "EVALUATION", "DATASETS", "TRAINING", "VALIDATION"} <= set(prov4ml.Context.__members__)
    _start(tmp_path)
    made = prov4ml.create_context("FINETUNING", is_subcontext_of=prov4ml.Context.TRAINING)
    prov4ml.log_context("DISTILLING", prov4ml.Context.TRAINING)
    assert prov4ml.Context.FINETUNING is made and prov4ml.Context["FINETUNING"] is made
    assert isinstance(prov4ml.Context.DISTILLING, Enum)
    with pytest.raises(AttributeError, match="create_context"):
        _ = prov4ml.Context.NEVER_DECLARED
    prov4ml.log_metric("loss", 1.0, prov4ml.Context.FINETUNING)
    prov4ml.log_metric("loss", 2.0, prov4ml.Context.DISTILLING)
    prov4ml.log_metric("loss", 3.0, prov4ml.Contexts.EVALUATION)
    prov4ml.log_metric("loss", 4.0)  # context optional in 3.x: TRAINING
    run_dir = prov4ml.end_run().parent
    contexts = {s.context for s in load_merged(run_dir / "merged.h5").series if s.key == "loss"}
    assert contexts == {"FINETUNING", "DISTILLING", "EVALUATION", "TRAINING"}
    declared = {r["context"]: r.get("parent") for r in _merged_records(run_dir, "context")}
    assert declared == {"FINETUNING": "TRAINING", "DISTILLING": "TRAINING"}


def test_start_run_takes_the_experiment_first_and_3x_positional_options(tmp_path):
    from prov4ml_dist import CompressorType, MetricsType

    run_dir = prov4ml.start_run("mnist", "www.example.org", tmp_path, True, 100, 0, True, MetricsType.NETCDF, ",",
                                CompressorType.LZ4, sample_interval=None)
    run = prov4ml.get_active_run()
    assert run.config.experiment_name == "mnist" and run.config.user_namespace == "www.example.org"
    assert run.config.yprov4ml_options["save_after_n_logs"] == 100
    assert run_dir.parent == (tmp_path / "mnist").absolute()
    prov4ml.end_run()
    prov4ml.start_run("mnist", prov_user_namespace="x", provenance_save_dir=tmp_path, sample_interval=None)
    assert prov4ml.get_active_run().config.user_namespace == "x"
    prov4ml.end_run()
    prov4ml.start_run("http://example.org/ns#", "old_style", tmp_path, sample_interval=None)  # 2.x: namespace first
    assert prov4ml.get_active_run().config.experiment_name == "old_style"
    prov4ml.end_run()
    with pytest.raises(TypeError, match="multiple values"):
        prov4ml.start_run("e", None, tmp_path, True, 1, 0, rank=0)


def test_3x_positional_orders_of_log_artifact_and_log_model(tmp_path):
    _start(tmp_path)
    src = tmp_path / "tmp.png"
    src.write_bytes(b"png")
    model = torch.nn.Linear(2, 2)
    prov4ml.log_artifact("tmp", str(src), "Training", "src", 3)
    prov4ml.log_artifact("nocontext.png", str(src))  # context optional in 3.x
    prov4ml.log_model("m", model, "Training", "src", True, True, True, False)
    prov4ml.log_model("mnist_model_final", model)
    with pytest.raises(TypeError, match="positional"):
        prov4ml.log_model("m2", model, "Training", "src", True, True, True, False, "one too many")
    run_dir = prov4ml.end_run().parent
    artifacts = {r["name"]: r for r in _merged_records(run_dir, "artifact")}
    assert artifacts["tmp"]["step"] == 3 and artifacts["tmp"]["context"] == "Training"
    assert artifacts["nocontext.png"]["context"] is None
    assert {"m_final.pt", "layers.json", "mnist_model_final.pt"} <= set(artifacts)
    models = run_dir / "artifacts" / "rank-00000" / "models"
    assert sorted(p.name for p in (models / "mnist_model_final").iterdir()) == ["mnist_model_final.pt"]


def test_other_attrs_are_recorded(tmp_path):
    _start(tmp_path)
    src = tmp_path / "a.txt"
    src.write_text("a")
    model = torch.nn.Linear(2, 1)
    prov4ml.log_artifact("a.txt", str(src), "Training", other_attrs={"origin": "sensor-7"})
    prov4ml.log_model("net", model, other_attrs={"arch": "linear"})
    prov4ml.save_model_version("net", model, "Training", None, 1, other_attrs={"epoch_note": "warmup"})
    prov4ml.log_dataset("train", torch.utils.data.TensorDataset(torch.zeros(4, 2)), other_attrs={"license": "CC0"})
    with pytest.raises(prov4ml.InvalidInputError, match="other_attrs"):
        prov4ml.log_dataset("bad", [1], other_attrs=["not", "a", "dict"])
    run_dir = prov4ml.end_run().parent
    artifacts = {r["name"]: r.get("other_attrs") for r in _merged_records(run_dir, "artifact")}
    assert artifacts["a.txt"] == {"origin": "sensor-7"} and artifacts["net_v0000.pt"] == {"epoch_note": "warmup"}
    assert _merged_records(run_dir, "model")[0]["other_attrs"] == {"arch": "linear"}
    assert _merged_records(run_dir, "dataset")[0]["other_attrs"] == {"license": "CC0"}


def test_params_whose_repr_has_an_address_are_described_alike_on_every_rank():
    data = torch.utils.data.TensorDataset(torch.zeros(10, 2))
    described = []
    for rank in (0, 1):
        sampler = torch.utils.data.DistributedSampler(data, num_replicas=2, rank=rank, shuffle=False)
        loader = torch.utils.data.DataLoader(data, batch_size=2, sampler=sampler)
        assert " at 0x" in repr(loader)
        described.append(as_param_value(loader))
    assert described[0] == described[1]
    assert described[0]["batch_size"] == 2 and described[0]["total_samples"] == 10
    assert "0x" not in json.dumps(described[0])
    assert as_param_value(lambda x: x)["name"] == "test_params_whose_repr_has_an_address_are_described_alike_on_" \
                                                 "every_rank.<locals>.<lambda>"


def test_a_later_start_run_closes_a_stale_run_and_end_run_without_a_run_returns(tmp_path, caplog, monkeypatch):
    _start(tmp_path, "first")
    stale = prov4ml.get_active_run()
    try:
        prov4ml.log_metric("loss", 1.0)
        raise RuntimeError("training failed")
    except RuntimeError:
        pass  # a notebook cell or dask task: end_run never came
    with pytest.raises(TypeError):
        prov4ml.start_run("second", provenance_save_dir=tmp_path, save_after_n_log=1)  # a typo
    assert not stale.closed  # a refused call changes nothing
    with caplog.at_level(logging.WARNING):
        _start(tmp_path, "second")
    assert "abandoned" in caplog.text and stale.closed
    with ShardReader(stale.shard_path) as reader:
        assert reader.end_record()["status"] == "abandoned"
    ended = prov4ml.end_run()
    assert ended is not None
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert prov4ml.end_run() == ended  # a second end_run: the first one's result
    assert "has already ended" in caplog.text
    monkeypatch.setattr(api, "_ended", None)  # a process that never started a run
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert prov4ml.end_run() is None
    assert "no active run" in caplog.text


def test_log_source_code_with_git_and_run_directories(tmp_path):
    _start(tmp_path)
    prov4ml.log_source_code(__file__, use_git=True)
    assert prov4ml.get_run_dir() == prov4ml.get_active_run().run_dir
    assert prov4ml.get_artifacts_dir() == prov4ml.get_run_dir() / "artifacts" / "rank-00000"
    prov_json = prov4ml.log_provenance_documents(create_graph=False)
    params = {p.key: p.value for p in load_merged(prov_json.parent / "merged.h5").params}
    assert len(params["source_code_git"]["commit"]) == 40
    assert (prov_json.parent / "artifacts" / "rank-00000" / "source" / Path(__file__).name).is_file()


# -- wrappers ----------------------------------------------------------------------------
def _series_values(run_dir: Path, key: str) -> list[float]:
    from prov4ml_dist.utils import getters

    return getters.get_metric(run_dir, name=key)["value"].tolist()


def test_tracked_function_logs_each_scalar_result(tmp_path):
    loss_fn = prov4ml.ProvenanceTrackedFunction(torch.nn.MSELoss(), context="Training")
    pairs = [(torch.zeros(3), torch.full((3,), float(i))) for i in range(4)]
    assert loss_fn(*pairs[0]).item() == 0.0  # outside a run it only computes
    _start(tmp_path)
    results = [loss_fn(a, b).item() for a, b in pairs]
    prov4ml.ProvenanceTrackedFunction(lambda: (1, 2), name="pair")()  # not a scalar: not logged
    run_dir = prov4ml.end_run().parent
    assert _series_values(run_dir, "MSELoss") == results == [0.0, 1.0, 4.0, 9.0]
    assert loss_fn.reduction == "mean"  # attributes reach the function
    assert "pair" not in {s.key for s in load_merged(run_dir / "merged.h5").series}


def test_weight_distribution_model_logs_per_epoch_statistics_per_layer(tmp_path):
    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.ReLU(), torch.nn.Linear(2, 1))
    tracked = prov4ml.WeightDistributionTrackedModel("net", net)
    _start(tmp_path)
    for epoch in range(2):
        with torch.no_grad():
            net[0].weight.fill_(float(epoch))
        tracked.log_epoch(epoch)
    assert torch.equal(tracked(torch.ones(1, 3)), net(torch.ones(1, 3)))
    assert set(tracked.state_dict()) == set(net.state_dict())  # a checkpoint loads into the bare model
    prov4ml.log_model("net", tracked)
    run_dir = prov4ml.end_run().parent
    merged = load_merged(run_dir / "merged.h5")
    keys = {s.key for s in merged.series if s.context == "MODELS"}
    assert keys == {f"net/{p}/{stat}" for p in ("0.weight", "0.bias", "2.weight", "2.bias")
                    for stat in ("mean", "std", "min", "max", "norm")}
    assert _series_values(run_dir, "net/0.weight/mean") == [0.0, 1.0]
    assert merged.models[0].fields["class"].endswith("Sequential")  # the model inside is what is recorded


def test_tracked_model_writes_layer_io_to_hdf5_within_its_budget(tmp_path):
    net = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    budget = 2 * (16 * 8 + 16 * 4) * 3 + 10  # three batches of 16 through the first layer, in float16
    tracked = prov4ml.ProvenanceTrackedModel("mlp", net, context="Training", max_bytes=budget)
    _start(tmp_path)
    batches = [torch.randn(16, 8) for _ in range(6)]
    for x in batches:
        tracked(x)
    run_dir = prov4ml.end_run().parent
    record = next(r for r in _merged_records(run_dir, "artifact") if r["name"] == "mlp.h5")
    assert record["tracked_layers"]["budget_reached"] and record["tracked_layers"]["bytes"] <= budget
    with h5py.File(run_dir / record["path"], "r") as f:
        first_in = f["0/input"][()]
        assert first_in.dtype == "float16" and first_in.shape[1] == 8
        assert 16 <= first_in.shape[0] <= 48 and f["0/output"].shape == (first_in.shape[0], 4)
        assert torch.allclose(torch.from_numpy(first_in[:16]).float(), batches[0], atol=1e-2)


def test_indexed_dataset_records_which_indices_each_epoch_consumed(tmp_path):
    data = prov4ml.IndexedDatasetWrapper(torch.utils.data.TensorDataset(torch.arange(10.0)), label="train")
    loader = torch.utils.data.DataLoader(data, batch_size=4, shuffle=True)
    _start(tmp_path)
    seen = []
    for _epoch in range(2):
        for index, (x,) in loader:  # yProv4ML's (index, item)
            assert torch.equal(x, index.float())
            seen.append(index)
    prov_json = prov4ml.end_run()
    from prov4ml_dist.compat.indices import coverage_of_merged

    entries = coverage_of_merged(prov_json.parent / "merged.h5")
    assert [(e["epoch"], e["served"], e["covers"], e["disjoint"]) for e in entries] == [(0, 10, True, True),
                                                                                         (1, 10, True, True)]
    records = _merged_records(prov_json.parent, "indices")
    assert records[0]["ranges"] == [[0, 10]]  # compact: one range, not ten indices


# -- readers, model card, RO-Crate ---------------------------------------------------------
def _small_run(tmp_path) -> Path:
    _start(tmp_path, "card")
    model = torch.nn.Linear(3, 1)
    prov4ml.log_param("lr", 0.1)
    prov4ml.log_model("net", model)
    prov4ml.log_dataset("train", torch.utils.data.TensorDataset(torch.zeros(6, 3)))
    data = tmp_path / "labels.csv"
    data.write_text("y\n1\n")
    prov4ml.log_artifact("labels.csv", str(data), "Training", is_input=True)
    for step, value in enumerate([3.0, 2.0, 1.0]):
        prov4ml.log_metric("MSE", value, "Training", step=step)
    prov4ml.log_metric("MSE", 5.0, "Validation", step=0)
    return prov4ml.end_run(create_card=True, crate_ro_crate=True)


def test_getters_answer_the_reading_example_from_the_merged_run(tmp_path):
    from prov4ml_dist.utils import getters

    prov_json = _small_run(tmp_path)
    assert "run:run" in getters.list_activities(prov_json)
    assert len(getters.list_entities(prov_json, "provml:Model")) == 1  # yProv4ML's type name, ours underneath
    assert getters.get_parameter(prov_json, "card", "yprov:run_id") == prov_json.parent.name
    assert getters.get_parameter(prov_json, "run", "prov:startTime").startswith("20")
    assert getters.list_parameters(prov_json.parent, "card")["p4d:experiment_name"] == "card"
    paths = getters.list_metric_paths(prov_json, context="Validation")
    assert list(paths) == ["MSE_Validation__rank0"] and paths["MSE_Validation__rank0"].startswith("merged.h5:")
    rows = getters.list_metrics(prov_json, context="Training")
    rows = rows.to_dict("records") if hasattr(rows, "to_dict") else rows
    assert [(r["label"], r["points"], r["last"]) for r in rows] == [("MSE", 3, 1.0)]
    points = getters.get_metric(prov_json.parent / "merged.h5", name="MSE", context="Training")
    assert list(points["step"]) == [0, 1, 2] and list(points["value"]) == [3.0, 2.0, 1.0]
    assert getters.get_metric(prov_json, name="absent") is None
    assert getters.list_provjson_in_proj(prov_json.parent.parent) == [prov_json]


def test_end_run_writes_a_model_card_from_the_merged_run(tmp_path):
    run_dir = _small_run(tmp_path).parent
    card = json.loads((run_dir / "model_card.json").read_text())
    assert card["models"][0]["name"] == "net" and card["models"][0]["parameters"] == 4
    assert card["params"] == {"lr": 0.1} and card["datasets"][0]["total_samples"] == 6
    mse = {m["context"]: m for m in card["metrics"] if m["key"] == "MSE"}
    assert (mse["Training"]["last_mean"], mse["Training"]["min"], mse["Training"]["max"]) == (1.0, 1.0, 3.0)
    assert card["ranks"]["world_size"] == 1 and card["software"]["torch"] == torch.__version__
    markdown = (run_dir / "model_card.md").read_text()
    assert markdown.startswith("# Model card: card /") and "| MSE | Training | 1 |" in markdown


def test_end_run_writes_an_ro_crate_of_the_run_directory(tmp_path):
    import hashlib

    run_dir = _small_run(tmp_path).parent
    doc = json.loads((run_dir / "ro-crate-metadata.json").read_text())
    assert doc["@context"] == "https://w3id.org/ro/crate/1.1/context"
    graph = {e["@id"]: e for e in doc["@graph"]}
    assert graph["ro-crate-metadata.json"]["conformsTo"] == {"@id": "https://w3id.org/ro/crate/1.1"}
    root = graph["./"]
    assert root["conformsTo"] == {"@id": "https://w3id.org/ro/wfrun/process/0.5"} and root["datePublished"]
    on_disk = sorted(p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*")
                     if p.is_file() and p.name != "ro-crate-metadata.json")
    assert sorted(part["@id"] for part in root["hasPart"]) == on_disk
    for rel in on_disk:  # every file with its size and sha256
        data = (run_dir / rel).read_bytes()
        assert graph[rel]["sha256"] == hashlib.sha256(data).hexdigest() and int(graph[rel]["contentSize"]) == len(data)
    assert graph["prov.json"]["about"] == {"@id": "#run"}
    action = graph["#run"]
    assert action["@type"] == "CreateAction" and graph[action["instrument"]["@id"]]["@type"] == "SoftwareApplication"
    assert [o["@id"] for o in action["object"]] == ["artifacts/rank-00000/labels.csv"]
    assert {"merged.h5", "prov.json", "model_card.md"} <= {r["@id"] for r in action["result"]}
    try:
        from rocrate.rocrate import ROCrate
    except ImportError:
        return
    crate = ROCrate(run_dir)  # the reference library reads it back
    assert crate.dereference("#run").type == "CreateAction"
    assert {e.id for e in crate.data_entities} == set(on_disk)


def test_tracked_model_drops_batches_instead_of_waiting_for_a_stalled_writer(tmp_path):
    from h5py._objects import phil  # h5py's global lock: held here, the writer thread cannot write

    from prov4ml_dist.wrappers.tracked_model import QUEUE_BATCHES

    net = torch.nn.Linear(4, 2)
    tracked = prov4ml.ProvenanceTrackedModel("lin", net, max_bytes=2**40)
    _start(tmp_path)
    steps = QUEUE_BATCHES * 3
    with phil:
        for _ in range(steps):  # every step completes although nothing can be written
            tracked(torch.randn(2, 4))
    run_dir = prov4ml.end_run().parent
    record = next(r for r in _merged_records(run_dir, "artifact") if r["name"] == "lin.h5")
    dropped = record["tracked_layers"]["dropped_batches"]
    assert steps - QUEUE_BATCHES - 1 <= dropped < steps  # the queue's worth (and the one in hand) kept
    with h5py.File(run_dir / record["path"], "r") as f:
        assert f["lin/input"].shape[0] == 2 * (steps - dropped)


def test_itwinai_logger_follows_log_freq_and_records_each_kind(tmp_path):
    logger = prov4ml.ProvMLItwinAILogger(experiment_name="itw", provenance_save_dir=str(tmp_path), log_freq=2)
    logger.create_logger_context(rank=0)
    for batch in range(5):
        logger.log(float(batch), "loss", step=batch, batch_idx=batch)  # every 2nd batch
    logger.log(torch.utils.data.DataLoader(list(range(4)), batch_size=2), "train", kind="torch")
    logger.log(0.5, "lr", kind="torch")
    logger.log(torch.nn.Linear(2, 1), "net", kind="best_model")
    with pytest.raises(ValueError, match="kind"):
        logger.log(1.0, "x", kind="histogram")
    run_dir = logger.destroy_logger_context().parent
    from prov4ml_dist.utils import getters

    assert getters.get_metric(run_dir, name="loss")["step"].tolist() == [0, 2, 4]
    merged = load_merged(run_dir / "merged.h5")
    assert [d.name for d in merged.datasets] == ["train"] and {p.key for p in merged.params} == {"lr"}
    assert [m.name for m in merged.models] == ["net"]
    with pytest.raises(ValueError, match="log_freq"):
        prov4ml.ProvMLItwinAILogger(log_freq=0)


def test_index_ranges_and_their_cross_rank_coverage():
    from prov4ml_dist.compat.indices import coverage, to_ranges

    assert to_ranges([5, 0, 2, 1, 2, 7, 6]) == [[0, 3], [5, 8]]
    # a DistributedSampler over 10 samples and 4 ranks pads with 2 repeats: not disjoint, but covering
    shares = {r: [(r + 4 * k) % 10 for k in range(3)] for r in range(4)}
    records = [(r, {"label": "d", "epoch": 0, "dataset_len": 10, "ranges": to_ranges(ix)}) for r, ix in shares.items()]
    (entry,) = coverage(records)
    assert (entry["served"], entry["distinct"], entry["overlap"], entry["covers"]) == (12, 10, 2, True)
    (short,) = coverage(records[:2])
    assert (short["disjoint"], short["covers"], short["distinct"]) == (True, False, 6)


def test_import_star_works_where_torch_is_absent(tmp_path):
    script = tmp_path / "star.py"
    script.write_text(
        "import sys\n"
        "class NoTorch:  # as if torch were not installed\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.'):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, NoTorch())\n"
        "from prov4ml_dist import *\n"
        "print(start_run.__name__, 'ProvenanceTrackedModel' in dir(), 'ProvMLItwinAILogger' in dir())\n")
    out = subprocess.run([sys.executable, str(script)], env=child_env(PYTHONPATH=str(REPO)), capture_output=True,
                         text=True, timeout=120, check=True).stdout
    assert out.split() == ["start_run", "False", "True"]
