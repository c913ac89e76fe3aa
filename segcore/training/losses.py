"""Losses: BCE-with-logits + soft Dice (per sample), the U-Net paper's border weight map, and
U2-Net deep supervision (the same loss on the fused output and each side output, equal weights).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - soft Dice, computed per sample and channel, then averaged (batch-size independent,
    so halves of a batch on two DDP ranks average to the whole batch's value)."""
    p = torch.sigmoid(logits.float())
    t = target.float()
    inter = (p * t).sum(dim=(2, 3))
    denom = p.sum(dim=(2, 3)) + t.sum(dim=(2, 3))
    return (1 - (2 * inter + eps) / (denom + eps)).mean()


def bce_loss(logits: torch.Tensor, target: torch.Tensor,
             weight: torch.Tensor | None = None) -> torch.Tensor:
    loss = F.binary_cross_entropy_with_logits(logits.float(), target.float(), reduction="none")
    if weight is not None:
        loss = loss * weight
    return loss.mean()


def seg_loss(logits: torch.Tensor, target: torch.Tensor, kind: str = "bce+dice",
             weight: torch.Tensor | None = None) -> torch.Tensor:
    if kind == "bce":
        return bce_loss(logits, target, weight)
    if kind == "dice":
        return dice_loss(logits, target)
    return bce_loss(logits, target, weight) + dice_loss(logits, target)


def deep_supervision_loss(outputs: list[torch.Tensor], target: torch.Tensor, kind: str = "bce+dice",
                          weight: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of the loss over [fused, side1..side6] (7 equal-weight terms for U2-Net)."""
    return sum(seg_loss(o, target, kind, weight) for o in outputs)  # type: ignore[return-value]


def border_weight_map(mask: np.ndarray, w0: float = 10.0, sigma: float = 5.0,
                      class_balance: bool = True) -> np.ndarray:
    """U-Net paper eq. 2: w(x) = w_c(x) + w0 * exp(-(d1(x) + d2(x))^2 / (2 sigma^2)), where d1, d2
    are the distances to the nearest and second-nearest object. ``mask`` is a binary or instance
    mask (H, W); touching binary objects should be given as instances. Returns float32 (H, W).

    Distances come from one exact Euclidean distance transform per object over the whole array
    (exact, and cheap at patch sizes); the two smallest are kept with a vectorised partial sort.
    The w0 term applies to background pixels (the gaps between objects), as in the paper's
    Fig. 3d.
    """
    m = np.asarray(mask)
    if m.dtype == bool or m.max() <= 1:
        labels = ndimage.label(m > 0)[0]
    else:
        labels = m.astype(np.int32)
    fg = labels > 0
    if class_balance and fg.any() and (~fg).any():
        wc = np.where(fg, 0.5 / fg.mean(), 0.5 / (~fg).mean()).astype(np.float32)
        wc /= wc.min()
    else:
        wc = np.ones(m.shape, np.float32)
    ids = [i for i in np.unique(labels) if i > 0]
    if len(ids) < 2:
        return wc
    d = np.stack([ndimage.distance_transform_edt(labels != i) for i in ids])
    d.partition(1, axis=0)
    d1, d2 = d[0], d[1]
    w = w0 * np.exp(-((d1 + d2) ** 2) / (2 * sigma**2))
    return (wc + np.where(fg, 0.0, w)).astype(np.float32)
