"""A run whose process forks children that try to log: the subject of tests/test_processes.py.

    python fork_children.py SAVE_DIR RUN_ID MODE [POINTS_PER_ITEM]

MODE ``dataloader``: a torch DataLoader (2 workers, fork) whose dataset logs POINTS_PER_ITEM
points per item from ``__getitem__``; ``helpers``: an ``os.fork`` child that logs and leaves
through ``sys.exit`` (atexit runs), and a ``multiprocessing`` fork child that logs and is
``terminate()``d (SIGTERM), then a spawn ``multiprocessing.Pool`` whose tasks try to log
(they have no run: each gets ``RunStateError``). The parent logs ``parent`` 0, 1, 2, ... throughout, calls
``end_run`` and prints one JSON line: what it logged, what end_run returned, the children's
exit codes and refused-call counts.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time

import prov4ml_dist as prov4ml
from prov4ml_dist import api

TRAIN = prov4ml.Context.TRAINING
step = 0


def log_parent(n: int) -> None:
    global step
    for _ in range(n):
        prov4ml.log_metric("parent", float(step), TRAIN, step=step)
        step += 1


points_per_item = 3


def log_in_child(n: int) -> int:
    """What a child does: log n points and a param; returns its refused-call count."""
    for i in range(n):
        prov4ml.log_metric("child", float(i), TRAIN, step=i)
    prov4ml.log_param("child_param", os.getpid())
    return api.refused_calls()


def dataloader() -> dict:
    import torch
    from torch.utils.data import DataLoader, Dataset

    class Logging(Dataset):
        def __len__(self) -> int:
            return 32

        def __getitem__(self, index: int) -> torch.Tensor:
            return torch.tensor([index, log_in_child(points_per_item)])

    loader = DataLoader(Logging(), batch_size=2, num_workers=2, multiprocessing_context="fork")
    refused = []
    for _epoch in range(2):
        for batch in loader:
            refused.append(int(batch[:, 1].max()))
            log_parent(500)
    return {"max_refused": max(refused)}


def sleep_forever() -> None:
    log_in_child(points_per_item)
    print("child ready", flush=True)
    while True:
        time.sleep(0.01)


def helpers() -> dict:
    pid = os.fork()
    if pid == 0:
        log_in_child(points_per_item)
        sys.exit(0)  # atexit and the interpreter's teardown run in the child
    _, status = os.waitpid(pid, 0)
    log_parent(1000)
    child = multiprocessing.get_context("fork").Process(target=sleep_forever)
    child.start()
    time.sleep(1.0)
    child.terminate()
    child.join(30)
    return {"sys_exit_status": os.waitstatus_to_exitcode(status), "terminated_exitcode": child.exitcode,
            **spawned()}


def try_to_log(n: int) -> str:
    """A spawned child re-imports everything: no run, so a clear error, and no file touched."""
    try:
        log_in_child(n)
    except prov4ml.RunStateError as exc:
        return type(exc).__name__
    return "logged"


def spawned() -> dict:
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        outcomes = pool.map(try_to_log, [points_per_item] * 4)
    return {"spawned": outcomes}


if __name__ == "__main__":
    save_dir, run_id, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    points_per_item = int(sys.argv[4]) if len(sys.argv) > 4 else 3
    prov4ml.start_run(experiment_name="forks", provenance_save_dir=save_dir, run_id=run_id, flush_interval=0.2,
                      sample_interval=None)
    log_parent(1000)
    result = dataloader() if mode == "dataloader" else helpers()
    log_parent(1000)
    prov_json = prov4ml.end_run()
    print(json.dumps({"logged": step, "prov_json": str(prov_json) if prov_json else None, **result}), flush=True)
