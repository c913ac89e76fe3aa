"""The object table: per-shard partial measurements added up per object, in pixels and in
physical units (micrometres from the pixel size, or the scene's CRS units from its
transform), written as Parquet (pyarrow) and CSV.

Conventions: pixel coordinates are full-resolution, x right and y down, with pixel corners on
integers (a pixel's centre is at +0.5), as QuPath and GDAL use them; bounding boxes are
[x0, x1) x [y0, y1); the perimeter is the crack length (pixel sides between the object and
anything else), so a 1-pixel object has perimeter 4; probabilities are each pixel's
probability of the object's own class.
"""

from __future__ import annotations

import numpy as np

from segcore.io.uri import join

SCHEMA_TYPES = (("id", "uint32"), ("class", "string"), ("class_index", "int32"),
                ("area_px", "int64"), ("area", "float64"), ("perimeter_px", "float64"),
                ("perimeter", "float64"), ("centroid_x_px", "float64"),
                ("centroid_y_px", "float64"), ("centroid_x", "float64"), ("centroid_y", "float64"),
                ("bbox_x0", "int64"), ("bbox_y0", "int64"), ("bbox_x1", "int64"),
                ("bbox_y1", "int64"), ("mean_probability", "float64"),
                ("max_probability", "float64"))
SUMS = ("area", "sum_y", "sum_x", "perim", "psum")  # partial measurements that add up


def rows(m: dict[str, np.ndarray], classes: np.ndarray, class_names: list[str],
         attrs: dict) -> dict[str, np.ndarray]:
    """Table columns for complete objects: ``m`` holds each object's ``ids``, the sums in
    :data:`SUMS`, ``pmax`` and ``bbox`` (y0, x0, y1, x1 rows); ``classes`` their class
    indices."""
    area = m["area"].astype(np.int64)
    cy, cx = m["sum_y"] / np.maximum(area, 1), m["sum_x"] / np.maximum(area, 1)
    px, py, area_unit, length_unit = _physical(cx, cy, attrs)
    names = np.array([class_names[k] if k < len(class_names) else str(k) for k in classes],
                     dtype=object)
    b = m["bbox"]
    return {
        "id": m["ids"].astype(np.uint32), "class": names,
        "class_index": classes.astype(np.int32), "area_px": area,
        "area": area * area_unit, "perimeter_px": m["perim"],
        "perimeter": m["perim"] * length_unit, "centroid_x_px": cx, "centroid_y_px": cy,
        "centroid_x": px, "centroid_y": py, "bbox_x0": b[:, 1], "bbox_y0": b[:, 0],
        "bbox_x1": b[:, 3], "bbox_y1": b[:, 2],
        "mean_probability": m["psum"] / np.maximum(area, 1), "max_probability": m["pmax"],
    }


def add_up(parts: list[dict]) -> dict[str, np.ndarray]:
    """Per object, the partial measurements of its parts (several shards) added up: ``ids``
    sorted, sums added, maximum and bounding box combined."""
    parts = [p for p in parts if p["ids"].size]
    if not parts:
        return {"ids": np.zeros(0, np.uint32), **{k: np.zeros(0) for k in (*SUMS, "pmax")},
                "bbox": np.zeros((0, 4), np.int64)}
    ids, inv = np.unique(np.concatenate([p["ids"] for p in parts]), return_inverse=True)
    n = ids.size
    out: dict[str, np.ndarray] = {"ids": ids}
    for k in SUMS:
        out[k] = np.bincount(inv, weights=np.concatenate([p[k] for p in parts]), minlength=n)
    out["pmax"] = np.zeros(n)
    np.maximum.at(out["pmax"], inv, np.concatenate([p["pmax"] for p in parts]))
    b = np.concatenate([p["bbox"] for p in parts])
    box = np.empty((n, 4), np.int64)
    box[:, :2] = np.iinfo(np.int64).max
    box[:, 2:] = np.iinfo(np.int64).min
    np.minimum.at(box[:, 0], inv, b[:, 0])
    np.minimum.at(box[:, 1], inv, b[:, 1])
    np.maximum.at(box[:, 2], inv, b[:, 2])
    np.maximum.at(box[:, 3], inv, b[:, 3])
    out["bbox"] = box
    return out


