"""Put a trained checkpoint into the package as a shipped model (maintainers only).

    python scripts/ship_model.py NAME CKPT --card docs/cards/NAME.md --task "..." \
        --score "..." --licence "..." [--status weak] [--fp32]

Writes ``segcore/models/shipped/NAME.safetensors`` (weights as float16 unless --fp32; integer
buffers unchanged), copies the card beside it and records the file's sha256, arch, pixel size,
channels and classes in ``index.json``. Prints the largest probability difference the float16
weights make on a seeded random input, so the card can say what fp16 costs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path

import torch

from segcore.io.uri import read_bytes
from segcore.models.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint

SHIPPED = Path(__file__).resolve().parents[1] / "segcore" / "models" / "shipped"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("name")
    ap.add_argument("ckpt")
    ap.add_argument("--card", required=True)
    ap.add_argument("--task", required=True)
    ap.add_argument("--score", required=True)
    ap.add_argument("--licence", required=True)
    ap.add_argument("--status", choices=("ok", "weak"), default="ok")
    ap.add_argument("--fp32", action="store_true")
    a = ap.parse_args()
    model, ck = load_checkpoint(a.ckpt)
    _, tensors = read_checkpoint(read_bytes(a.ckpt), a.ckpt)
    if not a.fp32:
        tensors = {k: v.half() if v.dtype == torch.float32 else v for k, v in tensors.items()}
        model16, _ = load_checkpoint(a.ckpt)
        model16.load_state_dict(tensors)
        x = torch.rand(1, ck.spec.in_channels, 256, 256, generator=torch.Generator().manual_seed(0))
        x = (x - 0.5) * 4
        with torch.no_grad():
            d = (torch.sigmoid(model(x)) - torch.sigmoid(model16(x))).abs().max().item()
        print(f"float16 weights: largest probability difference {d:.2e} on a random input")
    SHIPPED.mkdir(parents=True, exist_ok=True)
    out = SHIPPED / f"{a.name}.safetensors"

    class _Holder(torch.nn.Module):  # save_checkpoint takes a module; hand it the tensors
        def state_dict(self, *args, **kwargs):
            return tensors

    save_checkpoint(_Holder(), str(out), ck.contract, ck.spec,
                    {**ck.extra, "shipped_as": a.name, "trained_sha256": ck.sha256})
    shutil.copyfile(a.card, SHIPPED / f"{a.name}.md")
    index_path = SHIPPED / "index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {"models": {}}
    c = ck.contract
    index["models"][a.name] = {
        "file": out.name, "card": f"{a.name}.md",
        "sha256": hashlib.sha256(out.read_bytes()).hexdigest(), "arch": ck.spec.arch,
        "task": a.task, "pixel_size": c.pixel_size, "pixel_unit": c.pixel_unit,
        "channels": list(c.channel_names or [f"channel {i + 1}" for i in range(c.channels)]),
        "classes": list(c.class_names), "score": a.score, "status": a.status,
        "licence": a.licence}
    index["models"] = dict(sorted(index["models"].items()))
    index_path.write_text(json.dumps(index, indent=2) + "\n")
    print(f"{out} ({out.stat().st_size / 1e6:.2f} MB), sha256 {index['models'][a.name]['sha256']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
