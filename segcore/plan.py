"""Planning a scene: what segment will do, decided from metadata alone.

``plan(cfg)`` reads the scene's metadata and the checkpoint's contract (no full-resolution
pixels), lays out the tiles (tile, halo, core: :func:`segcore.tiling.choose_halo`), decides
which tiles hold foreground, the pyramid levels the shard tasks write themselves and the
preview's sampling. The result, a :class:`ScenePlan`, is what prepare, the shard tasks and
finalize are given.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from segcore.errors import InputError
from segcore.models.checkpoint import read_checkpoint, read_model_bytes
from segcore.models.fields import ReceptiveField, cached_receptive_field
from segcore.tiling import TileGrid, choose_halo, plan_tiles, round_up

if TYPE_CHECKING:
    from segcore.pipeline import SegmentConfig

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


def plan(cfg: SegmentConfig) -> ScenePlan:
    """Read the scene's metadata and the checkpoint's contract; lay out the tiles; decide
    which contain foreground. Cheap: reads no full-resolution pixels."""
    from segcore.inference import choose_device, choose_precision
    from segcore.io.channels import channels_for_model
    from segcore.io.readers import open_scene

    # the precision the tasks will resolve, resolved here first: a bad SEGCORE_CPU_FEATURES
    # (or --amp for this device) is refused before prepare writes anything
    choose_precision(choose_device(cfg.device), cfg.amp)
    ckpt, tensors = read_checkpoint(read_model_bytes(cfg.model), cfg.model)
    c = ckpt.contract
    scene = open_scene(cfg.src, level=cfg.level, mpp=cfg.mpp, channel_names=cfg.channel_names,
                       model_scale=(c.pixel_size, c.pixel_unit, cfg.model) if c.pixel_size
                       else None)
    try:
        scene, picked = channels_for_model(scene, cfg.channels, ckpt.contract, cfg.model)
        info = scene.info
        if info.channels != ckpt.spec.in_channels:
            raise InputError(
                f"{cfg.src}: has {info.channels} channel(s) but the model {cfg.model} expects "
                f"{ckpt.spec.in_channels}; pick a matching scene or model"
            )
        from segcore.config import check_input_dtype

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
        warnings = list(info.notes) + picked + notes + warnings
        if ckpt.extra.get("resize"):  # a whole-image model: segment does not resize scenes
            warnings.append(
                f"the model {cfg.model} was trained on whole images resized to "
                f"{ckpt.extra['resize']} px; segment runs it at the scene's own pixels, a "
                "different scale: for photos use 'segcore evaluate' / predict_image, which "
                "resize, or fine-tune at this scale (segcore train --init)")
        if (grid.core * 2 < grid.tile or grid.overhead >= 3) and len(grid.tiles) > 1:
            # the smallest tile whose core is 70% of it with the halo exact stitching needs
            need = halo if rf.is_global else max(halo, round_up(rf.radius, multiple))
            good = round_up(max(tile, -(-2 * need * 10 // 3)), multiple)
            warnings.append(
                f"the core ({grid.core} px) is {'under' if grid.core * 2 < grid.tile else 'only'} "
                f"half the {grid.tile}-px window (halo "
                f"{grid.halo}): the model computes {grid.overhead:.1f}x the scene's pixels in "
                f"{len(grid.tiles)} windows; use --tile {good} (about "
                f"{(good / max(1, good - 2 * need)) ** 2:.1f}x) or --tile auto")
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
    from segcore.config import label_names

    p = ScenePlan(cfg, info, grid, rf, exact,
                  label_names(ckpt.contract.class_names, ckpt.spec.out_channels),
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
