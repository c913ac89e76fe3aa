"""The synthetic scene generator: deterministic, region-consistent, written tile by tile."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import zarr

from segcore.errors import ConfigError
from segcore.synthetic import make_patches, render, write_scene


def test_render_is_a_function_of_global_coordinates():
    img, truth = render(0, 0, 200, 260, seed=3)
    sub, subt = render(57, 91, 80, 100, seed=3)
    assert np.array_equal(sub, img[57:137, 91:191]) and np.array_equal(subt, truth[57:137, 91:191])
    assert img.dtype == np.uint8 and img.shape == (200, 260, 3)
    assert set(np.unique(truth)) == {0, 1} and 0.03 < truth.mean() < 0.4
    # nuclei are darker than tissue: a model has something to learn
    assert img[truth == 1].mean() < img[truth == 0].mean() - 50
    other, _ = render(0, 0, 200, 260, seed=4)
    assert not np.array_equal(other, img)


def test_make_patches_deterministic():
    a, ma = make_patches(3, 48, seed=1)
    b, mb = make_patches(3, 48, seed=1)
    assert a.shape == (3, 48, 48, 3) and ma.shape == (3, 48, 48)
    assert np.array_equal(a, b) and np.array_equal(ma, mb)


@pytest.mark.parametrize("ext", ["tif", "zarr"])
def test_write_scene_matches_render(tmp_path, ext):
    uri = str(tmp_path / f"scene.{ext}")
    truth_uri = write_scene(uri, 300, 200, seed=2, tile=128)
    assert truth_uri.endswith(f"scene_truth.{ext}")
    if ext == "tif":
        with tifffile.TiffFile(uri) as tf:
            page = tf.pages[0]
            assert page.is_tiled and page.tilewidth == 128 and page.compression != 1
            img = page.asarray()
        truth = tifffile.imread(truth_uri)
    else:
        img, truth = zarr.open_array(uri, mode="r")[...], zarr.open_array(truth_uri, mode="r")[...]
    ref, ref_t = render(0, 0, 300, 200, seed=2)
    assert np.array_equal(img, ref) and np.array_equal(truth, ref_t * 255)


def test_write_scene_rejects_bad_names(tmp_path):
    with pytest.raises(ConfigError, match="must end in"):
        write_scene(str(tmp_path / "scene.png"), 10, 10)


def test_zarr_scene_pair_loads_as_training_data(tmp_path):
    from segcore.training.data import load_folder

    uri = str(tmp_path / "scene.zarr")
    write_scene(uri, 96, 128, seed=5, tile=64)
    (s,) = load_folder(uri)
    img, truth = render(0, 0, 96, 128, seed=5)
    assert np.array_equal(s.image, img) and np.array_equal(s.mask, truth)
