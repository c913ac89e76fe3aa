"""segment/ingest against real components: Dask LocalCluster, S3 (moto) on loopback, the CLI,
real slides and GeoTIFFs from ../shared (skipped when absent)."""

import json
import subprocess
import sys

import numpy as np
import pytest
import tifffile
import zarr

from segcore.io.ingest import IngestConfig, check_ingested, ingest
from segcore.io.readers import open_scene
from segcore.pipeline import SegmentConfig, is_complete, segment
from tests.conftest import shared_dataset
from tests.test_pipeline import make_model, make_scene, read_result


def test_segment_on_a_dask_local_cluster_equals_in_process(tmp_path):
    from distributed import Client, LocalCluster

    _, _, ckpt = make_model(tmp_path)
    _, src = make_scene(tmp_path, 230, 190)
    cfg = dict(src=src, model=ckpt, tile=64, halo=16, skip_background=False, shards_per_task=3)
    local = segment(SegmentConfig(out=str(tmp_path / "a"), **cfg), progress=False)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        dist = segment(SegmentConfig(out=str(tmp_path / "b"), **cfg), client=client,
                       progress=False)
    assert dist.tiles_run == local.tiles_run == local.tiles_total
    a, b = read_result(str(tmp_path / "a")), read_result(str(tmp_path / "b"))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_segment_reads_and_writes_s3(tmp_path, s3_server):
    import s3fs

    _, _, ckpt_local = make_model(tmp_path)
    _, src_local = make_scene(tmp_path, 150, 170)
    bucket = s3_server.make_bucket()
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server.endpoint_url})
    fs.put(src_local, f"{bucket}/in/scene.tif")
    fs.put(ckpt_local, f"{bucket}/models/m.safetensors")
    out = f"{bucket}/out/scene"
    cfg = dict(src=f"{bucket}/in/scene.tif", model=f"{bucket}/models/m.safetensors", tile=64,
               halo=16, skip_background=False)
    r = segment(SegmentConfig(out=out, **cfg), progress=False)
    assert is_complete(out) and r.tiles_run == r.tiles_total
    ref = segment(SegmentConfig(out=str(tmp_path / "ref"), **{
        **cfg, "src": src_local, "model": ckpt_local}), progress=False)
    root = zarr.open_group(zarr.storage.FsspecStore.from_url(
        f"{out}/result.zarr", storage_options={"client_kwargs": {
            "endpoint_url": s3_server.endpoint_url}}, read_only=True), mode="r")
    local = read_result(str(tmp_path / "ref"))
    assert np.array_equal(root["labels/mask/0"][:], local[1])
    assert np.array_equal(root["0"][:], local[0])
    assert json.loads(fs.cat(f"{out}/report.json"))["tiles_total"] == ref.tiles_total
    assert fs.exists(f"{out}/preview.png") and fs.exists(f"{out}/COMPLETE")


def test_ingest_writes_sharded_multiscale_ome_zarr(tmp_path):
    img, src = make_scene(tmp_path, 700, 530)
    dst = str(tmp_path / "img.zarr")
    ingest(IngestConfig(src=src, dst=dst, chunk=64, shard=256), progress=False)
    check_ingested(dst)
    root = zarr.open_group(dst, mode="r")
    assert np.array_equal(root["0"][:], img.transpose(2, 0, 1))
    assert root["0"].shards == (1, 256, 256) and root["0"].chunks == (1, 64, 64)
    assert root["1"].shape == (3, 350, 265)
    ms = root.attrs["ome"]["multiscales"][0]
    assert [d["path"] for d in ms["datasets"]] == [str(i) for i in range(len(ms["datasets"]))]
    # the ingested Zarr is itself a scene segcore reads
    with open_scene(dst) as s:
        assert s.info.height == 700 and np.array_equal(s.read(10, 20, 30, 40), img[10:20, 30:40])


