"""Accelerate's notebook_launcher: 2 ranks forked from this process, as from a notebook's
kernel. This process (the notebook) calls start_run, logs, launches and calls end_run. argv:
save_dir, mode — "notebook": the function only logs; "both": the function calls start_run
and end_run too."""

import socket
import sys

from accelerate import notebook_launcher

import prov4ml_dist as prov4ml

SAVE_DIR, MODE = sys.argv[1], sys.argv[2]


def train() -> None:
    import torch.distributed as dist
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    if MODE == "both":
        prov4ml.start_run("notebook", provenance_save_dir=SAVE_DIR, sample_interval=None, merge_timeout=60)
    rank = accelerator.process_index
    for step in range(3):
        prov4ml.log_metric("loss", float(rank + step), prov4ml.Context.TRAINING, step=step)
    prov4ml.log_metric("rank_marker", float(rank), prov4ml.Context.TRAINING, step=0)
    assert dist.is_initialized() and dist.get_world_size() == 2
    if MODE == "both":
        print("RANK_END_RUN", rank, prov4ml.end_run(), flush=True)


prov4ml.start_run("notebook", provenance_save_dir=SAVE_DIR, sample_interval=None, merge_timeout=60)
prov4ml.log_param("notebook_param", 7)
prov4ml.log_metric("before_launch", 1.5, prov4ml.Context.TRAINING, step=0)
with socket.socket() as free:  # a free port for the launch's rendezvous
    free.bind(("127.0.0.1", 0))
    port = str(free.getsockname()[1])
notebook_launcher(train, num_processes=2, use_port=port)
print("END_RUN", prov4ml.end_run(), flush=True)
