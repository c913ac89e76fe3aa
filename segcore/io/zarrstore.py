"""Zarr v3 stores and OME-Zarr 0.5 metadata (built and validated by ome-zarr-models, the OME
community's pydantic models of the spec, not by hand; ome-zarr-py reads it back in the tests).

Arrays are chunked and sharded with zstd. The sharding rule from ECOSYSTEM.md holds throughout:
exactly one writer per shard (a shard is rewritten whole), so every writer in segcore writes
whole shards, aligned to the shard grid. Each pyramid level has its own shard edge, so a tile
that owns a core at level 0 also owns that core's footprint at the levels it can fill itself.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

from segcore.errors import InputError, StorageError
from segcore.io.uri import (
    bound_retries,
    is_local,
    storage_error_types,
    storage_failure,
    storage_options,
)

OME_VERSION = "0.5"


def codec(dtype: str | np.dtype = "uint8"):
    """The compressor for an array of ``dtype``: plain zstd level 3 for bytes (uint8 masks,
    probabilities and images: 4x faster than blosc-zstd-5 with bit-shuffle and half its size
    on probability planes, measured), blosc-zstd with byte shuffle for wider types."""
    if np.dtype(dtype).itemsize == 1:
        return ZstdCodec(level=3)
    return BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")


def open_store(uri: str, read_only: bool = False):
    """A zarr store for a local path, file:// or any fsspec URL."""
    if is_local(uri):
        path = uri[len("file://"):] if uri.startswith("file://") else uri
        return zarr.storage.LocalStore(path, read_only=read_only)
    try:
        store = zarr.storage.FsspecStore.from_url(uri, storage_options=storage_options(uri),
                                                  read_only=read_only)
    except (OSError, ValueError) as e:
        raise StorageError(f"{uri}: cannot open as a Zarr store: {e}") from e
    bound_retries(store.fs)  # zarr builds its own (async) filesystem instance
    return store


def open_group(uri: str, mode: str = "r") -> zarr.Group:
    try:
        return zarr.open_group(open_store(uri, read_only=mode == "r"), mode=mode, zarr_format=3)
    except FileNotFoundError as e:
        if mode == "r":
            raise InputError(f"{uri}: no Zarr group there") from e
        raise InputError(f"{uri}: cannot create the Zarr group ({e}); create the bucket or "
                         "fix the output URI") from e
    except StorageError:
        raise
    except storage_error_types() as e:
        raise storage_failure(uri, "cannot open the Zarr group", e) from e


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
                      dtype: str, shard: int | list[int], chunk: int | list[int], n_levels: int,
                      pixel_size: float | None, unit: str | None, name: str,
                      fill_value: float = 0) -> None:
    """Create arrays ``0..n_levels-1`` (each level half the previous) and write the OME
    multiscales metadata. ``channels=None`` makes (y, x) arrays; else (c, y, x). ``shard`` and
    ``chunk`` are one edge for every level or a list with one per level."""
    from ome_zarr_models.v05.axes import Axis
    from ome_zarr_models.v05.image import ImageAttrs
    from ome_zarr_models.v05.multiscales import Dataset, Multiscale

    shards = shard if isinstance(shard, list) else [shard] * n_levels
    chunks_ = chunk if isinstance(chunk, list) else [chunk] * n_levels
    datasets = []
    for lv in range(n_levels):
        h, w = level_shape(height, width, lv)
        shape = (h, w) if channels is None else (channels, h, w)
        sh, ch = shards[lv], chunks_[lv]
        chunks = (ch, ch) if channels is None else (1, ch, ch)
        shards_ = (sh, sh) if channels is None else (1, sh, sh)
        group.create_array(
            str(lv), shape=shape, dtype=dtype, chunks=chunks, shards=shards_,
            compressors=codec(dtype), fill_value=fill_value, overwrite=True,
            dimension_names=(["y", "x"] if channels is None else ["c", "y", "x"]),
        )
        s = (pixel_size or 1.0) * 2**lv
        scale = [s, s] if channels is None else [1.0, s, s]
        datasets.append(Dataset.build(path=str(lv), scale=scale, translation=None))
    axes = [Axis(**a) for a in _axes(channels, unit)]
    attrs = ImageAttrs(version=OME_VERSION, multiscales=[
        Multiscale(axes=axes, datasets=tuple(datasets), name=name)])
    group.attrs["ome"] = attrs.model_dump(mode="json", exclude_none=True, by_alias=True)


def write_omero(group: zarr.Group, names: tuple[str, ...], dtype: str) -> None:
    """Name the image's channels the OME way (``omero.channels[].label``, with a display window
    over the dtype's range), which napari, OMERO and ``segcore`` itself read back."""
    from ome_zarr_models.common.omero import Channel, Omero, Window

    dt = np.dtype(dtype)
    lo, hi = (0.0, 1.0) if dt.kind == "f" else (float(np.iinfo(dt).min), float(np.iinfo(dt).max))
    colours = ("0000FF", "00FF00", "FF0000", "FFFFFF") if len(names) != 3 else \
        ("FF0000", "00FF00", "0000FF")
    omero = Omero(channels=[
        Channel(color=colours[i % len(colours)], window=Window(min=lo, max=hi, start=lo, end=hi),
                label=n, active=True) for i, n in enumerate(names)])
    attrs = dict(group.attrs["ome"])
    attrs["omero"] = omero.model_dump(mode="json", exclude_none=True)
    group.attrs["ome"] = attrs


