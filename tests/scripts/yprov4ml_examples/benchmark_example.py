"""yProv4ML's benchmark example (examples/benchmark.py): one process runs several modes, each
its own run (start_run ... end_run) under its own experiment name, same calls in the same
order, with our own tiny random data on the CPU. Only the import line differs."""

import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from _check import check_merged
from torch.utils.data import DataLoader, TensorDataset

BATCH_SIZE = 8
EPOCHS = 2
DEVICE = "cpu"


def run(mode):
    print(f"Running {mode}")
    start = time.time()
    if mode != "WITHOUT":
        import prov4ml_dist as yprov4ml
        yprov4ml.start_run(
            prov_user_namespace="www.example.org",
            experiment_name=f"bench_{mode}",
            provenance_save_dir="prov",
            save_after_n_logs=100,
            collect_all_processes=False,
            disable_codecarbon=False if "CARBON" in mode else True,
            metrics_file_type=yprov4ml.MetricsType.CSV,
        )

    class MNISTModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = torch.nn.Sequential(torch.nn.Linear(4 * 4, 10), torch.nn.ReLU())

        def forward(self, x):
            return self.model(x.view(x.size(0), -1))

    mnist_model = MNISTModel().to(DEVICE)

    class Compose:  # a transform pipeline: its repr carries a memory address
        pass

    tform = Compose()
    if mode != "WITHOUT":
        yprov4ml.log_param("dataset transformation", tform)

    torch.manual_seed(0)
    train_ds = TensorDataset(torch.rand(BATCH_SIZE * 3, 1, 4, 4), torch.randint(0, 10, (BATCH_SIZE * 3,)))
    train_loader = DataLoader(train_ds, batch_size=BATCH_SIZE, shuffle=True)
    if mode != "WITHOUT":
        yprov4ml.log_dataset("train_dataset", train_loader, context=yprov4ml.Context.TRAINING)

    optim = torch.optim.Adam(mnist_model.parameters(), lr=0.001)
    if mode != "WITHOUT":
        yprov4ml.log_param("optimizer", "Adam")

    loss_fn = nn.MSELoss().to(DEVICE)
    if mode != "WITHOUT":
        loss_fn = yprov4ml.ProvenanceTrackedFunction(loss_fn, context=yprov4ml.Context.TRAINING)

    losses = []
    for epoch in range(EPOCHS):
        mnist_model.train()
        for x, y in train_loader:
            x, y = x.to(DEVICE), y.to(DEVICE)
            optim.zero_grad()
            y_hat = mnist_model(x)
            y = F.one_hot(y, 10).float()
            loss = loss_fn(y_hat, y)
            loss.backward()
            optim.step()
            losses.append(loss.item())

            if "METRIC" in mode:
                yprov4ml.log_metric("MSE", loss.item(), context=yprov4ml.Context.TRAINING, step=epoch)
            if "SYSTEM" in mode:
                yprov4ml.log_system_metrics(yprov4ml.Context.TRAINING, step=epoch)
            if "CARBON" in mode:
                yprov4ml.log_carbon_metrics(yprov4ml.Context.TRAINING, step=epoch)
        if mode != "WITHOUT":
            yprov4ml.save_model_version("mnist_model_version", mnist_model, yprov4ml.Context.TRAINING, epoch)
    if mode != "WITHOUT":
        prov_json = yprov4ml.end_run(create_graph=False, create_svg=False, crate_ro_crate=False)
        check_merged(prov_json, [("MSELoss", "TRAINING")] + ([("MSE", "TRAINING")] if "METRIC" in mode else []))

    end = time.time()
    print(f"Time for {mode}: {end - start}")


def main():
    MODES = ["WITHOUT", "PROV_ONLY", "PROV+1METRIC", "PROV+SYSTEM+CARBON"]
    for mode in MODES:
        run(mode)
    assert {"bench_PROV+1METRIC", "bench_PROV+SYSTEM+CARBON", "bench_PROV_ONLY"} <= set(os.listdir("prov"))


if __name__ == "__main__":
    main()
