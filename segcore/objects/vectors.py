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

Every export streams: ``polygons.parquet`` is read row group by row group (one per shard,
at most ``CHUNK_ROWS`` objects at a time) and written chunk by chunk into a local temp file
by the library that owns the format (json for the QuPath features, GDAL through pyogrio for
GeoPackage and the RFC 7946 features, pyarrow with geopandas' GeoParquet metadata), then
published whole (:func:`segcore.io.uri.publish_file`). Memory is bounded by a chunk, not by
the number of objects (docs/BENCHMARKS.md, "Object exports").
"""

from __future__ import annotations

import contextlib
import io
import json
import uuid
from collections.abc import Callable, Iterator

import numpy as np

from segcore.errors import InputError
from segcore.io.uri import (
    exists,
    get_fs,
    join,
    publish_file,
    storage_error_types,
    storage_failure,
)

POLYGONS = "polygons.parquet"
CHUNK_ROWS = 20_000  # most objects held at once by an export (a row group is one shard's)
PALETTE = [(0, 0, 0), (255, 64, 64), (64, 160, 255), (64, 255, 64), (255, 200, 0), (200, 0, 255)]
FORMATS = ("qupath", "gpkg", "geoparquet", "geojson")
MEASUREMENTS = {"area_px": "Area px", "perimeter_px": "Perimeter px", "area": "Area",
                "perimeter": "Perimeter", "mean_probability": "Mean probability",
                "max_probability": "Max probability"}


def geo_schema(table_schema, bounds: tuple | None, types: set[str], crs=None):
    """``table_schema`` plus a WKB ``geometry`` column, with the GeoParquet ``geo`` metadata
    geopandas writes (version, encoding, and the CRS as geopandas writes it: none for pixel
    coordinates, else PROJJSON), its data-dependent fields set for the whole file: the bounds
    of all geometries and their types."""
    import geopandas as gpd
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    gpd.GeoDataFrame({"id": np.zeros(0, np.uint32)}, geometry=gpd.GeoSeries([]),
                     crs=crs).to_parquet(buf, index=False)
    meta = json.loads(pq.read_schema(pa.BufferReader(buf.getvalue())).metadata[b"geo"])
    col = meta["columns"][meta["primary_column"]]
    col["geometry_types"] = sorted(types)
    if bounds is None:
        col.pop("bbox", None)
    else:
        col["bbox"] = [float(v) for v in bounds]
    return table_schema.append(pa.field(meta["primary_column"], pa.binary())).with_metadata(
        {b"geo": json.dumps(meta).encode()})


def _polygons_uri(out: str) -> str:
    uri = join(out, POLYGONS)
    if not exists(uri):
        raise InputError(f"{out}: no {POLYGONS}; run 'segcore objects {out}' (or segment with "
                         "--objects) first")
    return uri


def _chunks(out: str, columns: list[str] | None = None) -> Iterator:
    """``polygons.parquet`` as GeoDataFrames, one per row group (the objects step writes one
    per shard; a group larger than ``CHUNK_ROWS`` rows comes in several pieces): memory holds
    one chunk, never the file. Always at least one (empty) frame, so writers see the schema.
    ``columns``: read only these (``geometry`` always comes)."""
    import geopandas as gpd
    import pyarrow as pa
    import pyarrow.parquet as pq
    import shapely

    uri = _polygons_uri(out)
    fs, path = get_fs(uri)
    with contextlib.ExitStack() as stack:
        try:
            fh = stack.enter_context(fs.open(path, "rb", block_size=2**22))
            pf = pq.ParquetFile(fh)
        except (*storage_error_types(), pa.ArrowException) as e:
            raise storage_failure(uri, "cannot open", e) from e
        geo = json.loads(pf.schema_arrow.metadata[b"geo"])["primary_column"]
        cols = None if columns is None else [*columns, geo]
        empty = True
        for i in range(pf.metadata.num_row_groups):
            try:
                group = pf.read_row_group(i, columns=cols)
            except (*storage_error_types(), pa.ArrowException) as e:
                raise storage_failure(uri, f"cannot read row group {i} (re-run 'segcore objects "
                                      f"{out}' if the file is damaged)", e) from e
            for start in range(0, group.num_rows, CHUNK_ROWS):
                t = group.slice(start, CHUNK_ROWS)
                empty = False
                yield gpd.GeoDataFrame(t.drop_columns([geo]).to_pandas(), geometry=gpd.GeoSeries(
                    shapely.from_wkb(t.column(geo).to_numpy(zero_copy_only=False))), crs=None)
            del group
        if empty:
            t = pf.schema_arrow.empty_table()
            if cols is not None:
                t = t.select(cols)
            yield gpd.GeoDataFrame(t.drop_columns([geo]).to_pandas(),
                                   geometry=gpd.GeoSeries([]), crs=None)


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
    """Write the objects of the result at ``out`` as ``fmt`` (see module doc); returns dst.
    Streams: ``polygons.parquet`` is read chunk by chunk and written chunk by chunk into a
    local temp file, published whole at ``dst`` (local or s3://) when complete; a failure
    leaves ``dst`` as it was."""
    import tempfile

    if fmt not in FORMATS:
        raise InputError(f"--to {fmt}: choose one of {', '.join(FORMATS)}")
    if fmt == "qupath" and object_type not in ("detection", "annotation"):
        raise InputError(f"--object-type {object_type}: use 'detection' or 'annotation'")
    _polygons_uri(out)
    attrs = _attrs(out)
    if fmt == "geojson" and not (attrs.get("geo") or {}).get("crs"):
        raise InputError(f"{out}: the scene has no CRS, so there is nothing to reproject "
                         "to WGS84; export 'qupath', 'gpkg' or 'geoparquet' instead")
    ext = {"qupath": "qupath.geojson", "gpkg": "gpkg", "geoparquet": "geoparquet.parquet",
           "geojson": "wgs84.geojson"}[fmt]
    dst = dst or join(out, f"objects.{ext}")
    with tempfile.TemporaryDirectory(prefix="segcore-vectors-") as tmp:
        local = f"{tmp}/objects.{ext}"
        WRITERS[fmt](out, attrs, local, object_type)
        publish_file(local, dst)
    return dst


def _write_qupath(out: str, attrs: dict, path: str, object_type: str) -> None:
    """A GeoJSON FeatureCollection (pixel coordinates), feature by feature."""
    with open(path, "w", encoding="utf-8") as fh:
        fh.write('{"type": "FeatureCollection", "features": [')
        sep = ""
        for frame in _chunks(out):
            for feat in _qupath_features(frame, attrs, object_type):
                fh.write(sep + json.dumps(feat))
                sep = ", "
        fh.write("]}")


def _write_gpkg(out: str, attrs: dict, path: str, object_type: str) -> None:
    """One layer 'objects' in the scene's CRS, appended chunk by chunk (GDAL, pyogrio)."""
    import pyogrio

    for i, frame in enumerate(_chunks(out)):
        pyogrio.write_dataframe(_in_crs(frame, attrs), path, layer="objects", driver="GPKG",
                                append=i > 0)


def _write_geoparquet(out: str, attrs: dict, path: str, object_type: str) -> None:
    """GeoParquet in the scene's CRS, row group by row group (pyarrow), with the ``geo``
    metadata geopandas writes for that CRS (PROJJSON) and the whole file's bounds and
    geometry types, found in a first pass over the geometries alone."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import shapely

    bounds, types = [], set()
    for frame in _chunks(out, columns=[]):
        g = _in_crs(frame, attrs).geometry
        if len(g):
            bounds.append(g.total_bounds)
            types |= set(g.geom_type)
    box = None
    if bounds:
        b = np.array(bounds)
        box = (b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max())
    crs = (attrs.get("geo") or {}).get("crs") if (attrs.get("geo") or {}).get("transform") \
        else None
    writer = None
    try:
        for frame in _chunks(out):
            moved = _in_crs(frame, attrs)
            cols = pa.Table.from_pandas(moved.drop(columns=moved.geometry.name),
                                        preserve_index=False)
            if writer is None:
                schema = geo_schema(cols.schema.remove_metadata(), box, types, crs)
                writer = pq.ParquetWriter(path, schema)
            wkb = pa.array(shapely.to_wkb(moved.geometry.values, flavor="iso"), pa.binary())
            writer.write_table(cols.append_column(schema.field(schema.names[-1]), wkb).cast(
                schema))
    finally:
        if writer is not None:
            writer.close()


def _write_geojson(out: str, attrs: dict, path: str, object_type: str) -> None:
    """RFC 7946 GeoJSON in WGS84. GDAL's GeoJSON driver writes each reprojected chunk with
    RFC7946=YES (lon/lat, counter-clockwise exterior rings, 7 decimals, no ``crs`` member)
    into memory; its features are copied into one FeatureCollection written here, since the
    driver cannot append to an RFC 7946 file (GDAL's appended features land first, and
    appending rewrites the file)."""
    import pyogrio

    with open(path, "w", encoding="utf-8") as fh:
        fh.write('{"type": "FeatureCollection", "name": "objects", "features": [\n')
        sep = ""
        for frame in _chunks(out):
            if not len(frame):
                continue
            buf = io.BytesIO()
            pyogrio.write_dataframe(_in_crs(frame, attrs).to_crs(4326), buf, driver="GeoJSON",
                                    layer="objects", layer_options={"RFC7946": "YES"})
            for feat in json.loads(buf.getvalue())["features"]:
                fh.write(sep + json.dumps(feat))
                sep = ",\n"
        fh.write("\n]}\n")


WRITERS: dict[str, Callable[[str, dict, str, str], None]] = {
    "qupath": _write_qupath, "gpkg": _write_gpkg, "geoparquet": _write_geoparquet,
    "geojson": _write_geojson}


def _qupath_features(frame, attrs: dict, object_type: str) -> Iterator[dict]:
    import shapely

    ns = uuid.uuid5(uuid.NAMESPACE_URL, f"segcore:{attrs.get('src')}:{attrs.get('model_sha256')}")
    ids, names = frame["id"].tolist(), frame["class"].tolist()
    classes = frame["class_index"].tolist()
    meas = {label: frame[col].tolist() for col, label in MEASUREMENTS.items()}
    for i, geom in enumerate(frame.geometry):
        yield {
            "type": "Feature", "id": str(uuid.uuid5(ns, str(ids[i]))),
            "geometry": shapely.geometry.mapping(geom),
            "properties": {
                "objectType": object_type,
                "classification": {"name": str(names[i]),
                                   "color": list(PALETTE[classes[i] % len(PALETTE)])},
                "measurements": {label: float(v[i]) for label, v in meas.items()},
                "segcore_id": int(ids[i]),
            },
        }
