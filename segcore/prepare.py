"""Preparing a scene's output: the arrays, the plan record, and what a rerun finds there.

``prepare(p)`` creates the OME-Zarr result (probabilities and the mask label, their pyramid
levels and shards as planned) and writes plan.json, or finds the same plan there (a resume,
or a complete result) and keeps it. A changed plan of the same scene restarts; another
scene's output is refused, never overwritten.
"""

from __future__ import annotations

import json

from segcore.errors import ConfigError
from segcore.io.uri import exists, join, read_bytes, remove_tree, scene_key, write_bytes_atomic
from segcore.plan import RESULT, ScenePlan


def is_complete(out: str) -> bool:
    """True only if the COMPLETE marker exists (written after everything else)."""
    return exists(join(out, "COMPLETE"))


def _old_plan(uri: str) -> dict:
    try:
        old = json.loads(read_bytes(uri))
    except (UnicodeDecodeError, json.JSONDecodeError):
        old = None
    if not isinstance(old, dict):
        raise ConfigError(f"{uri}: is not a segcore plan; the output prefix holds something "
                          "else: choose another one, or delete it first")
    return old


def prepare(p: ScenePlan) -> str:
    """Create (or reuse, for a resume) the output arrays. Returns 'complete', 'resume' or
    'new'."""
    from segcore.inference import NODATA_LABEL
    from segcore.io.zarrstore import create_multiscale, finish_label, open_group
    from segcore.tiling import shard_chunk

    cfg, info = p.cfg, p.info
    plan_uri = join(cfg.out, "plan.json")
    if exists(plan_uri):
        old = _old_plan(plan_uri)
        if old.get("signature") == p.signature:
            return "complete" if is_complete(cfg.out) else "resume"
        if old.get("src") is not None and scene_key(old["src"]) != scene_key(cfg.src):
            raise ConfigError(  # a changed plan of the same scene restarts; another scene's
                f"{cfg.out}: holds the result of another scene ({old['src']}); segment "
                f"{cfg.src} into another output prefix, or delete {cfg.out} first")
    for name in ("COMPLETE", "report.json", "plan.json", "shards", RESULT, "preview.png",
                 "seams.png", "objects.json", "objects-parts", "objects.parquet", "objects.csv",
                 "polygons.parquet", "mask.tif", "mask.cog.tif", "mask.ome.tif", "objects.qupath.geojson",
                 "objects.gpkg", "objects.geoparquet.parquet", "objects.wgs84.geojson"):
        remove_tree(join(cfg.out, name))
    n_levels = p.n_levels
    shards = list(p.level_shards)
    chunks = [shard_chunk(sh, p.grid.multiple if lv == 0 else 1) for lv, sh in enumerate(shards)]
    root = open_group(join(cfg.out, RESULT), mode="w")
    create_multiscale(root, info.height, info.width, p.out_channels, cfg.prob_dtype, shards,
                      chunks, n_levels, p.pixel_size, p.pixel_unit, name="probabilities")
    mask = root.require_group("labels").require_group("mask")
    create_multiscale(mask, info.height, info.width, None, "uint8", shards, chunks, n_levels,
                      p.pixel_size, p.pixel_unit, name="mask",
                      fill_value=NODATA_LABEL if p.skipped_nodata else 0)
    nodata = info.nodata is not None or info.dtype.startswith("float")
    finish_label(root, "mask", p.class_names, nodata_label=NODATA_LABEL if nodata else None)
    root.attrs["segcore"] = {
        "src": cfg.src, "level": info.level, "model": cfg.model,
        "model_sha256": p.model_sha256, "class_names": list(p.class_names),
        "pixel_size": p.pixel_size, "pixel_unit": p.pixel_unit, "geo": info.geo,
        "probability_encoding": "uint8 0-255" if cfg.prob_dtype == "uint8" else "float16",
        **({"class_map": p.class_map} if p.class_map else {}),
        **({"channel_names": list(info.channel_names)} if info.channel_names else {}),
        **({"nodata_label": NODATA_LABEL} if nodata else {}),
    }
    write_bytes_atomic(plan_uri, json.dumps({
        "signature": p.signature, "src": cfg.src, "tiles": len(p.grid.tiles), "core": p.grid.core,
        "halo": p.grid.halo, "tile": p.grid.tile, "levels": n_levels,
    }).encode())
    return "new"
