"""`segcore ingest SRC DST`: a scene into a sharded, multiscale OME-Zarr image."""

from __future__ import annotations

import argparse

from segcore.cli.common import add_channel_args, add_cluster_args, client_from_args, validated


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="scene: TIFF/SVS/OME-TIFF/GeoTIFF/PNG/JPEG/Zarr, local or s3://")
    p.add_argument("dst", help="output Zarr (local path or s3://bucket/key.zarr)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--level", type=int, help="pyramid level of the source (0 = full)")
    g.add_argument("--mpp", type=float, help="target pixel size (um/px slides, m/px scenes)")
    add_channel_args(p, ingest=True)
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--shard", type=int, default=2048)
    p.add_argument("--no-pyramid", action="store_true")
    add_cluster_args(p)


def run(args: argparse.Namespace) -> int:
    from segcore.io.ingest import IngestConfig, ingest

    cfg = validated(IngestConfig, src=args.src, dst=args.dst, level=args.level, mpp=args.mpp,
                    chunk=args.chunk, shard=args.shard, pyramid=not args.no_pyramid,
                    channels=args.channels, channel_names=args.channel_names)
    with client_from_args(args) as (client, _):
        out = ingest(cfg, client=client, progress=not args.quiet)
    print(out)
    return 0
