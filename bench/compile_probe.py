"""When does ``--compile`` pay? One U-Net window through segcore's predictor, eager and under
torch.compile: the first call (which compiles, once per window shape) and the best of two more.

    taskset -c 1 .venv/bin/python -m bench.compile_probe MODEL.safetensors [SIDE]
"""

from __future__ import annotations

import sys
import time

import numpy as np


def main(model: str, side: int = 512) -> None:
    from segcore.inference import get_predictor

    raw = np.random.default_rng(0).integers(0, 255, (1, side, side, 3)).astype(np.uint8)
    for comp in (False, True):
        p = get_predictor(model, "cpu", "none", compile=comp)
        t = time.perf_counter()
        p.predict_raw(raw)
        first = time.perf_counter() - t
        ts = []
        for _ in range(2):
            t = time.perf_counter()
            p.predict_raw(raw)
            ts.append(time.perf_counter() - t)
        print("compile" if comp else "eager", "first", round(first, 2), "then", round(min(ts), 3))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 512)
