"""Object polygons in the files people open.

``polygons.parquet`` (written by the objects step) is the canonical store: GeoParquet
(geopandas), one row per object, the object table's columns and its geometry in
full-resolution pixel coordinates (no CRS). The exports derive from it:

- ``qupath``: a GeoJSON FeatureCollection as QuPath imports it: pixel coordinates, each
  Feature with a stable UUID ``id`` and ``properties`` {``objectType`` (``detection`` for
  objects, or ``annotation``), ``classification`` {name, color}, ``measurements``};
- ``gpkg`` and ``geoparquet``: in the scene's CRS (the pixel -> CRS affine transform applied)
  for georeferenced scenes; pixel coordinates, no CRS, otherwise;
- ``geojson``: RFC 7946, reprojected to WGS84 (longitude, latitude) for web maps; needs a
  georeferenced scene.
"""

from __future__ import annotations

import io
import json
import uuid

import numpy as np

from segcore.errors import InputError
from segcore.io.uri import exists, join, read_bytes, write_bytes_atomic

POLYGONS = "polygons.parquet"
PALETTE = [(0, 0, 0), (255, 64, 64), (64, 160, 255), (64, 255, 64), (255, 200, 0), (200, 0, 255)]
FORMATS = ("qupath", "gpkg", "geoparquet", "geojson")
MEASUREMENTS = {"area_px": "Area px", "perimeter_px": "Perimeter px", "area": "Area",
                "perimeter": "Perimeter", "mean_probability": "Mean probability",
                "max_probability": "Max probability"}


def geo_schema(table_schema, bounds: tuple | None, types: set[str]):
    """``table_schema`` plus a WKB ``geometry`` column, with the GeoParquet ``geo`` metadata
    geopandas writes (version, encoding, no CRS: pixel coordinates), its data-dependent fields
    set for the whole file: the bounds of all geometries and their types."""
    import geopandas as gpd
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    gpd.GeoDataFrame({"id": np.zeros(0, np.uint32)}, geometry=gpd.GeoSeries([]),
                     crs=None).to_parquet(buf, index=False)
    meta = json.loads(pq.read_schema(pa.BufferReader(buf.getvalue())).metadata[b"geo"])
    col = meta["columns"][meta["primary_column"]]
    col["geometry_types"] = sorted(types)
    if bounds is None:
        col.pop("bbox", None)
    else:
        col["bbox"] = [float(v) for v in bounds]
    return table_schema.append(pa.field(meta["primary_column"], pa.binary())).with_metadata(
        {b"geo": json.dumps(meta).encode()})


def read_polygons(out: str):
    import geopandas as gpd

    uri = join(out, POLYGONS)
    if not exists(uri):
        raise InputError(f"{out}: no {POLYGONS}; run 'segcore objects {out}' (or segment with "
                         "--objects) first")
    return gpd.read_parquet(io.BytesIO(read_bytes(uri)))


def _attrs(out: str) -> dict:
    from segcore.io.zarrstore import open_group

    return dict(open_group(join(out, "result.zarr")).attrs["segcore"])


def _in_crs(frame, attrs: dict):
    """The frame in the scene's CRS (georeferenced scenes), else unchanged."""
    geo = attrs.get("geo") or {}
    if not geo.get("transform"):
        return frame
    a, b, c, d, e, f = geo["transform"]
    moved = frame.copy()
    moved["geometry"] = frame.geometry.affine_transform([a, b, d, e, c, f])
    return moved.set_crs(geo.get("crs"), allow_override=True) if geo.get("crs") else moved


def export_vectors(out: str, fmt: str, dst: str | None = None,
                   object_type: str = "detection") -> str:
    """Write the objects of the result at ``out`` as ``fmt`` (see module doc); returns dst."""
    if fmt not in FORMATS:
        raise InputError(f"--to {fmt}: choose one of {', '.join(FORMATS)}")
    frame = read_polygons(out)
    attrs = _attrs(out)
    ext = {"qupath": "qupath.geojson", "gpkg": "gpkg", "geoparquet": "geoparquet.parquet",
           "geojson": "wgs84.geojson"}[fmt]
    dst = dst or join(out, f"objects.{ext}")
    if fmt == "qupath":
        if object_type not in ("detection", "annotation"):
            raise InputError(f"--object-type {object_type}: use 'detection' or 'annotation'")
        data = _qupath(frame, attrs, object_type)
    elif fmt == "geojson":
        geo = attrs.get("geo") or {}
        if not geo.get("crs"):
            raise InputError(f"{out}: the scene has no CRS, so there is nothing to reproject "
                             "to WGS84; export 'qupath', 'gpkg' or 'geoparquet' instead")
        data = _gdal_bytes(_in_crs(frame, attrs).to_crs(4326), "GeoJSON", {"RFC7946": "YES"})
    elif fmt == "gpkg":
        data = _gdal_bytes(_in_crs(frame, attrs), "GPKG", {}, layer="objects")
    else:
        buf = io.BytesIO()
        _in_crs(frame, attrs).to_parquet(buf, index=False)
        data = buf.getvalue()
    write_bytes_atomic(dst, data)
    return dst


def _gdal_bytes(frame, driver: str, options: dict, layer: str | None = None) -> bytes:
    """GDAL writes to a file: a temporary one, then its bytes (for any URI)."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"x.{driver.lower()}"
        frame.to_file(path, driver=driver, engine="pyogrio", layer=layer, **options)
        return path.read_bytes()


def _qupath(frame, attrs: dict, object_type: str) -> bytes:
    import shapely

    ns = uuid.uuid5(uuid.NAMESPACE_URL, f"segcore:{attrs.get('src')}:{attrs.get('model_sha256')}")
    ids, names = frame["id"].tolist(), frame["class"].tolist()
    classes = frame["class_index"].tolist()
    meas = {label: frame[col].tolist() for col, label in MEASUREMENTS.items()}
    feats = []
    for i, geom in enumerate(frame.geometry):
        feats.append({
            "type": "Feature", "id": str(uuid.uuid5(ns, str(ids[i]))),
            "geometry": shapely.geometry.mapping(geom),
            "properties": {
                "objectType": object_type,
                "classification": {"name": str(names[i]),
                                   "color": list(PALETTE[classes[i] % len(PALETTE)])},
                "measurements": {label: float(v[i]) for label, v in meas.items()},
                "segcore_id": int(ids[i]),
            },
        })
    return json.dumps({"type": "FeatureCollection", "features": feats}).encode()
