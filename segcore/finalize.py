"""Finishing a scene: the pyramid levels the shard tasks did not write, the preview, the
optional seams, objects and exports, the report, and last the COMPLETE marker."""

from __future__ import annotations

import hashlib
import json
import time
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field

from segcore.errors import IncompleteResultError
from segcore.execute import run_tasks
from segcore.io.uri import join, read_bytes, write_bytes_atomic
from segcore.plan import RESULT, ScenePlan
from segcore.prepare import is_complete

if TYPE_CHECKING:
    from segcore.pipeline import SegmentConfig


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
        "pyramid, preview (what remains after the pyramid: the preview overlaps it when the tasks' "
        "thumbnails make it, plus seams, objects and exports); summed over shards (they overlap, so the sums can exceed infer): "
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
    from segcore.preview import from_tasks_alone, write_preview

    cfg = p.cfg
    timings = dict(timings or {})
    t0 = time.perf_counter()
    preview = join(cfg.out, "preview.png")
    if from_tasks_alone(p, results):  # PNG encoding and blending overlap the pyramid's tasks
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(1, thread_name_prefix="segcore-preview") as pool:
            made = pool.submit(write_preview, p, preview, results)
            levels = build_pyramid(p, client) if cfg.pyramid else 1
            t1 = time.perf_counter()
            made.result()
    else:
        levels = build_pyramid(p, client) if cfg.pyramid else 1
        t1 = time.perf_counter()
        write_preview(p, preview, results)
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
