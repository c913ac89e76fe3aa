"""Seconds per training step (forward + backward + AdamW) for one model and input size.

    python scripts/bench_train_step.py --arch u2netp --size 128 --batch 4 --threads 1
    python scripts/bench_train_step.py --arch unet --kwargs '{"depth": 4, "width": 8}' \
        --size 256 --channels-last

Random data, 2 warm-up steps, then the mean of --steps timed steps. Pin it to an idle core
(taskset -c N) for figures that mean anything on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from segcore.config import ModelSpec
from segcore.models.registry import build_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="unet")
    p.add_argument("--kwargs", default="{}", help="model kwargs as JSON")
    p.add_argument("--channels", type=int, default=None, help="default: 1 for unet, 3 for u2*")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--channels-last", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    cin = a.channels or (3 if a.arch.startswith("u2") else 1)
    model = build_model(ModelSpec(arch=a.arch, in_channels=cin, out_channels=1,
                                  kwargs=json.loads(a.kwargs)))
    x = torch.randn(a.batch, cin, a.size, a.size)
    if a.channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters())

    def step() -> None:
        outs = model.forward_all(x) if hasattr(model, "forward_all") else [model(x)]
        loss = sum(o.float().mean() for o in outs)
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()
    step()
    t = time.perf_counter()
    for _ in range(a.steps):
        step()
    sec = (time.perf_counter() - t) / a.steps
    print(json.dumps({"arch": a.arch, "kwargs": json.loads(a.kwargs), "size": a.size,
                      "batch": a.batch, "threads": a.threads,
                      "channels_last": a.channels_last, "seconds_per_step": round(sec, 3)}))


if __name__ == "__main__":
    main()
