"""Seam report: how much a stitched result depends on where the scene was cut into tiles.

A sample of shards is checked after a run, each by one task (on the workers, like the shards):

- **exact mode** (halo >= the receptive field's radius, cores cropped): each sampled shard is
  recomputed from a window with a larger halo (the run's halo plus ``extra``, at least one
  input multiple, so the window stays on the model's pooling grid) and compared with what the
  run stored. Exact stitching means the two agree (up to float rounding in a different window
  size); an approximate halo (U2-Net, whose field is wider than any tile) shows here by how
  much it is not exact.
- **blend mode**: each sampled shard's window and its right and lower neighbours' windows are
  computed, and the neighbours' predictions are compared where the windows overlap (the
  zones the blending averages over).

Figures (in the report's ``seams``): the largest and mean absolute probability difference,
and the fraction of pixels whose class flips; per shard too. ``seams.png`` is a heat map at
preview scale: the largest difference per pixel block (dark blue 0, through red to yellow at
the largest difference or 0.05, whichever is larger), grey where nothing was checked.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from segcore.tiling import Tile, round_up

HEAT_SIDE = 1024


@dataclass(frozen=True)
class SeamTask:
    src: str
    level: int
    out: str  # result.zarr URI
    model: str
    device: str
    amp: str
    prob_dtype: str
    tile: Tile
    blend: bool
    halo: int
    extra: int  # exact mode: the check window's halo is halo + extra
    multiple: int
    height: int
    width: int
    stride: int  # heat-map block edge in px
    neighbours: tuple[Tile, ...] = ()  # blend mode: right and lower windows
    channels: tuple[int, ...] | None = None  # the run's channel selection (0-based)
    channel_names: tuple[str, ...] | None = None


def sample(tiles: tuple[Tile, ...], run: tuple[bool, ...], n: int, blend: bool) -> list[int]:
    """Up to ``n`` tile indices spread evenly over the run (not background) tiles; in blend
    mode only tiles with a right or lower neighbour."""
    keys = {(t.row, t.col) for t in tiles}
    ok = [i for i, (t, r) in enumerate(zip(tiles, run, strict=True)) if r and (
        not blend or (t.row, t.col + 1) in keys or (t.row + 1, t.col) in keys)]
    if n <= 0 or not ok:
        return []
    if n >= len(ok):
        return ok
    return [ok[int(round(k * (len(ok) - 1) / (n - 1)))] for k in range(n)] if n > 1 else \
        [ok[len(ok) // 2]]


def _block_max(a: np.ndarray, y0: int, x0: int, s: int) -> tuple[int, int, np.ndarray]:
    """Max-pool ``a`` (placed at image (y0, x0)) onto the grid of ``s``-px blocks."""
    by0, bx0 = y0 // s, x0 // s
    by1, bx1 = -(-(y0 + a.shape[0]) // s), -(-(x0 + a.shape[1]) // s)
    pad = np.full(((by1 - by0) * s, (bx1 - bx0) * s), -1.0, np.float32)
    pad[y0 - by0 * s:y0 - by0 * s + a.shape[0], x0 - bx0 * s:x0 - bx0 * s + a.shape[1]] = a
    return by0, bx0, pad.reshape(by1 - by0, s, bx1 - bx0, s).max(axis=(1, 3))


def _stats(diff: np.ndarray, flips: np.ndarray) -> dict:
    return {"max_abs_prob_diff": round(float(diff.max()), 6) if diff.size else 0.0,
            "mean_abs_prob_diff": round(float(diff.mean()), 8) if diff.size else 0.0,
            "label_flips": int(flips.sum()), "pixels": int(flips.size)}


def _check(t: SeamTask) -> list[dict]:
    from segcore.inference import get_predictor, labels_from_probs
    from segcore.io.zarrstore import open_group
    from segcore.shards import _scene
    from segcore.tiling import mirror_pad_region

    scene = _scene(t.src, t.level, t.channels, t.channel_names)
    nodata = scene.info.nodata
    pred = get_predictor(t.model, t.device, t.amp)
    tile = t.tile

    def window(wy0: int, wy1: int, wx0: int, wx1: int) -> np.ndarray:
        return mirror_pad_region(scene.read, t.height, t.width, wy0, wy1, wx0, wx1)

    heat = []
    if not t.blend:
        h2 = t.halo + round_up(max(1, t.extra), t.multiple)
        ch, cw = tile.core_shape
        wy0, wx0 = tile.y0 - h2, tile.x0 - h2
        raw = window(wy0, wy0 + round_up(ch, t.multiple) + 2 * h2,
                     wx0, wx0 + round_up(cw, t.multiple) + 2 * h2)
        q, lab = pred.predict_quantized(raw[None], t.prob_dtype, nodata)
        q, lab = q[0][:, h2:h2 + ch, h2:h2 + cw], lab[0][h2:h2 + ch, h2:h2 + cw]
        root = open_group(t.out, mode="r")
        stored = root["0"][:, tile.y0:tile.y1, tile.x0:tile.x1]
        mask = root["labels/mask/0"][tile.y0:tile.y1, tile.x0:tile.x1]
        scale = 255.0 if t.prob_dtype == "uint8" else 1.0
        diff = (np.abs(q.astype(np.float32) - stored.astype(np.float32)) / scale).max(axis=0)
        flips = lab != mask
        heat.append(_block_max(diff, tile.y0, tile.x0, t.stride))
        out = {"key": tile.key, "check_halo": h2, **_stats(diff, flips)}
    else:
        own = pred.predict_raw(window(tile.wy0, tile.wy1, tile.wx0, tile.wx1)[None])[0]
        diffs, flip_parts = [], []
        for nb in t.neighbours:
            p = pred.predict_raw(window(nb.wy0, nb.wy1, nb.wx0, nb.wx1)[None])[0]
            y0, y1 = max(tile.wy0, nb.wy0, 0), min(tile.wy1, nb.wy1, t.height)
            x0, x1 = max(tile.wx0, nb.wx0, 0), min(tile.wx1, nb.wx1, t.width)
            if y0 >= y1 or x0 >= x1:
                continue
            a = own[:, y0 - tile.wy0:y1 - tile.wy0, x0 - tile.wx0:x1 - tile.wx0]
            b = p[:, y0 - nb.wy0:y1 - nb.wy0, x0 - nb.wx0:x1 - nb.wx0]
            d = np.abs(a - b).max(axis=0)
            diffs.append(d.ravel())
            flip_parts.append((labels_from_probs(a) != labels_from_probs(b)).ravel())
            heat.append(_block_max(d, y0, x0, t.stride))
        diff = np.concatenate(diffs) if diffs else np.zeros(0, np.float32)
        flips = np.concatenate(flip_parts) if flip_parts else np.zeros(0, bool)
        out = {"key": tile.key, "neighbours": [nb.key for nb in t.neighbours],
               **_stats(diff, flips)}
    out["heat"] = heat
    return [out]


def seam_report(p, out_uri: str, n: int, client=None, extra: int | None = None) -> dict:
    """Check ``n`` sampled shards of the finished run planned as ``p`` (a ScenePlan) and write
    ``seams.png`` under ``out_uri``; returns the report's ``seams`` section."""
    import io

    from PIL import Image

    from segcore.execute import run_tasks
    from segcore.io.uri import join, write_bytes_atomic

    cfg, grid = p.cfg, p.grid
    blend = bool(cfg.blend)
    picked = sample(grid.tiles, p.run, n, blend)
    at = {(t.row, t.col): t for t in grid.tiles}
    height, width = p.info.height, p.info.width
    stride = max(1, -(-max(height, width) // HEAT_SIDE))
    extra = grid.halo if extra is None else extra
    tasks = []
    for i in picked:
        t = grid.tiles[i]
        nbs = tuple(at[k] for k in ((t.row, t.col + 1), (t.row + 1, t.col)) if k in at) \
            if blend else ()
        tasks.append(SeamTask(cfg.src, p.info.level, join(cfg.out, "result.zarr"), cfg.model,
                              cfg.device, cfg.amp, cfg.prob_dtype, t, blend, grid.halo, extra,
                              grid.multiple, height, width, stride, nbs,
                              p.channels, cfg.channel_names))
    results = run_tasks(_check, tasks, client, None, False, "seams", lambda s: 1)
    results.sort(key=lambda r: r["key"])
    canvas = np.full((-(-height // stride), -(-width // stride)), -1.0, np.float32)
    for r in results:
        for by0, bx0, block in r.pop("heat"):
            view = canvas[by0:by0 + block.shape[0], bx0:bx0 + block.shape[1]]
            np.maximum(view, block[:view.shape[0], :view.shape[1]], out=view)
    pixels = sum(r["pixels"] for r in results)
    summary = {
        "mode": "blend: neighbouring windows compared where they overlap" if blend else
        "exact: sampled shards recomputed with a larger halo",
        "shards_checked": len(results), "halo": grid.halo, "exact": bool(p.exact),
        "max_abs_prob_diff": max((r["max_abs_prob_diff"] for r in results), default=0.0),
        "mean_abs_prob_diff": round(sum(r["mean_abs_prob_diff"] * r["pixels"] for r in results)
                                    / max(1, pixels), 8),
        "label_flip_fraction": round(sum(r["label_flips"] for r in results) / max(1, pixels),
                                     8),
        "pixels_compared": pixels, "per_shard": results,
    }
    vmax = max(0.05, summary["max_abs_prob_diff"])
    v = np.clip(canvas / vmax, 0, 1)
    rgb = np.stack([np.clip(2 * v, 0, 1), np.clip(2 * v - 1, 0, 1), 0.4 * (1 - v)], -1)
    img = (rgb * 255).astype(np.uint8)
    img[canvas < 0] = 96
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", compress_level=1)
    summary["heatmap"] = join(out_uri, "seams.png")
    write_bytes_atomic(summary["heatmap"], buf.getvalue())
    summary["heatmap_scale"] = f"0 (dark blue) to {vmax:g} (yellow); grey = not checked"
    return summary
