"""segment(): the library pipeline end to end on generated scenes (local storage)."""

import json

import numpy as np
import pytest
import tifffile
import torch
import zarr

from segcore.config import InputContract, ModelSpec, Normalization
from segcore.errors import ConfigError, InputError
from segcore.inference import normalize
from segcore.models import build_model
from segcore.models.checkpoint import save_checkpoint
from segcore.models.fields import measure_receptive_field
from segcore.pipeline import SegmentConfig, is_complete, load_report, segment
from segcore.stitching import predict_whole


def make_model(tmp_path, arch="unet", cin=3, kwargs=None, name="m.safetensors", scale=255.0):
    """A tiny model; ``scale`` 255 means 8-bit input (segment refuses other dtypes for it)."""
    torch.manual_seed(0)
    kwargs = {"depth": 2, "width": 4} if kwargs is None and arch == "unet" else (kwargs or {})
    model = build_model(ModelSpec(arch=arch, in_channels=cin, out_channels=1,
                                  kwargs=kwargs)).eval()
    contract = InputContract(channels=cin, normalization=Normalization(
        scale=scale, mean=(0.5,) * cin, std=(0.25,) * cin))
    uri = str(tmp_path / name)
    save_checkpoint(model, uri, contract)
    return model, contract, uri


def make_scene(tmp_path, h, w, c=3, dtype=np.uint8, name="scene.tif", seed=0):
    rng = np.random.default_rng(seed)
    hi = 255 if dtype == np.uint8 else 4000
    img = rng.integers(0, hi, size=(h, w, c) if c > 1 else (h, w)).astype(dtype)
    path = tmp_path / name
    tifffile.imwrite(path, img, tile=(64, 64) if min(h, w) >= 64 else None,
                     photometric="rgb" if c == 3 else "minisblack")
    return img if c > 1 else img[..., None], str(path)


def reference(model, contract, img, multiple):
    x = normalize(img, contract)
    rf = measure_receptive_field(model, x.shape[0])

    def pred(b):
        with torch.inference_mode():
            return torch.sigmoid(model(torch.from_numpy(np.ascontiguousarray(b)))).numpy()

    return predict_whole(pred, x, pad=rf.radius, multiple=multiple)


def read_result(out):
    root = zarr.open_group(f"{out}/result.zarr", mode="r")
    return root["0"][:], root["labels/mask/0"][:], root


@pytest.mark.parametrize(("h", "w", "tile"), [(300, 257, 128), (61, 45, 128), (1, 300, 128)])
def test_segment_equals_whole_image_inference(tmp_path, h, w, tile):
    model, contract, ckpt = make_model(tmp_path)
    img, src = make_scene(tmp_path, h, w)
    out = str(tmp_path / "out")
    report = segment(SegmentConfig(src=src, out=out, model=ckpt, tile=tile, halo="auto",
                                   prob_dtype="float16", skip_background=False),
                     progress=False)
    assert report.exact and report.tiles_run == report.tiles_total
    prob, mask, root = read_result(out)
    ref = reference(model, contract, img, multiple=4)
    assert np.abs(prob.astype(np.float32) - ref).max() < 2e-3  # float16 storage
    assert np.array_equal(mask, (ref[0] >= 0.5).astype(np.uint8)) or \
        (mask != (ref[0] >= 0.5)).mean() < 1e-3  # only float ties at 0.5 may flip
    assert is_complete(out)
    assert load_report(out).tiles_total == report.tiles_total
    attrs = root.attrs.asdict()
    assert attrs["ome"]["multiscales"][0]["axes"][0]["name"] == "c"
    assert root["labels"].attrs["ome"]["labels"] == ["mask"]
    assert (tmp_path / "out" / "preview.png").stat().st_size > 0


def test_every_shard_has_a_record_and_rerun_is_a_noop(tmp_path):
    _, _, ckpt = make_model(tmp_path)
    _, src = make_scene(tmp_path, 200, 200)
    out = str(tmp_path / "out")
    cfg = SegmentConfig(src=src, out=out, model=ckpt, tile=64, halo=16, skip_background=False)
    r1 = segment(cfg, progress=False)
    recs = list((tmp_path / "out" / "shards").glob("*.json"))
    assert len(recs) == r1.tiles_total == r1.tiles_run
    r2 = segment(cfg, progress=False)
    assert r2 == r1  # complete: the stored report, nothing recomputed


def test_interrupted_run_resumes_only_missing_shards(tmp_path, monkeypatch):
    _, _, ckpt = make_model(tmp_path)
    _, src = make_scene(tmp_path, 200, 180)
    cfg = dict(src=src, model=ckpt, tile=64, halo=16, skip_background=False,
               shards_per_task=1)
    full = segment(SegmentConfig(out=str(tmp_path / "full"), **cfg), progress=False)
    out = str(tmp_path / "out")
    monkeypatch.setenv("SEGCORE_FAULT_SHARD", "5")
    with pytest.raises(RuntimeError, match="injected fault"):
        segment(SegmentConfig(out=out, **cfg), progress=False)
    assert not is_complete(out)
    assert not (tmp_path / "out" / "report.json").exists()
    # corrupt one completed shard's data: its record no longer verifies, so it is redone
    root = zarr.open_group(f"{out}/result.zarr", mode="r+")
    root["labels/mask/0"][0:24, 0:24] = 7
    monkeypatch.delenv("SEGCORE_FAULT_SHARD")
    resumed = segment(SegmentConfig(out=out, **cfg), progress=False)
    assert resumed.tiles_resumed == full.tiles_total - 2  # shard 5 and the corrupted one
    assert resumed.tiles_run == 2
    a, b = read_result(str(tmp_path / "full")), read_result(out)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_changed_plan_starts_over(tmp_path):
    _, _, ckpt = make_model(tmp_path)
    _, src = make_scene(tmp_path, 100, 100)
    out = str(tmp_path / "out")
    segment(SegmentConfig(src=src, out=out, model=ckpt, tile=64, halo=16), progress=False)
    r = segment(SegmentConfig(src=src, out=out, model=ckpt, tile=128, halo=16),
                progress=False)
    assert r.tile == 128 and r.tiles_resumed == 0
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    assert plan["tile"] == 128


