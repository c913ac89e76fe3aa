"""The one place that composes IO, tiling, inference and writing: ``segment``.

The stages live in their own modules: :mod:`segcore.plan` (what to do, from metadata),
:mod:`segcore.prepare` (the output arrays, resume), :mod:`segcore.shards` (the shard tasks),
:mod:`segcore.finalize` (pyramid, preview, objects, exports, report, COMPLETE); this module
holds the configuration, the shard task specs and ``segment`` itself, and re-exports the
stages' public names.

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

import time
from typing import Literal

from pydantic import Field, field_validator, model_validator

from segcore.config import Frozen, split_names
from segcore.execute import MAX_LANES, local_lanes, run_tasks  # noqa: F401 - re-exported
from segcore.finalize import (  # noqa: F401 - re-exported: segcore.pipeline is the face
    Report,
    build_pyramid,
    finalize,
    load_report,
)
from segcore.io.uri import join
from segcore.plan import (  # noqa: F401 - re-exported
    MIN_LEVEL_SHARD,
    PREVIEW_SIDE,
    RESULT,
    ScenePlan,
    plan,
    task_levels,
)
from segcore.prepare import is_complete, prepare  # noqa: F401 - re-exported
from segcore.tiling import choose_halo  # noqa: F401 - re-exported


class SegmentConfig(Frozen):
    src: str = Field(description="scene URI (TIFF/SVS/GeoTIFF/PNG/Zarr; local or s3://...)")
    out: str = Field(description="output prefix (local or s3://...)")
    model: str = Field(description="checkpoint URI, or a shipped model's name (resolved where it "
                       "is read: segcore.models.pretrained)")
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
