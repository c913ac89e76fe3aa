"""``segcore evaluate``: score a checkpoint on labelled data -> JSON (per image and mean)."""

from __future__ import annotations

import argparse
import json

from segcore.cli.train import _class_map


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="a shipped model by name (`segcore models`) or a checkpoint URI")
    p.add_argument("--data", required=True, help="folder with images/ + masks/ (local or s3://)")
    p.add_argument("--stems", help="e.g. 25-29 or 0251-0300")
    p.add_argument("--class-map", type=_class_map, help="default: the checkpoint's")
    p.add_argument("--rand-regions", choices=("foreground", "background"))
    p.add_argument("--tiled", action="store_true", help="predict through the tiled pipeline")
    p.add_argument("--tile", type=int, default=512)
    p.add_argument("--tta", choices=("d8", "hflip"),
                   help="test-time augmentation: d8 = 8 flips/rotations (EM, pathology), "
                   "hflip = image + mirror (photos); whole-image path only")
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--threads", type=int)
    p.add_argument("--out", help="folder for metrics.json and worst-case overlay PNGs")
    p.add_argument("--worst", type=int, default=3)
    p.add_argument("--per-image", action="store_true", help="print per-image rows too")


def run(args: argparse.Namespace) -> int:
    import torch

    from segcore.evaluate import evaluate

    if args.threads:
        torch.set_num_threads(args.threads)
    res = evaluate(args.model, args.data, tiled=args.tiled, stems=args.stems,
                   class_map=args.class_map, rand_regions=args.rand_regions, out=args.out,
                   worst=args.worst, device=args.device, tile=args.tile, bf16=args.bf16,
                   tta=args.tta)
    if not args.per_image:
        res = {k: v for k, v in res.items() if k != "images"}
    print(json.dumps(res, indent=2))
    return 0
