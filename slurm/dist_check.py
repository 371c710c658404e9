#!/usr/bin/env python3
"""Check that a Slurm template starts a working torch.distributed (and MPI) job.

Point any template at it before training: ``TRAIN_SCRIPT=slurm/dist_check.py sbatch slurm/<template>``.
Every process prints one line, ``DIST_CHECK {json}``, with who it is (RANK, WORLD_SIZE,
LOCAL_RANK, SLURM_PROCID, SLURM_NODEID, host...) and the result of an all_reduce of
``rank + 1`` over all processes (must be ``n (n + 1) / 2``); the exit status is non-zero
when the sum is wrong. The test suite (tests/test_slurm.py) runs the templates with it.

Where the rank comes from, the first that applies:
  * torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK)              -> "torchrun"
  * ``--mpi``: mpi4py's COMM_WORLD (also checks an MPI allreduce)    -> "mpi"
  * a Slurm task: SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID          -> "slurm"
torch.distributed is initialised with ``env://`` (MASTER_ADDR, MASTER_PORT from the
environment) and NCCL when this process has a GPU, else gloo.

Options: ``--mpi``; ``--out DIR`` also writes rank-<rank>.json there;
``--fail-rank R`` makes rank R exit with status 3 after the check (to test what happens
when training fails, e.g. that the post-job merge still runs); ``--no-torch`` skips
torch.distributed (MPI-only check); ``--touch-shard`` writes a placeholder file where
prov4ml_dist would put this rank's shard (``$PROV4ML_LOCAL_DIR`` if set, else
``$PROV4ML_PROV_DIR``, then ``<experiment>/<run id>/shards/``), to check the templates'
stage-out and merge plumbing without the library. Everything is written before the
final barrier, so a failing rank cannot cut the others short.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time


def _int_env(*names: str, default: int = 0) -> int:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            return int(value)
    return default


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mpi", action="store_true", help="ranks from mpi4py's COMM_WORLD")
    parser.add_argument("--no-torch", action="store_true", help="skip the torch.distributed check")
    parser.add_argument("--out", help="also write rank-<rank>.json into this directory")
    parser.add_argument("--fail-rank", type=int, default=None, help="this rank exits with status 3")
    parser.add_argument("--touch-shard", action="store_true",
                        help="write a placeholder where this rank's shard would go")
    parser.add_argument("--timeout", type=float, default=120.0, help="torch.distributed init timeout (s)")
    args = parser.parse_args(argv)

    info: dict = {}
    mpi_comm = None
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        launcher = "torchrun" if "TORCHELASTIC_RUN_ID" in os.environ else "env"
        rank, world = _int_env("RANK"), _int_env("WORLD_SIZE", default=1)
        local_rank = _int_env("LOCAL_RANK")
    elif args.mpi:
        from mpi4py import MPI

        mpi_comm = MPI.COMM_WORLD
        launcher = "mpi"
        rank, world = mpi_comm.Get_rank(), mpi_comm.Get_size()
        local_rank = mpi_comm.Split_type(MPI.COMM_TYPE_SHARED).Get_rank()
        info["mpi_sum"] = mpi_comm.allreduce(rank + 1)
        info["mpi_library"] = MPI.Get_library_version().splitlines()[0].strip()
    elif "SLURM_PROCID" in os.environ:
        launcher = "slurm"
        rank, world = _int_env("SLURM_PROCID"), _int_env("SLURM_NTASKS", "SLURM_NPROCS", default=1)
        local_rank = _int_env("SLURM_LOCALID")
    else:
        launcher = "single"
        rank, world, local_rank = 0, 1, 0
        if "MASTER_PORT" not in os.environ:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(sock.getsockname()[1]))

    expected = world * (world + 1) // 2
    ok = info.get("mpi_sum", expected) == expected
    dist = None
    if not args.no_torch:
        import datetime

        import torch
        import torch.distributed as dist

        use_cuda = torch.cuda.is_available() and torch.cuda.device_count() > 0
        backend = "nccl" if use_cuda else "gloo"
        device = torch.device("cpu")
        if use_cuda:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
            torch.cuda.set_device(device)
        t0 = time.time()
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=args.timeout))
        tensor = torch.tensor([float(rank + 1)], device=device)
        dist.all_reduce(tensor)
        info.update(backend=backend, torch_sum=int(tensor.item()), init_s=round(time.time() - t0, 3),
                    device=str(device))
        ok = ok and info["torch_sum"] == expected

    env = os.environ
    info.update(
        launcher=launcher, rank=rank, world_size=world, local_rank=local_rank, expected_sum=expected, ok=ok,
        host=socket.gethostname(), pid=os.getpid(),
        env={k: env.get(k) for k in (
            "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "TORCHELASTIC_RUN_ID",
            "MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_PROCID", "SLURM_NTASKS",
            "SLURM_LOCALID", "SLURM_NODEID", "SLURMD_NODENAME", "SLURM_GPUS_ON_NODE", "CUDA_VISIBLE_DEVICES",
            "PMI_RANK", "PMI_SIZE", "PROV4ML_PROV_DIR", "PROV4ML_EXPERIMENT", "PROV4ML_RUN_ID",
            "PROV4ML_LOCAL_DIR")},
    )
    if args.touch_shard:
        root = env.get("PROV4ML_LOCAL_DIR") or env.get("PROV4ML_PROV_DIR") or "prov"
        shards = os.path.join(root, env.get("PROV4ML_EXPERIMENT", "experiment"),
                              env.get("PROV4ML_RUN_ID", "run"), "shards")
        os.makedirs(shards, exist_ok=True)
        info["shard"] = os.path.join(shards, f"placeholder-rank{rank:05d}.txt")
        with open(info["shard"], "w") as fh:
            fh.write(f"dist_check placeholder for rank {rank}\n")
    line = "DIST_CHECK " + json.dumps(info, sort_keys=True) + "\n"
    # One write() per line, so lines of processes sharing a pipe do not interleave.
    os.write(sys.stdout.fileno(), line.encode())
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, f"rank-{rank}.json")
        with open(path + ".tmp", "w") as fh:
            json.dump(info, fh, sort_keys=True)
        os.replace(path + ".tmp", path)
    if dist is not None:
        dist.barrier()
        dist.destroy_process_group()
    elif mpi_comm is not None:
        mpi_comm.Barrier()
    if not ok:
        print(f"dist_check: rank {rank}: wrong all_reduce sum (expected {expected}): {info}", file=sys.stderr)
        return 1
    if args.fail_rank is not None and rank == args.fail_rank:
        print(f"dist_check: rank {rank}: failing on purpose (--fail-rank)", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
