"""Tile geometry as properties (hypothesis): for random scene sizes, tiles, halos and model
multiples the plan partitions the scene exactly, every window lies inside the whole-image
reference's mirrored canvas on its grid, and an affine predictor gives the same output tiled
as on the whole image, in memory and through ``segment`` (a pointwise checkpoint).

Example counts are bounded so the file runs in well under a minute. No example database is
kept (``database=None``); hypothesis still caches constants under .hypothesis/ (gitignored). A failure prints the example that broke
the property and ``@reproduce_failure`` to replay it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from segcore.stitching import predict_tiled, predict_whole
from segcore.tiling import mirror_index, mirror_pad_region, plan_tiles, round_up

MULTIPLES = (1, 2, 4, 8, 16, 32)  # pointwise, U-Net depth 1..4 (2**depth), U2-Net (32)
FAST = settings(max_examples=150, deadline=None, database=None)
ARRAYS = settings(max_examples=60, deadline=None, database=None)
PIPELINE = settings(max_examples=10, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


@st.composite
def geometry(draw, max_side: int = 1500, max_cores: int | None = None,
             multiples: tuple[int, ...] = MULTIPLES):
    """(height, width, tile, halo, multiple) that resolve_halo accepts: the tile a multiple of
    the model's multiple, the halo (rounded up to it) leaving a core of at least one multiple.
    ``max_cores``: at most that many cores along each side (bounds the work per example)."""
    m = draw(st.sampled_from(multiples))
    tile = m * draw(st.integers(max(2, -(-16 // m)), max(2, 512 // m)))
    # halos whose rounding up to m leaves a positive core: round_up(halo, m) <= (tile - m) / 2
    max_halo = ((tile - m) // 2) // m * m
    halo = draw(st.integers(0, max_halo))
    side = max_side if max_cores is None else min(max_side,
                                                  max_cores * (tile - 2 * round_up(halo, m)))
    h = draw(st.integers(1, side))
    w = draw(st.integers(1, side))
    return h, w, tile, halo, m


@FAST
@given(geometry())
def test_cores_partition_the_scene_exactly(g):
    h, w, tile, halo, m = g
    grid = plan_tiles(h, w, tile, halo, m)
    hr = grid.halo
    assert hr == round_up(halo, m) and grid.core == tile - 2 * hr and grid.core % m == 0
    owner = np.zeros((h, w), np.uint16)
    keys = set()
    for t in grid.tiles:
        assert 0 <= t.y0 < t.y1 <= h and 0 <= t.x0 < t.x1 <= w
        owner[t.y0:t.y1, t.x0:t.x1] += 1
        # the core is exactly one shard of the output's shard grid
        assert (t.y0, t.x0) == (t.row * grid.core, t.col * grid.core)
        assert t.y1 == min(t.y0 + grid.core, h) and t.x1 == min(t.x0 + grid.core, w)
        keys.add(t.key)
    assert (owner == 1).all()  # disjoint cores whose union is the scene
    assert len(keys) == len(grid.tiles) == grid.shape[0] * grid.shape[1]


@FAST
@given(geometry())
def test_windows_are_aligned_and_inside_the_mirrored_canvas(g):
    """What tiling.py promises: each window holds its core plus the (rounded) halo, starts on
    the model's grid, has a size the model accepts, is never larger than the tile, and is a
    sub-window of the canvas the whole-image reference builds ([-pad, round_up(H, m) + pad)
    with pad = the rounded halo), so its pixels, mirrored ones too, are the reference's."""
    h, w, tile, halo, m = g
    grid = plan_tiles(h, w, tile, halo, m)
    hr = grid.halo
    for t in grid.tiles:
        assert t.wy0 % m == 0 and t.wx0 % m == 0
        assert t.window_shape[0] % m == 0 and t.window_shape[1] % m == 0
        assert t.window_shape[0] <= tile and t.window_shape[1] <= tile
        assert t.y0 - t.wy0 == hr and t.x0 - t.wx0 == hr
        assert t.wy1 - t.y1 >= hr and t.wx1 - t.x1 >= hr
        assert -hr <= t.wy0 and t.wy1 <= round_up(h, m) + hr
        assert -hr <= t.wx0 and t.wx1 <= round_up(w, m) + hr
        ys, xs = t.crop
        assert (ys.stop - ys.start, xs.stop - xs.start) == t.core_shape


@FAST
@given(h=st.integers(1, 40), w=st.integers(1, 40), data=st.data())
def test_mirror_pad_region_is_the_symmetric_index_map_at_any_distance(h, w, data):
    """The fast path (one read + np.pad) and the general index map agree for any window, also
    one that sticks out by more than the image's own size; only the needed box is read."""
    img = np.arange(h * w * 2, dtype=np.int32).reshape(h, w, 2)
    wy0 = data.draw(st.integers(-3 * h - 5, 2 * h))
    wx0 = data.draw(st.integers(-3 * w - 5, 2 * w))
    wy1 = wy0 + data.draw(st.integers(1, 4 * h + 5))
    wx1 = wx0 + data.draw(st.integers(1, 4 * w + 5))
    boxes = []

    def read(y0, y1, x0, x1):
        assert 0 <= y0 < y1 <= h and 0 <= x0 < x1 <= w
        boxes.append((y0, y1, x0, x1))
        return img[y0:y1, x0:x1]

    out = mirror_pad_region(read, h, w, wy0, wy1, wx0, wx1)
    iy, ix = mirror_index(wy0, wy1, h), mirror_index(wx0, wx1, w)
    assert np.array_equal(out, img[np.ix_(iy, ix)])
    assert len(boxes) == 1
    y0, y1, x0, x1 = boxes[0]
    assert (y0, y1, x0, x1) == (iy.min(), iy.max() + 1, ix.min(), ix.max() + 1)


