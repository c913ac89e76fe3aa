"""Objects from a finished result: global instance ids across shards, and a table per object.

``extract_objects(out)`` reads ``out/result.zarr`` (mask and probabilities), writes
``labels/instances`` (uint32 OME-Zarr label, the mask's shard grid and pyramid) and
``out/objects.parquet`` + ``out/objects.csv`` (one row per object), and returns a summary
(counts per class) that the report carries. See :mod:`segcore.objects.instances` for how ids
stay global without holding the whole mask.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import numpy as np

from segcore.errors import IncompleteResultError, InputError
from segcore.io.uri import exists, join, remove_tree, write_bytes_atomic
from segcore.objects.instances import INSTANCES, ShardRef, edges, label_block, merge, shard_refs

RESULT = "result.zarr"
SEEDS = "objects-seeds"  # scratch group for seeded growth, removed when the objects are done
PARTS = "objects-parts"  # scratch: each shard's complete objects, removed when written out
PROCESS_MIN_SHARDS = 32  # without Dask, lanes are processes from this many shards on
NODATA = 255  # the mask's nodata value (segcore.inference.NODATA_LABEL): never grown into
COLUMNS = ("id", "class", "class_index", "area_px", "area", "perimeter_px", "perimeter",
           "centroid_x_px", "centroid_y_px", "centroid_x", "centroid_y", "bbox_x0", "bbox_y0",
           "bbox_x1", "bbox_y1", "mean_probability", "max_probability")


@dataclass(frozen=True)
class _Pass:
    out: str
    ref: ShardRef
    n_classes: int
    connectivity: int
    lut: np.ndarray | None = None  # pass 2: local id -> object id
    ring: tuple | None = None  # pass 2: neighbours' object ids along (top, bottom, left, right)
    shared: tuple[bool, bool, bool, bool] = (False, False, False, False)  # edges with neighbours
    polygons: bool = True
    grow: int = 0  # seeded growth steps (pass 2 reads the seeds with a border of grow + 1)
    grow_threshold: float = 0.0
    obj_class: np.ndarray | None = None  # with grow: the class of each object id
    class_names: tuple[str, ...] = ()
    attrs: dict | None = None  # the result's segcore attributes (units for the table)
    simplify: float = 0.0
    levels: int = 0  # pass 2: instance pyramid levels 1..levels written by the shard itself


def _root(out: str, mode: str = "r"):
    from segcore.io.zarrstore import open_group

    return open_group(join(out, RESULT), mode=mode)


def _label_task(t: _Pass) -> list[dict]:
    root = _root(t.out)
    r = t.ref
    mask = root["labels/mask/0"][r.y0:r.y1, r.x0:r.x1]
    local, n, classes = label_block(mask, t.n_classes, t.connectivity)
    return [{"i": (r.row, r.col), "n": n, "classes": classes, "edges": edges(local),
             "pixels": mask.size}]


def _class_probability(prob: np.ndarray, mask: np.ndarray, at: np.ndarray,
                       encoding: str) -> np.ndarray:
    """The probability of its own class at the flat pixel indices ``at``, as float32 0-1."""
    flat = prob.reshape(prob.shape[0], -1)
    if prob.shape[0] == 1:
        p = flat[0, at]
    else:
        p = flat[mask.ravel()[at].astype(np.intp), at]
    p = p.astype(np.float32)
    return p / 255 if encoding == "uint8" else p


def _seed_task(t: _Pass) -> list[dict]:
    """With growth: write the shard's components under their object ids as the seeds."""
    from segcore.io.zarrstore import write_block

    root = _root(t.out, "r+")
    r = t.ref
    local, _, _ = label_block(root["labels/mask/0"][r.y0:r.y1, r.x0:r.x1], t.n_classes,
                              t.connectivity)
    write_block(root[f"{SEEDS}/0"], r.y0, r.x0, t.lut[local])
    return []


