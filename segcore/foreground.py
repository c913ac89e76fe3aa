"""Foreground at low resolution: which tiles are worth running through the model.

``foreground_mask(scene)`` reads a coarse pyramid level (or block-averages the scene level in
bounded blocks when there is no pyramid) into a mask of at most about ``max_side`` pixels a
side, and returns the factor that maps scene pixels (the scene's chosen level) to mask pixels:
mask pixel (i, j) covers scene pixels [i*f, (i+1)*f) x [j*f, (j+1)*f).

Kinds:
- ``tissue`` (H&E): Otsu threshold on the HSV saturation of the block-mean colour (clipped to
  [0.05, 0.25] so an all-glass or all-tissue slide still gets a sane threshold), then a 3x3
  opening, small objects removed and small holes filled. Grey images use darkness instead.
- ``nonzero`` (satellite): a pixel is foreground when any band differs from nodata (0 when the
  scene has none) and is not NaN; a block is foreground when any of its pixels is.
- ``all``: everything is foreground (nothing is read).
- ``auto``: geo scenes, scenes with nodata and float scenes -> nonzero (a float scene
  without a nodata value counts only NaN as missing, not 0); RGB with a bright, unsaturated
  background (glass: >= 10 % of the image and most of its border) -> tissue; else all.
  So a tile whose pixels are all nodata (or NaN) is never run.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from segcore.errors import ConfigError
from segcore.io.readers import Scene

KINDS = ("auto", "tissue", "nonzero", "all")
BLOCK = 2048  # source pixels per read block side (about 12 MB of RGB uint8)
TISSUE_THRESHOLD_RANGE = (0.05, 0.25)


def foreground_mask(
    scene: Scene, kind: str = "auto", max_side: int = 2048
) -> tuple[np.ndarray, float]:
    """(boolean mask, factor scene pixels -> mask pixels). Memory is bounded by ``max_side``."""
    if kind not in KINDS:
        raise ConfigError(f"foreground kind {kind!r} is unknown; use one of {', '.join(KINDS)}")
    if not (isinstance(max_side, int) and max_side >= 1):
        raise ConfigError(f"max_side must be a positive integer, got {max_side!r}")
    info = scene.info
    nodata = 0.0 if info.nodata is None else info.nodata
    if kind == "auto":
        kind = resolve_kind(info, kind)
        if info.nodata is None and info.geo is None and info.dtype.startswith("float"):
            nodata = float("nan")  # float data without a nodata value: only NaN is missing
    if kind == "all":
        s = max(1, math.ceil(max(info.height, info.width) / max_side))
        shape = (math.ceil(info.height / s), math.ceil(info.width / s))
        return np.ones(shape, dtype=bool), float(s)

    level, s = _plan(scene, max_side)
    src = scene if level == info.level else scene.at_level(level)
    try:
        lh, lw = src.info.height, src.info.width
        factor = s * (info.height / lh + info.width / lw) / 2
        if kind == "nonzero":
            return _reduce(src, s, lambda b: _valid(b, nodata), mean=False) > 0, factor
        mean = _reduce(src, s, lambda b: b[..., :3], mean=True)  # colour is enough
    finally:
        if src is not scene:
            src.close()
    img = _normalise(mean, info.dtype)
    if kind == "auto":
        kind = "tissue" if _bright_background(img) else "all"
        if kind == "all":
            return np.ones(img.shape[:2], dtype=bool), factor
    return tissue_from_rgb(img), factor


def resolve_kind(info, kind: str = "auto") -> str:
    """What ``kind`` means for this scene before reading pixels: 'nonzero' (geo, nodata or
    float scenes), 'all' (fewer than 3 channels), else ``kind`` ('auto' still decides between
    tissue and all from the pixels)."""
    if kind != "auto":
        return kind
    if info.geo is not None or info.nodata is not None or info.dtype.startswith("float"):
        return "nonzero"
    if info.channels < 3:
        return "all"
    return kind


def tile_has_foreground(
    mask: np.ndarray, factor: float, y0: int, y1: int, x0: int, x1: int
) -> bool:
    """Whether any mask pixel overlapping scene region [y0:y1, x0:x1] (grown by one mask pixel
    on every side, to be conservative) is foreground."""
    mh, mw = mask.shape[:2]
    my0 = max(0, math.floor(y0 / factor) - 1)
    mx0 = max(0, math.floor(x0 / factor) - 1)
    my1 = min(mh, math.ceil(y1 / factor) + 1)
    mx1 = min(mw, math.ceil(x1 / factor) + 1)
    if my0 >= my1 or mx0 >= mx1:
        return False
    return bool(mask[my0:my1, mx0:mx1].any())


def _plan(scene: Scene, max_side: int) -> tuple[int, int]:
    """(pyramid level to read, block step): the coarsest level not smaller than ``max_side``,
    block-reduced by the step that brings it to at most ``max_side``."""
    info = scene.info
    levels = range(info.level, len(info.level_shapes))
    big = [lv for lv in levels if max(info.level_shapes[lv]) >= max_side]
    level = min(big, key=lambda lv: max(info.level_shapes[lv])) if big else info.level
    side = max(info.level_shapes[level])
    return level, max(1, math.ceil(side / max_side))


def _reduce(src: Scene, s: int, feature, mean: bool) -> np.ndarray:
    """Mean (or max) of ``feature(pixels)`` over s x s blocks of ``src``, reading BLOCK-sized
    regions (edge blocks average only the pixels that exist)."""
    h, w = src.info.height, src.info.width
    oh, ow = math.ceil(h / s), math.ceil(w / s)
    step = s * max(1, BLOCK // s)
    out = None
    for by in range(0, h, step):
        for bx in range(0, w, step):
            f = feature(src.read(by, min(by + step, h), bx, min(bx + step, w)))
            if mean:
                f = f.astype(np.float32)
            bh, bw = f.shape[:2]
            nh, nw = math.ceil(bh / s), math.ceil(bw / s)
            if s > 1:
                rest = ((0, 0),) * (f.ndim - 2)
                if nh * s != bh or nw * s != bw:
                    f = np.pad(f, ((0, nh * s - bh), (0, nw * s - bw)) + rest)
                f = f.reshape((nh, s, nw, s) + f.shape[2:])
                if mean:
                    f = f.sum(axis=(1, 3))
                    ny = np.minimum(s, bh - s * np.arange(nh))
                    nx = np.minimum(s, bw - s * np.arange(nw))
                    f /= (ny[:, None] * nx[None, :]).reshape((nh, nw) + (1,) * (f.ndim - 2))
                else:
                    f = f.max(axis=(1, 3))
            if out is None:
                out = np.zeros((oh, ow) + f.shape[2:], dtype=f.dtype)
            out[by // s : by // s + nh, bx // s : bx // s + nw] = f
    return out


def _valid(block: np.ndarray, nodata: float) -> np.ndarray:
    v = block != nodata
    if block.dtype.kind == "f":
        v &= np.isfinite(block)  # NaN and +-inf are not data
    return v.any(axis=-1).astype(np.uint8)


def _normalise(img: np.ndarray, dtype: str) -> np.ndarray:
    """Pixel means to [0, 1]."""
    if dtype == "uint8":
        return img.astype(np.float32) / 255.0
    if dtype == "uint16":
        top = float(np.percentile(img, 99.9)) if img.size else 1.0
        return np.clip(img / max(top, 1.0), 0, 1)
    finite = img[np.isfinite(img)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    return np.clip(np.nan_to_num((img - lo) / max(hi - lo, 1e-12)), 0, 1)


def _saturation(img: np.ndarray) -> np.ndarray:
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    mx, mn = np.maximum(np.maximum(r, g), b), np.minimum(np.minimum(r, g), b)
    return np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-12), 0.0)


def _bright_background(img: np.ndarray) -> bool:
    """Glass: bright and unsaturated, >= 10 % of the image and more than half its border."""
    if img.shape[-1] < 3:
        return False
    glass = (np.minimum(np.minimum(img[..., 0], img[..., 1]), img[..., 2]) > 0.8) & (
        _saturation(img) < 0.1
    )
    k = max(1, min(glass.shape) // 20)
    border = np.concatenate(
        [glass[:k].ravel(), glass[-k:].ravel(), glass[:, :k].ravel(), glass[:, -k:].ravel()]
    )
    return bool(glass.mean() >= 0.1 and border.mean() > 0.5)


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of values in [0, 1] (the middle of the best plateau)."""
    hist, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist).astype(np.float64)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    best = np.flatnonzero(between >= between.max() * (1 - 1e-9))  # a plateau over an empty gap
    return float(centres[best].mean())


def tissue_from_rgb(img: np.ndarray) -> np.ndarray:
    """Tissue mask of a low-resolution image normalised to [0, 1] (h, w, c)."""
    score = _saturation(img) if img.shape[-1] >= 3 else 1.0 - img[..., 0]
    lo, hi = TISSUE_THRESHOLD_RANGE
    mask = score > min(max(otsu_threshold(score), lo), hi)
    mask = ndimage.binary_opening(mask, structure=np.ones((3, 3), bool))
    min_size = max(4, int(mask.size * 1e-4))
    mask = _drop_small(mask, min_size)
    holes = ndimage.binary_fill_holes(mask) & ~mask
    return mask | _drop_small(holes, max(16, int(mask.size * 1e-3)), keep_small=True)


def _drop_small(mask: np.ndarray, min_size: int, keep_small: bool = False) -> np.ndarray:
    """Components with >= min_size pixels (or those below it when ``keep_small``)."""
    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    keep = sizes < min_size if keep_small else sizes >= min_size
    keep[0] = False
    return keep[labels]
