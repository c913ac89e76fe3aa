"""The worker side of segmentation: one task runs a few tiles, each tile owning one shard.

A task opens the scene itself from its URI (nothing unpicklable travels), loads the model
once per process and runs three stages that overlap: reader threads read and decode the
next batch of windows (raw pixels, mirrored at the scene's edges) while the model runs on the
current one (normalisation happens on the device), and writer threads take each finished
core, quantise it, write it as one whole shard of the level-0 arrays and of every pyramid
level the core can fill by itself, then write that shard's completion record (a digest of
the level-0 bytes). Resume trusts a record only if the shard's data still hashes to it.
Each shard's result carries the seconds its stages took (read, compute, write).

Worker loss (docs/RELIABILITY.md): when a worker dies, Dask reruns its task elsewhere, and one
writer per shard still holds. A killed process issues no further writes; each shard write is
a whole object (one PUT on S3: it lands whole or not at all; a whole chunk file locally); the
record is written after the data and is the digest of it. The rerun skips the shards whose
records verify and rewrites the others whole, with the same bytes (same inputs, same code).
Even a write in flight at the moment of death that landed after the rerun's would either be
those same bytes or (workers of another precision) fail its record's digest, so the next
resume recomputes that shard instead of trusting it.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np

from segcore.execute import available_cores
from segcore.inference import (
    NODATA_LABEL,
    check_channels,
    get_predictor,
    invalid_pixels,
    labels_from_probs,
)
from segcore.io.uri import get_fs, join, write_bytes_atomic
from segcore.io.zarrstore import downsample2, open_group, write_blocks
from segcore.tiling import Tile, mirror_pad_region

FAULT_ENV = "SEGCORE_FAULT_SHARD"  # test-only fault injection: tile index that raises
# test-only worker loss, "N:DIR": every shard-data write is journalled to DIR/writes.log (pid,
# shard, start, end); the first process to have written N shards' data creates DIR/killed and
# kills itself with SIGKILL before writing that shard's record
KILL_ENV = "SEGCORE_FAULT_KILL"
_KILL_LOCK = threading.Lock()
_KILL_COUNT = [0]


def _kill_hook(key: str, t0: float) -> None:
    spec = os.environ.get(KILL_ENV)
    if not spec:
        return
    n, _, folder = spec.partition(":")
    with _KILL_LOCK:
        _KILL_COUNT[0] += 1
        with open(os.path.join(folder, "writes.log"), "a") as f:
            f.write(f"{os.getpid()} {key} {t0:.6f} {time.time():.6f}\n")
        if _KILL_COUNT[0] < int(n):
            return
        try:
            fd = os.open(os.path.join(folder, "killed"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return  # another process already died: one loss per run
        os.write(fd, f"{os.getpid()} {key}\n".encode())
        os.close(fd)
        os.kill(os.getpid(), signal.SIGKILL)

_SCENES: dict[tuple, object] = {}


def io_threads() -> int:
    """Reader and writer threads per task: decoding and compressing release the GIL, so on a
    host with spare cores (a GPU server) several of each keep the device fed; on a small CPU
    box one each. ``SEGCORE_IO_THREADS`` overrides."""
    env = os.environ.get("SEGCORE_IO_THREADS")
    if env:
        return max(1, int(env))
    return max(1, min(4, available_cores() // 4))


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
    task_levels: int = 0  # pyramid levels 1..task_levels are written here, shard by shard
    thumb_stride: int = 0  # >0: return the input sampled every thumb_stride px (preview)
    compile: bool = False
    channels: tuple[int, ...] | None = None  # 0-based source channels, resolved by the plan
    channel_names: tuple[str, ...] | None = None  # names given for the source's channels


@dataclass(frozen=True)
class ShardResult:
    key: str
    status: str  # 'run' | 'background' | 'resumed'
    seconds: float
    pixels: int
    read_s: float = 0.0  # reading + decoding + mirroring this shard's window
    compute_s: float = 0.0  # its share of the batch's model time (incl. normalisation)
    write_s: float = 0.0  # quantise, label, digest, compress + write (all levels), record


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


def _scene(src: str, level: int, channels: tuple[int, ...] | None = None,
           channel_names: tuple[str, ...] | None = None):
    """The scene at ``level`` with the plan's channel selection, opened once per process."""
    from segcore.io.readers import open_scene

    key = (src, level, channels, channel_names, os.getpid())
    if key not in _SCENES:
        _SCENES[key] = open_scene(src, level=level, channels=channels,
                                  channel_names=channel_names)
    return _SCENES[key]


