"""`segcore models`: the registry, with parameter counts, input multiples and fields."""

from __future__ import annotations

import argparse
import json

from segcore.config import ModelSpec
from segcore.models import DESCRIPTIONS, build_model, count_parameters, known_models
from segcore.models.fields import input_multiple


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--in-channels", type=int, default=3)
    p.add_argument("--out-channels", type=int, default=1)
    p.add_argument("--json", action="store_true", help="machine-readable output")


def rows(in_channels: int = 3, out_channels: int = 1) -> list[dict]:
    out = []
    for name in known_models():
        model = build_model(ModelSpec(arch=name, in_channels=in_channels,
                                      out_channels=out_channels))
        out.append({"name": name, "parameters": count_parameters(model),
                    "input_multiple": input_multiple(model), "description": DESCRIPTIONS[name]})
    return out


def run(args: argparse.Namespace) -> int:
    table = rows(args.in_channels, args.out_channels)
    if args.json:
        print(json.dumps(table, indent=2))
        return 0
    print(f"{'name':<12} {'params':>12} {'multiple':>9}  description")
    for r in table:
        print(f"{r['name']:<12} {r['parameters']:>12,} {r['input_multiple']:>9}  {r['description']}")
    print(f"(defaults, {args.in_channels} in / {args.out_channels} out channels; "
          "unet defaults are the paper's depth 4, width 64)")
    return 0
