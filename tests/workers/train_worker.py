"""One rank of an end-to-end test: trains a tiny model and records its provenance.

    train_worker.py SAVE_DIR RESULTS_DIR [--local-dir-base DIR] [--exit-before-end RANK]
                    [--merge-timeout S] [--steps N] [--big-mib N] [--clock-offset RANK:SECONDS]

Under torchrun the ranks train with DDP over gloo; under mpiexec they average their weights
with mpi4py, so the model versions are the same on every rank either way. Every rank logs
``loss`` and ``rank_value`` (= rank * 1000 + step) at every step, params, a config artifact
that is identical on all ranks, a per-rank artifact, a per-rank 5 MiB file (more than one
stream chunk; ``--big-mib`` sets its size), and a model version every 5 steps.
``--local-dir-base``: each rank keeps its files in a private directory under it (no shared
filesystem). ``--clock-offset``: that rank's wall clock is SECONDS off (see ``skew_clock``).
Writes RESULTS_DIR/rank-N.json with what end_run returned and how long it took.
"""

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path


def skew_clock(argv: list[str]) -> None:
    """``--clock-offset RANK:SECONDS``: on that rank, ``time.time`` and ``time.time_ns`` run
    SECONDS off, as on a node whose clock is set wrong (monotonic clocks are untouched, as
    there). Done before anything else is imported, so every module, prov4ml_dist's binding of
    ``time.time`` at import included, reads the skewed clock."""
    if "--clock-offset" not in argv:
        return
    rank, seconds = argv[argv.index("--clock-offset") + 1].split(":")
    if os.environ.get("RANK", os.environ.get("PMI_RANK")) != rank:
        return
    offset, real, real_ns = float(seconds), time.time, time.time_ns
    time.time = lambda: real() + offset
    time.time_ns = lambda: real_ns() + int(offset * 1e9)


skew_clock(sys.argv)

import torch  # noqa: E402 - after skew_clock, so torch sees the same clock as the rest
from torch import nn  # noqa: E402

import prov4ml_dist as prov4ml  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("save_dir")
    p.add_argument("results")
    p.add_argument("--local-dir-base")
    p.add_argument("--exit-before-end", type=int)
    p.add_argument("--merge-timeout", type=float, default=60.0)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--big-mib", type=int, default=5)
    p.add_argument("--clock-offset")
    args = p.parse_args()
    torch.manual_seed(0)
    model = nn.Linear(8, 2)
    if "TORCHELASTIC_RUN_ID" in os.environ:
        import torch.distributed as dist

        dist.init_process_group("gloo")
        rank, trained, average = dist.get_rank(), nn.parallel.DistributedDataParallel(model), None
    else:
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
        rank, trained = comm.Get_rank(), model

        def average() -> None:
            for param in model.parameters():
                buf = param.data.numpy().copy()
                comm.Allreduce(MPI.IN_PLACE, buf)
                param.data.copy_(torch.from_numpy(buf / comm.Get_size()))

    local_dir = Path(args.local_dir_base) / f"rank-{rank}" if args.local_dir_base else None
    prov4ml.start_run(experiment_name="e2e", provenance_save_dir=args.save_dir, local_dir=local_dir,
                      merge_timeout=args.merge_timeout, sample_interval=None, flush_interval=0.2)
    prov4ml.log_param("lr", 0.1)
    prov4ml.log_param("rank", rank)
    prov4ml.log_artifact("config.json", {"lr": 0.1, "steps": args.steps}, prov4ml.Context.TRAINING)
    prov4ml.log_artifact("per-rank.json", {"rank": rank}, prov4ml.Context.TRAINING)
    big = Path(args.results) / f"big-{rank}.bin"
    big.write_bytes(random.Random(rank).randbytes(args.big_mib << 20))
    prov4ml.log_artifact(str(big), str(big), prov4ml.Context.TRAINING)

    optimizer = torch.optim.SGD(trained.parameters(), lr=0.1)
    data = torch.Generator().manual_seed(rank)
    for step in range(args.steps):
        x = torch.randn(16, 8, generator=data)
        loss = nn.functional.cross_entropy(trained(x), (x[:, 0] > 0).long())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if average is not None:
            average()
        prov4ml.log_metric("loss", loss.item(), prov4ml.Context.TRAINING, step=step)
        prov4ml.log_metric("rank_value", rank * 1000 + step, prov4ml.Context.TRAINING, step=step)
        if step % 5 == 4:
            prov4ml.save_model_version(model, "tiny", prov4ml.Context.TRAINING, step=step)

    if rank == args.exit_before_end:
        sys.exit(0)  # no end_run: its shard is closed by the exit hooks, never handed in
    start = time.monotonic()
    prov_json = prov4ml.end_run()
    result = {"rank": rank, "prov_json": str(prov_json) if prov_json else None,
              "end_seconds": time.monotonic() - start, "wall_clock": time.time()}
    (Path(args.results) / f"rank-{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
