"""Many signals at random moments into ranks that log (and flush) all the time.

    python sigterm_trials.py SAVE_DIR TRIALS PARALLEL SEED [SIGNAL [FLUSH_EVERY]]

SIGNAL defaults to SIGTERM, FLUSH_EVERY (rows between the logging thread's own flushes; 0 for
none) to 64.

Imports once, then forks PARALLEL children at a time (no import cost per trial). Each child
starts a run with a 0.05 s flush interval, its shard written by a drain process in even trials
and by its flusher thread in odd ones (``PROV4ML_DRAIN_PROCESS``), and flushes in its logging thread every FLUSH_EVERY
points (as ``end_run`` or a user's flush would) while the flusher thread keeps competing for the flush
lock, and logs a counter (step = value = 0, 1, 2, ...) in a tight loop, publishing each
accepted step in shared memory. The driver sends it SIGNAL at a random moment and waits at
most HANG_S for it to die; one that does not is a hang, SIGKILLed. Prints one JSON line per
trial: exit status, hung, the moment the signal was sent, how many points the child had
logged by then, the drain setting and the shard's path.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import sys
import time
from typing import Any

import prov4ml_dist as prov4ml
from prov4ml_dist import api
from prov4ml_dist.shard import drain

HANG_S = 20.0
FLUSH_S = 0.05


def child(save_dir: str, run_id: str, ready_fd: int, logged: Any, flush_every: int, mode: str) -> None:
    os.environ[drain.ENV] = mode
    prov4ml.start_run(experiment_name="sigterm", provenance_save_dir=save_dir, run_id=run_id,
                      flush_interval=FLUSH_S, sample_interval=None)
    writer = api.get_active_run().writer
    step = 0
    while True:
        prov4ml.log_metric("n", float(step), prov4ml.Context.TRAINING, step=step)
        step += 1
        if flush_every and step % flush_every == 0:  # the logging thread's own flush: a signal may land inside it
            writer.flush()
        logged.value = step
        if step == 1000:
            os.write(ready_fd, b"r")
            os.close(ready_fd)


def mode(trial: int) -> str:
    return "on" if trial % 2 == 0 else "off"


def wait_dead(pid: int, deadline: float) -> int | None:
    """The exit status, or None when the process is still alive at ``deadline``."""
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            return None
        time.sleep(0.01)


def main() -> None:
    save_dir, trials, parallel, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    signum = signal.Signals[sys.argv[5]] if len(sys.argv) > 5 else signal.SIGTERM
    flush_every = int(sys.argv[6]) if len(sys.argv) > 6 else 64
    rng = random.Random(seed)
    for first in range(0, trials, parallel):
        batch = []
        for trial in range(first, min(first + parallel, trials)):
            read_fd, write_fd = os.pipe()
            logged = multiprocessing.RawValue("q", 0)  # shared with the child through the fork
            pid = os.fork()
            if pid == 0:
                os.close(read_fd)
                try:
                    child(save_dir, f"t{trial:04d}", write_fd, logged, flush_every, mode(trial))
                finally:
                    os._exit(3)
            os.close(write_fd)
            batch.append((trial, pid, read_fd, logged))
        for trial, pid, read_fd, logged in batch:
            os.read(read_fd, 1)
            os.close(read_fd)
            time.sleep(rng.uniform(0.0, 0.1))
            sent, logged_before = time.time(), logged.value
            os.kill(pid, signum)
            code = wait_dead(pid, time.monotonic() + HANG_S)
            hung = code is None
            if hung:
                os.kill(pid, signal.SIGKILL)
                code = wait_dead(pid, time.monotonic() + HANG_S)
            print(json.dumps({"trial": trial, "code": code, "hung": hung, "sent": sent,
                              "logged_before": logged_before, "drain": mode(trial),
                              "shard": f"{save_dir}/sigterm/t{trial:04d}/shards/rank-00000.h5"}), flush=True)


if __name__ == "__main__":
    main()
