"""Zarr source: a Zarr array (v3 or v2) or an OME-Zarr group (multiscales -> pyramid levels).

Axes come from OME-Zarr ``axes``, Zarr v3 ``dimension_names`` or xarray's ``_ARRAY_DIMENSIONS``;
for an unnamed 3-D array a short last axis (<= 4) means (y, x, c), a short first axis means
(c, y, x). Scenes are always served as (h, w, c).

Georeferencing and nodata of a Zarr written by ``segcore ingest`` are read from the root
attribute ``segcore``: ``{"geo": {"crs": ..., "transform": [...]}, "nodata": ...}`` (level 0).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import zarr
import zarr.storage

from segcore.errors import InputError, StorageError
from segcore.io.pixels import (
    Source,
    SourceMeta,
    check_chunk,
    clean_names,
    output_dtype,
    parse_nodata,
    read_region,
    to_output,
)
from segcore.io.uri import get_fs, is_local, storage_options

CHANNEL_NAMES = ("c", "channel", "channels", "band", "bands", "s", "sample")
# NGFF space units -> (factor, unit we report)
_UNITS = {
    "nanometer": (1e-3, "micrometer"),
    "micrometer": (1.0, "micrometer"),
    "micron": (1.0, "micrometer"),
    "millimeter": (1e3, "micrometer"),
    "centimeter": (1e4, "micrometer"),
    "meter": (1.0, "meter"),
    "kilometer": (1e3, "meter"),
    "degree": (1.0, "degree"),
}


def open_store(uri: str) -> Any:
    if is_local(uri):
        _, path = get_fs(uri)
        return zarr.storage.LocalStore(path, read_only=True)
    return zarr.storage.FsspecStore.from_url(
        uri, storage_options=storage_options(uri), read_only=True
    )


class ZarrSource(Source):
    def __init__(self, uri: str) -> None:
        self.uri = uri
        try:
            node = zarr.open(store=open_store(uri), mode="r")
        except FileNotFoundError as e:
            raise InputError(f"{uri}: no Zarr array or group here ({e})") from e
        except OSError as e:
            raise StorageError(f"{uri}: cannot open Zarr: {e}") from e
        except (ValueError, KeyError, TypeError) as e:
            raise InputError(
                f"{uri}: not a readable Zarr ({type(e).__name__}: {e}); its zarr.json (or "
                ".zarray) is damaged or names a codec this installation lacks: write the array "
                "again with standard codecs (bytes, zstd, blosc, gzip, sharding)") from e
        scale = None
        unit_name = None
        fmt = "zarr"
        attrs = dict(node.attrs)
        if isinstance(node, zarr.Array):
            arrays = [node]
            names = _dimension_names(node)
        else:
            ome = attrs.get("ome", attrs)
            multiscales = ome.get("multiscales") if isinstance(ome, dict) else None
            if multiscales:
                fmt = "ome-zarr"
                arrays, names, scale, unit_name = self._multiscales(node, multiscales[0])
            else:
                found = dict(node.arrays())
                if not found:
                    raise InputError(
                        f"{uri}: Zarr group has no array (and no OME-Zarr multiscales); "
                        "point to an image array or an OME-Zarr image group"
                    )
                if "0" in found:
                    pick = "0"
                elif len(found) == 1:
                    pick = next(iter(found))
                else:
                    raise InputError(
                        f"{uri}: Zarr group holds several arrays {sorted(found)} and no "
                        "multiscales; pass the URI of one array (e.g. URI/name)"
                    )
                arrays = [found[pick]]
                names = _dimension_names(arrays[0])
                attrs = {**dict(arrays[0].attrs), **attrs}
        self._arrays = arrays
        self._axes = _axes(uri, arrays[0].shape, names)
        shapes = []
        for a in arrays:
            if a.ndim != len(self._axes):
                raise InputError(f"{uri}: pyramid levels have different numbers of axes")
            shapes.append(
                (int(a.shape[self._axes.index("y")]), int(a.shape[self._axes.index("x")]))
            )
        self._nch = int(arrays[0].shape[self._axes.index("c")]) if "c" in self._axes else 1
        self._dtype = output_dtype(arrays[0].dtype, uri)
        own = attrs.get("segcore") if isinstance(attrs.get("segcore"), dict) else {}
        self.meta = SourceMeta(
            uri=uri,
            format=fmt,
            level_shapes=tuple(shapes),
            channels=self._nch,
            dtype=self._dtype.name,
            geo=own.get("geo"),
            nodata=parse_nodata(own.get("nodata")),
        )
        if scale is not None and unit_name in _UNITS:
            factor, unit = _UNITS[unit_name]
            self.meta.pixel_size, self.meta.pixel_unit = scale * factor, unit
        elif own.get("pixel_size") is not None:
            self.meta.pixel_size = float(own["pixel_size"])
            self.meta.pixel_unit = own.get("pixel_unit")
        self.meta.channel_names = _channel_names(attrs, own, self._nch)

    def _multiscales(self, group: Any, ms: dict) -> tuple[list, list[str] | None, Any, Any]:
        axes = ms.get("axes")
        names = None
        units: dict[str, Any] = {}
        if axes:
            names = [a["name"] if isinstance(a, dict) else str(a) for a in axes]
            for a in axes:
                if isinstance(a, dict):
                    if a.get("type") == "channel":
                        names[names.index(a["name"])] = "c"
                    units[a["name"]] = a.get("unit")
        arrays = []
        for ds in ms.get("datasets", []):
            try:
                arrays.append(group[ds["path"]])
            except KeyError as e:
                raise InputError(
                    f"{self.uri}: OME-Zarr multiscales names dataset {ds.get('path')!r} "
                    "which is missing"
                ) from e
        if not arrays:
            raise InputError(f"{self.uri}: OME-Zarr multiscales lists no datasets (no array)")
        scale = unit = None
        if names and "x" in names:
            xi = names.index("x")
            s = _scale(ms["datasets"][0].get("coordinateTransformations"), xi)
            g = _scale(ms.get("coordinateTransformations"), xi)
            if s is not None:
                scale = s * (g if g is not None else 1.0)
                unit = units.get("x")
        return arrays, names, scale, unit

    def open_level(self, level: int) -> None:
        arr = self._arrays[level]
        check_chunk(self.uri, level, arr.chunks, arr.dtype.itemsize)  # zarr.json is a claim

    def read(self, level: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        out = read_region(self._arrays[level], self._axes, "y", "x", "c", slice(None),
                          y0, y1, x0, x1, self.uri, level)
        return to_output(np.ascontiguousarray(out), self._dtype)


def _channel_names(attrs: dict, own: dict, n: int) -> tuple[str, ...] | None:
    """OME-Zarr ``omero.channels[].label`` (NGFF 0.5 under ``ome``, 0.4 at the top level), or
    the ``segcore.channel_names`` that ``segcore ingest`` writes."""
    names = clean_names(own.get("channel_names"), n) if isinstance(
        own.get("channel_names"), list) else None
    if names:
        return names
    for where in (attrs.get("ome"), attrs):
        omero = where.get("omero") if isinstance(where, dict) else None
        chans = omero.get("channels") if isinstance(omero, dict) else None
        if isinstance(chans, list):
            names = clean_names([c.get("label") if isinstance(c, dict) else None
                                 for c in chans], n)
            if names:
                return names
    return None


def _scale(transforms: Any, axis: int) -> float | None:
    for t in transforms or []:
        if isinstance(t, dict) and t.get("type") == "scale" and len(t.get("scale", [])) > axis:
            return float(t["scale"][axis])
    return None


def _dimension_names(arr: Any) -> list[str] | None:
    names = getattr(arr.metadata, "dimension_names", None)
    if names and all(names):
        return [str(n) for n in names]
    dims = arr.attrs.get("_ARRAY_DIMENSIONS")
    return [str(n) for n in dims] if dims else None


def _axes(uri: str, shape: tuple[int, ...], names: list[str] | None) -> str:
    """One letter per axis: y, x, c, or '-' for a singleton axis that is dropped."""
    if names is not None and len(names) == len(shape):
        out = ""
        for n, size in zip(names, shape, strict=True):
            n = n.lower()
            if n in ("y", "x"):
                out += n
            elif n in CHANNEL_NAMES:
                out += "c"
            elif size == 1:
                out += "-"
            else:
                raise InputError(
                    f"{uri}: Zarr axis {n!r} has size {size}; segcore reads one 2-D image "
                    "(y, x and optionally channels), not a stack; select one plane"
                )
        if out.count("y") == 1 and out.count("x") == 1 and out.count("c") <= 1:
            return out
        raise InputError(f"{uri}: cannot map Zarr axes {names} to (y, x, c)")
    if len(shape) == 2:
        return "yx"
    if len(shape) == 3:
        if shape[-1] <= 4:
            return "yxc"
        if shape[0] <= 16 and shape[0] < shape[-1]:
            return "cyx"
        if shape[-1] <= 16:
            return "yxc"
    if len(shape) > 3 and all(n == 1 for n in shape[:-3]):
        return "-" * (len(shape) - 3) + _axes(uri, shape[-3:], None)
    raise InputError(
        f"{uri}: Zarr array of shape {shape} has no axis names and no obvious channel axis; "
        "write it as (y, x), (y, x, c) or (c, y, x) with dimension_names"
    )