def _grown(t: _Pass, root, prob_enc: str) -> tuple[np.ndarray, tuple, np.ndarray]:
    """The shard's grown instances, the object ids just outside its edges, and its stored
    probabilities: seeds and probabilities are read with a border of ``grow + 1`` pixels so
    the shard and its one-pixel ring are grown as in the whole image."""
    from segcore.objects.grow import foreground_u8, grow

    r = t.ref
    seeds_arr = root[f"{SEEDS}/0"]
    height, width = seeds_arr.shape
    b = t.grow + 1
    wy0, wy1, wx0, wx1 = max(0, r.y0 - b), min(height, r.y1 + b), max(0, r.x0 - b), \
        min(width, r.x1 + b)
    prob_w = root["0"][:, wy0:wy1, wx0:wx1]
    g = grow(seeds_arr[wy0:wy1, wx0:wx1], foreground_u8(prob_w, prob_enc), t.grow,
             t.grow_threshold, blocked=root["labels/mask/0"][wy0:wy1, wx0:wx1] == NODATA)
    cy, cx = r.y0 - wy0, r.x0 - wx0
    h, w = r.y1 - r.y0, r.x1 - r.x0
    inst = g[cy:cy + h, cx:cx + w]
    zero_w, zero_h = np.zeros(w, np.uint32), np.zeros(h, np.uint32)
    ring = (g[cy - 1, cx:cx + w] if r.y0 > 0 else zero_w,
            g[cy + h, cx:cx + w] if r.y1 < height else zero_w,
            g[cy:cy + h, cx - 1] if r.x0 > 0 else zero_h,
            g[cy:cy + h, cx + w] if r.x1 < width else zero_h)
    return np.ascontiguousarray(inst), ring, prob_w[:, cy:cy + h, cx:cx + w]


def _measure_task(t: _Pass) -> list[dict]:
    """Relabel one shard with object ids (grown from the seeds when ``t.grow``), write it, and
    measure its part of each object."""
    root = _root(t.out, "r+")
    r = t.ref
    enc = root.attrs["segcore"].get("probability_encoding", "uint8 0-255")
    enc = "uint8" if enc.startswith("uint8") else "float16"
    mask = root["labels/mask/0"][r.y0:r.y1, r.x0:r.x1]
    if t.grow:
        inst, ring, prob_raw = _grown(t, root, enc)
        ids, inv = np.unique(inst, return_inverse=True)
        local = inv.reshape(inst.shape).astype(np.uint32)
        if ids.size and ids[0] == 0:
            ids = ids[1:]
        else:
            local += 1
        n = int(ids.size)
        # a grown pixel's class is its object's (the mask there says background)
        cls = np.where(inst > 0, t.obj_class[inst], mask).astype(np.uint8)
        obj_cls = t.obj_class[ids]
    else:
        local, n, local_cls = label_block(mask, t.n_classes, t.connectivity)
        inst = t.lut[local]
        ring, prob_raw, cls = t.ring, None, mask
        ids = t.lut[np.arange(1, n + 1)]
        obj_cls = local_cls[1:]
    _write_levels(root[f"labels/{INSTANCES}"], r, inst, t.levels)
    if n == 0:
        return [{"i": (r.row, r.col), "whole": 0, "ids": np.zeros(0, np.uint32),
                 "pixels": mask.size}]
    m = {"ids": ids, **_measure(local, n, inst, ring, r)}
    if prob_raw is None:
        prob_raw = root["0"][:, r.y0:r.y1, r.x0:r.x1]
    prob = _class_probability(prob_raw, cls, m.pop("at"), enc)
    lab = m.pop("lab")
    m["psum"] = np.bincount(lab, weights=prob, minlength=n + 1)[1:]
    pmax = np.full(n + 1, -np.inf, np.float32)
    np.maximum.at(pmax, lab, prob)
    m["pmax"] = pmax[1:].astype(np.float64)
    return [_split_and_write(t, inst, m, obj_cls, mask.size)]


