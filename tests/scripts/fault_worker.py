"""One rank of a fault-injection trial: logs through the public API, without importing torch
(so a trial costs about a second), and fails the way it is told to.

    fault_worker.py SAVE_DIR [--run-id ID] [--seconds S] [--victim R --hang] ...

Prints ``ready`` once ``start_run`` returned and the first point is logged, then logs
``loss`` (value = step) in batches of 50 with a ``--pause`` between them: forever, or for
``--seconds`` and then ``end_run``. The faults (``--hang``, ``--fail-attempt``,
``--kill-self-after``) strike rank ``--victim`` only. At the end it prints one JSON line:
``{"logged": points, "end_run_s": seconds end_run took, "prov_json": ...}``. The rank, world
size and launcher come from the environment, as in a real job.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import sys
import threading
import time
from pathlib import Path

import prov4ml_dist as prov4ml

BATCH = 50
FAIL_AFTER_S = 0.3


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("save_dir")
    p.add_argument("--run-id")
    p.add_argument("--flush-interval", type=float, default=0.1)
    p.add_argument("--merge-timeout", type=float, default=5.0)
    p.add_argument("--seconds", type=float, help="log this long, then end_run (default: until killed)")
    p.add_argument("--pause", type=float, default=0.001, help="seconds between batches of 50 points")
    p.add_argument("--victim", type=int, default=0, help="the rank the faults below strike")
    p.add_argument("--hang", action="store_true", help="never call end_run")
    p.add_argument("--fail-attempt", type=int, help="exit 1 after FAIL_AFTER_S of logging on this restart count")
    p.add_argument("--kill-self-after", type=float, help="SIGKILL itself this long after ready")
    p.add_argument("--user-sigterm", choices=("before", "after"),
                   help="install our own SIGTERM handler before or after start_run; it exits 143")
    p.add_argument("--fill-disk", action="store_true",
                   help="fill the save dir's file system, log until a flush fails, free it, log on")
    p.add_argument("--fsize-limit", type=int, help="RLIMIT_FSIZE in bytes (writes beyond fail with EFBIG)")
    p.add_argument("--import-torch", action="store_true", help="import torch.distributed before start_run")
    return p.parse_args()


def user_handler(signum: int, frame: object) -> None:
    print("user handler called", flush=True)
    sys.exit(143)


def log_for(seconds: float | None, step: int, pause: float, until=None) -> int:
    """Log ``loss`` from ``step`` on for ``seconds`` (None: forever) or until ``until()``."""
    deadline = None if seconds is None else time.monotonic() + seconds
    while (deadline is None or time.monotonic() < deadline) and not (until and until()):
        for _ in range(BATCH):
            prov4ml.log_metric("loss", float(step), prov4ml.Context.TRAINING, step=step)
            step += 1
        time.sleep(pause)
    return step


def fill(directory: Path) -> Path:
    """A file that takes every free byte of ``directory``'s file system."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as out:
        try:
            while True:
                out.write(b"\0" * 4096)
        except OSError:
            pass
    return filler


def main() -> None:
    args = parse_args()
    if args.fsize_limit is not None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (args.fsize_limit, args.fsize_limit))
    if args.import_torch:
        import torch.distributed  # noqa: F401 - the timing of end_run should not include it
    if args.user_sigterm == "before":
        signal.signal(signal.SIGTERM, user_handler)
    prov4ml.start_run(experiment_name="faults", provenance_save_dir=args.save_dir, run_id=args.run_id,
                      flush_interval=args.flush_interval, sample_interval=None, merge_timeout=args.merge_timeout)
    if args.user_sigterm == "after":
        signal.signal(signal.SIGTERM, user_handler)
    prov4ml.log_param("lr", 0.1)
    prov4ml.log_metric("loss", 0.0, prov4ml.Context.TRAINING, step=0)
    print("ready", flush=True)
    victim = int(os.environ.get("RANK", "0")) == args.victim
    if victim and args.kill_self_after is not None:
        threading.Timer(args.kill_self_after, os.kill, (os.getpid(), signal.SIGKILL)).start()
    step = 1
    if args.fill_disk:
        filler = fill(Path(args.save_dir))
        writer = prov4ml.get_active_run().writer
        # A drain process reports its failures with each flush's reply: ask for one per batch.
        step = log_for(30.0, step, args.pause, until=lambda: writer.flush() or writer.failure_count > 0)
        filler.unlink()
    if victim and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == str(args.fail_attempt):
        step = log_for(FAIL_AFTER_S, step, args.pause)
        print(json.dumps({"logged": step, "failed": True}), flush=True)
        sys.exit(1)
    step = log_for(args.seconds, step, args.pause)
    if victim and args.hang:
        print(json.dumps({"logged": step, "hanging": True}), flush=True)
        while True:
            time.sleep(1)
    started = time.monotonic()
    prov_json = prov4ml.end_run()
    print(json.dumps({"logged": step, "end_run_s": time.monotonic() - started,
                      "prov_json": str(prov_json) if prov_json else None}), flush=True)


if __name__ == "__main__":
    main()
