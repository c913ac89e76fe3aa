"""Whole-image prediction for validation and evaluation: normalise, optionally resize to the
training size, pad to the model's input multiple (reflect), predict, crop, resize back."""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from segcore.config import Normalization
from segcore.errors import ConfigError


def amp_dtype(device: torch.device, bf16: bool) -> torch.dtype | None:
    """Autocast dtype: on CUDA always (bf16 where supported, else fp16); on CPU bf16 if asked."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if bf16 else None


def autocast(device: torch.device, bf16: bool):
    dtype = amp_dtype(device, bf16)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def to_unit(x: torch.Tensor, norm: Normalization, nodata: float | None = None) -> torch.Tensor:
    """Raw NCHW pixels -> the [0, 1] space training patches live in: x / scale, or for a
    statistics normalisation (clip(x, low, high) - low) / (high - low). NaN and +-inf values
    (as at inference) and pixels whose every channel is ``nodata`` take the channel mean's
    value (input 0 to the model)."""
    c = x.shape[1]

    def per_channel(v) -> torch.Tensor:
        t = torch.tensor(v, dtype=x.dtype, device=x.device)
        return (t.expand(c) if t.numel() == 1 else t).view(1, c, 1, 1)

    x = x.float() if not x.is_floating_point() else x
    bad = ~torch.isfinite(x)
    if nodata is not None and nodata == nodata:
        bad = bad | (x == nodata).all(1, keepdim=True)
    if norm.mode == "stats":
        lo, hi = per_channel(norm.low), per_channel(norm.high)
        span = torch.where(hi > lo, hi - lo, torch.ones_like(hi))
        u = (torch.minimum(torch.maximum(x, lo), hi) - lo) / span
        fill = (per_channel(norm.mean) - lo) / span
    else:
        u, fill = x / norm.scale, per_channel(norm.mean)
    return torch.where(bad, fill.expand_as(u), u) if bool(bad.any()) else u


def normalise(x: torch.Tensor, norm: Normalization, scaled: bool = True) -> torch.Tensor:
    """x in [0,1] (scaled=True: the space of :func:`to_unit`) or raw -> model input, per
    channel: (x - mean) / std, or for a statistics normalisation (x * (high - low) + low -
    mean) / std, i.e. (clip(raw, low, high) - mean) / std."""
    if not scaled:
        x = to_unit(x, norm)
    c = x.shape[1]

    def per_channel(v) -> torch.Tensor:
        t = torch.tensor(v, dtype=x.dtype, device=x.device)
        return (t.expand(c) if t.numel() == 1 else t).view(1, c, 1, 1)

    mean, std = per_channel(norm.mean), per_channel(norm.std)
    if norm.mode == "stats":
        lo, hi = per_channel(norm.low), per_channel(norm.high)
        span = torch.where(hi > lo, hi - lo, torch.ones_like(hi))
        x = x * span + lo
    return (x - mean) / std


def _forward(model: nn.Module, x: torch.Tensor, device: torch.device, bf16: bool,
             channels_last: bool) -> torch.Tensor:
    """Logits for x (N,C,H,W): pad to the model's input multiple (reflect), predict, crop."""
    m = int(getattr(model, "input_multiple", 1))
    hh, ww = x.shape[2:]
    ph, pw = (-hh) % m, (-ww) % m
    if ph or pw:
        mode = "reflect" if ph < hh and pw < ww else "replicate"
        x = F.pad(x, (0, pw, 0, ph), mode=mode)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(device, bf16):
        logits = model(x)
    return logits.float()[:, :1, :hh, :ww]


@torch.no_grad()
def predict_image(model: nn.Module, image: np.ndarray, norm: Normalization,
                  device: torch.device | str = "cpu", resize: int | None = None,
                  bf16: bool = False, channels_last: bool = False,
                  tta: str | None = None, nodata: float | None = None) -> np.ndarray:
    """Foreground probability (H, W) float32 for an (H, W, C) or (H, W) image (uint8; or any
    dtype for a statistics normalisation; NaN and ``nodata`` pixels are filled as at
    inference).

    ``tta``: average the probabilities over transformed copies of the image, each mapped back:
    "d8" = the 8 flips/rotations (models trained with flips + rot90, e.g. EM or pathology),
    "hflip" = the image and its mirror (natural photos, where rotations are not plausible)."""
    if tta not in (None, "d8", "hflip"):
        raise ConfigError(f"tta {tta!r} must be 'd8' or 'hflip'")
    device = torch.device(device)
    if image.ndim == 2:
        image = image[..., None]
    h, w = image.shape[:2]
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float().to(device)
    x = to_unit(x, norm, nodata)
    if resize:
        x = F.interpolate(x, size=(resize, resize), mode="bilinear", antialias=True,
                          align_corners=False)
    x = normalise(x, norm)
    hh, ww = x.shape[2:]
    if not tta:
        p = torch.sigmoid(_forward(model, x, device, bf16, channels_last))
    else:
        p = torch.zeros(1, 1, hh, ww, device=device)
        for k in range(4 if tta == "d8" else 1):
            for flip in (False, True):
                xt = torch.rot90(torch.flip(x, (3,)) if flip else x, k, (2, 3))
                pt = torch.rot90(torch.sigmoid(_forward(model, xt, device, bf16, channels_last)),
                                 -k, (2, 3))
                p += torch.flip(pt, (3,)) if flip else pt
        p /= 8 if tta == "d8" else 2
    if resize and (hh, ww) != (h, w):
        p = F.interpolate(p, size=(h, w), mode="bilinear", align_corners=False)
    return p[0, 0].cpu().numpy().astype(np.float32)
