"""Georeferencing: GeoTIFF keys -> ``{'crs': 'EPSG:n', 'transform': [a, b, c, d, e, f]}``.

The transform is the affine map from pixel (col, row) to model (x, y) in GDAL/rasterio order:
``x = a*col + b*row + c``, ``y = d*col + e*row + f``, with (0, 0) the *corner* of the first
pixel (PixelIsPoint rasters are shifted by half a pixel, as GDAL does). No pyproj needed.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

USER_DEFINED = 32767
METRE_PER_DEGREE = 111_320.0  # length of one degree of latitude (and of longitude at the equator)
_LINEAR_METRE = 9001


def geotiff_geo(keys: dict[str, Any] | None) -> dict[str, Any] | None:
    """``geo`` dict from tifffile's ``geotiff_metadata`` (None when there is no transform)."""
    if not keys:
        return None
    transform = _transform(keys)
    if transform is None:
        return None
    return {"crs": _crs(keys), "transform": transform}


def geotiff_unit(keys: dict[str, Any] | None) -> str | None:
    """'meter' | 'degree' | None (other linear units, unknown CRS kind)."""
    if not keys:
        return None
    model = _int(keys.get("GTModelTypeGeoKey"))
    if model == 2:  # geographic
        return "degree"
    if model == 1:  # projected
        unit = _int(keys.get("ProjLinearUnitsGeoKey"))
        return "meter" if unit in (None, _LINEAR_METRE) else None
    return None


def _int(v: Any) -> int | None:
    if v is None:
        return None
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def _crs(keys: dict[str, Any]) -> str | None:
    for name in ("ProjectedCSTypeGeoKey", "GeographicTypeGeoKey"):
        code = _int(keys.get(name))
        if code is not None and 0 < code < USER_DEFINED:
            return f"EPSG:{code}"
    return None  # user-defined CRS: would need a WKT writer (pyproj); not guessed


def _transform(keys: dict[str, Any]) -> list[float] | None:
    m = keys.get("ModelTransformation")
    if m is not None:
        m = [float(v) for v in np.asarray(m, dtype=np.float64).ravel()]
        if len(m) < 8:
            return None
        t = [m[0], m[1], m[3], m[4], m[5], m[7]]
    else:
        scale = keys.get("ModelPixelScale")
        tie = keys.get("ModelTiepoint")
        if scale is None or tie is None or len(scale) < 2 or len(tie) < 6:
            return None
        sx, sy = float(scale[0]), float(scale[1])
        i, j, x, y = float(tie[0]), float(tie[1]), float(tie[3]), float(tie[4])
        t = [sx, 0.0, x - i * sx, 0.0, -sy, y + j * sy]
    if _int(keys.get("GTRasterTypeGeoKey")) == 2:  # PixelIsPoint: tie point is a pixel centre
        a, b, c, d, e, f = t
        t = [a, b, c - 0.5 * (a + b), d, e, f - 0.5 * (d + e)]
    return t


def scale_geo(geo: dict[str, Any] | None, fy: float, fx: float) -> dict[str, Any] | None:
    """``geo`` of a level downsampled by (fy, fx) from the one ``geo`` describes."""
    if geo is None:
        return None
    a, b, c, d, e, f = geo["transform"]
    return {**geo, "transform": [a * fx, b * fy, c, d * fx, e * fy, f]}


def transform_pixel_size(transform: list[float]) -> float:
    """Size of a pixel along x in model units (rotation-safe)."""
    a, _b, _c, d, _e, _f = transform
    return math.hypot(a, d)


def degrees_to_metres(size_deg: float, transform: list[float], height: int, width: int) -> float:
    """Approximate metres per pixel of a lon/lat raster at its centre (mean of x and y)."""
    a, b, c, d, e, f = transform
    lat = d * width / 2 + e * height / 2 + f
    lat = max(-89.9, min(89.9, lat))
    return size_deg * METRE_PER_DEGREE * (1 + math.cos(math.radians(lat))) / 2
