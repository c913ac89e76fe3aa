"""What glibc's mmap threshold costs per window: ``python bench/heap_probe.py [--side 2048]``.

Times, in fresh processes (one torch thread), a fresh float32 (1, side, side, 3) tensor filled
in place, uint8 -> float32 in torch and in numpy, in the main thread and in two threads at
once, without and with :func:`segcore.memory.tune_heap`. Median of 9 per cell, in ms.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, threading, time
import numpy as np, torch
torch.set_num_threads(1)
sys.path.insert(0, {root!r})
if {tuned}:
    from segcore.memory import tune_heap
    assert tune_heap(), "no glibc mallopt here"
side = {side}
raw = np.random.default_rng(0).integers(0, 255, (1, side, side, 3), np.uint8)
x = torch.from_numpy(raw)

def med(f, n=9):
    ts = []
    for _ in range(n):
        t0 = time.perf_counter(); f(); ts.append(time.perf_counter() - t0)
    return round(float(np.median(ts)) * 1e3, 2)

def cells():
    with torch.inference_mode():
        return {{"fresh tensor, filled": med(lambda: torch.empty(x.shape).mul_(2)),
                 "torch uint8->float32": med(lambda: x.to(torch.float32)),
                 "numpy uint8->float32": med(lambda: raw.astype(np.float32))}}

out = {{"main thread": cells()}}
res = []
ths = [threading.Thread(target=lambda: res.append(cells())) for _ in range(2)]
[t.start() for t in ths]; [t.join() for t in ths]
out["two threads at once (slower of the two)"] = {{k: max(r[k] for r in res) for k in res[0]}}
print(json.dumps(out))
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--side", type=int, default=2048)
    args = ap.parse_args(argv)
    rows = {}
    for tuned in (False, True):
        code = CHILD.format(root=str(ROOT), tuned=tuned, side=args.side)
        res = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                             text=True)
        rows["tune_heap" if tuned else "glibc default"] = json.loads(res.stdout)
    print("| where | op | glibc default ms | tune_heap ms |\n|---|---|---|---|")
    base, tuned = rows["glibc default"], rows["tune_heap"]
    for where in base:
        for op in base[where]:
            print(f"| {where} | {op} | {base[where][op]} | {tuned[where][op]} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
