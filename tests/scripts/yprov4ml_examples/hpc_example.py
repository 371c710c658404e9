"""yProv4ML's HPC example (examples/prov4ml_hpc.py), same calls in the same order, with our own
tiny random data on the CPU. yProv4ML runs its 4 processes with dask; here the launcher's
ranks are the processes (torchrun --nproc_per_node=4), each reading its DistributedSampler
share through an IndexedDatasetWrapper, and the merge checks that the shares are disjoint and
cover the dataset. Only the import line differs from a yProv4ML script."""

import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from _check import check_merged
from torch.utils.data import DataLoader, DistributedSampler, Subset, TensorDataset

import prov4ml_dist as yprov4ml


def run_job(proc, world):
    BATCH_SIZE = 8
    EPOCHS = 2
    DEVICE = "cpu"

    yprov4ml.start_run(
        prov_user_namespace="www.example.org",
        experiment_name="experiment_name",
        provenance_save_dir="prov",
        save_after_n_logs=1,
        collect_all_processes=True,
    )

    yprov4ml.log_source_code(os.path.abspath(__file__))
    yprov4ml.log_execution_command(cmd="python", path="hpc_example.py")

    class MNISTModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = torch.nn.Sequential(torch.nn.Linear(4 * 4, 10))

        def forward(self, x):
            return self.model(x.view(x.size(0), -1))

    mnist_model = MNISTModel().to(DEVICE)

    torch.manual_seed(0)
    full = TensorDataset(torch.rand(100, 1, 4, 4), torch.randint(0, 10, (100,)))
    train_ds = yprov4ml.IndexedDatasetWrapper(Subset(full, range(88)), label="train_dataset")
    sampler = DistributedSampler(train_ds, num_replicas=world, rank=proc, shuffle=True, drop_last=False)
    train_loader = DataLoader(train_ds, batch_size=BATCH_SIZE, sampler=sampler)
    yprov4ml.log_dataset("train_dataset", train_loader)
    yprov4ml.log_param("train_loader", train_loader)  # what itwinai's save_hyperparameters does

    test_ds = Subset(full, range(88, 100))
    test_loader = DataLoader(test_ds, batch_size=BATCH_SIZE)
    yprov4ml.log_dataset("val_dataset", test_loader)

    optim = torch.optim.Adam(mnist_model.parameters(), lr=0.001)

    loss_fn = nn.MSELoss().to(DEVICE)
    yprov4ml.log_param("loss_fn", "MSELoss")

    losses = []
    for epoch in range(EPOCHS):
        sampler.set_epoch(epoch)
        train_ds.set_epoch(epoch)
        mnist_model.train()
        for _i, (_idx, (x, y)) in enumerate(train_loader):
            x, y = x.to(DEVICE), y.to(DEVICE)
            optim.zero_grad()
            y_hat = mnist_model(x)
            y = F.one_hot(y, 10).float()
            loss = loss_fn(y_hat, y)
            loss.backward()
            optim.step()
            losses.append(loss.item())

            yprov4ml.log_metric("Loss", loss.item(), context=yprov4ml.Context.TRAINING, step=epoch)
            yprov4ml.log_system_metrics(yprov4ml.Context.TRAINING, step=epoch)
        yprov4ml.save_model_version("mnist_model_version", mnist_model, yprov4ml.Context.MODELS, epoch)

        mnist_model.eval()
        for _i, (x, y) in enumerate(test_loader):
            x, y = x.to(DEVICE), y.to(DEVICE)
            y_hat = mnist_model(x)
            y2 = F.one_hot(y, 10).float()
            loss = loss_fn(y_hat, y2)

            yprov4ml.log_metric("Loss", loss.item(), yprov4ml.Context.VALIDATION, step=epoch)

    yprov4ml.log_model("mnist_model_final", mnist_model)
    return yprov4ml.end_run(create_graph=True, create_svg=True)


if __name__ == "__main__":
    prov_json = run_job(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")))
    check_merged(prov_json, [("Loss", "TRAINING"), ("Loss", "VALIDATION")])
    if prov_json is not None:
        from prov4ml_dist.compat.indices import coverage_of_merged

        epochs = coverage_of_merged(prov_json.parent / "merged.h5")
        assert [e["epoch"] for e in epochs] == [0, 1], epochs
        assert all(e["disjoint"] and e["covers"] and e["dataset_len"] == 88 for e in epochs), epochs
        final = prov_json.parent / "artifacts" / "rank-00000" / "models" / "mnist_model_final"
        assert [p.name for p in final.iterdir()] == ["mnist_model_final.pt"]
        print("INDICES disjoint and covering", file=sys.stderr)
