"""U2-Net and U2-NetP (Qin et al. 2020), plus the recurrent-RSU variants; logits out.

One class, driven by a stage table: (height, in, mid, out, dilated) for the six encoder
stages and five decoder stages. ``forward`` returns the fused logits; ``forward_all`` also
returns the six side outputs (upsampled to the input size) for deep supervision in training.
"""

from __future__ import annotations

import torch
from torch import nn

from segcore.models.blocks import RSU, ConvFactory, plain_conv, pool2x, upsample_like

Stage = tuple[int, int, int, int, bool]  # height, in, mid, out, dilated

U2NET_FULL: tuple[list[Stage], list[Stage]] = (
    [(7, 3, 32, 64, False), (6, 64, 32, 128, False), (5, 128, 64, 256, False),
     (4, 256, 128, 512, False), (4, 512, 256, 512, True), (4, 512, 256, 512, True)],
    [(4, 1024, 256, 512, True), (4, 1024, 128, 256, False), (5, 512, 64, 128, False),
     (6, 256, 32, 64, False), (7, 128, 16, 64, False)],
)
U2NET_SMALL: tuple[list[Stage], list[Stage]] = (
    [(7, 3, 16, 64, False), (6, 64, 16, 64, False), (5, 64, 16, 64, False),
     (4, 64, 16, 64, False), (4, 64, 16, 64, True), (4, 64, 16, 64, True)],
    [(4, 128, 16, 64, True), (4, 128, 16, 64, False), (5, 128, 16, 64, False),
     (6, 128, 16, 64, False), (7, 128, 16, 64, False)],
)


class U2Net(nn.Module):
    input_multiple = 32

    def __init__(self, table: tuple[list[Stage], list[Stage]], in_channels: int = 3,
                 out_channels: int = 1, conv: ConvFactory | None = None, pool: str = "max"):
        super().__init__()
        conv = conv or plain_conv()
        self.table, self.conv_factory = table, conv  # kept so fields.py can build a narrow twin
        enc, dec = table
        self.encoders = nn.ModuleList(
            RSU(h, in_channels if i == 0 else cin, mid, cout, dil, conv, pool)
            for i, (h, cin, mid, cout, dil) in enumerate(enc)
        )
        self.pool = pool
        self.decoders = nn.ModuleList(RSU(h, cin, mid, cout, dil, conv, pool)
                                      for h, cin, mid, cout, dil in dec)
        # side outputs: from the last encoder (deepest) and each decoder stage
        side_ch = [d[3] for d in reversed(dec)] + [enc[-1][3]]
        self.sides = nn.ModuleList(nn.Conv2d(c, out_channels, 3, padding=1) for c in side_ch)
        self.fuse = nn.Conv2d(len(side_ch) * out_channels, out_channels, 1)

    def forward_all(self, x: torch.Tensor) -> list[torch.Tensor]:
        """[fused, side1, ..., side6], all logits at the input size."""
        feats = []
        h = x
        n = len(self.encoders)
        for i, stage in enumerate(self.encoders):
            h = stage(h)
            feats.append(h)
            if i < n - 1:
                h = pool2x(h, self.pool)
        h = feats[-1]
        dec_out = []
        for stage, skip in zip(self.decoders, reversed(feats[:-1]), strict=True):
            h = stage(torch.cat([upsample_like(h, skip), skip], dim=1))
            dec_out.append(h)
        # side k (1 = finest) comes from decoder output at that scale; side 6 from the deepest stage
        side_feats = list(reversed(dec_out)) + [feats[-1]]
        sides = [upsample_like(s(f), x) for s, f in zip(self.sides, side_feats, strict=True)]
        fused = self.fuse(torch.cat(sides, dim=1))
        return [fused, *sides]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_all(x)[0]
