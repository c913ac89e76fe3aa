"""A synthetic H&E-like scene with known truth: pink, fibrous tissue texture with purple,
nucleus-like elliptical blobs (truth = blobs). The image is a pure function of the global pixel
coordinates and the seed, so any region renders identically on its own: a scene of any size is
written tile by tile in bounded memory, and training patches come from the same generator.

Layout: the plane is cut into CELL x CELL cells; each cell holds at most one nucleus (hashed
presence, centre, radii, angle), with radii < CELL / 2 so a pixel can only be covered by the
nucleus of its own or a neighbouring cell (9 vectorised passes). Texture is hashed value noise
at two scales. Everything is numpy, vectorised; no per-pixel Python loops.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from segcore.errors import ConfigError
from segcore.io.uri import get_fs, is_local

CELL = 40
P_NUCLEUS = 0.5
R_MIN, R_MAX = 5.0, 13.0
_M = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser, vectorised on uint64 (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _hash01(seed: int, a: np.ndarray, b: np.ndarray, salt: int) -> np.ndarray:
    """Uniform [0,1) float32 from (seed, a, b, salt), a and b int64 arrays (any sign)."""
    with np.errstate(over="ignore"):
        k = (np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
             + a.astype(np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F)
             + b.astype(np.uint64) * np.uint64(0x165667B19E3779F9)
             + np.uint64(salt) * np.uint64(0xD6E8FEB86659FD93))
    return (_mix(_mix(k)) >> np.uint64(40)).astype(np.float32) / np.float32(2**24)


def _value_noise(seed: int, yy: np.ndarray, xx: np.ndarray, scale: int, salt: int) -> np.ndarray:
    """Smooth noise in [0,1]: hashed values on a lattice of spacing ``scale``, smoothstep-blended.
    ``yy`` (h, 1) and ``xx`` (1, w) are global pixel coordinates; hashes are taken on the small
    lattice only and gathered."""
    gy, gx = np.floor_divide(yy, scale), np.floor_divide(xx, scale)
    fy = ((yy - gy * scale) / scale).astype(np.float32)
    fx = ((xx - gx * scale) / scale).astype(np.float32)
    fy, fx = fy * fy * (3 - 2 * fy), fx * fx * (3 - 2 * fx)
    ly = np.arange(gy.min(), gy.max() + 2, dtype=np.int64)[:, None]
    lx = np.arange(gx.min(), gx.max() + 2, dtype=np.int64)[None, :]
    lat = _hash01(seed, ly, lx, salt)
    iy, ix = gy - ly[0, 0], gx - lx[0, 0]
    v00, v01, v10, v11 = lat[iy, ix], lat[iy, ix + 1], lat[iy + 1, ix], lat[iy + 1, ix + 1]
    return (v00 * (1 - fx) + v01 * fx) * (1 - fy) + (v10 * (1 - fx) + v11 * fx) * fy


def render(y0: int, x0: int, h: int, w: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(image (h, w, 3) uint8, truth (h, w) uint8 {0,1}) of the global scene at (y0, x0)."""
    yy = (np.arange(y0, y0 + h, dtype=np.int64))[:, None]
    xx = (np.arange(x0, x0 + w, dtype=np.int64))[None, :]
    # per-cell nucleus parameters on the cell grid covering the region plus one cell of margin
    cy0, cx0 = y0 // CELL - 1, x0 // CELL - 1
    cy = np.arange(cy0, (y0 + h - 1) // CELL + 2, dtype=np.int64)[:, None]
    cx = np.arange(cx0, (x0 + w - 1) // CELL + 2, dtype=np.int64)[None, :]
    present = _hash01(seed, cy, cx, 1) < P_NUCLEUS
    ra = R_MIN + (R_MAX - R_MIN) * _hash01(seed, cy, cx, 2)
    rb = ra * (0.55 + 0.45 * _hash01(seed, cy, cx, 3))
    ang = np.pi * _hash01(seed, cy, cx, 4)
    margin = R_MAX * 0.5
    ccy = cy * CELL + margin + (CELL - 2 * margin) * _hash01(seed, cy, cx, 5)
    ccx = cx * CELL + margin + (CELL - 2 * margin) * _hash01(seed, cy, cx, 6)
    dark = 0.75 + 0.5 * _hash01(seed, cy, cx, 7)
    best = np.full((h, w), np.inf, np.float32)
    shade = np.ones((h, w), np.float32)
    py, px = yy // CELL - cy0, xx // CELL - cx0  # pixel -> index into the cell grid
    params = np.stack([ccy.astype(np.float32), ccx.astype(np.float32), ra.astype(np.float32),
                       rb.astype(np.float32), np.cos(ang, dtype=np.float32),
                       np.sin(ang, dtype=np.float32), dark.astype(np.float32),
                       np.where(present, 1.0, 0.0).astype(np.float32)])
    yf, xf = yy.astype(np.float32), xx.astype(np.float32)
    for oy in (-1, 0, 1):
        rows = params.take(py[:, 0] + oy, axis=1)           # (8, h, cells_x)
        for ox in (-1, 0, 1):
            p = rows.take(px[0] + ox, axis=2)               # (8, h, w): contiguous gathers
            dy, dx = yf - p[0], xf - p[1]
            u = (dx * p[4] + dy * p[5]) / p[2]
            v = (dy * p[4] - dx * p[5]) / p[3]
            d = np.where(p[7] > 0, u * u + v * v, np.inf)
            closer = d < best
            best = np.where(closer, d, best)
            shade = np.where(closer, p[6], shade)
    truth = (best <= 1.0).astype(np.uint8)
    coarse = _value_noise(seed, yy, xx, 96, 11)
    fine = _value_noise(seed, yy, xx, 12, 12)
    fibre = _value_noise(seed, yy // 3, xx, 8, 13)
    grain = _hash01(seed, yy, xx, 14) - 0.5
    # tissue: pink eosin with fibres, paler where the coarse noise is low (loose stroma)
    tissue = np.array([232, 170, 200], np.float32)
    pale = np.array([246, 226, 236], np.float32)
    t = np.clip((coarse - 0.3) * 2.5, 0, 1)[..., None]
    bg = pale * (1 - t) + tissue * t
    bg = bg * (0.9 + 0.12 * fibre[..., None] + 0.05 * fine[..., None])
    # nuclei: haematoxylin purple with chromatin texture and a soft rim
    nuc = np.array([95, 60, 145], np.float32) * (0.85 + 0.3 * fine[..., None])
    nuc = nuc * shade[..., None]
    alpha = np.clip((1.2 - np.sqrt(np.minimum(best, 4.0))) / 0.35, 0, 1)[..., None]
    img = bg * (1 - alpha) + nuc * alpha + 10 * grain[..., None]
    return np.clip(img, 0, 255).astype(np.uint8), truth


def make_patches(n: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` training patches (n, size, size, 3) uint8 and truths (n, size, size) uint8 {0,1},
    from random places of the scene of ``seed`` (far from where write_scene draws: the scene
    lives at the origin, patches at offsets beyond 10^6 px, so train and test do not overlap)."""
    rng = np.random.default_rng(seed)
    ys = rng.integers(1_000_000, 2_000_000, n)
    xs = rng.integers(1_000_000, 2_000_000, n)
    imgs, masks = zip(*(render(int(y), int(x), size, size, seed) for y, x in zip(ys, xs,
                                                                                 strict=True)),
                      strict=True)
    return np.stack(imgs), np.stack(masks)


def truth_uri_for(uri: str) -> str:
    base = uri.rstrip("/")
    for ext in (".ome.tiff", ".ome.tif", ".tiff", ".tif", ".zarr"):
        if base.lower().endswith(ext):
            return base[: -len(ext)] + "_truth" + base[len(base) - len(ext):]
    raise ConfigError(f"{uri}: scene URI must end in .tif, .tiff or .zarr")


def _tiles(height: int, width: int, tile: int, seed: int, which: int):
    for y in range(0, height, tile):
        for x in range(0, width, tile):
            img, truth = render(y, x, tile, tile, seed)  # full tile; tifffile crops the edges
            yield img if which == 0 else truth * np.uint8(255)


def write_scene(uri: str, height: int, width: int, seed: int = 0, tile: int = 1024,
                compression: str = "zlib") -> str:
    """Write the scene (RGB uint8) to a tiled TIFF or a Zarr array at ``uri``, tile by tile, and
    its truth (uint8, 255 = nucleus) beside it as ``<name>_truth.<ext>``. Returns the truth URI.
    Memory: a few tiles. TIFF tiles must be multiples of 16."""
    if height < 1 or width < 1:
        raise ConfigError(f"scene size {height}x{width} must be positive")
    truth = truth_uri_for(uri)
    if uri.rstrip("/").lower().endswith(".zarr"):
        _write_zarr(uri, truth, height, width, seed, tile)
        return truth
    if tile % 16:
        raise ConfigError(f"tile {tile} must be a multiple of 16 for a tiled TIFF")
    import tifffile

    for target, which, shape, photo in ((uri, 0, (height, width, 3), "rgb"),
                                        (truth, 1, (height, width), "minisblack")):
        if is_local(target):
            local = target.removeprefix("file://")
            Path(local).parent.mkdir(parents=True, exist_ok=True)
            tmp = local + ".tmp"
        else:
            tmp = tempfile.mkstemp(suffix=".tif")[1]
        tifffile.imwrite(tmp, _tiles(height, width, tile, seed, which), shape=shape,
                         dtype=np.uint8, tile=(tile, tile), photometric=photo,
                         compression=compression, bigtiff=height * width * 3 > 2**31)
        if is_local(target):
            os.replace(tmp, local)
        else:
            fs, path = get_fs(target)
            fs.put_file(tmp, path)
            os.unlink(tmp)
    return truth


def _write_zarr(uri: str, truth: str, height: int, width: int, seed: int, tile: int) -> None:
    import zarr

    def open_arr(u: str, shape, chunks):
        fs, path = get_fs(u)
        store = path if is_local(u) else zarr.storage.FsspecStore(fs, path=path)
        return zarr.create_array(store, shape=shape, chunks=chunks, dtype="uint8",
                                 overwrite=True)

    img_a = open_arr(uri, (height, width, 3), (tile, tile, 3))
    tr_a = open_arr(truth, (height, width), (tile, tile))
    for y in range(0, height, tile):
        for x in range(0, width, tile):
            h, w = min(tile, height - y), min(tile, width - x)
            img, tr = render(y, x, h, w, seed)
            img_a[y:y + h, x:x + w] = img
            tr_a[y:y + h, x:x + w] = tr * np.uint8(255)
