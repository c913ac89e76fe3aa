"""TIFF family source: TIFF/BigTIFF, pyramidal TIFF, OME-TIFF, Aperio SVS, GeoTIFF.

Regions are read lazily through tifffile's Zarr store (``series[0].aszarr(level=L)``), so a
small region of a tiled file decodes only the tiles it touches. Remote files are read through
an fsspec file object. The store holds a lock and is never pickled (``Scene`` pickles its URI).
"""

from __future__ import annotations

import os
import re
import struct
import xml.etree.ElementTree as ET
from typing import Any

import numpy as np
import tifffile
import zarr

from segcore.errors import InputError, StorageError
from segcore.io import geo as geomod
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
from segcore.io.uri import get_fs, is_local

CHANNEL_AXES = "SC"  # samples (RGB...) and OME channels
ALPHA = (1, 2)  # ExtraSamples: associated / unassociated alpha
_OME_UNITS_UM = {"nm": 1e-3, "µm": 1.0, "um": 1.0, "mm": 1e3, "cm": 1e4, "m": 1e6, "Å": 1e-4}
DECODE_THREADS = 4  # > 1 turns on tifffile's threaded tile decode (the threads are zarr's)
_MPP = re.compile(r"\bMPP\s*=\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)")


class TiffSource(Source):
    def __init__(self, uri: str) -> None:
        self.uri = uri
        self._fh = None
        self._arrays: dict[int, Any] = {}
        self._stores: list[Any] = []
        fs, path = get_fs(uri)
        try:
            if is_local(uri):
                self._size = os.path.getsize(path)
                self._tif = tifffile.TiffFile(path)
            else:
                self._fh = fs.open(path, "rb", block_size=2**20, cache_type="readahead")
                self._size = int(self._fh.size)
                self._tif = tifffile.TiffFile(self._fh)
        except FileNotFoundError as e:
            raise InputError(f"{uri}: no such file") from e
        except (
            tifffile.TiffFileError,
            ValueError,
            IndexError,
            KeyError,
            struct.error,
            EOFError,
        ) as e:
            self.close()
            raise InputError(f"{uri}: not a readable TIFF ({e}); check the file is complete") from e
        except OSError as e:
            self.close()
            raise StorageError(f"{uri}: cannot open: {e}") from e
        try:
            self.meta = self._inspect()
        except BaseException:
            self.close()
            raise

    # --- metadata -------------------------------------------------------------------------
    def _inspect(self) -> SourceMeta:
        tif, uri = self._tif, self.uri
        if not tif.series:
            raise InputError(f"{uri}: TIFF has no image")
        series = tif.series[0]
        axes, shape = series.axes, series.shape
        if "Y" not in axes or "X" not in axes:
            raise InputError(f"{uri}: TIFF image has axes {axes!r}, expected a 2-D image (Y, X)")
        extra = [(a, n) for a, n in zip(axes, shape, strict=True) if a not in "YX" and n > 1]
        chan = [a for a, _ in extra if a in CHANNEL_AXES]
        other = [f"{a}={n}" for a, n in extra if a not in CHANNEL_AXES]
        if other or len(chan) > 1:
            raise InputError(
                f"{uri}: TIFF image has axes {axes!r} with shape {shape}; segcore reads one 2-D "
                f"image (Y, X and one channel axis), not a stack ({', '.join(other) or axes}); "
                "split the stack into single images"
            )
        self._axes = axes
        self._chan_axis = chan[0] if chan else None
        nch = shape[axes.index(self._chan_axis)] if self._chan_axis else 1
        page = series.keyframe
        nalpha = 0
        if self._chan_axis == "S":
            extras = tuple(getattr(page, "extrasamples", ()) or ())
            while nalpha < len(extras) and extras[len(extras) - 1 - nalpha] in ALPHA:
                nalpha += 1
        self._nch = nch - nalpha
        levels = []
        for lv in series.levels:
            if lv.axes != axes:
                break  # a level with other axes is not part of this pyramid
            levels.append((int(lv.shape[axes.index("Y")]), int(lv.shape[axes.index("X")])))
        self._dtype = output_dtype(series.dtype, uri)
        if tif.is_svs:
            fmt = "svs"
        elif tif.is_ome:
            fmt = "ome-tiff"
        elif tif.is_geotiff:
            fmt = "geotiff"
        else:
            fmt = "tiff"
        meta = SourceMeta(
            uri=uri,
            format=fmt,
            level_shapes=tuple(levels),
            channels=self._nch,
            dtype=self._dtype.name,
            nodata=parse_nodata(page.tags.valueof(42113)),
        )
        if tif.is_geotiff:
            keys = tif.geotiff_metadata
            meta.geo = geomod.geotiff_geo(keys)
            if meta.geo is not None:
                meta.pixel_size = geomod.transform_pixel_size(meta.geo["transform"])
                meta.pixel_unit = geomod.geotiff_unit(keys)
                if meta.pixel_unit is None:
                    meta.pixel_size = None
        elif fmt == "svs":
            m = _MPP.search(page.description or "")
            if m:
                meta.pixel_size, meta.pixel_unit = float(m.group(1)), "micrometer"
        elif fmt == "ome-tiff":
            meta.pixel_size = _ome_pixel_size(tif.ome_metadata)
            meta.pixel_unit = "micrometer" if meta.pixel_size else None
        else:
            meta.pixel_size = _resolution_um(tif, page)
            meta.pixel_unit = "micrometer" if meta.pixel_size else None
        meta.channel_names = _channel_names(tif, series, page, self._nch)
        return meta

    # --- reading --------------------------------------------------------------------------
    def open_level(self, level: int) -> None:
        if level in self._arrays:
            return
        lv = self._tif.series[0].levels[level]
        self._check_complete(lv, level)
        # maxworkers > 1: tifffile decodes each tile with asyncio.to_thread instead of inline on
        # zarr's one event-loop thread (its own default picks inline below 6 cores, so on a
        # small host every lane's decode queued on that one thread; profile-i21-sim-60.txt)
        store = self._tif.series[0].aszarr(level=level, maxworkers=DECODE_THREADS)
        self._stores.append(store)
        arr = zarr.open_array(store, mode="r")
        check_chunk(self.uri, level, arr.chunks, arr.dtype.itemsize)  # a strip decodes whole
        self._arrays[level] = arr

    def _check_complete(self, lv: Any, level: int) -> None:
        """Every tile/strip of the level must lie inside the file (tifffile would not notice)."""
        total = bad = 0
        for page in lv.pages:
            if page is None:
                continue
            offs = np.asarray(page.dataoffsets, dtype=np.int64)
            cnts = np.asarray(page.databytecounts, dtype=np.int64)
            total += offs.size
            bad += int(np.count_nonzero((cnts > 0) & (offs + cnts > self._size)))
        if bad:
            raise InputError(
                f"{self.uri}: truncated TIFF: {bad} of {total} tiles/strips of level {level} lie "
                f"beyond the end of the file ({self._size} bytes); copy or export the file again"
            )

    def read(self, level: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        out = read_region(self._arrays[level], self._axes, "Y", "X", self._chan_axis,
                          slice(0, self._nch), y0, y1, x0, x1, self.uri, level)
        return to_output(np.ascontiguousarray(out), self._dtype)

    def close(self) -> None:
        for store in self._stores:
            try:
                store.close()
            except Exception:  # noqa: BLE001 - closing is best effort
                pass
        self._stores.clear()
        self._arrays.clear()
        tif = getattr(self, "_tif", None)
        if tif is not None:
            tif.close()
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def _ome_pixel_size(xml: str | None) -> float | None:
    """PhysicalSizeX of the first OME image in micrometres."""
    if not xml:
        return None
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    ns = root.tag.split("}")[0] + "}" if root.tag.startswith("{") else ""
    pixels = root.find(f"{ns}Image/{ns}Pixels")
    if pixels is None or pixels.get("PhysicalSizeX") is None:
        return None
    factor = _OME_UNITS_UM.get(pixels.get("PhysicalSizeXUnit", "µm"))
    try:
        size = float(pixels.get("PhysicalSizeX"))
    except ValueError:
        return None
    return size * factor if factor and size > 0 else None


def _xml(text: Any) -> ET.Element | None:
    if not text:
        return None
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    try:
        return ET.fromstring(str(text).strip().strip("\x00"))
    except ET.ParseError:
        return None


def _channel_names(tif: tifffile.TiffFile, series: Any, page: Any,
                   n: int) -> tuple[str, ...] | None:
    """Names of the ``n`` channels: OME-XML ``Channel/@Name``, QPTIFF per-page ``<Biomarker>``
    (else ``<Name>``), or GDAL band descriptions (``GDAL_METADATA`` items with role
    description, what rasterio's ``descriptions`` write). None unless every channel is named."""
    if tif.is_ome:
        root = _xml(tif.ome_metadata)
        if root is not None:
            ns = root.tag.split("}")[0] + "}" if root.tag.startswith("{") else ""
            pixels = root.find(f"{ns}Image/{ns}Pixels")
            if pixels is not None:
                names = clean_names([c.get("Name") for c in pixels.findall(f"{ns}Channel")], n)
                if names:
                    return names
    if getattr(tif, "is_qpi", False):
        found: list[str | None] = []
        for pg in series.pages[:n] if n > 1 else [page]:
            root = _xml(getattr(pg, "description", None)) if pg is not None else None
            el = None if root is None else (root.find(".//Biomarker")
                                            if root.find(".//Biomarker") is not None
                                            else root.find(".//Name"))
            found.append(None if el is None else el.text)
        names = clean_names(found, n)
        if names:
            return names
    root = _xml(page.tags.valueof(42112))  # GDAL_METADATA
    if root is not None:
        bands: dict[int, str] = {}
        for item in root.iter("Item"):
            if item.get("role") == "description" and item.get("sample") is not None:
                try:
                    bands[int(item.get("sample"))] = item.text or ""
                except ValueError:
                    continue
        if bands:
            return clean_names([bands.get(i) for i in range(n)], n)
    return None


def _resolution_um(tif: tifffile.TiffFile, page: Any) -> float | None:
    """Pixel size from XResolution/ResolutionUnit (inch, cm) or ImageJ's 'unit=micron'."""
    if 282 not in page.tags:
        return None
    xres = page.resolution[0]
    if not xres or xres <= 0:
        return None
    unit = page.resolutionunit
    if unit == 2:
        return 25400.0 / xres
    if unit == 3:
        return 10000.0 / xres
    if tif.is_imagej:
        u = str((tif.imagej_metadata or {}).get("unit", "")).lower()
        if u in ("micron", "um", "µm", "\\u00b5m", "microns"):
            return 1.0 / xres
    return None
