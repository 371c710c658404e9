"""yProv4ML's itwinai-logger example (examples/prov4ml_logger.py), same calls in the same order,
with our own tiny random data on the CPU. Only the import line differs."""

import torch
import torch.nn as nn
import torch.nn.functional as F
from _check import check_merged
from torch.utils.data import DataLoader, Subset, TensorDataset

import prov4ml_dist as yprov4ml

BATCH_SIZE = 8
EPOCHS = 2

# start the run in the same way as with mlflow
logger = yprov4ml.ProvMLItwinAILogger(
    prov_user_namespace="www.example.org",
    experiment_name="experiment_name",
    provenance_save_dir="prov",
    save_after_n_logs=100,
    log_on_workers=0,
)
logger.create_logger_context(rank=0)


class MNISTModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = torch.nn.Sequential(torch.nn.Linear(4 * 4, 10))

    def forward(self, x):
        return self.model(x.view(x.size(0), -1))


mnist_model = MNISTModel()


class Compose:  # a transform pipeline: its repr carries a memory address
    pass


tform = Compose()
logger.save_hyperparameters({"dataset transformation": tform})

torch.manual_seed(0)
full = TensorDataset(torch.rand(BATCH_SIZE * 5, 1, 4, 4), torch.randint(0, 10, (BATCH_SIZE * 5,)))
train_ds = Subset(full, range(BATCH_SIZE * 3))
train_loader = DataLoader(train_ds, batch_size=BATCH_SIZE)
logger.save_hyperparameters({"train_dataset": train_loader})

test_ds = Subset(full, range(BATCH_SIZE * 3, BATCH_SIZE * 5))
test_loader = DataLoader(test_ds, batch_size=BATCH_SIZE)
logger.save_hyperparameters({"test_dataset": test_loader})

optim = torch.optim.Adam(mnist_model.parameters(), lr=0.0002)
logger.save_hyperparameters({"optimizer": optim})

for epoch in range(EPOCHS):
    for _i, (x, y) in enumerate(train_loader):
        optim.zero_grad()
        y_hat = mnist_model(x)
        loss = F.cross_entropy(y_hat, y)
        loss.backward()
        optim.step()
        logger.log(item=loss.item(), identifier="MSE_train", kind="metric", context=yprov4ml.Contexts.TRAINING,
                   step=epoch)

    logger.log(item=epoch, identifier="epoch", kind="carbon", context=yprov4ml.Contexts.TRAINING, step=epoch)
    logger.log(item=epoch, identifier="epoch", kind="system", context=yprov4ml.Contexts.TRAINING, step=epoch)

    logger.log(item=mnist_model, identifier="mnist_model_version", kind="model", context=yprov4ml.Contexts.TRAINING,
               step=epoch)

for _i, (x, y) in enumerate(test_loader):
    y_hat = mnist_model(x)
    loss = F.cross_entropy(y_hat, y)
    logger.log(item=loss.item(), identifier="MSE_test", kind="metric", context=yprov4ml.Contexts.TESTING, step=epoch)

logger.log(item=mnist_model, identifier="mnist_model_final", kind="best_model")

prov_json = logger.destroy_logger_context()
check_merged(prov_json, [("MSE_train", "TRAINING"), ("MSE_test", "TESTING")])
