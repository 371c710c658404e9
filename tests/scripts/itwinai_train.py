"""An itwinai-style worker (as itwinai's TorchTrainer drives its logger): torch.distributed
first, then the logger's context with the global rank. argv: save_dir, log_on_workers as JSON
("-1", "0", "[0]")."""

import json
import sys

import torch.distributed as dist

from prov4ml_dist.loggers.prov4ml_itwinai_logger import ProvMLItwinAILogger

dist.init_process_group("gloo", init_method="env://")
rank = dist.get_rank()
logger = ProvMLItwinAILogger(experiment_name="itwinai", provenance_save_dir=sys.argv[1], log_freq="batch",
                             log_on_workers=json.loads(sys.argv[2]))
logger.create_logger_context(rank=rank)
logger.save_hyperparameters({"lr": 0.1, "batch_size": 2})
for step in range(3):
    logger.log(float(rank + step), "loss", step=step, batch_idx=step)
logger.log(float(rank), "rank_marker", step=0)
print("END_RUN", logger.destroy_logger_context(), flush=True)
dist.destroy_process_group()
