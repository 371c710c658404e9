"""Logs a burst of points, then dies at once, before any flush could write them.

    python burst_then_die.py SAVE_DIR RUN_ID POINTS THREADS HOW

THREADS threads (1: the main thread alone) each log POINTS // THREADS points of their own
series ``t<i>`` (step = value = 0, 1, ...) and of one shared series ``shared`` (step=None):
all but the last TAIL steps, a flush, then the last TAIL steps (fewer rows than the writer's
flush threshold); then a param ``last`` and an artifact file are recorded, and the process
dies by HOW: ``SIGKILL`` (kill -9 of itself) or ``exit`` (``os._exit(0)``, no handler, no
atexit). The flush interval is an hour: only the crash ring and WAL hold the tail, the param
and the artifact (the flusher, still draining the burst, could have taken them otherwise).
"""

import os
import signal
import sys
import threading
import time

import prov4ml_dist as prov4ml

save_dir, run_id, points, threads, how = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
prov4ml.start_run(experiment_name="burst", provenance_save_dir=save_dir, run_id=run_id,
                  flush_interval=3600, sample_interval=None)
barrier = threading.Barrier(threads)
per_thread = points // threads
TAIL = min(per_thread, 1000 // threads)


def burst(t: int, start: int, stop: int) -> None:
    barrier.wait()
    for step in range(start, stop):
        prov4ml.log_metric(f"t{t}", float(step), prov4ml.Context.TRAINING, step=step)
        prov4ml.log_metric("shared", float(t), prov4ml.Context.TRAINING)


def phase(start: int, stop: int) -> None:
    workers = [threading.Thread(target=burst, args=(t, start, stop)) for t in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()


phase(0, per_thread - TAIL)
prov4ml.api.get_active_run().writer.flush()
time.sleep(0.2)  # a flush the flusher began during the burst ends (it would take the tail too)
phase(per_thread - TAIL, per_thread)
prov4ml.log_param("last", "recorded just before dying")
note = os.path.join(save_dir, f"{run_id}-note.txt")
with open(note, "w") as f:
    f.write("an artifact")
prov4ml.log_artifact(note, context=prov4ml.Context.TRAINING)
if how == "SIGKILL":
    os.kill(os.getpid(), signal.SIGKILL)
os._exit(0)
