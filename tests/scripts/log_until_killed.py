"""Logs metrics forever (until SIGKILLed): the subject of the crash tests.

    python log_until_killed.py SAVE_DIR RUN_ID FLUSH_INTERVAL
"""

import sys
import time

import prov4ml_dist as prov4ml

save_dir, run_id, flush_interval = sys.argv[1], sys.argv[2], float(sys.argv[3])
prov4ml.start_run(experiment_name="crash", provenance_save_dir=save_dir, run_id=run_id,
                  flush_interval=flush_interval, sample_interval=None)
prov4ml.log_param("lr", 0.1)
print("ready", flush=True)
step = 0
while True:
    for _ in range(50):
        prov4ml.log_metric("loss", float(step), prov4ml.Context.TRAINING, step=step)
        step += 1
    time.sleep(0.001)
