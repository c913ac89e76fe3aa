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
from segcore.io.uri import exists, join, write_bytes_atomic
from segcore.objects.instances import INSTANCES, ShardRef, edges, label_block, merge, shard_refs

RESULT = "result.zarr"
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


def _class_probability(prob: np.ndarray, mask: np.ndarray, encoding: str) -> np.ndarray:
    """Each pixel's probability of its own class, as float32 0-1."""
    if prob.shape[0] == 1:
        p = prob[0]
    else:
        p = np.take_along_axis(prob, mask[None].astype(np.intp), 0)[0]
    p = p.astype(np.float32)
    return p / 255 if encoding == "uint8" else p


def _measure_task(t: _Pass) -> list[dict]:
    """Relabel one shard with object ids, write it, and measure its part of each object."""
    from scipy import ndimage

    from segcore.io.zarrstore import write_block

    root = _root(t.out, "r+")
    r = t.ref
    mask = root["labels/mask/0"][r.y0:r.y1, r.x0:r.x1]
    local, n, _ = label_block(mask, t.n_classes, t.connectivity)
    inst = t.lut[local]
    write_block(root[f"labels/{INSTANCES}/0"], r.y0, r.x0, inst)
    if n == 0:
        return [{"i": (r.row, r.col), "ids": np.zeros(0, np.uint32), "pixels": mask.size}]
    whole, parts = [], []
    if t.polygons:
        from segcore.objects.polygons import shard_polygons

        whole, parts = shard_polygons(inst, r, dict(zip(("top", "bottom", "left", "right"),
                                                        t.shared, strict=True)))
    idx = np.arange(1, n + 1)
    flat = local.ravel()
    area = np.bincount(flat, minlength=n + 1)[1:]
    yy, xx = np.indices(local.shape, dtype=np.float64)
    sum_y = np.bincount(flat, weights=(yy + (r.y0 + 0.5)).ravel(), minlength=n + 1)[1:]
    sum_x = np.bincount(flat, weights=(xx + (r.x0 + 0.5)).ravel(), minlength=n + 1)[1:]
    boxes = ndimage.find_objects(local, max_label=n)
    bbox = np.array([[s[0].start + r.y0, s[1].start + r.x0, s[0].stop + r.y0, s[1].stop + r.x0]
                     for s in boxes], np.int64)
    enc = root.attrs["segcore"].get("probability_encoding", "uint8 0-255")
    prob = _class_probability(root["0"][:, r.y0:r.y1, r.x0:r.x1], mask,
                              "uint8" if enc.startswith("uint8") else "float16")
    psum = np.bincount(flat, weights=prob.ravel(), minlength=n + 1)[1:]
    pmax = np.asarray(ndimage.maximum(prob, local, idx), np.float64).reshape(-1)
    # crack perimeter: pixel sides between the object and anything else (the image edge, the
    # background, another object), with the neighbours' ids beyond the shard's edges
    top, bottom, left, right = t.ring
    pad = np.zeros((inst.shape[0] + 2, inst.shape[1] + 2), np.uint32)
    pad[1:-1, 1:-1] = inst
    pad[0, 1:-1], pad[-1, 1:-1], pad[1:-1, 0], pad[1:-1, -1] = top, bottom, left, right
    c = pad[1:-1, 1:-1]
    sides = ((c != pad[:-2, 1:-1]).astype(np.uint8) + (c != pad[2:, 1:-1])
             + (c != pad[1:-1, :-2]) + (c != pad[1:-1, 2:]))
    perim = np.bincount(flat, weights=sides.ravel(), minlength=n + 1)[1:]
    return [{"i": (r.row, r.col), "ids": t.lut[idx], "area": area, "sum_y": sum_y,
             "sum_x": sum_x, "bbox": bbox, "psum": psum, "pmax": pmax, "perim": perim,
             "whole": whole, "parts": parts, "pixels": mask.size}]


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
                    simplify: float = 0.0) -> dict:
    """Instances, table and summary for the finished result at ``out`` (see module doc).
    ``require_complete=False`` is for ``segment`` itself, before it writes COMPLETE."""
    from segcore.execute import run_tasks
    from segcore.objects.table import build_table, units, write_table

    if require_complete and not exists(join(out, "COMPLETE")):
        raise IncompleteResultError(f"{out}: no COMPLETE marker: segment the scene first")
    t0 = time.perf_counter()
    root = _root(out, "r+")
    attrs = root.attrs["segcore"]
    class_names = list(attrs.get("class_names") or ["background", "foreground"])
    n_classes = max(2, len(class_names))
    mask0 = root["labels/mask/0"]
    height, width = mask0.shape
    sy, sx = mask0.shards
    refs = shard_refs(height, width, sy, sx)
    at = {(r.row, r.col): i for i, r in enumerate(refs)}
    _create_instances(root, root["labels/mask"])

    first = run_tasks(_label_task, [_Pass(out, r, n_classes, connectivity) for r in refs],
                      client, None, progress, "objects: label", lambda s: 1)
    first.sort(key=lambda d: at[tuple(d["i"])])
    counts = [d["n"] for d in first]
    strips = [d["edges"] for d in first]
    luts, obj_class = merge(refs, counts, [d["classes"] for d in first], strips, connectivity)
    t1 = time.perf_counter()
    specs = [_Pass(out, r, n_classes, connectivity, luts[i],
                   _ring(r, at, strips, luts, height, width),
                   (r.row > 0, r.y1 < height, r.col > 0, r.x1 < width), polygons)
             for i, r in enumerate(refs)]
    parts = run_tasks(_measure_task, specs, client, None, progress, "objects: measure",
                      lambda s: 1)
    grp = root[f"labels/{INSTANCES}"]
    for lv in sorted(int(k) for k in grp.array_keys() if k.isdigit())[1:]:
        h, w = grp[str(lv)].shape
        shard = grp[str(lv)].shards[0]
        run_tasks(_pyramid_task, [(out, lv, rr, cc, shard) for rr in range(math_ceil(h, shard))
                                  for cc in range(math_ceil(w, shard))],
                  client, None, False, f"objects: level {lv}", lambda s: 1)
    table = build_table(parts, obj_class, class_names, attrs)
    files = write_table(table, out)
    if polygons:
        from segcore.objects.polygons import assemble
        from segcore.objects.vectors import write_polygons

        geoms = assemble(parts, len(obj_class) - 1)
        files.append(write_polygons(geoms[1:], table, out, simplify))
    n_obj = len(table["id"])
    per_class = {class_names[k] if k < len(class_names) else str(k):
                 int((table["class_index"] == k).sum()) for k in range(1, n_classes)}
    summary = {"objects": n_obj, "per_class": per_class, "connectivity": connectivity,
               "instances": join(out, RESULT, "labels", INSTANCES), "files": files,
               "seconds": round(time.perf_counter() - t0, 3),
               "merge_seconds": round(t1 - t0, 3)}
    summary["units"] = units(attrs)
    write_bytes_atomic(join(out, "objects.json"), json.dumps(summary, indent=2).encode())
    return summary


def math_ceil(a: int, b: int) -> int:
    return -(-a // b)


__all__ = ["COLUMNS", "extract_objects", "InputError"]
