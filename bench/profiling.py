"""``python -m bench profile``: where ``segcore segment`` spends its time.

Runs ``pyinstrument -r text -o PROFILE.txt -m segcore segment SRC OUT --model CKPT --tile T
--halo auto --no-skip-background --amp A --workers 0 --quiet`` on a cached scene (in-process:
a statistical profile of Dask worker processes is not collected) and writes the text profile to
bench/results/profile-<tag>.txt, then prints its head. pyinstrument samples the main thread's
stack; time spent in other threads shows up as the main thread waiting on them. With
``--sampler py-spy`` (the default when py-spy is installed) every thread is sampled instead
(``py-spy record --threads --format raw``: collapsed stacks) and the summary lists, per
thread, its share of the samples and the functions it spent them in (self and inclusive), so
the reader, model and writer stages are seen side by side.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from collections import Counter
from pathlib import Path

from bench import env as envmod
from bench import fixtures, procs, report


def _py_spy() -> str | None:
    exe = Path(sys.executable).with_name("py-spy")
    return str(exe) if exe.exists() else shutil.which("py-spy")


def summarise_collapsed(path: Path, top: int = 12) -> str:
    """Per-thread summary of py-spy's raw (collapsed) stacks: samples per thread, then the
    functions with the most self samples and the segcore functions with the most inclusive
    samples."""
    threads: Counter = Counter()
    self_t: dict[str, Counter] = {}
    incl: dict[str, Counter] = {}
    for line in path.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        frames = stack.split(";")
        thread, frames = frames[0], frames[1:]
        threads[thread] += int(n)
        if frames:
            self_t.setdefault(thread, Counter())[frames[-1]] += int(n)
        for f in set(frames):
            if "segcore/" in f:
                incl.setdefault(thread, Counter())[f] += int(n)
    total = sum(threads.values()) or 1
    out = [f"{total} samples over {len(threads)} thread(s)"]
    for thread, n in threads.most_common():
        out.append(f"\n## {thread}: {n} samples ({100 * n / total:.1f}%)")
        out.append("self:")
        out += [f"  {100 * c / total:5.1f}%  {f}" for f, c in self_t.get(thread, Counter()).most_common(top)]
        out.append("inclusive (segcore):")
        out += [f"  {100 * c / total:5.1f}%  {f}" for f, c in incl.get(thread, Counter()).most_common(top)]
    return "\n".join(out) + "\n"


def run(args) -> dict:
    spy = _py_spy() if getattr(args, "sampler", "py-spy") == "py-spy" else None
    if spy is None and importlib.util.find_spec("pyinstrument") is None:
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
    if spy:
        raw = rundir / "stacks.txt"
        cmd = [spy, "record", "--threads", "--rate", "200", "--format", "raw", "--output",
               str(raw), "--", sys.executable, *seg[1:]]
    else:
        cmd = [sys.executable, "-m", "pyinstrument", "-r", "text", "-o", str(prof), *seg[1:]]
    log = rundir / "profile.log"
    # segment's console exit skips interpreter teardown, and with it pyinstrument's writer
    # (the text came out empty): the slow exit lets the profiler write its report
    r = procs.run_process(cmd, log, {**procs.child_env(threads), "SEGCORE_SLOW_EXIT": "1"})
    procs.check(r, log, "py-spy segcore segment" if spy else "pyinstrument segcore segment")
    if spy:
        prof.write_text(summarise_collapsed(raw))
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
