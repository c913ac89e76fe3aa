"""``python -m bench compare``: segcore's pipeline against its compute limit and against MONAI,
on the same model, weights, scene, threads and precision.

Contenders (each run in its own fresh process; repetitions interleaved: rep 1 runs every
contender once, then rep 2, ...):

- ``bare``        the model on the whole image in one forward pass (bench.worker bare): the
                  compute limit. Mpx/s = output pixels / forward seconds. Above
                  --bare-max-side a central crop is measured ("extrapolated": throughput is
                  flat in size beyond a few Mpx). Writes the reference for the others.
- ``segment``     ``segcore segment SRC OUT --model CKPT --tile T --halo auto
                  --no-skip-background --amp A --workers 0 --quiet``, disk to disk: the report's
                  seconds (Mpx/s) and the wall clock including process start (wall Mpx/s).
- ``segment-w2``  the same with ``--workers 2`` (LocalCluster; SEGCORE_TORCH_THREADS =
                  threads / 2 per worker, so the total matches).
- ``monai-0.25``, ``monai-0.5``: sliding_window_inference over the scene in memory (overlap
                  0.25 / 0.5, gaussian, sw_batch_size 4, roi = T) (bench.worker monai).

On CUDA (--device cuda) bare and MONAI run on the GPU (the whole scene tensor and MONAI's
output live there; torch.cuda.synchronize() brackets the timing; torch.cuda.max_memory_allocated
is reported) and segment gets ``--device cuda``. Without a GPU the output says so.

Output checks against bare (uint8-quantised probabilities, rint(p * 255), and masks from
p >= 0.5): max and mean absolute deviation in probability units and label flips, over the
region where bare equals whole-image inference. At fp32 segment's deviation is exactly 0.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

from bench import env as envmod
from bench import fixtures, procs, report

CONTENDERS = ("bare", "segment", "segment-w2", "monai-0.25", "monai-0.5")
METRICS = ("seconds", "mpx_per_s", "wall", "wall_mpx_per_s", "peak_rss_mb",
           "tree_peak_rss_mb", "cuda_max_mem_mb")


def parse_contenders(text: str | None) -> list[str]:
    if not text:
        return list(CONTENDERS)
    want = [c.strip() for c in text.split(",") if c.strip()]
    bad = [c for c in want if c not in CONTENDERS]
    if bad:
        raise SystemExit(f"--contenders {','.join(bad)}: unknown; choose from "
                         f"{','.join(CONTENDERS)}")
    return [c for c in CONTENDERS if c in want]  # canonical order: bare first


def run(args) -> dict:
    device = envmod.resolve_device(args.device)
    threads = args.threads or envmod.affinity()
    env = envmod.environment(threads, device)
    amp = envmod.resolve_amp(args.amp, device)
    print(f"# {envmod.describe(env)}", flush=True)
    workdir = Path(args.workdir)
    contenders = parse_contenders(args.contenders)
    tiles = args.tile
    tag = args.tag or report.tag_for("quick" if args.quick else None, args.model, args.size,
                                     "t" + "_".join(map(str, tiles)), args.amp, device)
    rundir = workdir / "runs" / f"compare-{tag}"
    logs = rundir / "logs"
    shutil.rmtree(rundir, ignore_errors=True)
    rundir.mkdir(parents=True)
    ckpt = fixtures.ensure_model(workdir, args.model)
    scene = fixtures.ensure_scene(workdir, "tiff", args.size)
    px = args.size * args.size
    print(f"# model {args.model} ({ckpt}), scene {args.size}x{args.size} RGB ({scene}), "
          f"tiles {tiles}, amp {args.amp} -> bare/monai run {amp}, {threads} thread(s), "
          f"{args.repeats} repetition(s)", flush=True)

    rows: dict[tuple[str, int | None], dict] = {}
    plan: list[tuple[str, int | None]] = []
    for c in contenders:
        for t in ([None] if c == "bare" else tiles):
            rows[(c, t)] = {"contender": c, "tile": t, "runs": [], "notes": ""}
            plan.append((c, t))
    if any(c.startswith("monai") for c in contenders) and \
            importlib.util.find_spec("monai") is None:
        msg = "monai is not installed (pip install monai, or the .[bench] extra)"
        print(f"# skipping the MONAI contenders: {msg}", flush=True)
        for key in [k for k in plan if k[0].startswith("monai")]:
            rows[key]["skipped"] = msg
            plan.remove(key)
    if "bare" not in contenders:
        print("# bare is not among the contenders: no ratios and no output checks", flush=True)

    ref = rundir / "bare-ref.npz"
    base_env = procs.child_env(threads)
    common = ["--model", str(ckpt), "--scene", str(scene), "--amp", amp, "--device", device,
              "--threads", str(threads)]
    for rep in range(args.repeats):
        for c, t in plan:
            row, name = rows[(c, t)], c + (f"-t{t}" if t else "")
            log = logs / f"{name}-rep{rep}.log"
            if c == "bare":
                extra = ["--max-side", str(args.bare_max_side), "--pad", str(args.bare_pad)]
                r = procs.run_worker("bare", [*common, *extra,
                                              *(["--ref", str(ref)] if rep == 0 else [])],
                                     log, base_env)
                if r.get("extrapolated"):
                    y0, y1, x0, x1 = r["crop"]
                    row["notes"] = f"extrapolated from a central {y1 - y0}x{x1 - x0} crop"
                if rep == 0 and r.get("reference") is None:
                    row["notes"] += (f"; no exact reference region (field radius "
                                     f"{r['receptive_field']} vs crop {args.bare_max_side})")
            elif c.startswith("segment"):
                workers = 2 if c == "segment-w2" else 0
                cenv = procs.child_env(threads, max(1, threads // 2) if workers else threads)
                out = rundir / f"out-{name}"
                seg_dev = device if device.startswith("cuda") else "cpu"
                r = procs.run_segment(scene, out, ckpt, t, args.amp, workers, seg_dev, log,
                                      cenv)
                r["mpx_per_s"] = px / 1e6 / r["seconds"] if r["seconds"] > 0 else None
                r["wall_mpx_per_s"] = px / 1e6 / r["wall"]
                _segment_notes(row, r, amp, workers, threads)
                if rep == 0 and ref.exists():
                    row["deviation"] = procs.deviation(out, ref)
                if not args.keep:
                    shutil.rmtree(out, ignore_errors=True)
            else:
                overlap = c.split("-")[1]
                r = procs.run_worker("monai", [*common, "--tile", str(t), "--overlap", overlap,
                                               *(["--ref", str(ref)]
                                                 if rep == 0 and ref.exists() else [])],
                                     log, base_env)
                r["wall_mpx_per_s"] = px / 1e6 / r["wall"]
                if "deviation" in r:
                    row["deviation"] = r.pop("deviation")
            row["runs"].append(r)
            print(f"# rep {rep + 1}/{args.repeats} {name}: {_short(r)}", flush=True)

    out_rows = [report.summarise(rows[k], METRICS) for k in rows]
    report.add_ratios(out_rows)
    table = report.compare_table(out_rows)
    result = {"comparison": "compare", "tag": tag, "environment": env,
              "config": {"model": args.model, "checkpoint": str(ckpt), "size": args.size,
                         "scene": str(scene), "tiles": tiles, "amp_requested": args.amp,
                         "amp": amp, "device": device, "threads": threads,
                         "repeats": args.repeats, "bare_max_side": args.bare_max_side,
                         "bare_pad": args.bare_pad, "contenders": contenders,
                         "quick": args.quick},
              "rows": out_rows, "table": table}
    report.publish(result, Path(args.results), "compare", tag,
                   f"{args.model}, {args.size}^2 px, amp {amp}, {threads} thr, {device}",
                   lambda r: r["contender"] + (f" t{r['tile']}" if r["tile"] else ""),
                   f"{args.model}, {args.size}x{args.size} px ({px / 1e6:.1f} Mpx), amp {amp}, "
                   f"{threads} thread(s), {device}; {envmod.describe(env)}")
    if not args.keep:
        shutil.rmtree(rundir, ignore_errors=True)
    return result


def _segment_notes(row: dict, r: dict, amp: str, workers: int, threads: int) -> None:
    rep = r["report"]
    notes = [] if rep.get("exact", True) else ["APPROXIMATE stitching"]
    if workers:
        notes.append(f"{workers} workers x {max(1, threads // 2)} thread(s)")
    prec = rep.get("precision")
    if isinstance(prec, dict) and prec.get("amp") not in (None, amp):
        notes.append(f"segment ran amp {prec.get('amp')} (bare/monai: {amp})")
    row["notes"] = "; ".join(notes)


def _short(r: dict) -> str:
    parts = []
    if r.get("mpx_per_s") is not None:
        parts.append(f"{r['mpx_per_s']:.3g} Mpx/s ({r['seconds']:.3g} s)")
    parts.append(f"wall {r['wall']:.3g} s")
    rss = r.get("tree_peak_rss_mb") or r.get("peak_rss_mb")
    parts.append(f"peak RSS {rss:.0f} MB")
    if r.get("cuda_max_mem_mb") is not None:
        parts.append(f"CUDA max {r['cuda_max_mem_mb']:.0f} MB")
    return ", ".join(parts)
