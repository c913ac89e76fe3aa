"""Losses: Dice+BCE, the U-Net border weight map, U2-Net deep supervision."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segcore.training.losses import (
    bce_loss,
    border_weight_map,
    deep_supervision_loss,
    dice_loss,
    seg_loss,
)


def test_dice_and_bce_reach_zero_on_confident_correct_logits():
    t = torch.zeros(2, 1, 8, 8)
    t[:, :, 2:6, 2:6] = 1
    logits = (t * 2 - 1) * 30
    assert dice_loss(logits, t) < 1e-3 and bce_loss(logits, t) < 1e-6
    assert seg_loss(-logits, t) > 1.5  # wrong everywhere: Dice ~1 plus a large BCE


def test_dice_is_per_sample_so_batch_halves_average_to_the_whole():
    g = torch.Generator().manual_seed(0)
    logits, t = torch.randn(4, 1, 8, 8, generator=g), (torch.rand(4, 1, 8, 8, generator=g) > .5)
    whole = seg_loss(logits, t)
    halves = (seg_loss(logits[:2], t[:2]) + seg_loss(logits[2:], t[2:])) / 2
    assert torch.allclose(whole, halves, atol=1e-6)


def test_border_weight_is_high_in_the_gap_between_touching_squares():
    lab = np.zeros((40, 60), np.int32)
    lab[10:30, 8:28] = 1
    lab[10:30, 30:50] = 2      # a 2-pixel gap at columns 28, 29
    w = border_weight_map(lab, w0=10, sigma=5)
    gap = w[20, 28:30].min()
    far = w[2, 2]              # background far from both objects
    assert gap > far + 8       # w0 * exp(-(1+2)^2 / 50) ~ 8.4 above the class weight
    assert w[20, 15] == pytest.approx(w[25, 40])  # inside objects: class weight only
    assert w.dtype == np.float32 and w.shape == lab.shape
    # touching binary squares are separated by labelling first: a binary mask of two
    # squares with a gap gives the same map
    assert np.allclose(border_weight_map(lab > 0), w)


def test_deep_supervision_sums_seven_equal_terms():
    t = (torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    outs = [torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(i))
            for i in range(7)]
    total = deep_supervision_loss(outs, t)
    assert torch.allclose(total, sum(seg_loss(o, t) for o in outs))
    same = deep_supervision_loss([outs[0]] * 7, t)
    assert torch.allclose(same, 7 * seg_loss(outs[0], t))
