"""The worker side of segmentation: one task runs a few tiles, each tile owning one shard.

A task opens the scene itself from its URI (nothing unpicklable travels), loads the model
once per process, reads windows with mirroring (the next batch's reads prefetched while the
current batch computes), crops predictions to cores, writes each core as one whole shard of the
level-0 arrays, then writes that shard's completion record (a digest of the bytes written).
Resume trusts a record only if the shard's data still hashes to it.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np

from segcore.inference import check_channels, get_predictor, labels_from_probs, normalize
from segcore.io.uri import get_fs, join, write_bytes_atomic
from segcore.io.zarrstore import open_group, write_block
from segcore.tiling import Tile, mirror_pad_region

FAULT_ENV = "SEGCORE_FAULT_SHARD"  # test-only fault injection: tile index that raises

_SCENES: dict[tuple, object] = {}


@dataclass(frozen=True)
class TaskSpec:
    """Everything a shard task needs, all small and picklable."""

    src: str
    level: int
    out: str  # the result.zarr URI
    records: str  # the run's prefix: completion records go to <records>/shards/
    model: str
    device: str
    amp: str
    batch: int
    prob_dtype: str
    tiles: tuple[Tile, ...]
    run: tuple[bool, ...]  # False: background tile, written as nothing (fill value 0)
    indices: tuple[int, ...]  # global tile index (for fault injection and ordering)
    blend: bool = False
    halo: int = 0
    neighbours: tuple[tuple[Tile, ...], ...] = ()  # blend mode: the windows around each tile


@dataclass(frozen=True)
class ShardResult:
    key: str
    status: str  # 'run' | 'background' | 'resumed'
    seconds: float
    pixels: int


def record_uri(out: str, key: str) -> str:
    return join(out, "shards", f"{key}.json")


def _digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _core_data(root, tile: Tile) -> tuple[np.ndarray, np.ndarray]:
    mask = root["labels/mask/0"][tile.y0:tile.y1, tile.x0:tile.x1]
    prob = root["0"][:, tile.y0:tile.y1, tile.x0:tile.x1]
    return mask, prob


def verified_complete(out: str, root, tile: Tile) -> bool:
    """True if the shard's record exists and its data still hashes to it."""
    fs, path = get_fs(record_uri(out, tile.key))
    try:
        rec = json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return False
    except (OSError, ValueError):
        return False
    return rec.get("sha256") == _digest(*_core_data(root, tile))


def _write_record(out: str, tile: Tile, status: str, sha: str) -> None:
    body = json.dumps({"key": tile.key, "status": status, "sha256": sha,
                       "core": [tile.y0, tile.y1, tile.x0, tile.x1]}).encode()
    write_bytes_atomic(record_uri(out, tile.key), body)


def _scene(src: str, level: int):
    from segcore.io.readers import open_scene

    key = (src, level, os.getpid())
    if key not in _SCENES:
        _SCENES[key] = open_scene(src, level=level)
    return _SCENES[key]


def run_task(spec: TaskSpec) -> list[dict]:
    """Run one task's tiles; returns a list of ShardResult dicts."""
    scene = _scene(spec.src, spec.level)
    info = scene.info
    pred = get_predictor(spec.model, spec.device, spec.amp)
    check_channels(pred, info.channels, spec.src)
    root = open_group(spec.out, mode="r+")
    prob_arr, mask_arr = root["0"], root["labels/mask/0"]
    fault = os.environ.get(FAULT_ENV)
    results: list[dict] = []

    todo: list[tuple[int, Tile]] = []
    for idx, tile, run in zip(spec.indices, spec.tiles, spec.run, strict=True):
        t0 = time.perf_counter()
        if verified_complete(spec.records, root, tile):
            results.append(asdict(ShardResult(tile.key, "resumed", 0.0, 0)))
        elif not run:
            mask, prob = _core_data(root, tile)  # fill values: nothing to write
            _write_record(spec.records, tile, "background", _digest(mask, prob))
            results.append(asdict(ShardResult(tile.key, "background",
                                              time.perf_counter() - t0, 0)))
        else:
            todo.append((idx, tile))

    def read(tile: Tile) -> np.ndarray:
        raw = mirror_pad_region(scene.read, info.height, info.width,
                                tile.wy0, tile.wy1, tile.wx0, tile.wx1)
        return normalize(raw, pred.contract)

    cores = _blended_cores(spec, todo, pred, read) if spec.blend else \
        _cropped_cores(spec, todo, pred, read)
    for idx, tile, core, seconds in cores:
        if fault is not None and int(fault) == idx:
            raise RuntimeError(f"injected fault at shard {idx} ({tile.key}) [{FAULT_ENV}]")
        mask = labels_from_probs(core)
        if spec.prob_dtype == "uint8":
            prob = np.rint(core * 255).astype(np.uint8)
        else:
            prob = core.astype(np.float16)
        write_block(prob_arr, tile.y0, tile.x0, prob)
        write_block(mask_arr, tile.y0, tile.x0, mask)
        _write_record(spec.records, tile, "run", _digest(mask, prob))
        results.append(asdict(ShardResult(tile.key, "run", seconds,
                                          tile.core_shape[0] * tile.core_shape[1])))
    return results


