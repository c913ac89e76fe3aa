"""Seconds per step of a 2-rank gloo DDP u2netp training loop (4 x 64 x 64 per rank, one thread
per rank), outside Dask, to separate the cost of DDP from the cost of the worker environment.

    python scripts/bench_ddp_step.py ddp                              # DDP
    python scripts/bench_ddp_step.py none                             # same two processes, no DDP
    MALLOC_TRIM_THRESHOLD_=65536 python scripts/bench_ddp_step.py ddp # what Dask's nanny sets

Measured (docs/RESULTS.md): 0.598 / 0.590 / 0.890 s per step on this 2-core machine.
"""

import os
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from segcore.config import ModelSpec
from segcore.models.registry import build_model


def main(rank: int, mode: str) -> None:
    torch.set_num_threads(1)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29533", rank=rank, world_size=2)
    model = build_model(ModelSpec(arch="u2netp"))
    net = torch.nn.parallel.DistributedDataParallel(model) if mode == "ddp" else model
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    x = torch.randn(4, 3, 64, 64)
    t = time.perf_counter()
    for i in range(25):
        if i == 5:  # 5 warm-up steps, then 20 timed
            t = time.perf_counter()
        loss = net(x).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    if rank == 0:
        print(f"{mode}: {(time.perf_counter() - t) / 20:.3f} s per step", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(main, args=(sys.argv[1] if len(sys.argv) > 1 else "ddp",), nprocs=2)
