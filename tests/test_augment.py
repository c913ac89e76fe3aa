"""Augmentation: shapes, dtypes, alignment of image and mask, exactness of the rigid part."""

from __future__ import annotations

import torch

from segcore.training.augment import augment_batch, hed_jitter
from segcore.training.config import AugmentConfig

OFF = AugmentConfig(flips=False, rot90=False, elastic_sigma=0, brightness=0, contrast=0)


def _blobs(n: int = 4, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    m = (torch.rand(n, 1, size // 8, size // 8, generator=g) > 0.6).float()
    m = torch.nn.functional.interpolate(m, size=(size, size), mode="nearest")
    img = torch.cat([m * 0.8 + 0.1, 1 - m * 0.8, m * 0.5], dim=1)
    return img, m


def test_everything_off_is_identity():
    img, m = _blobs()
    a, b = augment_batch(img, m, OFF, torch.Generator().manual_seed(0))
    assert torch.allclose(a, img, atol=1e-6) and torch.equal(b, m)


def test_rigid_part_is_an_exact_flip_or_rotation_per_sample():
    img, m = _blobs(8)
    cfg = OFF.model_copy(update={"flips": True, "rot90": True})
    a, b = augment_batch(img, m, cfg, torch.Generator().manual_seed(3))
    for i in range(8):
        cands = [torch.rot90(t, k, dims=(1, 2)) for k in range(4)
                 for t in (m[i], torch.flip(m[i], dims=(2,)))]
        assert any(torch.equal(b[i], c) for c in cands), f"sample {i} is not a rigid transform"
    assert not all(torch.equal(b[i], m[i]) for i in range(8))  # something actually moved


def test_elastic_keeps_image_and_mask_aligned_shape_and_dtype():
    img, m = _blobs(6, 96)
    cfg = AugmentConfig(elastic_sigma=10, brightness=0, contrast=0)
    a, b = augment_batch(img, m, cfg, torch.Generator().manual_seed(0))
    assert a.shape == img.shape and b.shape == m.shape
    assert a.dtype == img.dtype and b.dtype == m.dtype
    assert set(b.unique().tolist()) <= {0.0, 1.0}
    # channel 0 is 0.1 + 0.8 * mask: warped with bilinear, it must agree with the nearest-warped
    # mask everywhere except on a thin rim along the edges
    agree = ((a[:, :1] > 0.5) == (b > 0.5)).float().mean()
    assert agree > 0.97, agree
    assert not torch.equal(b, m)  # and it did deform
    a2, b2 = augment_batch(img, m, cfg, torch.Generator().manual_seed(0))
    assert torch.equal(a, a2) and torch.equal(b, b2)  # deterministic from the generator


def test_intensity_and_stain_jitter_keep_range_and_mask():
    img, m = _blobs()
    cfg = OFF.model_copy(update={"brightness": 0.3, "contrast": 0.3, "gamma": 0.3,
                                 "hed_jitter": 0.1})
    a, b = augment_batch(img, m, cfg, torch.Generator().manual_seed(0))
    assert a.min() >= 0 and a.max() <= 1 and torch.equal(b, m)
    assert not torch.allclose(a, img)
    same = hed_jitter(img, 0.0, torch.Generator().manual_seed(0))
    assert torch.allclose(same, img, atol=1e-5)  # zero strength = identity round trip


def _roughness(size: int, cfg: AugmentConfig) -> float:
    """Mean |d displacement / dx| in px per px over many samples (the warp's local shear)."""
    from segcore.training.augment import sampling_grid

    g = sampling_grid(64, size, size, cfg, torch.Generator().manual_seed(0))
    disp_px = g[..., 0] * size / 2  # x displacement + identity, in pixels
    return float((disp_px[:, :, 1:] - disp_px[:, :, :-1] - 1).abs().mean())


def test_elastic_spacing_makes_the_warp_independent_of_patch_size():
    grid = OFF.model_copy(update={"elastic_sigma": 10})
    spaced = grid.model_copy(update={"elastic_spacing": 128})
    # a 3x3 grid squeezed into the patch shears a 64 px patch about 4x more than a 256 px one
    assert _roughness(64, grid) > 3 * _roughness(256, grid)
    # a fixed control-point spacing gives the same local shear whatever the patch size
    small, large = _roughness(64, spaced), _roughness(256, spaced)
    assert 0.6 < small / large < 1.6, (small, large)
    assert small > 0.01  # and it still deforms
