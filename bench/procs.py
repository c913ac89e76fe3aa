"""Running contenders in fresh processes: wall clock, the kernel's peak RSS (``os.wait4``'s
``ru_maxrss``: the process and the descendants it reaped, e.g. Dask workers) and, with psutil,
the sampled peak RSS summed over the whole process tree. Also the ``segcore segment`` contender
and the check of its output against the bare whole-image reference.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from bench.env import ROOT

_warned: set[str] = set()


def _note_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        print(f"# {msg}", flush=True)


def child_env(threads: int, torch_threads: int | None = None) -> dict[str, str]:
    """The environment every contender gets: the same thread count everywhere (OpenMP, MKL,
    segcore's SEGCORE_TORCH_THREADS, read by every worker that loads a model)."""
    env = dict(os.environ)
    n = str(threads)
    env.update(OMP_NUM_THREADS=n, MKL_NUM_THREADS=n,
               SEGCORE_TORCH_THREADS=str(torch_threads or threads),
               PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])]))
    return env


def tree_rss(proc) -> int:
    import psutil

    try:
        procs = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def base_tree(rev: str, workdir: Path) -> tuple[Path, str]:
    """A git worktree of ``rev`` under ``workdir`` (made once, detached): the "before" side of
    a before/after run, so both sides run interleaved on the same machine in one run.
    Returns (its root, the full commit)."""
    sha = subprocess.run(["git", "rev-parse", "--verify", f"{rev}^{{commit}}"], cwd=ROOT,
                         check=True, capture_output=True, text=True).stdout.strip()
    tree = workdir / "base" / sha[:12]
    if not (tree / "segcore" / "__init__.py").exists():
        shutil.rmtree(tree, ignore_errors=True)
        subprocess.run(["git", "worktree", "prune"], cwd=ROOT, check=True)
        subprocess.run(["git", "worktree", "add", "--detach", "-f", str(tree), sha], cwd=ROOT,
                       check=True, capture_output=True)
    return tree, sha


def in_tree(env: dict[str, str], tree: Path) -> dict[str, str]:
    """``env`` with ``tree``'s segcore first on the path (a base_tree's "before" code)."""
    rest = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(ROOT)]
    return {**env, "PYTHONPATH": os.pathsep.join([str(tree), *rest])}


def run_process(cmd: list[str], log: Path, env: dict[str, str], interval: float = 0.5,
                timeout: float | None = None, cwd: Path | None = None) -> dict:
    """Run ``cmd`` (output to ``log``) in ``cwd`` (default the repository); returns wall
    seconds, peak RSS (MB) and exit code."""
    try:
        import psutil
    except ImportError:
        psutil = None
        _note_once("psutil", "psutil is not installed: process-tree RSS is not sampled "
                             "(peak_rss_mb from wait4 only); pip install psutil")
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "wb") as fh:
        popen = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=cwd or ROOT,
                                 env=env)
        proc = psutil.Process(popen.pid) if psutil else None
        done = threading.Event()
        peak = [0]

        def watch() -> None:
            # RSS sampling and the timeout on a thread: the wall clock comes from the blocking
            # wait below, not from the sampling interval (polled, it was 0.5 s granular)
            while not done.wait(interval):
                if proc is not None:
                    peak[0] = max(peak[0], tree_rss(proc))
                if timeout is not None and time.perf_counter() - t0 > timeout:
                    popen.kill()

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        if proc is not None:
            peak[0] = tree_rss(proc)
        _, status, usage = os.wait4(popen.pid, 0)
        wall = time.perf_counter() - t0
        done.set()
        watcher.join()
        popen.returncode = os.waitstatus_to_exitcode(status)
        peak = peak[0]
    return {"wall": wall, "peak_rss_mb": usage.ru_maxrss * 1024 / 1e6,
            "tree_peak_rss_mb": peak / 1e6 if proc is not None else None,
            "returncode": popen.returncode}


