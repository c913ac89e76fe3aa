"""`segcore segment SRC DST --model CKPT`: segment a scene of any size, tile by tile."""

from __future__ import annotations

import argparse
import sys

from segcore.cli.common import (
    add_channel_args,
    add_cluster_args,
    add_grow_args,
    client_from_args,
    validated,
)


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="scene: TIFF/SVS/OME-TIFF/GeoTIFF/PNG/JPEG/Zarr, local or s3://")
    p.add_argument("dst", help="output prefix (local directory or s3://bucket/prefix)")
    p.add_argument("--model", required=True,
                   help="a shipped model by name (`segcore models`: nuclei-he, ...) or a "
                        "checkpoint URI (segcore safetensors, local or s3://)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--level", type=int, help="pyramid level of the source (0 = full)")
    g.add_argument("--mpp", type=float, help="target pixel size (um/px slides, m/px scenes)")
    add_channel_args(p)
    p.add_argument("--tile", default="1024",
                   help="model window edge in px (default 1024), or 'auto': the largest window "
                        "the device's memory budget holds (GPU free memory; 25%% of available "
                        "RAM on CPU; SEGCORE_MEMORY_BUDGET overrides)")
    p.add_argument("--halo", default="auto",
                   help="context pixels around each core; 'auto' = receptive field (exact)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--amp", default="auto", choices=["auto", "none", "bf16", "fp16"],
                   help="precision: auto = bf16 on CUDA and on CPUs with AMX/AVX-512-BF16, "
                        "fp32 elsewhere (the report says which and why)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model (compiles once per window shape; off by "
                        "default: see docs/BENCHMARKS.md for when it pays)")
    p.add_argument("--blend", action="store_true",
                   help="blend overlapping windows (smooths seams when the halo is smaller than "
                        "the receptive field; up to 9x compute)")
    p.add_argument("--foreground", default="auto", choices=["auto", "tissue", "nonzero", "all"])
    p.add_argument("--no-skip-background", action="store_true",
                   help="run the model on every tile, foreground or not")
    p.add_argument("--prob-dtype", default="uint8", choices=["uint8", "float16"])
    p.add_argument("--shards-per-task", type=int, default=4)
    p.add_argument("--lanes", default="auto",
                   help="without Dask: shard tasks run side by side on threads of this "
                        "process, sharing the model (default auto: the cores it may use, at "
                        "most 4)")
    p.add_argument("--objects", action="store_true",
                   help="also find objects (instances with global ids across shards) and write "
                        "objects.parquet/.csv; counts go into the report")
    p.add_argument("--connectivity", type=int, choices=(4, 8), default=4,
                   help="objects: pixels touch by an edge (4) or also by a corner (8)")
    add_grow_args(p)
    p.add_argument("--seams", type=int, default=0, metavar="N",
                   help="seam report: check N sampled shards (recomputed with a larger halo, "
                        "or in --blend mode neighbouring windows compared); figures in the "
                        "report, heat map in seams.png")
    p.add_argument("--export", action="append", default=[], metavar="FORMAT",
                   choices=["geotiff", "cog", "ome-tiff", "qupath", "gpkg", "geoparquet",
                            "geojson"],
                   help="also write this export beside the result (repeatable); object "
                        "formats (qupath, gpkg, geoparquet, geojson) need --objects")
    add_cluster_args(p)


def run(args: argparse.Namespace) -> int:
    from segcore.pipeline import SegmentConfig, segment

    halo = args.halo if args.halo == "auto" else _int(args.halo, "--halo")
    tile = args.tile if args.tile == "auto" else _int(args.tile, "--tile")
    cfg = validated(SegmentConfig, src=args.src, out=args.dst, model=args.model,
                    level=args.level, mpp=args.mpp, channels=args.channels,
                    channel_names=args.channel_names, tile=tile, halo=halo, compile=args.compile,
                    batch=args.batch, device=args.device, amp=args.amp,
                    foreground=args.foreground, skip_background=not args.no_skip_background,
                    blend=args.blend, prob_dtype=args.prob_dtype, shards_per_task=args.shards_per_task,
                    lanes=args.lanes if args.lanes == "auto" else _int(args.lanes, "--lanes"),
                    objects=args.objects, connectivity=args.connectivity, grow=args.grow,
                    grow_threshold=args.grow_threshold, seams=args.seams,
                    exports=tuple(args.export))
    # one host and no --workers: in this process, on lanes (faster than local Dask workers,
    # which pay a cluster's start and a model per process; docs/BENCHMARKS.md)
    with client_from_args(args, in_process_default=True) as (client, resources):
        report = segment(cfg, client=client, resources=resources, progress=not args.quiet)
    for w in report.warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(f"{report.tiles_run} tiles run, {report.tiles_skipped_background} background, "
          f"{report.tiles_resumed} resumed of {report.tiles_total}; {report.seconds:.1f} s, "
          f"{report.mpx_per_s:.2f} Mpx/s; {'exact' if report.exact else 'APPROXIMATE'} "
          f"stitching (halo {report.halo}, field {report.receptive_field})")
    print(report.uris["report"])
    return 0


def _int(v: str, flag: str) -> int:
    from segcore.errors import ConfigError

    try:
        return int(v)
    except ValueError:
        raise ConfigError(f"{flag} {v!r} must be a whole number or 'auto'") from None
