"""One rank of a hierarchical end-of-run merge test: logs metrics, params and artifacts, then end_run.

    hier_worker.py SAVE_DIR RESULTS_DIR [--node-local BASE] [--merge-timeout S] [--kill-in-part RANK]
                   [--exit-before-end RANK]

The emulated node is the topology's node rank (torchrun's agent's group rank; under mpiexec,
the SLURM_NODEID each group of ranks is started with, as Hydra inside an allocation gives it;
started by hand with RANK, WORLD_SIZE, LOCAL_RANK, GROUP_RANK and MASTER_ADDR/PORT, a gloo
process group).
``--node-local``: the ranks of node N keep their files in BASE/node-N (a node-local disk, no
shared filesystem). ``--kill-in-part``: that rank SIGKILLs itself once it starts writing its
node's part (a node leader lost mid-merge). ``--exit-before-end``: that rank leaves without
end_run. Writes RESULTS_DIR/rank-N.json.
"""

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

import prov4ml_dist as prov4ml
from prov4ml_dist import node_merge


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("save_dir")
    p.add_argument("results")
    p.add_argument("--node-local")
    p.add_argument("--merge-timeout", type=float, default=60.0)
    p.add_argument("--kill-in-part", type=int)
    p.add_argument("--exit-before-end", type=int)
    args = p.parse_args()
    if "MASTER_ADDR" in os.environ and "TORCHELASTIC_RUN_ID" not in os.environ:
        import torch.distributed as dist  # started by hand, as a launcher that leaves the others running would

        dist.init_process_group("gloo")
    elif "TORCHELASTIC_RUN_ID" not in os.environ:
        from mpi4py import MPI  # noqa: F401 - the program initialises MPI, as a training script under mpiexec does

    from prov4ml_dist.topology import detect

    topology = detect()
    rank, node = topology.rank, topology.node_rank
    if rank == args.kill_in_part:
        def killed(*_: object, **__: object) -> None:
            os.kill(os.getpid(), signal.SIGKILL)

        node_merge.write_part = killed
    local_dir = Path(args.node_local) / f"node-{node}" if args.node_local else None
    prov4ml.start_run(experiment_name="hier", provenance_save_dir=args.save_dir, local_dir=local_dir,
                      merge_timeout=args.merge_timeout, sample_interval=None, flush_interval=0.2)
    prov4ml.log_param("lr", 0.1 if rank != 3 else 0.2)
    prov4ml.log_artifact("config.json", {"lr": 0.1}, prov4ml.Context.TRAINING)
    prov4ml.log_artifact("per-rank.json", {"rank": rank}, prov4ml.Context.TRAINING)
    for step in range(300):
        prov4ml.log_metric("loss", 1.0 / (step + 1) + rank * 1e-3, prov4ml.Context.TRAINING, step=step)
        prov4ml.log_metric("rank_value", rank * 1000 + step, prov4ml.Context.TRAINING, step=step)
    if rank % 2:
        prov4ml.log_metric("odd_only", float(rank), prov4ml.Context.VALIDATION, step=0)
    if rank == args.exit_before_end:
        sys.exit(0)  # no end_run: its shard is closed by the exit hooks, never handed in
    start = time.monotonic()
    prov_json = prov4ml.end_run()
    (Path(args.results) / f"rank-{rank}.json").write_text(json.dumps({
        "rank": rank, "node": node, "prov_json": str(prov_json) if prov_json else None,
        "end_seconds": time.monotonic() - start}))


if __name__ == "__main__":
    main()
