"""`make demo`: the whole product on embedded defaults, offline, from nothing.

On real pixels (the default where a real slide is at hand): the shipped ``nuclei-he`` model
segments a real H&E slide (``--scene``, default the CMU-1 small region of OpenSlide's test data
in ../shared/datasets when present) through the real ``segment_scene`` Prefect flow, with
objects and a QuPath GeoJSON export; no training, no network.

Synthetic (``--synthetic``, or when no real slide is at hand):

1. Generates training patches from segcore's synthetic H&E-like generator (nuclei on tissue).
2. Trains a small U-Net for a bounded time on this machine.
3. Writes an 8192 x 8192 scene (67 Mpx, tiled TIFF, with its truth) from the same generator.
4. Runs the real ``segment_scene`` Prefect flow on it: ephemeral Prefect, a local Dask cluster,
   local storage.
5. Prints where the results are, the Dice of the mask against the generator's truth, and
   writes an overlay PNG.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

# quiet Dask's per-connection INFO lines in the demo's output (before dask is imported)
os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")


def _write_patches(root: Path, n: int, size: int, seed: int) -> None:
    from PIL import Image

    from segcore.synthetic import make_patches

    imgs, masks = make_patches(n, size, seed)
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i, (im, m) in enumerate(zip(imgs, masks, strict=True)):
        Image.fromarray(im).save(root / "images" / f"p{i:04d}.png")
        Image.fromarray((m > 0).astype(np.uint8) * 255).save(root / "masks" / f"p{i:04d}.png")


def _dice_and_overlay(result: str, truth_uri: str, scene_uri: str, overlay: Path,
                      block: int = 2048) -> float:
    """Dice over the whole scene, block by block (bounded memory), and an overlay of a crop."""
    import zarr
    from PIL import Image

    from segcore.io.readers import open_scene

    mask = zarr.open_group(result, mode="r")["labels/mask/0"]
    inter = total = 0
    with open_scene(truth_uri) as truth:
        h, w = truth.info.height, truth.info.width
        for y in range(0, h, block):
            for x in range(0, w, block):
                t = truth.read(y, min(y + block, h), x, min(x + block, w))[..., 0] > 0
                m = mask[y:y + t.shape[0], x:x + t.shape[1]] > 0
                inter += int(np.count_nonzero(t & m))
                total += int(np.count_nonzero(t)) + int(np.count_nonzero(m))
        cy, cx = h // 2, w // 2
        t = truth.read(cy, cy + 512, cx, cx + 512)[..., 0] > 0
    with open_scene(scene_uri) as scene:
        img = scene.read(cy, cy + 512, cx, cx + 512).astype(np.float32)
    m = mask[cy:cy + 512, cx:cx + 512] > 0
    out = img.copy()
    out[m & t] = out[m & t] * 0.5 + np.array([0, 200, 0]) * 0.5     # agree: green
    out[m & ~t] = out[m & ~t] * 0.5 + np.array([255, 0, 0]) * 0.5   # false positive: red
    out[~m & t] = out[~m & t] * 0.5 + np.array([0, 80, 255]) * 0.5  # missed: blue
    panel = np.concatenate([img, out], axis=1).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(panel).save(buf, format="PNG")
    overlay.write_bytes(buf.getvalue())
    return 2 * inter / total if total else 1.0


REAL_SCENE = (Path(__file__).resolve().parents[2] / "shared" / "datasets" / "wsi-cmu1-small-region"
              / "CMU-1-Small-Region.svs")


def _listing(files) -> str:
    files = files.values() if isinstance(files, dict) else (files or [])
    return ", ".join(str(f) for f in files) or "(none)"


def _real(args, out: Path) -> int:
    """The shipped nuclei model on a real slide, through the segment_scene flow."""
    from flows.segment import SceneOptions, segment_scene
    from segcore.models.pretrained import shipped

    m = shipped()[args.model]
    print(f"[1/2] shipped model {m.name}: {m.task}; trained at {m.pixel_size:g} um/px; "
          f"test {m.score}\n      card: {m.card_path}")
    print(f"[2/2] segment_scene flow on {args.scene} (ephemeral Prefect, local storage; "
          "objects + QuPath export)")
    t0 = time.perf_counter()
    report = segment_scene(src=str(args.scene), out=str(out / "results"), model=m.name,
                           options=SceneOptions(tile=args.tile, objects=True,
                                                exports=("qupath",)))
    secs = time.perf_counter() - t0
    objs = report.get("objects") or {}
    for w in report.get("warnings", []):
        print(f"      note: {w}")
    print(json.dumps({k: report[k] for k in ("tiles_total", "tiles_run", "halo", "exact",
                                              "mpx_per_s")}))
    print(f"\nresults:  {report['out']}\n  mask + probabilities (OME-Zarr, napari): "
          f"{report['uris']['result']}\n  QuPath detections (File > Import objects): "
          f"{report['uris'].get('export:qupath')}\n  objects table: "
          f"{_listing(objs.get('files'))}"
          f"\n  preview: {report['uris']['preview']}"
          f"\n{objs.get('objects', '?')} nuclei found; this slide has no nucleus annotation, so "
          f"no score is printed (the model's test figures are in its card)"
          f"\nflow {secs:.0f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="demo-output", help="where everything goes")
    ap.add_argument("--synthetic", action="store_true",
                    help="train on synthetic tissue and segment a generated scene instead")
    ap.add_argument("--scene", type=Path, default=REAL_SCENE,
                    help="the real slide for the shipped model (default: CMU-1 small region)")
    ap.add_argument("--model", default="nuclei-he", help="shipped model for the real slide")
    ap.add_argument("--size", type=int, default=8192, help="scene edge in pixels")
    ap.add_argument("--train-minutes", type=float, default=1.5)
    ap.add_argument("--patches", type=int, default=192)
    ap.add_argument("--tile", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args(argv)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    # the ephemeral API server needs ~13 s the first time; give a busy machine room
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    if not args.synthetic:
        if args.scene.exists():
            return _real(args, out)
        print(f"no real slide at {args.scene}: the synthetic demo instead (pass --scene PATH "
              "for a slide of yours)")

    from segcore.synthetic import write_scene
    from segcore.training.config import TrainConfig
    from segcore.training.loop import train

    print(f"[1/4] {args.patches} training patches from the synthetic generator -> {out}/train")
    _write_patches(out / "train", args.patches, 128, args.seed)
    print(f"[2/4] training a small U-Net for {args.train_minutes} min on this machine")
    ckpt = str(out / "model.safetensors")
    res = train(TrainConfig(data=str(out / "train"), arch="unet",
                            model_kwargs={"depth": 3, "width": 8}, patch=128, batch=8,
                            minutes=args.train_minutes, lr=3e-3, warmup=20, seed=args.seed,
                            class_names=("background", "nucleus"), out=ckpt,
                            checkpoint_every=10**6, val_every=10**6), progress=True)
    print(f"      {res.steps} steps in {res.seconds:.0f} s, final loss "
          f"{np.mean(res.losses[-20:]):.3f}")
    scene = str(out / "scenes" / "demo_scene.tif")
    print(f"[3/4] writing a {args.size}x{args.size} scene ({args.size**2 / 1e6:.0f} Mpx) -> {scene}")
    t0 = time.perf_counter()
    truth = write_scene(scene, args.size, args.size, seed=args.seed + 1, tile=1024)
    print(f"      {time.perf_counter() - t0:.0f} s")

    print("[4/4] segment_scene flow (ephemeral Prefect, local Dask cluster, local storage)")
    from flows.segment import SceneOptions, segment_scene

    t0 = time.perf_counter()
    report = segment_scene(src=scene, out=str(out / "results"), model=ckpt,
                           options=SceneOptions(tile=args.tile, foreground="all"))
    secs = time.perf_counter() - t0
    result = report["uris"]["result"]
    overlay = out / "overlay.png"
    dice = _dice_and_overlay(result, truth, scene, overlay)
    print(json.dumps({k: report[k] for k in ("tiles_total", "tiles_run", "halo", "exact",
                                              "mpx_per_s")}))
    print(f"\nresults:  {report['out']}\n  mask + probabilities (OME-Zarr, napari): {result}"
          f"\n  report:  {report['uris']['report']}\n  preview: {report['uris']['preview']}"
          f"\n  overlay (green agree, red false positive, blue missed): {overlay}"
          f"\nDice vs the generator's truth: {dice:.3f}"
          + ("" if dice >= 0.8 else f" (the demo's model trained {args.train_minutes} min on "
             "synthetic patches and is undertrained: give it longer with DEMO_ARGS="
             "\"--train-minutes N\")")
          + f"\nflow {secs:.0f} s; whole demo {time.perf_counter() - t_all:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