def run_task(spec: TaskSpec, predictor=None) -> list[dict]:
    """Run one task's tiles; returns a list of ShardResult dicts (plus, with
    ``thumb_stride``, a sampled thumbnail of each core's input under ``"thumb"``).
    ``predictor``: anything with the Predictor's ``predict_quantized``/``predict_raw`` (e.g. a
    :class:`segcore.inference.FunctionPredictor`) instead of the spec's checkpoint."""
    from segcore.memory import tune_heap

    tune_heap()
    scene = _scene(spec.src, spec.level, spec.channels, spec.channel_names)
    info = scene.info
    pred = predictor or get_predictor(spec.model, spec.device, spec.amp, compile=spec.compile)
    check_channels(pred, info.channels, spec.src)
    root = open_group(spec.out, mode="r+")
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
        return mirror_pad_region(scene.read, info.height, info.width,
                                 tile.wy0, tile.wy1, tile.wx0, tile.wx1)

    writer = _ShardWriter(spec, root)
    cores = _blended_cores(spec, todo, pred, read, info.nodata) if spec.blend else \
        _cropped_cores(spec, todo, pred, read, info.nodata)
    try:
        for idx, tile, core, raw, times in cores:
            if fault is not None and int(fault) == idx:
                raise RuntimeError(f"injected fault at shard {idx} ({tile.key}) [{FAULT_ENV}]")
            writer.submit(tile, core, raw, times)
        results.extend(writer.finish())
    finally:
        writer.close()
    from segcore.memory import trim_heap

    trim_heap()
    for r in results:
        if r["status"] == "run":
            r["precision"] = pred.precision
            break
    return results


class _ShardWriter:
    """Background threads that turn finished cores into shards (quantise, label, digest, write
    every level the task owns, record), each core by one thread (one writer per shard), at most
    two cores per thread behind the model so memory stays bounded. Errors surface on the next
    submit or at finish."""

    def __init__(self, spec: TaskSpec, root) -> None:
        self.spec = spec
        self.prob = [root[str(lv)] for lv in range(spec.task_levels + 1)]
        self.mask = [root[f"labels/mask/{lv}"] for lv in range(spec.task_levels + 1)]
        self.threads = io_threads()
        self.pool = ThreadPoolExecutor(max_workers=self.threads,
                                       thread_name_prefix="segcore-write")
        self.pending: list = []
        self.done: list[dict] = []

    def submit(self, tile: Tile, core: np.ndarray, raw: np.ndarray | None,
               times: tuple[float, float]) -> None:
        while len(self.pending) >= 2 * self.threads:
            self.done.append(self.pending.pop(0).result())
        self.pending.append(self.pool.submit(self._write, tile, core, raw, times))

    def finish(self) -> list[dict]:
        while self.pending:
            self.done.append(self.pending.pop(0).result())
        return self.done

    def close(self) -> None:
        # on an error upstream, cores already handed over are still written (and recorded):
        # a resume then skips them
        self.pool.shutdown(wait=True)

    def _write(self, tile: Tile, core, raw: np.ndarray | None,
               times: tuple[float, float]) -> dict:
        """``core``: float probabilities (K, h, w), or (stored probabilities, labels) as the
        predictor already quantised them on the device."""
        t0 = time.perf_counter()
        spec = self.spec
        if isinstance(core, tuple):
            prob, mask = core
        else:  # blend mode: float probabilities, NaN on nodata pixels
            bad = np.isnan(core[0])
            core = np.nan_to_num(core, nan=0.0) if bad.any() else core
            mask = labels_from_probs(core)
            mask[bad] = NODATA_LABEL
            if spec.prob_dtype == "uint8":
                prob = np.rint(core * 255).astype(np.uint8)
            else:
                prob = core.astype(np.float16)
        blocks = [(self.prob[0], tile.y0, tile.x0, prob), (self.mask[0], tile.y0, tile.x0, mask)]
        p, m = prob, mask
        for lv in range(1, spec.task_levels + 1):
            p = downsample2(p, "mean", p.dtype)
            m = downsample2(m, "nearest", m.dtype)
            blocks += [(self.prob[lv], tile.y0 >> lv, tile.x0 >> lv, p),
                       (self.mask[lv], tile.y0 >> lv, tile.x0 >> lv, m)]
        t_data = time.time()
        write_blocks(blocks)
        _kill_hook(tile.key, t_data)  # test-only (KILL_ENV); a no-op otherwise
        _write_record(spec.records, tile, "run", _digest(mask, prob))
        out = asdict(ShardResult(tile.key, "run", sum(times), tile.core_shape[0] *
                                 tile.core_shape[1], times[0], times[1],
                                 time.perf_counter() - t0))
        if spec.thumb_stride and raw is not None:
            out["thumb"] = _thumb(tile, raw, spec.thumb_stride)
            lv = spec.thumb_stride.bit_length() - 1
            if lv <= spec.task_levels:  # the preview level's mask block, written above anyway
                ml = mask if lv == 0 else blocks[2 * lv + 1][3]
                out["thumb_mask"] = (tile.y0 >> lv, tile.x0 >> lv, np.ascontiguousarray(ml))
        return out


