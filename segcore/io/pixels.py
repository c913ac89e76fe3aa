"""What every scene source shares: the pixel types we serve and the source interface.

A *source* is one opened file/array with all its pyramid levels; ``segcore.io.readers.Scene``
wraps a source at one level. Sources are internal: callers use ``open_scene``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from segcore.errors import InputError, StorageError

NATIVE = ("uint8", "uint16", "float32")
# Converted on read: exactly (bool, int8, int16, float16) or with rounding (32/64-bit).
TO_FLOAT32 = ("int8", "int16", "float16", "int32", "uint32", "int64", "uint64", "float64")


# What a scene may declare before segcore refuses it (docs/RELIABILITY.md, hostile inputs): a
# header is only a claim, and a tiny file can declare 10^12 pixels or one 30 GB chunk.
MAX_PIXELS = 10**11  # pixels at the chosen level (316k x 316k); SEGCORE_MAX_PIXELS overrides
MAX_CHUNK_BYTES = 2**31  # one chunk (TIFF tile or strip, Zarr chunk) decodes whole on a read


def max_pixels() -> int:
    import os

    env = os.environ.get("SEGCORE_MAX_PIXELS", "").strip()
    return int(env) if env.isdigit() and int(env) > 0 else MAX_PIXELS


def check_scene_size(uri: str, level: int, height: int, width: int) -> None:
    """Refuse a level that declares more pixels than ``max_pixels()``: before anything is
    read or planned (planning and the foreground pass scale with the pixel count)."""
    n, limit = int(height) * int(width), max_pixels()
    if n > limit:
        raise InputError(
            f"{uri}: level {level} declares {height} x {width} pixels ({n:.3g}), more than "
            f"segcore's limit of {limit:.3g}; if the header is damaged, export the file again; "
            "if the scene is real, pick a coarser --level/--mpp or raise SEGCORE_MAX_PIXELS"
        )


def check_chunk(uri: str, level: int, chunks: tuple[int, ...], itemsize: int) -> None:
    """Refuse a level whose chunks (what one read decodes whole) exceed MAX_CHUNK_BYTES."""
    size = int(np.prod([int(c) for c in chunks], dtype=np.float64)) * int(itemsize)
    if size > MAX_CHUNK_BYTES:
        raise InputError(
            f"{uri}: level {level} is stored in chunks of {' x '.join(map(str, chunks))} "
            f"({size / 2**30:.3g} GiB decoded each), more than segcore reads at once "
            f"({MAX_CHUNK_BYTES / 2**30:.3g} GiB); save it tiled (e.g. 512 x 512 tiles: "
            "tifffile tile=, gdal_translate -co TILED=YES, or a chunked Zarr)"
        )


def output_dtype(dtype: Any, uri: str) -> np.dtype:
    """The dtype a scene serves for pixels stored as ``dtype`` (or InputError)."""
    dt = np.dtype(dtype)
    if dt.name in NATIVE:
        return dt
    if dt == np.bool_:
        return np.dtype("uint8")
    if dt.name in TO_FLOAT32:
        return np.dtype("float32")
    raise InputError(
        f"{uri}: pixel type {dt.name} is not supported; convert the image to uint8, uint16 or "
        "float32 (e.g. with gdal_translate -ot or tifffile)"
    )


def to_output(arr: np.ndarray, dtype: np.dtype) -> np.ndarray:
    return arr if arr.dtype == dtype else arr.astype(dtype)


def level_ratio(shapes: tuple[tuple[int, int], ...], level: int) -> tuple[float, float]:
    """(fy, fx): how many level-0 pixels one pixel of ``level`` spans along y and x."""
    (h0, w0), (h, w) = shapes[0], shapes[level]
    return h0 / h, w0 / w


@dataclass
class SourceMeta:
    """Level-independent facts about a source (pixel size and geo are those of level 0)."""

    uri: str
    format: str
    level_shapes: tuple[tuple[int, int], ...]
    channels: int
    dtype: str
    pixel_size: float | None = None
    pixel_unit: str | None = None
    geo: dict | None = None
    nodata: float | None = None
    channel_names: tuple[str, ...] | None = None  # one per channel, where the format names them
    notes: tuple[str, ...] = ()  # what the reader inferred or worked around (report warnings)


def clean_names(names: list[str | None] | None, n: int) -> tuple[str, ...] | None:
    """Channel names as a tuple when there is a non-empty, stripped name for each of the ``n``
    channels (``None`` otherwise: a partial or missing list names nothing)."""
    if not names or len(names) != n:
        return None
    out = tuple((str(v) if v is not None else "").strip() for v in names)
    return out if all(out) else None


class Source:
    """Interface of a scene source (TIFF, Zarr, Pillow)."""

    meta: SourceMeta

    def open_level(self, level: int) -> None:
        """Prepare reads of ``level`` (and check it is complete, if that is cheap)."""

    def read(self, level: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """(y1-y0, x1-x0, channels) in ``meta.dtype``; the region is already validated."""
        raise NotImplementedError

    def close(self) -> None:
        """Release file handles."""


def parse_nodata(value: Any) -> float | None:
    """GDAL_NODATA text ('0', '-9999', 'nan') or a number -> float."""
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    text = str(value).strip().strip("\x00")
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        return None


def read_region(arr: Any, axes: str, y: str, x: str, c: str | None, channels: slice,
                y0: int, y1: int, x0: int, x1: int, uri: str, level: int) -> np.ndarray:
    """Read a (y, x) region of ``arr`` whose axes are named by the letters of ``axes`` (``y``,
    ``x`` and the channel letter ``c`` among them; any other axis is taken at index 0) and
    return it as (h, w, channels). Storage failures become StorageError, decoder failures
    InputError naming the file and the region."""
    idx: list[Any] = []
    kept = ""
    for a in axes:
        if a == y:
            idx.append(slice(y0, y1))
        elif a == x:
            idx.append(slice(x0, x1))
        elif c is not None and a == c:
            idx.append(channels)
        else:
            idx.append(0)
            continue
        kept += a
    where = f"y {y0}:{y1}, x {x0}:{x1} (level {level})"
    try:
        out = np.asarray(arr[tuple(idx)])
    except FileNotFoundError as e:
        raise InputError(f"{uri}: file vanished while reading {where}: {e}") from e
    except OSError as e:
        raise StorageError(f"{uri}: I/O error reading {where}: {e}") from e
    except Exception as e:  # decoder errors have many types (imagecodecs, zlib, tifffile, zarr)
        raise InputError(
            f"{uri}: cannot decode region {where}: {type(e).__name__}: {e}; the file is "
            "corrupt or truncated: copy or export it again"
        ) from e
    if c is None or c not in kept:
        out, kept = out[..., None], kept + "\0"
    chan = next(i for i, a in enumerate(kept) if a not in (y, x))
    return out.transpose([kept.index(y), kept.index(x), chan])