def _write_levels(grp, r: ShardRef, inst: np.ndarray, levels: int) -> None:
    """The shard's instances at level 0 and at the pyramid levels 1..``levels`` whose shards
    are this shard halved (nearest: every 2^L-th pixel, what the level-by-level pyramid
    gives), in one round trip; the pyramid tasks fill the levels above."""
    from segcore.io.zarrstore import write_blocks

    blocks = [(grp["0"], r.y0, r.x0, inst)]
    for lv in range(1, levels + 1):
        a, f = grp[str(lv)], 2 ** lv
        y0, x0 = r.y0 >> lv, r.x0 >> lv
        sub = inst[::f, ::f][:a.shape[0] - y0, :a.shape[1] - x0]
        blocks.append((a, y0, x0, np.ascontiguousarray(sub)))
    write_blocks(blocks)


def _task_levels(grp) -> int:
    """Instance levels a shard task writes itself: while level L's shards are level 0's
    shard >> L (each level-0 shard is then exactly one shard there)."""
    s0 = grp["0"].shards
    lv = 0
    while str(lv + 1) in grp and s0[0] % 2 ** (lv + 1) == 0 and s0[1] % 2 ** (lv + 1) == 0 \
            and grp[str(lv + 1)].shards == (s0[0] >> (lv + 1), s0[1] >> (lv + 1)):
        lv += 1
    return lv


