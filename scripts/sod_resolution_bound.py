"""How much does predicting at a low resolution cost on a salient-object set, at best? Each
ground-truth mask is resized down to N x N (antialiased) and back to full size (bilinear), as
`segcore evaluate` does with a model trained at `--resize N`, and scored as a prediction.

    python scripts/sod_resolution_bound.py [DATA] [STEMS] [SIZES]
    python scripts/sod_resolution_bound.py /work/shared/datasets/ecssd-sod 0251-0300 64,96,112,144
"""

from __future__ import annotations

import sys

import numpy as np
import torch
import torch.nn.functional as F

from segcore.training.data import load_folder
from segcore.training.metrics import max_f


def main() -> None:
    data = sys.argv[1] if len(sys.argv) > 1 else "/work/shared/datasets/ecssd-sod"
    stems = sys.argv[2] if len(sys.argv) > 2 else "0251-0300"
    sizes = [int(v) for v in (sys.argv[3] if len(sys.argv) > 3 else "64,96,112,144").split(",")]
    samples = load_folder(data, stems, "binary")
    for n in sizes:
        probs = []
        for s in samples:
            m = torch.from_numpy(s.mask.astype(np.float32))[None, None]
            lo = F.interpolate(m, size=(n, n), mode="bilinear", antialias=True,
                               align_corners=False)
            up = F.interpolate(lo, size=m.shape[2:], mode="bilinear", align_corners=False)
            probs.append(up[0, 0].numpy())
        mf, _ = max_f([s.mask for s in samples], probs)
        mae = np.mean([np.abs(p - s.mask).mean() for p, s in zip(probs, samples, strict=True)])
        print(f"{n} px: maxF {mf:.4f}  MAE {mae:.4f}")


if __name__ == "__main__":
    main()