def _cropped_cores(spec: TaskSpec, todo, pred, read):
    """Exact mode: one window per tile, cropped to its core. Windows are batched by shape and
    the next batch is read while the current one computes."""
    batches: list[list[tuple[int, Tile]]] = []
    for idx, tile in sorted(todo, key=lambda it: it[1].window_shape):
        if batches and len(batches[-1]) < spec.batch and \
                batches[-1][0][1].window_shape == tile.window_shape:
            batches[-1].append((idx, tile))
        else:
            batches.append([(idx, tile)])
    if not batches:
        return
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(lambda b: [read(t) for _, t in b], batches[0])
        for bi, group in enumerate(batches):
            t0 = time.perf_counter()
            windows = pending.result()
            if bi + 1 < len(batches):
                pending = pool.submit(lambda b: [read(t) for _, t in b], batches[bi + 1])
            probs = pred(np.stack(windows))
            seconds = (time.perf_counter() - t0) / len(group)
            for (idx, tile), p in zip(group, probs, strict=True):
                ys, xs = tile.crop
                yield idx, tile, p[:, ys, xs], seconds


def _blended_cores(spec: TaskSpec, todo, pred, read):
    """Blend mode: each core is the weighted mean of every window that covers it (its own and
    its neighbours'), weights 1 on a window's core falling off across its halo. Still one
    writer per shard: a task computes the neighbours' windows itself (up to 9 windows per
    tile; windows shared by tiles of the same task are computed once)."""
    from segcore.stitching import blend_weights

    cache: dict[str, np.ndarray] = {}
    neighbours = dict(zip(spec.tiles, spec.neighbours, strict=True))
    for idx, tile in todo:
        t0 = time.perf_counter()
        windows = [tile, *neighbours[tile]]
        missing = [w for w in windows if w.key not in cache]
        for w in missing:
            cache[w.key] = pred(read(w)[None])[0]
        acc = None
        wsum = np.zeros(tile.core_shape, np.float32)
        for w in windows:
            # overlap of window w with this tile's core, in image coordinates
            y0, y1 = max(tile.y0, w.wy0), min(tile.y1, w.wy1)
            x0, x1 = max(tile.x0, w.wx0), min(tile.x1, w.wx1)
            if y0 >= y1 or x0 >= x1:
                continue
            wt = blend_weights(w.window_shape, spec.halo)[y0 - w.wy0:y1 - w.wy0,
                                                          x0 - w.wx0:x1 - w.wx0]
            part = cache[w.key][:, y0 - w.wy0:y1 - w.wy0, x0 - w.wx0:x1 - w.wx0] * wt
            if acc is None:
                acc = np.zeros((part.shape[0], *tile.core_shape), np.float32)
            acc[:, y0 - tile.y0:y1 - tile.y0, x0 - tile.x0:x1 - tile.x0] += part
            wsum[y0 - tile.y0:y1 - tile.y0, x0 - tile.x0:x1 - tile.x0] += wt
        yield idx, tile, acc / wsum, time.perf_counter() - t0
