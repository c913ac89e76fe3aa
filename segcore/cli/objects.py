"""`segcore objects OUT [--connectivity 4|8] [--grow N]`: instances with global ids, and a table per
object, from a finished 'segcore segment' run."""

from __future__ import annotations

import argparse
import json

from segcore.cli.common import add_cluster_args, add_grow_args, client_from_args


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help="output prefix of a finished 'segcore segment' run")
    p.add_argument("--connectivity", type=int, choices=(4, 8), default=4,
                   help="pixels of one object touch by an edge (4, as scipy.ndimage.label) or "
                        "also by a corner (8)")
    add_grow_args(p)
    p.add_argument("--no-polygons", action="store_true",
                   help="skip the polygons (polygons.parquet; needed by the object exports)")
    p.add_argument("--simplify", type=float, default=0.0,
                   help="simplify polygons by this tolerance in pixels (0 = pixel-exact)")
    add_cluster_args(p)


def run(args: argparse.Namespace) -> int:
    from segcore.objects import extract_objects

    # without --workers/--scheduler: in this process, on lanes (processes for big results)
    with client_from_args(args, in_process_default=True) as (client, _):
        summary = extract_objects(args.out, connectivity=args.connectivity, client=client,
                                  progress=not args.quiet, polygons=not args.no_polygons,
                                  simplify=args.simplify, grow=args.grow,
                                  grow_threshold=args.grow_threshold)
    print(json.dumps({k: summary[k] for k in ("objects", "per_class", "files", "instances")},
                     indent=2))
    return 0
