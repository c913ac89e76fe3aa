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

import io

import numpy as np

from segcore.io.uri import join, write_bytes_atomic


def build_table(parts: list[dict], obj_class: np.ndarray, class_names: list[str],
                attrs: dict) -> dict[str, np.ndarray]:
    n = len(obj_class) - 1
    area = np.zeros(n + 1, np.int64)
    sum_y = np.zeros(n + 1)
    sum_x = np.zeros(n + 1)
    perim = np.zeros(n + 1)
    psum = np.zeros(n + 1)
    pmax = np.zeros(n + 1)
    big = np.iinfo(np.int64).max
    y0 = np.full(n + 1, big, np.int64)
    x0 = np.full(n + 1, big, np.int64)
    y1 = np.zeros(n + 1, np.int64)
    x1 = np.zeros(n + 1, np.int64)
    for p in parts:
        ids = p["ids"].astype(np.int64)
        if ids.size == 0:
            continue
        np.add.at(area, ids, p["area"])
        np.add.at(sum_y, ids, p["sum_y"])
        np.add.at(sum_x, ids, p["sum_x"])
        np.add.at(perim, ids, p["perim"])
        np.add.at(psum, ids, p["psum"])
        np.maximum.at(pmax, ids, p["pmax"])
        b = p["bbox"]
        np.minimum.at(y0, ids, b[:, 0])
        np.minimum.at(x0, ids, b[:, 1])
        np.maximum.at(y1, ids, b[:, 2])
        np.maximum.at(x1, ids, b[:, 3])
    s = slice(1, None)
    cy, cx = sum_y[s] / np.maximum(area[s], 1), sum_x[s] / np.maximum(area[s], 1)
    px, py, area_unit, length_unit = _physical(cx, cy, attrs)
    names = np.array([class_names[k] if k < len(class_names) else str(k)
                      for k in obj_class[s]], dtype=object)
    return {
        "id": np.arange(1, n + 1, dtype=np.uint32), "class": names,
        "class_index": obj_class[s].astype(np.int32), "area_px": area[s],
        "area": area[s] * area_unit, "perimeter_px": perim[s],
        "perimeter": perim[s] * length_unit, "centroid_x_px": cx, "centroid_y_px": cy,
        "centroid_x": px, "centroid_y": py, "bbox_x0": x0[s], "bbox_y0": y0[s],
        "bbox_x1": x1[s], "bbox_y1": y1[s],
        "mean_probability": psum[s] / np.maximum(area[s], 1), "max_probability": pmax[s],
    }


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


def write_table(table: dict[str, np.ndarray], out: str) -> list[str]:
    """``objects.parquet`` and ``objects.csv`` under ``out``; returns their URIs."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    t = pa.table({k: pa.array(v) for k, v in table.items()})
    files = []
    for name, writer in (("objects.parquet", pq.write_table), ("objects.csv", pacsv.write_csv)):
        buf = io.BytesIO()
        writer(t, buf)
        uri = join(out, name)
        write_bytes_atomic(uri, buf.getvalue())
        files.append(uri)
    return files
