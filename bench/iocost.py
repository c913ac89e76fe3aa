"""``python -m bench io``: the I/O ceiling of the pipeline.

``segcore segment SRC OUT --model pointwise.safetensors --tile T --halo auto
--no-skip-background --amp none --workers W --quiet`` with a zero-cost model (one 1x1
convolution: receptive field 0, input multiple 1), so what is timed is the pipeline's own work
(read, decode, normalise, crop, write, digest, pyramid, preview), on three scene kinds holding
the same pixels: a zlib-tiled TIFF, a JPEG-tiled SVS-like TIFF and a Zarr array.

Beside each, the floors measured in one fresh process on the same file (bench.worker floors):
full decode (tifffile.imread, or the Zarr array read whole), float32 normalisation in numpy
(segcore.inference.normalize), and writing two uint8 planes into sharded zstd Zarr arrays
(segcore.io.zarrstore.codec(), shard = T). "floors" Mpx/s is the three summed; the pipeline
cannot beat it on one core without overlapping them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from bench import env as envmod
from bench import fixtures, procs, report

METRICS = ("seconds", "mpx_per_s", "wall", "wall_mpx_per_s", "peak_rss_mb", "tree_peak_rss_mb",
           "decode_mpx_per_s", "normalize_mpx_per_s", "write_mpx_per_s")


def _name(workers: int | None, base: str = "") -> str:
    name = "segment-default" if workers is None else f"segment-w{workers}"
    return f"base-{base[:7]} {name}" if base else name


def run(args) -> dict:
    device = envmod.resolve_device(args.device)
    threads = args.threads or envmod.affinity()
    env = envmod.environment(threads, device)
    print(f"# {envmod.describe(env)}", flush=True)
    workdir = Path(args.workdir)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    workers = [None if w.strip() == "default" else int(w)
               for w in str(args.workers).split(",") if w.strip()]
    tile = args.tile[0]
    tag = args.tag or report.tag_for("quick" if args.quick else None, args.size, f"t{tile}",
                                     device, *([args.model] if args.model != "pointwise" else []))
    rundir = workdir / "runs" / f"io-{tag}"
    shutil.rmtree(rundir, ignore_errors=True)
    (rundir / "tmp").mkdir(parents=True)
    ckpt = fixtures.ensure_model(workdir, args.model)
    scenes = {k: fixtures.ensure_scene(workdir, k, args.size) for k in kinds}
    px = args.size * args.size
    print(f"# zero-cost model {ckpt}; scenes {', '.join(str(s) for s in scenes.values())}; "
          f"tile {tile}, workers {workers}, {threads} thread(s)", flush=True)

    # --base REV: every segment contender also runs from a worktree of REV, interleaved
    base_root, base = procs.base_tree(args.base, workdir) if args.base else (None, "")
    sides = [("", None), *([(base, base_root)] if base else [])]
    rows: dict[tuple[str, str], dict] = {}
    for k in kinds:
        for w in workers:
            for b, _ in sides:
                rows[(k, _name(w, b))] = {"scene_kind": k, "contender": _name(w, b),
                                          "tile": tile, "runs": [],
                                          "notes": f"code of {b}" if b else ""}
        rows[(k, "floors")] = {"scene_kind": k, "contender": "floors", "tile": tile,
                               "runs": [], "notes": "decode + normalise + write, one process"}
    seg_dev = device if device.startswith("cuda") else "cpu"
    for rep in range(args.repeats):
        for k in kinds:
            for w, (b, tree) in ((w, s) for w in workers for s in sides):
                name = _name(w, b)
                row = rows[(k, name)]
                cenv = procs.child_env(threads, max(1, threads // w) if w else None)
                if tree is not None:
                    cenv = procs.in_tree(cenv, tree)
                slug = name.replace(" ", "-")
                out = rundir / f"out-{k}-{slug}"
                log = rundir / "logs" / f"{k}-{slug}-rep{rep}.log"
                r = procs.run_segment(scenes[k], out, ckpt, tile, "none", w, seg_dev, log, cenv,
                                      cwd=tree)
                r["mpx_per_s"] = px / 1e6 / r["seconds"] if r["seconds"] > 0 else None
                r["wall_mpx_per_s"] = px / 1e6 / r["wall"]
                row["tiles_run"] = r["report"].get("tiles_run")
                row["report"] = r["report"]
                row["runs"].append(r)
                if not args.keep:
                    shutil.rmtree(out, ignore_errors=True)
                print(f"# rep {rep + 1}/{args.repeats} {k} {name}: "
                      f"{r['mpx_per_s']:.3g} Mpx/s (report), wall {r['wall']:.3g} s", flush=True)
            log = rundir / "logs" / f"floors-{k}-rep{rep}.log"
            r = procs.run_worker("floors", ["--scene", str(scenes[k]), "--tile", str(tile),
                                            "--tmp", str(rundir / "tmp")],
                                 log, procs.child_env(threads))
            rows[(k, "floors")]["runs"].append(r)
            print(f"# rep {rep + 1}/{args.repeats} {k} floors: decode "
                  f"{r['decode_mpx_per_s']:.3g}, normalise {r['normalize_mpx_per_s']:.3g}, "
                  f"write {r['write_mpx_per_s']:.3g} Mpx/s", flush=True)

    out_rows = [report.summarise(rows[key], METRICS) for key in rows]
    table = report.io_table(out_rows)
    result = {"comparison": "io", "tag": tag, "environment": env,
              "config": {"size": args.size, "tile": tile, "kinds": kinds, "workers": workers,
                         "threads": threads, "repeats": args.repeats, "device": device,
                         "base": base or None,
                         "checkpoint": str(ckpt), "scenes": {k: str(v) for k, v in
                                                             scenes.items()},
                         "quick": args.quick},
              "rows": out_rows, "table": table}
    report.publish(result, Path(args.results), "io", tag,
                   f"I/O ceiling: zero-cost model, {args.size}^2 px, tile {tile}, {device}",
                   lambda r: f"{r['scene_kind']} {r['contender']}",
                   f"I/O ceiling, {args.size}x{args.size} px ({px / 1e6:.1f} Mpx), tile {tile}; "
                   f"{envmod.describe(env)}")
    if not args.keep:
        shutil.rmtree(rundir, ignore_errors=True)
    return result
