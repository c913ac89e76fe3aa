"""Seeded growth: objects of a boundary-trained model grown back over the pixels it was taught
to leave out between touching objects.

A model trained with ``--class-map instances-borders`` labels the pixels where two objects
touch as background, so connected components of its interior class keep touching nuclei
apart but are each a little too small. :func:`grow` gives those seeds the pixels around them
back: a watershed on the probabilities limited to ``steps`` pixels. In each of ``steps``
rounds every unlabelled pixel (whose foreground probability is at least ``threshold``) that
touches a labelled pixel by an edge takes the label of the touching neighbour with the highest
foreground probability (on a tie, the first of above, left, right, below: a rule about places,
not ids, so any numbering of the objects grows alike), so the seed that is surer of itself
wins a contested pixel and objects never merge.

The rule is local: a pixel's label after ``steps`` rounds depends only on the pixels within
``steps`` of it, so a shard grown with a border of ``steps + 1`` pixels read from its
neighbours equals the same shard of the whole image grown at once (tested), the same
shard-plus-border scheme the instances use.
"""

from __future__ import annotations

import numpy as np


def foreground_u8(prob: np.ndarray, encoding: str = "uint8") -> np.ndarray:
    """Foreground probability as uint8 0-255 from the stored probabilities (K, h, w): the one
    channel of a sigmoid model, else 1 - P(background)."""
    p = prob[0] if prob.shape[0] == 1 else None
    if encoding == "uint8":
        return p.astype(np.uint8) if p is not None else (255 - prob[0]).astype(np.uint8)
    f = p.astype(np.float32) if p is not None else 1 - prob[0].astype(np.float32)
    return np.clip(np.rint(f * 255), 0, 255).astype(np.uint8)


def grow(seeds: np.ndarray, fg: np.ndarray, steps: int, threshold: float = 0.0,
         blocked: np.ndarray | None = None) -> np.ndarray:
    """``seeds`` (uint32 ids, 0 = none) grown ``steps`` pixels into unlabelled pixels with
    foreground probability ``fg`` (uint8 0-255) >= ``threshold`` (0-1) that are not
    ``blocked`` (e.g. nodata); see the module doc."""
    lab = np.ascontiguousarray(seeds, dtype=np.uint32).copy()
    if steps <= 0 or not lab.any():
        return lab
    allowed = fg >= np.uint8(min(255, int(np.ceil(threshold * 255)))) if threshold > 0 else None
    if blocked is not None and blocked.any():
        allowed = ~blocked if allowed is None else allowed & ~blocked
    prio = fg.astype(np.int16) * 4
    h, w = lab.shape
    for _ in range(steps):
        pl = np.zeros((h + 2, w + 2), np.uint32)
        pl[1:-1, 1:-1] = lab
        pk = np.full((h + 2, w + 2), -1, np.int16)
        pk[1:-1, 1:-1] = np.where(lab > 0, prio, -1)
        # the neighbours above, left, right, below; on equal probability the earlier wins
        # (a rule about places, not ids, so any numbering of the objects grows the same)
        sl = ((slice(None, -2), slice(1, -1)), (slice(1, -1), slice(None, -2)),
              (slice(1, -1), slice(2, None)), (slice(2, None), slice(1, -1)))
        keys = np.stack([np.where(pk[s] >= 0, pk[s] + (3 - i), -1) for i, s in enumerate(sl)])
        best = keys.argmax(0)
        take = (lab == 0) & (np.take_along_axis(keys, best[None], 0)[0] >= 0)
        if allowed is not None:
            take &= allowed
        if not take.any():
            break
        labels = np.stack([pl[s] for s in sl])
        lab[take] = np.take_along_axis(labels, best[None], 0)[0][take]
    return lab
