"""Storage faults: a fault-injecting proxy (tests/faultproxy.py) between s3fs and the S3 test
server (moto on loopback) answers a fraction of requests with 503 SlowDown, 500, a connection
reset or a body cut short.

- 5% faults: the scene completes through ``segment`` bit-identical to an undisturbed run.
- 100% faults: the CLI fails with a storage error (exit 3, no traceback), nothing COMPLETE.
- storage dying mid-scene: a StorageError; every shard record left behind matches its data;
  a rerun resumes from them and ends bit-identical.
- one failing request is retried a bounded, explicit number of times, and the retries are
  logged.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import tifffile
import torch

from tests.faultproxy import KINDS, FaultProxy

pytestmark = [pytest.mark.server, pytest.mark.slow]

H, W, TILE = 300, 260, 128  # 3 x 3 shards of 128 px (pointwise model: halo 0), 2 levels


def _model(path) -> str:
    from segcore.config import InputContract, ModelSpec, Normalization
    from segcore.models import build_model
    from segcore.models.checkpoint import save_checkpoint

    torch.manual_seed(3)
    spec = ModelSpec(arch="pointwise", in_channels=3, out_channels=1, kwargs={})
    model = build_model(spec).eval()
    save_checkpoint(model, str(path), InputContract(channels=3, normalization=Normalization(
        scale=255.0, mean=(0.5,) * 3, std=(0.25,) * 3)), spec)
    return str(path)


@pytest.fixture(scope="module")
def inputs(s3_server, tmp_path_factory):
    """A scene and a model, local and uploaded (directly, not through any proxy), and the
    undisturbed reference result on s3."""
    from segcore.pipeline import SegmentConfig, segment

    d = tmp_path_factory.mktemp("faults")
    img = np.random.default_rng(5).integers(0, 256, (H, W, 3), dtype=np.uint8)
    tifffile.imwrite(d / "scene.tif", img, tile=(64, 64), photometric="rgb")
    model = _model(d / "m.safetensors")
    bucket = s3_server.make_bucket()
    s3 = s3_server.client()
    name = bucket[len("s3://"):]
    s3.upload_file(str(d / "scene.tif"), name, "in/scene.tif")
    s3.upload_file(model, name, "models/m.safetensors")
    cfg = dict(src=f"{bucket}/in/scene.tif", model=f"{bucket}/models/m.safetensors",
               tile=TILE, device="cpu", amp="none", skip_background=False, shards_per_task=3)
    ref = segment(SegmentConfig(out=f"{bucket}/ref", **cfg), progress=False)
    assert ref.tiles_run == ref.tiles_total == 9
    return {"bucket": bucket, "cfg": cfg, "local_src": str(d / "scene.tif"),
            "local_model": model}


@pytest.fixture
def proxy(s3_server, monkeypatch):
    """A FaultProxy in front of moto, at rate 0; SEGCORE_S3_ENDPOINT_URL points at it for the
    test (restored after, like the proxy, which is always stopped)."""
    p = FaultProxy(s3_server.endpoint_url, rate=0.0, seed=13).start()
    monkeypatch.setenv("SEGCORE_S3_ENDPOINT_URL", p.url)
    try:
        yield p
    finally:
        p.stop()


def _direct(s3_server, monkeypatch) -> None:
    """Talk to moto directly again (checks run on the undisturbed server)."""
    from segcore.io.uri import get_fs

    monkeypatch.setenv("SEGCORE_S3_ENDPOINT_URL", s3_server.endpoint_url)
    get_fs("s3://any")[0].invalidate_cache()  # listings cached by the shared s3fs instance


def _arrays(out: str) -> dict[str, np.ndarray]:
    from segcore.io.zarrstore import open_group

    root = open_group(f"{out}/result.zarr")
    names = [f"{lv}" for lv in range(2)] + [f"labels/mask/{lv}" for lv in range(2)]
    return {n: root[n][:] for n in names}


def _records(out: str) -> dict[str, dict]:
    from segcore.io.uri import get_fs

    fs, path = get_fs(f"{out}/shards")
    fs.invalidate_cache()
    try:
        keys = fs.ls(path)
    except FileNotFoundError:
        return {}
    return {k.rsplit("/", 1)[1]: json.loads(fs.cat_file(k)) for k in keys}


def _all_records_true(out: str) -> int:
    """Every shard record present matches its shard's data (what resume trusts); returns how
    many there are."""
    from segcore.io.zarrstore import open_group
    from segcore.shards import verified_complete
    from segcore.tiling import plan_tiles

    recs = _records(out)
    root = open_group(f"{out}/result.zarr")
    by_key = {t.key: t for t in plan_tiles(H, W, TILE, 0, 1).tiles}
    for name in recs:
        tile = by_key[name[:-len(".json")]]
        assert verified_complete(out, root, tile), f"record {name} does not match its data"
    return len(recs)


def _retry_lines(caplog) -> int:
    """Retries the S3 client logged, as WARNINGs (segcore.io.uri.report_retries): botocore's
    per request, s3fs's around calls."""
    n = 0
    for r in caplog.records:
        msg = r.getMessage()
        if not msg.startswith("S3 retry: "):
            continue
        assert r.levelno == logging.WARNING and r.name in ("botocore.retries.standard", "s3fs")
        msg = msg[len("S3 retry: "):]
        n += msg.startswith(("Retry needed,", "Retryable error")) or \
            (msg.startswith("Client error (maybe retryable)") and "SlowDown" in msg)
    return n


