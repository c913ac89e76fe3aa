"""U-Net (Ronneberger, Fischer, Brox 2015), returning logits.

``padding="valid"`` is the paper's own network: unpadded 3x3 convs, so a 572x572 input gives a
388x388 output and the skip connections are centre-cropped. ``padding="same"`` (default) keeps
the size, which needs the input to be a multiple of 2**depth.
"""

from __future__ import annotations

import torch
from torch import nn

from segcore.errors import ConfigError
from segcore.models.blocks import NORMS, ConvNormAct


class DoubleConv(nn.Sequential):
    def __init__(self, cin: int, cout: int, norm: str, pad: int):
        super().__init__(ConvNormAct(cin, cout, norm=norm, padding=pad),
                         ConvNormAct(cout, cout, norm=norm, padding=pad))


def _center_crop(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    dh, dw = (x.shape[2] - h) // 2, (x.shape[3] - w) // 2
    return x[:, :, dh:dh + h, dw:dw + w]


class UNet(nn.Module):
    def __init__(self, in_channels: int = 1, out_channels: int = 2, depth: int = 4,
                 width: int = 64, norm: str = "batch", padding: str = "same", pool: str = "max"):
        super().__init__()
        if not 1 <= depth <= 7:
            raise ConfigError(f"unet depth {depth} must be between 1 and 7")
        if width < 1:
            raise ConfigError(f"unet width {width} must be >= 1")
        if norm not in NORMS:
            raise ConfigError(f"unet norm {norm!r} must be one of {', '.join(NORMS)}")
        if padding not in ("same", "valid"):
            raise ConfigError(f"unet padding {padding!r} must be 'same' or 'valid'")
        self.depth, self.padding, self.norm = depth, padding, norm
        pad = 1 if padding == "same" else 0
        chans = [width * 2**i for i in range(depth + 1)]
        self.down = nn.ModuleList()
        cin = in_channels
        for c in chans:
            self.down.append(DoubleConv(cin, c, norm, pad))
            cin = c
        self.pool = nn.MaxPool2d(2) if pool == "max" else nn.AvgPool2d(2)
        self.up = nn.ModuleList(
            nn.ConvTranspose2d(chans[i + 1], chans[i], 2, stride=2) for i in reversed(range(depth))
        )
        self.up_conv = nn.ModuleList(
            DoubleConv(2 * chans[i], chans[i], norm, pad) for i in reversed(range(depth))
        )
        self.head = nn.Conv2d(chans[0], out_channels, 1)

    # -- what tiling needs -------------------------------------------------------------------
    @property
    def input_multiple(self) -> int:
        return 2**self.depth

    def valid_output_size(self, n: int) -> int:
        """Output edge for input edge ``n`` in valid mode (572 -> 388 for depth 4)."""
        if self.padding == "same":
            return n
        for _ in range(self.depth):
            n = n - 4
            if n <= 0 or n % 2:
                raise ConfigError(f"valid-mode input size gives an odd or empty map ({n})")
            n //= 2
        n -= 4
        for _ in range(self.depth):
            n = n * 2 - 4
        if n <= 0:
            raise ConfigError("valid-mode input too small: the output would be empty")
        return n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x)
            if i < self.depth:
                skips.append(x)
                x = self.pool(x)
        for up, conv in zip(self.up, self.up_conv, strict=True):
            x = up(x)
            skip = skips.pop()
            if skip.shape[2:] != x.shape[2:]:
                skip = _center_crop(skip, x.shape[2], x.shape[3])
            x = conv(torch.cat([skip, x], dim=1))
        return self.head(x)
