"""Cost of ``ProvMLLogger`` per ``self.log`` value, against Lightning's ``CSVLogger`` in the
same run: ``Trainer(logger=[ProvMLLogger(), CSVLogger(...)])``, one CPU process, a module that
calls ``self.log`` for KEYS values each step. Each logger's ``log_metrics`` and ``save`` are
timed (CSVLogger buffers rows and writes them in ``save``); the figure is that time divided by
the values the logger received. Lightning's own cost of ``self.log`` (shared by both) is not in it.

    python benchmarks/bench_lightning_logger.py [--steps 400] [--keys 20]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

import prov4ml_dist as prov4ml

spent: dict[str, float] = defaultdict(float)
values: dict[str, int] = defaultdict(int)


def timed(logger, label: str) -> None:  # noqa: ANN001 - any Lightning logger
    """Wrap the logger's log_metrics and save with a perf_counter."""
    log_metrics, save = logger.log_metrics, logger.save

    def timed_log(metrics, step=None):  # noqa: ANN001
        t = time.perf_counter()
        log_metrics(metrics, step)
        spent[label] += time.perf_counter() - t
        values[label] += len(metrics)

    def timed_save():
        t = time.perf_counter()
        save()
        spent[label] += time.perf_counter() - t

    logger.log_metrics, logger.save = timed_log, timed_save


class Many(pl.LightningModule):
    def __init__(self, keys: int) -> None:
        super().__init__()
        self.keys = [f"metric_{i}" for i in range(keys)]
        self.net = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):  # noqa: ANN001
        loss = self.net(batch[0]).pow(2).mean()
        for i, key in enumerate(self.keys):
            self.log(key, loss + i)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--keys", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        prov4ml.start_run("bench", provenance_save_dir=Path(tmp) / "prov", sample_interval=None)
        ours, csv = prov4ml.ProvMLLogger(), CSVLogger(Path(tmp) / "csv")
        timed(ours, "ProvMLLogger")
        timed(csv, "CSVLogger")
        data = DataLoader(TensorDataset(torch.randn(args.steps, 4)), batch_size=1)
        trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=args.steps, logger=[ours, csv],
                             log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False,
                             enable_checkpointing=False)
        trainer.fit(Many(args.keys), data)
        prov4ml.end_run()
    print(f"{args.steps} steps x {args.keys} self.log keys (+ epoch), one process, in the same run")
    print(f"{'logger':<14} {'values':>8} {'total ms':>9} {'µs/value':>9}")
    for label in ("ProvMLLogger", "CSVLogger"):
        print(f"{label:<14} {values[label]:>8} {spent[label] * 1e3:>9.1f} {spent[label] / values[label] * 1e6:>9.2f}")


if __name__ == "__main__":
    main()
