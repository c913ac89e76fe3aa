"""Export the class mask of a result as a GeoTIFF that QGIS/GDAL open directly.

``export_geotiff(out)`` streams ``out/result.zarr/labels/mask/<level>`` tile by tile into a
tiled, deflate-compressed TIFF (memory is bounded by one tile, whatever the scene size). When
the scene was georeferenced (``result.zarr`` attrs ``segcore.geo``), the GeoTIFF tags are
written: ModelPixelScale + ModelTiepoint (north-up) or ModelTransformation (rotated or
south-up), and a GeoKeyDirectory with the EPSG code, PixelIsArea, as ``segcore.io.geo`` reads
them. A pyramid level ``N`` gets the transform scaled by ``2**N`` (level N pixel i covers level-0
pixels [i * 2**N, (i + 1) * 2**N)). A scene without geo gives a plain TIFF (no OME, no ImageJ
metadata). The file carries a palette (class colours, as in the OME label metadata) so
viewers show the classes in colour; its pixel values stay the class indices.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np

from segcore.errors import IncompleteResultError, InputError, StorageError
from segcore.io.uri import exists, get_fs, is_local, join, publish_file

RESULT = "result.zarr"
TIFF_TILE = 512
# GeoTIFF tags and keys (OGC GeoTIFF 1.1)
MODEL_PIXEL_SCALE, MODEL_TIEPOINT, MODEL_TRANSFORMATION, GEO_KEY_DIRECTORY = (
    33550, 33922, 34264, 34735)
GT_MODEL_TYPE, GT_RASTER_TYPE = 1024, 1025
GEOGRAPHIC_TYPE, GEOG_ANGULAR_UNITS = 2048, 2054
PROJECTED_CS_TYPE, PROJ_LINEAR_UNITS = 3072, 3076
MODEL_PROJECTED, MODEL_GEOGRAPHIC = 1, 2
RASTER_PIXEL_IS_AREA = 1
LINEAR_METRE, ANGULAR_DEGREE = 9001, 9102
PALETTE = [(0, 0, 0), (255, 64, 64), (64, 160, 255), (64, 255, 64), (255, 200, 0),
           (200, 0, 255)]  # as segcore.zarrstore.finish_label / preview


def geotiff_tags(geo: dict[str, Any] | None, pixel_unit: str | None) -> list[tuple]:
    """tifffile ``extratags`` that georeference a raster described by ``geo``
    (``{'crs': 'EPSG:n' | None, 'transform': [a, b, c, d, e, f]}``, GDAL order, corner of the
    first pixel). ``pixel_unit`` 'degree' marks a geographic CRS, anything else projected.
    Empty when there is no geo."""
    if not geo or not geo.get("transform"):
        return []
    a, b, c, d, e, f = (float(v) for v in geo["transform"])
    tags: list[tuple] = []
    if b == 0 and d == 0 and a > 0 and e < 0:  # north-up: scale + one tie point
        tags.append((MODEL_PIXEL_SCALE, "d", 3, (a, -e, 0.0), True))
        tags.append((MODEL_TIEPOINT, "d", 6, (0.0, 0.0, 0.0, c, f, 0.0), True))
    else:
        m = (a, b, 0.0, c, d, e, 0.0, f, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0)
        tags.append((MODEL_TRANSFORMATION, "d", 16, m, True))
    keys: dict[int, int] = {GT_RASTER_TYPE: RASTER_PIXEL_IS_AREA}
    code = _epsg(geo.get("crs"))
    geographic = pixel_unit == "degree"
    if code is not None:
        keys[GT_MODEL_TYPE] = MODEL_GEOGRAPHIC if geographic else MODEL_PROJECTED
        if geographic:
            keys[GEOGRAPHIC_TYPE] = code
            keys[GEOG_ANGULAR_UNITS] = ANGULAR_DEGREE
        else:
            keys[PROJECTED_CS_TYPE] = code
            if pixel_unit == "meter":
                keys[PROJ_LINEAR_UNITS] = LINEAR_METRE
    directory = [1, 1, 0, len(keys)]
    for key in sorted(keys):  # the spec wants keys in ascending order
        directory += [key, 0, 1, keys[key]]
    tags.append((GEO_KEY_DIRECTORY, "H", len(directory), tuple(directory), True))
    return tags


def _epsg(crs: str | None) -> int | None:
    if not crs:
        return None
    auth, _, num = str(crs).partition(":")
    if auth.upper() != "EPSG" or not num.isdigit():
        raise InputError(f"CRS {crs!r} is not an EPSG code; cannot write it as a GeoTIFF key")
    return int(num)


def level_geo(geo: dict[str, Any] | None, level: int) -> dict[str, Any] | None:
    """``geo`` of pyramid level ``level`` (each level halves the previous from the corner)."""
    if geo is None or level == 0:
        return geo
    from segcore.io.geo import scale_geo

    return scale_geo(geo, 2.0**level, 2.0**level)


def _colormap(n_classes: int) -> np.ndarray:
    cmap = np.zeros((3, 256), np.uint16)
    for i in range(256):
        r, g, b = PALETTE[i % len(PALETTE)] if i < max(n_classes, 1) else (0, 0, 0)
        cmap[:, i] = (r * 257, g * 257, b * 257)
    return cmap


def _tiles(arr, tile: int) -> Iterator[np.ndarray]:
    """Row-major tiles of a 2-D array, each padded with 0 to tile x tile (what TIFF wants)."""
    h, w = arr.shape
    for y in range(0, h, tile):
        for x in range(0, w, tile):
            block = np.asarray(arr[y:min(y + tile, h), x:min(x + tile, w)])
            if block.shape != (tile, tile):
                block = np.pad(block, ((0, tile - block.shape[0]), (0, tile - block.shape[1])))
            yield block


def export_geotiff(out_prefix: str, dst: str | None = None, level: int = 0,
                   require_complete: bool = True) -> str:
    """Write the mask of the result under ``out_prefix`` (pyramid ``level``) as a tiled,
    deflate-compressed GeoTIFF at ``dst`` (default ``<out_prefix>/mask.tif``; local or any
    fsspec URI). Returns ``dst``. Memory is bounded by one tile; the file appears whole or not
    at all (temp name + rename locally, one upload from a local temp file remotely)."""
    import tifffile

    from segcore.io.zarrstore import open_group

    _check_complete(out_prefix, require_complete)
    root = open_group(join(out_prefix, RESULT), mode="r")
    mask_group = root["labels/mask"]
    levels = sorted(int(k) for k in mask_group.array_keys() if k.isdigit())
    if level not in levels:
        raise InputError(
            f"{out_prefix}: mask level {level} does not exist; the levels are "
            f"{', '.join(map(str, levels))} (use --level 0..{levels[-1]})")
    arr = mask_group[str(level)]
    attrs = dict(root.attrs.get("segcore") or {})
    geo = level_geo(attrs.get("geo"), level)
    tags = geotiff_tags(geo, attrs.get("pixel_unit"))
    class_names = list(attrs.get("class_names") or [])
    h, w = arr.shape
    dst = dst or join(out_prefix, "mask.tif")

    if is_local(dst):
        path = dst[len("file://"):] if dst.startswith("file://") else dst
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
    else:
        fd, tmp = tempfile.mkstemp(suffix=".tif", prefix="segcore-export-")
        os.close(fd)
    try:
        tile = TIFF_TILE if max(h, w) > TIFF_TILE else 16 * -(-max(h, w) // 16)
        tifffile.imwrite(
            tmp, data=_tiles(arr, tile), shape=(h, w), dtype=np.uint8, tile=(tile, tile),
            photometric="palette", colormap=_colormap(len(class_names)),
            compression="zlib", compressionargs={"level": 6},
            bigtiff=h * w > 2**31, extratags=tags, metadata=None,
            description=f"segcore mask; classes: {', '.join(class_names)}" if class_names
            else None,
        )
        if is_local(dst):
            os.replace(tmp, path)
        else:
            fs, rpath = get_fs(dst)
            try:
                fs.put_file(tmp, rpath)
            except OSError as e:
                raise StorageError(f"{dst}: upload failed: {e}") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dst


__all__ = ["export", "export_cog", "export_geotiff", "export_ome_tiff", "geotiff_tags",
           "level_geo"]


def export_cog(out_prefix: str, dst: str | None = None, require_complete: bool = True,
               what: str = "mask") -> str:
    """The level-0 mask (or ``what='probabilities'``) as a Cloud-Optimized GeoTIFF at ``dst``
    (default ``<out_prefix>/mask.cog.tif`` or ``probabilities.cog.tif``): GDAL's COG driver
    (through rasterio) over a tiled GeoTIFF streamed out tile by tile: 512-px internal
    blocks, deflate, the scene's CRS and transform. The mask: overviews by nearest neighbour
    (classes stay classes), the palette, nodata 255 (never a class). The probabilities: one
    band per class (named after it), AVERAGE overviews (they are continuous), uint8 0-255 as
    stored (scale 1/255) or float16 as float32 (GDAL has no float16 raster type before 3.11).
    Returns ``dst``; it appears whole or not at all."""
    import rasterio
    import rasterio.shutil

    if what not in ("mask", "probabilities"):
        raise InputError(f"what={what!r}: use 'mask' or 'probabilities'")
    name = "mask" if what == "mask" else "probabilities"
    dst = dst or join(out_prefix, f"{name}.cog.tif")
    with tempfile.TemporaryDirectory(prefix="segcore-cog-") as tmp:
        src = os.path.join(tmp, f"{name}.tif")
        if what == "mask":
            export_geotiff(out_prefix, dst=src, level=0, require_complete=require_complete)
            resampling = "NEAREST"
        else:
            names = _probability_geotiff(out_prefix, src, require_complete)
            resampling = "AVERAGE"
        cog = os.path.join(tmp, f"{name}.cog.tif")
        with rasterio.Env(GDAL_NUM_THREADS="ALL_CPUS"):
            with rasterio.open(src, "r+") as ds:
                if what == "mask":
                    ds.nodata = 255
                else:
                    for band, label in enumerate(names, start=1):
                        ds.set_band_description(band, label)
                    if ds.dtypes[0] == "uint8":
                        ds.scales = (1 / 255,) * ds.count
            rasterio.shutil.copy(src, cog, driver="COG", BLOCKSIZE=512, COMPRESS="DEFLATE",
                                 OVERVIEW_RESAMPLING=resampling, BIGTIFF="IF_SAFER")
        publish_file(cog, dst)
    return dst


def _probability_geotiff(out_prefix: str, path: str, require_complete: bool) -> list[str]:
    """The level-0 probabilities (``result.zarr/0``, (C, H, W)) as a tiled, band-separate
    GeoTIFF at local ``path``, tile by tile (float16 written as float32); returns the band
    names (the class of each channel: the foreground for one sigmoid output)."""
    import tifffile

    from segcore.io.zarrstore import open_group

    _check_complete(out_prefix, require_complete)
    root = open_group(join(out_prefix, RESULT), mode="r")
    arr = root["0"]
    attrs = dict(root.attrs.get("segcore") or {})
    c, h, w = arr.shape
    dtype = np.dtype(np.float32) if arr.dtype == np.float16 else np.dtype(arr.dtype)
    if dtype not in (np.uint8, np.float32):
        raise InputError(f"{out_prefix}: probabilities of dtype {arr.dtype} (encoding "
                         f"{attrs.get('probability_encoding')!r}); expected uint8 or float16")
    tile = TIFF_TILE if max(h, w) > TIFF_TILE else 16 * -(-max(h, w) // 16)
    tiles = (t.astype(dtype, copy=False) for t in _plane_tiles(arr, tile))
    tifffile.imwrite(path, data=tiles, shape=(c, h, w) if c > 1 else (h, w), dtype=dtype,
                     tile=(tile, tile), photometric="minisblack",
                     planarconfig="separate" if c > 1 else None, compression="zlib",
                     compressionargs={"level": 6}, bigtiff=c * h * w * dtype.itemsize > 2**31,
                     extratags=geotiff_tags(attrs.get("geo"), attrs.get("pixel_unit")),
                     metadata=None)
    names = [str(n) for n in attrs.get("class_names") or []]
    if c == 1 and len(names) == 2:  # one sigmoid output: the foreground's probability
        return names[1:]
    return names if len(names) == c else [f"class {i}" for i in range(c)]


def _check_complete(out_prefix: str, required: bool) -> None:
    """Exports read finished results only (``segment`` itself exports just before COMPLETE)."""
    if required and not exists(join(out_prefix, "COMPLETE")):
        raise IncompleteResultError(
            f"{out_prefix}: no COMPLETE marker: the segmentation did not finish; run "
            "'segcore segment' to completion before exporting")


def _plane_tiles(arr, tile: int) -> Iterator[np.ndarray]:
    """Tiles of every plane of a (y, x) or (c, y, x) array, plane after plane."""
    if arr.ndim == 2:
        yield from _tiles(arr, tile)
        return

    class _Plane:
        def __init__(self, c: int) -> None:
            self.c, self.shape = c, arr.shape[1:]

        def __getitem__(self, idx):
            return arr[(self.c, *idx)]

    for c in range(arr.shape[0]):
        yield from _tiles(_Plane(c), tile)


def export_ome_tiff(out_prefix: str, dst: str | None = None, what: str = "mask",
                    require_complete: bool = True) -> str:
    """The mask (or the probabilities, ``what='probabilities'``) as a pyramidal OME-TIFF
    (tifffile): BigTIFF, 512-px tiles, deflate, every pyramid level of the result as a SubIFD
    of the full-resolution image, and the physical pixel size in the OME-XML and the TIFF
    resolution tags, as QuPath and Bio-Formats read them. Streams tile by tile."""
    import tifffile

    from segcore.io.zarrstore import open_group

    if what not in ("mask", "probabilities"):
        raise InputError(f"what={what!r}: use 'mask' or 'probabilities'")
    _check_complete(out_prefix, require_complete)
    root = open_group(join(out_prefix, RESULT), mode="r")
    grp = root["labels/mask"] if what == "mask" else root
    arrs = [grp[str(lv)] for lv in sorted(int(k) for k in grp.array_keys() if k.isdigit())]
    attrs = dict(root.attrs.get("segcore") or {})
    size, unit = attrs.get("pixel_size"), attrs.get("pixel_unit")
    axes = "YX" if arrs[0].ndim == 2 else "CYX"
    meta: dict[str, Any] = {"axes": axes, "Name": f"segcore {what}"}
    res = {}
    if size and unit in ("micrometer", "meter"):
        meta.update(PhysicalSizeX=size, PhysicalSizeY=size,
                    PhysicalSizeXUnit="µm" if unit == "micrometer" else "m",
                    PhysicalSizeYUnit="µm" if unit == "micrometer" else "m")
        per_cm = 1e4 / size if unit == "micrometer" else 1e-2 / size
        res = {"resolution": (per_cm, per_cm), "resolutionunit": "CENTIMETER"}
    dst = dst or join(out_prefix, f"{what}.ome.tif")
    with tempfile.TemporaryDirectory(prefix="segcore-ometiff-") as tmp:
        path = os.path.join(tmp, "x.ome.tif")
        opts = {"dtype": arrs[0].dtype, "tile": (TIFF_TILE, TIFF_TILE), "compression": "zlib",
                "compressionargs": {"level": 6}, "photometric": "minisblack"}
        with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tif:
            tif.write(data=_plane_tiles(arrs[0], TIFF_TILE), shape=arrs[0].shape,
                      subifds=len(arrs) - 1, metadata=meta, **res, **opts)
            for lv, a in enumerate(arrs[1:], start=1):
                lres = {"resolution": (res["resolution"][0] / 2**lv,
                                       res["resolution"][1] / 2**lv),
                        "resolutionunit": "CENTIMETER"} if res else {}
                tif.write(data=_plane_tiles(a, TIFF_TILE), shape=a.shape, subfiletype=1,
                          metadata=None, **lres, **opts)
        publish_file(path, dst)
    return dst


EXPORTS = ("geotiff", "cog", "ome-tiff", "qupath", "gpkg", "geoparquet", "geojson")
VECTOR_EXPORTS = ("qupath", "gpkg", "geoparquet", "geojson")


def export(out_prefix: str, fmt: str, dst: str | None = None, require_complete: bool = True,
           what: str = "mask") -> str:
    """One registry for every export format (``EXPORTS``); returns the file written.
    ``what`` ('mask' or 'probabilities'): the raster that 'cog' and 'ome-tiff' write."""
    if fmt == "geotiff":
        return export_geotiff(out_prefix, dst, require_complete=require_complete)
    if fmt == "cog":
        return export_cog(out_prefix, dst, require_complete=require_complete, what=what)
    if fmt == "ome-tiff":
        return export_ome_tiff(out_prefix, dst, what=what, require_complete=require_complete)
    if fmt in VECTOR_EXPORTS:
        from segcore.objects.vectors import export_vectors

        return export_vectors(out_prefix, fmt, dst)
    raise InputError(f"export {fmt!r}: choose one of {', '.join(EXPORTS)}")
