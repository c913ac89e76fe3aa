"""Benchmark inputs, cached in the work dir: checkpoints with random weights (seed 0) and square
RGB uint8 scenes written tile by tile (a 256 Mpx scene is never whole in memory).

Scene kinds: ``tiff`` (zlib-tiled BigTIFF), ``svs`` (JPEG-tiled RGB TIFF, as Aperio slides are
stored) and ``zarr`` (a Zarr v3 array, (y, x, c), chunked). Every kind holds the same pixels.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

# name -> (registry arch, kwargs)
MODELS: dict[str, tuple[str, dict]] = {
    "unet-tiny": ("unet", {"depth": 2, "width": 4}),
    "unet-w16": ("unet", {"depth": 4, "width": 16}),
    "unet-w64": ("unet", {"depth": 4, "width": 64}),
    "u2netp": ("u2netp", {}),
    "pointwise": ("pointwise", {}),
    # simulated accelerators: the zero-cost model holding one host-wide "device" for the time
    # a device of 20, 60 or 200 Mpx/s takes (segcore/models/registry.py, Pointwise)
    "sim-20": ("pointwise", {"simulate_mpx_per_s": 20.0}),
    "sim-60": ("pointwise", {"simulate_mpx_per_s": 60.0}),
    "sim-200": ("pointwise", {"simulate_mpx_per_s": 200.0}),
}
SCENE_KINDS = ("tiff", "svs", "zarr")
_SUFFIX = {"tiff": ".tif", "svs": ".svs.tif", "zarr": ".zarr"}
_TILE = {"tiff": 512, "svs": 256, "zarr": 512}


def texture(y0: int, x0: int, h: int, w: int) -> np.ndarray:
    """Smooth coloured stripes and rings (as bench/memory.py): foreground everywhere,
    cheap, compressible, and a pure function of absolute coordinates, so tiles join up."""
    yy = np.arange(y0, y0 + h, dtype=np.float32)[:, None]
    xx = np.arange(x0, x0 + w, dtype=np.float32)[None, :]
    out = np.empty((h, w, 3), np.uint8)
    out[..., 0] = 128 + 100 * np.sin(xx / 37.0 + np.cos(yy / 91.0))
    out[..., 1] = 128 + 100 * np.sin(yy / 53.0)
    out[..., 2] = 90 + 60 * np.sin((xx + yy) / 29.0)
    return out


def _file_tile(kind: str, side: int) -> int:
    """The storage tile: the kind's usual edge, smaller (a multiple of 16) for tiny scenes."""
    return max(16, min(_TILE[kind], -(-side // 16) * 16))


def scene_path(workdir: Path, kind: str, side: int) -> Path:
    return workdir / "scenes" / f"{kind}-{side}{_SUFFIX[kind]}"


def ensure_scene(workdir: Path, kind: str, side: int) -> Path:
    """The cached scene of ``kind`` and edge ``side``; written (atomically) when absent."""
    if kind not in SCENE_KINDS:
        raise SystemExit(f"scene kind {kind!r} must be one of {', '.join(SCENE_KINDS)}")
    if side < 16:
        raise SystemExit(f"--size {side} must be at least 16 px")
    path = scene_path(workdir, kind, side)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tile = _file_tile(kind, side)
    if kind == "zarr":
        _write_zarr(tmp, side, tile)
    else:
        _write_tiff(tmp, side, tile, kind)
    os.replace(tmp, path)
    return path


def _write_tiff(path: Path, side: int, tile: int, kind: str) -> None:
    import tifffile

    def tiles():
        for y in range(0, side, tile):
            for x in range(0, side, tile):
                yield texture(y, x, tile, tile)  # full tiles; tifffile crops the edges

    if kind == "svs":
        comp = {"compression": "jpeg", "compressionargs": {"level": 90}}
    else:
        comp = {"compression": "zlib", "compressionargs": {"level": 1}}
    tifffile.imwrite(path, data=tiles(), shape=(side, side, 3), dtype=np.uint8,
                     tile=(tile, tile), photometric="rgb", bigtiff=side * side * 3 > 2**31,
                     **comp)


def _write_zarr(path: Path, side: int, tile: int) -> None:
    import zarr

    if path.exists():
        shutil.rmtree(path)
    arr = zarr.create_array(str(path), shape=(side, side, 3), chunks=(tile, tile, 3),
                            dtype="uint8", dimension_names=("y", "x", "c"))
    for y in range(0, side, tile):
        for x in range(0, side, tile):
            h, w = min(tile, side - y), min(tile, side - x)
            arr[y:y + h, x:x + w] = texture(y, x, h, w)


def model_path(workdir: Path, name: str) -> Path:
    return workdir / "models" / f"{name}.safetensors"


def ensure_model(workdir: Path, name: str) -> Path:
    """The cached checkpoint of model ``name`` (random weights, torch.manual_seed(0); 3 inputs,
    1 output; normalisation (x/255 - 0.5) / 0.25)."""
    if name not in MODELS:
        raise SystemExit(f"--model {name!r} must be one of {', '.join(MODELS)}")
    path = model_path(workdir, name)
    if path.exists():
        return path
    import torch

    from segcore.config import InputContract, ModelSpec, Normalization
    from segcore.models import build_model
    from segcore.models.checkpoint import save_checkpoint

    arch, kwargs = MODELS[name]
    torch.manual_seed(0)
    model = build_model(ModelSpec(arch=arch, in_channels=3, out_channels=1,
                                  kwargs=kwargs)).eval()
    contract = InputContract(channels=3, normalization=Normalization(
        scale=255.0, mean=(0.5,) * 3, std=(0.25,) * 3))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model, str(path), contract)  # atomic
    return path
