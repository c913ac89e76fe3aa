"""Peak memory of ``segcore segment`` against scene size: the goal is flat memory (a 256 Mpx
scene within 1.2x of a 16 Mpx one). A benchmark, not a test.

    .venv/bin/python bench/memory.py                       # 16, 64, 256 Mpx, in-process
    .venv/bin/python bench/memory.py --workers 0,1 --sizes 16,64

Each scene is square RGB uint8 (``Mpx`` = 2**20 pixels, so 16 Mpx is 4096 x 4096) with a
cheap coloured texture that is foreground everywhere (no tile is skipped), written as a tiled
zlib TIFF region by region (never whole in memory). A tiny U-Net checkpoint is saved, then
every (size, workers) pair runs ``python -m segcore segment`` as its own subprocess; the RSS
of its whole process tree (Dask workers included) is sampled every ``--interval`` s. The
table shows seconds, Mpx/s, peak RSS of the tree (sum over processes, sampled), the kernel's
exact peak RSS of the largest single process ("main MB": ``ru_maxrss`` from wait4, which
covers the main process and the descendants it reaped, e.g. Dask workers) and the ratio of
the tree peak to the first (smallest) size.
Written to ``--out``/memory.json too. Scene and result files live in a temp dir, deleted
unless ``--keep``.

``--exports qupath,gpkg,geoparquet,geojson`` (any ``segcore export --to`` formats) runs, after
each segment run, ``python -m segcore export RESULT --to FORMAT`` once per format as its own
subprocess, sampled the same way; the rows land in memory.json's ``exports`` with the ratio of
each format's peak to its peak at the first size (use with ``--extra=--objects`` for the
object formats).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TIFF_TILE = 512


def scene_side(mpx: float) -> int:
    """Edge of a square scene of ``mpx`` * 2**20 pixels, a multiple of the TIFF tile."""
    return max(TIFF_TILE, round(math.sqrt(mpx) * 1024 / TIFF_TILE) * TIFF_TILE)


DOT_PITCH = 40  # --scene dots: one disc per 40 x 40 px cell (655 per Mpx)


def dots(y0: int, x0: int, h: int, w: int) -> np.ndarray:
    """Separate discs (radius 6-10 px, one per ``DOT_PITCH`` cell) at 255 in channel 0 on 0,
    a pure function of absolute coordinates: ~10k objects at 16 Mpx, ~168k at 256 Mpx, many
    across shard borders."""
    yy = np.arange(y0, y0 + h)[:, None]
    xx = np.arange(x0, x0 + w)[None, :]
    iy, ix = yy // DOT_PITCH, xx // DOT_PITCH
    r = 6 + (iy * 7 + ix * 13) % 5
    d2 = (yy - iy * DOT_PITCH - DOT_PITCH // 2) ** 2 + (xx - ix * DOT_PITCH - DOT_PITCH // 2) ** 2
    out = np.zeros((h, w, 3), np.uint8)
    out[..., 0] = np.where(d2 <= r * r, 255, 0)
    out[..., 1] = 90
    return out


# --geo: GeoTIFF tags of a north-up scene in EPSG:32616 (UTM 16N), 0.5 m pixels
GEO_TAGS = [(33550, "d", 3, (0.5, 0.5, 0.0), True),
            (33922, "d", 6, (0.0, 0.0, 0.0, 500000.0, 4200000.0, 0.0), True),
            (34735, "H", 20, (1, 1, 0, 4, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, 32616,
                              3076, 0, 1, 9001), True)]


def write_scene(path: Path, side: int, kind: str = "texture", geo: bool = False) -> None:
    import tifffile

    from bench.fixtures import texture  # the harness's scene texture, written the same way

    fill = dots if kind == "dots" else texture

    def tiles():
        for y in range(0, side, TIFF_TILE):
            for x in range(0, side, TIFF_TILE):
                yield fill(y, x, TIFF_TILE, TIFF_TILE)

    tifffile.imwrite(path, data=tiles(), shape=(side, side, 3), dtype=np.uint8,
                     tile=(TIFF_TILE, TIFF_TILE), photometric="rgb", compression="zlib",
                     compressionargs={"level": 1}, bigtiff=True,
                     **({"extratags": GEO_TAGS, "metadata": None} if geo else {}))


def write_model(path: Path, depth: int, width: int) -> None:
    import torch

    from segcore.config import InputContract, ModelSpec, Normalization
    from segcore.models import build_model
    from segcore.models.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = build_model(ModelSpec(arch="unet", in_channels=3, out_channels=1,
                                  kwargs={"depth": depth, "width": width})).eval()
    contract = InputContract(channels=3, normalization=Normalization(
        scale=255.0, mean=(0.5,) * 3, std=(0.25,) * 3))
    save_checkpoint(model, str(path), contract)


def write_threshold_model(path: Path) -> None:
    """--scene dots: a 1x1 convolution that is foreground exactly where channel 0 is 255."""
    import torch

    from segcore.config import InputContract, ModelSpec
    from segcore.models import build_model
    from segcore.models.checkpoint import save_checkpoint

    spec = ModelSpec(arch="pointwise", in_channels=3, out_channels=1, kwargs={})
    model = build_model(spec).eval()
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.weight[0, 0] = 40.0
        model.head.bias.fill_(-20.0)
    save_checkpoint(model, str(path), InputContract(channels=3), spec)


def run_one(cmd: list[str], log: Path, interval: float) -> dict:
    """Run ``cmd``, sampling the process tree's RSS; returns seconds, peaks and exit code."""
    import psutil

    from bench.procs import tree_rss

    t0 = time.perf_counter()
    with open(log, "wb") as fh:
        popen = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
        proc = psutil.Process(popen.pid)
        peak, samples = 0, 0
        while True:
            pid, status, usage = os.wait4(popen.pid, os.WNOHANG)
            if pid == popen.pid:
                break
            peak = max(peak, tree_rss(proc))
            samples += 1
            time.sleep(interval)
        popen.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "peak_tree_rss": peak, "samples": samples,
            "main_maxrss": usage.ru_maxrss * 1024, "returncode": popen.returncode}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="16,64,256", help="scene sizes in Mpx (2**20 px)")
    ap.add_argument("--workers", default="0",
                    help="comma list of --workers values: 0 = in-process, N = LocalCluster")
    ap.add_argument("--tile", type=int, default=1024, help="model window edge")
    ap.add_argument("--depth", type=int, default=2, help="U-Net depth of the tiny model")
    ap.add_argument("--width", type=int, default=4, help="U-Net base width of the tiny model")
    ap.add_argument("--interval", type=float, default=0.2, help="RSS sampling period, s")
    ap.add_argument("--out", default="bench-output", help="where memory.json and logs go")
    ap.add_argument("--tmp", default=None, help="directory for scenes and results")
    ap.add_argument("--keep", action="store_true", help="keep scenes and results")
    ap.add_argument("--extra", default="", help="extra args for 'segcore segment' (quoted)")
    ap.add_argument("--scene", default="texture", choices=["texture", "dots"],
                    help="texture: foreground everywhere, the tiny U-Net; dots: separate "
                         "discs and a threshold model, ~10k objects per 16 Mpx (with "
                         "--extra=--objects: memory against the object count)")
    ap.add_argument("--exports", default="",
                    help="comma list of 'segcore export --to' formats to run after each "
                         "segment run, each its own sampled subprocess (e.g. "
                         "qupath,gpkg,geoparquet,geojson; objects need --extra=--objects)")
    ap.add_argument("--geo", action="store_true",
                    help="georeference the scenes (EPSG:32616, 0.5 m): the CRS exports "
                         "(gpkg, geoparquet in the CRS, geojson in WGS84) need it")
    args = ap.parse_args(argv)
    exports = [f for f in args.exports.split(",") if f.strip()]
    export_rows: list[dict] = []

    sizes = [float(s) for s in args.sizes.split(",") if s.strip()]
    workers = [int(w) for w in args.workers.split(",") if w.strip()]
    out = Path(args.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="segcore-bench-mem-", dir=args.tmp))
    rows: list[dict] = []
    try:
        model = tmp / "model.safetensors"
        if args.scene == "dots":
            write_threshold_model(model)
        else:
            write_model(model, args.depth, args.width)
        for mpx in sizes:
            side = scene_side(mpx)
            scene = tmp / f"scene-{side}.tif"
            t0 = time.perf_counter()
            write_scene(scene, side, args.scene, args.geo)
            print(f"# wrote {scene.name}: {side} x {side} RGB, "
                  f"{scene.stat().st_size / 2**20:.0f} MiB in {time.perf_counter() - t0:.1f} s",
                  flush=True)
            for nw in workers:
                res = tmp / f"out-{side}-w{nw}"
                log = out / "logs" / f"segment-{side}-w{nw}.log"
                cmd = [sys.executable, "-m", "segcore", "segment", str(scene), str(res),
                       "--model", str(model), "--tile", str(args.tile), "--workers", str(nw),
                       *args.extra.split()]
                r = run_one(cmd, log, args.interval)
                if r["returncode"] != 0:
                    print(f"segment failed ({r['returncode']}), see {log}:\n"
                          + log.read_text()[-3000:], file=sys.stderr)
                    return 1
                report = json.loads((res / "report.json").read_text())
                px = side * side
                rows.append({
                    "mpx": round(px / 1e6, 2), "side": side, "workers": nw,
                    "tiles": report["tiles_total"], "tiles_run": report["tiles_run"],
                    "tiles_skipped": report["tiles_skipped_background"],
                    "seconds": round(r["seconds"], 1),
                    "segment_seconds": report["seconds"],
                    "mpx_per_s": round(px / 1e6 / r["seconds"], 2),
                    "peak_rss_mb": round(r["peak_tree_rss"] / 1e6, 1),
                    "main_maxrss_mb": round(r["main_maxrss"] / 1e6, 1),
                    "samples": r["samples"], "command": " ".join(cmd),
                    **({"objects": report["objects"]["objects"],
                        "objects_seconds": report["objects"]["seconds"]}
                       if report.get("objects") else {}),
                })
                print(json.dumps(rows[-1]), flush=True)
                for fmt in exports:
                    elog = out / "logs" / f"export-{fmt}-{side}-w{nw}.log"
                    ecmd = [sys.executable, "-m", "segcore", "export", str(res), "--to", fmt]
                    e = run_one(ecmd, elog, args.interval)
                    if e["returncode"] != 0:
                        print(f"export {fmt} failed ({e['returncode']}), see {elog}:\n"
                              + elog.read_text()[-3000:], file=sys.stderr)
                    dst = Path(elog.read_text().strip().splitlines()[-1])
                    export_rows.append({
                        "format": fmt, "mpx": rows[-1]["mpx"], "workers": nw,
                        "objects": rows[-1].get("objects"),
                        "seconds": round(e["seconds"], 1),
                        "peak_rss_mb": round(e["peak_tree_rss"] / 1e6, 1),
                        "main_maxrss_mb": round(e["main_maxrss"] / 1e6, 1),
                        "file_mb": round(dst.stat().st_size / 1e6, 1) if dst.exists() else None,
                        "samples": e["samples"], "returncode": e["returncode"],
                        "command": " ".join(ecmd)})
                    print(json.dumps(export_rows[-1]), flush=True)
                if not args.keep:
                    shutil.rmtree(res, ignore_errors=True)
            if not args.keep:
                scene.unlink()
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"# kept {tmp}")

    for nw in workers:
        mine = [r for r in rows if r["workers"] == nw]
        if not mine:
            continue
        base = mine[0]
        for r in mine:
            r["ratio"] = round(r["peak_rss_mb"] / base["peak_rss_mb"], 3)
            r["ratio_main"] = round(r["main_maxrss_mb"] / base["main_maxrss_mb"], 3)
    head = (f"{'Mpx':>7} {'workers':>7} {'tiles':>6} {'seconds':>8} {'Mpx/s':>6} "
            f"{'peak RSS MB':>11} {'main MB':>8} {'ratio':>6}")
    print(head)
    for r in rows:
        print(f"{r['mpx']:>7} {r['workers']:>7} {r['tiles']:>6} {r['seconds']:>8} "
              f"{r['mpx_per_s']:>6} {r['peak_rss_mb']:>11} {r['main_maxrss_mb']:>8} "
              f"{r['ratio']:>6}")
    for fmt in exports:
        mine = [r for r in export_rows if r["format"] == fmt]
        for r in mine:
            r["ratio"] = round(r["peak_rss_mb"] / mine[0]["peak_rss_mb"], 3)
            r["ratio_main"] = round(r["main_maxrss_mb"] / mine[0]["main_maxrss_mb"], 3)
    if export_rows:
        print(f"{'export':>10} {'Mpx':>7} {'objects':>8} {'seconds':>8} {'peak RSS MB':>11} "
              f"{'main MB':>8} {'file MB':>8} {'ratio':>6}")
        for r in export_rows:
            print(f"{r['format']:>10} {r['mpx']:>7} {r['objects']!s:>8} {r['seconds']:>8} "
                  f"{r['peak_rss_mb']:>11} {r['main_maxrss_mb']:>8} {r['file_mb']!s:>8} "
                  f"{r['ratio']:>6}")
    result = {"rows": rows, "exports": export_rows, "tile": args.tile, "scene": args.scene,
              "model": {"arch": "pointwise threshold"} if args.scene == "dots" else
              {"arch": "unet", "depth": args.depth, "width": args.width}, "python": platform.python_version(),
              "cpus": os.cpu_count(), "argv": sys.argv}
    (out / "memory.json").write_text(json.dumps(result, indent=2))
    print(f"# wrote {out / 'memory.json'}")
    flat = all(r["ratio"] <= 1.2 for r in rows)
    print(f"# memory {'flat' if flat else 'NOT flat'} (goal: every ratio <= 1.2)")
    if export_rows:
        flat = all(r["ratio"] <= 1.2 for r in export_rows)
        print(f"# export memory {'flat' if flat else 'NOT flat'} (goal: every ratio <= 1.2)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
