"""A torchrun job that trains until it is killed: the subject of the offline-merge tests.

    torchrun --standalone --nproc_per_node=2 cli_train_until_killed.py SAVE_DIR [LOCAL_DIR]

Every step all-reduces the gradients (gloo), logs its loss, and every rank saves one
artifact. Each rank writes SAVE_DIR/ready-<rank> (its pid) once some of its steps have been
flushed; with LOCAL_DIR, each rank keeps its shard under LOCAL_DIR/rank-<rank>, as on a
node-local disk.
"""

import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

import prov4ml_dist as prov4ml

FLUSH_INTERVAL = 0.1
save_dir = Path(sys.argv[1])
local = Path(sys.argv[2]) if len(sys.argv) > 2 else None
dist.init_process_group("gloo")
rank = dist.get_rank()
prov4ml.start_run(experiment_name="crash", provenance_save_dir=save_dir, flush_interval=FLUSH_INTERVAL,
                  sample_interval=0.2, local_dir=local / f"rank-{rank}" if local else None)
prov4ml.log_param("lr", 0.01)
prov4ml.log_artifact("weights.bin", bytes(range(256)) * (rank + 1), prov4ml.Context.TRAINING)

torch.manual_seed(0)
model = torch.nn.Linear(8, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.01)
x, y = torch.randn(64, 8), torch.randn(64, 1)
started, step = time.time(), 0
while True:
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    for p in model.parameters():
        dist.all_reduce(p.grad)
    opt.step()
    prov4ml.log_metric("loss", loss.item(), prov4ml.Context.TRAINING, step=step)
    if step % 10 == 0:
        prov4ml.log_metric("val_loss", loss.item() * 1.1, prov4ml.Context.VALIDATION, step=step // 10)
    step += 1
    ready = save_dir / f"ready-{rank}"
    if not ready.exists() and time.time() - started > 5 * FLUSH_INTERVAL and step > 20:
        ready.with_suffix(".tmp").write_text(str(os.getpid()))
        ready.with_suffix(".tmp").rename(ready)
    time.sleep(0.002)
