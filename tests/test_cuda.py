"""The CUDA code paths: device-side normalisation from pinned memory, on-device quantisation,
--amp auto on a GPU, --tile auto from the GPU's free memory, and a whole segment run on the
GPU that equals the CPU's. Skipped where no GPU is visible (CI); run on a lent GPU with
``bench/gpu_check.sh``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")


def _ckpt(path, arch="unet", kwargs=None):
    from segcore.config import InputContract, ModelSpec, Normalization
    from segcore.models import build_model
    from segcore.models.checkpoint import save_checkpoint

    torch.manual_seed(0)
    spec = ModelSpec(arch=arch, in_channels=3, out_channels=1,
                     kwargs=kwargs if kwargs is not None else {"depth": 3, "width": 8})
    model = build_model(spec).eval()
    save_checkpoint(model, str(path), InputContract(channels=3, normalization=Normalization(
        scale=255, mean=(0.5, 0.4, 0.3), std=(0.25, 0.2, 0.3))))
    return str(path)


def test_cuda_predictor_matches_cpu_in_fp32_and_quantises_on_device(tmp_path):
    from segcore.inference import get_predictor

    uri = _ckpt(tmp_path / "m.safetensors")
    raw = np.random.default_rng(0).integers(0, 256, (2, 96, 128, 3)).astype(np.uint8)
    cpu = get_predictor(uri, "cpu", "none")
    gpu = get_predictor(uri, "cuda", "none")
    assert gpu.device.type == "cuda" and gpu.channels_last
    a, b = cpu.predict_raw(raw), gpu.predict_raw(raw)
    assert np.abs(a - b).max() < 1e-4
    q, lab = gpu.predict_quantized(raw, "uint8")
    assert q.dtype == np.uint8 and lab.dtype == np.uint8 and lab.shape == (2, 96, 128)
    assert np.abs(q.astype(int) - np.rint(b * 255).astype(int)).max() <= 1
    assert np.array_equal(lab, (b[:, 0] >= 0.5).astype(np.uint8)) or \
        np.mean(lab != (b[:, 0] >= 0.5)) < 1e-3


def test_amp_auto_is_bf16_on_cuda_and_close_to_fp32(tmp_path):
    from segcore.inference import get_predictor

    uri = _ckpt(tmp_path / "m.safetensors")
    auto = get_predictor(uri, "cuda", "auto")
    assert auto.amp == "bf16" and "CUDA" in auto.reason
    raw = np.random.default_rng(1).integers(0, 256, (1, 128, 128, 3)).astype(np.uint8)
    fp32 = get_predictor(uri, "cuda", "none").predict_raw(raw)
    assert np.abs(auto.predict_raw(raw) - fp32).max() < 0.05


def test_tile_auto_reads_the_gpu_budget(tmp_path):
    from segcore.config import ModelSpec
    from segcore.memory import auto_tile

    tile, batch, why = auto_tile(ModelSpec(arch="unet", kwargs={"depth": 4, "width": 64}),
                                 "cuda", "bf16", 4, 16, 112, 30000, 30000)
    assert tile % 16 == 0 and tile >= 2048 and batch >= 1 and "GPU" in why


def test_segment_on_cuda_equals_segment_on_cpu(tmp_path):
    import tifffile
    import zarr

    from segcore.pipeline import SegmentConfig, segment

    uri = _ckpt(tmp_path / "m.safetensors")
    img = np.random.default_rng(2).integers(0, 256, (700, 900, 3)).astype(np.uint8)
    tifffile.imwrite(tmp_path / "s.tif", img, tile=(256, 256), photometric="rgb")
    outs = {}
    for dev in ("cpu", "cuda"):
        cfg = SegmentConfig(src=str(tmp_path / "s.tif"), out=str(tmp_path / dev), model=uri,
                            tile=256, device=dev, amp="none", skip_background=False)
        rep = segment(cfg, progress=False)
        assert rep.precision["device"].startswith(dev) and rep.exact
        root = zarr.open_group(str(tmp_path / dev / "result.zarr"), mode="r")
        outs[dev] = root["0"][:].astype(int)
    assert np.abs(outs["cpu"] - outs["cuda"]).max() <= 1