def test_five_percent_faults_complete_bit_identical(inputs, proxy, s3_server, monkeypatch,
                                                    caplog):
    from segcore.pipeline import SegmentConfig, is_complete, segment

    caplog.set_level(logging.DEBUG, logger="botocore.retries")
    caplog.set_level(logging.DEBUG, logger="s3fs")
    # transient faults: at most one in a row for the same request, so every one is survivable
    proxy.rate, proxy.max_consecutive = 0.05, 1
    out = f"{inputs['bucket']}/faulty"
    t0 = time.perf_counter()
    rep = segment(SegmentConfig(out=out, **inputs["cfg"]), progress=False)
    seconds = time.perf_counter() - t0
    stats = dict(proxy.stats)
    retries = _retry_lines(caplog)
    print(f"\n5% faults: {stats}, retries logged {retries}, {seconds:.1f} s")
    assert stats["faults"] >= len(KINDS) and all(stats[k] > 0 for k in KINDS)
    # each answered error (503, 500) is retried by botocore, which logs it; resets and cut
    # bodies are often re-sent by aiohttp or s3fs's read loop without a log line
    assert retries >= stats["503"] + stats["500"]
    assert rep.tiles_run == rep.tiles_total == 9

    _direct(s3_server, monkeypatch)
    ref, got = _arrays(f"{inputs['bucket']}/ref"), _arrays(out)
    for name in ref:
        assert ref[name].dtype == got[name].dtype and np.array_equal(ref[name], got[name]), name
    assert is_complete(out) and _all_records_true(out) == 9
    ref_recs = {k: v["sha256"] for k, v in _records(f"{inputs['bucket']}/ref").items()}
    assert {k: v["sha256"] for k, v in _records(out).items()} == ref_recs


def test_storage_dying_mid_scene_leaves_only_true_records_and_resumes(inputs, proxy, s3_server,
                                                                      monkeypatch):
    from segcore.errors import StorageError
    from segcore.pipeline import SegmentConfig, is_complete, segment

    out = f"{inputs['bucket']}/dying"
    proxy.arm("/shards/", 4, 1.0)  # every request fails from the 5th shard record on
    t0 = time.perf_counter()
    with pytest.raises(StorageError) as err:
        segment(SegmentConfig(out=out, **inputs["cfg"]), progress=False)
    seconds = time.perf_counter() - t0
    print(f"\ndying: {dict(proxy.stats)}, {seconds:.1f} s: {err.value}")
    assert "storage failed" in str(err.value) or "failed" in str(err.value)

    _direct(s3_server, monkeypatch)
    assert not is_complete(out)
    n = _all_records_true(out)
    assert 4 <= n < 9
    rep = segment(SegmentConfig(out=out, **inputs["cfg"]), progress=False)
    assert rep.tiles_resumed == n and rep.tiles_run == 9 - n
    ref, got = _arrays(f"{inputs['bucket']}/ref"), _arrays(out)
    for name in ref:
        assert np.array_equal(ref[name], got[name]), name
    assert is_complete(out) and _all_records_true(out) == 9


