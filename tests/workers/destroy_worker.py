"""One of two plain processes (no launcher) that initialise a gloo process group themselves,
start a run, destroy the group, then call end_run: the wrong call order outside torchrun.

    destroy_worker.py RANK PORT SAVE_DIR LOCAL_DIR_BASE
"""

import sys
from pathlib import Path

import torch.distributed as dist

import prov4ml_dist as prov4ml


def main() -> None:
    rank, port, save, local = int(sys.argv[1]), sys.argv[2], sys.argv[3], Path(sys.argv[4])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    prov4ml.start_run(experiment_name="e", provenance_save_dir=save, local_dir=local / f"rank-{rank}",
                      sample_interval=None, merge_timeout=5)
    prov4ml.log_metric("loss", 1.0, prov4ml.Context.TRAINING, step=0)
    dist.destroy_process_group()
    prov4ml.end_run()


if __name__ == "__main__":
    main()
