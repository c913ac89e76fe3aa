"""The one place that composes IO, tiling, inference and writing: ``segment``.

Output under ``cfg.out`` (a local path or any fsspec prefix)::

    result.zarr/            OME-Zarr 0.5: probabilities (c, y, x) as the image, multiscale
      labels/mask/          ... and the class mask (y, x, uint8) as an OME label image
    shards/<row>_<col>.json per-shard completion records (digest of the shard's bytes)
    plan.json               what was planned (a changed plan restarts; the same plan resumes;
                            another scene's plan is refused, never overwritten)
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

from segcore.config import Frozen, check_input_dtype, split_names
from segcore.errors import ConfigError, IncompleteResultError, InputError
from segcore.execute import MAX_LANES, local_lanes, run_tasks  # noqa: F401 - re-exported
from segcore.io.uri import exists, join, read_bytes, remove_tree, scene_key, write_bytes_atomic
from segcore.models.checkpoint import read_checkpoint
from segcore.models.fields import ReceptiveField, cached_receptive_field
from segcore.tiling import TileGrid, plan_tiles, round_up

RESULT = "result.zarr"
PREVIEW_SIDE = 1024
MIN_LEVEL_SHARD = 128  # a pyramid level is written by the shard tasks while its shards are >= this


def task_levels(core: int, n_levels: int) -> int:
    """How many pyramid levels the shard tasks can write themselves: level L needs the core
    to halve evenly L times (so each core's footprint is whole shards of ``core >> L``)."""
    lv = 0
    while lv + 1 < n_levels and core % (2 ** (lv + 1)) == 0 and \
            core >> (lv + 1) >= MIN_LEVEL_SHARD:
        lv += 1
    return lv


class SegmentConfig(Frozen):
    src: str = Field(description="scene URI (TIFF/SVS/GeoTIFF/PNG/Zarr; local or s3://...)")
    out: str = Field(description="output prefix (local or s3://...)")
    model: str = Field(description="checkpoint URI")
    level: int | None = Field(None, ge=0)
    mpp: float | None = Field(None, gt=0, description="target pixel size (um or m per pixel)")
    channels: tuple[str, ...] | None = Field(
        None, description="scene channels to give the model, in order: names ('B04,B03,B02', "
        "'DAPI') or 1-based band indices ('4,3,2', as GDAL/QGIS count). Default: by the "
        "checkpoint's channel names where both it and the scene have names, else all")
    channel_names: tuple[str, ...] | None = Field(
        None, description="names for the scene's channels (one each), for files that do not "
        "name them (e.g. Sentinel-2 band names)")
    tile: int | Literal["auto"] = Field(
        1024, description="model window edge in pixels, or 'auto': the largest the device's "
        "memory budget holds")
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
    lanes: int | Literal["auto"] = Field(
        "auto", description="without Dask: shard tasks this process runs side by side on "
        "threads, sharing one model (its forwards queue on the device); 'auto' = the cores "
        "this process may use, at most 4")
    pyramid: bool = True
    compile: bool = Field(False, description="torch.compile the model (first call per window "
                          "shape compiles: pays off on large scenes only)")
    objects: bool = Field(False, description="also find objects (instances with global ids "
                          "across shards) and write their table; counts go into the report")
    connectivity: Literal[4, 8] = Field(4, description="objects: pixels touch by an edge (4) "
                                        "or also by a corner (8)")
    grow: int = Field(0, ge=0, le=64, description="objects: grow the components this many px "
                      "over unlabelled pixels, the surer object winning contested ones (a "
                      "seeded watershed limited to N px; for boundary-trained models)")
    grow_threshold: float = Field(0.0, ge=0, le=1, description="objects: grow only into pixels "
                                  "whose foreground probability is at least this")
    seams: int = Field(0, ge=0, le=4096, description="seam report: check this many sampled "
                       "shards (exact mode: recomputed with a larger halo; blend mode: "
                       "neighbouring windows compared where they overlap); figures in the "
                       "report, heat map in seams.png")
    exports: tuple[Literal["geotiff", "cog", "ome-tiff", "qupath", "gpkg", "geoparquet",
                           "geojson"], ...] = Field((), description="files to write beside the "
                                                    "result (object formats need objects)")

    @model_validator(mode="after")
    def _exports_need_objects(self):
        vector = [e for e in self.exports if e in ("qupath", "gpkg", "geoparquet", "geojson")]
        if vector and not self.objects:
            raise ValueError(f"exports {', '.join(vector)} are object formats: set objects=True "
                             "(--objects) as well")
        return self

    @field_validator("channels", "channel_names", mode="before")
    @classmethod
    def _split(cls, v):
        return split_names(v)

    @field_validator("tile")
    @classmethod
    def _tile(cls, v):
        if isinstance(v, int) and not 16 <= v <= 16384:
            raise ValueError(f"tile {v} must be between 16 and 16384 pixels, or 'auto'")
        return v

    @field_validator("lanes")
    @classmethod
    def _lanes(cls, v):
        if isinstance(v, int) and not 1 <= v <= 64:
            raise ValueError(f"lanes {v} must be between 1 and 64, or 'auto'")
        return v

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
        if self.amp == "fp16" and self.device == "cpu":
            raise ValueError("--amp fp16 needs a CUDA device; on CPU use --amp bf16, none or "
                             "auto")
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
    compute_overhead: float = Field(1.0, description="window pixels computed per scene pixel")
    precision: dict[str, Any] = Field(default_factory=dict)
    timings: dict[str, float] = Field(
        default_factory=dict, description="seconds per phase: plan, prepare, infer (wall), "
        "pyramid, preview; summed over shards (they overlap, so the sums can exceed infer): "
        "read, compute, write; and imports: the libraries this process loaded on its first "
        "scene (zarr, the OME models, the scene reader, PNG), which are process start, not "
        "per-scene work, and so are outside seconds")
    versions: dict[str, str] = Field(default_factory=dict)
    uris: dict[str, str] = Field(default_factory=dict)
    warnings: list[str] = Field(default_factory=list)
    objects: dict[str, Any] | None = Field(None, description="with --objects: counts per "
                                           "class, connectivity, files written")
    seams: dict[str, Any] | None = Field(None, description="with --seams N: how much the "
                                         "result depends on where tiles were cut")


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
    n_levels: int = 1
    task_levels: int = 0  # levels 1..task_levels are written by the shard tasks themselves
    level_shards: tuple[int, ...] = ()
    thumb_stride: int = 0  # preview thumbnail sampled by the tasks every this many px
    batch: int = 4  # windows per forward pass (cfg.batch, or what --tile auto fits)
    class_map: str | None = None  # the named class map the model was trained with, if any
    channels: tuple[int, ...] | None = None  # source channels the model sees (0-based)
    skipped_nodata: bool = False  # skipped tiles hold no data: their mask reads NODATA_LABEL

    @property
    def preview_level(self) -> int:
        """The mask level the preview shows: the first whose longer side is <= 1024."""
        from segcore.io.zarrstore import level_shape

        for lv in range(self.n_levels):
            if max(level_shape(self.info.height, self.info.width, lv)) <= PREVIEW_SIDE:
                return lv
        return self.n_levels - 1

    @property
    def signature(self) -> str:
        key = {"src": self.cfg.src, "level": self.info.level, "shape": [self.info.height,
               self.info.width], "model": self.model_sha256, "tile": self.grid.tile,
               "halo": self.grid.halo, "prob_dtype": self.cfg.prob_dtype,
               "blend": self.cfg.blend, "level_shards": list(self.level_shards)}
        if self.channels is not None:
            key["channels"] = list(self.channels)
        if self.skipped_nodata:
            key["skipped_nodata"] = True
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
    from segcore.inference import choose_device, choose_precision
    from segcore.io.channels import channels_for_model
    from segcore.io.readers import open_scene

    # the precision the tasks will resolve, resolved here first: a bad SEGCORE_CPU_FEATURES
    # (or --amp for this device) is refused before prepare writes anything
    choose_precision(choose_device(cfg.device), cfg.amp)
    ckpt, tensors = read_checkpoint(read_bytes(cfg.model), cfg.model)
    scene = open_scene(cfg.src, level=cfg.level, mpp=cfg.mpp, channel_names=cfg.channel_names)
    try:
        scene, picked = channels_for_model(scene, cfg.channels, ckpt.contract, cfg.model)
        info = scene.info
        if info.channels != ckpt.spec.in_channels:
            raise InputError(
                f"{cfg.src}: has {info.channels} channel(s) but the model {cfg.model} expects "
                f"{ckpt.spec.in_channels}; pick a matching scene or model"
            )
        check_input_dtype(info.dtype, ckpt.contract, cfg.src, cfg.model)
        import torch

        from segcore.models.checkpoint import check_weights
        from segcore.models.registry import build_model

        with torch.device("meta"):  # shapes only: no weights allocated or initialised
            meta_model = build_model(ckpt.spec)
        check_weights(meta_model, tensors, cfg.model, ckpt.spec.arch)  # before any write
        del tensors
        multiple = int(getattr(meta_model, "input_multiple", 1))
        rf = cached_receptive_field(ckpt.spec)
        tile, batch, notes = cfg.tile, cfg.batch, []
        if tile == "auto":
            tile, batch, why = _auto_tile(cfg, ckpt.spec, multiple, rf, info)
            notes.append(why)
        halo, exact, warnings = choose_halo(tile, multiple, rf, cfg.halo)
        grid = plan_tiles(info.height, info.width, tile, halo, multiple)
        warnings = picked + notes + warnings
        if grid.core * 2 < grid.tile and len(grid.tiles) > 1:
            warnings.append(
                f"the core ({grid.core} px) is under half the {grid.tile}-px window (halo "
                f"{grid.halo}): the model computes {grid.overhead:.1f}x the scene's pixels; "
                f"use a larger --tile (or --tile auto)")
        skipped_nodata = False
        if cfg.skip_background and cfg.foreground != "all":
            from segcore.foreground import foreground_mask, resolve_kind, tile_has_foreground

            skipped_nodata = resolve_kind(info, cfg.foreground) == "nonzero" and (
                info.nodata is not None or info.dtype.startswith("float"))
            fg, factor = foreground_mask(scene, kind=cfg.foreground)
            run = tuple(tile_has_foreground(fg, factor, t.y0, t.y1, t.x0, t.x1)
                        for t in grid.tiles)
        else:
            run = (True,) * len(grid.tiles)
    finally:
        scene.close()
    from segcore.io.zarrstore import n_levels_for

    n_levels = n_levels_for(info.height, info.width) if cfg.pyramid else 1
    tl = task_levels(grid.core, n_levels)
    shards = tuple(grid.core >> min(lv, tl) for lv in range(n_levels))
    p = ScenePlan(cfg, info, grid, rf, exact, tuple(ckpt.contract.class_names),
                  ckpt.spec.out_channels, ckpt.sha256, info.pixel_size, info.pixel_unit,
                  run, warnings, n_levels, tl, shards, batch=batch,
                  class_map=cm if isinstance(cm := ckpt.extra.get("class_map"), str) else None,
                  channels=scene.options.get("channels"), skipped_nodata=skipped_nodata)
    from segcore.io.zarrstore import level_shape

    lv = p.preview_level  # tasks sample the preview only if it is small (never without a pyramid)
    if max(level_shape(info.height, info.width, lv)) <= PREVIEW_SIDE:
        p.thumb_stride = 2 ** lv
    return p


def _auto_tile(cfg: SegmentConfig, spec, multiple: int, rf: ReceptiveField, info):
    from segcore.inference import choose_device, choose_precision
    from segcore.memory import auto_tile

    dev = choose_device(cfg.device)
    amp = choose_precision(dev, cfg.amp).amp
    halo = round_up(rf.radius, multiple) if cfg.halo == "auto" and not rf.is_global else \
        (0 if cfg.halo == "auto" else cfg.halo)
    return auto_tile(spec, dev.type, amp, cfg.batch, multiple, halo, info.height, info.width)


def is_complete(out: str) -> bool:
    """True only if the COMPLETE marker exists (written after everything else)."""
    return exists(join(out, "COMPLETE"))


def load_report(out: str) -> Report:
    if not is_complete(out):
        raise IncompleteResultError(f"{out}: no COMPLETE marker: the run did not finish")
    return Report.model_validate_json(read_bytes(join(out, "report.json")))


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    from segcore import __version__

    def _v(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:  # e.g. dask absent where segment runs with --workers 0
            return "absent"

    # versions from the installed metadata: importing dask just to read its version cost 0.3 s
    return {"segcore": __version__, **{name: _v(name) for name in
                                       ("torch", "zarr", "dask", "numpy")}}


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


def _task_specs(p: ScenePlan, lanes: int = 1):
    """The shard tasks, ``shards_per_task`` tiles each, fewer where that would leave some of
    ``lanes`` without a task (which tiles go together changes nothing in the result)."""
    from segcore.shards import TaskSpec

    cfg = p.cfg
    tiles = p.grid.tiles
    n = max(1, min(cfg.shards_per_task, -(-len(tiles) // lanes)))
    out = join(cfg.out, RESULT)
    by_rc = {(t.row, t.col): t for t in tiles}
    for i in range(0, len(tiles), n):
        group = tiles[i:i + n]
        neighbours = tuple(
            tuple(by_rc[(t.row + dy, t.col + dx)] for dy in (-1, 0, 1) for dx in (-1, 0, 1)
                  if (dy or dx) and (t.row + dy, t.col + dx) in by_rc)
            for t in group) if cfg.blend else ()
        yield TaskSpec(cfg.src, p.info.level, out, cfg.out, cfg.model, cfg.device, cfg.amp,
                       p.batch, cfg.prob_dtype, group, p.run[i:i + n],
                       tuple(range(i, i + len(group))), cfg.blend, p.grid.halo, neighbours,
                       p.task_levels, p.thumb_stride, cfg.compile, p.channels,
                       cfg.channel_names)


def run_shards(p: ScenePlan, client=None, resources: dict | None = None,
               progress: bool = True) -> list[dict]:
    from segcore.shards import run_task

    lanes = local_lanes(p.cfg.lanes, len(p.grid.tiles)) if client is None else 1
    specs = list(_task_specs(p, lanes))
    return run_tasks(run_task, specs, client, resources, progress, "segment",
                     lambda s: len(s.tiles), lanes=lanes)


def _downsample_task(args) -> list:
    from segcore.io.zarrstore import downsample_block, open_group

    out, level, row, col, shard = args
    root = open_group(out, mode="r+")
    downsample_block(root[str(level - 1)], root[str(level)], row, col, shard, "mean")
    m = root["labels/mask"]
    downsample_block(m[str(level - 1)], m[str(level)], row, col, shard, "nearest")
    return []


def build_pyramid(p: ScenePlan, client=None, progress: bool = False) -> int:
    """Fill the levels the shard tasks did not write (task_levels+1 ..), one task per
    destination shard, each from the level above."""
    import math

    from segcore.io.zarrstore import level_shape

    out = join(p.cfg.out, RESULT)
    for lv in range(p.task_levels + 1, p.n_levels):
        shard = p.level_shards[lv]
        h, w = level_shape(p.info.height, p.info.width, lv)
        specs = [(out, lv, r, c, shard) for r in range(math.ceil(h / shard))
                 for c in range(math.ceil(w / shard))]
        run_tasks(_downsample_task, specs, client, None, progress, f"pyramid {lv}", lambda s: 1)
    return p.n_levels


def _planned_precision(cfg: SegmentConfig) -> dict:
    """The precision the tasks would have run at, for a report where no task ran the model
    (every shard resumed or background): resolved as the tasks resolve it."""
    from segcore.inference import choose_device, choose_precision

    dev = choose_device(cfg.device)
    prec = choose_precision(dev, cfg.amp)
    return {"amp": prec.amp, "channels_last": prec.channels_last, "compile": cfg.compile,
            "device": str(dev), "reason": f"{prec.reason} (no shard ran the model in this run)"}


def _sum(results: list[dict], key: str) -> float:
    return round(sum(r.get(key, 0.0) for r in results), 3)


def finalize(p: ScenePlan, results: list[dict], seconds: float, client=None,
             timings: dict[str, float] | None = None) -> Report:
    from segcore.preview import write_preview

    cfg = p.cfg
    timings = dict(timings or {})
    t0 = time.perf_counter()
    levels = build_pyramid(p, client) if cfg.pyramid else 1
    t1 = time.perf_counter()
    write_preview(p, join(cfg.out, "preview.png"), results)
    seams = None
    if cfg.seams:
        from segcore.seams import seam_report

        t_s = time.perf_counter()
        seams = seam_report(p, cfg.out, cfg.seams, client)
        timings["seams"] = round(time.perf_counter() - t_s, 3)
    objects = None
    if cfg.objects:
        from segcore.objects import extract_objects

        objects = extract_objects(cfg.out, cfg.connectivity, client, require_complete=False,
                                  grow=cfg.grow, grow_threshold=cfg.grow_threshold,
                                  lanes=cfg.lanes)
        timings["objects"] = objects["seconds"]
    exports = {}
    for fmt in cfg.exports:
        from segcore.export import export

        exports[fmt] = export(cfg.out, fmt, require_complete=False)
    t2 = time.perf_counter()
    timings.update(pyramid=round(t1 - t0, 3), preview=round(t2 - t1, 3),
                   read=_sum(results, "read_s"), compute=_sum(results, "compute_s"),
                   write=_sum(results, "write_s"))
    seconds += t2 - t0
    status = [r["status"] for r in results]
    precision = next((r["precision"] for r in results if "precision" in r), None) or \
        _planned_precision(cfg)
    px = p.info.height * p.info.width
    report = Report(
        src=cfg.src, out=cfg.out, model=cfg.model, model_sha256=p.model_sha256,
        scene={"height": p.info.height, "width": p.info.width, "channels": p.info.channels,
               "dtype": p.info.dtype, "level": p.info.level, "pixel_size": p.pixel_size,
               "pixel_unit": p.pixel_unit, "geo": p.info.geo, "format": p.info.format,
               "channel_names": p.info.channel_names, "nodata": p.info.nodata},
        tile=p.grid.tile, halo=p.grid.halo, core=p.grid.core,
        receptive_field=None if p.field.is_global else p.field.radius, exact=p.exact,
        tiles_total=len(p.grid.tiles), tiles_run=status.count("run"),
        tiles_skipped_background=status.count("background"),
        tiles_resumed=status.count("resumed"), seconds=round(seconds, 3),
        mpx_per_s=round(px / 1e6 / seconds, 4) if seconds > 0 else 0.0,
        compute_overhead=round(p.grid.overhead, 4), precision=precision, timings=timings,
        versions=_versions(),
        uris={"result": join(cfg.out, RESULT), "mask": join(cfg.out, RESULT, "labels/mask"),
              "probabilities": join(cfg.out, RESULT), "report": join(cfg.out, "report.json"),
              "preview": join(cfg.out, "preview.png"), "levels": str(levels),
              **({"seams": seams["heatmap"]} if seams else {}),
              **{f"export:{k}": v for k, v in exports.items()}},
        warnings=p.warnings, objects=objects, seams=seams,
    )
    write_bytes_atomic(join(cfg.out, "report.json"), report.model_dump_json(indent=2).encode())
    write_bytes_atomic(join(cfg.out, "COMPLETE"), json.dumps(
        {"signature": p.signature, "report_sha256": hashlib.sha256(
            report.model_dump_json().encode()).hexdigest()}).encode())
    return report


def warm_imports() -> float:
    """Load the libraries a scene needs (zarr, ome-zarr-models' pydantic schemas, tifffile,
    Pillow's PNG writer) and return the seconds it took: ~1 s on one core the first time in a
    process, 0 after. A worker pays it once for a whole queue of scenes, so the report keeps
    it apart from the scene's own seconds (the CLI's wall clock includes it)."""
    t0 = time.perf_counter()
    import ome_zarr_models.v05.image  # noqa: F401  (pydantic schemas: ~0.5 s on one core)
    import ome_zarr_models.v05.image_label  # noqa: F401
    import ome_zarr_models.v05.labels  # noqa: F401
    import tifffile  # noqa: F401
    from PIL import Image

    import segcore.io.readers  # noqa: F401
    import segcore.io.zarrstore  # noqa: F401  (zarr, ome_zarr_models)
    import segcore.preview  # noqa: F401
    import segcore.shards  # noqa: F401

    Image.preinit()  # the image plugins Image.save would import on first use
    return round(time.perf_counter() - t0, 3)


def segment(cfg: SegmentConfig, client=None, resources: dict | None = None,
            progress: bool = True) -> Report:
    """Segment one scene end to end (resuming a half-done run with the same plan). The
    report's seconds run from here to the COMPLETE marker (less the first-use imports,
    reported as timings.imports); its timings split them."""
    imports = warm_imports()
    t0 = time.perf_counter()
    p = plan(cfg)
    t1 = time.perf_counter()
    state = prepare(p)
    if state == "complete":
        return load_report(cfg.out)
    t2 = time.perf_counter()
    results = run_shards(p, client, resources, progress)
    t3 = time.perf_counter()
    return finalize(p, results, t3 - t0, client, {"imports": imports, "plan": round(t1 - t0, 3),
                    "prepare": round(t2 - t1, 3), "infer": round(t3 - t2, 3)})