def _affine_predictor(coef: tuple[float, ...], m: int, local: bool):
    """A predictor linear in its input (an affine map of it), built from elementwise
    operations in a fixed order so every output pixel is computed bit-identically whatever
    the window: a pointwise term, the mean of the pixel's aligned m x m block (equal tiled and
    whole only if windows start on the m-grid: rule 2), and with ``local`` the mean of its
    3x3 neighbourhood (receptive-field radius 1: needs a halo, rule 1)."""
    a, b, c, d, e = coef

    def predict(batch: np.ndarray) -> np.ndarray:
        x = batch.astype(np.float64)
        _, _, hh, ww = x.shape
        assert hh % m == 0 and ww % m == 0, "window not a multiple of the model's multiple"
        rows = np.zeros((x.shape[0], x.shape[1], hh // m, ww))
        for i in range(m):  # sums in a fixed order: rows of the block, then its columns
            rows = rows + x[:, :, i::m, :]
        block = np.zeros((x.shape[0], x.shape[1], hh // m, ww // m))
        for j in range(m):
            block = block + rows[:, :, :, j::m]
        block = np.repeat(np.repeat(block / (m * m), m, axis=2), m, axis=3)
        out = a * x[:, :1] + b * x[:, 1:2] + c * block[:, :1] + e
        if local:
            p = np.pad(x[:, :1], ((0, 0), (0, 0), (1, 1), (1, 1)))  # zeros: cropped as halo
            nb = np.zeros_like(x[:, :1])
            for dy in range(3):
                for dx in range(3):
                    nb = nb + p[:, :, dy:dy + hh, dx:dx + ww]
            out = out + d * (nb / 9.0)
        return out

    return predict


@ARRAYS
@given(g=geometry(max_side=300, max_cores=6), seed=st.integers(0, 2**31 - 1),
       coef=st.tuples(*[st.floats(-4, 4, allow_nan=False, width=32)] * 5),
       batch=st.integers(1, 5))
def test_affine_predictor_tiled_equals_whole_image(g, seed, coef, batch):
    h, w, tile, halo, m = g
    local = halo >= 1  # the 3x3 term needs a halo >= its radius 1
    img = np.random.default_rng(seed).random((2, h, w)).astype(np.float32)
    predict = _affine_predictor(coef, m, local)
    tiled = predict_tiled(predict, img, tile=tile, halo=halo, multiple=m, batch=batch)
    whole = predict_whole(predict, img, pad=max(halo, 1), multiple=m)
    assert tiled.shape == whole.shape == (1, h, w)
    assert np.array_equal(tiled, whole)


def test_a_misaligned_window_would_be_caught():
    """Control for the property above: the block-mean term does depend on the grid, so a
    window shifted off it changes the output (the test can fail)."""
    img = np.random.default_rng(1).random((2, 16, 16)).astype(np.float32)
    predict = _affine_predictor((0.0, 0.0, 1.0, 0.0, 0.0), 4, False)
    aligned = predict(img[None, :, 0:8, 0:8])[0, 0, 2:6, 2:6]
    shifted = predict(img[None, :, 2:10, 2:10])[0, 0, 0:4, 0:4]
    assert not np.array_equal(aligned, shifted)


# --- through segment(): a pointwise checkpoint, the real readers, writers and quantisation ---
@pytest.fixture(scope="module")
def pointwise_model(tmp_path_factory):
    """A random 1x1 convolution (an affine map of the normalised pixels, then a sigmoid)."""
    from segcore.config import InputContract, ModelSpec, Normalization
    from segcore.models import build_model
    from segcore.models.checkpoint import save_checkpoint

    torch.manual_seed(7)
    spec = ModelSpec(arch="pointwise", in_channels=3, out_channels=1, kwargs={})
    model = build_model(spec).eval()
    contract = InputContract(channels=3, normalization=Normalization(
        scale=255.0, mean=(0.5,) * 3, std=(0.25,) * 3))
    path = tmp_path_factory.mktemp("pointwise") / "m.safetensors"
    save_checkpoint(model, str(path), contract, spec)
    return str(path), tmp_path_factory


@PIPELINE
@given(g=geometry(max_side=300, max_cores=5, multiples=(1,)),
       per_task=st.integers(1, 5), seed=st.integers(0, 999))
def test_segment_with_a_pointwise_model_equals_whole_image(pointwise_model, g, per_task, seed):
    """The stored uint8 probabilities and the mask equal the same predictor run once on the
    whole scene, whatever the tile, halo and tasks: no seam, no pixel written twice or lost."""
    import tifffile
    import zarr

    from segcore.inference import get_predictor
    from segcore.pipeline import SegmentConfig, segment

    h, w, tile, halo, _ = g  # the pointwise model's input multiple is 1
    ckpt, factory = pointwise_model
    img = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    d = factory.mktemp("scene")
    tifffile.imwrite(d / "s.tif", img, photometric="rgb")
    rep = segment(SegmentConfig(src=str(d / "s.tif"), out=str(d / "out"), model=ckpt,
                                tile=tile, halo=halo, device="cpu", amp="none",
                                skip_background=False, shards_per_task=per_task,
                                pyramid=False), progress=False)
    assert rep.exact and rep.tiles_run == rep.tiles_total
    root = zarr.open_group(str(d / "out" / "result.zarr"), mode="r")
    q, labels = get_predictor(ckpt, "cpu", "none").predict_quantized(img[None], "uint8")
    assert np.array_equal(root["0"][:], q[0])
    assert np.array_equal(root["labels/mask/0"][:], labels[0])
