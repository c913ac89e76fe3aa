"""The fast paths of segment (issue 10) keep its promises: precision chosen by detection, the
device-side normalisation and quantisation equal the numpy ones, windows read without fancy
indexing equal the mirror index map, tasks write their own pyramid levels exactly as the
level-by-level downsample would, the preview thumbnail comes from the windows already read,
--tile auto fits a memory budget, and the report says where the time went."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import tifffile
import torch
import zarr

from segcore.config import InputContract, ModelSpec, Normalization
from segcore.errors import ConfigError
from segcore.models import build_model
from segcore.models.checkpoint import save_checkpoint

NORM = Normalization(scale=255.0, mean=(0.5, 0.45, 0.4), std=(0.25, 0.3, 0.2))


def _ckpt(tmp_path, arch="unet", kwargs=None, model=None, name="m.safetensors"):
    torch.manual_seed(0)
    if model is None:
        kwargs = {"depth": 2, "width": 4} if kwargs is None and arch == "unet" else kwargs
        model = build_model(ModelSpec(arch=arch, in_channels=3, out_channels=1,
                                      kwargs=kwargs or {})).eval()
    uri = str(tmp_path / name)
    save_checkpoint(model, uri, InputContract(channels=3, normalization=NORM))
    return uri


# --- precision ------------------------------------------------------------------------------
@pytest.mark.precision
@pytest.mark.parametrize(("flags", "amp"), [({"avx2"}, "none"), ({"avx2", "amx_bf16"}, "bf16"),
                                            ({"avx512f", "avx512_bf16"}, "bf16")])
def test_amp_auto_follows_the_cpu_flags(monkeypatch, flags, amp):
    from segcore import inference

    monkeypatch.setattr(inference, "cpu_flags", lambda: set(flags))
    p = inference.choose_precision(torch.device("cpu"), "auto")
    assert p.amp == amp and p.channels_last
    assert p.reason.startswith("CPU has no") == (amp == "none") and "capability" in p.reason


def test_explicit_precision_and_refusals():
    from segcore.inference import choose_precision

    assert choose_precision(torch.device("cpu"), "bf16").amp == "bf16"
    assert not choose_precision(torch.device("cpu"), "none", channels_last=False).channels_last
    with pytest.raises(ConfigError, match="fp16 needs a CUDA"):
        choose_precision(torch.device("cpu"), "fp16")
    with pytest.raises(ConfigError, match="must be auto"):
        choose_precision(torch.device("cpu"), "fp8")


@pytest.mark.precision
def test_this_machine_gets_what_its_flags_say():
    from segcore.inference import FAST_BF16_FLAGS, choose_precision, cpu_flags

    fast = any(f in cpu_flags() for f in FAST_BF16_FLAGS)
    assert choose_precision(torch.device("cpu")).amp == ("bf16" if fast else "none")


# --- device-side normalisation and quantisation ---------------------------------------------
def test_predict_raw_and_quantized_equal_the_numpy_path(tmp_path):
    from segcore.inference import get_predictor, labels_from_probs, normalize

    pred = get_predictor(_ckpt(tmp_path), "cpu", "none")
    raw = np.random.default_rng(0).integers(0, 256, (3, 40, 56, 3)).astype(np.uint8)
    ref = pred(np.stack([normalize(r, pred.contract) for r in raw]))
    assert np.array_equal(pred.predict_raw(raw), ref)
    q, lab = pred.predict_quantized(raw, "uint8")
    assert np.array_equal(q, np.rint(ref * 255).astype(np.uint8))
    assert np.array_equal(lab, np.stack([labels_from_probs(r) for r in ref]))
    h, _ = pred.predict_quantized(raw, "float16")
    assert h.dtype == np.float16 and np.array_equal(h, ref.astype(np.float16))


def test_cpu_batches_run_as_small_forwards_with_the_same_result(tmp_path, monkeypatch):
    import segcore.inference as inf

    pred = inf.get_predictor(_ckpt(tmp_path), "cpu", "none")
    raw = np.random.default_rng(3).integers(0, 256, (5, 40, 56, 3)).astype(np.uint8)
    assert pred._cpu_slices(raw) is None  # 5 small windows: one forward
    whole_q, whole_lab = pred.predict_quantized(raw)
    whole_p = pred.predict_raw(raw)
    calls = []
    real = inf.Predictor._probs
    monkeypatch.setattr(inf.Predictor, "_probs", lambda self, x: calls.append(x.shape[0]) or
                        real(self, x))
    monkeypatch.setattr(inf, "CPU_FORWARD_PIXELS", 2 * 40 * 56)  # two windows per forward
    q, lab = pred.predict_quantized(raw)
    assert calls == [2, 2, 1]
    assert np.array_equal(q, whole_q) and np.array_equal(lab, whole_lab)
    # float32 convolutions may sum in another order for another batch size
    assert np.abs(pred.predict_raw(raw) - whole_p).max() < 1e-6


def test_bf16_on_a_trained_model_stays_close_to_fp32(tmp_path):
    """bf16 autocast (what --amp auto picks on AMX/AVX-512-BF16 CPUs and on GPUs) against fp32
    on a model trained for a few seconds on the synthetic nuclei: the bound the README states."""
    from segcore.inference import get_predictor
    from segcore.synthetic import make_patches, render

    torch.manual_seed(0)
    model = build_model(ModelSpec(arch="unet", in_channels=3, out_channels=1,
                                  kwargs={"depth": 2, "width": 8}))
    imgs, masks = make_patches(32, 64, seed=0)
    a = torch.tensor(np.array([1 / (255 * s) for s in NORM.std], np.float32)).view(1, 3, 1, 1)
    b = torch.tensor(np.array([-m / s for m, s in zip(NORM.mean, NORM.std, strict=True)],
                              np.float32)).view(1, 3, 1, 1)
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() * a + b
    y = torch.from_numpy(masks[:, None].astype(np.float32))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(60):
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y)
        loss.backward()
        opt.step()
    assert loss.item() < 0.3  # it learned something: the bound is about a trained model
    uri = _ckpt(tmp_path, model=model.eval())
    img, _ = render(0, 0, 128, 128, seed=7)
    p32 = get_predictor(uri, "cpu", "none").predict_raw(img[None])
    p16 = get_predictor(uri, "cpu", "bf16").predict_raw(img[None])
    dev = np.abs(p32 - p16)
    flips = np.mean((p32 >= 0.5) != (p16 >= 0.5))
    print(f"bf16 vs fp32: max {dev.max():.4f} mean {dev.mean():.5f} flips {flips:.5f}")
    assert dev.max() < 0.05 and dev.mean() < 0.005 and flips < 0.005, (dev.max(), flips)


# --- reading windows ------------------------------------------------------------------------
def test_fast_mirror_reads_equal_the_index_map():
    from segcore.tiling import mirror_index, mirror_pad_region

    rng = np.random.default_rng(0)
    for _ in range(800):
        h, w = (int(v) for v in rng.integers(1, 40, 2))
        img = rng.integers(0, 255, (h, w, 2)).astype(np.uint8)
        wy0, wx0 = int(rng.integers(-60, h)), int(rng.integers(-60, w))
        wy1, wx1 = wy0 + int(rng.integers(1, 90)), wx0 + int(rng.integers(1, 90))
        got = mirror_pad_region(lambda a, b, c, d, im=img: im[a:b, c:d], h, w, wy0, wy1, wx0,
                                wx1)
        ref = img[np.ix_(mirror_index(wy0, wy1, h), mirror_index(wx0, wx1, w))]
        assert np.array_equal(got, ref), (h, w, wy0, wy1, wx0, wx1)


def test_edge_windows_compute_only_core_plus_halo():
    from segcore.tiling import plan_tiles, round_up

    g = plan_tiles(2048, 2048, 1024, 107, 16)
    assert g.halo == 112 and g.core == 800
    last = g.tiles[-1]
    assert last.core_shape == (448, 448) and last.window_shape == (672, 672)
    assert all(t.window_shape[0] == round_up(t.core_shape[0], 16) + 2 * g.halo for t in g.tiles)
    assert g.overhead == pytest.approx((2 * 1024 + 672) ** 2 / 2048**2)


# --- a whole run ----------------------------------------------------------------------------
def _scene(tmp_path, h, w, seed=0):
    from segcore.synthetic import render

    img, _ = render(0, 0, h, w, seed=seed)
    path = tmp_path / "scene.tif"
    tifffile.imwrite(path, img, tile=(128, 128), photometric="rgb", compression="zlib")
    return img, str(path)


def test_task_pyramid_thumbnail_report(tmp_path):
    from segcore.io.zarrstore import downsample2
    from segcore.pipeline import SegmentConfig, plan, segment
    from segcore.preview import _from_tasks
    from segcore.shards import run_task

    img, src = _scene(tmp_path, 1000, 1300)
    uri = _ckpt(tmp_path)
    cfg = SegmentConfig(src=src, out=str(tmp_path / "out"), model=uri, tile=304,
                        skip_background=False, shards_per_task=3)
    rep = segment(cfg, progress=False)
    p = plan(cfg)
    assert p.grid.core == 256 and p.task_levels == 1 and p.n_levels == 4
    for key in ("plan", "prepare", "infer", "pyramid", "preview", "read", "compute", "write"):
        assert rep.timings[key] >= 0, key
    assert rep.timings["compute"] > 0 and rep.precision["amp"] in ("none", "bf16")
    assert rep.compute_overhead == pytest.approx(p.grid.overhead, rel=1e-3)
    root = zarr.open_group(str(tmp_path / "out" / "result.zarr"), mode="r")
    assert root["1"].shards == (1, 128, 128) and root["0"].shards == (1, 256, 256)
    for grp in (root, root["labels/mask"]):
        method = "mean" if grp is root else "nearest"
        level = grp["0"][:]
        for lv in range(1, 4):
            level = downsample2(level, method, level.dtype)
            assert np.array_equal(grp[str(lv)][:], level), (method, lv)
    # the thumbnail the tasks sampled is the scene itself, every thumb_stride-th pixel
    from segcore.pipeline import _task_specs

    results = [r for s in _task_specs(p) for r in run_task(s)]
    assert all("thumb" not in r for r in results)  # resumed: nothing read, nothing sampled
    from segcore.pipeline import prepare

    for name in ("plan.json",):
        (tmp_path / "out" / name).unlink()
    prepare(p)
    results = [r for s in _task_specs(p) for r in run_task(s)]
    s = p.thumb_stride
    thumb = _from_tasks(p, results, (-(-1000 // s), -(-1300 // s)))
    assert s == 2 and np.array_equal(thumb, img[::s, ::s])
    # the mask the tasks return for the preview is the mask's pyramid level, and the preview
    # made from it is the one made by reading the level back
    from segcore.preview import _mask_from_tasks, write_preview

    assert np.array_equal(_mask_from_tasks(p, results), root["labels/mask/1"][:])
    write_preview(p, str(tmp_path / "a.png"), results)
    write_preview(p, str(tmp_path / "b.png"),
                  [{k: v for k, v in r.items() if k != "thumb_mask"} for r in results])
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    # without a pyramid the preview level is the scene itself: the tasks sample nothing
    assert plan(cfg.model_copy(update={"pyramid": False})).thumb_stride == 0


@pytest.mark.precision
def test_tile_auto_fits_the_budget_and_small_cores_warn(tmp_path, monkeypatch):
    from segcore.inference import choose_precision
    from segcore.memory import activation_bytes_per_pixel
    from segcore.pipeline import SegmentConfig, plan

    _, src = _scene(tmp_path, 900, 900)
    spec = ModelSpec(arch="unet", kwargs={"depth": 3, "width": 8})
    uri = _ckpt(tmp_path, kwargs=spec.kwargs)
    # the budget is computed for the precision the plan will run at: fp32 when pinned, and
    # what --amp auto picks on this CPU (bf16 halves the activations where bf16 is fast)
    for amp in ("none", "auto"):
        resolved = choose_precision(torch.device("cpu"), amp).amp
        bpp = activation_bytes_per_pixel(spec, resolved)
        assert 100 < bpp < 2000
        monkeypatch.setenv("SEGCORE_MEMORY_BUDGET", str(int(bpp * 1.5 * 400 * 400)))
        p = plan(SegmentConfig(src=src, out=str(tmp_path / "o"), model=uri, tile="auto",
                               amp=amp, skip_background=False))
        assert p.grid.tile == 400 and p.batch == 1 and "--tile auto: 400 px" in p.warnings[0]
    monkeypatch.setenv("SEGCORE_MEMORY_BUDGET", "64G")
    p = plan(SegmentConfig(src=src, out=str(tmp_path / "o"), model=uri, tile="auto",
                           skip_background=False))
    assert p.grid.tile == 900 + 2 * 56 + 4 and len(p.grid.tiles) == 1  # one window: no halo waste
    p = plan(SegmentConfig(src=src, out=str(tmp_path / "o"), model=uri, tile=144,
                           skip_background=False))
    assert any("under half" in w for w in p.warnings)
    with pytest.raises(ConfigError, match="SEGCORE_MEMORY_BUDGET"):
        monkeypatch.setenv("SEGCORE_MEMORY_BUDGET", "lots")
        plan(SegmentConfig(src=src, out=str(tmp_path / "o"), model=uri, tile="auto"))


@pytest.mark.precision
@pytest.mark.parametrize(("kind", "amp"), [("avx2", "none"), ("avx512_bf16", "bf16"),
                                           ("amx", "bf16")])
def test_the_cpu_features_override_decides_as_that_cpu_would(tmp_path, monkeypatch, kind, amp):
    """SEGCORE_CPU_FEATURES makes --amp auto and --tile auto decide as that kind of CPU would,
    whatever this one has: with the budget of a 400 px fp32 window, a bf16 CPU gets a larger
    window (its activations are half the bytes). Fails if the override is ignored on any CPU:
    an AVX2-only one would pick 400 px for amx, an AMX one 560 px for avx2."""
    from segcore.inference import choose_precision
    from segcore.memory import activation_bytes_per_pixel
    from segcore.pipeline import SegmentConfig, plan

    monkeypatch.setenv("SEGCORE_CPU_FEATURES", kind)
    p = choose_precision(torch.device("cpu"), "auto")
    assert p.amp == amp and f"SEGCORE_CPU_FEATURES={kind}" in p.reason
    _, src = _scene(tmp_path, 900, 900)
    spec = ModelSpec(arch="unet", kwargs={"depth": 3, "width": 8})
    uri = _ckpt(tmp_path, kwargs=spec.kwargs)
    fp32 = activation_bytes_per_pixel(spec, "none")
    monkeypatch.setenv("SEGCORE_MEMORY_BUDGET", str(int(fp32 * 1.5 * 400 * 400)))
    tile = plan(SegmentConfig(src=src, out=str(tmp_path / "o"), model=uri, tile="auto",
                              skip_background=False)).grid.tile
    ratio = fp32 / activation_bytes_per_pixel(spec, amp)
    assert ratio == 1.0 if amp == "none" else ratio > 1.5
    assert tile == (400 if amp == "none" else int(400 * ratio ** 0.5) // 8 * 8), tile
    assert (tile > 400) == (amp == "bf16")


def test_a_cpu_features_override_that_names_no_kind_is_refused(tmp_path, monkeypatch):
    from segcore.inference import choose_precision, cpu_flags, detected_cpu_flags

    monkeypatch.setenv("SEGCORE_CPU_FEATURES", "avx9000")
    with pytest.raises(ConfigError, match="SEGCORE_CPU_FEATURES='avx9000' must be one of avx2"):
        choose_precision(torch.device("cpu"), "auto")
    # the CLI refuses it before writing anything, with a non-zero exit
    import subprocess
    import sys

    _, src = _scene(tmp_path, 200, 200)
    r = subprocess.run([sys.executable, "-m", "segcore", "segment", src, str(tmp_path / "o"),
                        "--model", _ckpt(tmp_path), "--workers", "0", "--quiet"],
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "SEGCORE_CPU_FEATURES": "avx9000"})
    assert r.returncode != 0 and "SEGCORE_CPU_FEATURES='avx9000'" in r.stderr, r.stderr
    assert not (tmp_path / "o").exists()
    monkeypatch.setenv("SEGCORE_CPU_FEATURES", "AMX_BF16")  # the flag's own name, any case
    assert "amx_bf16" in cpu_flags()
    monkeypatch.setenv("SEGCORE_CPU_FEATURES", "")
    assert cpu_flags() == detected_cpu_flags()


def test_result_is_ome_zarr_that_ome_zarr_py_reads(tmp_path):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    from segcore.pipeline import SegmentConfig, segment

    _, src = _scene(tmp_path, 600, 520)
    segment(SegmentConfig(src=src, out=str(tmp_path / "o"), model=_ckpt(tmp_path), tile=256,
                          skip_background=False), progress=False)
    nodes = list(Reader(parse_url(str(tmp_path / "o" / "result.zarr")))())
    assert len(nodes[0].data) == 3 and nodes[0].data[0].shape == (1, 600, 520)
    labels = [n for n in nodes if n.metadata.get("name") == "mask" or "color" in n.metadata]
    assert labels, [n.metadata for n in nodes]


def test_cli_refuses_fp16_on_cpu_before_writing_anything(tmp_path):
    import subprocess
    import sys

    _, src = _scene(tmp_path, 64, 64)
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "segcore", "segment", src, str(out), "--model",
                        _ckpt(tmp_path), "--device", "cpu", "--amp", "fp16", "--workers", "0"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "fp16 needs a CUDA device" in r.stderr, r.stderr[-500:]
    assert not out.exists()


def test_trim_heap_reaches_glibc_here():
    import platform

    from segcore.memory import trim_heap

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not a glibc system: trim_heap is a no-op there")
    assert trim_heap() is True and trim_heap() is True  # found once, cached


def test_tune_heap_keeps_freed_windows_in_the_heap():
    """After tune_heap a freed 50 MB block is reused, not unmapped and faulted in again: the
    page faults of five fresh window-sized arrays, counted by the kernel, in fresh processes."""
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not a glibc system: tune_heap is a no-op there")
    code = ("import resource, sys, numpy as np\n"
            "from segcore.memory import tune_heap\n"
            "if sys.argv[1] == '1':\n    assert tune_heap() and tune_heap()\n"
            "def faults():\n    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
            "a = np.ones(12_500_000, np.float32); del a\n"
            "f0 = faults()\n"
            "for _ in range(5):\n    a = np.ones(12_500_000, np.float32); del a\n"
            "print(faults() - f0)\n")
    n = {t: int(subprocess.run([sys.executable, "-c", code, t], check=True, text=True,
                               capture_output=True).stdout) for t in ("0", "1")}
    # glibc's default maps each 50 MB array afresh: 12k pages, or fewer huge pages with THP
    assert n["0"] >= 5 * 20, n
    assert n["1"] < n["0"] / 10, n
