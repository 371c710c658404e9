"""yProv4ML's plain-PyTorch example (examples/prov4ml_torch.py), same calls in the same order,
with our own tiny random data on the CPU. Only the import line differs."""

import torch
import torch.nn as nn
import torch.nn.functional as F
from _check import check_merged
from torch.utils.data import DataLoader, Subset, TensorDataset

import prov4ml_dist as yprov4ml

BATCH_SIZE = 8
EPOCHS = 2
DEVICE = "cpu"

COMP = True
yprov4ml.start_run(
    prov_user_namespace="www.example.org",
    experiment_name="example",
    provenance_save_dir="prov",
    save_after_n_logs=100,
    collect_all_processes=True,
    metrics_file_type="nc",
    use_compressor=COMP,
)

yprov4ml.log_source_code()
yprov4ml.log_execution_command(cmd="python", path="torch_example.py")


class MNISTModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = torch.nn.Sequential(torch.nn.Linear(4 * 4, 10), torch.nn.ReLU())

    def forward(self, x):
        return self.model(x.view(x.size(0), -1))


mnist_model = MNISTModel().to(DEVICE)
mnist_model = yprov4ml.ProvenanceTrackedModel(mnist_model)


class ToTensor:  # a transform object: its repr carries a memory address
    def __call__(self, x):
        return x


tform = ToTensor()
yprov4ml.log_param("dataset transformation", tform)

torch.manual_seed(0)
train_ds = TensorDataset(torch.rand(BATCH_SIZE * 4, 1, 4, 4), torch.randint(0, 10, (BATCH_SIZE * 4,)))
train_loader = DataLoader(train_ds, batch_size=BATCH_SIZE, shuffle=True)
yprov4ml.log_dataset("train_dataset", train_loader, context="Training")

test_ds = TensorDataset(torch.rand(BATCH_SIZE * 2, 1, 4, 4), torch.randint(0, 10, (BATCH_SIZE * 2,)))
test_ds = Subset(test_ds, range(BATCH_SIZE))
test_loader = DataLoader(test_ds, batch_size=BATCH_SIZE)
yprov4ml.log_dataset("val_dataset", test_loader, context="Validation")

optim = torch.optim.Adam(mnist_model.parameters(), lr=0.001)
yprov4ml.log_param("optimizer", "Adam")

loss_fn = nn.MSELoss().to(DEVICE)
loss_fn = yprov4ml.ProvenanceTrackedFunction(loss_fn, context="Training")
yprov4ml.log_context("TrainingButDifferent", "Training")
val_loss_fn = yprov4ml.ProvenanceTrackedFunction(nn.MSELoss(), context="TrainingButDifferent")

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
        yprov4ml.log_carbon_metrics("Training", step=epoch)
        yprov4ml.log_system_metrics("Training", step=epoch)
        yprov4ml.log_flops_per_batch("test", mnist_model, (x, y), "Training", step=epoch)
    yprov4ml.save_model_version("mnist_model_version", mnist_model, "Training", epoch)

    mnist_model.eval()
    with torch.no_grad():
        for (x, y) in test_loader:
            x, y = x.to(DEVICE), y.to(DEVICE)
            y_hat = mnist_model(x)
            y2 = F.one_hot(y, 10).float()
            loss = val_loss_fn(y_hat, y2)
        yprov4ml.log_metric("MSE", loss.item(), "Validation", step=epoch)

yprov4ml.log_model("mnist_model_final", mnist_model, log_model_layers=True, is_input=False)

prov_json = yprov4ml.end_run(
    create_graph=True,
    create_svg=True,
    crate_ro_crate=True,
)
check_merged(prov_json, [("MSELoss", "Training"), ("MSELoss", "TrainingButDifferent"), ("MSE", "Validation"),
                         ("test", "Training")], files=("ro-crate-metadata.json", "prov.dot"))