def _measure(local: np.ndarray, n: int, inst: np.ndarray, ring: tuple, r: ShardRef) -> dict:
    """Area, coordinate sums, bounding boxes and crack perimeters of the shard's ``n`` local
    objects, from their pixels only (``at``: flat indices of the object pixels, ``lab``: their
    local ids; bincount adds each object's pixels in the same order as over the whole shard,
    so the sums are the same to the bit). The perimeter counts pixel sides between the object
    and anything else (the image edge, the background, another object), with the neighbours'
    ids beyond the shard's edges (``ring``: top, bottom, left, right)."""
    from scipy import ndimage

    h, w = local.shape
    flat = local.ravel()
    at = np.flatnonzero(flat)
    lab = flat[at]
    m = {"area": np.bincount(lab, minlength=n + 1)[1:].astype(np.float64)}
    m["sum_y"] = np.bincount(lab, weights=at // w + (r.y0 + 0.5), minlength=n + 1)[1:]
    m["sum_x"] = np.bincount(lab, weights=at % w + (r.x0 + 0.5), minlength=n + 1)[1:]
    boxes = ndimage.find_objects(local, max_label=n)
    m["bbox"] = np.array([[s[0].start + r.y0, s[1].start + r.x0, s[0].stop + r.y0,
                           s[1].stop + r.x0] for s in boxes], np.int64)
    top, bottom, left, right = ring
    pad = np.zeros((h + 2, w + 2), np.uint32)
    pad[1:-1, 1:-1] = inst
    pad[0, 1:-1], pad[-1, 1:-1], pad[1:-1, 0], pad[1:-1, -1] = top, bottom, left, right
    pf = pad.ravel()
    p = (at // w + 1) * (w + 2) + at % w + 1  # each object pixel's index in ``pad``
    c = pf[p]
    sides = ((c != pf[p - (w + 2)]).astype(np.uint8) + (c != pf[p + (w + 2)])
             + (c != pf[p - 1]) + (c != pf[p + 1]))
    m["perim"] = np.bincount(lab, weights=sides, minlength=n + 1)[1:]
    m["at"], m["lab"] = at, lab
    return m


def _split_and_write(t: _Pass, inst: np.ndarray, m: dict, classes: np.ndarray,
                     pixels: int) -> dict:
    """Objects inside the shard are complete: their rows (and polygons) go to the shard's part
    file. Objects on an edge shared with another shard go back to the driver as partial
    measurements (and polygon parts), to be added up with their other parts."""
    import shapely

    from segcore.objects.polygons import edge_ids, finish, shard_polygons
    from segcore.objects.table import arrow, rows

    r = t.ref
    border = np.isin(m["ids"], edge_ids(inst, t.shared))
    inside = ~border
    geoms = shard_polygons(inst, r) if t.polygons else {}
    res = {"i": (r.row, r.col), "pixels": pixels, "whole": int(inside.sum()),
           **{k: v[border] for k, v in m.items()},
           "parts": [(int(o), shapely.to_wkb(geoms[int(o)])) for o in m["ids"][border]]
           if t.polygons else [],
           "bounds": None, "types": set()}
    if res["whole"]:
        whole = {k: v[inside] for k, v in m.items()}
        wkb = None
        if t.polygons:
            wkb, res["bounds"], res["types"] = finish([geoms[int(o)] for o in whole["ids"]],
                                                     t.simplify)
        table = arrow(rows(whole, classes[inside], list(t.class_names), t.attrs or {}), wkb)
        _write_part(t.out, r, table)
    return res


def _part_uri(out: str, ref: ShardRef) -> str:
    return join(out, PARTS, f"{ref.row}-{ref.col}.parquet")


def _write_part(out: str, ref: ShardRef, table) -> None:
    import io

    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf)
    write_bytes_atomic(_part_uri(out, ref), buf.getvalue())


def _read_part(out: str, ref: ShardRef):
    import io

    import pyarrow.parquet as pq

    from segcore.io.uri import read_bytes

    return pq.read_table(io.BytesIO(read_bytes(_part_uri(out, ref))))


def _ring(ref: ShardRef, at: dict, strips: list[dict], luts: list[np.ndarray],
          height: int, width: int) -> tuple:
    """The object ids just outside the shard's four edges (0 beyond the image)."""
    h, w = ref.y1 - ref.y0, ref.x1 - ref.x0

    def side(dr: int, dc: int, edge: str, n: int) -> np.ndarray:
        j = at.get((ref.row + dr, ref.col + dc))
        if j is None:
            return np.zeros(n, np.uint32)
        return luts[j][strips[j][edge]]

    return (side(-1, 0, "bottom", w), side(1, 0, "top", w), side(0, -1, "right", h),
            side(0, 1, "left", h))


def _create_instances(root, mask_grp) -> None:
    """``labels/instances``: uint32, the mask's levels, shards and chunks, registered beside
    the mask as an OME label image."""
    from ome_zarr_models.v05.image_label import ImageLabelAttrs
    from ome_zarr_models.v05.labels import LabelsAttrs

    from segcore.io.zarrstore import OME_VERSION, codec

    labels = root["labels"]
    grp = labels.require_group(INSTANCES)
    levels = sorted(int(k) for k in mask_grp.array_keys() if k.isdigit())
    for lv in levels:
        m = mask_grp[str(lv)]
        grp.create_array(str(lv), shape=m.shape, dtype="uint32", chunks=m.chunks,
                         shards=m.shards, compressors=codec("uint32"), fill_value=0,
                         overwrite=True, dimension_names=["y", "x"])
    ms = mask_grp.attrs["ome"]["multiscales"]
    ms = [{**m, "name": INSTANCES} for m in ms]
    grp.attrs["ome"] = ImageLabelAttrs.model_validate({
        "version": OME_VERSION, "multiscales": ms,
        "image-label": {"version": OME_VERSION, "source": {"image": "../../"}}}).model_dump(
        mode="json", exclude_none=True, by_alias=True)
    names = [n for n in labels.attrs.get("ome", {}).get("labels", []) if n != INSTANCES]
    labels.attrs["ome"] = LabelsAttrs(version=OME_VERSION, labels=[*names, INSTANCES]).model_dump(
        mode="json", exclude_none=True)


def _pyramid_task(args) -> list:
    from segcore.io.zarrstore import downsample_block

    out, lv, row, col, shard = args
    grp = _root(out, "r+")[f"labels/{INSTANCES}"]
    downsample_block(grp[str(lv - 1)], grp[str(lv)], row, col, shard, "nearest")
    return []


def extract_objects(out: str, connectivity: int = 4, client=None, progress: bool = False,
                    require_complete: bool = True, polygons: bool = True,
                    simplify: float = 0.0, grow: int = 0,
                    grow_threshold: float = 0.0, lanes: int | str = "auto",
                    _t0: float | None = None) -> dict:
    """Instances, table and summary for the finished result at ``out`` (see module doc).
    ``require_complete=False`` is for ``segment`` itself, before it writes COMPLETE.
    ``grow``: seeded growth steps (:mod:`segcore.objects.grow`) into pixels with foreground
    probability >= ``grow_threshold`` (off by default: on the nuclei data it lowered F1, see
    docs/RESULTS.md). Without a client the shard tasks run on ``lanes`` ('auto': one per
    core, as segment's lanes): worker processes when the scene has PROCESS_MIN_SHARDS shards
    or more (polygonising holds the GIL; a process costs ~1 s to start), else threads."""
    from segcore.execute import local_lanes, process_lanes, run_tasks
    from segcore.objects.table import units

    if require_complete and not exists(join(out, "COMPLETE")):
        raise IncompleteResultError(f"{out}: no COMPLETE marker: segment the scene first")
    t0 = _t0 or time.perf_counter()
    root = _root(out, "r+")
    attrs = root.attrs["segcore"]
    class_names = list(attrs.get("class_names") or ["background", "foreground"])
    n_classes = max(2, len(class_names))
    mask0 = root["labels/mask/0"]
    height, width = mask0.shape
    sy, sx = mask0.shards
    refs = shard_refs(height, width, sy, sx)
    at = {(r.row, r.col): i for i, r in enumerate(refs)}
    grow = int(grow or 0)
    if grow < 0 or not 0 <= grow_threshold <= 1:
        raise InputError(f"grow {grow}, grow threshold {grow_threshold}: use steps >= 0 and a "
                         "probability between 0 and 1")
    lanes = local_lanes(lanes, len(refs)) if client is None else 1
    if client is None and lanes > 1 and len(refs) >= PROCESS_MIN_SHARDS:
        with process_lanes(lanes) as pool:
            return extract_objects(out, connectivity, pool, progress, require_complete,
                                   polygons, simplify, grow, grow_threshold, lanes, t0)
    _create_instances(root, root["labels/mask"])

    first = run_tasks(_label_task, [_Pass(out, r, n_classes, connectivity) for r in refs],
                      client, None, progress, "objects: label", lambda s: 1, lanes)
    first.sort(key=lambda d: at[tuple(d["i"])])
    counts = [d["n"] for d in first]
    strips = [d["edges"] for d in first]
    luts, obj_class = merge(refs, counts, [d["classes"] for d in first], strips, connectivity)
    t1 = time.perf_counter()
    if grow:
        from segcore.io.zarrstore import create_multiscale

        create_multiscale(root.require_group(SEEDS), height, width, None, "uint32", [sy],
                          [mask0.chunks[0]], 1, None, None, name=SEEDS)
        run_tasks(_seed_task, [_Pass(out, r, n_classes, connectivity, luts[i])
                               for i, r in enumerate(refs)],
                  client, None, progress, "objects: seeds", lambda s: 1, lanes)
    remove_tree(join(out, PARTS))  # a crashed earlier run's parts
    unit_attrs = {k: attrs[k] for k in ("geo", "pixel_size", "pixel_unit") if k in attrs}
    own_levels = _task_levels(root[f"labels/{INSTANCES}"])
    specs = [_Pass(out, r, n_classes, connectivity, luts[i],
                   None if grow else _ring(r, at, strips, luts, height, width),
                   (r.row > 0, r.y1 < height, r.col > 0, r.x1 < width), polygons,
                   grow, grow_threshold, obj_class if grow else None, tuple(class_names),
                   unit_attrs, simplify, own_levels)
             for i, r in enumerate(refs)]
    parts = run_tasks(_measure_task, specs, client, None, progress, "objects: measure",
                      lambda s: 1, lanes)
    parts.sort(key=lambda d: at[tuple(d["i"])])
    if grow:
        del root[SEEDS]
    grp = root[f"labels/{INSTANCES}"]
    for lv in sorted(int(k) for k in grp.array_keys() if k.isdigit())[1 + own_levels:]:
        h, w = grp[str(lv)].shape
        shard = grp[str(lv)].shards[0]
        run_tasks(_pyramid_task, [(out, lv, rr, cc, shard) for rr in range(math_ceil(h, shard))
                                  for cc in range(math_ceil(w, shard))],
                  client, None, False, f"objects: level {lv}", lambda s: 1, lanes)
    files, per_class_idx, n_obj = _write_out(out, refs, parts, luts, obj_class, class_names,
                                             unit_attrs, polygons, simplify)
    per_class = {class_names[k] if k < len(class_names) else str(k): int(per_class_idx[k])
                 for k in range(1, n_classes)}
    summary = {"objects": n_obj, "per_class": per_class, "connectivity": connectivity,
               "grow": grow, "grow_threshold": grow_threshold,
               "instances": join(out, RESULT, "labels", INSTANCES), "files": files,
               "seconds": round(time.perf_counter() - t0, 3),
               "merge_seconds": round(t1 - t0, 3)}
    summary["units"] = units(attrs)
    write_bytes_atomic(join(out, "objects.json"), json.dumps(summary, indent=2).encode())
    return summary


def _write_out(out: str, refs: list[ShardRef], parts: list[dict], luts: list[np.ndarray],
               obj_class: np.ndarray, class_names: list[str], unit_attrs: dict,
               polygons: bool, simplify: float) -> tuple[list[str], np.ndarray, int]:
    """The object table (and polygons) in id order, one chunk per shard: the shard's part file
    (its complete objects) and the objects spanning shards whose ids start there (their parts
    added up and unioned here). Objects are numbered in the order of their first shard, so the
    ids that start in shard i are those above every id in shards 0..i-1. Returns (files,
    objects per class index, object count); the part files are removed."""
    import pyarrow as pa

    from segcore.objects.polygons import finish, union_parts
    from segcore.objects.table import ObjectWriter, add_up, arrow, rows, schema
    from segcore.objects.vectors import geo_schema

    span = add_up(parts)  # objects on shared edges, all their parts added up
    wkb = None
    bounds = [p["bounds"] for p in parts if p.get("bounds")]
    types: set[str] = set().union(*(p.get("types", set()) for p in parts))
    if polygons:
        pieces: dict[int, list[bytes]] = {}
        for p in parts:
            for oid, w in p.get("parts", ()):
                pieces.setdefault(oid, []).append(w)
        geoms = union_parts(pieces)
        del pieces
        wkb, b, t = finish([geoms[int(o)] for o in span["ids"]], simplify)
        del geoms
        if b:
            bounds.append(b)
        types |= t
    span_t = arrow(rows(span, obj_class[span["ids"]], class_names, unit_attrs), wkb)
    box = None
    if bounds:
        a = np.array(bounds)
        box = (a[:, 0].min(), a[:, 1].min(), a[:, 2].max(), a[:, 3].max())
    writer = ObjectWriter(out, geo_schema(schema(), box, types) if polygons else None)
    per_class = np.zeros(max(len(class_names), int(obj_class.max(initial=0)) + 1), np.int64)
    try:
        top = 0
        ids = span_t["id"].to_numpy()
        for ref, p, lut in zip(refs, parts, luts, strict=True):
            first = top
            top = max(top, int(lut.max(initial=0)))
            lo, hi = np.searchsorted(ids, [first + 1, top + 1])
            chunk = [span_t.slice(lo, hi - lo)] if hi > lo else []
            if p["whole"]:
                chunk.append(_read_part(out, ref))
            if not chunk:
                continue
            t = pa.concat_tables(chunk) if len(chunk) > 1 else chunk[0]
            t = t.sort_by("id")
            per_class += np.bincount(t["class_index"].to_numpy(), minlength=per_class.size)
            writer.write(t)
        files = writer.close()
    except BaseException:
        writer.abort()
        raise
    remove_tree(join(out, PARTS))
    return files, per_class, writer.rows


def math_ceil(a: int, b: int) -> int:
    return -(-a // b)


__all__ = ["COLUMNS", "extract_objects", "InputError"]
