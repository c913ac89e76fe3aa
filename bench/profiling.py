"""``python -m bench profile``: where ``segcore segment`` spends its time.

Runs ``pyinstrument -r text -o PROFILE.txt -m segcore segment SRC OUT --model CKPT --tile T
--halo auto --no-skip-background --amp A --workers 0 --quiet`` on a cached scene (in-process:
a statistical profile of Dask worker processes is not collected) and writes the text profile to
bench/results/profile-<tag>.txt, then prints its head. pyinstrument samples the main thread's
stack; time spent in other threads shows up as the main thread waiting on them.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

from bench import env as envmod
from bench import fixtures, procs, report


def run(args) -> dict:
    if importlib.util.find_spec("pyinstrument") is None:
        raise SystemExit("pyinstrument is not installed: pip install pyinstrument (or the "
                         ".[bench] extra) to profile")
    device = envmod.resolve_device(args.device)
    threads = args.threads or envmod.affinity()
    env = envmod.environment(threads, device)
    print(f"# {envmod.describe(env)}", flush=True)
    workdir = Path(args.workdir)
    tile = args.tile[0]
    tag = args.tag or report.tag_for("quick" if args.quick else None, args.model, args.size,
                                     f"t{tile}", args.amp, args.kind, device)
    rundir = workdir / "runs" / f"profile-{tag}"
    shutil.rmtree(rundir, ignore_errors=True)
    rundir.mkdir(parents=True)
    ckpt = fixtures.ensure_model(workdir, args.model)
    scene = fixtures.ensure_scene(workdir, args.kind, args.size)
    prof = report.result_path(Path(args.results), "profile", tag, ".txt")
    seg = procs.segment_command(scene, rundir / "out", ckpt, tile, args.amp, 0,
                                device if device.startswith("cuda") else "cpu")
    cmd = [sys.executable, "-m", "pyinstrument", "-r", "text", "-o", str(prof), *seg[1:]]
    log = rundir / "profile.log"
    r = procs.run_process(cmd, log, procs.child_env(threads))
    procs.check(r, log, "pyinstrument segcore segment")
    rep = json.loads((rundir / "out" / "report.json").read_text())
    result = {"comparison": "profile", "tag": tag, "environment": env, "command": " ".join(cmd),
              "profile": str(prof), "wall": r["wall"], "peak_rss_mb": r["peak_rss_mb"],
              "report": {k: rep.get(k) for k in ("seconds", "mpx_per_s", "tiles_run", "halo",
                                                  "exact", "timings", "precision")}}
    path = report.write_json(result, Path(args.results), "profile", tag)
    text = prof.read_text(errors="replace")
    print("\n".join(text.splitlines()[:args.lines]))
    print(f"\n# profile of {' '.join(seg[1:])}\n# wrote {prof} and {path}")
    if not args.keep:
        shutil.rmtree(rundir, ignore_errors=True)
    return result