def _thumb(tile: Tile, window: np.ndarray, stride: int) -> tuple[int, int, np.ndarray]:
    """The core's input at every ``stride``-th image pixel: (row, col) of its first sample in
    the thumbnail grid, and the samples (at most 3 channels)."""
    fy, fx = -(-tile.y0 // stride) * stride, -(-tile.x0 // stride) * stride
    sub = window[fy - tile.wy0:tile.y1 - tile.wy0:stride, fx - tile.wx0:tile.x1 - tile.wx0:stride,
                 :3]
    return fy // stride, fx // stride, np.ascontiguousarray(sub)


def _nodata(nodata: float | None) -> dict:
    """The predictor's ``nodata`` argument, only when the scene has a nodata value (NaN is
    masked regardless), so any object with the two predict methods can stand in."""
    return {} if nodata is None else {"nodata": nodata}


def _cropped_cores(spec: TaskSpec, todo, pred, read, nodata: float | None = None):
    """Exact mode: one window per tile, cropped to its core. Windows are batched by shape and
    the next batch is read (on a thread) while the current one computes. Yields (index, tile,
    core probabilities, raw window, (read s, compute s))."""
    batches: list[list[tuple[int, Tile]]] = []
    for idx, tile in sorted(todo, key=lambda it: it[1].window_shape):
        if batches and len(batches[-1]) < _batch_for(spec.batch, pred, tile) and \
                batches[-1][0][1].window_shape == tile.window_shape:
            batches[-1].append((idx, tile))
        else:
            batches.append([(idx, tile)])
    if not batches:
        return

    def read_one(tile):
        t0 = time.perf_counter()
        return read(tile), time.perf_counter() - t0

    # windows are read by io_threads() threads, up to two batches ahead of the model
    ahead = 2
    with ThreadPoolExecutor(max_workers=io_threads(), thread_name_prefix="segcore-read") as pool:
        queued = [[pool.submit(read_one, t) for _, t in b] for b in batches[:ahead]]
        for bi, group in enumerate(batches):
            got = [f.result() for f in queued.pop(0)]
            if bi + ahead < len(batches):
                queued.append([pool.submit(read_one, t) for _, t in batches[bi + ahead]])
            windows, read_s = [w for w, _ in got], sum(s for _, s in got)
            t0 = time.perf_counter()
            batch = np.stack(windows) if len(windows) > 1 else windows[0][None]
            probs, labels = pred.predict_quantized(batch, spec.prob_dtype, **_nodata(nodata))
            compute_s = (time.perf_counter() - t0) / len(group)
            for (idx, tile), p, lab, w in zip(group, probs, labels, windows, strict=True):
                ys, xs = tile.crop
                yield idx, tile, (p[:, ys, xs], lab[ys, xs]), w, (read_s / len(group), compute_s)


def _batch_for(batch: int, pred, tile: Tile) -> int:
    """Windows read together for one predict call: ``batch`` on a GPU; on the CPU no more
    than one forward takes (CPU_FORWARD_PIXELS; the predictor would split a larger batch
    anyway), so the first forward of a task starts after one window is read, not four (on
    two cores a task's start left the simulated 20 Mpx/s device idle 0.5 s). The windows
    each forward sees are the same either way."""
    from segcore.inference import CPU_FORWARD_PIXELS

    if getattr(pred, "device", None) is None or pred.device.type != "cpu":
        return batch
    h, w = tile.window_shape
    return max(1, min(batch, CPU_FORWARD_PIXELS // max(1, h * w)))


def _blended_cores(spec: TaskSpec, todo, pred, read, nodata: float | None = None):
    """Blend mode: each core is the weighted mean of every window that covers it (its own and
    its neighbours'), weights 1 on a window's core falling off across its halo. Still one
    writer per shard: a task computes the neighbours' windows itself (up to 9 windows per
    tile; windows shared by tiles of the same task are computed once)."""
    from segcore.stitching import blend_weights

    cache: dict[str, np.ndarray] = {}
    invalid: dict[str, np.ndarray | None] = {}  # each window's nodata pixels
    neighbours = dict(zip(spec.tiles, spec.neighbours, strict=True))
    for idx, tile in todo:
        t0 = time.perf_counter()
        windows = [tile, *neighbours[tile]]
        missing = [w for w in windows if w.key not in cache]
        raw_own = None
        for w in missing:
            raw = read(w)
            if w.key == tile.key:
                raw_own = raw
            cache[w.key] = pred.predict_raw(raw[None], **_nodata(nodata))[0]
            invalid[w.key] = invalid_pixels(raw, nodata)
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
        core = acc / wsum
        bad = invalid[tile.key]
        if bad is not None and bad.any():
            ys, xs = tile.crop
            core[:, bad[ys, xs]] = np.nan  # the writer marks these nodata
        yield idx, tile, core, raw_own, (0.0, time.perf_counter() - t0)
