"""Polygons of the objects, pixel-exact (pixel edges, holes kept), one geometry per object.

Each shard task polygonises its own instance block (GDAL's polygonize through
``rasterio.features.shapes``, 4-connected rings, in full-resolution pixel coordinates with
pixel corners on integers). An object that reaches an edge the shard shares with another
shard comes back as a part; the driver unions the parts of each object (their shared edges
lie on the same integer lines, so the union is exact). Objects inside one shard come back
whole. An 8-connected object whose pixels touch only at corners is a MultiPolygon.
"""

from __future__ import annotations

import numpy as np

from segcore.objects.instances import ShardRef


def shard_polygons(inst: np.ndarray, ref: ShardRef, shared: dict[str, bool]
                   ) -> tuple[list[tuple[int, bytes]], list[tuple[int, bytes]]]:
    """(whole, parts): (object id, WKB) for objects inside the shard, and for objects that
    touch an edge shared with another shard (``shared``: top/bottom/left/right -> bool)."""
    import shapely
    from rasterio.features import shapes
    from rasterio.transform import Affine

    if not inst.any():
        return [], []
    edge_ids: set[int] = set()
    for side, strip in (("top", inst[0]), ("bottom", inst[-1]), ("left", inst[:, 0]),
                        ("right", inst[:, -1])):
        if shared.get(side):
            edge_ids.update(int(v) for v in np.unique(strip) if v)
    rings: dict[int, list] = {}
    src = inst.astype(np.int32)  # GDAL polygonises 32-bit signed ids (ids stay < 2^31)
    for geom, value in shapes(src, mask=inst > 0, connectivity=4,
                              transform=Affine(1, 0, ref.x0, 0, 1, ref.y0)):
        rings.setdefault(int(value), []).append(shapely.geometry.shape(geom))
    whole, parts = [], []
    for oid, polys in rings.items():
        g = polys[0] if len(polys) == 1 else shapely.MultiPolygon(polys)
        (parts if oid in edge_ids else whole).append((oid, shapely.to_wkb(g)))
    return whole, parts


def assemble(results: list[dict], n_objects: int) -> list:
    """Geometry per object id (index 0 unused): whole ones as they are, parts unioned."""
    import shapely

    geoms: list = [None] * (n_objects + 1)
    parts: dict[int, list] = {}
    for r in results:
        for oid, wkb in r.get("whole", ()):
            geoms[oid] = shapely.from_wkb(wkb)
        for oid, wkb in r.get("parts", ()):
            parts.setdefault(oid, []).append(shapely.from_wkb(wkb))
    for oid, ps in parts.items():
        g = shapely.union_all(ps) if len(ps) > 1 else ps[0]
        geoms[oid] = shapely.normalize(g) if len(ps) > 1 else g
    return geoms
