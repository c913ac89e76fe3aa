"""One contender's measurement in a fresh process (so its peak RSS is its own):

    python -m bench.worker bare   --model CKPT --scene S --amp none --device cpu --threads 2 \
        --max-side 4096 [--ref REF.npz] --json OUT.json
    python -m bench.worker monai  --model CKPT --scene S --amp none --device cpu --threads 2 \
        --tile 1024 --overlap 0.25 [--ref REF.npz] --json OUT.json
    python -m bench.worker floors --scene S --tile 1024 --json OUT.json

``bare``: the model on the whole image (or a central crop of at most --max-side, marked
"extrapolated"), mirror-padded by the receptive-field radius rounded up to the input multiple
exactly as ``segcore.stitching.predict_whole`` does; only the forward is timed, after one short
warm-up forward. Writes the reference (uint8 probabilities, rint(p * 255), and the mask from
p >= 0.5) over the region where it equals whole-image inference.
``monai``: ``monai.inferers.sliding_window_inference`` over the whole scene as one tensor
(gaussian, sw_batch_size 4, roi = --tile), same precision handling; deviation from --ref.
``floors``: the I/O floors on one file: full decode, float32 normalisation, writing two uint8
planes into a sharded zstd Zarr.
Precision: 'none' = fp32, 'bf16'/'fp16' = autocast; model and input channels_last at every
precision, as segment runs them (channels_last alone halved U-Net's fp32 time on AVX2).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _torch_setup(threads: int, device: str):
    import torch

    torch.set_num_threads(threads)
    dev = torch.device("cuda:0" if device.startswith("cuda") else "cpu")
    if dev.type == "cuda":
        torch.zeros(1, device=dev)  # initialise CUDA: the peak counter needs a context
        torch.cuda.reset_peak_memory_stats(dev)
    return torch, dev


def _sync(torch, dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _load(model_uri: str, dev, amp: str):
    import torch

    from segcore.models.checkpoint import load_checkpoint

    model, ckpt = load_checkpoint(model_uri, device=dev)
    return model.to(memory_format=torch.channels_last), ckpt


def _runner(torch, model, dev, amp: str):
    """x (B, C, h, w) tensor on the device -> logits (float32), with the precision handling."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    if amp not in ("none", "bf16", "fp16"):
        raise SystemExit(f"--amp {amp!r} must be none, bf16 or fp16 here")

    def run(x):
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast(dev.type, dtype=dtype,
                                                    enabled=dtype is not None):
            return model(x).float()
    return run


def _probs(torch, logits):
    return torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, dim=1)


def _labels(p: np.ndarray) -> np.ndarray:
    return (p[0] >= 0.5).astype(np.uint8) if p.shape[0] == 1 else p.argmax(0).astype(np.uint8)