def test_all_requests_failing_is_a_clear_storage_error_from_the_cli(inputs, proxy, s3_server,
                                                                    monkeypatch):
    from segcore.pipeline import is_complete

    proxy.rate = 1.0
    out = f"{inputs['bucket']}/dead"
    env = {**os.environ, "SEGCORE_S3_ENDPOINT_URL": proxy.url}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "segcore", "segment", inputs["local_src"], out,
                        "--model", inputs["local_model"], "--tile", str(TILE), "--device", "cpu",
                        "--amp", "none", "--no-skip-background", "--workers", "0", "--quiet"],
                       capture_output=True, text=True, timeout=300, env=env)
    seconds = time.perf_counter() - t0
    print(f"\n100% faults: rc {r.returncode}, {seconds:.1f} s, {dict(proxy.stats)}: {r.stderr}")
    assert r.returncode == 3, r.stderr
    assert "Traceback" not in r.stderr and out.split("://")[1] in r.stderr
    assert proxy.stats["faults"] == proxy.stats["requests"] > 0
    _direct(s3_server, monkeypatch)
    assert not is_complete(out) and _records(out) == {}


@pytest.mark.parametrize("kind", ["503", "reset"])
def test_one_failing_request_is_retried_a_bounded_number_of_times(proxy, s3_server, kind,
                                                                  caplog):
    """Every request fails (an answered error; a transport error, which is no OSError): one
    call gives up after at most S3FS_RETRIES x S3_MAX_ATTEMPTS attempts (x2 for resets:
    aiohttp re-sends once on a dropped keep-alive connection), the retries are in the log,
    and segcore's writer turns the failure into a StorageError naming the URI."""
    from segcore.errors import StorageError
    from segcore.io.uri import S3FS_RETRIES, get_fs, s3_max_attempts, write_bytes_atomic

    caplog.set_level(logging.WARNING)  # no DEBUG asked for: retries are warnings
    uri = f"{s3_server.make_bucket()}/x/one.json"
    fs, path = get_fs(uri)
    proxy.kinds, proxy.rate = (kind,), 1.0
    t0 = time.perf_counter()
    with pytest.raises(Exception) as raw:  # noqa: B017 - the client's own error, any type
        fs.pipe_file(path, b"{}")
    seconds = time.perf_counter() - t0
    bound = S3FS_RETRIES * s3_max_attempts() * (2 if kind == "reset" else 1)
    print(f"\n{kind}: {proxy.stats['requests']} requests (bound {bound}), "
          f"{_retry_lines(caplog)} retries logged, {seconds:.1f} s, {type(raw.value).__name__}")
    assert S3FS_RETRIES * s3_max_attempts() <= proxy.stats["requests"] <= bound
    assert _retry_lines(caplog) >= s3_max_attempts() - 1
    with pytest.raises(StorageError, match="one.json: write failed"):
        write_bytes_atomic(uri, b"{}")


def test_no_retry_no_warning_and_no_debug_noise(s3_server, caplog):
    """Healthy requests and a missing key log nothing: lowering the clients' loggers to DEBUG
    to see their retries lets none of their other records through (root stays at WARNING)."""
    from segcore.errors import InputError
    from segcore.io.uri import exists, read_bytes, write_bytes_atomic

    uri = f"{s3_server.make_bucket()}/x/ok.json"
    write_bytes_atomic(uri, b"{}")
    assert read_bytes(uri) == b"{}" and not exists(uri + ".missing")
    with pytest.raises((InputError, FileNotFoundError)):
        read_bytes(uri + ".missing")
    noisy = [(r.name, r.levelname, r.getMessage()[:80]) for r in caplog.records
             if r.name.startswith(("s3fs", "botocore", "aiobotocore"))]
    assert noisy == []
