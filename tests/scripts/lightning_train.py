"""A tiny Lightning job: start_run first (as scripts do), then a Trainer that starts or joins
the other processes. argv: save_dir strategy devices [logger: prov|csv+prov|none] [num_nodes]."""

import sys

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

import prov4ml_dist as prov4ml


class Tiny(pl.LightningModule):
    def __init__(self, lr: float = 0.05, hidden: int = 4) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(torch.nn.Linear(3, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)  # each rank its own value: no sync_dist
        self.log("rank_marker", float(self.global_rank))
        if self.logger is None:
            prov4ml.log_metric("train_loss", loss.item(), prov4ml.Context.TRAINING, step=self.global_step)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def main() -> None:
    save_dir, strategy, devices = sys.argv[1], sys.argv[2], int(sys.argv[3])
    which = sys.argv[4] if len(sys.argv) > 4 else "prov"
    num_nodes = int(sys.argv[5]) if len(sys.argv) > 5 else 1
    prov4ml.start_run("lightning", provenance_save_dir=save_dir, sample_interval=None, merge_timeout=60)
    prov4ml.log_param("script_param", 7)  # logged before the framework set the job up
    prov4ml.log_metric("before_fit", 1.5, prov4ml.Context.TRAINING, step=0)
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(32, 3), torch.randn(32, 1))
    loggers = {"prov": lambda: [prov4ml.ProvMLLogger()], "none": lambda: False,
               "csv+prov": lambda: [prov4ml.ProvMLLogger(), CSVLogger(save_dir + "/csv")]}[which]()
    trainer = pl.Trainer(accelerator="cpu", devices=devices, num_nodes=num_nodes, strategy=strategy, max_steps=4,
                         logger=loggers,
                         log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[ModelCheckpoint(dirpath=save_dir + "/ckpt", every_n_train_steps=2, save_top_k=-1)])
    trainer.fit(Tiny(), DataLoader(data, batch_size=4))
    prov_json = prov4ml.end_run()
    print("END_RUN", prov_json if trainer.is_global_zero else "-")


if __name__ == "__main__":
    main()
