"""Pure tile geometry: no torch, no I/O.

A *tile* is the window the model sees (``tile`` pixels square, what the device must hold). It
owns a *core* of ``core = tile - 2 * halo`` pixels that is exactly one output shard: the only
pixels this tile writes. The halo is context read around the core and cropped away after the
model has run (the U-Net paper's overlap-tile strategy). Three rules make the stitched result
equal whole-image inference:

1. ``halo >= receptive-field radius``: every core pixel sees all the input it depends on.
2. Window origins are multiples of the model's input multiple (2**depth for U-Net, 32 for
   U2-Net), so each window's pooling grid coincides with the whole image's grid.
3. Pixels outside the image are mirrored (symmetric extension) by the same index map both
   here and in the whole-image reference, so border context is identical too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from segcore.errors import ConfigError

if TYPE_CHECKING:
    from segcore.models.fields import ReceptiveField


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


@dataclass(frozen=True)
class Tile:
    """One task's unit of work: the shard it owns and the window it reads."""

    row: int  # shard row index
    col: int  # shard column index
    y0: int  # core (= shard content) inside the image, [y0, y1) x [x0, x1)
    y1: int
    x0: int
    x1: int
    wy0: int  # window the model sees (may extend outside the image: mirrored)
    wy1: int
    wx0: int
    wx1: int

    @property
    def key(self) -> str:
        return f"{self.row}_{self.col}"

    @property
    def core_shape(self) -> tuple[int, int]:
        return self.y1 - self.y0, self.x1 - self.x0

    @property
    def window_shape(self) -> tuple[int, int]:
        return self.wy1 - self.wy0, self.wx1 - self.wx0

    @property
    def crop(self) -> tuple[slice, slice]:
        """Where the core lies inside the window's output."""
        return (slice(self.y0 - self.wy0, self.y1 - self.wy0),
                slice(self.x0 - self.wx0, self.x1 - self.wx0))


@dataclass(frozen=True)
class TileGrid:
    height: int
    width: int
    tile: int
    halo: int
    core: int
    multiple: int
    tiles: tuple[Tile, ...]

    @property
    def shape(self) -> tuple[int, int]:
        """Number of shard rows and columns."""
        return math.ceil(self.height / self.core), math.ceil(self.width / self.core)

    @property
    def overhead(self) -> float:
        """Pixels computed per output pixel (>= 1)."""
        computed = sum(t.window_shape[0] * t.window_shape[1] for t in self.tiles)
        return computed / (self.height * self.width)


def resolve_halo(tile: int, halo: int, multiple: int) -> tuple[int, int]:
    """(halo rounded up to the multiple, core) for a tile edge, or a ConfigError saying what to
    change."""
    if tile <= 0 or halo < 0 or multiple <= 0:
        raise ConfigError(f"tile {tile}, halo {halo} and multiple {multiple} must be positive")
    if tile % multiple:
        raise ConfigError(
            f"tile {tile} must be a multiple of the model's input multiple {multiple} "
            f"(try {round_up(tile, multiple)})"
        )
    if 2 * halo >= tile:
        raise ConfigError(f"halo {halo} must be < tile/2 = {tile // 2}: raise --tile or lower --halo")
    h = round_up(halo, multiple)
    core = tile - 2 * h
    if core <= 0:
        raise ConfigError(
            f"halo {halo} rounds up to {h} (a multiple of {multiple}), which leaves no core in a "
            f"{tile}-pixel tile: use --tile {round_up(2 * h + multiple, multiple)} or more"
        )
    return h, core


def plan_tiles(height: int, width: int, tile: int, halo: int, multiple: int) -> TileGrid:
    """Cover an image with cores of ``tile - 2*halo`` (the last row/column clipped) and their
    windows. Edge windows shrink to the clipped core plus halo, rounded up to the multiple."""
    if height <= 0 or width <= 0:
        raise ConfigError(f"image size {height}x{width} must be positive")
    h, core = resolve_halo(tile, halo, multiple)
    tiles = []
    for r, y0 in enumerate(range(0, height, core)):
        y1 = min(y0 + core, height)
        for c, x0 in enumerate(range(0, width, core)):
            x1 = min(x0 + core, width)
            tiles.append(Tile(r, c, y0, y1, x0, x1,
                              y0 - h, y0 + round_up(y1 - y0, multiple) + h,
                              x0 - h, x0 + round_up(x1 - x0, multiple) + h))
    return TileGrid(height, width, tile, h, core, multiple, tuple(tiles))


