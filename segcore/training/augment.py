"""Batch augmentation, vectorised: one affine+elastic warp per batch through ``grid_sample``
(flips, rot90, scale jitter and the U-Net paper's coarse-grid elastic deformation folded into a
single sampling grid), then per-sample intensity jitter and optional H&E stain jitter in HED space.

Image and mask go through the same grid, so they stay aligned; the mask is resampled with
nearest neighbour and stays binary. All randomness comes from the caller's ``torch.Generator``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from segcore.training.config import AugmentConfig

# Ruifrok & Johnston stain vectors (as in skimage.color.rgb_from_hed)
_RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_RGB_FROM_HED = _RGB_FROM_HED / _RGB_FROM_HED.norm(dim=1, keepdim=True)
_HED_FROM_RGB = torch.linalg.inv(_RGB_FROM_HED)


def _rand(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.rand(*shape, generator=gen)


def sampling_grid(n: int, h: int, w: int, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """(n, h, w, 2) grid in [-1, 1] for grid_sample (align_corners=False)."""
    # affine part: a 2x2 matrix per sample from rot90 (k), flips and zoom
    k = (_rand(gen, n) * 4).floor() if cfg.rot90 else torch.zeros(n)
    flip = torch.where(_rand(gen, n) < 0.5, -1.0, 1.0) if cfg.flips else torch.ones(n)
    zoom = 1 + (2 * _rand(gen, n) - 1) * cfg.scale_jitter
    ang = k * (torch.pi / 2)
    cos, sin = torch.cos(ang).round(), torch.sin(ang).round()
    a = torch.stack([torch.stack([cos * flip, -sin], -1), torch.stack([sin * flip, cos], -1)], -2)
    a = a / zoom[:, None, None]
    ys = (torch.arange(h) + 0.5) / h * 2 - 1
    xs = (torch.arange(w) + 0.5) / w * 2 - 1
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    base = torch.stack([gx, gy], -1).reshape(1, h * w, 2)  # (x, y) order for grid_sample
    grid = (base @ a.transpose(1, 2)).reshape(n, h, w, 2)
    if cfg.elastic_sigma > 0:
        if cfg.elastic_spacing:  # a fixed physical spacing: crop the centre of a larger field
            s = cfg.elastic_spacing
            gy, gx = -(-(h - 1) // s) + 1, -(-(w - 1) // s) + 1
            disp = torch.randn(n, 2, gy, gx, generator=gen) * cfg.elastic_sigma
            fh, fw = (gy - 1) * s + 1, (gx - 1) * s + 1
            disp = F.interpolate(disp, size=(fh, fw), mode="bicubic", align_corners=True)
            y0, x0 = (fh - h) // 2, (fw - w) // 2
            disp = disp[:, :, y0:y0 + h, x0:x0 + w]
        else:
            g = cfg.elastic_grid
            disp = torch.randn(n, 2, g, g, generator=gen) * cfg.elastic_sigma
            disp = F.interpolate(disp, size=(h, w), mode="bicubic", align_corners=True)
        # pixels -> normalised units
        disp = disp.permute(0, 2, 3, 1) * torch.tensor([2.0 / w, 2.0 / h])
        grid = grid + disp
    return grid


def augment_batch(img: torch.Tensor, mask: torch.Tensor, cfg: AugmentConfig,
                  gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """img (N,C,H,W) float in [0,1], mask (N,1,H,W) {0,1} -> augmented copies, same shapes/dtypes."""
    n, c, h, w = img.shape
    needs_warp = cfg.flips or cfg.rot90 or cfg.elastic_sigma > 0 or cfg.scale_jitter > 0
    if needs_warp:
        grid = sampling_grid(n, h, w, cfg, gen).to(img.device, img.dtype)
        img = F.grid_sample(img, grid, mode="bilinear", padding_mode="reflection",
                            align_corners=False)
        mask = F.grid_sample(mask.to(img.dtype), grid, mode="nearest", padding_mode="reflection",
                             align_corners=False)
    if cfg.hed_jitter > 0 and c == 3:
        img = hed_jitter(img, cfg.hed_jitter, gen)
    if cfg.brightness > 0 or cfg.contrast > 0 or cfg.gamma > 0:
        u = _rand(gen, n, 3).to(img.device, img.dtype) * 2 - 1
        mean = img.mean(dim=(1, 2, 3), keepdim=True)
        img = (img - mean) * (1 + u[:, 1, None, None, None] * cfg.contrast) + mean
        img = img + u[:, 0, None, None, None] * cfg.brightness
        img = img.clamp(0, 1)
        if cfg.gamma > 0:
            img = img.pow(1 + u[:, 2, None, None, None] * cfg.gamma)
    return img.clamp(0, 1), mask


def hed_jitter(img: torch.Tensor, strength: float, gen: torch.Generator) -> torch.Tensor:
    """Tellez-style stain jitter: per sample and stain, od' = od * (1 + a) + b, a,b ~ U(-s, s)."""
    n = img.shape[0]
    od = -torch.log(img.clamp(min=1e-6) * (255.0 / 256.0) + 1.0 / 256.0)  # optical density
    hed = torch.einsum("nchw,cd->ndhw", od, _HED_FROM_RGB.to(img))
    a = (_rand(gen, n, 3) * 2 - 1).to(img) * strength
    b = (_rand(gen, n, 3) * 2 - 1).to(img) * strength * 0.1
    hed = hed * (1 + a[:, :, None, None]) + b[:, :, None, None]
    od = torch.einsum("ndhw,dc->nchw", hed, _RGB_FROM_HED.to(img))
    return ((torch.exp(-od) - 1.0 / 256.0) * (256.0 / 255.0)).clamp(0, 1)
