"""Objects with global ids: connected components of each foreground class, found shard by
shard and unified across shard borders, exactly as one labelling of the whole mask would.

Two passes over the mask's level-0 shards, each shard read by one task (local or on Dask),
so no step holds the whole mask:

1. **label** each shard (``scipy.ndimage.label`` per class: 4- or 8-connectivity) and return
   its component count, the class of each component, and the component ids along its four
   edges;
2. the driver **merges**: every pair of same-class components that meet across a shared edge
   (or, with 8-connectivity, across a corner) is an edge of a graph over all shards'
   components; its connected components (``scipy.sparse.csgraph``) are the objects, numbered
   1..N in the order of their first shard (row-major) and first local component;
3. **relabel** each shard (the labelling is recomputed: deterministic, and cheaper than storing
   it), write it as ``labels/instances`` (uint32, the mask's shard grid, whole shards, one
   writer each), and return per-object partial measurements (area, coordinate sums, bounding
   box, crack perimeter with the neighbours' edge ids, probability sum and maximum), which the
   driver adds up per object.

Each measure task writes its complete objects (those that touch no edge shared with another
shard: rows and polygons) to a scratch part file itself, and returns only the partial
measurements of objects on a shared edge. Memory in the driver: the edge strips (4 x shard
edge per shard), a few bytes per component (lookups, classes), the objects that span shards,
and one shard's chunk of the table while it writes the files out; never a shard's pixels and
never the whole table (256 Mpx with 168k objects: 1.03x the peak of 16 Mpx, docs/BENCHMARKS.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from segcore.errors import InputError

INSTANCES = "instances"


@dataclass(frozen=True)
class ShardRef:
    row: int
    col: int
    y0: int
    y1: int
    x0: int
    x1: int


def shard_refs(height: int, width: int, sy: int, sx: int) -> list[ShardRef]:
    return [ShardRef(r, c, r * sy, min(height, (r + 1) * sy), c * sx, min(width, (c + 1) * sx))
            for r in range(math.ceil(height / sy)) for c in range(math.ceil(width / sx))]


def structure(connectivity: int) -> np.ndarray:
    from scipy import ndimage

    if connectivity not in (4, 8):
        raise InputError(f"connectivity {connectivity}: use 4 (edges) or 8 (edges and corners)")
    return ndimage.generate_binary_structure(2, 1 if connectivity == 4 else 2)


def label_block(mask: np.ndarray, n_classes: int, connectivity: int
                ) -> tuple[np.ndarray, int, np.ndarray]:
    """(local ids uint32, count, class of each local id (index 0 = background)). Components
    are labelled class by class (touching objects of two classes stay two objects)."""
    from scipy import ndimage

    st = structure(connectivity)
    local = np.zeros(mask.shape, np.uint32)
    classes = [np.zeros(1, np.uint8)]
    n = 0
    for k in range(1, max(2, n_classes)):
        sel = mask == k
        if not sel.any():
            continue
        lab, nk = ndimage.label(sel, structure=st, output=np.uint32)
        local[sel] = lab[sel] + n
        classes.append(np.full(nk, k, np.uint8))
        n += nk
    return local, n, np.concatenate(classes)


def edges(a: np.ndarray) -> dict[str, np.ndarray]:
    return {"top": a[0].copy(), "bottom": a[-1].copy(), "left": a[:, 0].copy(),
            "right": a[:, -1].copy()}


def merge(refs: list[ShardRef], counts: list[int], classes: list[np.ndarray],
          strips: list[dict[str, np.ndarray]], connectivity: int
          ) -> tuple[list[np.ndarray], np.ndarray]:
    """Per shard, the lookup local id -> global object id (0 stays 0), and the class of each
    object (index = id). ``strips`` are each shard's edge ids from :func:`edges`."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    total = int(offsets[-1])
    at = {(r.row, r.col): i for i, r in enumerate(refs)}
    ps, qs = [], []

    def link(i: int, a: np.ndarray, j: int, b: np.ndarray) -> None:
        ok = (a > 0) & (b > 0)
        ok[ok] = classes[i][a[ok]] == classes[j][b[ok]]
        if ok.any():
            ps.append(offsets[i] + a[ok].astype(np.int64) - 1)
            qs.append(offsets[j] + b[ok].astype(np.int64) - 1)

    for i, r in enumerate(refs):
        # the shared edge with the right and the lower neighbour (8: also its diagonals)
        for dr, dc, mine, theirs in ((0, 1, "right", "left"), (1, 0, "bottom", "top")):
            j = at.get((r.row + dr, r.col + dc))
            if j is None:
                continue
            a, b = strips[i][mine], strips[j][theirs]
            link(i, a, j, b)
            if connectivity == 8:
                link(i, a[:-1], j, b[1:])
                link(i, a[1:], j, b[:-1])
        if connectivity == 8:
            diag = at.get((r.row + 1, r.col + 1))
            if diag is not None:
                link(i, strips[i]["bottom"][-1:], diag, strips[diag]["top"][:1])
            anti = at.get((r.row + 1, r.col - 1))
            if anti is not None:
                link(i, strips[i]["bottom"][:1], anti, strips[anti]["top"][-1:])
    if total == 0:
        return [np.zeros(1, np.uint32) for _ in refs], np.zeros(1, np.uint8)
    p = np.concatenate(ps) if ps else np.zeros(0, np.int64)
    q = np.concatenate(qs) if qs else np.zeros(0, np.int64)
    graph = coo_matrix((np.ones(p.size, np.int8), (p, q)), shape=(total, total))
    n_obj, comp = connected_components(graph, directed=False)
    # number objects in order of first appearance (connected_components already does: it
    # labels nodes in index order), ids from 1
    gid = comp.astype(np.uint32) + 1
    obj_class = np.zeros(n_obj + 1, np.uint8)
    all_classes = np.concatenate([c[1:] for c in classes])
    obj_class[gid] = all_classes
    luts = [np.concatenate([[0], gid[offsets[i]:offsets[i + 1]]]).astype(np.uint32)
            for i in range(len(refs))]
    return luts, obj_class