def _physical(cx: np.ndarray, cy: np.ndarray, attrs: dict
              ) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Centroids in the scene's physical or CRS coordinates, and the area and length of one
    pixel in those units (1 and 1 for a scene with neither)."""
    geo = attrs.get("geo")
    if geo and geo.get("transform"):
        a, b, c, d, e, f = geo["transform"]
        length = float(np.sqrt(abs(a * e - b * d)))
        return a * cx + b * cy + c, d * cx + e * cy + f, abs(a * e - b * d), length
    size = attrs.get("pixel_size")
    if size:
        return cx * size, cy * size, size * size, float(size)
    return cx.copy(), cy.copy(), 1.0, 1.0


def units(attrs: dict) -> dict[str, str]:
    geo = attrs.get("geo")
    if geo and geo.get("transform"):
        unit = attrs.get("pixel_unit") or "crs unit"
        return {"area": f"{unit}^2", "length": unit, "coordinates": geo.get("crs") or "crs"}
    unit = attrs.get("pixel_unit") if attrs.get("pixel_size") else "pixel"
    return {"area": f"{unit}^2", "length": unit, "coordinates": unit}


def schema():
    import pyarrow as pa

    return pa.schema([(name, getattr(pa, kind)()) for name, kind in SCHEMA_TYPES])


def arrow(columns: dict[str, np.ndarray], wkb: list[bytes] | None = None):
    """The columns from :func:`rows` as a pyarrow table of :func:`schema`, plus a WKB
    ``geometry`` column when ``wkb`` is given."""
    import pyarrow as pa

    sch = schema()
    t = pa.Table.from_pydict({k: columns[k] for k in sch.names}, schema=sch)
    return t if wkb is None else t.append_column("geometry", pa.array(wkb, pa.binary()))


class ObjectWriter:
    """``objects.parquet``, ``objects.csv`` and (with ``geo_schema``) ``polygons.parquet``
    under ``out``, written chunk by chunk (one Parquet row group per chunk) into local temp
    files and published whole when all chunks are in: memory holds one chunk, never the
    table. ``geo_schema``: the table's schema plus the WKB ``geometry`` column and its
    GeoParquet metadata (:func:`segcore.objects.vectors.geo_schema`)."""

    def __init__(self, out: str, geo_schema=None):
        import tempfile

        import pyarrow.csv as pacsv
        import pyarrow.parquet as pq

        self.out = out
        self.schema = schema()
        self.geo_schema = geo_schema
        self._tmp = tempfile.TemporaryDirectory(prefix="segcore-objects-")
        d = self._tmp.name
        self.files = {"objects.parquet": f"{d}/objects.parquet", "objects.csv": f"{d}/objects.csv"}
        self._table = pq.ParquetWriter(self.files["objects.parquet"], self.schema)
        self._csv = pacsv.CSVWriter(self.files["objects.csv"], self.schema)
        self._geo = None
        if geo_schema is not None:
            self.files["polygons.parquet"] = f"{d}/polygons.parquet"
            self._geo = pq.ParquetWriter(self.files["polygons.parquet"], geo_schema)
        self.rows = 0

    def write(self, t) -> None:
        """One chunk: a table from :func:`arrow` (with ``geometry`` when writing polygons),
        rows in id order."""
        if not t.num_rows:
            return
        cols = t.select(self.schema.names)
        self._table.write_table(cols)
        self._csv.write_table(cols)
        if self._geo is not None:
            self._geo.write_table(t.cast(self.geo_schema))
        self.rows += t.num_rows

    def close(self) -> list[str]:
        """Finish the files and publish them under ``out``; returns their URIs."""
        from segcore.io.uri import publish_file

        writers = [w for w in (self._table, self._csv, self._geo) if w is not None]
        for w in writers:
            w.close()
        uris = []
        try:
            for name, local in self.files.items():
                uri = join(self.out, name)
                publish_file(local, uri)
                uris.append(uri)
        finally:
            self._tmp.cleanup()
        return uris

    def abort(self) -> None:
        for w in (self._table, self._csv, self._geo):
            if w is not None:
                try:
                    w.close()
                except Exception:  # noqa: BLE001 - cleaning up after another error
                    pass
        self._tmp.cleanup()
