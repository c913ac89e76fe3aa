"""Segmentation metrics on binary truth and predicted probabilities (numpy, vectorised).

- dice, iou, pixel_error: at a 0.5 threshold, foreground = class 1.
- rand_error: ISBI 2012 style *adapted Rand error* (1 - Rand F-score, foreground-restricted):
  regions are the 4-connected components of the chosen phase ("background" for membrane maps:
  the cells are the non-membrane regions), truth pixels outside any region are ignored. Computed
  with ``skimage.metrics.adapted_rand_error`` (which ignores truth label 0).
- maxf: F-beta with beta^2 = 0.3, at each of 256 thresholds precision and recall are averaged
  over images, F is taken from the averages, the max over thresholds is reported (the protocol of
  the U2-Net / BASNet evaluation code). mae: mean |prob - truth| per image.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

BETA2 = 0.3
N_THRESH = 256


def confusion(truth: np.ndarray, pred: np.ndarray) -> tuple[int, int, int, int]:
    t, p = truth.astype(bool), pred.astype(bool)
    tp = int(np.count_nonzero(t & p))
    fp = int(np.count_nonzero(~t & p))
    fn = int(np.count_nonzero(t & ~p))
    return tp, fp, fn, t.size - tp - fp - fn


def dice(truth: np.ndarray, pred: np.ndarray) -> float:
    tp, fp, fn, _ = confusion(truth, pred)
    return 1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)


def iou(truth: np.ndarray, pred: np.ndarray) -> float:
    tp, fp, fn, _ = confusion(truth, pred)
    return 1.0 if tp + fp + fn == 0 else tp / (tp + fp + fn)


def pixel_error(truth: np.ndarray, pred: np.ndarray) -> float:
    return float(np.count_nonzero(truth.astype(bool) != pred.astype(bool)) / truth.size)


def rand_error(truth: np.ndarray, pred: np.ndarray, regions: str = "foreground") -> float:
    """Adapted Rand error between the connected components of ``regions`` in truth and pred."""
    from skimage.metrics import adapted_rand_error

    t, p = truth.astype(bool), pred.astype(bool)
    if regions == "background":
        t, p = ~t, ~p
    lt, _ = ndimage.label(t)
    lp, _ = ndimage.label(p)
    if lt.max() == 0:
        return 0.0 if lp.max() == 0 else 1.0
    with np.errstate(invalid="ignore", divide="ignore"):
        err, _, _ = adapted_rand_error(lt, lp)
    if not np.isfinite(err):  # only single-pixel segments: no pairs to compare
        return 0.0 if np.array_equal(t, p) else 1.0
    return float(err)


def pr_curve(truth: np.ndarray, prob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall at thresholds k/255, k = 0..255 (pred = prob*255 >= k), vectorised
    through histograms of the quantised probabilities."""
    t = truth.astype(bool).ravel()
    q = np.clip(np.round(prob.ravel() * 255), 0, 255).astype(np.int64)
    pos = np.bincount(q[t], minlength=N_THRESH)[::-1].cumsum()[::-1]   # TP at threshold k
    neg = np.bincount(q[~t], minlength=N_THRESH)[::-1].cumsum()[::-1]  # FP at threshold k
    prec = pos / np.maximum(pos + neg, 1)
    rec = pos / max(int(t.sum()), 1)
    return prec, rec


def max_f(truths: list[np.ndarray], probs: list[np.ndarray]) -> tuple[float, float]:
    """(maxF, threshold) with P and R averaged over images before F (beta^2 = 0.3)."""
    curves = [pr_curve(t, p) for t, p in zip(truths, probs, strict=True)]
    prec = np.mean([c[0] for c in curves], axis=0)
    rec = np.mean([c[1] for c in curves], axis=0)
    f = (1 + BETA2) * prec * rec / np.maximum(BETA2 * prec + rec, 1e-12)
    k = int(np.argmax(f))
    return float(f[k]), k / 255.0


def mae(truth: np.ndarray, prob: np.ndarray) -> float:
    return float(np.abs(prob.astype(np.float64) - truth.astype(np.float64)).mean())


def image_metrics(truth: np.ndarray, prob: np.ndarray, rand_regions: str = "foreground",
                  threshold: float = 0.5) -> dict[str, float]:
    pred = prob >= threshold
    return {
        "dice": dice(truth, pred),
        "iou": iou(truth, pred),
        "pixel_error": pixel_error(truth, pred),
        "rand_error": rand_error(truth, pred, rand_regions),
        "mae": mae(truth, prob),
    }
