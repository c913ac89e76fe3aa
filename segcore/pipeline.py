"""The one place that composes IO, tiling, inference and writing: ``segment``.

Output under ``cfg.out`` (a local path or any fsspec prefix)::

    result.zarr/            OME-Zarr 0.5: probabilities (c, y, x) as the image, multiscale
      labels/mask/          ... and the class mask (y, x, uint8) as an OME label image
    shards/<row>_<col>.json per-shard completion records (digest of the shard's bytes)
    plan.json               what was planned (a changed plan restarts; the same plan resumes)
    report.json             written at the end
    preview.png             mask over a thumbnail
    COMPLETE                written last: only then does the result count as complete

A failed run leaves no COMPLETE marker and no report; a rerun with the same plan recomputes
only the shards whose records are missing or do not match their data.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from segcore.config import Frozen
from segcore.errors import IncompleteResultError, InputError
from segcore.execute import run_tasks
from segcore.io.uri import exists, get_fs, join, read_bytes, write_bytes_atomic
from segcore.models.checkpoint import read_checkpoint
from segcore.models.fields import ReceptiveField, cached_receptive_field
from segcore.tiling import TileGrid, plan_tiles, round_up

RESULT = "result.zarr"


class SegmentConfig(Frozen):
    src: str = Field(description="scene URI (TIFF/SVS/GeoTIFF/PNG/Zarr; local or s3://...)")
    out: str = Field(description="output prefix (local or s3://...)")
    model: str = Field(description="checkpoint URI")
    level: int | None = Field(None, ge=0)
    mpp: float | None = Field(None, gt=0, description="target pixel size (um or m per pixel)")
    tile: int = Field(1024, ge=16, le=16384, description="model window edge in pixels")
    halo: int | Literal["auto"] = "auto"
    batch: int = Field(4, ge=1, le=256)
    device: str = "auto"
    amp: Literal["auto", "none", "bf16", "fp16"] = "auto"
    blend: bool = Field(False, description="average overlapping windows (for a halo below "
                        "the receptive field); up to 9x the compute")
    skip_background: bool = True
    foreground: Literal["auto", "tissue", "nonzero", "all"] = "auto"
    prob_dtype: Literal["uint8", "float16"] = "uint8"
    shards_per_task: int = Field(4, ge=1, le=1024)
    pyramid: bool = True

    @field_validator("halo")
    @classmethod
    def _halo(cls, v):
        if isinstance(v, int) and v < 0:
            raise ValueError(f"halo {v} must be >= 0 or 'auto'")
        return v

    @model_validator(mode="after")
    def _level_or_mpp(self):
        if self.level is not None and self.mpp is not None:
            raise ValueError("give --level or --mpp, not both")
        return self


class Report(BaseModel):
    src: str
    out: str
    model: str
    model_sha256: str
    scene: dict[str, Any]
    tile: int
    halo: int
    core: int
    receptive_field: int | None
    exact: bool
    tiles_total: int
    tiles_run: int = 0
    tiles_skipped_background: int = 0
    tiles_resumed: int = 0
    seconds: float = 0.0
    mpx_per_s: float = 0.0
    versions: dict[str, str] = Field(default_factory=dict)
    uris: dict[str, str] = Field(default_factory=dict)
    warnings: list[str] = Field(default_factory=list)


@dataclass
class ScenePlan:
    cfg: SegmentConfig
    info: Any  # segcore.io.readers.SceneInfo
    grid: TileGrid
    field: ReceptiveField
    exact: bool
    class_names: tuple[str, ...]
    out_channels: int
    model_sha256: str
    pixel_size: float | None
    pixel_unit: str | None
    run: tuple[bool, ...]
    warnings: list[str] = field(default_factory=list)

    @property
    def signature(self) -> str:
        key = {"src": self.cfg.src, "level": self.info.level, "shape": [self.info.height,
               self.info.width], "model": self.model_sha256, "tile": self.grid.tile,
               "halo": self.grid.halo, "prob_dtype": self.cfg.prob_dtype,
               "blend": self.cfg.blend}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def choose_halo(tile: int, multiple: int, field: ReceptiveField, halo) -> tuple[int, bool, list[str]]:
    """(halo, exact, warnings). 'auto' takes the receptive-field radius when it fits in the
    tile (exact stitching); otherwise the largest halo leaving half the tile as core, flagged
    approximate."""
    warnings: list[str] = []
    if field.is_global:
        exact = False
        h = tile // 4 if halo == "auto" else halo
        warnings.append("the model normalises over the whole map (group/instance norm): tiled "
                        "output cannot equal whole-image output for any halo")
        return h, exact, warnings
    need = round_up(field.radius, multiple)
    if halo == "auto":
        if 2 * need < tile and tile - 2 * need >= multiple:
            return need, True, warnings
        h = (tile // 4) // multiple * multiple
        warnings.append(
            f"receptive field radius {field.radius} px needs a halo of {need}, which does not fit "
            f"a {tile}-px tile (needs --tile >= {2 * need + multiple}); using halo {h}: "
            "stitching is approximate"
        )
        return h, False, warnings
    exact = halo >= field.radius
    if not exact:
        warnings.append(f"halo {halo} < receptive field radius {field.radius}: stitching is "
                        "approximate (seams are possible)")
    return halo, exact, warnings


def plan(cfg: SegmentConfig) -> ScenePlan:
    """Read the scene's metadata and the checkpoint's contract; lay out the tiles; decide
    which contain foreground. Cheap: reads no full-resolution pixels."""
    from segcore.foreground import foreground_mask, tile_has_foreground
    from segcore.io.readers import open_scene

    ckpt, _ = read_checkpoint(read_bytes(cfg.model), cfg.model)
    scene = open_scene(cfg.src, level=cfg.level, mpp=cfg.mpp)
    try:
        info = scene.info
        if info.channels != ckpt.spec.in_channels:
            raise InputError(
                f"{cfg.src}: has {info.channels} channel(s) but the model {cfg.model} expects "
                f"{ckpt.spec.in_channels}; pick a matching scene or model"
            )
        import torch

        from segcore.models.registry import build_model

        with torch.device("meta"):  # shapes only: no weights allocated or initialised
            multiple = int(getattr(build_model(ckpt.spec), "input_multiple", 1))
        rf = cached_receptive_field(ckpt.spec)
        halo, exact, warnings = choose_halo(cfg.tile, multiple, rf, cfg.halo)
        grid = plan_tiles(info.height, info.width, cfg.tile, halo, multiple)
        if cfg.skip_background and cfg.foreground != "all":
            fg, factor = foreground_mask(scene, kind=cfg.foreground)
            run = tuple(tile_has_foreground(fg, factor, t.y0, t.y1, t.x0, t.x1)
                        for t in grid.tiles)
        else:
            run = (True,) * len(grid.tiles)
    finally:
        scene.close()
    return ScenePlan(cfg, info, grid, rf, exact, tuple(ckpt.contract.class_names),
                     ckpt.spec.out_channels, ckpt.sha256, info.pixel_size, info.pixel_unit,
                     run, warnings)


def is_complete(out: str) -> bool:
    """True only if the COMPLETE marker exists (written after everything else)."""
    return exists(join(out, "COMPLETE"))


def load_report(out: str) -> Report:
    if not is_complete(out):
        raise IncompleteResultError(f"{out}: no COMPLETE marker: the run did not finish")
    return Report.model_validate_json(read_bytes(join(out, "report.json")))


def _versions() -> dict[str, str]:
    import dask
    import numpy
    import torch
    import zarr

    from segcore import __version__

    return {"segcore": __version__, "torch": torch.__version__, "zarr": zarr.__version__,
            "dask": dask.__version__, "numpy": numpy.__version__}


def _rm(out: str, name: str) -> None:
    fs, path = get_fs(join(out, name))
    try:
        if fs.exists(path):
            fs.rm(path, recursive=True)
    except FileNotFoundError:
        pass


def prepare(p: ScenePlan) -> str:
    """Create (or reuse, for a resume) the output arrays. Returns 'complete', 'resume' or
    'new'."""
    from segcore.io.zarrstore import (
        create_multiscale,
        finish_label,
        n_levels_for,
        open_group,
    )
    from segcore.tiling import shard_chunk

    cfg, info = p.cfg, p.info
    plan_uri = join(cfg.out, "plan.json")
    if exists(plan_uri):
        old = json.loads(read_bytes(plan_uri))
        if old.get("signature") == p.signature:
            return "complete" if is_complete(cfg.out) else "resume"
    for name in ("COMPLETE", "report.json", "plan.json", "shards", RESULT, "preview.png"):
        _rm(cfg.out, name)
    n_levels = n_levels_for(info.height, info.width) if cfg.pyramid else 1
    shard = p.grid.core
    chunk = shard_chunk(shard, p.grid.multiple)
    root = open_group(join(cfg.out, RESULT), mode="w")
    create_multiscale(root, info.height, info.width, p.out_channels, cfg.prob_dtype, shard,
                      chunk, n_levels, p.pixel_size, p.pixel_unit, name="probabilities")
    mask = root.require_group("labels").require_group("mask")
    create_multiscale(mask, info.height, info.width, None, "uint8", shard, chunk, n_levels,
                      p.pixel_size, p.pixel_unit, name="mask")
    finish_label(root, "mask", p.class_names)
    root.attrs["segcore"] = {
        "src": cfg.src, "level": info.level, "model": cfg.model,
        "model_sha256": p.model_sha256, "class_names": list(p.class_names),
        "pixel_size": p.pixel_size, "pixel_unit": p.pixel_unit, "geo": info.geo,
        "probability_encoding": "uint8 0-255" if cfg.prob_dtype == "uint8" else "float16",
    }
    write_bytes_atomic(plan_uri, json.dumps({
        "signature": p.signature, "tiles": len(p.grid.tiles), "core": p.grid.core,
        "halo": p.grid.halo, "tile": p.grid.tile, "levels": n_levels,
    }).encode())
    return "new"


def _task_specs(p: ScenePlan):
    from segcore.shards import TaskSpec

    cfg = p.cfg
    n = cfg.shards_per_task
    tiles = p.grid.tiles
    out = join(cfg.out, RESULT)
    by_rc = {(t.row, t.col): t for t in tiles}
    for i in range(0, len(tiles), n):
        group = tiles[i:i + n]
        neighbours = tuple(
            tuple(by_rc[(t.row + dy, t.col + dx)] for dy in (-1, 0, 1) for dx in (-1, 0, 1)
                  if (dy or dx) and (t.row + dy, t.col + dx) in by_rc)
            for t in group) if cfg.blend else ()
        yield TaskSpec(cfg.src, p.info.level, out, cfg.out, cfg.model, cfg.device, cfg.amp,
                       cfg.batch, cfg.prob_dtype, group, p.run[i:i + n],
                       tuple(range(i, i + len(group))), cfg.blend, p.grid.halo, neighbours)


def run_shards(p: ScenePlan, client=None, resources: dict | None = None,
               progress: bool = True) -> list[dict]:
    from segcore.shards import run_task

    specs = list(_task_specs(p))
    return run_tasks(run_task, specs, client, resources, progress, "segment",
                   lambda s: len(s.tiles))


def _downsample_task(args) -> list:
    from segcore.io.zarrstore import downsample_block, open_group

    out, level, row, col, shard = args
    root = open_group(out, mode="r+")
    downsample_block(root[str(level - 1)], root[str(level)], row, col, shard, "mean")
    m = root["labels/mask"]
    downsample_block(m[str(level - 1)], m[str(level)], row, col, shard, "nearest")
    return []


def build_pyramid(p: ScenePlan, client=None, progress: bool = False) -> int:
    """Fill levels 1.. of probabilities and mask, one task per destination shard."""
    import math

    from segcore.io.zarrstore import level_shape, open_group

    out = join(p.cfg.out, RESULT)
    root = open_group(out, mode="r")
    n_levels = len([k for k in root.array_keys() if k.isdigit()])
    shard = p.grid.core
    for lv in range(1, n_levels):
        h, w = level_shape(p.info.height, p.info.width, lv)
        specs = [(out, lv, r, c, shard) for r in range(math.ceil(h / shard))
                 for c in range(math.ceil(w / shard))]
        run_tasks(_downsample_task, specs, client, None, progress, f"pyramid {lv}", lambda s: 1)
    return n_levels


def finalize(p: ScenePlan, results: list[dict], seconds: float, client=None) -> Report:
    from segcore.preview import write_preview

    cfg = p.cfg
    levels = build_pyramid(p, client) if cfg.pyramid else 1
    status = [r["status"] for r in results]
    px = p.info.height * p.info.width
    report = Report(
        src=cfg.src, out=cfg.out, model=cfg.model, model_sha256=p.model_sha256,
        scene={"height": p.info.height, "width": p.info.width, "channels": p.info.channels,
               "dtype": p.info.dtype, "level": p.info.level, "pixel_size": p.pixel_size,
               "pixel_unit": p.pixel_unit, "geo": p.info.geo, "format": p.info.format},
        tile=p.grid.tile, halo=p.grid.halo, core=p.grid.core,
        receptive_field=None if p.field.is_global else p.field.radius, exact=p.exact,
        tiles_total=len(p.grid.tiles), tiles_run=status.count("run"),
        tiles_skipped_background=status.count("background"),
        tiles_resumed=status.count("resumed"), seconds=round(seconds, 3),
        mpx_per_s=round(px / 1e6 / seconds, 4) if seconds > 0 else 0.0,
        versions=_versions(),
        uris={"result": join(cfg.out, RESULT), "mask": join(cfg.out, RESULT, "labels/mask"),
              "probabilities": join(cfg.out, RESULT), "report": join(cfg.out, "report.json"),
              "preview": join(cfg.out, "preview.png"), "levels": str(levels)},
        warnings=p.warnings,
    )
    write_preview(p, join(cfg.out, "preview.png"))
    write_bytes_atomic(join(cfg.out, "report.json"), report.model_dump_json(indent=2).encode())
    write_bytes_atomic(join(cfg.out, "COMPLETE"), json.dumps(
        {"signature": p.signature, "report_sha256": hashlib.sha256(
            report.model_dump_json().encode()).hexdigest()}).encode())
    return report


def segment(cfg: SegmentConfig, client=None, resources: dict | None = None,
            progress: bool = True) -> Report:
    """Segment one scene end to end (resuming a half-done run with the same plan)."""
    t0 = time.perf_counter()
    p = plan(cfg)
    state = prepare(p)
    if state == "complete":
        return load_report(cfg.out)
    results = run_shards(p, client, resources, progress)
    return finalize(p, results, time.perf_counter() - t0, client)
