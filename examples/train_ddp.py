"""A small distributed training job that records its provenance with prov4ml_dist.

Runs under torchrun, srun (one task per GPU/CPU), mpiexec, or as a single process:

    torchrun --standalone --nproc_per_node=2 examples/train_ddp.py --out prov
    srun -n 4 python examples/train_ddp.py --out prov        # MASTER_ADDR/PORT exported
    mpiexec -n 2 python examples/train_ddp.py --out prov     # weights averaged with mpi4py

Every rank calls the same prov4ml functions; rank 0 prints the merged prov.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import prov4ml_dist as prov4ml


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                epilog="Defaults come from PROV4ML_PROV_DIR, PROV4ML_EXPERIMENT, PROV4ML_RUN_ID and "
                                       "PROV4ML_LOCAL_DIR when set (the sbatch templates in slurm/ set them).")
    env = os.environ.get
    p.add_argument("--out", default=env("PROV4ML_PROV_DIR", "prov"), help="provenance_save_dir")
    p.add_argument("--experiment", default=env("PROV4ML_EXPERIMENT", "demo"))
    p.add_argument("--run-id", default=env("PROV4ML_RUN_ID"), help="default: derived from the launcher")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--samples", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--local-dir", default=env("PROV4ML_LOCAL_DIR"),
                   help="node-local directory for shards and artifacts (no shared filesystem)")
    p.add_argument("--private-local-dir", action="store_true",
                   help="give each rank its own subdirectory of --local-dir (simulates node-local disks "
                        "on one machine)")
    p.add_argument("--backend", default=None,
                   help="torch.distributed backend (default: nccl where CUDA is available, else gloo; gloo lets "
                        "several ranks share one GPU)")
    p.add_argument("--sample-interval", type=float, default=0.5)
    p.add_argument("--merge-timeout", type=float, default=120.0)
    p.add_argument("--exit-before-end-rank", type=int, default=None,
                   help="this rank exits without end_run (failure drills)")
    return p.parse_args()


def setup_distributed(backend: str | None) -> tuple[int, int, object | None]:
    """torch.distributed from torchrun/srun variables (also at world size 1, so a 1-GPU job
    exercises NCCL), or mpi4py under mpiexec; else single."""
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ and "MASTER_ADDR" in os.environ:
        os.environ.update(RANK=os.environ["SLURM_PROCID"], WORLD_SIZE=os.environ["SLURM_NTASKS"],
                          LOCAL_RANK=os.environ.get("SLURM_LOCALID", "0"))
    if "RANK" in os.environ and "MASTER_ADDR" in os.environ:
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            # Modulo: with `srun --gpus-per-task=1` every task sees only its own GPU, as cuda:0.
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        dist.init_process_group(backend)
        return dist.get_rank(), dist.get_world_size(), None
    if "PMI_RANK" in os.environ or "OMPI_COMM_WORLD_RANK" in os.environ:
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
        return comm.Get_rank(), comm.Get_size(), comm
    return 0, 1, None


def make_data(n: int) -> TensorDataset:
    """A fixed synthetic classification task: every rank builds the same data."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 16, generator=g)
    y = (x[:, :4].sum(dim=1) > 0).long()
    return TensorDataset(x, y)


def training_device() -> torch.device:
    """This rank's GPU (set by setup_distributed), else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def average_weights(model: nn.Module, comm) -> None:
    """MPI jobs: average parameters across ranks after each epoch."""
    from mpi4py import MPI

    for p in model.parameters():
        buf = p.data.cpu().numpy().copy()
        comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        p.data.copy_(torch.from_numpy(buf / comm.Get_size()).to(p.dtype))


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    rank, world, comm = setup_distributed(args.backend)
    local_dir = Path(args.local_dir) if args.local_dir else None
    if local_dir is not None and args.private_local_dir:
        local_dir /= f"rank-{rank}"
    run_dir = prov4ml.start_run(prov_user_namespace="http://example.org/demo/", experiment_name=args.experiment,
                                provenance_save_dir=args.out, local_dir=local_dir, run_id=args.run_id,
                                sample_interval=args.sample_interval, merge_timeout=args.merge_timeout)
    prov4ml.log_params({"lr": args.lr, "batch_size": args.batch_size, "epochs": args.epochs, "world_size": world})

    data = make_data(args.samples)
    train, val = torch.utils.data.random_split(data, [0.8, 0.2], generator=torch.Generator().manual_seed(1))
    sampler = DistributedSampler(train, num_replicas=world, rank=rank, shuffle=True, seed=0)
    loader = DataLoader(train, batch_size=args.batch_size, sampler=sampler)
    prov4ml.log_dataset(loader, "train")
    prov4ml.log_dataset(val, "validation")

    device = training_device()
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 2)).to(device)
    on_gpu = [device] if device.type == "cuda" else None
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=on_gpu) if dist.is_initialized() else model
    opt = torch.optim.SGD(ddp.parameters(), lr=args.lr)
    loss_fn = nn.CrossEntropyLoss()

    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "config.json"
        config.write_text(json.dumps(vars(args), sort_keys=True))  # identical on every rank
        prov4ml.log_artifact("config.json", config, prov4ml.Context.TRAINING)
        rank_note = Path(tmp) / "rank_note.txt"
        rank_note.write_text(f"rank {rank} of {world}\n")  # differs per rank
        prov4ml.log_artifact("rank_note.txt", rank_note, prov4ml.Context.TRAINING)

    step = 0
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        ddp.train()
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            opt.zero_grad()
            loss = loss_fn(ddp(x), y)
            loss.backward()
            opt.step()
            prov4ml.log_metric("loss", loss.item(), prov4ml.Context.TRAINING, step=step)
            step += 1
        if comm is not None:
            average_weights(model, comm)
        ddp.eval()
        with torch.no_grad():
            xv, yv = (t.to(device) for t in val[:])
            logits = model(xv)
            prov4ml.log_metric("val_loss", loss_fn(logits, yv).item(), prov4ml.Context.VALIDATION, step=epoch)
            acc = (logits.argmax(dim=1) == yv).float().mean()
            prov4ml.log_metric("val_acc", acc, prov4ml.Context.VALIDATION, step=epoch)
        prov4ml.save_model_version(model, "mlp", prov4ml.Context.TRAINING, step=epoch)

    if args.exit_before_end_rank == rank:
        print(f"rank {rank}: exiting without end_run", flush=True)
        os._exit(3)
    prov4ml.log_model(model, "mlp")
    prov_json = prov4ml.end_run()
    if rank == 0:
        print(f"run directory: {run_dir}")
        print(f"merged provenance: {prov_json}")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
