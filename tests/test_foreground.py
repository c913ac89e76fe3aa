"""Foreground at low resolution: tissue, nonzero, all, auto; pyramid use; tile test."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from PIL import Image

from segcore.errors import ConfigError
from segcore.foreground import foreground_mask, otsu_threshold, tile_has_foreground
from segcore.io.readers import open_scene
from tests.conftest import shared_dataset

RNG = np.random.default_rng(3)


def _slide(h=600, w=500):
    """Glass (near white, grey noise) with a pink-purple 'tissue' disc; returns (rgb, disc)."""
    yy, xx = np.mgrid[:h, :w]
    disc = (yy - h * 0.45) ** 2 + (xx - w * 0.5) ** 2 < (min(h, w) * 0.3) ** 2
    img = np.empty((h, w, 3), np.uint8)
    img[...] = 240 + RNG.integers(0, 10, (h, w, 1), dtype=np.uint8)
    tissue = np.array([200, 110, 170], np.int16) + RNG.integers(-25, 25, (h, w, 3))
    img[disc] = np.clip(tissue[disc], 0, 255).astype(np.uint8)
    return img, disc


def _iou(a, b):
    return (a & b).sum() / (a | b).sum()


def test_tissue_mask_on_synthetic_slide(tmp_path):
    img, disc = _slide()
    tifffile.imwrite(tmp_path / "s.tif", img, tile=(64, 64), photometric="rgb")
    with open_scene(str(tmp_path / "s.tif")) as scene:
        for kind in ("tissue", "auto"):  # auto: RGB with a bright background -> tissue
            mask, factor = foreground_mask(scene, kind=kind, max_side=1024)
            assert factor == 1.0 and mask.shape == disc.shape and mask.dtype == bool
            assert _iou(mask, disc) > 0.97
        mask, factor = foreground_mask(scene, kind="tissue", max_side=100)  # block means
    assert factor == 6.0 and mask.shape == (100, 84)
    assert _iou(mask, disc[::6, ::6]) > 0.9


def test_mask_uses_coarse_pyramid_level_and_never_full_resolution(tmp_path):
    img, disc = _slide(512, 512)
    p = tmp_path / "pyr.tif"
    with tifffile.TiffWriter(p) as tw:
        tw.write(img, tile=(64, 64), compression="zlib", subifds=2, photometric="rgb")
        tw.write(img[::2, ::2], tile=(64, 64), compression="zlib", subfiletype=1, photometric="rgb")
        tw.write(img[::8, ::8], tile=(64, 64), compression="zlib", subfiletype=1, photometric="rgb")
    # break every full-resolution tile: the mask must come from the pyramid alone
    with tifffile.TiffFile(p) as t:
        spans = list(zip(t.pages[0].dataoffsets, t.pages[0].databytecounts, strict=True))
    raw = bytearray(p.read_bytes())
    for off, n in spans:
        raw[off : off + n] = b"\x00" * n
    p.write_bytes(bytes(raw))
    with open_scene(str(p)) as scene:
        mask, factor = foreground_mask(scene, kind="tissue", max_side=64)
        assert (mask.shape, factor) == ((64, 64), 8.0)
        assert _iou(mask, disc[::8, ::8]) > 0.85
        mask, factor = foreground_mask(scene, kind="tissue", max_side=200)  # level 1, 2x2 blocks
        assert (mask.shape, factor) == ((128, 128), 4.0)
    with open_scene(str(p), level=1) as scene:  # factors are relative to the scene's level
        mask, factor = foreground_mask(scene, kind="tissue", max_side=64)
        assert (mask.shape, factor) == ((64, 64), 4.0)


def test_nonzero_is_exact_block_any_with_nodata(tmp_path):
    a = RNG.integers(1, 1000, (203, 157, 2), dtype=np.uint16)
    a[:50] = 7  # nodata collar on top
    a[120:, 100:] = 7
    a[150, 120, 1] = 9  # one valid band in the nodata corner
    tags = [(42113, "s", 0, "7", True)]
    tifffile.imwrite(
        tmp_path / "n.tif",
        a,
        extratags=tags,
        tile=(32, 32),
        photometric="minisblack",
        planarconfig="contig",
    )
    with open_scene(str(tmp_path / "n.tif")) as scene:
        assert scene.info.nodata == 7.0
        mask, factor = foreground_mask(scene)  # auto: nodata -> nonzero
        np.testing.assert_array_equal(mask, (a != 7).any(-1))
        mask, factor = foreground_mask(scene, kind="nonzero", max_side=20)
    s = 11  # ceil(203 / 20)
    assert factor == s and mask.shape == (19, 15)
    valid = np.zeros((19 * s, 15 * s), bool)
    valid[:203, :157] = (a != 7).any(-1)
    np.testing.assert_array_equal(mask, valid.reshape(19, s, 15, s).any((1, 3)))


def test_nonzero_float_nan_and_all_and_auto_all(tmp_path):
    f = RNG.standard_normal((64, 80)).astype(np.float32)
    f[:, :20] = np.nan
    f[:10] = 0
    tifffile.imwrite(tmp_path / "f.tif", f)
    with open_scene(str(tmp_path / "f.tif")) as scene:
        mask, _ = foreground_mask(scene, kind="nonzero")
        np.testing.assert_array_equal(mask, ~np.isnan(f) & (f != 0))
        mask, _ = foreground_mask(scene)  # float, no nodata value: only NaN is missing
        np.testing.assert_array_equal(mask, ~np.isnan(f))
        mask, factor = foreground_mask(scene, kind="all", max_side=16)
        assert mask.all() and (mask.shape, factor) == ((13, 16), 5.0)
    photo = RNG.integers(0, 200, (90, 120, 3), dtype=np.uint8)  # no bright background
    Image.fromarray(photo).save(tmp_path / "photo.png")
    with open_scene(str(tmp_path / "photo.png")) as scene:
        mask, _ = foreground_mask(scene)
        assert mask.all()
        with pytest.raises(ConfigError, match="unknown; use one of"):
            foreground_mask(scene, kind="glass")


def test_tile_has_foreground_is_conservative():
    mask = np.zeros((10, 10), bool)
    mask[5, 5] = True  # covers scene pixels 40..47 (factor 8)
    assert tile_has_foreground(mask, 8.0, 40, 48, 40, 48)
    assert tile_has_foreground(mask, 8.0, 48, 56, 48, 56)  # the next mask pixel: dilation
    assert tile_has_foreground(mask, 8.0, 0, 33, 0, 33)  # reaches mask pixel 4, next to 5
    assert not tile_has_foreground(mask, 8.0, 0, 32, 0, 32)  # ends at mask pixel 3
    assert not tile_has_foreground(mask, 8.0, 56, 64, 56, 64)  # mask pixel 7: two away
    assert not tile_has_foreground(mask, 8.0, 0, 80, 64, 80)
    assert tile_has_foreground(mask, 7.9, 0, 33, 0, 33)  # non-integer factors
    assert not tile_has_foreground(mask, 8.0, 200, 300, 0, 10)  # outside the mask


def test_otsu_threshold_splits_two_modes():
    v = np.concatenate([RNG.normal(0.1, 0.02, 1000), RNG.normal(0.6, 0.05, 500)]).clip(0, 1)
    assert 0.2 < otsu_threshold(v) < 0.45


@pytest.mark.data
def test_real_svs_tissue_fraction():
    path = shared_dataset("wsi-cmu1-small-region") / "CMU-1-Small-Region.svs"
    with open_scene(str(path)) as scene:
        mask, factor = foreground_mask(scene, max_side=512)  # auto -> tissue
        assert factor == 6.0 and mask.shape == (495, 370)
        assert 0.22 < mask.mean() < 0.38  # SOURCE.md: about 31-33 % tissue (mean RGB < 220)
        ref = scene.read(0, 2967, 0, 2220)[::6, ::6].mean(-1) < 220
    assert (mask == ref[: mask.shape[0], : mask.shape[1]]).mean() > 0.9


@pytest.mark.data
def test_real_geotiff_nonzero():
    d = shared_dataset("satellite-spacenet-solaris")
    with open_scene(str(d / "landsat_unlabelled" / "RGB.byte.tif")) as scene:
        mask, factor = foreground_mask(scene, max_side=256)  # geo + nodata 0 -> nonzero
        assert factor == 4.0 and 0.6 < mask.mean() < 0.75  # the rotated footprint, no collar
        assert not mask[0, 0] and mask[mask.shape[0] // 2, mask.shape[1] // 2]
    with open_scene(str(d / "buildings_atlanta" / "image_pan.tif")) as scene:
        mask, _ = foreground_mask(scene)
        assert mask.all()  # values 54..6615: no nodata pixel
