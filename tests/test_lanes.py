"""Lanes (issue 21): without Dask, one process runs shard tasks side by side on threads that
share one model. Their results are byte for byte those of one lane, their forwards never
overlap on the device (the predictor's lock), their host work does, and the CLI's default
is this path. The simulated accelerator the harness feeds is the zero-cost model holding one
host-wide device for a set time per pixel."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import tifffile
import torch
import zarr
from PIL import Image

from segcore.config import InputContract, ModelSpec, Normalization
from segcore.models import build_model
from segcore.models.checkpoint import save_checkpoint

NORM = Normalization(scale=255.0, mean=(0.5, 0.45, 0.4), std=(0.25, 0.3, 0.2))


def _ckpt(tmp_path, arch="unet", kwargs=None, name="m.safetensors"):
    torch.manual_seed(0)
    model = build_model(ModelSpec(arch=arch, in_channels=3, out_channels=1,
                                  kwargs=kwargs or {})).eval()
    uri = str(tmp_path / name)
    save_checkpoint(model, uri, InputContract(channels=3, normalization=NORM))
    return uri


def _scene(tmp_path, h, w):
    from segcore.synthetic import render

    img, _ = render(0, 0, h, w, seed=3)
    path = tmp_path / "scene.tif"
    tifffile.imwrite(path, img, tile=(128, 128), photometric="rgb", compression="zlib")
    return str(path)


def _arrays(out):
    root = zarr.open_group(str(out / "result.zarr"), mode="r")
    return {k: np.asarray(root[k][:]) for k in ("0", "1", "labels/mask/0", "labels/mask/1")}


def test_lanes_write_what_one_lane_writes(tmp_path):
    from segcore.pipeline import SegmentConfig, segment

    src = _scene(tmp_path, 700, 610)
    model = _ckpt(tmp_path, kwargs={"depth": 2, "width": 4})
    got = {}
    for lanes in (1, 3):
        cfg = SegmentConfig(src=src, out=str(tmp_path / f"l{lanes}"), model=model, tile=128,
                            amp="none", skip_background=False, lanes=lanes, shards_per_task=2)
        r = segment(cfg, progress=False)
        assert r.exact and r.tiles_run == r.tiles_total > 6
        got[lanes] = _arrays(tmp_path / f"l{lanes}")
    for k, a in got[1].items():
        assert np.array_equal(a, got[3][k]), k
    # the preview (made from the tasks' thumbnails while the pyramid is built) is the same
    # image as one made after the pyramid, from the result's mask levels and the scene
    from segcore.pipeline import plan
    from segcore.preview import from_tasks_alone, write_preview

    p = plan(cfg)
    assert not from_tasks_alone(p, None)
    write_preview(p, str(tmp_path / "after.png"), None)
    read = [np.asarray(Image.open(tmp_path / n)) for n in ("l1/preview.png", "l3/preview.png",
                                                             "after.png")]
    assert read[0].shape[:2] == (700, 610)  # small scene: level 0, no sampling
    assert np.array_equal(read[0], read[1]) and np.array_equal(read[0], read[2])


def test_lanes_share_one_device_and_overlap_their_host_work(tmp_path, monkeypatch):
    """Forwards (the simulated device's waits) never overlap, and they come from more than
    one lane; a task's read or write runs while another lane's forward holds the device."""
    from segcore import shards
    from segcore.models import registry
    from segcore.pipeline import SegmentConfig, segment

    held: list[tuple[float, float, str]] = []
    real_wait = registry._simulated_device_wait

    def wait(seconds):
        t0 = time.perf_counter()
        real_wait(seconds)
        held.append((t0, time.perf_counter(), threading.current_thread().name))

    writes: list[tuple[float, float]] = []
    real_write = shards.write_blocks

    def write_blocks(blocks):
        t0 = time.perf_counter()
        real_write(blocks)
        writes.append((t0, time.perf_counter()))

    monkeypatch.setattr(registry, "_simulated_device_wait", wait)
    monkeypatch.setattr(shards, "write_blocks", write_blocks)
    src = _scene(tmp_path, 512, 512)
    # 0.05 Mpx/s: each 128^2 window holds the device ~0.33 s
    model = _ckpt(tmp_path, "pointwise", {"simulate_mpx_per_s": 0.05})
    cfg = SegmentConfig(src=src, out=str(tmp_path / "o"), model=model, tile=128, amp="none",
                        skip_background=False, lanes=2, shards_per_task=1, batch=1,
                        pyramid=False)
    r = segment(cfg, progress=False)
    held = [h for h in held if h[2] != "MainThread"]  # the plan's receptive-field probe
    assert r.tiles_run == 16 and len(held) == 16
    held.sort()
    assert all(a[1] <= b[0] for a, b in zip(held, held[1:], strict=False)), "two forwards held the device"
    assert len({name for *_, name in held}) == 2  # both lanes ran forwards
    busy = sum(b - a for a, b, _ in held)
    assert busy >= 16 * 128 * 128 / 1e6 / 0.05 * 0.95
    # a shard is written after its own forward ended, so a write that meets a forward met
    # another lane's: host work ran while the device was busy
    assert len(writes) == 16
    assert sum(any(w0 < a1 and a0 < w1 for a0, a1, _ in held) for w0, w1 in writes) >= 4


def test_simulated_device_refuses_a_negative_rate():
    from segcore.errors import ConfigError

    with pytest.raises(ConfigError, match="simulate_mpx_per_s"):
        build_model(ModelSpec(arch="pointwise", kwargs={"simulate_mpx_per_s": -1}))


def test_the_cli_default_runs_in_process_on_lanes(tmp_path, monkeypatch):
    """No --workers: no Dask cluster is started (a local cluster would be), and --lanes is
    checked like every other option."""
    import segcore.cluster as cluster
    from segcore.cli import main

    def no_cluster(*a, **k):
        raise AssertionError("a Dask cluster was started without --workers")

    monkeypatch.setattr(cluster, "open_client", no_cluster)
    src = _scene(tmp_path, 300, 300)
    model = _ckpt(tmp_path, kwargs={"depth": 2, "width": 4})
    assert main(["segment", src, str(tmp_path / "o"), "--model", model, "--tile", "128",
                 "--quiet", "--amp", "none"]) == 0
    assert (tmp_path / "o" / "COMPLETE").exists()
    assert main(["segment", src, str(tmp_path / "p"), "--model", model, "--lanes", "many",
                 "--quiet"]) != 0
    assert not (tmp_path / "p" / "plan.json").exists()


def test_precision_is_recorded_when_every_shard_resumes(tmp_path):
    """A run whose every shard verifies (it died after the shards, before the report) still
    reports the precision, resolved as the tasks resolve it."""
    from segcore.pipeline import SegmentConfig, segment

    src = _scene(tmp_path, 300, 300)
    cfg = SegmentConfig(src=src, out=str(tmp_path / "o"), model=_ckpt(tmp_path, kwargs={
        "depth": 2, "width": 4}), tile=128, amp="none", skip_background=False)
    first = segment(cfg, progress=False)
    assert first.precision["amp"] == "none" and first.tiles_run == first.tiles_total
    (tmp_path / "o" / "COMPLETE").unlink()
    (tmp_path / "o" / "report.json").unlink()
    again = segment(cfg, progress=False)
    assert again.tiles_resumed == again.tiles_total and again.tiles_run == 0
    assert again.precision["amp"] == "none" and again.precision["device"] == "cpu"
    assert "no shard ran the model" in again.precision["reason"]


def test_the_preview_has_a_legend_of_the_classes_it_shows():
    """A swatch of each class colour shown, and its name (else the label number)."""
    from segcore.preview import PALETTE, _legend

    mask = np.zeros((200, 300), np.uint8)
    mask[50:90, 50:90], mask[120:140, 200:260] = 1, 3
    img = Image.fromarray(np.full((200, 300, 3), 128, np.uint8))
    assert _legend(img, mask, ("background", "nucleus"))
    corner = np.asarray(img)[120:, :80].reshape(-1, 3)
    for k in (1, 3):  # both classes' colours are in the legend's corner, label 2's is not
        assert (corner == PALETTE[k]).all(1).any()
    assert not (corner == PALETTE[2]).all(1).any()
    small = Image.fromarray(np.zeros((64, 64, 3), np.uint8))
    assert not _legend(small, mask[:64, :64], ())
    assert not _legend(img, np.zeros_like(mask), ("background",))  # nothing to name


def test_progress_in_a_log_is_lines_not_carriage_returns(tmp_path):
    """segment with its output to a file (not a terminal): progress lines, no bar redraws."""
    import re
    import subprocess
    import sys

    src = _scene(tmp_path, 300, 300)
    model = _ckpt(tmp_path, kwargs={"depth": 2, "width": 4})
    log = tmp_path / "log.txt"
    with open(log, "w") as fh:
        r = subprocess.run([sys.executable, "-m", "segcore", "segment", src,
                            str(tmp_path / "out"), "--model", model, "--tile", "128",
                            "--amp", "none", "--no-skip-background"], stdout=fh, stderr=fh,
                           timeout=300)
    text = log.read_text()
    assert r.returncode == 0, text[-2000:]
    assert "\r" not in text
    assert re.search(r"^segment: (\d+)/\1 tiles, \d+ s, [\d.]+ Mpx/s$", text, re.M), text[-2000:]
