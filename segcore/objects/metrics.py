"""Object-level scores of an instance map against a reference instance map (0 = background).

- ``object_f1``: predicted and true objects matched one to one where their IoU exceeds the
  threshold (above 0.5 a match is unique by construction); F1 = 2 TP / (2 TP + FP + FN).
- ``aji``: the Aggregated Jaccard Index (Kumar et al., IEEE TMI 2017): every true object is
  paired with the predicted object of highest IoU; intersections over unions are summed, and
  predicted objects paired with no true object add their area to the union.
"""

from __future__ import annotations

import numpy as np


def _overlaps(truth: np.ndarray, pred: np.ndarray):
    """(true ids, predicted ids, intersections) for every overlapping pair, and the areas."""
    t, p = truth.ravel().astype(np.int64), pred.ravel().astype(np.int64)
    both = (t > 0) & (p > 0)
    pairs, inter = np.unique(np.stack([t[both], p[both]]), axis=1, return_counts=True)
    area_t = np.bincount(t, minlength=int(t.max()) + 1)
    area_p = np.bincount(p, minlength=int(p.max()) + 1)
    return pairs[0], pairs[1], inter, area_t, area_p


def object_f1(truth: np.ndarray, pred: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    ti, pi, inter, area_t, area_p = _overlaps(truth, pred)
    iou = inter / (area_t[ti] + area_p[pi] - inter)
    tp = int((iou > threshold).sum()) if threshold >= 0.5 else _greedy(ti, pi, iou, threshold)
    n_t = int((area_t[1:] > 0).sum())
    n_p = int((area_p[1:] > 0).sum())
    fp, fn = n_p - tp, n_t - tp
    f1 = 2 * tp / (2 * tp + fp + fn) if (tp + fp + fn) else 1.0
    return {"f1": f1, "tp": tp, "fp": fp, "fn": fn, "true_objects": n_t, "pred_objects": n_p}


def _greedy(ti, pi, iou, threshold) -> int:
    used_t, used_p, tp = set(), set(), 0
    for k in np.argsort(-iou):
        if iou[k] <= threshold:
            break
        if ti[k] not in used_t and pi[k] not in used_p:
            used_t.add(ti[k])
            used_p.add(pi[k])
            tp += 1
    return tp


def aji(truth: np.ndarray, pred: np.ndarray) -> float:
    ti, pi, inter, area_t, area_p = _overlaps(truth, pred)
    iou = inter / (area_t[ti] + area_p[pi] - inter)
    true_ids = np.flatnonzero(area_t)[1:] if area_t[0] else np.flatnonzero(area_t)
    true_ids = true_ids[true_ids > 0]
    inter_sum, union_sum = 0, 0
    used = np.zeros(area_p.size, bool)
    order = np.lexsort((-iou, ti))  # by true id, best IoU first
    best: dict[int, int] = {}
    for k in order:
        best.setdefault(int(ti[k]), int(k))
    for g in true_ids:
        k = best.get(int(g))
        if k is None:
            union_sum += int(area_t[g])
            continue
        s = int(pi[k])
        inter_sum += int(inter[k])
        union_sum += int(area_t[g] + area_p[s] - inter[k])
        used[s] = True
    unused = np.flatnonzero((area_p > 0) & ~used)
    union_sum += int(area_p[unused[unused > 0]].sum())
    return inter_sum / union_sum if union_sum else 1.0
