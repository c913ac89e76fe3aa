"""Zarr v3 stores and OME-Zarr 0.5 metadata (written by ome-zarr-py, not by hand).

Arrays are chunked and sharded with zstd. The sharding rule from ECOSYSTEM.md holds throughout:
exactly one writer per shard (a shard is rewritten whole), so every writer in segcore writes
whole shards, aligned to the shard grid.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import zarr
from ome_zarr.format import FormatV05
from ome_zarr.writer import add_metadata, write_label_metadata, write_multiscales_metadata
from zarr.codecs import BloscCodec

from segcore.errors import InputError, StorageError
from segcore.io.uri import is_local, storage_options

OME = FormatV05()


def codec() -> BloscCodec:
    return BloscCodec(cname="zstd", clevel=5, shuffle="bitshuffle")


def open_store(uri: str, read_only: bool = False):
    """A zarr store for a local path, file:// or any fsspec URL."""
    if is_local(uri):
        path = uri[len("file://"):] if uri.startswith("file://") else uri
        return zarr.storage.LocalStore(path, read_only=read_only)
    try:
        return zarr.storage.FsspecStore.from_url(uri, storage_options=storage_options(uri),
                                                 read_only=read_only)
    except (OSError, ValueError) as e:
        raise StorageError(f"{uri}: cannot open as a Zarr store: {e}") from e


def open_group(uri: str, mode: str = "r") -> zarr.Group:
    try:
        return zarr.open_group(open_store(uri, read_only=mode == "r"), mode=mode, zarr_format=3)
    except FileNotFoundError as e:
        raise InputError(f"{uri}: no Zarr group there") from e


def n_levels_for(height: int, width: int, min_side: int = 256, max_levels: int = 8) -> int:
    """Pyramid depth: halve until the longer side is at most ``min_side``."""
    n = 1
    while max(height, width) / 2 ** (n - 1) > min_side and n < max_levels:
        n += 1
    return n


def level_shape(height: int, width: int, level: int) -> tuple[int, int]:
    return math.ceil(height / 2**level), math.ceil(width / 2**level)


def _axes(channels: int | None, unit: str | None) -> list[dict[str, Any]]:
    space = [{"name": a, "type": "space", **({"unit": unit} if unit else {})} for a in "yx"]
    return ([{"name": "c", "type": "channel"}] if channels else []) + space


def create_multiscale(group: zarr.Group, height: int, width: int, channels: int | None,
                      dtype: str, shard: int, chunk: int, n_levels: int,
                      pixel_size: float | None, unit: str | None, name: str,
                      fill_value: float = 0) -> None:
    """Create arrays ``0..n_levels-1`` (each level half the previous) and write the OME
    multiscales metadata. ``channels=None`` makes (y, x) arrays; else (c, y, x)."""
    datasets = []
    for lv in range(n_levels):
        h, w = level_shape(height, width, lv)
        shape = (h, w) if channels is None else (channels, h, w)
        chunks = (chunk, chunk) if channels is None else (1, chunk, chunk)
        shards = (shard, shard) if channels is None else (1, shard, shard)
        group.create_array(
            str(lv), shape=shape, dtype=dtype, chunks=chunks, shards=shards,
            compressors=codec(), fill_value=fill_value, overwrite=True,
            dimension_names=(["y", "x"] if channels is None else ["c", "y", "x"]),
        )
        s = (pixel_size or 1.0) * 2**lv
        scale = [s, s] if channels is None else [1.0, s, s]
        datasets.append({"path": str(lv),
                         "coordinateTransformations": [{"type": "scale", "scale": scale}]})
    write_multiscales_metadata(group, datasets, fmt=OME, axes=_axes(channels, unit), name=name)


def finish_label(root: zarr.Group, name: str, class_names: tuple[str, ...]) -> None:
    """Register ``labels/<name>`` (already holding its multiscales) as an OME label image of
    ``root``, with a colour and class name per value, so napari/QuPath show the classes."""
    palette = [(0, 0, 0, 0), (255, 64, 64, 160), (64, 160, 255, 160), (64, 255, 64, 160),
               (255, 200, 0, 160), (200, 0, 255, 160)]
    labels = root["labels"]
    colors = [{"label-value": i, "rgba": list(palette[i % len(palette)])}
              for i in range(len(class_names))]
    props = [{"label-value": i, "class": n} for i, n in enumerate(class_names)]
    write_label_metadata(labels, name, colors=colors, properties=props, fmt=OME,
                         source={"image": "../../"})
    add_metadata(labels, {"version": OME.version}, fmt=OME)


def write_block(arr: zarr.Array, y0: int, x0: int, data: np.ndarray) -> None:
    """Write ``data`` ((h, w) or (c, h, w)) at (y0, x0). Callers own the whole shard."""
    try:
        if arr.ndim == 2:
            arr[y0:y0 + data.shape[0], x0:x0 + data.shape[1]] = data
        else:
            arr[:, y0:y0 + data.shape[1], x0:x0 + data.shape[2]] = data
    except OSError as e:
        raise StorageError(f"write of block at ({y0}, {x0}) failed: {e}") from e


def downsample_block(src: zarr.Array, dst: zarr.Array, row: int, col: int, shard: int,
                     method: str) -> None:
    """Compute shard (row, col) of ``dst`` (a level) from ``src`` (the level above, 2x):
    'mean' for intensities and probabilities, 'nearest' for labels."""
    h, w = dst.shape[-2:]
    y0, x0 = row * shard, col * shard
    y1, x1 = min(y0 + shard, h), min(x0 + shard, w)
    if y0 >= h or x0 >= w:
        return
    sy0, sy1 = 2 * y0, min(2 * y1, src.shape[-2])
    sx0, sx1 = 2 * x0, min(2 * x1, src.shape[-1])
    block = src[..., sy0:sy1, sx0:sx1]
    if method == "nearest":
        out = block[..., ::2, ::2]
    else:
        # pad odd edges by repetition, then average 2x2
        ph, pw = (sy1 - sy0) % 2, (sx1 - sx0) % 2
        if ph or pw:
            pad = [(0, 0)] * (block.ndim - 2) + [(0, ph), (0, pw)]
            block = np.pad(block, pad, mode="edge")
        f = block.astype(np.float32)
        f = (f[..., 0::2, 0::2] + f[..., 1::2, 0::2] + f[..., 0::2, 1::2] + f[..., 1::2, 1::2]) / 4
        if np.issubdtype(dst.dtype, np.integer):
            f = np.rint(f)
        out = f.astype(dst.dtype)
    write_block(dst, y0, x0, out[..., : y1 - y0, : x1 - x0])
