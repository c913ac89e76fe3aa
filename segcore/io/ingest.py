"""Ingest: any scene -> a Zarr v3 OME-Zarr 0.5 image, chunked, sharded (zstd), multiscale.

Memory is bounded by one shard per task: each task reads its shard's region from the source
(which every task opens itself from its URI) and writes that whole shard; pyramid levels are
then built shard by shard from the level above. Pixel size and georeferencing travel in the
OME scale transforms and in the ``segcore`` attributes. The group's ``segcore.complete`` flag is
set last: a half-written ingest never looks complete.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pydantic import Field, field_validator, model_validator

from segcore.config import Frozen, split_names
from segcore.errors import ConfigError, IncompleteResultError
from segcore.execute import run_tasks
from segcore.io.zarrstore import (
    create_multiscale,
    downsample_block,
    level_shape,
    n_levels_for,
    open_group,
    write_block,
    write_omero,
)


class IngestConfig(Frozen):
    src: str
    dst: str = Field(description="output Zarr URI (local path or s3://...)")
    level: int | None = Field(None, ge=0)
    mpp: float | None = Field(None, gt=0)
    chunk: int = Field(512, ge=16, le=8192)
    shard: int = Field(2048, ge=16, le=32768)
    pyramid: bool = True
    channels: tuple[str, ...] | None = Field(None, description="channels to keep, in this "
                                             "order: names, or 1-based band indices ('4')")
    channel_names: tuple[str, ...] | None = Field(None, description="names for the source's "
                                                  "channels (one each), e.g. Sentinel-2 bands")

    @field_validator("channels", "channel_names", mode="before")
    @classmethod
    def _split(cls, v):
        return split_names(v)

    @model_validator(mode="after")
    def _check(self):
        if self.level is not None and self.mpp is not None:
            raise ValueError("give level or mpp, not both")
        if self.shard % self.chunk:
            raise ValueError(f"shard {self.shard} must be a multiple of chunk {self.chunk}")
        return self


@dataclass(frozen=True)
class _Block:
    src: str
    level: int
    dst: str
    y0: int
    y1: int
    x0: int
    x1: int
    channels: tuple[int, ...] | None = None  # 0-based, resolved once by ingest()
    channel_names: tuple[str, ...] | None = None


def _copy_block(b: _Block) -> list[dict]:
    from segcore.io.readers import open_scene

    with open_scene(b.src, level=b.level, channels=b.channels,
                    channel_names=b.channel_names) as scene:
        data = scene.read(b.y0, b.y1, b.x0, b.x1)
    root = open_group(b.dst, mode="r+")
    write_block(root["0"], b.y0, b.x0, data.transpose(2, 0, 1))
    return [{"pixels": (b.y1 - b.y0) * (b.x1 - b.x0)}]


def _down_block(args) -> list[dict]:
    dst, level, row, col, shard = args
    root = open_group(dst, mode="r+")
    downsample_block(root[str(level - 1)], root[str(level)], row, col, shard, "mean")
    return []


def _check_dst(cfg: IngestConfig) -> None:
    """Ingest replaces what is at ``dst`` (zarr's mode 'w' deletes it): only an earlier ingest
    of the same scene, or nothing. Another scene's ingest, any other Zarr and a folder with
    other files in it are refused before anything is deleted."""
    import json

    from segcore.io.uri import exists, get_fs, join, read_bytes, scene_key

    meta = join(cfg.dst, "zarr.json")
    if exists(meta):
        try:
            attrs = json.loads(read_bytes(meta)).get("attributes", {}).get("segcore", {})
        except ValueError:
            attrs = {}
        src = attrs.get("src") if isinstance(attrs, dict) else None
        if src is not None and scene_key(str(src)) == scene_key(cfg.src):
            return
        what = f"the ingest of another scene ({src})" if src else "a Zarr not written by " \
            "segcore ingest"
        raise ConfigError(f"{cfg.dst}: holds {what}; ingest {cfg.src} into another output "
                          f"prefix, or delete {cfg.dst} first")
    fs, path = get_fs(cfg.dst)
    try:
        listed = fs.ls(path) if fs.isdir(path) else []
    except FileNotFoundError:
        listed = []
    if listed or (fs.exists(path) and not fs.isdir(path)):
        raise ConfigError(f"{cfg.dst}: exists and is not a segcore Zarr (it would be deleted); "
                          "pick a new output prefix, or delete it first")


def ingest(cfg: IngestConfig, client=None, progress: bool = True) -> str:
    """Write the scene as an OME-Zarr image at ``cfg.dst``; returns ``cfg.dst``."""
    from segcore.io.readers import open_scene

    with open_scene(cfg.src, level=cfg.level, mpp=cfg.mpp, channels=cfg.channels,
                    channel_names=cfg.channel_names) as scene:
        info, sel = scene.info, scene.options.get("channels")
    if info.dtype not in ("uint8", "uint16", "float32"):
        raise ConfigError(f"{cfg.src}: pixel type {info.dtype} is not supported")
    n_levels = n_levels_for(info.height, info.width) if cfg.pyramid else 1
    _check_dst(cfg)
    root = open_group(cfg.dst, mode="w")
    # the source first: a run killed from here on left an ingest of this scene (re-run it)
    root.attrs["segcore"] = {"src": cfg.src, "complete": False}
    create_multiscale(root, info.height, info.width, info.channels, info.dtype, cfg.shard,
                      cfg.chunk, n_levels, info.pixel_size, info.pixel_unit, name="image")
    root.attrs["segcore"] = {"src": cfg.src, "level": info.level, "pixel_size": info.pixel_size,
                             "pixel_unit": info.pixel_unit, "geo": info.geo,
                             "nodata": info.nodata, "format": info.format, "complete": False,
                             **({"channel_names": list(info.channel_names)}
                                if info.channel_names else {})}
    if info.channel_names:
        write_omero(root, info.channel_names, info.dtype)
    blocks = [_Block(cfg.src, info.level, cfg.dst, y, min(y + cfg.shard, info.height), x,
                     min(x + cfg.shard, info.width), sel, cfg.channel_names)
              for y in range(0, info.height, cfg.shard) for x in range(0, info.width, cfg.shard)]
    run_tasks(_copy_block, blocks, client, None, progress, "ingest", lambda b: 1)
    for lv in range(1, n_levels):
        h, w = level_shape(info.height, info.width, lv)
        specs = [(cfg.dst, lv, r, c, cfg.shard) for r in range(math.ceil(h / cfg.shard))
                 for c in range(math.ceil(w / cfg.shard))]
        run_tasks(_down_block, specs, client, None, False, f"pyramid {lv}", lambda s: 1)
    attrs = dict(root.attrs["segcore"])
    attrs["complete"] = True
    root.attrs["segcore"] = attrs
    return cfg.dst


def check_ingested(uri: str) -> None:
    root = open_group(uri, mode="r")
    if not root.attrs.get("segcore", {}).get("complete"):
        raise IncompleteResultError(f"{uri}: ingest did not finish (segcore.complete is not set)")
