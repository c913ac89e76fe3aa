"""Where a membrane model's pixel errors are: false positives, misses, and how many sit on the
one-pixel band either side of a true membrane edge; plus the pixel error at a few thresholds.

    python scripts/isbi_error_split.py CKPT [STEMS]      # STEMS default 25-29; 0-24 = training

Used for docs/RESULTS.md (ISBI 2012, membrane = class 1 via class map 0:1,255:0).
"""

from __future__ import annotations

import sys

import numpy as np
import torch
from scipy import ndimage

from segcore.io.uri import read_bytes
from segcore.models.checkpoint import read_checkpoint
from segcore.models.registry import build_model
from segcore.training.data import load_folder
from segcore.training.predict import predict_image

DATA = "/work/shared/datasets/isbi2012-em-membrane/train"


def main() -> None:
    uri, stems = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "25-29"
    torch.set_num_threads(1)
    ckpt, tensors = read_checkpoint(read_bytes(uri), uri)
    model = build_model(ckpt.spec)
    model.load_state_dict(tensors)
    model.eval()
    samples = load_folder(DATA, stems, {0: 1, 255: 0})
    fp = fn = band = total = 0
    probs = []
    for s in samples:
        y = s.mask > 0
        p = predict_image(model, s.image, ckpt.contract.normalization)
        probs.append(p)
        e = (p >= 0.5) != y
        edge = ndimage.binary_dilation(y) ^ ndimage.binary_erosion(y)
        fp, fn = fp + (e & ~y).sum(), fn + (e & y).sum()
        band, total = band + (e & edge).sum(), total + y.size
    print(f"stems {stems}: pixel error {(fp + fn) / total:.4f} = false positives "
          f"{fp / total:.4f} + misses {fn / total:.4f}; on the edge band {band / total:.4f}")
    for th in (0.4, 0.5, 0.6, 0.7):
        err = np.mean([np.mean((p >= th) != (s.mask > 0))
                       for p, s in zip(probs, samples, strict=True)])
        print(f"threshold {th}: pixel error {err:.4f}")


if __name__ == "__main__":
    main()
