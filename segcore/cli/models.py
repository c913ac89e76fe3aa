"""`segcore models`: the shipped pretrained models (name, task, test score, scale), then the
architecture registry, with parameter counts, input multiples and fields.
`segcore models --card NAME` prints a shipped model's card."""

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
    p.add_argument("--card", metavar="NAME", help="print the model card of a shipped model")


def rows(in_channels: int = 3, out_channels: int = 1) -> list[dict]:
    out = []
    for name in known_models():
        model = build_model(ModelSpec(arch=name, in_channels=in_channels,
                                      out_channels=out_channels))
        out.append({"name": name, "parameters": count_parameters(model),
                    "input_multiple": input_multiple(model), "description": DESCRIPTIONS[name]})
    return out


def shipped_rows() -> list[dict]:
    from segcore.models.pretrained import shipped

    return [{"name": m.name, "task": m.task, "arch": m.arch, "test": m.score,
             "status": m.status, "pixel_size": m.pixel_size, "pixel_unit": m.pixel_unit,
             "channels": list(m.channels), "classes": list(m.classes),
             "data_licence": m.licence, "sha256": m.sha256, "file": str(m.path),
             "card": str(m.card_path)} for m in shipped().values()]


def run(args: argparse.Namespace) -> int:
    if args.card:
        from segcore.models.pretrained import card

        print(card(args.card))
        return 0
    table = rows(args.in_channels, args.out_channels)
    pre = shipped_rows()
    if args.json:
        print(json.dumps({"shipped": pre, "architectures": table}, indent=2))
        return 0
    unit = {"micrometer": "um/px", "meter": "m/px"}
    print("shipped models (--model NAME; `segcore models --card NAME` for the card):")
    for r in pre:
        scale = f"{r['pixel_size']:g} {unit.get(r['pixel_unit'], '')}" if r["pixel_size"] \
            else "any scale"
        weak = "  [WEAK: below its target, see the card]" if r["status"] == "weak" else ""
        print(f"  {r['name']:<14} {r['arch']:<7} {scale:<11} {r['task']}\n"
              f"  {'':<14} test: {r['test']}; data licence: {r['data_licence']}{weak}")
    if not pre:
        print("  (none in this installation)")
    print("\narchitectures (segcore train --arch NAME):")
    print(f"{'name':<12} {'params':>12} {'multiple':>9}  description")
    for r in table:
        print(f"{r['name']:<12} {r['parameters']:>12,} {r['input_multiple']:>9}  {r['description']}")
    print(f"(defaults, {args.in_channels} in / {args.out_channels} out channels; "
          "unet defaults are the paper's depth 4, width 64)")
    return 0
