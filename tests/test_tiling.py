import numpy as np
import pytest
import torch

from segcore.config import ModelSpec
from segcore.errors import ConfigError
from segcore.models import build_model
from segcore.models.fields import measure_receptive_field
from segcore.stitching import predict_tiled, predict_whole
from segcore.tiling import mirror_index, mirror_pad_region, plan_tiles, resolve_halo


@pytest.mark.parametrize(("h", "w"), [(1, 1), (1, 300), (300, 1), (37, 1000), (512, 512),
                                      (1000, 777)])
@pytest.mark.parametrize(("tile", "halo", "m"), [(64, 16, 16), (256, 48, 16), (96, 0, 32)])
def test_every_pixel_is_owned_by_exactly_one_tile(h, w, tile, halo, m):
    grid = plan_tiles(h, w, tile, halo, m)
    owner = np.zeros((h, w), np.int32)
    for t in grid.tiles:
        owner[t.y0:t.y1, t.x0:t.x1] += 1
        assert t.wy0 % m == 0 and t.wx0 % m == 0  # pooling grid aligned with the image's
        assert t.window_shape[0] % m == 0 and t.window_shape[1] % m == 0
        assert t.window_shape[0] <= tile and t.window_shape[1] <= tile
        assert t.y0 - t.wy0 == grid.halo and t.x0 - t.wx0 == grid.halo
        assert t.wy1 - t.y1 >= grid.halo and t.wx1 - t.x1 >= grid.halo
        assert t.y0 % grid.core == 0 and t.x0 % grid.core == 0  # core == one shard
    assert (owner == 1).all()


def test_halo_rules_say_what_to_change():
    with pytest.raises(ConfigError, match=r"halo 300 must be < tile/2 = 256"):
        resolve_halo(512, 300, 16)
    with pytest.raises(ConfigError, match="multiple of the model's input multiple 32"):
        resolve_halo(500, 10, 32)
    with pytest.raises(ConfigError, match="leaves no core"):
        resolve_halo(64, 31, 32)
    assert resolve_halo(512, 100, 16) == (112, 288)


def test_mirror_index_symmetric_any_distance():
    assert mirror_index(-3, 6, 3).tolist() == [2, 1, 0, 0, 1, 2, 2, 1, 0]
    assert mirror_index(-2, 3, 1).tolist() == [0] * 5
    assert mirror_index(-7, 0, 3).tolist() == [0, 0, 1, 2, 2, 1, 0]


def test_mirror_pad_reads_only_the_needed_box():
    img = np.arange(100 * 80).reshape(100, 80, 1)
    calls = []

    def read(y0, y1, x0, x1):
        calls.append((y0, y1, x0, x1))
        return img[y0:y1, x0:x1]

    out = mirror_pad_region(read, 100, 80, -4, 10, 70, 90)
    assert calls == [(0, 10, 70, 80)]
    assert out[4, 0, 0] == img[0, 70, 0] and out[3, 0, 0] == img[0, 70, 0]
    assert out[5, 9, 0] == img[1, 79, 0] and out[5, 10, 0] == img[1, 79, 0]
    assert out[5, 11, 0] == img[1, 78, 0]


def _affine(batch):
    """A predictor with a receptive field of 0: exact round trip expected."""
    return batch[:, :1] * 2.0 + 1.0


@pytest.mark.parametrize(("h", "w"), [(1, 1), (1, 257), (131, 1), (200, 333)])
def test_affine_predictor_round_trips_exactly(h, w):
    img = np.random.default_rng(0).random((2, h, w)).astype(np.float32)
    out = predict_tiled(_affine, img, tile=64, halo=0, multiple=16)
    assert np.array_equal(out, img[:1] * 2.0 + 1.0)


def _torch_predict(model):
    def predict(batch):
        with torch.inference_mode():
            return torch.sigmoid(model(torch.from_numpy(np.ascontiguousarray(batch)))).numpy()

    return predict


@pytest.mark.parametrize(("h", "w"), [(1000, 777), (61, 45)])
@pytest.mark.parametrize("tile", [256, 512])
def test_unet_tiled_equals_whole_image(h, w, tile):
    torch.manual_seed(0)
    model = build_model(ModelSpec(arch="unet", in_channels=3, out_channels=1,
                                  kwargs={"depth": 3, "width": 4})).eval()
    rf = measure_receptive_field(model, 3)
    img = np.random.default_rng(1).random((3, h, w)).astype(np.float32)
    pred = _torch_predict(model)
    whole = predict_whole(pred, img, pad=rf.radius, multiple=8)
    tiled = predict_tiled(pred, img, tile=tile, halo=rf.radius, multiple=8)
    assert np.abs(whole - tiled).max() < 1e-4


def test_halo_at_the_field_is_exact_and_one_less_is_not():
    """Positive weights in float64 make every dependency visible (random weights hide far
    ones below 1e-6), so this test can fail: the halo must cover the measured field."""
    from segcore.models.fields import _positive_copy

    model = _positive_copy(build_model(ModelSpec(arch="unet", in_channels=1, out_channels=1,
                                                 kwargs={"depth": 2, "width": 2})))
    rf = measure_receptive_field(model, 1)
    img = np.random.default_rng(2).random((1, 150, 130))

    def pred(batch):
        with torch.inference_mode():
            return model(torch.from_numpy(np.ascontiguousarray(batch))).numpy()

    whole = predict_whole(pred, img, pad=rf.radius + 16, multiple=4)
    exact = predict_tiled(pred, img, tile=128, halo=rf.radius, multiple=4)
    assert np.abs(whole - exact).max() / np.abs(whole).max() < 1e-12
    short = predict_tiled(pred, img, tile=128, halo=rf.radius - 4, multiple=4)
    assert np.abs(whole - short).max() / np.abs(whole).max() > 1e-9
