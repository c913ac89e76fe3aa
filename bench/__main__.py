"""segcore benchmark harness: bare model vs segment vs MONAI, the I/O ceiling, profiles.

``python -m bench compare|io|profile [options]``; bench/__init__.py says what each comparison
measures; ``--quick`` is the tiny configuration tests/test_bench.py runs."""

from __future__ import annotations

import argparse
import os
import sys

from bench import fixtures
from bench.report import RESULTS

# --quick: tiny scene, tiny model, one repetition, small tiles (explicit options still win)
QUICK = {"size": 256, "model": "unet-tiny", "repeats": 1, "tile": [128]}
DEFAULTS = {"size": 2048, "model": "unet-w16", "repeats": 3, "tile": [1024]}


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", type=int, default=None,
                   help="edge of the square RGB scene in px (default 2048; 8192 = 64 Mpx)")
    p.add_argument("--tile", type=int, action="append", default=None,
                   help="segment's --tile and MONAI's roi; repeat for several (default 1024)")
    p.add_argument("--repeats", type=int, default=None, help="repetitions (default 3)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch/OpenMP threads for every contender (default: CPUs in affinity)")
    p.add_argument("--device", default="auto",
                   help="auto (cuda when a GPU is visible, else cpu) | cpu | cuda")
    p.add_argument("--workdir", default=os.environ.get("SEGCORE_BENCH_DIR",
                                                       "/tmp/segcore-bench"),
                   help="cache of scenes and checkpoints, and scratch outputs")
    p.add_argument("--results", default=str(RESULTS),
                   help="where <comparison>-<tag>.json/.png go (default bench/results)")
    p.add_argument("--tag", default=None, help="result file tag (default: from the options)")
    p.add_argument("--keep", action="store_true", help="keep outputs and logs in the workdir")
    p.add_argument("--quick", action="store_true",
                   help="tiny run: 256 px scene, unet-tiny, tile 128, one repetition")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="comparison", required=True)
    c = sub.add_parser("compare", help="bare forward vs segment (0 and 2 workers) vs MONAI")
    _common(c)
    c.add_argument("--model", default=None, choices=list(fixtures.MODELS),
                   help="model (random weights, seed 0; default unet-w16)")
    c.add_argument("--amp", default="none", choices=["none", "bf16", "auto"],
                   help="precision: none = fp32, bf16 = autocast (channels_last in both, as segment)")
    c.add_argument("--contenders", default=None,
                   help="comma list of bare,segment,segment-w2,monai-0.25,monai-0.5 (default all)")
    c.add_argument("--bare-max-side", type=int, default=4096,
                   help="bare runs on a central crop of at most this side (extrapolated)")
    c.add_argument("--bare-pad", default="auto",
                   help="bare's mirror pad: auto = receptive-field radius (exact reference)")
    i = sub.add_parser("io", help="I/O ceiling: segment with a zero-cost model + floors")
    _common(i)
    i.add_argument("--kinds", default=",".join(fixtures.SCENE_KINDS),
                   help="scene kinds: tiff (zlib), svs (JPEG tiles), zarr")
    i.add_argument("--workers", default="0",
                   help="comma list of segment --workers values ('default': no --workers)")
    i.add_argument("--model", default="pointwise",
                   choices=["pointwise", *[m for m in fixtures.MODELS if m.startswith("sim-")]],
                   help="pointwise (zero cost) or a simulated accelerator of 20/60/200 Mpx/s")
    i.add_argument("--base", default=None, metavar="REV",
                   help="also run every segment contender from a git worktree of REV, "
                        "interleaved (before/after in one run)")
    p = sub.add_parser("profile", help="segcore segment under pyinstrument (text profile)")
    _common(p)
    p.add_argument("--model", default=None, choices=list(fixtures.MODELS))
    p.add_argument("--amp", default="none", choices=["none", "bf16", "auto"])
    p.add_argument("--kind", default="tiff", choices=list(fixtures.SCENE_KINDS))
    p.add_argument("--lines", type=int, default=60, help="profile lines to print")
    p.add_argument("--sampler", default="py-spy", choices=["py-spy", "pyinstrument"],
                   help="py-spy samples every thread (default, when installed); pyinstrument "
                        "only the main one")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    base = QUICK if args.quick else DEFAULTS
    for key, value in base.items():
        if getattr(args, key, "absent") is None:
            setattr(args, key, value)
    if args.repeats < 1:
        raise SystemExit("--repeats must be at least 1")
    if args.comparison == "compare":
        from bench import compare as mod
    elif args.comparison == "io":
        from bench import iocost as mod
    else:
        from bench import profiling as mod
    mod.run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
