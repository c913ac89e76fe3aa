"""`segcore export OUT [--level N] [--dst PATH]`: the mask as a GeoTIFF for QGIS/GDAL."""

from __future__ import annotations

import argparse


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help="output prefix of a finished 'segcore segment' run")
    p.add_argument("--level", type=int, default=0,
                   help="pyramid level of the mask (0 = full resolution; each level halves)")
    p.add_argument("--dst", default=None,
                   help="where to write the GeoTIFF (local or s3://...; default OUT/mask.tif)")


def run(args: argparse.Namespace) -> int:
    from segcore.errors import ConfigError
    from segcore.export import export_geotiff

    if args.level < 0:
        raise ConfigError(f"--level {args.level} must be >= 0")
    print(export_geotiff(args.out, dst=args.dst, level=args.level))
    return 0