def check(r: dict, log: Path, what: str) -> None:
    if r["returncode"] != 0:
        tail = log.read_text(errors="replace")[-4000:] if log.exists() else ""
        raise SystemExit(f"{what} failed (exit {r['returncode']}); log {log}:\n{tail}")


def run_worker(kind: str, args: list[str], log: Path, env: dict[str, str]) -> dict:
    """``python -m bench.worker KIND ARGS --json J``: its JSON result plus wall and RSS."""
    out = log.with_suffix(".json")
    out.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "bench.worker", kind, *args, "--json", str(out)]
    r = run_process(cmd, log, env)
    check(r, log, f"bench.worker {kind}")
    res = json.loads(out.read_text())
    return {**res, **r, "command": " ".join(cmd)}


def segment_command(scene: Path, out: Path, model: Path, tile: int, amp: str,
                    workers: int | None, device: str) -> list[str]:
    """``workers`` None: no --workers at all, the CLI's default."""
    return [sys.executable, "-m", "segcore", "segment", str(scene), str(out),
            "--model", str(model), "--tile", str(tile), "--halo", "auto",
            "--no-skip-background", "--amp", amp,
            *([] if workers is None else ["--workers", str(workers)]), "--quiet",
            "--device", device]


def run_segment(scene: Path, out: Path, model: Path, tile: int, amp: str, workers: int | None,
                device: str, log: Path, env: dict[str, str], keep: bool = False,
                cwd: Path | None = None) -> dict:
    """One ``segcore segment`` run from scratch (a previous OUT is deleted first, or the run
    would resume); wall clock and RSS of the process plus the report's own figures."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = segment_command(scene, out, model, tile, amp, workers, device)
    r = run_process(cmd, log, env, cwd=cwd)
    check(r, log, "segcore segment")
    report = json.loads((out / "report.json").read_text())
    keys = ("seconds", "mpx_per_s", "tiles_total", "tiles_run", "tiles_skipped_background",
            "tiles_resumed", "tile", "halo", "core", "receptive_field", "exact", "warnings",
            "timings", "precision")
    return {**r, "seconds": report["seconds"], "report": {k: report[k] for k in keys
                                                           if k in report},
            "command": " ".join(cmd)}


def deviation(out: Path, ref_file: Path) -> dict:
    """Segment's stored probabilities (uint8) and mask against the bare reference (the same
    quantisation: rint(p * 255)), over the reference region: max and mean absolute deviation
    in probability units, and label flips (mask vs bare >= 0.5)."""
    import zarr

    ref = np.load(ref_file)
    y0, y1, x0, x1 = (int(v) for v in ref["region"])
    root = zarr.open_group(str(out / "result.zarr"), mode="r")
    prob = np.asarray(root["0"][:, y0:y1, x0:x1])
    mask = np.asarray(root["labels/mask/0"][y0:y1, x0:x1])
    return compare_arrays(prob, mask, ref)


def compare_arrays(prob_u8: np.ndarray, mask: np.ndarray, ref) -> dict:
    """Deviation of (K, h, w) uint8 probabilities and an (h, w) mask from a reference npz
    (``prob`` uint8 and ``mask`` over ``region``)."""
    rp, rm = ref["prob"], ref["mask"]
    if prob_u8.shape != rp.shape or mask.shape != rm.shape:
        raise SystemExit(f"output shapes {prob_u8.shape}/{mask.shape} differ from the "
                         f"reference's {rp.shape}/{rm.shape}")
    d = np.abs(prob_u8.astype(np.int16) - rp.astype(np.int16))
    y0, y1, x0, x1 = (int(v) for v in ref["region"])
    return {"max_abs": float(d.max()) / 255 if d.size else 0.0,
            "mean_abs": float(d.mean()) / 255 if d.size else 0.0,
            "label_flips": int(np.count_nonzero(mask != rm)),
            "pixels": int(rm.size), "region": [y0, y1, x0, x1]}