def test_background_tiles_are_skipped_and_counted(tmp_path):
    _, _, ckpt = make_model(tmp_path, cin=1, scale=1000.0)  # a 16-bit model
    img = np.zeros((256, 256), np.uint16)
    img[10:60, 10:60] = 1000  # one corner has data; the rest is nodata 0
    src = str(tmp_path / "sat.tif")
    tifffile.imwrite(src, img, tile=(64, 64))
    out = str(tmp_path / "out")
    r = segment(SegmentConfig(src=src, out=out, model=ckpt, tile=64, halo=16,
                              foreground="nonzero"), progress=False)
    assert r.tiles_skipped_background > 0
    assert r.tiles_run + r.tiles_skipped_background == r.tiles_total
    prob, mask, _ = read_result(out)
    assert prob[0, 200:, 200:].max() == 0


def test_wrong_channel_count_is_refused_before_anything_is_written(tmp_path):
    _, _, ckpt = make_model(tmp_path, cin=3)
    _, src = make_scene(tmp_path, 64, 64, c=1)
    out = tmp_path / "out"
    with pytest.raises(InputError, match=r"scene.tif: has 1 channel\(s\) but the model"):
        segment(SegmentConfig(src=src, out=str(out), model=ckpt, tile=64, halo=16),
                progress=False)
    assert not out.exists()


def test_halo_too_large_is_refused(tmp_path):
    _, _, ckpt = make_model(tmp_path)
    _, src = make_scene(tmp_path, 64, 64)
    with pytest.raises(ConfigError, match="halo 40 must be < tile/2 = 32"):
        segment(SegmentConfig(src=src, out=str(tmp_path / "o"), model=ckpt, tile=64, halo=40),
                progress=False)


def test_the_shard_loop_takes_a_function_as_its_predictor(tmp_path):
    """The real shard path (windows read with mirroring, cropped to cores, quantised, written
    as shards with records) driven by a plain function, as MONAI's inferer takes one: a 5x5
    mean of channel 0 through a logistic, against that function on the whole mirror-padded
    image; the halo (8) covers its radius (2), so every stored byte must equal."""
    from scipy import ndimage

    from segcore.inference import FunctionPredictor
    from segcore.pipeline import _task_specs, plan, prepare
    from segcore.shards import run_task

    def fn(b: np.ndarray) -> np.ndarray:
        m = ndimage.uniform_filter(b[:, :1], size=(1, 1, 5, 5), mode="nearest")
        return 1 / (1 + np.exp(-(m - 128) / 16))

    _, _, ckpt = make_model(tmp_path)
    img, src = make_scene(tmp_path, 300, 257)
    out = str(tmp_path / "out")
    p = plan(SegmentConfig(src=src, out=out, model=ckpt, tile=128, halo=8,
                           skip_background=False, pyramid=False))
    assert prepare(p) == "new" and len(p.grid.tiles) > 4
    pred = FunctionPredictor(fn, 3)
    results = [r for spec in _task_specs(p) for r in run_task(spec, predictor=pred)]
    assert {r["status"] for r in results} == {"run"} and len(results) == len(p.grid.tiles)
    assert results[0]["precision"]["device"] == "function"
    prob, mask, _ = read_result(out)
    ref = predict_whole(fn, img.transpose(2, 0, 1).astype(np.float32), pad=8, multiple=1)
    np.testing.assert_array_equal(prob, np.rint(ref * 255).astype(np.uint8))
    np.testing.assert_array_equal(mask, (ref[0] >= 0.5).astype(np.uint8))


def test_a_costly_tile_is_said_with_a_tile_that_is_not(tmp_path):
    """--tile 64 under a 51-px field: the plan says the cost (4x the pixels, the window count)
    and names a tile; that tile plans exact at about 2x, without the warning."""
    import re

    from segcore.pipeline import plan

    _, _, ckpt = make_model(tmp_path, kwargs={"depth": 3, "width": 4})
    _, src = make_scene(tmp_path, 700, 700)
    cfg = {"src": src, "out": str(tmp_path / "o"), "model": ckpt, "skip_background": False}
    p = plan(SegmentConfig(**cfg, tile=64))
    said = [w for w in p.warnings if "x the scene's pixels in" in w]
    assert len(said) == 1 and f"in {len(p.grid.tiles)} windows" in said[0], p.warnings
    good = int(re.search(r"use --tile (\d+)", said[0]).group(1))
    q = plan(SegmentConfig(**cfg, tile=good))
    assert q.exact and q.grid.overhead < 2.3
    assert not any("x the scene's pixels in" in w for w in q.warnings)
