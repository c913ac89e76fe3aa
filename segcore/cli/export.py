"""`segcore export OUT [--to FORMAT] [--what mask|probabilities] [--dst PATH]`: the mask as a
GeoTIFF for QGIS/GDAL (default), the mask or the probabilities as a COG or a pyramidal
OME-TIFF, or the objects as QuPath GeoJSON, GeoPackage, GeoParquet or WGS84 GeoJSON."""

from __future__ import annotations

import argparse


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help="output prefix of a finished 'segcore segment' run")
    p.add_argument("--to", default="geotiff",
                   choices=["geotiff", "cog", "ome-tiff", "qupath", "gpkg", "geoparquet",
                            "geojson"],
                   help="geotiff: the mask (QGIS, GDAL); cog: the mask as a Cloud-Optimized "
                        "GeoTIFF (512 blocks, nearest overviews, nodata 255), or --what "
                        "probabilities (one band per class, average overviews); ome-tiff: the "
                        "mask (or --what probabilities) as a pyramidal OME-TIFF for QuPath; "
                        "qupath: objects as QuPath GeoJSON "
                        "(pixels); gpkg / geoparquet: objects in the scene's CRS; geojson: "
                        "objects in WGS84 (RFC 7946). Object formats run the objects step "
                        "first when the result has none ('segcore objects' defaults)")
    p.add_argument("--level", type=int, default=0,
                   help="geotiff: pyramid level of the mask (0 = full resolution)")
    p.add_argument("--what", default="mask", choices=["mask", "probabilities"],
                   help="cog and ome-tiff: which array to write (default OUT/mask.cog.tif, "
                        "OUT/probabilities.cog.tif, OUT/<what>.ome.tif)")
    p.add_argument("--object-type", default="detection", choices=["detection", "annotation"],
                   help="qupath: import objects as detections (cells, counted) or annotations")
    p.add_argument("--dst", default=None,
                   help="where to write (local or s3://...; default OUT/mask.tif or "
                        "OUT/objects.<format>)")


def run(args: argparse.Namespace) -> int:
    from segcore.errors import ConfigError

    if args.to == "ome-tiff":
        from segcore.export import export_ome_tiff

        print(export_ome_tiff(args.out, dst=args.dst, what=args.what))
        return 0
    if args.to == "cog":
        from segcore.export import export_cog

        print(export_cog(args.out, dst=args.dst, what=args.what))
        return 0
    if args.to != "geotiff":
        import sys

        from segcore.io.uri import exists, join
        from segcore.objects.vectors import POLYGONS, export_vectors

        if exists(join(args.out, "COMPLETE")) and not exists(join(args.out, POLYGONS)):
            # the objects step has not run on this result: run it (what the user would do next)
            from segcore.objects import extract_objects

            print(f"{args.out}: no objects yet: running the objects step first (as 'segcore "
                  f"objects {args.out}')", file=sys.stderr)
            extract_objects(args.out)

        print(export_vectors(args.out, args.to, dst=args.dst, object_type=args.object_type))
        return 0
    from segcore.export import export_geotiff

    if args.level < 0:
        raise ConfigError(f"--level {args.level} must be >= 0")
    print(export_geotiff(args.out, dst=args.dst, level=args.level))
    return 0