def _cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "segcore", *args], capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("kind", ["missing", "text", "truncated"])
def test_cli_bad_input_names_the_file_and_publishes_nothing(tmp_path, kind):
    _, _, ckpt = make_model(tmp_path)
    if kind == "missing":
        src = tmp_path / "nope.tif"
    elif kind == "text":
        src = tmp_path / "notes.tif"
        src.write_text("this is not an image\n")
    else:
        _, good = make_scene(tmp_path, 256, 256)
        data = open(good, "rb").read()
        src = tmp_path / "cut.tif"
        src.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    r = _cli("segment", str(src), str(out), "--model", ckpt, "--tile", "64", "--halo", "16",
             "--workers", "0", "--quiet", "--no-skip-background")
    assert r.returncode == 2, r.stderr
    assert str(src.name) in r.stderr and "Traceback" not in r.stderr
    assert not (out / "COMPLETE").exists() and not (out / "report.json").exists()


def test_cli_halo_too_large_and_channel_mismatch(tmp_path):
    _, _, ckpt = make_model(tmp_path)
    _, src = make_scene(tmp_path, 64, 64)
    r = _cli("segment", src, str(tmp_path / "o"), "--model", ckpt, "--tile", "64", "--halo",
             "40", "--workers", "0", "--quiet")
    assert r.returncode == 2 and "halo 40 must be < tile/2 = 32" in r.stderr
    _, grey = make_scene(tmp_path, 64, 64, c=1, name="grey.tif")
    r = _cli("segment", grey, str(tmp_path / "o2"), "--model", ckpt, "--tile", "64",
             "--workers", "0", "--quiet")
    assert r.returncode == 2 and "grey.tif: has 1 channel(s) but the model" in r.stderr
    r = _cli("segment", grey, str(tmp_path / "o3"), "--model", ckpt, "--tile", "abc")
    assert r.returncode == 2


def test_cli_segment_with_a_local_dask_cluster(tmp_path):
    _, _, ckpt = make_model(tmp_path)
    _, src = make_scene(tmp_path, 128, 128)
    out = tmp_path / "out"
    r = _cli("segment", src, str(out), "--model", ckpt, "--tile", "64", "--halo", "16",
             "--workers", "1", "--quiet", "--no-skip-background")
    assert r.returncode == 0, r.stderr
    rep = json.loads((out / "report.json").read_text())
    assert rep["tiles_run"] == rep["tiles_total"] == 16 and (out / "COMPLETE").exists()


def test_real_svs_slide(tmp_path):
    svs = shared_dataset("wsi-cmu1-small-region") / "CMU-1-Small-Region.svs"
    _, _, ckpt = make_model(tmp_path)
    out = tmp_path / "out"
    r = segment(SegmentConfig(src=str(svs), out=str(out), model=ckpt, tile=512, halo="auto"),
                progress=False)
    assert r.scene["height"] == 2967 and r.scene["width"] == 2220
    assert abs(r.scene["pixel_size"] - 0.499) < 1e-3 and r.scene["pixel_unit"] == "micrometer"
    assert r.tiles_skipped_background > 0 and r.tiles_run > 0  # glass skipped, tissue run
    root = zarr.open_group(str(out / "result.zarr"), mode="r")
    scale = root.attrs["ome"]["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]
    assert abs(scale["scale"][-1] - 0.499) < 1e-3


def test_real_geotiff_keeps_crs_and_transform(tmp_path):
    tif = shared_dataset("satellite-spacenet-solaris") / "buildings_atlanta" / "image_pan.tif"
    _, _, ckpt = make_model(tmp_path, cin=1, scale=2047.0)  # uint16 pan band: a 16-bit model
    out = tmp_path / "out"
    r = segment(SegmentConfig(src=str(tif), out=str(out), model=ckpt, tile=256, halo="auto"),
                progress=False)
    geo = r.scene["geo"]
    assert geo["crs"] == "EPSG:32616"
    assert abs(geo["transform"][0] - 0.5) < 1e-9 and abs(geo["transform"][4] + 0.5) < 1e-9
    attrs = zarr.open_group(str(out / "result.zarr"), mode="r").attrs["segcore"]
    assert attrs["geo"] == geo
    with tifffile.TiffFile(tif) as t:
        tie = t.pages[0].tags["ModelTiepointTag"].value
    assert abs(geo["transform"][2] - tie[3]) < 1e-6 and abs(geo["transform"][5] - tie[4]) < 1e-6
