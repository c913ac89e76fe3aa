"""Stitching is a crop: the model's output on a window is cut down to the tile's core, and
each core is one output shard written by exactly one task (no accumulators, no locks).

Also here: the whole-image reference (what tiled inference must equal) and an in-memory tiled
prediction used by tests, evaluation and small images. Both use the same mirror index map.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from segcore.tiling import Tile, mirror_pad_region, plan_tiles, round_up

Predict = Callable[[np.ndarray], np.ndarray]  # (B, C, h, w) -> (B, K, h, w)


def crop_to_core(window_out: np.ndarray, tile: Tile) -> np.ndarray:
    """(K, wh, ww) prediction on the tile's window -> (K, core_h, core_w)."""
    ys, xs = tile.crop
    return window_out[:, ys, xs]


def predict_whole(predict: Predict, image: np.ndarray, pad: int, multiple: int) -> np.ndarray:
    """Whole-image inference: the (c, H, W) image mirror-extended by ``pad`` on every side
    (and up to the model's multiple), one forward pass, cropped back. With ``pad`` at least the
    receptive-field radius this is independent of ``pad``: the reference for tiling."""
    c, h, w = image.shape
    pad = round_up(pad, multiple)
    hh, ww = round_up(h, multiple) + 2 * pad, round_up(w, multiple) + 2 * pad

    def read(y0, y1, x0, x1):
        return image[:, y0:y1, x0:x1].transpose(1, 2, 0)

    window = mirror_pad_region(read, h, w, -pad, hh - pad, -pad, ww - pad)
    out = predict(window.transpose(2, 0, 1)[None])[0]
    return out[:, pad:pad + h, pad:pad + w]


def predict_tiled(predict: Predict, image: np.ndarray, tile: int, halo: int,
                  multiple: int, batch: int = 4) -> np.ndarray:
    """In-memory tiled inference of a (c, H, W) image: plan, read each window with mirroring,
    predict in batches of equal window shape, crop each to its core. Returns (K, H, W)."""
    c, h, w = image.shape
    grid = plan_tiles(h, w, tile, halo, multiple)

    def read(y0, y1, x0, x1):
        return image[:, y0:y1, x0:x1].transpose(1, 2, 0)

    out: np.ndarray | None = None
    by_shape: dict[tuple[int, int], list[Tile]] = {}
    for t in grid.tiles:
        by_shape.setdefault(t.window_shape, []).append(t)
    for tiles in by_shape.values():
        for i in range(0, len(tiles), batch):
            group = tiles[i:i + batch]
            wins = np.stack([mirror_pad_region(read, h, w, t.wy0, t.wy1, t.wx0, t.wx1)
                             .transpose(2, 0, 1) for t in group])
            probs = predict(wins)
            if out is None:
                out = np.full((probs.shape[1], h, w), np.nan, dtype=probs.dtype)
            for t, p in zip(group, probs, strict=True):
                out[:, t.y0:t.y1, t.x0:t.x1] = crop_to_core(p, t)
    assert out is not None  # grid has at least one tile
    return out


def blend_weights(window: tuple[int, int], halo: int) -> np.ndarray:
    """Separable weights for blended stitching: 1 on the core, falling off linearly to a
    small positive value at the window edge, so overlapping windows average smoothly."""
    def ramp(n: int) -> np.ndarray:
        r = np.ones(n, np.float32)
        if halo > 0:
            edge = np.linspace(1.0 / (halo + 1), 1.0, halo, endpoint=False, dtype=np.float32)
            r[:halo] = edge
            r[n - halo:] = edge[::-1]
        return r

    return np.outer(ramp(window[0]), ramp(window[1]))
