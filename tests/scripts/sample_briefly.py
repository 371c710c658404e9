"""One rank that only samples: start_run with a short sample_interval, wait, end_run.

    sample_briefly.py SAVE_DIR
"""

import sys
import time

import prov4ml_dist as prov4ml

prov4ml.start_run(experiment_name="sampling", provenance_save_dir=sys.argv[1], sample_interval=0.1,
                  merge_timeout=60)
time.sleep(0.6)
prov4ml.end_run()
