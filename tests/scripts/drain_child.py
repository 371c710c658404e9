"""A rank whose shard is written by a drain process (``shard/drain.py``), for test_drain_process.

    python drain_child.py SAVE_DIR RUN_ID POINTS THREADS MODE

MODE: ``end`` (end_run), ``kill-rank`` (SIGKILL itself once the points are logged),
``kill-drain`` (SIGKILL the drain process first, then log and end_run), ``fork`` (a forked
child exits while the parent logs, then end_run), ``flush-loop`` (print the JSON line, then log
and flush, each flush a request to the drain process, until a signal ends it). Prints one JSON
line before the end.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading

import prov4ml_dist as prov4ml

save, run_id, points, threads, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
prov4ml.start_run(experiment_name="drain", provenance_save_dir=save, run_id=run_id, sample_interval=None)
writer = prov4ml.get_active_run().writer
drain_pid = writer._drain.process.pid if writer._drain is not None else None  # start_run waited for it
if mode == "kill-drain":
    os.kill(drain_pid, signal.SIGKILL)
    writer._drain.process.wait()
if mode == "fork":
    child = os.fork()
    if child == 0:
        os._exit(0)
    os.waitpid(child, 0)


if mode == "flush-loop":
    print(json.dumps({"drain_pid": drain_pid, "shard": str(prov4ml.get_active_run().shard_path)}), flush=True)
    step = 0
    while True:
        prov4ml.log_metric("t0", float(step), prov4ml.Context.TRAINING, step=step)
        writer.flush()
        step += 1


def log(t: int) -> None:
    for step in range(points // threads):
        prov4ml.log_metric(f"t{t}", float(step), prov4ml.Context.TRAINING, step=step)


workers = [threading.Thread(target=log, args=(t,)) for t in range(threads)]
for w in workers:
    w.start()
for w in workers:
    w.join()
prov4ml.log_param("logged", points)
print(json.dumps({"drain_pid": drain_pid, "shard": str(prov4ml.get_active_run().shard_path)}), flush=True)
if mode == "kill-rank":
    os.kill(os.getpid(), signal.SIGKILL)
prov4ml.end_run()
