"""Test-time augmentation: every flip/rotation is mapped back to the image's own frame."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from segcore.config import Normalization
from segcore.errors import ConfigError
from segcore.training.predict import predict_image

RAW = Normalization(scale=1.0, mean=(0.0,), std=(1.0,))


class Shift(nn.Module):
    """logit(y, x) = image(y, x - 1): looks one pixel to the left (zero outside)."""

    input_multiple = 8  # forces padding of the odd, non-square test image in each orientation

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1, bias=False)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[0, 0, 1, 0] = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def test_tta_of_a_left_shift_averages_the_four_neighbours():
    rng = np.random.default_rng(0)
    img = rng.normal(size=(37, 53)).astype(np.float32)
    sig = 1 / (1 + np.exp(-img))
    plain = predict_image(Shift(), img, RAW)
    assert np.allclose(plain[5:-5, 5:-5], sig[5:-5, 4:-6], atol=1e-6)  # the model alone: left
    tta = predict_image(Shift(), img, RAW, tta="d8")
    assert tta.shape == img.shape
    # the 8 dihedral copies of "look left" look left, right, up and down twice each
    want = (sig[4:-6, 5:-5] + sig[6:-4, 5:-5] + sig[5:-5, 4:-6] + sig[5:-5, 6:-4]) / 4
    assert np.allclose(tta[5:-5, 5:-5], want, atol=1e-6)


def test_tta_leaves_a_symmetric_model_unchanged():
    model = nn.Conv2d(1, 1, 1)  # pointwise: commutes with every flip and rotation
    img = np.random.default_rng(1).normal(size=(20, 31)).astype(np.float32)
    assert np.allclose(predict_image(model, img, RAW, tta="d8"), predict_image(model, img, RAW),
                       atol=1e-6)


def test_hflip_tta_averages_left_and_right_and_bad_modes_are_refused():
    img = np.random.default_rng(2).normal(size=(24, 40)).astype(np.float32)
    sig = 1 / (1 + np.exp(-img))
    got = predict_image(Shift(), img, RAW, tta="hflip")
    assert np.allclose(got[3:-3, 3:-3], (sig[3:-3, 2:-4] + sig[3:-3, 4:-2]) / 2, atol=1e-6)
    with pytest.raises(ConfigError, match="tta"):
        predict_image(Shift(), img, RAW, tta="rot")