def mirror_index(start: int, stop: int, size: int) -> np.ndarray:
    """Indices of positions [start, stop) in an axis of ``size`` extended by symmetric
    mirroring (edge pixel repeated: ... 2 1 0 | 0 1 2 ... n-1 | n-1 n-2 ...), any distance."""
    i = np.arange(start, stop)
    period = 2 * size
    k = np.mod(i, period)
    return np.where(k >= size, period - 1 - k, k)


def mirror_pad_region(read, height: int, width: int, wy0: int, wy1: int, wx0: int,
                      wx1: int) -> np.ndarray:
    """Read window [wy0, wy1) x [wx0, wx1) of an image of ``height x width`` through
    ``read(y0, y1, x0, x1) -> (h, w, c)`` array, mirroring what lies outside. Only the bounding
    box of the in-image pixels needed is read.

    A window inside the image is the read itself (no copy); one that sticks out by at most the
    image's own size is the read padded with ``np.pad(mode="symmetric")`` (the same index map
    as :func:`mirror_index`); anything further out goes through the general index map."""
    by0, by1, bx0, bx1 = max(wy0, 0), min(wy1, height), max(wx0, 0), min(wx1, width)
    pads = ((by0 - wy0, wy1 - by1), (bx0 - wx0, wx1 - bx1))
    if by0 < by1 and bx0 < bx1 and pads[0][0] <= by1 and pads[0][1] <= height - by0 \
            and pads[1][0] <= bx1 and pads[1][1] <= width - bx0:
        box = read(by0, by1, bx0, bx1)
        if not any(pads[0] + pads[1]):
            return box
        return np.pad(box, (*pads, (0, 0)), mode="symmetric")
    iy = mirror_index(wy0, wy1, height)
    ix = mirror_index(wx0, wx1, width)
    by0, by1, bx0, bx1 = int(iy.min()), int(iy.max()) + 1, int(ix.min()), int(ix.max()) + 1
    box = read(by0, by1, bx0, bx1)
    return box[np.ix_(iy - by0, ix - bx0)]


def shard_chunk(core: int, multiple: int, max_chunk: int = 512) -> int:
    """Inner-chunk edge for a shard of edge ``core``: the largest divisor of core that is a
    multiple of ``multiple`` (or of 1) and at most ``max_chunk``."""
    best = 1
    for d in range(1, core + 1):
        if core % d == 0 and d <= max_chunk:
            best = d
    return best


def choose_halo(tile: int, multiple: int, field: ReceptiveField, halo) -> tuple[int, bool, list[str]]:
    """(halo, exact, warnings). 'auto' takes the receptive-field radius when it fits in the
    tile (exact stitching); otherwise the largest halo leaving half the tile as core, flagged
    approximate."""
    warnings: list[str] = []
    if field.is_global:
        exact = False
        h = tile // 4 if halo == "auto" else halo
        warnings.append("the model normalises over the whole map (group/instance norm): tiled "
                        "output cannot equal whole-image output for any halo")
        return h, exact, warnings
    need = round_up(field.radius, multiple)
    if halo == "auto":
        if 2 * need < tile and tile - 2 * need >= multiple:
            return need, True, warnings
        h = (tile // 4) // multiple * multiple
        warnings.append(
            f"receptive field radius {field.radius} px needs a halo of {need}, which does not fit "
            f"a {tile}-px tile (needs --tile >= {2 * need + multiple}); using halo {h}: "
            "stitching is approximate"
        )
        return h, False, warnings
    exact = halo >= field.radius
    if not exact:
        warnings.append(f"halo {halo} < receptive field radius {field.radius}: stitching is "
                        "approximate (seams are possible)")
    return halo, exact, warnings
