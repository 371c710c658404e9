"""A yProv4ML 3.x-style script runs unchanged after `import prov4ml_dist as prov4ml`."""

from __future__ import annotations

import json

import torch

import prov4ml_dist as prov4ml
from prov4ml_dist.provenance.export import load_document


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
