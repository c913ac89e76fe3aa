"""Polygons of the objects, pixel-exact (pixel edges, holes kept), one geometry per object.

Each shard task polygonises its own instance block (GDAL's polygonize through
``rasterio.features.shapes``, 4-connected rings, in full-resolution pixel coordinates with
pixel corners on integers). An object inside one shard is whole there, and the task writes it
out itself; an object that reaches an edge the shard shares with another shard comes back to
the driver as a part, and the driver unions the parts of each such object (their shared edges
lie on the same integer lines, so the union is exact). An 8-connected object whose pixels
touch only at corners is a MultiPolygon.
"""

from __future__ import annotations

import numpy as np

from segcore.objects.instances import ShardRef

# shapely's geometry type ids -> GeoParquet's geometry type names
TYPE_NAMES = {0: "Point", 1: "LineString", 2: "LineString", 3: "Polygon", 4: "MultiPoint",
              5: "MultiLineString", 6: "MultiPolygon", 7: "GeometryCollection"}


def edge_ids(inst: np.ndarray, shared: tuple[bool, bool, bool, bool]) -> np.ndarray:
    """Sorted object ids on the edges the shard shares with a neighbour (top, bottom, left,
    right): the objects that may continue in another shard."""
    strips = (inst[0], inst[-1], inst[:, 0], inst[:, -1])
    on = [np.unique(s) for s, ok in zip(strips, shared, strict=True) if ok]
    if not on:
        return np.zeros(0, inst.dtype)
    ids = np.unique(np.concatenate(on))
    return ids[ids > 0]


def shard_polygons(inst: np.ndarray, ref: ShardRef) -> dict[int, object]:
    """Object id -> shapely geometry of its pixels in this shard."""
    import shapely
    from rasterio.features import shapes
    from rasterio.transform import Affine

    if not inst.any():
        return {}
    src = inst.astype(np.int32)  # GDAL polygonises 32-bit signed ids (ids stay < 2^31)
    coords, ring_of, values = [], [], []
    for geom, value in shapes(src, mask=inst > 0, connectivity=4,
                              transform=Affine(1, 0, ref.x0, 0, 1, ref.y0)):
        for ring in geom["coordinates"]:  # the shell, then the holes
            coords.append(ring)
            ring_of.append(len(values))
        values.append(int(value))
    # the rings' vertices become arrays in C (shapely.geometry.shape walks them in Python:
    # most of the objects step's time on small objects), then one call builds every ring and
    # one every polygon (the first ring of each is its shell)
    lengths = np.fromiter((len(c) for c in coords), np.intp, len(coords))
    xy = np.concatenate([np.asarray(c, np.float64) for c in coords])
    rings = shapely.linearrings(xy, indices=np.repeat(np.arange(len(coords)), lengths))
    polys = shapely.polygons(rings, indices=np.asarray(ring_of, np.intp))
    out: dict[int, list] = {}
    for value, poly in zip(values, polys, strict=True):
        out.setdefault(value, []).append(poly)
    return {oid: ps[0] if len(ps) == 1 else shapely.MultiPolygon(ps) for oid, ps in out.items()}


def union_parts(parts: dict[int, list[bytes]]) -> dict[int, object]:
    """Object id -> the union of its parts (WKB from several shards)."""
    import shapely

    out = {}
    for oid, ps in parts.items():
        geoms = shapely.from_wkb(ps)
        out[oid] = shapely.normalize(shapely.union_all(geoms)) if len(ps) > 1 else geoms[0]
    return out


def finish(geoms: list, simplify: float) -> tuple[list[bytes], tuple | None, set[str]]:
    """(WKB of each geometry, simplified when ``simplify`` > 0; their overall bounds (minx,
    miny, maxx, maxy) or None; their geometry type names)."""
    import shapely

    if not geoms:
        return [], None, set()
    g = np.array(geoms, dtype=object)
    if simplify > 0:
        g = shapely.simplify(g, simplify, preserve_topology=True)
    b = shapely.bounds(g)
    bounds = (float(b[:, 0].min()), float(b[:, 1].min()), float(b[:, 2].max()),
              float(b[:, 3].max()))
    types = {TYPE_NAMES[int(t)] for t in np.unique(shapely.get_type_id(g))}
    return list(shapely.to_wkb(g)), bounds, types
