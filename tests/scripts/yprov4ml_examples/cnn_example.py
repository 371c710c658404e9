"""yProv4ML's CNN example (examples/cnn_training.py), same calls in the same order, with our own
tiny random images on the CPU (no plot window). Only the import line differs."""

import torch
import torch.nn as nn
import torch.nn.functional as F
from _check import check_merged
from torch.utils.data import DataLoader, Subset, TensorDataset

import prov4ml_dist as yprov4ml

yprov4ml.start_run(
    prov_user_namespace="www.example.org",
    experiment_name="experiment_name",
    provenance_save_dir="prov",
    save_after_n_logs=100,
    collect_all_processes=True,
    disable_codecarbon=True,
)

BATCH_SIZE = 8
EPOCHS = 2
DEVICE = "cpu"


class CNN(nn.Module):
    def __init__(self, out_classes=10):
        super().__init__()
        self.sequential = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 8, 3), nn.ReLU())
        self.mlp = nn.Linear(8 * 4 * 4, out_features=out_classes)

    def forward(self, x):
        x = self.sequential(x)
        x = x.reshape(x.shape[0], -1)
        x = self.mlp(x)
        return x


model = CNN()

torch.manual_seed(0)
train_ds = TensorDataset(torch.rand(BATCH_SIZE * 4, 3, 8, 8), torch.randint(0, 10, (BATCH_SIZE * 4,)))
train_ds = Subset(train_ds, range(BATCH_SIZE * 3))
train_loader = DataLoader(train_ds, batch_size=BATCH_SIZE)
yprov4ml.log_dataset("train_loader", train_loader)

test_ds = TensorDataset(torch.rand(BATCH_SIZE * 2, 3, 8, 8), torch.randint(0, 10, (BATCH_SIZE * 2,)))
test_ds = Subset(test_ds, range(BATCH_SIZE * 2))
test_loader = DataLoader(test_ds, batch_size=BATCH_SIZE)
yprov4ml.log_dataset("test_loader", test_loader)

optim = torch.optim.Adam(model.parameters(), lr=0.1)

loss_fn = nn.MSELoss().to(DEVICE)

losses = []
for epoch in range(EPOCHS):
    model.train()
    for _i, (x, y) in enumerate(train_loader):
        x, y = x.to(DEVICE), y.to(DEVICE)
        optim.zero_grad()
        y_hat = model(x)
        y = F.one_hot(y, 10).float()
        loss = loss_fn(y_hat, y)
        loss.backward()
        optim.step()
        losses.append(loss.item())

        yprov4ml.log_metric("MSE_train", loss.item(), context=yprov4ml.Contexts.TRAINING, step=epoch)
        yprov4ml.log_system_metrics(yprov4ml.Contexts.TRAINING, step=epoch)
    yprov4ml.save_model_version("mnist_model_version", model, yprov4ml.Contexts.MODELS, epoch)

model.eval()
avg_loss = 0
total_correct = 0
total_samples = 0
for _i, (x, y) in enumerate(test_loader):
    x, y = x.to(DEVICE), y.to(DEVICE)
    y_hat = model(x)
    y2 = F.one_hot(y, 10).float()
    loss = loss_fn(y_hat, y2)
    avg_loss += loss.item()

    _, predicted = torch.max(y2, 1)
    total_correct += (predicted == y).sum().item()
    total_samples += y.size(0)
    yprov4ml.log_metric("MSE_val", loss.item(), yprov4ml.Contexts.VALIDATION, step=epoch)

yprov4ml.log_model("mnist_model_final", model, log_model_layers=True, is_input=False)

avg_loss /= len(test_loader)
acc = total_correct / total_samples

print(f"Average loss: {avg_loss:.4f}, Accuracy: {acc:.4f}")

prov_json = yprov4ml.end_run(
    create_graph=True,
    create_svg=True,
    create_card=True,
)
check_merged(prov_json, [("MSE_train", "TRAINING"), ("MSE_val", "VALIDATION")], files=("model_card.md",))