def _warm_up(torch, run, dev, channels: int, multiple: int) -> None:
    side = -(-128 // multiple) * multiple
    run(torch.zeros(1, channels, side, side, device=dev))
    _sync(torch, dev)


def _common(res: dict, torch, dev, args) -> dict:
    res.update(amp=args.amp, channels_last=True, threads=torch.get_num_threads(),
               device=str(dev))
    if dev.type == "cuda":
        res["cuda_max_mem_mb"] = torch.cuda.max_memory_allocated(dev) / 1e6
        res["cuda_device"] = torch.cuda.get_device_name(dev)
    return res


def bare(args) -> dict:
    from segcore.inference import normalize
    from segcore.io.readers import open_scene
    from segcore.models.fields import cached_receptive_field
    from segcore.stitching import predict_whole
    from segcore.tiling import round_up

    torch, dev = _torch_setup(args.threads, args.device)
    model, ckpt = _load(args.model, dev, args.amp)
    multiple = int(getattr(model, "input_multiple", 1))
    field = cached_receptive_field(ckpt.spec)
    radius = 0 if field.is_global else field.radius
    pad = radius if args.pad == "auto" else int(args.pad)
    with open_scene(args.scene) as scene:
        h, w = scene.info.height, scene.info.width
        ch, cw = min(h, args.max_side), min(w, args.max_side)
        y0, x0 = (h - ch) // 2 // multiple * multiple, (w - cw) // 2 // multiple * multiple
        raw = scene.read(y0, y0 + ch, x0, x0 + cw)
    x = normalize(raw, ckpt.contract)
    del raw
    run = _runner(torch, model, dev, args.amp)
    _warm_up(torch, run, dev, x.shape[0], multiple)
    timed: list[float] = []
    shapes: list[tuple] = []

    def predict(batch: np.ndarray) -> np.ndarray:
        xt = torch.from_numpy(np.ascontiguousarray(batch)).to(dev)
        xt = xt.contiguous(memory_format=torch.channels_last)
        _sync(torch, dev)
        t0 = time.perf_counter()
        logits = run(xt)
        _sync(torch, dev)
        timed.append(time.perf_counter() - t0)
        shapes.append(tuple(xt.shape))
        return _probs(torch, logits).cpu().numpy()

    t0 = time.perf_counter()
    probs = predict_whole(predict, x, pad, multiple)
    total = time.perf_counter() - t0
    extrapolated = (ch, cw) != (h, w)
    res = {"seconds": timed[0], "seconds_total": total, "mpx_per_s": ch * cw / 1e6 / timed[0],
           "scene": [h, w], "crop": [y0, y0 + ch, x0, x0 + cw], "extrapolated": extrapolated,
           "pad": round_up(pad, multiple), "input_shape": list(shapes[0]), "multiple": multiple,
           "receptive_field": None if field.is_global else field.radius}
    if args.ref:
        # where the crop's output equals whole-image output: at least the field's radius from
        # any crop edge that is not an image edge (none for a global-norm model, or when the
        # mirror pad is below the field's radius)
        ry0 = y0 + (radius if y0 > 0 else 0)
        ry1 = y0 + ch - (radius if y0 + ch < h else 0)
        rx0 = x0 + (radius if x0 > 0 else 0)
        rx1 = x0 + cw - (radius if x0 + cw < w else 0)
        if (field.is_global and extrapolated) or ry1 <= ry0 or rx1 <= rx0 or pad < radius:
            res["reference"] = None
        else:
            p = probs[:, ry0 - y0:ry1 - y0, rx0 - x0:rx1 - x0]
            np.savez(args.ref, prob=np.rint(p * 255).astype(np.uint8), mask=_labels(p),
                     region=np.array([ry0, ry1, rx0, rx1]))
            res["reference"] = {"file": args.ref, "region": [ry0, ry1, rx0, rx1]}
    return _common(res, torch, dev, args)


def monai(args) -> dict:
    from monai.inferers import sliding_window_inference

    from bench.procs import compare_arrays
    from segcore.inference import normalize
    from segcore.io.readers import open_scene

    torch, dev = _torch_setup(args.threads, args.device)
    model, ckpt = _load(args.model, dev, args.amp)
    multiple = int(getattr(model, "input_multiple", 1))
    with open_scene(args.scene) as scene:
        h, w = scene.info.height, scene.info.width
        raw = scene.read(0, h, 0, w)
    x = torch.from_numpy(normalize(raw, ckpt.contract))[None].to(dev)
    del raw
    x = x.contiguous(memory_format=torch.channels_last)
    run = _runner(torch, model, dev, args.amp)
    _warm_up(torch, run, dev, x.shape[1], multiple)
    _sync(torch, dev)
    t0 = time.perf_counter()
    with torch.inference_mode():
        logits = sliding_window_inference(x, roi_size=(args.tile, args.tile), sw_batch_size=4,
                                          predictor=run, overlap=args.overlap, mode="gaussian")
    _sync(torch, dev)
    seconds = time.perf_counter() - t0
    probs = _probs(torch, logits.float())[0].cpu().numpy()
    res = {"seconds": seconds, "mpx_per_s": h * w / 1e6 / seconds, "scene": [h, w],
           "overlap": args.overlap, "roi": args.tile, "sw_batch_size": 4, "mode": "gaussian"}
    if args.ref:
        ref = np.load(args.ref)
        y0, y1, x0, x1 = (int(v) for v in ref["region"])
        p = probs[:, y0:y1, x0:x1]
        res["deviation"] = compare_arrays(np.rint(p * 255).astype(np.uint8), _labels(p), ref)
    return _common(res, torch, dev, args)


def floors(args) -> dict:
    """Full decode, float32 normalisation in numpy (the arithmetic of
    segcore.inference.normalize, in bands of --tile rows; torch is never imported here),
    writing two uint8 planes (probabilities (1, h, w) + mask (h, w)) into sharded zstd Zarr
    arrays shard by shard (shard = --tile), one writer per shard."""
    import zarr

    from segcore.io.zarrstore import codec
    from segcore.tiling import shard_chunk

    def normalize(raw: np.ndarray) -> np.ndarray:  # the pointwise checkpoint's contract
        x = raw.astype(np.float32) / np.float32(255.0)
        x = (x - np.full(3, 0.5, np.float32)) / np.full(3, 0.25, np.float32)
        return np.ascontiguousarray(x.transpose(2, 0, 1))

    scene = Path(args.scene)
    t0 = time.perf_counter()
    if scene.suffix == ".zarr":
        img = np.asarray(zarr.open_array(str(scene), mode="r")[:])
    else:
        import tifffile

        img = tifffile.imread(scene)
    decode = time.perf_counter() - t0
    h, w = img.shape[:2]
    t0 = time.perf_counter()
    for y in range(0, h, args.tile):
        normalize(img[y:y + args.tile])
    norm = time.perf_counter() - t0
    prob, mask = img[None, :, :, 0], (img[:, :, 1] >= 128).astype(np.uint8)
    tmp = Path(tempfile.mkdtemp(prefix="bench-floor-", dir=args.tmp))
    try:
        s = args.tile
        chunk = shard_chunk(s, 1)
        t0 = time.perf_counter()
        pa = zarr.create_array(str(tmp / "prob.zarr"), shape=(1, h, w), dtype="uint8",
                               shards=(1, s, s), chunks=(1, chunk, chunk), compressors=codec())
        ma = zarr.create_array(str(tmp / "mask.zarr"), shape=(h, w), dtype="uint8",
                               shards=(s, s), chunks=(chunk, chunk), compressors=codec())
        for y in range(0, h, s):
            for x in range(0, w, s):
                pa[:, y:y + s, x:x + s] = prob[:, y:y + s, x:x + s]
                ma[y:y + s, x:x + s] = mask[y:y + s, x:x + s]
        write = time.perf_counter() - t0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    mpx = h * w / 1e6
    return {"scene": [h, w], "decode_s": decode, "normalize_s": norm, "write_s": write,
            "decode_mpx_per_s": mpx / decode, "normalize_mpx_per_s": mpx / norm,
            "write_mpx_per_s": mpx / write, "seconds": decode + norm + write,
            "mpx_per_s": mpx / (decode + norm + write)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.worker", description=__doc__.split("\n")[0])
    ap.add_argument("kind", choices=["bare", "monai", "floors"])
    ap.add_argument("--model")
    ap.add_argument("--scene", required=True)
    ap.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-side", type=int, default=4096)
    ap.add_argument("--pad", default="auto", help="bare: mirror pad, 'auto' = field radius")
    ap.add_argument("--tile", type=int, default=1024)
    ap.add_argument("--overlap", type=float, default=0.25)
    ap.add_argument("--ref", default=None, help="reference npz (written by bare, read by monai)")
    ap.add_argument("--tmp", default=None, help="floors: where the Zarr output goes")
    ap.add_argument("--json", required=True)
    args = ap.parse_args(argv)
    if args.kind != "floors" and not args.model:
        ap.error(f"{args.kind} needs --model")
    res = {"bare": bare, "monai": monai, "floors": floors}[args.kind](args)
    res["kind"] = args.kind
    Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
