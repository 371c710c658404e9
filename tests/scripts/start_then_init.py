"""start_run first, init_process_group (env://) only then, as scripts that set up logging
before the framework do. argv: save_dir."""

import sys

import torch.distributed as dist

import prov4ml_dist as prov4ml

prov4ml.start_run("late", provenance_save_dir=sys.argv[1], sample_interval=None, merge_timeout=60)
prov4ml.log_metric("before_init", 1.0, prov4ml.Context.TRAINING, step=0)  # logged before the rank is known
dist.init_process_group("gloo", init_method="env://")
for step in range(3):
    prov4ml.log_metric("loss", float(dist.get_rank() + step), prov4ml.Context.TRAINING, step=step)
prov4ml.end_run()
dist.destroy_process_group()
