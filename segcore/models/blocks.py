"""Building blocks shared by every architecture: conv units, the recurrent conv, and the RSU.

The residual U-block (RSU) of U2-Net is written once, parametrically: height L (7..4) with
pooling, or the dilated "F" variant (RSU-4F). Its conv unit is a factory argument, which is how
the recurrent variant (R2U-Net's recurrent conv layer) reuses the same block.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from segcore.errors import ConfigError

NORMS = ("batch", "group", "none")


def make_norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        groups = next(g for g in (8, 4, 2, 1) if channels % g == 0)
        return nn.GroupNorm(groups, channels)
    if kind == "none":
        return nn.Identity()
    raise ConfigError(f"norm {kind!r} is not one of {', '.join(NORMS)}")


class ConvNormAct(nn.Module):
    """3x3 conv (optionally dilated) -> norm -> ReLU; 'same' padding keeps the size."""

    def __init__(self, cin: int, cout: int, dilation: int = 1, norm: str = "batch",
                 padding: int | None = None):
        super().__init__()
        pad = dilation if padding is None else padding
        self.conv = nn.Conv2d(cin, cout, 3, padding=pad, dilation=dilation, bias=norm == "none")
        self.norm = make_norm(norm, cout)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


class RecurrentConv(nn.Module):
    """R2U-Net's recurrent conv layer (Alom et al. 2018) in place of one conv unit.

    A 1x1 conv maps cin -> cout when they differ; then one conv unit is applied t+1 times,
    each time on (input + previous state): x1 = f(x); x1 = f(x + x1) repeated t times.
    """

    def __init__(self, cin: int, cout: int, dilation: int = 1, norm: str = "batch", t: int = 2):
        super().__init__()
        if t < 1:
            raise ConfigError(f"recurrent steps t={t} must be >= 1")
        self.t = t
        self.proj = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        self.unit = ConvNormAct(cout, cout, dilation=dilation, norm=norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        h = self.unit(x)
        for _ in range(self.t):
            h = self.unit(x + h)
        return h


ConvFactory = Callable[[int, int, int], nn.Module]


def plain_conv(norm: str = "batch") -> ConvFactory:
    return lambda cin, cout, d: ConvNormAct(cin, cout, dilation=d, norm=norm)


def recurrent_conv(norm: str = "batch", t: int = 2) -> ConvFactory:
    return lambda cin, cout, d: RecurrentConv(cin, cout, dilation=d, norm=norm, t=t)


def pool2x(x: torch.Tensor, kind: str = "max") -> torch.Tensor:
    """2x2/2 pooling, ceil mode. "avg" has the same dependency support as "max" (every pixel of
    the window) without routing gradients to one pixel: the receptive-field probe uses it."""
    if kind == "avg":
        return F.avg_pool2d(x, 2, 2, ceil_mode=True)
    return F.max_pool2d(x, 2, 2, ceil_mode=True)


def upsample_like(src: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return F.interpolate(src, size=ref.shape[2:], mode="bilinear", align_corners=False)


class RSU(nn.Module):
    """Residual U-block of height ``height`` (Qin et al. 2020).

    Pooled (RSU-7..RSU-4): an input conv, then ``height - 1`` encoder convs with 2x2 max-pools
    between them, a dilation-2 conv at the bottom, and a mirrored decoder; the output adds the
    input conv's features (the residual). Dilated (RSU-4F): no pooling, dilations 1, 2, 4, 8 down
    and 4, 2, 1 up, so resolution never drops (used where the maps are already small).
    """

    def __init__(self, height: int, cin: int, mid: int, cout: int, dilated: bool = False,
                 conv: ConvFactory | None = None, pool: str = "max"):
        super().__init__()
        self.pool = pool
        if height < 2:
            raise ConfigError(f"RSU height {height} must be >= 2")
        conv = conv or plain_conv()
        self.height, self.dilated = height, dilated
        self.conv_in = conv(cin, cout, 1)
        if dilated:
            enc_d = [2**i for i in range(height)]  # 1, 2, 4, 8 for RSU-4F
        else:
            enc_d = [1] * (height - 1) + [2]
        self.enc = nn.ModuleList(
            conv(cout if i == 0 else mid, mid, d) for i, d in enumerate(enc_d)
        )
        dec_d = list(reversed(enc_d[:-1]))  # decoders mirror the encoders above the bottom
        self.dec = nn.ModuleList(
            conv(2 * mid, cout if i == len(dec_d) - 1 else mid, d) for i, d in enumerate(dec_d)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hin = self.conv_in(x)
        skips = []
        h = hin
        n = len(self.enc)
        for i, layer in enumerate(self.enc):
            h = layer(h)
            if i < n - 1:
                skips.append(h)
                if not self.dilated and i < n - 2:
                    h = pool2x(h, self.pool)
        for layer in self.dec:
            skip = skips.pop()
            if not self.dilated and h.shape[2:] != skip.shape[2:]:
                h = upsample_like(h, skip)
            h = layer(torch.cat([h, skip], dim=1))
        return h + hin
