"""What tiling needs from a model: its input multiple and its receptive-field radius.

The radius is *measured*, not guessed. The field is a property of the geometry (kernels,
dilations, pools, upsamplings), not of the channel counts, so the probe runs on a one-channel
twin of the architecture (fast even for U2-Net's 6,500 px field). On that twin, weights made positive
(so no ReLU is ever silent and no path cancels), the gradient of one central output pixel is
taken with respect to a wide strip of random positive input; the support of that gradient,
unioned over a few inputs (max-pool routes the gradient to one pixel per window), is the
receptive field. Convolutions here are square, so one strip per axis gives both radii.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn

from segcore.config import ModelSpec


@dataclass(frozen=True)
class ReceptiveField:
    left: int  # pixels before the output pixel that can influence it
    right: int  # pixels after it
    is_global: bool = False  # a normalisation over the whole map: no finite field

    @property
    def radius(self) -> int:
        return max(self.left, self.right)

    @property
    def size(self) -> int:
        return self.left + self.right + 1


# group/instance/layer norm compute statistics over the whole map: every output pixel depends
# on every input pixel, so no halo makes tiling exact (blended stitching is the only option)
GLOBAL_NORMS = (nn.GroupNorm, nn.InstanceNorm2d, nn.LayerNorm)
MAX_PROBE_WIDTH = 1 << 16


def input_multiple(model: nn.Module) -> int:
    return int(getattr(model, "input_multiple", 1))


def _positive_copy(model: nn.Module) -> nn.Module:
    # positive, fan-in-normalised weights keep activations near 1 through any depth, so no
    # path overflows, underflows or cancels; float64 keeps far-away gradients non-zero
    probe = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        for mod in probe.modules():
            if isinstance(mod, nn.Conv2d | nn.ConvTranspose2d):
                fan_in = mod.weight[0].numel() if isinstance(mod, nn.Conv2d) else mod.weight.shape[0]
                mod.weight.copy_((1.0 + mod.weight.abs()) / (2 * fan_in))
                if mod.bias is not None:
                    mod.bias.fill_(0.01)
            elif isinstance(mod, nn.modules.batchnorm._BatchNorm):
                mod.running_mean.zero_()
                mod.running_var.fill_(1.0)
                mod.weight.fill_(1.0)
                mod.bias.fill_(0.01)
            elif isinstance(mod, nn.GroupNorm) and mod.affine:
                mod.weight.fill_(1.0)
                mod.bias.fill_(0.01)
    return probe


def narrow_twin(model: nn.Module) -> tuple[nn.Module, int]:
    """(one-channel copy of the architecture, its input channels); same geometry, tiny cost."""
    from segcore.models.u2net import U2Net
    from segcore.models.unet import UNet

    if isinstance(model, UNet):
        twin = UNet(1, 1, depth=model.depth, width=1, norm=model.norm, padding=model.padding,
                    pool="avg")
        return twin, 1
    if isinstance(model, U2Net):
        enc, dec = model.table
        narrow = ([(h, 1, 1, 1, d) for h, _, _, _, d in enc],
                  [(h, 2, 1, 1, d) for h, _, _, _, d in dec])
        return U2Net(narrow, 1, 1, conv=model.conv_factory, pool="avg"), 1
    return model, int(getattr(getattr(model, "spec", None), "in_channels", 1))


def measure_receptive_field(model: nn.Module, in_channels: int | None = None, width: int = 0,
                            trials: int = 0, seed: int = 0, twin: bool = True) -> ReceptiveField:
    """Measure the horizontal receptive field of ``model`` (same-padding models)."""
    if any(isinstance(mod, GLOBAL_NORMS) for mod in model.modules()):
        return ReceptiveField(0, 0, is_global=True)
    if twin:
        model, in_channels = narrow_twin(model)
        trials = trials or 1  # avg-pool twin: one probe sees the whole support
    trials = trials or 3
    in_channels = in_channels or 1
    m = input_multiple(model)
    width = width or max(1024, 64 * m)
    probe = _positive_copy(model)
    height = 2 * m
    gen = torch.Generator().manual_seed(seed)
    # every phase of the pooling grid can have its own field: sample b of the batch carries
    # the gradient of output pixel c + b (samples are independent in eval mode)
    c = (width // 2 // m) * m
    left = right = 0
    lo, hi = width, -1
    for _ in range(trials):
        x = torch.rand(m, in_channels, height, width, generator=gen, dtype=torch.float64) + 0.1
        x.requires_grad_(True)
        y = probe(x)
        if y.shape[-1] != width:
            raise ValueError("measure_receptive_field needs a same-padding model")
        y[torch.arange(m), 0, height // 2, c + torch.arange(m)].sum().backward()
        support = x.grad.abs().sum(dim=(1, 2)) > 0  # (phase, column)
        for b in range(m):
            idx = torch.nonzero(support[b]).flatten()
            if idx.numel() == 0:
                raise ValueError("receptive field probe found no gradient (constant output?)")
            left, right = max(left, c + b - int(idx.min())), max(right, int(idx.max()) - c - b)
            lo, hi = min(lo, int(idx.min())), max(hi, int(idx.max()))
    if (lo == 0 or hi == width - 1) and width < MAX_PROBE_WIDTH:
        # the field reaches the strip's edge: measure again on a wider strip
        return measure_receptive_field(model, in_channels, width * 2, trials, seed, twin=False)
    return ReceptiveField(left, right)


def receptive_field_for_spec(spec: ModelSpec) -> ReceptiveField:
    """Cached per architecture spec (weights do not change the field)."""
    return _field_for_json(spec.model_dump_json())


@lru_cache(maxsize=32)
def _field_for_json(spec_json: str) -> ReceptiveField:
    from segcore.models.registry import build_model

    spec = ModelSpec.model_validate_json(spec_json)
    return measure_receptive_field(build_model(spec), spec.in_channels)


def _cache_file():
    import os
    from pathlib import Path

    base = os.environ.get("SEGCORE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "segcore")
    return Path(base) / "receptive_fields.json"


def cached_receptive_field(spec: ModelSpec) -> ReceptiveField:
    """``receptive_field_for_spec`` with a small on-disk cache (U2-Net's probe takes a minute
    or so; U-Net's well under a second). The key is the architecture, never the weights."""
    import json
    import os

    key = ModelSpec(arch=spec.arch, in_channels=spec.in_channels, out_channels=1,
                    kwargs=spec.kwargs).model_dump_json()
    path = _cache_file()
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):
        table = {}
    if key in table:
        return ReceptiveField(**table[key])
    field = receptive_field_for_spec(ModelSpec.model_validate_json(key))
    table[key] = {"left": field.left, "right": field.right, "is_global": field.is_global}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(table, indent=1))
        tmp.replace(path)
    except OSError:
        pass  # a read-only home only costs the probe again next time
    return field