def finish_label(root: zarr.Group, name: str, class_names: tuple[str, ...],
                 nodata_label: int | None = None) -> None:
    """Register ``labels/<name>`` (already holding its multiscales) as an OME label image of
    ``root``, with a colour and class name per value, so napari/QuPath show the classes
    (and, with ``nodata_label``, that value as the transparent class 'nodata')."""
    from ome_zarr_models.v05.image_label import ImageLabelAttrs
    from ome_zarr_models.v05.labels import LabelsAttrs

    palette = [(0, 0, 0, 0), (255, 64, 64, 160), (64, 160, 255, 160), (64, 255, 64, 160),
               (255, 200, 0, 160), (200, 0, 255, 160)]
    labels = root["labels"]
    colors = [{"label-value": i, "rgba": list(palette[i % len(palette)])}
              for i in range(len(class_names))]
    props = [{"label-value": i, "class": n} for i, n in enumerate(class_names)]
    if nodata_label is not None:
        colors.append({"label-value": nodata_label, "rgba": [0, 0, 0, 0]})
        props.append({"label-value": nodata_label, "class": "nodata"})
    group = labels[name]
    ms = group.attrs["ome"]["multiscales"]
    attrs = ImageLabelAttrs.model_validate({
        "version": OME_VERSION, "multiscales": ms,
        "image-label": {"version": OME_VERSION, "colors": colors, "properties": props,
                        "source": {"image": "../../"}}})
    group.attrs["ome"] = attrs.model_dump(mode="json", exclude_none=True, by_alias=True)
    labels.attrs["ome"] = LabelsAttrs(version=OME_VERSION, labels=[name]).model_dump(
        mode="json", exclude_none=True)


def _dense(arr: zarr.Array) -> zarr.Array:
    """``arr`` writing every chunk it is given, fill-valued ones too. zarr's default
    (write_empty_chunks=False) compares each inner chunk with the fill value before encoding
    it: on one core that check took 40% of a tile's write (16 tiles of 1024^2 with their
    pyramid shards: 0.55-0.68 s -> 0.35-0.43 s). A fill-valued chunk inside a shard costs a
    few bytes of zstd, and tiles with nothing to write (background) are still never written."""
    return arr.with_config({"write_empty_chunks": True})


def write_block(arr: zarr.Array, y0: int, x0: int, data: np.ndarray) -> None:
    """Write ``data`` ((h, w) or (c, h, w)) at (y0, x0). Callers own the whole shard."""
    arr = _dense(arr)
    try:
        if arr.ndim == 2:
            arr[y0:y0 + data.shape[0], x0:x0 + data.shape[1]] = data
        else:
            arr[:, y0:y0 + data.shape[1], x0:x0 + data.shape[2]] = data
    except storage_error_types() as e:
        raise StorageError(f"write of block at ({y0}, {x0}) failed: {e}") from e


def _region(arr: zarr.Array, y0: int, x0: int, data: np.ndarray) -> tuple[slice, ...]:
    ys, xs = slice(y0, y0 + data.shape[-2]), slice(x0, x0 + data.shape[-1])
    return (ys, xs) if arr.ndim == 2 else (slice(None), ys, xs)


def write_blocks(blocks: list[tuple[zarr.Array, int, int, np.ndarray]]) -> None:
    """Several :func:`write_block` calls issued together on zarr's event loop (one round trip
    instead of one per array: a tile's level-0 and pyramid shards cost ~30% less this way).
    Callers own every shard they write."""
    import asyncio

    from zarr.core.sync import sync

    async def all_writes():
        await asyncio.gather(*(_dense(a).async_array.setitem(_region(a, y0, x0, d), d)
                               for a, y0, x0, d in blocks))

    try:
        sync(all_writes())
    except storage_error_types() as e:
        where = ", ".join(f"{a.path} at ({y0}, {x0})" for a, y0, x0, _ in blocks[:4])
        raise StorageError(f"write of blocks {where} failed: {e}") from e


def downsample2(block: np.ndarray, method: str, dtype) -> np.ndarray:
    """Halve the last two axes of ``block``: 'nearest' takes every other pixel (labels),
    'mean' averages 2x2 (an odd edge padded by repetition; integers rounded). The one
    definition both the in-task pyramid and :func:`downsample_block` use."""
    if method == "nearest":
        return block[..., ::2, ::2]
    ph, pw = block.shape[-2] % 2, block.shape[-1] % 2
    if ph or pw:
        pad = [(0, 0)] * (block.ndim - 2) + [(0, ph), (0, pw)]
        block = np.pad(block, pad, mode="edge")
    f = block.astype(np.float32)
    f = (f[..., 0::2, 0::2] + f[..., 1::2, 0::2] + f[..., 0::2, 1::2] + f[..., 1::2, 1::2]) / 4
    if np.issubdtype(np.dtype(dtype), np.integer):
        f = np.rint(f)
    return f.astype(dtype)


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
    out = downsample2(src[..., sy0:sy1, sx0:sx1], method, dst.dtype)
    write_block(dst, y0, x0, out[..., : y1 - y0, : x1 - x0])
